"""The model registry (`--model`) and the layer helpers its builders share.

Every entry builds a Keras functional model with one contract:

  builder(input_shape, num_classes, activation="relu", l1_reg=0.0,
          normalize="none", dropout=0.0) -> keras.Model

Every prunable layer is a `MaskedDense` or `MaskedConv2D`, hidden activations
come from the activation registry, and the model outputs logits (the softmax
lives in the loss). `normalize` names per-channel statistics of
`NORMALIZATIONS`; other than "none" they become the model's first layer (a
`Standardize` layer called "normalize", right after the Input), so data, attack
budgets and clipping stay in [0, 1] pixels for every model. `dropout` is
accepted only by models that have a dropout option (the wide ResNets).

`MODELS.get(name)` returns a `ModelEntry`: calling it checks the arguments
(an unknown normalisation, `dropout` on a model without one, an input smaller
than the model's minimum) and raises a one-line `ValueError` before Keras
could fail on a shape. Families whose members are named by a pattern
(`wideresnet{depth}x{k}`) register the pattern with `MODELS.register_pattern`.

Every layer gets an explicit name, the Input, pooling and batch-norm layers
included: Keras numbers unnamed layers per process (`batch_normalization_1` on
the second build), and the engine matches saved variables by `variable.path`,
so a model built twice in one process must name everything the same way.

Batch-norm models follow PyTorch, as the seeds that use them are PyTorch
code: PyTorch's padding (`conv`), max-pooling (`TorchMaxPooling2D`), batch-norm
defaults (`batch_norm`) and each seed's initialisation (`INITIALIZERS`). Their
activation layers carry a `site` attribute: "after_bn" or "after_residual"
(AutoReP's `var_map` 1 / 2), or "after_dense" for a classifier's ReLU that
follows a linear layer directly, for methods that treat the kinds differently.
"""

import functools
import math
import numbers
import re

import keras
import tensorflow as tf
from keras import ops

from robust_sparse.nn import activations
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
from robust_sparse.core.registry import Registry

# Values of the `site` attribute of an activation layer in a batch-norm model.
AFTER_BN = "after_bn"
AFTER_RESIDUAL = "after_residual"
AFTER_DENSE = "after_dense"

