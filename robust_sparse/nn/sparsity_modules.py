"""Modules that raise activation sparsity (spec 2.4): zeroth bias, DB-MLP, restricted LayerNorm.

The "sparsified" transformer of Peng et al. (arXiv 2309.03004) adds three
things to every MLP block `y = x + value(f(key(ln_2(x))))`:

  * `ZerothBias`: a zero-initialised bias with one vector per token
    (`b` of shape [tokens, features]), clipped after every update to
    `|b| <= c * |gamma|` of the block's `ln_2` (or `|b| <= c` without one);
  * the DB-MLP ("doubly biased" MLP, `doubly_biased_mlp`): the key and value
    dense layers keep their own biases, and the zeroth bias is added at the
    MLP input, after `ln_2` (`position="input"`, the paper and the authors'
    code before b6e2749, the default), or at the MLP output
    (`position="output"`, the released code: spec 2.4 [QUIRK]);
  * `RestrictedLayerNorm` for `ln_2`: from scratch without beta and with
    `gamma <- max(gamma, 1)` after every update; when fine-tuning a trained
    model, beta frozen and `|gamma| <- max(|gamma|, min(step / U, 1))` keeping
    the sign (0 counts as +), U = `uplift_steps`.

How the restrictions are applied after every update. Both are *variable
constraints*: `ZerothBias` gives its bias, `RestrictedLayerNorm` its gamma, a
constraint object, and every Keras 3 optimizer's `apply` assigns
`variable.constraint(variable)` to each variable it has just updated. So the
toolkit's steps (`robust_sparse.training.steps`, which call `optimizer.apply`), the
engine, `RobustModel.fit` and a user's own `model.fit` or custom loop with a
Keras optimizer all restrict after every update, inside the compiled step,
with nothing to call. The fine-tuning uplift counts its own steps: a
non-trainable int64 weight `uplift_step` that the constraint advances once per
update of gamma (saved and restored with the model, so resumed runs continue
the schedule; a step the loss scale skips does not count). Two caveats:
  * a loop that changes variables without a Keras optimizer (a raw
    `variable.assign_sub`) must call `apply_restrictions(model)` after each
    update (or `layer.clip()` / `layer.restrict()`); calling it as well as
    using an optimizer would advance the uplift twice per step;
  * the zeroth bias is clipped against gamma's value at the time of its own
    constraint. The optimizer constrains variables in their order, and
    `ln_2` comes before its zeroth bias in a functional model, so the bias is
    clipped against the already restricted gamma. With gamma and the bias in
    different optimizer groups, the group order decides.
The seed clips before the optimizer step and again before the next forward
pass (`prepare` and `after_backward`), so every forward pass sees clipped
values, as here.

The DB-MLP is a functional block (`doubly_biased_mlp`), not a nested layer: its
dense and activation layers are top-level layers of the model, so pruning and
LoRA find its `MaskedDense` layers, the activation-statistics taps
(`robust_sparse.measure.activation_stats`) and ReLU reduction see its activation, and
`layers.strip_masks` can clone the model. The zeroth bias refers to its
LayerNorm by name in its config; after a `.keras` reload or a clone it finds
that layer again upstream of itself in the functional graph.

Logged values (`mean_abs_zeroth_bias`, `mean_abs_layer_norm_scale`): the mean
|b| (the seed's `zeroth_biases`) and the mean |gamma| of the restricted
LayerNorms (`restricted_LayerNorm_scaling_factors`).
"""

import numbers
from typing import Callable, Dict, Optional, Sequence, Union

import keras
import tensorflow as tf
from keras import ops

from robust_sparse.nn import activations
from robust_sparse.nn.layers import MaskedDense

POSITIONS = ("input", "output")
MODES = ("from_scratch", "fine_tuning")


def _check_clipping(clipping):
  """`clipping` as a float (None stays None); a one-line error if negative."""
  if clipping is None:
    return None
  if isinstance(clipping, bool) or not isinstance(clipping, numbers.Real) or clipping < 0:
    raise ValueError(f"zeroth_bias_clipping must be a number >= 0 (None: no clipping), "
                     f"received {clipping!r}")
  return float(clipping)


class _Reference:
  """Holds a layer without Keras tracking it (the zeroth bias does not own its LayerNorm)."""

  def __init__(self, layer):
    self.layer = layer


