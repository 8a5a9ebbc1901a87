"""ReLU reduction for private inference: learned ReLU masks (AutoReP, spec section 3).

In private inference every ReLU costs a garbled circuit, so the quantity to
reduce is the number of ReLU *elements* a network evaluates per image, and
results are reported as accuracy against that count. This module is the
library half of that workflow:

  relu_counts(model)            ReLU elements per activation site, and the total
  replace_activations(model)    the same network with a `MaskedReLU` per site
  live_relu_counts(model)       the ReLUs still evaluated, per site and in total
  relu_density(model)           live / total, differentiable through the STE
  density_penalty(model, ...)   lamda * max(0, density - target), the mask loss
  target_density(total, ...)    the target from a sparsity or a ReLU budget

`MaskedReLU` (one layer per site, replacing the activation layer) holds a
trainable `alpha` with the shape of one image's activations ([H, W, C] for a
conv site; AutoReP's C x H x W), initialised U(0, 1) so every gate starts open.
The gate is m = 1[alpha > 0] and

  y = m * relu(x) + (1 - m) * g(x)

with the straight-through gradient dL/dalpha = softplus(alpha) * dL/dm. g is
the `replacement` (the `REPLACEMENTS` registry):

  identity            g(x) = x, gradient 1                 AutoReP ReLU_masked
  identity_relu_grad  g(x) = x, backward relu's 1[x > 0]   ReLU_masked_spgrad
  poly                scale_x2 * x^2 + scale_x * x         ReLU_masked_poly
                      (defaults 0.1, 0.5)
  autopoly2           by the site's input-variance class:  ReLU_masked_autopoly
                        after_bn        0.2 x^2 + 0.5 x + 0.2      (degree 2)
                        after_residual  0.1414 x^2 + 0.5 x + 0.2828
                      (ax^2 + bx + c fitted to relu under N(0, 1) and N(0, 2))
  autopoly1           g(x) = x at both kinds of site        (degree 1)
  trainable_poly      w2 * scale_x2 * x^2 + w1 * x + w0, one (w2, w1, w0) per
                      channel, initialised (0, 1, 0)       af8dc5a, degree 2
  trainable_poly1     w1 * x + w0, initialised (1, 0)      af8dc5a, degree 1

Degree 1 of the fixed autopoly is the identity: in the seed at e37c8bb
`xact_auto` returns `x_input` and ignores its `scale_x` / `bias` arguments; the
site-dependent 0.5x + 0.4 / 0.5x + 0.56 exist only in a commented-out version.
The seed's trainable polynomials start from U(0, 1e-4) / U(1, 1 + 1e-4)
jitter; here they start exactly at (0, 1, 0), i.e. at g(x) = x.

`relu_forward="released"` reproduces spec 3.2 [BUG]: e37c8bb calls
`F.relu(x, inplace=True)` before the second branch, so g is applied to relu(x):
y = m * relu(x) + (1 - m) * g(relu(x)). It differs from the intended forward
exactly where x < 0 and m = 0 (and g(x) != g(0)); for `identity` it is plain
relu, and the STE then sees dL/dm = 0 from the task loss. "intended" is the
default.

Hysteresis (AutoReP "relay", `hysteresis_threshold` t > 0): a non-trainable
state mask M (init 1) with M <- M * 1[alpha > -t] + (1 - M) * 1[alpha > t]: an
open gate closes only once alpha < -t, a closed one opens only once alpha > t.
The forward uses that mask, the backward the same STE. The update is
idempotent for a fixed alpha, so every call computes the updated mask from
(M, alpha) and a training call also stores it in M; an inference call (an
evaluation, an attack) thus uses the mask the next training call would, as the
seed's forward does, without changing any state. With t = 0 the update is
1[alpha > 0] whatever M holds: the plain gate is the t = 0 case.

Mask dropout (`mask_dropout` p, AutoReP's fine-tuning option): in a training
call, with probability p the whole site computes plain relu(x). As in AutoReP,
only `identity_relu_grad`, `poly`, `autopoly1` and `autopoly2` have it
(`has_mask_dropout`); AutoReP's `ReLU_masked` and trainable polynomials accept
the ratio and ignore it, and so do `identity` and `trainable_poly*`. The draw is
stateless: a pure function of (`seed`, the layer's name, the number of
training calls so far), the last held in the non-trainable int64 weight
`training_calls`. That weight is saved with the model and the engine's
checkpoints (matched by path like every variable), so a run resumed after a
kill draws the same decisions as an uninterrupted one, and nothing depends on
a global random state or on the order in which layers are traced. (A Keras
`SeedGenerator` would also keep its state in a variable, but as an opaque RNG
state; a call counter is readable and also serves the hysteresis bookkeeping.)
Sites draw independently because the name enters the seed.

Variables of a site named S, whatever the options (so a checkpoint of either
training phase loads into a model built for the other): `S/alpha` (trainable
unless `frozen`), `S/hysteresis_mask` (float 0/1), `S/training_calls` (int64),
and for the trainable polynomials `S/poly_w0`, `S/poly_w1` (, `S/poly_w2`).

Training (spec 3.3), what a runner wires: the alphas (`alpha_predicate(model)`)
in an Adam group, every other trainable variable (the polynomial coefficients
included, as in the seed) in the SGD group; the loss adds
`density_penalty(model, target, lamda, trainable_values=...)`; for phase 2,
`configure_masked_relus(model, frozen=True, mask_dropout=p)`. Keras'
`stateless_call` returns the updated `hysteresis_mask` and `training_calls`
among the new non-trainable values, as for batch-norm statistics.
"""