# `--normalize` name -> (per-channel mean, per-channel std) in [0, 1] pixels.
# "none" is the identity (no layer is added); its mean is black, which is
# also the value that the seeds' zero fill after normalising corresponds to.
NORMALIZATIONS = {
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    # phd-lab's CIFAR statistics.
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # SSAM's, given in 0-255 units in its code.
    "cifar_ssam": (tuple(v / 255 for v in (125.3, 123.0, 113.9)),
                   tuple(v / 255 for v in (63.0, 62.1, 66.7))),
    # torchvision's ImageNet statistics (AutoReP, phd-lab ImageNet runs).
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def normalization_mean(name: str):
  """The pixel-space mean of the `--normalize` statistics (black for "none").

  Cutout fills with it: the seeds cut out after normalising, with zeros,
  which is this mean in the [0, 1] pixels the toolkit augments.
  """
  return tuple(float(m) for m in NORMALIZATIONS[name][0])


# ----------------------------------------------------------------------------
# Layers the builders need beyond Keras' own.


@keras.saving.register_keras_serializable(package="models")
class Standardize(keras.layers.Layer):
  """`(x - mean) / std` per channel, with fixed statistics (no weights).

  The model's first layer for `normalize != "none"`. The statistics are
  config, not variables, so a `.keras` file keeps them and the engine's
  by-path variable matching sees nothing new.

  Args:
    mean, std: one value per channel (the last axis).

  Input shape: `(batch, ..., channels)`. Output shape: the same.
  """

  def __init__(self, mean, std, **kwargs):
    super().__init__(**kwargs)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    if len(mean) != len(std) or not mean:
      raise ValueError(f"Standardize needs one mean and one std per channel, received "
                       f"mean={mean}, std={std}")
    if min(std) <= 0:
      raise ValueError(f"Standardize std must be positive, received std={std}")
    self.mean, self.std = mean, std

  def build(self, input_shape):
    if input_shape[-1] != len(self.mean):
      raise ValueError(f"Standardize '{self.name}' has statistics for {len(self.mean)} "
                       f"channels; received inputs of shape {tuple(input_shape)}")

  def call(self, inputs):
    mean = ops.convert_to_tensor(self.mean, dtype=inputs.dtype)
    std = ops.convert_to_tensor(self.std, dtype=inputs.dtype)
    return ops.divide(ops.subtract(inputs, mean), std)

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    config = super().get_config()
    config.update(mean=list(self.mean), std=list(self.std))
    return config


@keras.saving.register_keras_serializable(package="models")
class TorchMaxPooling2D(keras.layers.Layer):
  """PyTorch's `MaxPool2d(kernel_size, stride, padding)`: implicit -inf padding.

  Keras' 'same' pooling pads only the bottom/right of an even-sized input, so
  its windows start one pixel later than PyTorch's; explicit zero padding is
  wrong whenever the pooled values can be negative (any `--activation` other
  than ReLU). Padding with -inf and pooling 'valid' gives PyTorch's windows
  and its output size floor((H + 2 * padding - pool_size) / strides) + 1.

  Args:
    pool_size: window side.
    strides: step between windows.
    padding: -inf rows/columns added on every side; at most pool_size // 2,
      as PyTorch requires (so no window is all padding).

  Input shape: `(batch, height, width, channels)`.
  """

  def __init__(self, pool_size, strides, padding, **kwargs):
    super().__init__(**kwargs)
    if not 0 <= padding <= pool_size // 2:
      raise ValueError(f"TorchMaxPooling2D padding must be in [0, pool_size // 2 = "
                       f"{pool_size // 2}], received padding={padding}")
    self.pool_size, self.strides, self.padding = int(pool_size), int(strides), int(padding)

  def call(self, inputs):
    if self.padding:
      pad = self.padding
      inputs = ops.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [0, 0]],
                       constant_values=float("-inf"))
    return ops.max_pool(inputs, self.pool_size, self.strides, padding="valid")

  def compute_output_shape(self, input_shape):
    def size(length):
      if length is None:
        return None
      return (length + 2 * self.padding - self.pool_size) // self.strides + 1
    return (input_shape[0], size(input_shape[1]), size(input_shape[2]), input_shape[3])

  def get_config(self):
    config = super().get_config()
    config.update(pool_size=self.pool_size, strides=self.strides, padding=self.padding)
    return config


