"""Vision Transformers (vanilla and sparsified, spec 2.4-2.5) and the MNIST residual MLP.

`vit` is torchvision's `VisionTransformer` as the seed adapts it
(`codes/modules/relu_vit.py`): a patch-embedding conv (patch x patch, stride
patch), an optional class token, learned position embeddings, `depth`
pre-LN encoder blocks

    x = x + attention(ln_1(x));   x = x + mlp(ln_2(x))

(LayerNorm eps 1e-6, `heads` heads), a final LayerNorm, and a linear head on
the class token (or on the mean token without one). The MLP's activation is
`activation` (ReLU in the seed's vanilla model). The "sparsified" variant
(`variant="sparsified"`) is DB-MLP + J-SquaredReLU + restricted LayerNorm
(`robust_sparse.nn.sparsity_modules`): every `ln_2` becomes a
`RestrictedLayerNorm` and every MLP gets a zeroth bias at its input (the
paper; `zeroth_bias_position="output"` for the released code), clipped to
`zeroth_bias_clipping * |gamma|` of `ln_2`. `db_mlp` and
`restricted_layer_norm` switch the two parts on or off separately (the
seed's `manipulate` runs use the DB-MLP unclipped, without the restricted
LayerNorm: `db_mlp=True, zeroth_bias_clipping=None`).

Presets (`--vit_preset`): `b16` is ViT-B/16 (patch 16, 12 blocks, 12 heads,
width 768, MLP 3072); `tiny` (patch 4, 4 blocks, 4 heads, width 128, MLP 512)
and `mnist` (patch 4, 4 blocks, 4 heads, width 64, MLP 256) are CPU-sized
models of this toolkit (not from the seed) for 32 px and 28 px images.
Every argument overrides its preset value.

Initialisation as torchvision: patch conv N(0, 1/fan_in) (torchvision's
trunc_normal_ cuts at +-2, about 50 standard deviations here, so it is a
normal), bias 0; class token 0; position embeddings N(0, 0.02^2);
attention in-projections xavier_uniform over the stacked [3d, d] matrix (so
U(+-sqrt(6 / 4d)) for each of query, key, value) with bias 0, out-projection
PyTorch's Linear default with bias 0; MLP linears xavier_uniform with biases
N(0, 1e-6^2) (spec 2.5); LayerNorms gamma 1, beta 0; the head 0 (weights and
bias). All dense and conv layers are `MaskedDense` / `MaskedConv2D`.

Layer names: [normalize,] patch_embedding, patch_tokens, [class_token,]
position_embedding, block{i}_{ln1, attention_query, attention_key,
attention_value, attention, attention_output, attention_add, ln2,
mlp_zeroth_bias, mlp_key, mlp_activation, mlp_value, mlp_add}, final_ln,
class_token_output | pool, output. The MLP's activation has `site`
"after_dense".

`residual_mlp` is the seed's MNIST MLP (`scripts/marchenko_pastur/mnist.py`,
spec 2.5): flatten, Linear(inputs, width) "initial", `depth` (4) residual
blocks `z <- z + act(Linear(LN(z)))` (LayerNorm eps 1e-5, `affine=False` for
the seed's `--no-affine`), Linear(width, classes); PyTorch's default init.
Layers: flatten, initial, block{i}_{ln, dense, activation, add}, output.

Registered models: `vit` (preset and variant from the model options
`--vit_preset`, default tiny, and `--vit_variant`, default vanilla), the
fixed `vit_b16`, `vit_tiny`, `vit_mnist` and their `..._sparsified`
variants, and `residual_mlp` (width 128, the seed's default). Every ViT
entry takes the model options of `VIT_OPTIONS` (`--patch_size`, `--width`,
`--db_mlp`, `--zeroth_bias_clipping` (inf: unclipped), ...); `residual_mlp`
takes `--width`, `--depth` and `--layer_norm_affine`. The sparsified entries use
J-SquaredReLU when given the toolkit's default activation "relu"; any other
spec (e.g. `mixed(steps=N)` for fine-tuning) is used as given.
"""

import math
from typing import Optional

import keras
from keras import ops

from robust_sparse.models.registry import (AFTER_DENSE, KERNEL_INITIALIZERS, MODELS,
                                           activation_layer, dense, l1_regularizer, logits_layer,
                                           model_input)