import collections
import dataclasses
import hashlib
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from robust_sparse.nn import activations
from robust_sparse.core.registry import Registry

# The values of `models.registry.AFTER_BN` / `AFTER_RESIDUAL` (AutoReP's var_map
# 1 / 2). Repeated, not imported: `models/` builds on this package, not the reverse.
AFTER_BN = "after_bn"
AFTER_RESIDUAL = "after_residual"
SITES = (AFTER_BN, AFTER_RESIDUAL)

RELU_FORWARDS = ("intended", "released")

# Every gate must start open (spec 3.2: "every mask starts at 1"). A float32
# U[0, 1) draw is exactly 0 once in 2^23 elements, which would close a gate in
# about 7 % of ResNet-18 initialisations, so the interval starts just above 0.
_ALPHA_INIT_MIN = 1e-6


# ----------------------------------------------------------------------------
# Functions with the stated gradients.


def straight_through_gate(alpha, mask):
  """`mask` in the forward pass; dL/dalpha = softplus(alpha) * dL/dmask backward.

  AutoReP's STE (`STEFunction` / `STEFunction_relay`): the gate's derivative
  is replaced by softplus(alpha), which is positive everywhere, so a closed
  gate can reopen.

  Args:
    alpha: the gate logits, any shape.
    mask: the 0/1 gate of the same shape and dtype (1[alpha > 0], or the
      hysteresis mask); it receives no gradient.

  Returns:
    A tensor equal to `mask`, differentiable with respect to `alpha`.
  """
  mask = tf.stop_gradient(mask)

  @tf.custom_gradient
  def gate(logits):
    def grad(upstream):
      return upstream * tf.math.softplus(logits)

    return tf.identity(mask), grad

  return gate(alpha)


def identity_with_relu_grad(x):
  """x in the forward pass, relu's derivative 1[x > 0] backward (AutoReP ReLU_Pruned)."""

  @tf.custom_gradient
  def forward(features):
    def grad(upstream):
      return tf.where(features > 0, upstream, tf.zeros_like(upstream))

    return tf.identity(features), grad

  return forward(x)


def hysteresis_update(state, alpha, threshold: float):
  """M * 1[alpha > -t] + (1 - M) * 1[alpha > t]: AutoReP's relay mask update.

  Args:
    state: the current 0/1 mask M.
    alpha: the gate logits, same shape.
    threshold: t >= 0; with t = 0 the result is 1[alpha > 0] whatever M is.

  Returns:
    The new 0/1 mask, dtype of `state`.
  """
  stays_on = tf.cast(alpha > -threshold, state.dtype)
  turns_on = tf.cast(alpha > threshold, state.dtype)
  return state * stays_on + (1 - state) * turns_on


# ----------------------------------------------------------------------------
# The replacement functions g.