@keras.saving.register_keras_serializable(package="models")
class TorchBatchNorm(keras.layers.BatchNormalization):
  """PyTorch's `BatchNorm1d/2d` in training: a fused kernel, unbiased running variance.

  Keras' BatchNormalization trains through a dozen separate ops (moments,
  then scale and shift, each with its own gradient); TensorFlow's
  `FusedBatchNormV3` does the forward pass and its gradient in one kernel
  each, as PyTorch does. On 2 CPU cores it trained conv-bn (CIFAR-10, batch
  128) at 19 ms per step against 32, and lifted every CIFAR-10 net of the
  zoo past PyTorch (docs/scaling.md, "Against PyTorch"). Its running
  variance is PyTorch's: the batch variance with Bessel's correction
  n/(n-1), where Keras' layer uses the biased one.

  Training calls on 4-D channels-last inputs (the zoo's convs) run the fused
  kernel; other ranks (batch norm after a dense layer) and synchronized
  batch norm (`--sync_batch_norm`: the global batch's moments) the same
  arithmetic in separate ops. Inference, masks and renormalisation are
  Keras' own. The variables and their names
  are Keras' (gamma, beta, moving_mean, moving_variance).
  """

  def call(self, inputs, training=None, mask=None):
    if not (training and self.trainable) or mask is not None or self.renorm:
      return super().call(inputs, training=training, mask=mask)
    x = tf.cast(inputs, tf.float32)
    gamma = tf.cast(self.gamma, tf.float32) if self.scale else None
    beta = tf.cast(self.beta, tf.float32) if self.center else None
    if (len(x.shape) == 4 and self.axis in (3, -1) and self.scale and self.center
        and not self.synchronized):
      # cuDNN needs epsilon above 1e-5 (TensorFlow's own wrapper uses 1.001e-5).
      epsilon = max(self.epsilon, 1.001e-5) if _on_gpu() else self.epsilon
      empty = tf.constant([], tf.float32)
      outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
          x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon,
          data_format="NHWC", is_training=True)  # variance: unbiased.
    else:
      # Synchronized: the moments of the global batch, over every replica.
      mean, variance = ops.moments(x, axes=self._reduction_axes,
                                   synchronized=self.synchronized)
      outputs = ops.batch_normalization(x, mean, variance, axis=self.axis, offset=beta,
                                        scale=gamma, epsilon=self.epsilon)
      count = tf.cast(tf.size(x) // tf.size(mean), tf.float32)
      context = tf.distribute.get_replica_context()
      if self.synchronized and context is not None:
        count *= context.num_replicas_in_sync
      variance = variance * count / tf.maximum(count - 1.0, 1.0)
    momentum = self.momentum
    self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(outputs, self.compute_dtype)


def _on_gpu():
  return bool(tf.config.list_logical_devices("GPU"))


@keras.saving.register_keras_serializable(package="models")
class NamedDropout(keras.layers.Layer):
  """`keras.layers.Dropout` whose random state has a deterministic variable path.

  Keras' Dropout creates its `SeedGenerator` with a process-wide auto name
  (`seed_generator_3/seed_generator_state` on the fourth build), so a model
  built twice in one process would not match its own checkpoint by variable
  path. Here the generator is named after the layer: `{name}/seed_generator_state`.

  Args:
    rate: fraction of the inputs to drop at training time, in [0, 1).
    seed: the generator's initial seed; None draws one (deterministic under
      `keras.utils.set_random_seed`).

  Input shape: any. Output shape: the same.
  """

  def __init__(self, rate, seed=None, **kwargs):
    super().__init__(**kwargs)
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"NamedDropout rate must be in [0, 1), received rate={rate}")
    self.rate, self.seed = float(rate), seed
    self.seed_generator = keras.random.SeedGenerator(seed, name=self.name)
    self.supports_masking = True

  def call(self, inputs, training=False):
    if training and self.rate > 0:
      return keras.random.dropout(inputs, self.rate, seed=self.seed_generator)
    return inputs

  def compute_output_shape(self, input_shape):
    return input_shape

  # Keras saves no seed-generator state; this layer does, so a reloaded model
  # draws the same dropout masks as the original would have next.
  def save_own_variables(self, store):
    store["seed_generator_state"] = self.seed_generator.state

  def load_own_variables(self, store):
    if "seed_generator_state" in store:
      self.seed_generator.state.assign(store["seed_generator_state"])

  def get_config(self):
    config = super().get_config()
    config.update(rate=self.rate, seed=self.seed)
    return config


# ----------------------------------------------------------------------------
# Initialisers: each seed's, by name. A fresh instance per layer: an unseeded
# Keras initializer draws its seed once, so a shared instance would give equal
# kernels of equal shape.

KERNEL_INITIALIZERS = {
    # PyTorch's default Conv/Linear weight init, kaiming_uniform_(a=sqrt(5)):
    # U(-b, b) with b = 1/sqrt(fan_in).
    "torch": lambda: keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform"),
    # kaiming_normal_() with its defaults (fan_in, gain sqrt(2)): AutoReP.
    "kaiming_normal": lambda: keras.initializers.VarianceScaling(
        2.0, "fan_in", "untruncated_normal"),
    # kaiming_normal_(mode="fan_out", nonlinearity="relu"): torchvision, phd-lab;
    # also the WRN's N(0, sqrt(2 / (k * k * out_channels))). Keras' fan_out of
    # a conv kernel is k * k * out_channels, as PyTorch's.
    "kaiming_normal_fan_out": lambda: keras.initializers.VarianceScaling(
        2.0, "fan_out", "untruncated_normal"),
    # normal_(0, 0.01): phd-lab's VGG linear layers.
    "normal_0.01": lambda: keras.initializers.RandomNormal(0.0, 0.01),
}