def _upstream_layer(layer, name):
  """The layer called `name` upstream of `layer` in its functional graph, or None."""
  seen = set()
  frontier = list(layer._inbound_nodes)
  while frontier:
    node = frontier.pop()
    if id(node) in seen:
      continue
    seen.add(id(node))
    for parent in node.parent_nodes:
      if parent.operation.name == name:
        return parent.operation
      frontier.append(parent)
  return None


class _ZerothBiasClipping(keras.constraints.Constraint):
  """The optimizer's constraint of a zeroth bias: `layer.clip_value`. Not serialized."""

  def __init__(self, layer):
    self.layer = layer

  def __call__(self, w):
    return self.layer.clip_value(w)


@keras.saving.register_keras_serializable(package="robust_sparse")
class ZerothBias(keras.layers.Layer):
  """`x + b`, with a zero-initialised bias per token, clipped after every update.

  `b` has the shape of one example (`shape`, default the input's `x.shape[1:]`,
  e.g. [tokens, features]); an input with fewer tokens than `b` gets
  `b[:tokens]` (spec 2.4). After every optimizer update `b` is clipped to
  `|b| <= clipping * |gamma|`, with gamma the scale of `layer_norm` broadcast
  over tokens, or to `|b| <= clipping` without a LayerNorm (see the module
  docstring for how and when).

  Args:
    clipping: c >= 0 (`--zeroth_bias_clipping`, the seed's default 0.1);
      None: no clipping (the seed's `manipulate.py`).
    layer_norm: the LayerNorm whose gamma scales the bound: the layer, or its
      name (then found upstream of this layer in the functional graph when
      first needed), or None.
    shape: the bias shape without the batch axis; None: the input's.
    **kwargs: `keras.layers.Layer` arguments (name, dtype).

  Input shape: `(batch, tokens, ..., features)` or `(batch, features)`.
  Output shape: the same.

  Raises:
    ValueError: a negative or non-numeric `clipping`.
  """

  def __init__(self, clipping: Optional[float] = 0.1,
               layer_norm: Union[keras.layers.Layer, str, None] = None,
               shape: Optional[Sequence[int]] = None, **kwargs):
    super().__init__(**kwargs)
    self.clipping = _check_clipping(clipping)
    if isinstance(layer_norm, keras.layers.Layer):
      self._layer_norm = _Reference(layer_norm)
      self.layer_norm_name = layer_norm.name
    elif layer_norm is None or isinstance(layer_norm, str):
      self._layer_norm = _Reference(None)
      self.layer_norm_name = layer_norm
    else:
      raise ValueError(f"ZerothBias layer_norm must be a LayerNormalization layer, its name "
                       f"or None, received {layer_norm!r}")
    self.bias_shape = None if shape is None else tuple(int(d) for d in shape)

  def build(self, input_shape):
    shape = self.bias_shape or tuple(input_shape[1:])
    if not shape or any(d is None for d in shape):
      raise ValueError(f"ZerothBias '{self.name}' needs a known shape per example; received "
                       f"inputs of shape {tuple(input_shape)} (pass `shape=`)")
    self.bias = self.add_weight(
        name="bias", shape=shape, initializer="zeros", trainable=True,
        constraint=None if self.clipping is None else _ZerothBiasClipping(self))

  def call(self, inputs):
    bias = self.bias
    tokens = inputs.shape[1] if len(inputs.shape) > 2 else None
    if len(inputs.shape) > 2 and tokens != bias.shape[0]:
      bias = bias[:ops.shape(inputs)[1]]
    return ops.add(inputs, ops.cast(bias, inputs.dtype))

  def compute_output_shape(self, input_shape):
    return input_shape

  # ---- the reference LayerNorm ---------------------------------------------------
  def bind(self, layer_norm: keras.layers.Layer) -> None:
    """Uses `layer_norm`'s gamma for the bound (for models that are not functional)."""
    self._layer_norm = _Reference(layer_norm)
    self.layer_norm_name = layer_norm.name

  @property
  def layer_norm(self) -> Optional[keras.layers.Layer]:
    """The reference LayerNorm, or None (found by name upstream when needed).

    Raises:
      ValueError: a named LayerNorm that is not upstream of this layer.
    """
    if self._layer_norm.layer is None and self.layer_norm_name is not None:
      found = _upstream_layer(self, self.layer_norm_name)
      if found is None:
        raise ValueError(f"ZerothBias '{self.name}': its layer_norm '{self.layer_norm_name}' "
                         "is not upstream of it in a functional model; call "
                         "`layer.bind(layer_norm)`")
      self._layer_norm = _Reference(found)
    return self._layer_norm.layer

  # ---- clipping -------------------------------------------------------------------
  def clip_bound(self, dtype="float32"):
    """The bound of |b|: `clipping * |gamma|` ([features]) or `clipping`; None if unclipped."""
    if self.clipping is None:
      return None
    layer_norm = self.layer_norm
    if layer_norm is None:
      return ops.convert_to_tensor(self.clipping, dtype=dtype)
    gamma = getattr(layer_norm, "gamma", None)
    if gamma is None:
      raise ValueError(f"ZerothBias '{self.name}': layer_norm '{layer_norm.name}' has no "
                       "gamma (scale=False) to scale the clipping")
    return self.clipping * ops.abs(ops.cast(ops.convert_to_tensor(gamma), dtype))

  def clip_value(self, value):
    """`value` clipped to the bound (unchanged without clipping); graph-safe."""
    bound = self.clip_bound(value.dtype)
    if bound is None:
      return value
    return ops.minimum(ops.maximum(value, ops.negative(bound)), bound)

  def clip(self):
    """Clips the bias in place (what the optimizer's constraint does after an update)."""
    self.bias.assign(self.clip_value(ops.convert_to_tensor(self.bias)))

  def get_config(self):
    config = super().get_config()
    config.update(clipping=self.clipping, layer_norm=self.layer_norm_name,
                  shape=None if self.bias_shape is None else list(self.bias_shape))
    return config