@dataclasses.dataclass(frozen=True)
class _Replacement:
  """A registered g: `make(layer, channels) -> g`, called in `MaskedReLU.build`.

  `make` may add weights to the layer (the trainable polynomials).
  `needs_site`: g depends on the layer's `site`, which must then be one of
  `SITES`. `released_forward`: the replacement exists in e37c8bb, whose
  in-place relu `relu_forward="released"` reproduces (the trainable
  polynomials came after the fix). `mask_dropout`: the replacement has AutoReP's mask dropout (its
  spgrad, poly and autopoly modules, relay variants included); the others
  (`ReLU_masked`, the trainable polynomials of af8dc5a) ignore the ratio.
  """
  make: Callable
  needs_site: bool = False
  mask_dropout: bool = True
  released_forward: bool = True  # In e37c8bb, with its in-place relu (spec 3.2 [BUG]).


REPLACEMENTS: Registry[_Replacement] = Registry("relu replacement")

# AutoReP's fixed degree-2 fits, (x^2, x, 1) coefficients, by site.
AUTOPOLY2_COEFFICIENTS = {AFTER_BN: (0.2, 0.5, 0.2),
                          AFTER_RESIDUAL: (0.1414, 0.5, 0.2828)}


def _identity(x):
  return x


def _fixed_quadratic(a, b, c):
  def g(x):
    return tf.cast(a, x.dtype) * tf.square(x) + tf.cast(b, x.dtype) * x + tf.cast(c, x.dtype)

  return g


def _make_poly(layer, channels):
  del channels
  return _fixed_quadratic(layer.scale_x2, layer.scale_x, 0.0)


def _make_autopoly2(layer, channels):
  del channels
  return _fixed_quadratic(*AUTOPOLY2_COEFFICIENTS[layer.site])


def _make_trainable_poly(degree):
  def make(layer, channels):
    # One coefficient per channel (the last axis), broadcast over the rest.
    initial = {0: "zeros", 1: "ones", 2: "zeros"}
    weights = [layer.add_weight(name=f"poly_w{power}", shape=(channels,),
                                initializer=initial[power], trainable=True)
               for power in range(degree + 1)]

    def g(x):
      w = [tf.cast(tf.convert_to_tensor(v), x.dtype) for v in weights]
      y = w[1] * x + w[0]
      if degree == 2:
        y += w[2] * tf.cast(layer.scale_x2, x.dtype) * tf.square(x)
      return y

    return g

  return make


REPLACEMENTS.register("identity")(_Replacement(lambda layer, channels: _identity,
                                               mask_dropout=False))
REPLACEMENTS.register("identity_relu_grad")(
    _Replacement(lambda layer, channels: identity_with_relu_grad))
REPLACEMENTS.register("poly")(_Replacement(_make_poly))
REPLACEMENTS.register("autopoly1")(_Replacement(lambda layer, channels: _identity,
                                                needs_site=True))
REPLACEMENTS.register("autopoly2")(_Replacement(_make_autopoly2, needs_site=True))
REPLACEMENTS.register("trainable_poly")(_Replacement(
    _make_trainable_poly(2), mask_dropout=False, released_forward=False))
REPLACEMENTS.register("trainable_poly1")(_Replacement(
    _make_trainable_poly(1), mask_dropout=False, released_forward=False))


def has_mask_dropout(replacement: str) -> bool:
  """Whether `replacement` applies `mask_dropout` (AutoReP: spgrad, poly, autopoly only)."""
  return REPLACEMENTS.get(replacement).mask_dropout


# ----------------------------------------------------------------------------
# The layer.


def _check_probability(name, value):
  if isinstance(value, bool) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be in [0, 1], got {value!r}")
  return float(value)