from robust_sparse.nn import sparsity_modules
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense

PRESETS = {
    "b16": dict(patch_size=16, depth=12, heads=12, width=768, mlp_width=3072),
    "tiny": dict(patch_size=4, depth=4, heads=4, width=128, mlp_width=512),
    "mnist": dict(patch_size=4, depth=4, heads=4, width=64, mlp_width=256),
}
VARIANTS = ("vanilla", "sparsified")
# The MLP activation of each variant when none is given.
VARIANT_ACTIVATIONS = {"vanilla": "relu", "sparsified": "jsrelu"}
LAYER_NORM_EPSILON = 1e-6


# ----------------------------------------------------------------------------
# Layers.


@keras.saving.register_keras_serializable(package="models")
class ClassToken(keras.layers.Layer):
  """Prepends a learned token (zero-initialised, as torchvision) to every sequence.

  Input shape: `(batch, tokens, width)`. Output shape: `(batch, tokens + 1, width)`.
  """

  def build(self, input_shape):
    self.token = self.add_weight(name="token", shape=(1, 1, input_shape[-1]),
                                 initializer="zeros", trainable=True)

  def call(self, inputs):
    token = ops.cast(self.token, inputs.dtype)
    token = ops.broadcast_to(token, (ops.shape(inputs)[0], 1, inputs.shape[-1]))
    return ops.concatenate([token, inputs], axis=1)

  def compute_output_shape(self, input_shape):
    tokens = None if input_shape[1] is None else input_shape[1] + 1
    return (input_shape[0], tokens, input_shape[2])


@keras.saving.register_keras_serializable(package="models")
class PositionEmbedding(keras.layers.Layer):
  """Adds a learned embedding per token position, initialised N(0, `stddev`^2).

  Args:
    stddev: the initial standard deviation (torchvision: 0.02).

  Input shape: `(batch, tokens, width)` with known tokens. Output shape: the same.
  """

  def __init__(self, stddev=0.02, **kwargs):
    super().__init__(**kwargs)
    self.stddev = float(stddev)

  def build(self, input_shape):
    self.embedding = self.add_weight(
        name="embedding", shape=(1, input_shape[1], input_shape[2]),
        initializer=keras.initializers.RandomNormal(stddev=self.stddev), trainable=True)

  def call(self, inputs):
    return ops.add(inputs, ops.cast(self.embedding, inputs.dtype))

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(stddev=self.stddev)
    return config


@keras.saving.register_keras_serializable(package="models")
class DotProductAttention(keras.layers.Layer):
  """Multi-head scaled dot-product attention of projected `[query, key, value]` (no weights).

  The projections are the model's own `MaskedDense` layers (prunable, LoRA);
  this layer splits them into `heads` heads, computes
  `softmax(q k^T / sqrt(d_head)) v` per head and merges the heads back.

  Args:
    heads: number of heads; must divide the width.

  Input shape: three tensors `(batch, tokens, width)`. Output shape: the query's.
  """

  def __init__(self, heads, **kwargs):
    super().__init__(**kwargs)
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
      raise ValueError(f"DotProductAttention heads must be a positive integer, received "
                       f"heads={heads!r}")
    self.heads = heads

  def build(self, input_shape):
    width = input_shape[0][-1]
    if width % self.heads:
      raise ValueError(f"DotProductAttention '{self.name}': {self.heads} heads do not divide "
                       f"the width {width}")

  def call(self, inputs):
    query, key, value = inputs
    width = query.shape[-1]
    head_width = width // self.heads

    def split(x):
      return ops.reshape(x, (-1, x.shape[1], self.heads, head_width))

    query, key, value = split(query), split(key), split(value)
    scores = ops.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_width)
    weights = ops.softmax(scores, axis=-1)
    attended = ops.einsum("bhqk,bkhd->bqhd", weights, value)
    return ops.reshape(attended, (-1, attended.shape[1], width))

  def compute_output_shape(self, input_shape):
    return input_shape[0]

  def get_config(self):
    config = super().get_config()
    config.update(heads=self.heads)
    return config