class _LayerNormRestriction(keras.constraints.Constraint):
  """The optimizer's constraint of a restricted gamma: the user's, then the restriction."""

  def __init__(self, layer, constraint=None):
    self.layer = layer
    self.constraint = constraint

  def __call__(self, w):
    if self.constraint is not None:
      w = self.constraint(w)
    return self.layer.restricted_value(w, advance=True)


@keras.saving.register_keras_serializable(package="robust_sparse")
class RestrictedLayerNorm(keras.layers.LayerNormalization):
  """A LayerNorm whose scale is kept away from zero (spec 2.4, `RestrictAffinePlugin`).

  `mode="from_scratch"`: no beta, and `gamma <- max(gamma, 1)` after every
  update (elementwise, signed). `mode="fine_tuning"` (turning a trained
  vanilla model into the sparsified one): beta exists but is frozen (not
  trainable, so a vanilla checkpoint loads by variable path), and after the
  s-th update `|gamma| <- max(|gamma|, min(s / uplift_steps, 1))`, keeping
  the sign (0 counts as +). s is the weight `uplift_step`, advanced by the
  optimizer's constraint (see the module docstring).

  Args:
    mode: "from_scratch" or "fine_tuning".
    uplift_steps: U >= 1, the updates over which the floor of |gamma| rises to
      1 (`--layernorm_uplifting_epochs` times the steps per epoch); fine-tuning
      only.
    epsilon: as LayerNormalization (the ViT's 1e-6 by default).
    **kwargs: `keras.layers.LayerNormalization` arguments (axis, initializers,
      a `gamma_constraint` applied before the restriction, ...). `center`
      must be False from scratch (the default there) and `scale` True.

  Raises:
    ValueError: an unknown mode, a missing or bad `uplift_steps`, `center`
      in from-scratch mode, `scale=False`, `rms_scaling=True`.
  """

  def __init__(self, mode: str = "from_scratch", uplift_steps: Optional[int] = None,
               epsilon: float = 1e-6, **kwargs):
    if mode not in MODES:
      raise ValueError(f"RestrictedLayerNorm mode must be one of {', '.join(MODES)}, "
                       f"received mode={mode!r}")
    if mode == "from_scratch":
      if kwargs.setdefault("center", False):
        raise ValueError("RestrictedLayerNorm in mode 'from_scratch' has no beta; received "
                         "center=True")
      if uplift_steps is not None:
        raise ValueError(f"RestrictedLayerNorm uplift_steps is for mode 'fine_tuning', "
                         f"received uplift_steps={uplift_steps!r} with mode 'from_scratch'")
    elif (isinstance(uplift_steps, bool) or not isinstance(uplift_steps, int)
          or uplift_steps < 1):
      raise ValueError(f"RestrictedLayerNorm uplift_steps must be an integer >= 1 in mode "
                       f"'fine_tuning', received uplift_steps={uplift_steps!r}")
    if not kwargs.get("scale", True) or kwargs.get("rms_scaling", False):
      raise ValueError("RestrictedLayerNorm restricts gamma, so it needs scale=True and "
                       f"rms_scaling=False; received scale={kwargs.get('scale', True)}, "
                       f"rms_scaling={kwargs.get('rms_scaling', False)}")
    super().__init__(epsilon=epsilon, **kwargs)
    self.mode = mode
    self.uplift_steps = uplift_steps

  def build(self, input_shape):
    super().build(input_shape)
    if self.mode == "fine_tuning":
      if self.beta is not None:
        self.beta.trainable = False
      self.uplift_step = self.add_weight(name="uplift_step", shape=(), initializer="zeros",
                                         dtype="int64", trainable=False)
    # Set on the variable, not as `gamma_constraint`, so that `get_config()`
    # reports only the user's constraint (as `MaskedDense` does with its mask).
    self.gamma.constraint = _LayerNormRestriction(self, self.gamma_constraint)

  def restricted_value(self, gamma, advance: bool = False):
    """`gamma` restricted as after an update; graph-safe.

    Args:
      gamma: a value of the layer's gamma.
      advance: in fine-tuning mode, count this as one more update (advance
        `uplift_step` first); False reads the current floor.

    Returns:
      The restricted value.
    """
    gamma = ops.convert_to_tensor(gamma)
    one = ops.ones_like(gamma)
    if self.mode == "from_scratch":
      return ops.maximum(gamma, one)
    if advance:
      self.uplift_step.assign_add(1)
    step = ops.cast(ops.convert_to_tensor(self.uplift_step), gamma.dtype)
    floor = ops.minimum(step / float(self.uplift_steps), 1.0)
    sign = ops.where(gamma >= 0, one, ops.negative(one))
    return sign * ops.maximum(ops.abs(gamma), floor)

  def restrict(self):
    """Restricts gamma in place, advancing the uplift (what the constraint does)."""
    self.gamma.assign(self.gamma.constraint(ops.convert_to_tensor(self.gamma)))

  def get_config(self):
    config = super().get_config()
    config.update(mode=self.mode, uplift_steps=self.uplift_steps)
    return config


