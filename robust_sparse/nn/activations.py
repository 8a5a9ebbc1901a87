"""Activation registry used by every model (`--activation`), spec 2.1.

Contract used by `models/`:
  build(spec, name=None) -> keras.layers.Layer  # a fresh activation layer
  validate(spec) -> None                         # ValueError naming the problem
  names() -> list of registered names

A spec is a registered name, optionally with keyword parameters; a parameter
may itself be a spec (the `inner` of `shift` and `sshaped`):

  relu                      relu(grad_at_zero=1)       relu2
  jsrelu                    srelu(h=0.5)               symmetric_relu(h=1)
  dense_relu(h=1)           weird_leaky_relu(positive_slope=1,negative_slope=0.001)
  shift(inner=relu2,sx=1.6,sy=-1.6,ax=1,ay=1)          sshaped(inner=relu2,h=1.5)
  mixed(steps=1000)         mixed(steps=1000,grad_at_zero=1)
  shift(inner=sshaped(inner=relu2,h=1.5),sx=1.6,sy=1.6)   # the seed's weird_relu2

Derivative conventions at the kinks, one rule for the whole registry: a kink
gets the derivative that automatic differentiation of the seed's PyTorch
formula gives, i.e. every ReLU piece is tf.nn.relu (derivative 0 at 0, as
torch.relu and the lottery-ticket seeds), and only the activations defined
by a custom backward take 1[x >= 0]: `relu(grad_at_zero=1)` (spec 2.1's
CustomizedReLU) and `jsrelu` (f' = (x+1)*1[x >= 0]). So `relu` and
`srelu`, `symmetric_relu`, `dense_relu` have derivative 0 at their kinks
(srelu'(+-h) = 0); relu2' = 2x*1[x >= 0] (0 at 0 either way);
weird_leaky_relu'(0) = negative_slope; shift' = ay*ax*inner'(ax*(x-sx)) and
sshaped' = inner'(x-h) + inner'(-x-h) inherit their inner's convention.
`mixed` is exactly (1-k)*relu + k*jsrelu of these two registered
activations: at k = 0 it equals `relu` (values and derivatives, 0 at 0), at
k = 1 `jsrelu` (1 at 0), in between its derivative at 0 is k;
`mixed(grad_at_zero=1)` mixes `relu(grad_at_zero=1)` instead (1 at 0 for
every k).

Stateful activations (`mixed` and anything nesting it) change state only in
training calls, once per call: `sshaped` evaluates its inner activation once,
on both arguments stacked, so both halves see the same mixing weight k and
g(-x) = -g(x) holds exactly. A nested activation's inner layer is created
under its outer layer's name, so its variables have paths
`{outer}/inner/...` (`act/inner/inner/step` two levels down), unique
whenever the top-level names are, as the engine's by-path matching of
checkpoints needs.

Each layer has a `habitat` attribute: the x-region where it is zero and the
y-tolerance counted as zero, as tuples of (low, high) intervals, or None where
the activation has no such region (used to measure activation sparsity).
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from robust_sparse.custom_ops.layers import JSquaredReLU
from robust_sparse.custom_ops.jsrelu_op import jsrelu
from robust_sparse.custom_ops.jsrelu_op import supports_xla as jsrelu_supports_xla
from robust_sparse.core import specs
from robust_sparse.core.registry import Registry

# Stands for an unbounded end of a habitat interval, as in the seed.
_FAR = 1e32
# |y| at or below this counts as a zero activation (spec 2.2).
_ZERO_Y = ((-1e-6, 1e-6),)
_RELU_HABITAT = {"x": ((-_FAR, 0.0),), "y": _ZERO_Y}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """A registered activation: its layer class and its parameters' defaults.

  The type of each default (float, int, or str for a nested spec) is the type
  the parameter must have.
  """
  layer_class: type
  defaults: Dict[str, Any]


ACTIVATIONS: Registry[_Entry] = Registry("activation")


def _register(name: str, layer_class: type, **defaults) -> None:
  ACTIVATIONS.register(name)(_Entry(layer_class, defaults))


# ----------------------------------------------------------------------------
# Spec strings.

_Parsed = specs.Spec


def _parse(spec: str) -> _Parsed:
  """Parses `name` or `name(key=value, ...)`; values are numbers or specs."""
  return specs.parse(spec, what="activation spec", noun="an activation name")


def _format_number(value) -> str:
  return repr(value) if isinstance(value, int) else format(value, "g")


def _resolve(parsed: _Parsed, spec: str) -> Tuple[_Entry, Dict[str, Any]]:
  """Checks a parsed spec against the registry; returns the entry and kwargs.

  Nested specs come back as canonical spec strings (what layers store).
  """
  try:
    entry = ACTIVATIONS.get(parsed.name)
  except ValueError as error:
    if parsed.name == spec.strip():
      raise
    raise ValueError(f"activation spec {spec!r}: {error}") from None
  kwargs = dict(entry.defaults)
  for key, value in parsed.params.items():
    if key not in entry.defaults:
      known = ", ".join(entry.defaults) or "none"
      raise ValueError(f"activation spec {spec!r}: {parsed.name} has no "
                       f"parameter {key!r}; known: {known}")
    expected = type(entry.defaults[key])
    if expected is str:
      if not isinstance(value, _Parsed):
        raise ValueError(f"activation spec {spec!r}: {parsed.name}.{key} must "
                         f"be an activation spec, got {value!r}")
      kwargs[key] = _canonical(value, spec)
    elif isinstance(value, _Parsed):
      raise ValueError(f"activation spec {spec!r}: {parsed.name}.{key} must be "
                       f"a number, got {value.name!r}")
    elif expected is int:
      number = float(value)
      if not number.is_integer():
        raise ValueError(f"activation spec {spec!r}: {parsed.name}.{key} must "
                         f"be an integer, got {value!r}")
      kwargs[key] = int(number)
    else:
      kwargs[key] = float(value)
  return entry, kwargs


def _canonical(parsed: _Parsed, spec: str) -> str:
  _, kwargs = _resolve(parsed, spec)
  if not parsed.params:
    return parsed.name
  # Only the parameters given, so a default changed later still applies.
  args = ",".join(
      f"{key}={value if isinstance(value, str) else _format_number(value)}"
      for key, value in kwargs.items() if key in parsed.params)
  return f"{parsed.name}({args})"


def validate(spec: str) -> None:
  """Checks an activation spec without building it.

  Raises:
    ValueError: one line naming what is wrong (unknown activation or
      parameter, bad number, syntax error, out-of-range value).
  """
  build(spec)


def build(spec: str, name: Optional[str] = None) -> keras.layers.Layer:
  """Returns a fresh activation layer for `spec` (see the module docstring).

  Args:
    spec: e.g. "relu", "srelu(h=0.5)", "shift(inner=relu2,sx=1.6)".
    name: the layer's name.

  Raises:
    ValueError: if the spec is invalid; the one-line message says why.
  """
  parsed = _parse(spec)
  entry, kwargs = _resolve(parsed, spec)
  try:
    return entry.layer_class(name=name, **kwargs)
  except ValueError as error:
    raise ValueError(f"activation spec {spec!r}: {error}") from None


def names() -> List[str]:
  return ACTIVATIONS.names()


# ----------------------------------------------------------------------------
# Functions with the stated derivatives.


def relu_ge(x):
  """ReLU whose derivative is 1[x >= 0] (1 at 0, the spec's convention)."""

  @tf.custom_gradient
  def forward(features):
    def grad(upstream):
      return tf.where(features >= 0, upstream, tf.zeros_like(upstream))

    return tf.nn.relu(features), grad

  return forward(x)


def squared_relu(x):
  """relu(x)^2; autodiff gives the stated 2x*1[x >= 0] (0 at 0 either way)."""
  return tf.square(tf.nn.relu(x))


# ----------------------------------------------------------------------------
# Layers.


class _Activation(keras.layers.Layer):
  """Shared plumbing: elementwise, shape-preserving, config from `_params`."""

  habitat = None

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._params: Dict[str, Any] = {}

  def compute_output_shape(self, input_shape):
    return input_shape

  def get_config(self):
    return {**super().get_config(), **self._params}


def _check_non_negative(name: str, value: float) -> float:
  if value < 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")
  return float(value)


def _check_grad_at_zero(value: float) -> float:
  if isinstance(value, bool) or value not in (0, 1):
    raise ValueError(f"grad_at_zero must be 0 or 1, got {value!r}")
  return float(value)


@keras.saving.register_keras_serializable(package="robust_sparse")
class ReLU(_Activation):
  """relu(x) with derivative 1[x > 0] (tf.nn.relu), or 1[x >= 0] with grad_at_zero=1."""

  habitat = _RELU_HABITAT

  def __init__(self, grad_at_zero: float = 0.0, **kwargs):
    """Args:
      grad_at_zero: derivative at x = 0; 0 (default: what tf.nn.relu and
        torch.relu do) or 1 (spec 2.1's CustomizedReLU).
    """
    super().__init__(**kwargs)
    self._params = {"grad_at_zero": _check_grad_at_zero(grad_at_zero)}

  def call(self, inputs):
    if self._params["grad_at_zero"] == 0:
      return tf.nn.relu(inputs)
    return relu_ge(inputs)


@keras.saving.register_keras_serializable(package="robust_sparse")
class SquaredReLU(_Activation):
  """relu(x)^2, derivative 2x*1[x >= 0]."""

  habitat = _RELU_HABITAT

  def call(self, inputs):
    return squared_relu(inputs)


@keras.saving.register_keras_serializable(package="robust_sparse")
class SReLU(_Activation):
  """relu(x-h) - relu(-x-h): zero on [-h, h], identity-like outside; derivative 0 at +-h."""

  def __init__(self, h: float = 0.5, **kwargs):
    super().__init__(**kwargs)
    self._params = {"h": _check_non_negative("h", h)}
    self.habitat = {"x": ((-self._params["h"], self._params["h"]),),
                    "y": _ZERO_Y}

  def call(self, inputs):
    h = self._params["h"]
    return tf.nn.relu(inputs - h) - tf.nn.relu(-inputs - h)


@keras.saving.register_keras_serializable(package="robust_sparse")
class SymmetricReLU(_Activation):
  """relu(|x| - h): zero on [-h, h], |x|-h outside; derivative 0 at +-h."""

  def __init__(self, h: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self._params = {"h": _check_non_negative("h", h)}
    self.habitat = {"x": ((-self._params["h"], self._params["h"]),),
                    "y": _ZERO_Y}

  def call(self, inputs):
    return tf.nn.relu(tf.abs(inputs) - self._params["h"])


@keras.saving.register_keras_serializable(package="robust_sparse")
class DenseReLU(_Activation):
  """relu(h - |x|): non-zero only on (-h, h); derivative 0 at +-h and at 0."""

  def __init__(self, h: float = 1.0, **kwargs):
    super().__init__(**kwargs)
    self._params = {"h": _check_non_negative("h", h)}
    self.habitat = {"x": ((-_FAR, -self._params["h"]),
                          (self._params["h"], _FAR)),
                    "y": _ZERO_Y}

  def call(self, inputs):
    return tf.nn.relu(self._params["h"] - tf.abs(inputs))


@keras.saving.register_keras_serializable(package="robust_sparse")
class WeirdLeakyReLU(_Activation):
  """positive_slope*x for x > 0, negative_slope*x for x <= 0 (no habitat)."""

  def __init__(self, positive_slope: float = 1.0,
               negative_slope: float = 0.001, **kwargs):
    super().__init__(**kwargs)
    self._params = {"positive_slope": float(positive_slope),
                    "negative_slope": float(negative_slope)}

  def call(self, inputs):
    return tf.where(inputs > 0, self._params["positive_slope"] * inputs,
                    self._params["negative_slope"] * inputs)


class _Nested(_Activation):
  """An activation built around an inner one, given as a spec string."""

  def __init__(self, inner: str, **kwargs):
    super().__init__(**kwargs)
    if not isinstance(inner, str):
      raise ValueError(f"inner must be an activation spec string, got "
                       f"{inner!r}")
    # Created under this layer's name, so the inner's variables live at
    # "{self.name}/inner/..." (variables are matched by path across levels
    # and checkpoints). A sibling name such as f"{self.name}_inner" could
    # collide with another top-level layer of that name.
    with keras.name_scope(self.name):
      self.inner = build(inner, name="inner")
    # The inner op's XLA support is this layer's (the trainer looks at
    # top-level layers only).
    self.supports_jit = getattr(self.inner, "supports_jit", True)

  def build(self, input_shape):
    self.inner.build(self._inner_shape(input_shape))

  def _inner_shape(self, input_shape):
    """The shape of the tensors the inner layer is called with."""
    return input_shape


@keras.saving.register_keras_serializable(package="robust_sparse")
class Shift(_Nested):
  """ay * inner(ax * (x - sx)) + sy; derivative ay*ax*inner'(ax*(x - sx))."""

  def __init__(self, inner: str = "relu", sx: float = 0.0, sy: float = 0.0,
               ax: float = 1.0, ay: float = 1.0, **kwargs):
    super().__init__(inner, **kwargs)
    self._params = {"inner": inner, "sx": float(sx), "sy": float(sy),
                    "ax": float(ax), "ay": float(ay)}
    self.habitat = self._shifted_habitat()

  def _shifted_habitat(self):
    sx, sy, ax, ay = (self._params[key] for key in ("sx", "sy", "ax", "ay"))
    habitat = self.inner.habitat
    if habitat is None or ax == 0:
      return None

    def x_of(t):  # Inverse of t = ax * (x - sx), keeping the far ends far.
      return t if abs(t) >= _FAR else sx + t / ax

    def y_of(t):
      return ay * t + sy

    return {
        "x": tuple(tuple(sorted((x_of(low), x_of(high))))
                   for low, high in habitat["x"]),
        "y": tuple(tuple(sorted((y_of(low), y_of(high))))
                   for low, high in habitat["y"]),
    }

  def call(self, inputs, training=None):
    p = self._params
    inner = self.inner(p["ax"] * (inputs - p["sx"]), training=training)
    return p["ay"] * inner + p["sy"]


@keras.saving.register_keras_serializable(package="robust_sparse")
class SShaped(_Nested):
  """inner(x - h) - inner(-x - h); derivative inner'(x-h) + inner'(-x-h).

  Odd (g(-x) = -g(x)) for any inner, stateful ones included: the inner layer
  is called once per call, on both arguments stacked on a new leading axis.
  """

  def __init__(self, inner: str = "relu", h: float = 0.5, **kwargs):
    super().__init__(inner, **kwargs)
    self._params = {"inner": inner, "h": _check_non_negative("h", h)}
    self.habitat = self._widened_habitat()

  def _widened_habitat(self):
    habitat = self.inner.habitat
    # Only for a ReLU-like inner, zero on (-far, edge]: zero on [-edge-h,
    # edge+h] afterwards, with the y-tolerance mirrored.
    if habitat is None or len(habitat["x"]) != 1:
      return None
    low, edge = habitat["x"][0]
    if low > -_FAR / 2 or edge < 0:
      return None
    width = edge + self._params["h"]
    y_regions = [tuple(region) for region in habitat["y"]]
    y_regions += [(-high, -low) for low, high in y_regions]
    return {"x": ((-width, width),), "y": tuple(dict.fromkeys(y_regions))}

  def _inner_shape(self, input_shape):
    return (2,) + tuple(input_shape)

  def call(self, inputs, training=None):
    h = self._params["h"]
    # One inner call on both arguments: a stateful inner (`mixed`) advances
    # once per training call and uses the same k for both halves, so
    # g(-x) = -g(x) exactly (two calls would mix with k and k + 1/steps).
    both = self.inner(tf.stack([inputs - h, -inputs - h]), training=training)
    return both[0] - both[1]


@keras.saving.register_keras_serializable(package="robust_sparse")
class MixedActivation(_Activation):
  """(1-k)*relu(x) + k*jsrelu(x), k = clip(step/steps, 0, 1) (spec 2.1).

  Moves from ReLU to J-SquaredReLU over `steps` training steps (the seed uses
  it when fine-tuning). The two parts are the registry's `relu` (or
  `relu(grad_at_zero=1)`) and `jsrelu`, so at k = 0 the layer is exactly
  `relu`, derivative at 0 included, and at k = 1 exactly `jsrelu`; the
  derivative at 0 is (1-k)*grad_at_zero + k (the seed's autograd with
  torch.relu: k). `step` is a non-trainable weight, so it is saved and
  restored with the model; it is incremented once per call with
  `training=True` (so a train step calling the model twice counts twice).
  """

  habitat = _RELU_HABITAT

  def __init__(self, steps: int = 1000, grad_at_zero: float = 0.0, **kwargs):
    """Args:
      steps: training steps over which the jsrelu portion goes from 0 to 1.
      grad_at_zero: the ReLU part's derivative at 0, as `relu`'s: 0
        (default, tf.nn.relu) or 1 (spec 2.1's CustomizedReLU).
    """
    super().__init__(**kwargs)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
      raise ValueError(f"steps must be a positive integer, got {steps!r}")
    self._params = {"steps": int(steps),
                    "grad_at_zero": _check_grad_at_zero(grad_at_zero)}
    # The compiled jsrelu op has no XLA kernel; its fallback (always on GPUs) has.
    self.supports_jit = jsrelu_supports_xla()
    # Created here, not in build(): it does not depend on the input shape, and
    # `portion_of_jsrelu` is then readable before the first call.
    self.step = self.add_weight(name="step", shape=(), initializer="zeros",
                                dtype="int64", trainable=False)

  @property
  def portion_of_jsrelu(self) -> tf.Tensor:
    """The current mixing weight k of J-SquaredReLU (float32 scalar)."""
    step = tf.cast(tf.convert_to_tensor(self.step), tf.float32)
    return tf.clip_by_value(step / self._params["steps"], 0.0, 1.0)

  def call(self, inputs, training=None):
    # k is read before the increment: the first training step is pure ReLU.
    portion = tf.cast(self.portion_of_jsrelu, inputs.dtype)
    relu = (tf.nn.relu(inputs) if self._params["grad_at_zero"] == 0
            else relu_ge(inputs))
    outputs = (1 - portion) * relu + portion * jsrelu(inputs)
    if training:
      self.step.assign_add(1)
    return outputs


_register("relu", ReLU, grad_at_zero=0.0)
_register("relu2", SquaredReLU)
_register("jsrelu", JSquaredReLU)
_register("srelu", SReLU, h=0.5)
_register("symmetric_relu", SymmetricReLU, h=1.0)
_register("dense_relu", DenseReLU, h=1.0)
_register("weird_leaky_relu", WeirdLeakyReLU, positive_slope=1.0,
          negative_slope=0.001)
_register("shift", Shift, inner="relu", sx=0.0, sy=0.0, ax=1.0, ay=1.0)
_register("sshaped", SShaped, inner="relu", h=0.5)
_register("mixed", MixedActivation, steps=1000, grad_at_zero=0.0)