@keras.saving.register_keras_serializable(package="models")
class TakeToken(keras.layers.Layer):
  """The token at `index` of every sequence (the class token's output).

  Input shape: `(batch, tokens, width)`. Output shape: `(batch, width)`.
  """

  def __init__(self, index=0, **kwargs):
    super().__init__(**kwargs)
    self.index = int(index)

  def call(self, inputs):
    return inputs[:, self.index]

  def compute_output_shape(self, input_shape):
    return (input_shape[0], input_shape[2])

  def get_config(self):
    config = super().get_config()
    config.update(index=self.index)
    return config


# ----------------------------------------------------------------------------
# The ViT.


def _in_projection_initializer(width):
  # xavier_uniform over torch's stacked in_proj_weight [3 * width, width].
  bound = math.sqrt(6.0 / (4 * width))
  return keras.initializers.RandomUniform(-bound, bound)


def encoder_block(x, *, heads, mlp_width, activation, db_mlp, restricted_layer_norm,
                  zeroth_bias_position, zeroth_bias_clipping, layer_norm_mode, uplift_steps,
                  l1_reg, name):
  """One pre-LN encoder block (see the module docstring); returns its output tensor."""
  width = x.shape[-1]
  regularizer = l1_regularizer(l1_reg)
  y = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name=f"{name}_ln1")(x)
  projections = [
      MaskedDense(width, kernel_initializer=_in_projection_initializer(width),
                  bias_initializer="zeros", kernel_regularizer=regularizer,
                  name=f"{name}_attention_{part}")(y)
      for part in ("query", "key", "value")]
  y = DotProductAttention(heads, name=f"{name}_attention")(projections)
  y = MaskedDense(width, kernel_initializer=KERNEL_INITIALIZERS["torch"](),
                  bias_initializer="zeros", kernel_regularizer=regularizer,
                  name=f"{name}_attention_output")(y)
  x = keras.layers.Add(name=f"{name}_attention_add")([x, y])
  if restricted_layer_norm:
    layer_norm = sparsity_modules.RestrictedLayerNorm(
        mode=layer_norm_mode, uplift_steps=uplift_steps, epsilon=LAYER_NORM_EPSILON,
        name=f"{name}_ln2")
  else:
    layer_norm = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON,
                                                 name=f"{name}_ln2")
  y = sparsity_modules.doubly_biased_mlp(
      layer_norm(x), hidden_units=mlp_width, activation=activation, name=f"{name}_mlp",
      zeroth_bias=db_mlp, position=zeroth_bias_position, clipping=zeroth_bias_clipping,
      layer_norm=layer_norm, l1_reg=l1_reg, site=AFTER_DENSE)
  return keras.layers.Add(name=f"{name}_mlp_add")([x, y])


def _positive(value, what, name):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"model {name!r}: {what} must be a positive integer, got {value!r}")
  return value