def torch_kernel_initializer():
  """PyTorch's default Conv/Linear weight init (see `KERNEL_INITIALIZERS["torch"]`)."""
  return KERNEL_INITIALIZERS["torch"]()


def torch_bias_initializer(fan_in):
  """PyTorch's default Conv/Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return keras.initializers.RandomUniform(-bound, bound)


def _kernel_initializer(scheme):
  try:
    return KERNEL_INITIALIZERS[scheme]()
  except KeyError:
    raise ValueError(f"unknown kernel initialisation {scheme!r}; known: "
                     f"{', '.join(KERNEL_INITIALIZERS)}") from None


def _bias_initializer(scheme, fan_in):
  """"torch" (PyTorch's default, from `fan_in`) or "zeros"."""
  if scheme == "torch":
    return torch_bias_initializer(fan_in)
  if scheme == "zeros":
    return keras.initializers.Zeros()
  raise ValueError(f"unknown bias initialisation {scheme!r}; known: torch, zeros")


def l1_regularizer(l1_reg):
  """The kernel regulariser of every masked layer: L1(l1_reg), or None for 0."""
  return keras.regularizers.L1(l1_reg) if l1_reg else None


# ----------------------------------------------------------------------------
# Layer helpers.


def conv(x, filters, kernel_size, *, strides=1, padding=None, dilation=1, use_bias=False,
         kernel_init="torch", bias_init="torch", l1_reg=0.0, name):
  """A masked conv with PyTorch's padding and a seed's initialisation.

  PyTorch pads `padding` zeros on every side. With stride 1 and the padding
  that keeps the size ('same' for an odd effective kernel), Keras' 'same' is
  that. Otherwise (stride 2 on an even input, where 'same' would pad only the
  bottom/right and shift the sampling grid by one pixel, or a padding that
  changes the size) a `{name}_pad` ZeroPadding2D pads symmetrically and the
  conv is 'valid', so PyTorch weights port unchanged.

  Args:
    x: input tensor [batch, height, width, channels].
    filters, kernel_size, strides: as in `keras.layers.Conv2D`.
    padding: PyTorch's `padding`; None: kernel_size // 2.
    dilation: PyTorch's `dilation` (Keras' `dilation_rate`).
    use_bias: whether the conv has a bias.
    kernel_init: a `KERNEL_INITIALIZERS` name.
    bias_init: "torch" (U(+-1/sqrt(fan_in))) or "zeros".
    l1_reg: L1 coefficient on the kernel (0 for none).
    name: the conv layer's name.

  Returns:
    The output tensor.
  """
  if padding is None:
    padding = kernel_size // 2
  effective = dilation * (kernel_size - 1) + 1
  if strides == 1 and 2 * padding == effective - 1:
    keras_padding = "same"
  else:
    keras_padding = "valid"
    if padding:
      x = keras.layers.ZeroPadding2D(padding, name=f"{name}_pad")(x)
  fan_in = x.shape[-1] * kernel_size * kernel_size
  return MaskedConv2D(
      filters, kernel_size, strides=strides, padding=keras_padding, dilation_rate=dilation,
      use_bias=use_bias, kernel_initializer=_kernel_initializer(kernel_init),
      bias_initializer=_bias_initializer(bias_init, fan_in) if use_bias else "zeros",
      kernel_regularizer=l1_regularizer(l1_reg), name=name)(x)


def dense(x, units, *, kernel_init="torch", bias_init="torch", l1_reg=0.0, name):
  """A masked dense layer with bias and a seed's initialisation (see `conv`)."""
  return MaskedDense(units, kernel_initializer=_kernel_initializer(kernel_init),
                     bias_initializer=_bias_initializer(bias_init, x.shape[-1]),
                     kernel_regularizer=l1_regularizer(l1_reg), name=name)(x)


def batch_norm(x, *, name):
  """PyTorch's BatchNorm2d (`TorchBatchNorm`): momentum 0.1 (Keras 0.9), eps 1e-5.

  gamma 1 and beta 0, as every seed initialises them; the running variance is
  updated with the unbiased batch variance, as PyTorch's.
  """
  return TorchBatchNorm(momentum=0.9, epsilon=1e-5, name=name)(x)


def max_pool(x, pool_size, strides, padding=0, *, name):
  """PyTorch's MaxPool2d: Keras' layer without padding, `TorchMaxPooling2D` with."""
  if padding:
    return TorchMaxPooling2D(pool_size, strides, padding, name=name)(x)
  return keras.layers.MaxPooling2D(pool_size, strides, padding="valid", name=name)(x)


def dropout_layer(x, rate, *, name):
  """Applies a `NamedDropout(rate)` called `name`."""
  return NamedDropout(rate, name=name)(x)


def activation_layer(x, activation, *, site, name):
  """Applies a fresh `activation` layer tagged with `site` (AFTER_BN / AFTER_RESIDUAL / ...)."""
  layer = activations.build(activation, name=name)
  # A plain attribute, not config: it describes the layer's place in this
  # architecture, which rebuilding the model restores.
  layer.site = site
  return layer(x)


def logits_layer(x, num_classes, *, l1_reg=0.0, kernel_init="torch", bias_init="torch",
                 name="output"):
  """Pooled features -> masked dense logits (PyTorch's default init unless told)."""
  return dense(x, num_classes, kernel_init=kernel_init, bias_init=bias_init, l1_reg=l1_reg,
               name=name)


def model_input(input_shape, normalize="none"):
  """The Input layer "input" and, unless `normalize` is "none", `Standardize` "normalize".

  Returns:
    (inputs, x): the model's input tensor and the tensor its first layer takes.
  """
  inputs = keras.Input(input_shape, name="input")
  if normalize == "none":
    return inputs, inputs
  mean, std = _normalization(normalize)
  return inputs, Standardize(mean, std, name="normalize")(inputs)


def _normalization(name):
  try:
    return NORMALIZATIONS[name]
  except KeyError:
    raise ValueError(f"unknown normalization {name!r}; known: "
                     f"{', '.join(NORMALIZATIONS)}") from None


# ----------------------------------------------------------------------------
# The registry.


class ModelEntry:
  """A registered model: its builder plus what must hold before it is called.

  Calling the entry checks the arguments of the uniform builder contract and
  then calls the builder, so every misuse is a one-line `ValueError` naming
  the model rather than a Keras shape error from deep inside a build.

  Args:
    name: the registry name (in error messages).
    builder: `builder(input_shape, num_classes, *, activation, l1_reg,
      normalize, dropout) -> keras.Model`.
    min_size: the smallest height and width the architecture accepts (a
      pooling or conv output must keep at least one pixel).
    dropout: whether the model has a `dropout` option.
  """

  def __init__(self, name, builder, *, min_size=1, dropout=False, options=()):
    self.name = name
    self.builder = builder
    self.min_size = min_size
    self.dropout = dropout
    self.options = tuple(options)
    functools.update_wrapper(self, builder)

  def check_options(self, options):
    """The options that are set (not None); raises naming a flag the model lacks."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    for key in options:
      if key not in self.options:
        have = (f"its options: {', '.join('--' + o for o in self.options)}"
                if self.options else "it has no model options")
        raise ValueError(f"--{key} does not apply to model {self.name!r} ({have})")
    return options

  def check(self, input_shape, normalize="none", dropout=0.0):
    """Raises a one-line `ValueError` if the model cannot be built so."""
    shape = tuple(input_shape)
    if not shape or any(not isinstance(d, numbers.Integral) or d < 1 for d in shape):
      raise ValueError(f"model {self.name!r}: input_shape must be positive integers, got "
                       f"{shape}")
    mean, _ = _normalization(normalize)
    if normalize != "none" and shape[-1] != len(mean):
      raise ValueError(f"model {self.name!r}: --normalize={normalize} has statistics for "
                       f"{len(mean)} channels, the input has {shape[-1]} (shape {shape})")
    if not 0.0 <= dropout < 1.0:
      raise ValueError(f"--dropout={dropout}: the rate must be in [0, 1)")
    if dropout and not self.dropout:
      raise ValueError(f"--dropout={dropout}: model {self.name!r} has no dropout option "
                       f"(models with one: {MODELS.describe_dropout_models()})")
    if len(shape) == 3 and min(shape[:2]) < self.min_size:
      raise ValueError(f"model {self.name!r} needs inputs of at least {self.min_size}x"
                       f"{self.min_size} pixels, got {shape[0]}x{shape[1]}")

  def __call__(self, input_shape, num_classes, activation="relu", l1_reg=0.0,
               normalize="none", dropout=0.0, **options):
    options = self.check_options(options)
    self.check(input_shape, normalize, dropout)
    return self.builder(tuple(int(d) for d in input_shape), num_classes, activation=activation,
                        l1_reg=l1_reg, normalize=normalize, dropout=dropout, **options)

  def __repr__(self):
    return f"ModelEntry({self.name!r})"


class ModelRegistry(Registry):
  """The model `Registry`, plus families whose names follow a pattern.

  `get(name)` returns a registered entry, else the entry a pattern's factory
  makes from the match (e.g. any `wideresnet{depth}x{k}`); the factory raises
  a `ValueError` for a matching name that is still invalid (a bad depth).
  `names()` lists the registered names only, a pattern's usual members
  included when its module registers them.
  """

  def __init__(self):
    super().__init__("model")
    self._patterns = []

  def register(self, name, *, min_size=1, dropout=False, options=()):
    """Decorator: registers a builder (or a ready `ModelEntry`) as `name`.

    `options` names the model options (flags such as `vit_preset`, `width`)
    the builder takes as keyword arguments beyond the uniform contract.
    Returns the `ModelEntry`, so the decorated module-level name checks its
    arguments too.
    """
    register = super().register(name)

    def decorator(builder):
      entry = builder if isinstance(builder, ModelEntry) else ModelEntry(
          name, builder, min_size=min_size, dropout=dropout, options=options)
      return register(entry)

    return decorator

  def register_pattern(self, pattern, description, factory, *, dropout=False):
    """Resolves names matching the regular expression `pattern` with `factory`.

    Args:
      pattern: matched against the whole name.
      description: how the pattern reads in error messages, e.g.
        "wideresnet{depth}x{k}".
      factory: `factory(name, match) -> ModelEntry`.
      dropout: whether the family has a `dropout` option (for messages).
    """
    self._patterns.append((re.compile(pattern), description, factory, dropout))

  def get(self, name):
    if name in self._entries:
      return self._entries[name]
    for regex, _, factory, _ in self._patterns:
      match = regex.fullmatch(name)
      if match:
        return factory(name, match)
    patterns = ", ".join(description for _, description, _, _ in self._patterns)
    raise ValueError(f"unknown model {name!r}; known: {', '.join(self.names())}"
                     + (f"; or any {patterns}" if patterns else ""))

  def __contains__(self, name):
    try:
      self.get(name)
    except ValueError:
      return False
    return True

  def describe_dropout_models(self):
    """The models and patterns with a dropout option, for error messages."""
    patterns = [description for _, description, _, dropout in self._patterns if dropout]
    covered = [regex for regex, _, _, dropout in self._patterns if dropout]
    names = [name for name, entry in sorted(self._entries.items())
             if entry.dropout and not any(regex.fullmatch(name) for regex in covered)]
    return ", ".join(patterns + names) or "none"


MODELS = ModelRegistry()


def build_model(name, input_shape, num_classes, activation="relu", l1_reg=0.0,
                normalize="none", dropout=0.0, **options):
  """Builds the registered model `name` (see the module docstring).

  Args:
    **options: model options (`MODEL_OPTIONS`); None means unset (the
      model's default).

  Raises:
    ValueError: one line: an unknown model (listing the known ones), an
      unknown normalisation, `dropout` on a model without one, an option
      the model does not take, an input smaller than the model's minimum or
      with the wrong number of channels.
  """
  return MODELS.get(name)(tuple(input_shape), num_classes, activation=activation,
                          l1_reg=l1_reg, normalize=normalize, dropout=dropout, **options)


# ----------------------------------------------------------------------------
# The small models of the lottery-ticket seeds and a tiny BN convnet.


def _dense_stack(x, units, activation, l1_reg, use_bias, names=None):
  """Hidden masked dense layers, each followed by an activation, then the logits."""
  for i, width in enumerate(units[:-1]):
    name = names[i] if names else f"dense_{i + 1}"
    x = MaskedDense(width, use_bias=use_bias, kernel_regularizer=l1_regularizer(l1_reg),
                    name=name)(x)
    x = activations.build(activation, name=f"{name}_activation")(x)
  return MaskedDense(units[-1], use_bias=use_bias, kernel_regularizer=l1_regularizer(l1_reg),
                     name="output")(x)


@MODELS.register("dense-300-100")
def dense_300_100(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
                  dropout=0.0):
  """The seed's 784-300-100-10 network without biases (layers hidden_1, hidden_2, output)."""
  del dropout  # No dropout option: the entry refuses a nonzero rate.
  inputs, x = model_input(input_shape, normalize)
  x = keras.layers.Flatten(name="flatten")(x)
  logits = _dense_stack(x, [300, 100, num_classes], activation, l1_reg, use_bias=False,
                        names=["hidden_1", "hidden_2"])
  return keras.Model(inputs, logits, name="dense-300-100")


@MODELS.register("lenet5")
def lenet5(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
           dropout=0.0):
  """LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84.

  'same' padding keeps it valid for any input of at least 4x4 pixels.
  """
  del dropout
  inputs, x = model_input(input_shape, normalize)
  for i, filters in enumerate([6, 16]):
    x = MaskedConv2D(filters, 5, padding="same", kernel_regularizer=l1_regularizer(l1_reg),
                     name=f"conv_{i + 1}")(x)
    x = activations.build(activation, name=f"conv_{i + 1}_activation")(x)
    x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{i + 1}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  logits = _dense_stack(x, [120, 84, num_classes], activation, l1_reg, use_bias=True)
  return keras.Model(inputs, logits, name="lenet5")


def _conv_net(name, blocks):
  """The lottery-ticket paper's Conv-2/4/6: pairs of 3x3 convs then 2x2 max-pool, FC 256-256."""

  def build(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0):
    del dropout
    inputs, x = model_input(input_shape, normalize)
    index = 0
    for block, filters in enumerate(blocks):
      for _ in range(2):
        index += 1
        x = MaskedConv2D(filters, 3, padding="same",
                         kernel_regularizer=l1_regularizer(l1_reg), name=f"conv_{index}")(x)
        x = activations.build(activation, name=f"conv_{index}_activation")(x)
      x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{block + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logits = _dense_stack(x, [256, 256, num_classes], activation, l1_reg, use_bias=True)
    return keras.Model(inputs, logits, name=name)

  build.__doc__ = f"The lottery-ticket {name}: {len(blocks)} pairs of 3x3 convs, FC 256-256."
  return build


MODELS.register("conv-2")(_conv_net("conv-2", [64]))
MODELS.register("conv-4")(_conv_net("conv-4", [64, 128]))
MODELS.register("conv-6")(_conv_net("conv-6", [64, 128, 256]))


@MODELS.register("conv-bn")
def conv_bn(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0):
  """A tiny batch-norm convnet (about 5.5k weights) for tests and quick CPU studies.

  conv 16@3x3 - BN - act - conv 32@3x3 stride 2 - BN - act - global average
  pool - dense; the layers are those of the ResNets (bias-free convs, PyTorch
  init and BN defaults), so it is a cheap stand-in for them.
  """
  del dropout
  inputs, x = model_input(input_shape, normalize)
  for i, (filters, strides) in enumerate([(16, 1), (32, 2)]):
    prefix = f"conv_{i + 1}"
    x = conv(x, filters, 3, strides=strides, l1_reg=l1_reg, name=prefix)
    x = batch_norm(x, name=f"{prefix}_bn")
    x = activation_layer(x, activation, site=AFTER_BN, name=f"{prefix}_activation")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  logits = logits_layer(x, num_classes, l1_reg=l1_reg)
  return keras.Model(inputs, logits, name="conv-bn")