@keras.saving.register_keras_serializable(package="robust_sparse")
class MaskedReLU(keras.layers.Layer):
  """A ReLU site whose elements can each be replaced by g(x) (see the module docstring).

  Input shape: [batch, ...] with every non-batch dimension known (alpha has
  one logit per element of an image). Output shape: the same.

  Attributes:
    alpha: trainable logits, the input shape without the batch dimension.
    hysteresis_mask: non-trainable 0/1 state M of the same shape.
    training_calls: non-trainable int64 count of training calls.
    site: "after_bn", "after_residual" or None (copied from the replaced layer).
  """

  def __init__(self, replacement: str = "identity", *, relu_forward: str = "intended",
               scale_x2: float = 0.1, scale_x: float = 0.5,
               hysteresis_threshold: float = 0.0, mask_dropout: float = 0.0,
               seed: int = 0, frozen: bool = False, site: Optional[str] = None, **kwargs):
    """Args:
      replacement: g, a name in `REPLACEMENTS`.
      relu_forward: "intended" (g(x)) or "released" (g(relu(x)), spec 3.2 [BUG]).
      scale_x2: x^2 coefficient of `poly`; the scale s of the trainable x^2 term.
      scale_x: x coefficient of `poly`.
      hysteresis_threshold: t >= 0; 0 is the plain gate 1[alpha > 0].
      mask_dropout: probability that a training call computes plain relu
        (ignored by the replacements without AutoReP's mask dropout:
        `has_mask_dropout`).
      seed: integer seed of the mask-dropout draws.
      frozen: alpha is not trainable (fine-tuning with fixed masks).
      site: the site's class, needed by the autopoly replacements.
      **kwargs: `keras.layers.Layer` arguments (name, dtype).

    Raises:
      ValueError: an unknown replacement or relu_forward, a negative
        threshold, a probability outside [0, 1], or an autopoly replacement
        without a known site.
    """
    super().__init__(**kwargs)
    entry = REPLACEMENTS.get(replacement)
    if relu_forward not in RELU_FORWARDS:
      raise ValueError(f"relu_forward must be one of {', '.join(RELU_FORWARDS)}, "
                       f"got {relu_forward!r}")
    if relu_forward == "released" and not entry.released_forward:
      raise ValueError(f"relu_forward='released' reproduces e37c8bb's in-place relu; "
                       f"replacement {replacement!r} came after its fix (af8dc5a), whose "
                       "forward is the intended one")
    if isinstance(hysteresis_threshold, bool) or not hysteresis_threshold >= 0:
      raise ValueError(f"hysteresis_threshold must be >= 0, got {hysteresis_threshold!r}")
    if entry.needs_site and site not in SITES:
      raise ValueError(f"replacement {replacement!r} chooses its coefficients by site; "
                       f"layer {self.name!r} has site {site!r}, not one of "
                       f"{', '.join(SITES)}")
    if isinstance(seed, bool) or int(seed) != seed:
      raise ValueError(f"seed must be an integer, got {seed!r}")
    self.replacement = replacement
    self.relu_forward = relu_forward
    self.scale_x2 = float(scale_x2)
    self.scale_x = float(scale_x)
    self.hysteresis_threshold = float(hysteresis_threshold)
    self._mask_dropout = _check_probability("mask_dropout", mask_dropout)
    self.seed = int(seed)
    self._frozen = bool(frozen)
    self.site = site
    # The dropout draws' key: the name enters it so that sites draw independently.
    digest = hashlib.sha256(f"{self.seed}/{self.name}".encode()).digest()
    self._draw_key = int.from_bytes(digest[:8], "little") >> 1
    self._replace = None

  @property
  def frozen(self) -> bool:
    """Whether alpha is fixed; settable (before a training step is traced)."""
    return self._frozen

  @frozen.setter
  def frozen(self, value: bool):
    self._frozen = bool(value)
    if self.built:
      self.alpha.trainable = not self._frozen

  @property
  def mask_dropout(self) -> float:
    """The mask-dropout probability; settable (before a training step is traced)."""
    return self._mask_dropout

  @mask_dropout.setter
  def mask_dropout(self, value: float):
    self._mask_dropout = _check_probability("mask_dropout", value)

  def build(self, input_shape):
    shape = tuple(input_shape[1:])
    if not shape or any(dim is None for dim in shape):
      raise ValueError(f"MaskedReLU {self.name!r} needs every non-batch input dimension, "
                       f"got input shape {tuple(input_shape)}; build the model with a "
                       "fixed input size")
    # Created trainable and then frozen, so that the weights' save order (Keras
    # stores trainable ones first) does not depend on `frozen`.
    # Never autocast to a float16 compute dtype: the gate decisions (alpha > 0,
    # alpha > -t) are made in float32, where a small logit does not round to 0.
    self.alpha = self.add_weight(
        name="alpha", shape=shape, trainable=True, autocast=False,
        initializer=keras.initializers.RandomUniform(_ALPHA_INIT_MIN, 1.0))
    self.alpha.trainable = not self._frozen
    self._replace = REPLACEMENTS.get(self.replacement).make(self, shape[-1])
    # Every replica computes the same state, so under tf.distribute one copy is kept.
    self.hysteresis_mask = self.add_weight(
        name="hysteresis_mask", shape=shape, initializer="ones", trainable=False,
        autocast=False, aggregation="only_first_replica")
    self.training_calls = self.add_weight(
        name="training_calls", shape=(), dtype="int64", initializer="zeros", trainable=False,
        aggregation="only_first_replica")

  def compute_output_shape(self, input_shape):
    return input_shape

  def _mask(self):
    """The 0/1 gate now in force (float32, no gradient): the hysteresis update of M."""
    alpha = tf.convert_to_tensor(self.alpha)
    state = tf.convert_to_tensor(self.hysteresis_mask)
    return alpha, hysteresis_update(state, alpha, self.hysteresis_threshold)

  def gate(self) -> tf.Tensor:
    """The 0/1 gate now in force, with the STE gradient to alpha (float32)."""
    alpha, mask = self._mask()
    return straight_through_gate(alpha, mask)

  def live_count(self) -> tf.Tensor:
    """The number of open gates (float32 scalar, differentiable through the STE)."""
    return tf.reduce_sum(self.gate())

  def density(self) -> tf.Tensor:
    """The fraction of open gates (float32 scalar, differentiable through the STE)."""
    return tf.reduce_mean(self.gate())

  def call(self, inputs, training=None):
    alpha, mask = self._mask()
    if training:
      # The relay update "at the start of every forward pass"; a no-op unless
      # alpha moved since the last training call.
      self.hysteresis_mask.assign(mask)
    gate = tf.cast(straight_through_gate(alpha, mask), inputs.dtype)
    relu = tf.nn.relu(inputs)
    source = relu if self.relu_forward == "released" else inputs
    outputs = gate * relu + (1 - gate) * self._replace(source)
    if training and self._mask_dropout > 0 and has_mask_dropout(self.replacement):
      seed = tf.stack([tf.constant(self._draw_key, tf.int64),
                       tf.convert_to_tensor(self.training_calls)])
      drop = tf.random.stateless_uniform([], seed=seed) < self._mask_dropout
      outputs = tf.where(drop, relu, outputs)
    if training:
      self.training_calls.assign_add(1)
    return outputs

  def get_config(self):
    return {**super().get_config(), "replacement": self.replacement,
            "relu_forward": self.relu_forward, "scale_x2": self.scale_x2,
            "scale_x": self.scale_x, "hysteresis_threshold": self.hysteresis_threshold,
            "mask_dropout": self._mask_dropout, "seed": self.seed, "frozen": self._frozen,
            "site": self.site}