# ----------------------------------------------------------------------------
# The DB-MLP block.


def _fresh(initializer):
  """A new initializer from a factory (class or zero-argument callable) or a name."""
  if isinstance(initializer, str):
    return keras.initializers.get(initializer)
  return initializer()


def _default_bias_initializer():
  # torchvision's MLPBlock: biases ~ N(0, 1e-6) (spec 2.5).
  return keras.initializers.RandomNormal(stddev=1e-6)


def doubly_biased_mlp(x, *, hidden_units: int, activation: str, name: str,
                      zeroth_bias: bool = True, position: str = "input",
                      clipping: Optional[float] = 0.1,
                      layer_norm: Optional[keras.layers.Layer] = None,
                      kernel_initializer: Union[str, Callable] = keras.initializers.GlorotUniform,
                      bias_initializer: Union[str, Callable] = _default_bias_initializer,
                      l1_reg: float = 0.0, site: Optional[str] = None):
  """The MLP block `value(f(key(x)))`, with a zeroth bias at its input or output.

  Functional: applies top-level layers to the tensor `x` (see the module
  docstring for why). Layers: `{name}_zeroth_bias` (position "input"),
  `{name}_key` (MaskedDense, hidden_units), `{name}_activation`,
  `{name}_value` (MaskedDense back to x's width), `{name}_zeroth_bias`
  (position "output"). With `zeroth_bias=False` it is the vanilla MLP with
  the same names, so a vanilla checkpoint loads into a DB-MLP by path.

  Args:
    x: the block's input, usually `layer_norm`'s output [batch, tokens, d].
    hidden_units: the key layer's width (the MLP width).
    activation: activation spec (`robust_sparse.nn.activations`), e.g. "jsrelu".
    name: prefix of the layer names.
    zeroth_bias: whether to add the zeroth bias.
    position: "input" (`value(f(key(x + b)))`, the paper: default) or
      "output" (`value(f(key(x))) + b`, the released code, spec 2.4 [QUIRK]).
    clipping: the zeroth bias' c (None: unclipped).
    layer_norm: the LayerNorm that produced `x`; its |gamma| scales the
      clipping. None: `|b| <= clipping`.
    kernel_initializer, bias_initializer: initializer names or factories
      (called once per layer, so the two layers draw different values);
      default xavier_uniform kernels and N(0, 1e-6) biases (spec 2.5).
    l1_reg: L1 coefficient on both kernels (0: none).
    site: the activation layer's `site` attribute (e.g. "after_dense"), or None.

  Returns:
    The block's output, of x's shape.

  Raises:
    ValueError: an unknown position, a negative clipping, an invalid
      activation spec, `hidden_units` < 1.
  """
  if position not in POSITIONS:
    raise ValueError(f"zeroth_bias_position must be one of {', '.join(POSITIONS)}, "
                     f"received {position!r}")
  if isinstance(hidden_units, bool) or not isinstance(hidden_units, int) or hidden_units < 1:
    raise ValueError(f"hidden_units must be a positive integer, received {hidden_units!r}")
  clipping = _check_clipping(clipping)
  regularizer = keras.regularizers.L1(l1_reg) if l1_reg else None

  def bias():
    return ZerothBias(clipping=clipping, layer_norm=layer_norm, name=f"{name}_zeroth_bias")

  if zeroth_bias and position == "input":
    x = bias()(x)
  width = x.shape[-1]
  h = MaskedDense(hidden_units, kernel_initializer=_fresh(kernel_initializer),
                  bias_initializer=_fresh(bias_initializer), kernel_regularizer=regularizer,
                  name=f"{name}_key")(x)
  act = activations.build(activation, name=f"{name}_activation")
  if site is not None:
    act.site = site
  h = act(h)
  y = MaskedDense(width, kernel_initializer=_fresh(kernel_initializer),
                  bias_initializer=_fresh(bias_initializer), kernel_regularizer=regularizer,
                  name=f"{name}_value")(h)
  if zeroth_bias and position == "output":
    y = bias()(y)
  return y