def vit(input_shape, num_classes, *, preset: str = "tiny", variant: str = "vanilla",
        patch_size: Optional[int] = None, depth: Optional[int] = None,
        heads: Optional[int] = None, width: Optional[int] = None,
        mlp_width: Optional[int] = None, class_token: bool = True,
        activation: Optional[str] = None, db_mlp: Optional[bool] = None,
        restricted_layer_norm: Optional[bool] = None, zeroth_bias_position: str = "input",
        zeroth_bias_clipping: Optional[float] = 0.1, layer_norm_mode: str = "from_scratch",
        uplift_steps: Optional[int] = None, l1_reg: float = 0.0, normalize: str = "none",
        name: Optional[str] = None):
  """A Vision Transformer (see the module docstring).

  Args:
    input_shape: (height, width, channels); both sides divisible by the patch size.
    num_classes: number of logits.
    preset: "b16", "tiny" or "mnist": the defaults of the five sizes below.
    variant: "vanilla" or "sparsified" (DB-MLP + jsrelu + restricted LayerNorm).
    patch_size, depth, heads, width, mlp_width: override the preset's.
    class_token: classify the class token (torchvision); False: the mean token.
    activation: the MLP activation spec; None: the variant's (relu / jsrelu).
    db_mlp: add zeroth biases to the MLPs; None: the variant's.
    restricted_layer_norm: make every ln_2 a `RestrictedLayerNorm`; None: the
      variant's.
    zeroth_bias_position: "input" (paper, default) or "output" (released code).
    zeroth_bias_clipping: c of `|b| <= c |gamma|` (0.1); None: unclipped.
    layer_norm_mode: "from_scratch" or "fine_tuning" (restricted LayerNorm).
    uplift_steps: the restricted LayerNorm's U (fine-tuning mode).
    l1_reg: L1 coefficient on every dense and conv kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    name: the model's name; default `vit_{preset}` (+ `_sparsified`).

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].

  Raises:
    ValueError: one line: an unknown preset, variant or position, an image
      size not divisible by the patch size, heads not dividing the width, a
      non-positive size, a negative clipping, a bad restricted-LayerNorm mode.
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown ViT preset {preset!r} (--vit_preset); known: "
                     f"{', '.join(PRESETS)}")
  if variant not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r} (--vit_variant); known: "
                     f"{', '.join(VARIANTS)}")
  sparsified = variant == "sparsified"
  name = name or f"vit_{preset}" + ("_sparsified" if sparsified else "")
  sizes = dict(PRESETS[preset])
  for key, value in dict(patch_size=patch_size, depth=depth, heads=heads, width=width,
                         mlp_width=mlp_width).items():
    sizes[key] = _positive(sizes[key] if value is None else value, key, name)
  patch = sizes["patch_size"]
  if len(input_shape) != 3:
    raise ValueError(f"model {name!r} takes images (height, width, channels), got "
                     f"input_shape {tuple(input_shape)}")
  height, image_width = input_shape[0], input_shape[1]
  if height % patch or image_width % patch:
    raise ValueError(f"model {name!r}: the image size {height}x{image_width} is not "
                     f"divisible by the patch size {patch}")
  if sizes["width"] % sizes["heads"]:
    raise ValueError(f"model {name!r}: {sizes['heads']} heads do not divide the width "
                     f"{sizes['width']}")
  activation = activation or VARIANT_ACTIVATIONS[variant]
  db_mlp = sparsified if db_mlp is None else db_mlp
  restricted_layer_norm = sparsified if restricted_layer_norm is None else restricted_layer_norm
  if zeroth_bias_position not in sparsity_modules.POSITIONS:
    raise ValueError(f"zeroth_bias_position must be one of "
                     f"{', '.join(sparsity_modules.POSITIONS)}, received "
                     f"{zeroth_bias_position!r}")

  inputs, x = model_input(input_shape, normalize)
  fan_in = patch * patch * input_shape[2]
  x = MaskedConv2D(sizes["width"], patch, strides=patch, padding="valid",
                   kernel_initializer=keras.initializers.RandomNormal(
                       stddev=math.sqrt(1.0 / fan_in)),
                   bias_initializer="zeros", kernel_regularizer=l1_regularizer(l1_reg),
                   name="patch_embedding")(x)
  patches = (height // patch) * (image_width // patch)
  x = keras.layers.Reshape((patches, sizes["width"]), name="patch_tokens")(x)
  if class_token:
    x = ClassToken(name="class_token")(x)
  x = PositionEmbedding(name="position_embedding")(x)
  for index in range(sizes["depth"]):
    x = encoder_block(x, heads=sizes["heads"], mlp_width=sizes["mlp_width"],
                      activation=activation, db_mlp=db_mlp,
                      restricted_layer_norm=restricted_layer_norm,
                      zeroth_bias_position=zeroth_bias_position,
                      zeroth_bias_clipping=zeroth_bias_clipping,
                      layer_norm_mode=layer_norm_mode, uplift_steps=uplift_steps,
                      l1_reg=l1_reg, name=f"block{index + 1}")
  x = keras.layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, name="final_ln")(x)
  if class_token:
    x = TakeToken(0, name="class_token_output")(x)
  else:
    x = keras.layers.GlobalAveragePooling1D(name="pool")(x)
  logits = MaskedDense(num_classes, kernel_initializer="zeros", bias_initializer="zeros",
                       kernel_regularizer=l1_regularizer(l1_reg), name="output")(x)
  return keras.Model(inputs, logits, name=name)


# ----------------------------------------------------------------------------
# The MNIST residual MLP.


def residual_mlp(input_shape, num_classes, *, width: int = 128, depth: int = 4,
                 affine: bool = True, activation: str = "relu", l1_reg: float = 0.0,
                 normalize: str = "none", name: Optional[str] = None):
  """The seed's MNIST MLP with residual blocks (see the module docstring).

  Args:
    input_shape: any shape; it is flattened (the seed: 32x32 = 1024 pixels).
    num_classes: number of logits.
    width: d, the width of every hidden layer.
    depth: number of residual blocks (the seed: 4).
    affine: whether the LayerNorms have gamma and beta (False: `--no-affine`).
    activation: activation spec of the blocks.
    l1_reg: L1 coefficient on every dense kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    name: the model's name; default "residual_mlp" (width 128) or
      "residual_mlp{width}".

  Returns:
    A `keras.Model` mapping inputs to logits [batch, num_classes].

  Raises:
    ValueError: a width or depth below 1.
  """
  name = name or ("residual_mlp" if width == 128 else f"residual_mlp{width}")
  _positive(width, "width", name)
  _positive(depth, "depth", name)
  inputs, x = model_input(input_shape, normalize)
  x = keras.layers.Flatten(name="flatten")(x)
  z = dense(x, width, l1_reg=l1_reg, name="initial")
  for index in range(1, depth + 1):
    h = keras.layers.LayerNormalization(epsilon=1e-5, center=affine, scale=affine,
                                        name=f"block{index}_ln")(z)
    h = dense(h, width, l1_reg=l1_reg, name=f"block{index}_dense")
    h = activation_layer(h, activation, site=AFTER_DENSE, name=f"block{index}_activation")
    z = keras.layers.Add(name=f"block{index}_add")([z, h])
  logits = logits_layer(z, num_classes, l1_reg=l1_reg)
  return keras.Model(inputs, logits, name=name)


# ----------------------------------------------------------------------------
# Registration.


# The model options (flags) every ViT entry takes, beyond the uniform contract.
VIT_OPTIONS = ("patch_size", "depth", "heads", "width", "mlp_width", "class_token", "db_mlp",
               "restricted_layer_norm", "zeroth_bias_position", "zeroth_bias_clipping",
               "layer_norm_mode", "uplift_steps")


def _vit_builder(name, preset=None, variant=None):
  """The registry builder of the ViT entry `name`; `vit` (preset None) takes both as options."""

  def build(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0, vit_preset=None, vit_variant=None, zeroth_bias_clipping=0.1,
            **options):
    del dropout  # No dropout option: the entry refuses a nonzero rate.
    chosen_variant = variant or vit_variant or "vanilla"
    if chosen_variant == "sparsified" and activation == "relu":
      activation = None  # The toolkit's default: the variant's own (jsrelu).
    if zeroth_bias_clipping is not None and math.isinf(zeroth_bias_clipping):
      zeroth_bias_clipping = None  # --zeroth_bias_clipping=inf: unclipped.
    return vit(input_shape, num_classes, preset=preset or vit_preset or "tiny",
               variant=chosen_variant, activation=activation, l1_reg=l1_reg,
               normalize=normalize, zeroth_bias_clipping=zeroth_bias_clipping,
               name=name, **options)

  build.__name__ = name
  return build


def _vit_entry(preset, variant):
  name = f"vit_{preset}" + ("_sparsified" if variant == "sparsified" else "")
  build = _vit_builder(name, preset, variant)
  build.__doc__ = f"The {variant} ViT, preset {preset!r} (see the `models.vit` docstring)."
  MODELS.register(name, min_size=PRESETS[preset]["patch_size"], options=VIT_OPTIONS)(build)


for _preset in PRESETS:
  for _variant in VARIANTS:
    _vit_entry(_preset, _variant)

_vit = _vit_builder("vit")
_vit.__doc__ = ("The ViT of --vit_preset (tiny) and --vit_variant (vanilla) (see the "
                "`models.vit` docstring).")
MODELS.register("vit", min_size=min(p["patch_size"] for p in PRESETS.values()),
                options=VIT_OPTIONS + ("vit_preset", "vit_variant"))(_vit)


@MODELS.register("residual_mlp", options=("width", "depth", "layer_norm_affine"))
def _residual_mlp(input_shape, num_classes, activation="relu", l1_reg=0.0,
                  normalize="none", dropout=0.0, width=128, depth=4, layer_norm_affine=True):
  """The MNIST residual MLP, width 128 unless --width (see the `models.vit` docstring)."""
  del dropout  # No dropout option: the entry refuses a nonzero rate.
  return residual_mlp(input_shape, num_classes, width=width, depth=depth,
                      affine=layer_norm_affine, activation=activation, l1_reg=l1_reg,
                      normalize=normalize)