# ----------------------------------------------------------------------------
# Models.


class ReLUCounts(NamedTuple):
  """ReLU elements per image: per activation site (in layer order) and in total."""
  per_site: Dict[str, int]
  total: int


def _activation_classes() -> Tuple[type, ...]:
  classes = {activations.ACTIVATIONS.get(name).layer_class for name in activations.names()}
  return tuple(classes) + (MaskedReLU,)


def activation_sites(model: keras.Model) -> List[keras.layers.Layer]:
  """The model's top-level activation layers: registry activations and `MaskedReLU`s.

  Identified by class (every class of `robust_sparse.nn.activations`' registry),
  so a layer that merely carries an `activation=` argument is not a site.
  """
  classes = _activation_classes()
  return [layer for layer in model.layers if isinstance(layer, classes)]


def masked_relus(model: keras.Model) -> List[MaskedReLU]:
  """The model's top-level `MaskedReLU` layers, in layer order."""
  return [layer for layer in model.layers if isinstance(layer, MaskedReLU)]


def _require_masked(model):
  sites = masked_relus(model)
  if not sites:
    raise ValueError(f"model {model.name!r} has no MaskedReLU layers; build it with "
                     "replace_activations(model, ...)")
  return sites


def relu_counts(model: keras.Model, input_shape: Optional[Sequence[int]] = None) -> ReLUCounts:
  """The number of ReLU elements per image at every activation site of `model`.

  Args:
    model: a functional model (every registry model is one).
    input_shape: one image's shape, e.g. (32, 32, 3); needed only when the
      model was built with unknown spatial dimensions, and then used instead
      of them.

  Returns:
    `ReLUCounts(per_site={layer name: elements}, total=sum)`; a site's count
    is the product of its output shape without the batch dimension.

  Raises:
    ValueError: a model without activation layers, or a site whose shape is
      unknown and no `input_shape`.
  """
  sites = activation_sites(model)
  if not sites:
    raise ValueError(f"model {model.name!r} has no activation layers")
  if input_shape is not None:
    probe = keras.Model(model.inputs, [layer.output for layer in sites])
    specs = probe.compute_output_spec(keras.KerasTensor((1,) + tuple(input_shape)))
    shapes = [spec.shape[1:] for spec in specs]
  else:
    shapes = [tuple(layer.output.shape[1:]) for layer in sites]
  per_site = collections.OrderedDict()
  for layer, shape in zip(sites, shapes):
    if any(dim is None for dim in shape):
      raise ValueError(f"activation {layer.name!r} of model {model.name!r} has output shape "
                       f"{shape} with unknown dimensions; pass input_shape")
    count = 1
    for dim in shape:
      count *= int(dim)
    per_site[layer.name] = count
  return ReLUCounts(per_site, sum(per_site.values()))