# ----------------------------------------------------------------------------
# Model-level helpers.


def _layers_of(model, layer_type):
  return [layer for layer in model._flatten_layers(include_self=False)
          if isinstance(layer, layer_type)]


def apply_restrictions(model) -> None:
  """Clips every zeroth bias and restricts every restricted LayerNorm of `model`, in place.

  For loops that update variables without a Keras optimizer (whose
  constraints do this after every `apply`); LayerNorms first, so biases are
  clipped against the restricted gamma. Graph-safe.
  """
  for layer in _layers_of(model, RestrictedLayerNorm):
    layer.restrict()
  for layer in _layers_of(model, ZerothBias):
    layer.clip()


def _mean_abs(values: Dict[str, tf.Tensor], per_layer: bool):
  if per_layer:
    return values
  if not values:
    return tf.constant(float("nan"))
  return tf.reduce_mean(tf.stack(list(values.values())))


def mean_abs_zeroth_bias(model, per_layer: bool = False):
  """Mean |b| of the zeroth biases (the seed's `zeroth_biases`); graph-safe.

  Args:
    model: a model with `ZerothBias` layers.
    per_layer: return {layer name: mean |b|} instead of the mean over layers.

  Returns:
    A float32 scalar (NaN without zeroth biases), or the per-layer dict.
  """
  return _mean_abs({layer.name: tf.reduce_mean(tf.abs(tf.cast(layer.bias, tf.float32)))
                    for layer in _layers_of(model, ZerothBias)}, per_layer)


def mean_abs_layer_norm_scale(model, per_layer: bool = False):
  """Mean |gamma| of the restricted LayerNorms (`restricted_LayerNorm_scaling_factors`).

  Args:
    model: a model with `RestrictedLayerNorm` layers.
    per_layer: return {layer name: mean |gamma|} instead of the mean over layers.

  Returns:
    A float32 scalar (NaN without restricted LayerNorms), or the per-layer dict.
  """
  return _mean_abs({layer.name: tf.reduce_mean(tf.abs(tf.cast(layer.gamma, tf.float32)))
                    for layer in _layers_of(model, RestrictedLayerNorm)}, per_layer)


def module_logs(model) -> Dict[str, float]:
  """What the runner logs of the modules `model` has, at every evaluation.

  `zeroth_biases` (mean |b|, with zeroth biases), `restricted_layer_norm_scaling
  _factors` (mean |gamma|, with restricted LayerNorms) and `portion_of_jsrelu`
  (the mean k of the `mixed` activations, when fine-tuning into jsrelu): the
  seed's names. Empty for a model with none of them.
  """
  logs = {}
  if _layers_of(model, ZerothBias):
    logs["zeroth_biases"] = float(mean_abs_zeroth_bias(model))
  if _layers_of(model, RestrictedLayerNorm):
    logs["restricted_layer_norm_scaling_factors"] = float(mean_abs_layer_norm_scale(model))
  mixed = _layers_of(model, activations.MixedActivation)
  if mixed:
    logs["portion_of_jsrelu"] = float(tf.reduce_mean(tf.stack(
        [layer.portion_of_jsrelu for layer in mixed])))
  return logs