def live_relu_counts(model: keras.Model) -> ReLUCounts:
  """The ReLU elements still evaluated: open gates of each `MaskedReLU`, all of other sites.

  The gates are those the next forward pass uses (the hysteresis update of
  the stored mask with the current alpha), so the counts agree with what an
  evaluation computes.
  """
  per_site = relu_counts(model).per_site
  for layer in masked_relus(model):
    per_site[layer.name] = int(round(float(layer.live_count())))
  return ReLUCounts(per_site, sum(per_site.values()))


def relu_density(model: keras.Model, trainable_values: Optional[Sequence] = None) -> tf.Tensor:
  """Live ReLUs / all ReLUs of `model`, differentiable in each alpha through the STE.

  AutoReP's `mask_density_forward`: the sum of the gates over all sites divided
  by the total (sites that are not `MaskedReLU`s count as fully live).

  Args:
    model: a model with `MaskedReLU` sites.
    trainable_values: values of `model.trainable_variables`, in order, to read
      instead of the variables, as in `model.stateless_call`; then the
      gradient reaches these tensors. None reads the variables.

  Returns:
    A float32 scalar tensor.

  Raises:
    ValueError: if the model has no `MaskedReLU`.
  """
  sites = _require_masked(model)
  counts = relu_counts(model)
  constant = sum(count for name, count in counts.per_site.items()
                 if not isinstance(model.get_layer(name), MaskedReLU))

  def density():
    live = tf.add_n([layer.live_count() for layer in sites])
    return (live + constant) / counts.total

  if trainable_values is None:
    return density()
  mapping = list(zip(model.trainable_variables, trainable_values))
  with keras.StatelessScope(state_mapping=mapping):
    return density()


def density_penalty(model: keras.Model, target: float, lamda: float,
                    trainable_values: Optional[Sequence] = None) -> tf.Tensor:
  """`lamda * max(0, relu_density(model) - target)`, AutoReP's mask-phase penalty.

  The gradient is lamda / total * softplus(alpha) for every alpha while the
  density is above the target, and zero below it (relu's derivative at the
  target itself is 0, as torch's F.relu in the seed).

  Args:
    model: a model with `MaskedReLU` sites.
    target: the target density in [0, 1] (see `target_density`).
    lamda: the penalty weight (AutoReP `--lamda`, 10).
    trainable_values: as in `relu_density`; pass the `trainable` tensors of a
      stateless step so that the penalty's gradient reaches them.

  Returns:
    A float32 scalar tensor.

  Raises:
    ValueError: a target outside [0, 1], a negative lamda, or no `MaskedReLU`.
  """
  if not 0.0 <= target <= 1.0:
    raise ValueError(f"target density must be in [0, 1], got {target!r}")
  if not lamda >= 0:
    raise ValueError(f"lamda must be >= 0, got {lamda!r}")
  density = relu_density(model, trainable_values)
  return lamda * tf.nn.relu(density - target)


def target_density(total_relus: int, *, relu_sparsity: Optional[float] = None,
                   relu_count: Optional[int] = None) -> float:
  """The target density from a sparsity (1 - density) or a budget of ReLU elements.

  Args:
    total_relus: the model's ReLU count (`relu_counts(model).total`).
    relu_sparsity: the fraction of ReLUs to remove, in [0, 1) (AutoReP
      `--sparsity`).
    relu_count: the number of ReLUs to keep, in [1, total_relus] (AutoReP's
      later `--ReLU_count`, given there in thousands: convert first).

  Returns:
    The target density in (0, 1].

  Raises:
    ValueError: not exactly one of the two, or a value out of range.
  """
  if (relu_sparsity is None) == (relu_count is None):
    raise ValueError("give exactly one of relu_sparsity and relu_count, got "
                     f"relu_sparsity={relu_sparsity!r}, relu_count={relu_count!r}")
  if relu_sparsity is not None:
    if not 0.0 <= relu_sparsity < 1.0:
      raise ValueError(f"relu_sparsity must be in [0, 1), got {relu_sparsity!r}")
    return 1.0 - float(relu_sparsity)
  if not 1 <= relu_count <= total_relus:
    raise ValueError(f"relu_count must be in [1, {total_relus}] (the model's ReLU count), "
                     f"got {relu_count!r}")
  return relu_count / total_relus


def alpha_predicate(model: keras.Model) -> Callable:
  """`variable -> bool`, true for the alphas of `model` (for an Adam optimizer group).

  By identity, not by name: other layers may own variables called "alpha"
  (Keras' PReLU does).
  """
  ids = {id(layer.alpha) for layer in _require_masked(model)}
  return lambda variable: id(variable) in ids


def configure_masked_relus(model: keras.Model, *, frozen: Optional[bool] = None,
                           mask_dropout: Optional[float] = None) -> None:
  """Sets `frozen` and / or `mask_dropout` on every `MaskedReLU` (e.g. for fine-tuning).

  Takes effect in steps traced afterwards.
  """
  for layer in _require_masked(model):
    if frozen is not None:
      layer.frozen = frozen
    if mask_dropout is not None:
      layer.mask_dropout = mask_dropout


def replace_activations(model: keras.Model, **masked_relu_kwargs) -> keras.Model:
  """A copy of `model` with a `MaskedReLU` at each ReLU site, other weights copied.

  Every other layer is re-created from its config and gets a copy of the
  original's weights, so the two models share no variables (the original
  stays usable, e.g. as the distillation teacher) and every variable path
  is the original's ("<layer>/<weight>", the new "<site>/alpha"). With all
  gates open, as initialised, the copy computes what the original does.

  Args:
    model: a functional model whose activation layers are `relu`s (any
      `grad_at_zero`; the masked layer uses tf.nn.relu's derivative); a site
      keeps its name and its `site` attribute.
    **masked_relu_kwargs: `MaskedReLU` arguments (replacement, relu_forward,
      scale_x2, scale_x, hysteresis_threshold, mask_dropout, seed, frozen).

  Returns:
    The new functional model, with the original's name.

  Raises:
    ValueError: no activation layer, an activation that is not relu (masking
      it as a ReLU would change the network), or bad `MaskedReLU` arguments.
  """
  if "site" in masked_relu_kwargs or "name" in masked_relu_kwargs:
    raise ValueError("site and name come from each replaced layer; do not pass them")
  sites = [layer for layer in activation_sites(model) if not isinstance(layer, MaskedReLU)]
  if not sites:
    raise ValueError(f"model {model.name!r} has no activation layers to replace")
  others = [layer for layer in sites if not isinstance(layer, activations.ReLU)]
  if others:
    raise ValueError(f"replace_activations masks ReLU sites; model {model.name!r} has "
                     + ", ".join(f"{layer.name!r} ({type(layer).__name__})"
                                 for layer in others))
  site_names = {layer.name for layer in sites}

  def clone(layer):
    if layer.name in site_names:
      return MaskedReLU(name=layer.name, site=getattr(layer, "site", None),
                        **masked_relu_kwargs)
    return layer.__class__.from_config(layer.get_config())

  new_model = keras.models.clone_model(model, clone_function=clone)
  for layer in model.layers:
    if layer.name not in site_names and layer.weights:
      new_model.get_layer(layer.name).set_weights(layer.get_weights())
  return new_model
