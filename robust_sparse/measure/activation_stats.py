"""Activation-sparsity measurements (spec 2.2): functions, an accumulator, a tap and a callback.

Per activation layer, from its pre-activations x (the layer's input), its
outputs a = f(x) and, for the gradient measurements, g = dL/da (the gradient
at the activation's output):

  activation_sparsity           fraction of a in the activation's y-habitat
                                (|a| <= 1e-6 for ReLU-likes; `shift` moves it
                                by sy): the seed's
                                `activation_concentration/activation`
  pre_activation_concentration  fraction of x in the x-habitat (x <= 0 for ReLU)
  mean_squared_derivative       mean of f'(x)^2 (the seed's `derivative2`)
  effective_gradient_sparsity   fraction of |g * f'(x)| below 1e-9, 1e-6, 1e-3
                                (strictly, as the seed)
  spectral_increase             ||W_key||_F^2 (`kkT`: the key layer's masked
                                kernel, the dense layer that feeds the
                                activation) and the mean over samples and
                                tokens of ||g||^2 over the hidden units (`M`)

Habitats are the activation layers' `habitat` attribute (intervals,
inclusive, as the seed's `fall_within`); an activation without one (e.g.
`weird_leaky_relu`) gets NaN for the two habitat fractions. f'(x) is the
activation's own derivative, by automatic differentiation of the layer
called in inference mode (so the custom gradients of `relu`, `jsrelu` and the
composites are what is measured, and `mixed` does not advance its step).

Three ways to use them, all graph-safe (usable inside a compiled
`tf.function`):

  * the functions below, on tensors;
  * `ActivationStatistics`, an accumulator for the toolkit's loop:
    `update(pre_activations, outputs=..., output_gradients=...,
    key_kernels=...)` adds a batch (its first `max_samples`, 1024 as the
    seed), `results()` gives {metric/layer: float} with a per-metric
    `average` over layers (`result_tensors()` the same as tensors, inside a
    graph), `reset()` starts over. Counts are exact int64, sums float64, so
    a large evaluation set accumulates without rounding; they are Keras
    metric variables, summed across replicas under `tf.distribute` (as
    `robust_sparse.measure.saturation`'s accumulators);
  * `ActivationTap`, a second functional model over the same layers that
    returns the logits plus every activation's input and output, so one
    forward pass gives both the loss and the measurements (`tap.measure`
    takes g with a `tf.GradientTape`), and `ActivationSparsityCallback`,
    a Keras callback that measures a fixed batch with a tap every
    `log_every` training batches and at the end of every epoch, and puts the
    results in `logs` (so `History`, `CSVLogger` and `TensorBoard` placed
    after it record them):

      callback = ActivationSparsityCallback((x_sample, y_sample), log_every=100)
      model.fit(train, epochs=5, callbacks=[callback, keras.callbacks.CSVLogger("log.csv")])
      callback.history  # [(step, {"train/activation_sparsity/average": ..., ...}), ...]

The registry entry of `--measure=activation_sparsity`,
`effective_gradient_sparsity` and `spectral_increase` (`Activation`, one
family behind one `ActivationTap`, see `registry.py`) is at the end of this
module.
"""

import numbers
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from robust_sparse.measure.registry import MEASUREMENTS as REGISTRY
from robust_sparse.measure.registry import Measurement, MeasureOptions
from robust_sparse.nn import activations as activations_lib

THRESHOLDS = (1e-9, 1e-6, 1e-3)
MAX_SAMPLES = 1024
MEASUREMENTS = ("activation_sparsity", "effective_gradient_sparsity", "spectral_increase")
_NEEDS_GRADIENTS = ("effective_gradient_sparsity", "spectral_increase")
_NAN = float("nan")


def _as_layer(activation):
  if isinstance(activation, str):
    return activations_lib.build(activation)
  return activation


def habitat_of(activation) -> Optional[dict]:
  """The activation's habitat: {"x": intervals, "y": intervals}, or None.

  Args:
    activation: an activation layer (its `habitat` attribute) or a spec string.
  """
  return getattr(_as_layer(activation), "habitat", None)


def count_in_regions(values, regions) -> tf.Tensor:
  """How many entries of `values` lie in any of the closed intervals `regions` (int64)."""
  values = tf.cast(values, tf.float32)
  inside = tf.zeros_like(values, dtype=tf.bool)
  for low, high in regions:
    inside = tf.logical_or(inside, tf.logical_and(values >= low, values <= high))
  return tf.math.count_nonzero(inside, dtype=tf.int64)


def _fraction(count, values):
  return tf.cast(count, tf.float64) / tf.cast(tf.size(values, out_type=tf.int64), tf.float64)


def activation_and_derivative(activation, x) -> Tuple[tf.Tensor, tf.Tensor]:
  """(f(x), f'(x)) of an elementwise activation, in inference mode; graph-safe.

  Args:
    activation: an activation layer or spec string.
    x: pre-activations, any shape.
  """
  layer = _as_layer(activation)
  x = tf.convert_to_tensor(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=False)
  derivative = tape.gradient(y, x, unconnected_gradients=tf.UnconnectedGradients.ZERO)
  return y, derivative


def activation_sparsity(activation, x, outputs=None) -> tf.Tensor:
  """Fraction of the outputs f(x) in the activation's y-habitat (float64; NaN without one)."""
  habitat = habitat_of(activation)
  if habitat is None:
    return tf.constant(_NAN, tf.float64)
  if outputs is None:
    outputs = _as_layer(activation)(x, training=False)
  return _fraction(count_in_regions(outputs, habitat["y"]), outputs)


def pre_activation_concentration(activation, x) -> tf.Tensor:
  """Fraction of the pre-activations x in the activation's x-habitat (float64; NaN without one)."""
  habitat = habitat_of(activation)
  if habitat is None:
    return tf.constant(_NAN, tf.float64)
  return _fraction(count_in_regions(x, habitat["x"]), x)


def mean_squared_derivative(activation, x) -> tf.Tensor:
  """Mean of f'(x)^2 over every entry (float32)."""
  _, derivative = activation_and_derivative(activation, x)
  return tf.reduce_mean(tf.square(tf.cast(derivative, tf.float32)))


def effective_gradient_sparsity(activation, x, output_gradient,
                                thresholds: Sequence[float] = THRESHOLDS) -> tf.Tensor:
  """Fractions of |g * f'(x)| strictly below each threshold (float64 [len(thresholds)]).

  Args:
    activation: an activation layer or spec string.
    x: pre-activations.
    output_gradient: g, the loss gradient at the activation's output (x's shape).
    thresholds: the p of `fraction(|eta| < p)`.
  """
  _, derivative = activation_and_derivative(activation, x)
  eta = tf.abs(tf.cast(output_gradient, tf.float32) * tf.cast(derivative, tf.float32))
  return tf.stack([_fraction(tf.math.count_nonzero(eta < p, dtype=tf.int64), eta)
                   for p in thresholds])


def spectral_increase(key_kernel, output_gradient) -> Tuple[tf.Tensor, tf.Tensor]:
  """(||W_key||_F^2, mean ||g||^2): g's squared norm over its last axis, averaged over the rest.

  Args:
    key_kernel: the kernel of the layer feeding the activation (pruned
      weights zero), or None (then NaN).
    output_gradient: g at the activation's output [..., hidden].

  Returns:
    Two float32 scalars.
  """
  gradient = tf.cast(output_gradient, tf.float32)
  gradient_norm2 = tf.reduce_mean(tf.reduce_sum(tf.square(gradient), -1))
  if key_kernel is None:
    return tf.constant(_NAN, tf.float32), gradient_norm2
  return tf.reduce_sum(tf.square(tf.cast(key_kernel, tf.float32))), gradient_norm2


def _threshold_name(threshold):
  return format(threshold, "g")


def _check_measure(measure):
  measure = tuple(measure)
  unknown = [m for m in measure if m not in MEASUREMENTS]
  if unknown or not measure:
    raise ValueError(f"unknown measurement {unknown[0] if unknown else ''!r} (--measure); "
                     f"known: {', '.join(MEASUREMENTS)}")
  return measure


class _Sums(keras.metrics.Metric):
  """The accumulator's counters, one row per layer.

  A Keras metric only for its variables: non-trainable, summed across replicas
  under `tf.distribute`, zeroed by `reset_state()`. Not for `compile(metrics=)`.
  """

  def __init__(self, layers: int, thresholds: int, name: str = "activation_statistics"):
    super().__init__(name=name)

    def add(name, dtype, shape=(layers,)):
      return self.add_variable(shape=shape, initializer="zeros", dtype=dtype,
                               aggregation="sum", name=name)

    self.entries = add("entries", "int64")
    self.sparse = add("sparse", "int64")
    self.concentrated = add("concentrated", "int64")
    self.derivative2 = add("derivative2_sum", "float64")
    self.gradient_entries = add("gradient_entries", "int64")
    self.effective = add("effective", "int64", (layers, thresholds))
    self.vectors = add("vectors", "int64")
    self.gradient_norm2 = add("gradient_norm2_sum", "float64")
    self.kernel_updates = add("kernel_updates", "int64")
    self.kernel_norm2 = add("kernel_norm2_sum", "float64")

  def update_state(self, *args, **kwargs):
    raise NotImplementedError("use ActivationStatistics.update")

  def result(self):
    raise NotImplementedError("use ActivationStatistics.results")


class ActivationStatistics:
  """Accumulates the measurements of some activation layers over batches.

  Entries are pooled over every batch since the last `reset()` (a fraction is
  count / entries over all of them); `spectral_increase/kkT` is the mean over
  the updates of the kernel norm at each. Metric names (`results()` keys):

    activation_sparsity/{layer}, pre_activation_concentration/{layer},
    mean_squared_derivative/{layer}           ("activation_sparsity")
    effective_gradient_sparsity/{p}/{layer}   ("effective_gradient_sparsity";
                                               p in 1e-09, 1e-06, 0.001)
    spectral_increase/kkT/{layer}, spectral_increase/M/{layer}
                                              ("spectral_increase")

  plus `{metric}/average`, the mean over layers (over those with a value).
  The counters are variables of a Keras metric (`variables()`, e.g. for a
  checkpoint), created at construction: build the accumulator outside any
  `tf.function` (inside the strategy scope under `tf.distribute`).

  Args:
    activations: the activation layers (habitat and derivative come from them).
    names: one name per layer in the metric names; default the layers' names.
    measure: which of `MEASUREMENTS` to compute.
    thresholds: the effective-gradient thresholds.
    max_samples: `update` uses the first this many examples of a batch.

  Raises:
    ValueError: an unknown measurement, names of the wrong length, max_samples < 1.
  """

  def __init__(self, activations: Sequence[keras.layers.Layer], *,
               names: Optional[Sequence[str]] = None,
               measure: Sequence[str] = MEASUREMENTS,
               thresholds: Sequence[float] = THRESHOLDS, max_samples: int = MAX_SAMPLES):
    self.activations = [_as_layer(a) for a in activations]
    self.names = list(names) if names is not None else [a.name for a in self.activations]
    if len(self.names) != len(self.activations):
      raise ValueError(f"ActivationStatistics needs one name per activation: "
                       f"{len(self.activations)} activations, {len(self.names)} names")
    self.measure = _check_measure(measure)
    self.thresholds = tuple(float(p) for p in thresholds)
    if (isinstance(max_samples, bool) or not isinstance(max_samples, numbers.Integral)
        or max_samples < 1):
      raise ValueError(f"max_samples must be a positive integer, received {max_samples!r}")
    self.max_samples = int(max_samples)
    self._habitats = [habitat_of(a) for a in self.activations]
    self._sums = _Sums(len(self.activations), len(self.thresholds))

  def variables(self) -> list:
    """The counters (Keras variables)."""
    return list(self._sums.variables)

  def update(self, pre_activations: Sequence[tf.Tensor], *,
             outputs: Optional[Sequence[tf.Tensor]] = None,
             output_gradients: Optional[Sequence[tf.Tensor]] = None,
             key_kernels: Optional[Sequence[Optional[tf.Tensor]]] = None) -> None:
    """Adds one batch; graph-safe.

    Args:
      pre_activations: per layer, its input x [batch, ...].
      outputs: per layer, f(x) as the model computed it; default recomputed.
      output_gradients: per layer, g = dL/d(output); required for the
        gradient measurements.
      key_kernels: per layer, the kernel feeding it (or None); for
        `spectral_increase`.

    Raises:
      ValueError: lists of the wrong length, or missing gradients that a
        chosen measurement needs (at trace time).
    """
    count = len(self.activations)
    needs_gradients = any(m in self.measure for m in _NEEDS_GRADIENTS)
    if len(pre_activations) != count:
      raise ValueError(f"update needs {count} pre-activation tensors, got "
                       f"{len(pre_activations)}")
    if needs_gradients and (output_gradients is None or len(output_gradients) != count):
      raise ValueError(f"measurements {', '.join(self.measure)} need one output gradient "
                       f"per activation ({count})")
    outputs = outputs if outputs is not None else [None] * count
    key_kernels = key_kernels if key_kernels is not None else [None] * count
    zero = tf.constant(0, tf.int64)
    rows = {name: [] for name in ("entries", "sparse", "concentrated", "derivative2",
                                  "gradient_entries", "effective", "vectors",
                                  "gradient_norm2", "kernel_updates", "kernel_norm2")}
    for index, activation in enumerate(self.activations):
      x = tf.convert_to_tensor(pre_activations[index])[:self.max_samples]
      y, derivative = activation_and_derivative(activation, x)
      if outputs[index] is not None:
        y = tf.convert_to_tensor(outputs[index])[:self.max_samples]
      habitat = self._habitats[index]
      rows["entries"].append(tf.size(x, out_type=tf.int64))
      rows["sparse"].append(zero if habitat is None else count_in_regions(y, habitat["y"]))
      rows["concentrated"].append(zero if habitat is None
                                  else count_in_regions(x, habitat["x"]))
      rows["derivative2"].append(tf.reduce_sum(tf.square(tf.cast(derivative, tf.float64))))
      if not needs_gradients:
        continue
      g = tf.cast(tf.convert_to_tensor(output_gradients[index])[:self.max_samples], tf.float32)
      eta = tf.abs(g * tf.cast(derivative, tf.float32))
      rows["gradient_entries"].append(tf.size(eta, out_type=tf.int64))
      rows["effective"].append(tf.stack(
          [tf.math.count_nonzero(eta < p, dtype=tf.int64) for p in self.thresholds]))
      norms = tf.reduce_sum(tf.square(tf.cast(g, tf.float64)), -1)
      rows["vectors"].append(tf.size(norms, out_type=tf.int64))
      rows["gradient_norm2"].append(tf.reduce_sum(norms))
      kernel = key_kernels[index]
      rows["kernel_updates"].append(zero if kernel is None else tf.constant(1, tf.int64))
      rows["kernel_norm2"].append(tf.constant(0.0, tf.float64) if kernel is None else
                                  tf.reduce_sum(tf.square(tf.cast(kernel, tf.float64))))
    groups = [("activation_sparsity", ("entries", "sparse", "concentrated", "derivative2")),
              ("effective_gradient_sparsity", ("gradient_entries", "effective")),
              ("spectral_increase", ("vectors", "gradient_norm2", "kernel_updates",
                                     "kernel_norm2"))]
    for measurement, names in groups:
      if measurement in self.measure:
        for name in names:
          getattr(self._sums, name).assign_add(tf.stack(rows[name]))

  def reset(self) -> None:
    """Forgets every batch; graph-safe."""
    self._sums.reset_state()

  def result_tensors(self) -> Dict[str, tf.Tensor]:
    """`results()` as float64 scalar tensors; graph-safe."""
    sums = self._sums

    def ratio(numerator, denominator):
      numerator = tf.cast(tf.convert_to_tensor(numerator), tf.float64)
      denominator = tf.cast(tf.convert_to_tensor(denominator), tf.float64)
      return tf.where(denominator > 0, numerator / tf.maximum(denominator, 1.0),
                      tf.constant(_NAN, tf.float64))

    per_metric = {}
    if "activation_sparsity" in self.measure:
      no_habitat = tf.constant([habitat is None for habitat in self._habitats])
      nan = tf.constant(_NAN, tf.float64)
      per_metric["activation_sparsity"] = tf.where(
          no_habitat, nan, ratio(sums.sparse, sums.entries))
      per_metric["pre_activation_concentration"] = tf.where(
          no_habitat, nan, ratio(sums.concentrated, sums.entries))
      per_metric["mean_squared_derivative"] = ratio(sums.derivative2, sums.entries)
    if "effective_gradient_sparsity" in self.measure:
      entries = tf.convert_to_tensor(sums.gradient_entries)[:, None]
      fractions = ratio(sums.effective, entries)
      for column, p in enumerate(self.thresholds):
        per_metric[f"effective_gradient_sparsity/{_threshold_name(p)}"] = fractions[:, column]
    if "spectral_increase" in self.measure:
      per_metric["spectral_increase/kkT"] = ratio(sums.kernel_norm2, sums.kernel_updates)
      per_metric["spectral_increase/M"] = ratio(sums.gradient_norm2, sums.vectors)
    results = {}
    for metric, values in per_metric.items():
      for index, name in enumerate(self.names):
        results[f"{metric}/{name}"] = values[index]
      finite = tf.logical_not(tf.math.is_nan(values))
      total = tf.reduce_sum(tf.where(finite, values, tf.zeros_like(values)))
      counted = tf.reduce_sum(tf.cast(finite, tf.float64))
      results[f"{metric}/average"] = tf.where(counted > 0, total / tf.maximum(counted, 1.0),
                                              tf.constant(_NAN, tf.float64))
    return results

  def results(self) -> Dict[str, float]:
    """{metric/layer: value} and `{metric}/average` as floats (eager); NaN where nothing counted."""
    return {key: float(np.asarray(value)) for key, value in self.result_tensors().items()}


# ----------------------------------------------------------------------------
# Taps.


def activation_layers(model: keras.Model) -> List[keras.layers.Layer]:
  """The model's top-level layers with a `habitat` attribute (every registry activation)."""
  return [layer for layer in model.layers if hasattr(layer, "habitat")]


def _producer(layer):
  return layer.input._keras_history.operation


def _key_kernel(layer):
  """The kernel `layer` computes with (masked, LoRA merged), or None without one."""
  if layer is None:
    return None
  if hasattr(layer, "masked_kernel"):
    return layer.masked_kernel
  return getattr(layer, "kernel", None)


def _default_loss(y, logits):
  """Mean softmax cross-entropy: int labels [N] or soft labels [N, classes]."""
  logits = tf.cast(logits, tf.float32)
  if y.dtype.is_integer:
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(y, tf.int32), logits=logits))
  return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
      labels=tf.cast(y, tf.float32), logits=logits))


class ActivationTap:
  """A functional model over `model`'s layers that also returns every activation's input and output.

  It shares the layers (and so the weights) of `model`: `tap(x)` is one
  forward pass giving `(logits, pre_activations, outputs)`.

  Args:
    model: a functional `keras.Model` with one input and one output.
    layers: the activation layers to tap, as layers or names; default every
      top-level layer with a `habitat` (`activation_layers`).

  Attributes:
    activations: the tapped layers. names: their names. key_layers: the
      layer feeding each (its kernel is `W_key`), or None where that layer
      has no kernel. model: the tap model.

  Raises:
    ValueError: a model that is not functional, or no activation layers.
  """

  def __init__(self, model: keras.Model,
               layers: Optional[Sequence[Union[str, keras.layers.Layer]]] = None):
    try:
      single = len(model.inputs) == 1 and len(model.outputs) == 1
    except (AttributeError, TypeError, ValueError):
      single = False
    if not isinstance(model, keras.Model) or not single:
      raise ValueError(f"ActivationTap needs a functional model with one input and one "
                       f"output, received {model!r}")
    if layers is None:
      chosen = activation_layers(model)
    else:
      chosen = [model.get_layer(layer) if isinstance(layer, str) else layer
                for layer in layers]
    if not chosen:
      raise ValueError(f"ActivationTap: model '{model.name}' has no activation layers to tap")
    self.activations = chosen
    self.names = [layer.name for layer in chosen]
    self.key_layers = [producer if _key_kernel(producer) is not None else None
                       for producer in (_producer(layer) for layer in chosen)]
    self.network = model
    self.model = keras.Model(model.inputs[0], [model.outputs[0]]
                             + [layer.input for layer in chosen]
                             + [layer.output for layer in chosen],
                             name=f"{model.name}_activation_tap")

  def __call__(self, x, training: bool = False):
    """Returns (logits, [pre-activations], [outputs]) of one forward pass."""
    results = self.model(x, training=training)
    count = len(self.activations)
    return results[0], list(results[1:1 + count]), list(results[1 + count:])

  def key_kernels(self) -> List[Optional[tf.Tensor]]:
    """The current kernel of each key layer (None where there is none)."""
    return [_key_kernel(layer) for layer in self.key_layers]

  def statistics(self, **kwargs) -> ActivationStatistics:
    """An `ActivationStatistics` for the tapped layers (kwargs as its constructor)."""
    return ActivationStatistics(self.activations, names=self.names, **kwargs)

  def measure(self, statistics: ActivationStatistics, x, y=None,
              loss_fn: Optional[Callable] = None, training: bool = False):
    """One forward (and, if needed, backward) pass adding `x`'s measurements; graph-safe.

    Uses the first `statistics.max_samples` examples. g is the gradient of
    `loss_fn(y, logits)` (default: mean cross-entropy over those examples)
    at each activation's output.

    Returns:
      The logits of the measured examples.

    Raises:
      ValueError: no labels `y` when a gradient measurement is chosen.
    """
    x = tf.convert_to_tensor(x)[:statistics.max_samples]
    needs_gradients = any(m in statistics.measure for m in _NEEDS_GRADIENTS)
    if not needs_gradients:
      logits, pre, outputs = self(x, training=training)
      statistics.update(pre, outputs=outputs)
      return logits
    if y is None:
      raise ValueError(f"measurements {', '.join(statistics.measure)} need labels y for the "
                       "loss gradient")
    y = tf.convert_to_tensor(y)[:statistics.max_samples]
    with tf.GradientTape() as tape:
      logits, pre, outputs = self(x, training=training)
      loss = (loss_fn or _default_loss)(y, logits)
    grads = tape.gradient(loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    statistics.update(pre, outputs=outputs, output_gradients=grads,
                      key_kernels=self.key_kernels())
    return logits


class ActivationSparsityCallback(keras.callbacks.Callback):
  """Measures a fixed batch every `log_every` training batches and after every epoch.

  Works in any `fit`: it taps the model being trained (a `RobustModel`'s
  `network`), runs one compiled forward/backward pass over `data` in
  inference mode (no weight changes), and adds `{prefix}/{metric}/{layer}`
  and `.../average` values (floats) to the batch's and the epoch's `logs`.
  `history` keeps (training step, results) of every measurement.

  Args:
    data: `(x, y)`, the examples to measure (the first `max_samples`); `y` as
      the loss takes them (int or soft labels for the default).
    log_every: measure after every this many training batches; None: only at
      epoch ends.
    measure: which of `MEASUREMENTS`.
    layers: the activation layers to tap (layers or names); default all.
    loss_fn: `loss_fn(y, logits) -> scalar`; default mean cross-entropy.
    prefix: the first part of every key ("train", "test", ...).
    thresholds, max_samples: as `ActivationStatistics`.

  Raises:
    ValueError: log_every < 1, or what `ActivationStatistics` refuses.
  """

  def __init__(self, data, *, log_every: Optional[int] = None,
               measure: Sequence[str] = MEASUREMENTS, layers=None,
               loss_fn: Optional[Callable] = None, prefix: str = "train",
               thresholds: Sequence[float] = THRESHOLDS, max_samples: int = MAX_SAMPLES):
    super().__init__()
    if log_every is not None and (isinstance(log_every, bool) or not isinstance(
        log_every, numbers.Integral) or log_every < 1):
      raise ValueError(f"log_every must be a positive integer or None, received {log_every!r}")
    self.x, self.y = data
    self.log_every = log_every
    self.measure_names = _check_measure(measure)
    self.layers = layers
    self.loss_fn = loss_fn
    self.prefix = prefix
    self.thresholds = thresholds
    self.max_samples = max_samples
    self.history: List[Tuple[int, Dict[str, float]]] = []
    self._tap = None
    self._statistics = None
    self._function = None
    self._step = 0

  def _network(self):
    return getattr(self.model, "network", self.model)

  def _ensure_tap(self):
    if self._tap is None:
      self._tap = ActivationTap(self._network(), self.layers)
      self._statistics = self._tap.statistics(measure=self.measure_names,
                                              thresholds=self.thresholds,
                                              max_samples=self.max_samples)

      def measure(x, y):
        self._statistics.reset()
        self._tap.measure(self._statistics, x, y, loss_fn=self.loss_fn)
        return self._statistics.result_tensors()

      # The data are arguments, not constants baked into the graph.
      self._function = tf.function(measure)

  def measure_now(self) -> Dict[str, float]:
    """Measures `data` with the current weights; returns {key: float}."""
    self._ensure_tap()
    x = tf.convert_to_tensor(self.x)[:self.max_samples]
    y = None if self.y is None else tf.convert_to_tensor(self.y)[:self.max_samples]
    results = {f"{self.prefix}/{key}": float(value)
               for key, value in self._function(x, y).items()}
    self.history.append((self._step, results))
    return results

  def on_train_begin(self, logs=None):
    self._tap = None  # The model may have changed since the last fit.

  def on_train_batch_end(self, batch, logs=None):
    self._step += 1
    if self.log_every is not None and self._step % self.log_every == 0:
      results = self.measure_now()
      if logs is not None:
        logs.update(results)

  def on_epoch_end(self, epoch, logs=None):
    results = self.measure_now()
    if logs is not None:
      logs.update(results)


# ---- the registry entry: --measure=activation_sparsity, ... --------------------------------
def _column(split: str, key: str) -> str:
  metric, layer = key.rsplit("/", 1)
  return f"{split}-{metric.replace('/', '_')}_{layer}"


@REGISTRY.register("activation")
class Activation(Measurement):
  """`--measure=activation_sparsity`, `effective_gradient_sparsity`, `spectral_increase`.

  `ActivationStatistics` of every activation layer (layers with a `habitat`),
  tapping each one's input, then each one's output. Training batches feed
  "train" (the first `max_samples` examples, every `log_every`-th step counted
  from the last `reset()`, i.e. from each evaluation), with the gradients at
  the activation outputs (`gradient_taps`) when a gradient measurement is
  chosen; test-set evaluation batches feed "eval" with the forward
  measurements only, as evaluation has no backward pass. Columns per split
  `train`/`eval`: the `ActivationStatistics` metrics with '/' read as '_'
  (`train-activation_sparsity_<layer>`, ..., `<layer>` = `average` too).

  Attributes:
    statistics: {"train": ActivationStatistics, "eval": ...}; a split is
      absent when none of its measurements is chosen.
    layer_names: the tapped activation layers' names.

  Raises:
    ValueError: the model has no activation layers.
  """

  position = 1
  names = MEASUREMENTS

  def __init__(self, model, chosen: Sequence[str], options: MeasureOptions):
    activations = activation_layers(model)
    if not activations:
      raise ValueError(f"--measure={','.join(chosen)}: model {model.name!r} has no "
                       "activation layers (layers with a habitat) to measure")
    self._tap = ActivationTap(model, activations)
    self.layer_names = self._tap.names
    self.log_every = options.log_every
    count = len(activations)
    self.taps = [layer.input for layer in activations] + [layer.output for layer in activations]
    self.statistics = {"train": self._tap.statistics(measure=chosen,
                                                     max_samples=options.max_samples)}
    forward = [name for name in chosen if name not in _NEEDS_GRADIENTS]
    if forward:
      self.statistics["eval"] = self._tap.statistics(measure=forward,
                                                     max_samples=options.max_samples)
    if len(forward) < len(chosen):
      self.gradient_taps = tuple(range(count, 2 * count))  # At the outputs.
    self._step = keras.Variable(0, dtype="int64", trainable=False,
                                name="activation_measure_step")

  @property
  def variables(self) -> list:
    variables = []
    for split in ("train", "eval"):
      if split in self.statistics:
        variables += self.statistics[split].variables()
    return variables + [self._step]

  def update(self, taps, gradients, split) -> None:
    count = len(taps) // 2
    pre, post = taps[:count], taps[count:]
    statistics = self.statistics.get(split)
    if statistics is None:
      return
    if split == "eval":
      statistics.update(pre, outputs=post)
      return

    def feed():
      statistics.update(pre, outputs=post, output_gradients=gradients,
                        key_kernels=self._tap.key_kernels() if gradients is not None else None)
      return tf.constant(True)

    if self.log_every == 1:
      feed()
    else:
      due = tf.equal(tf.math.floormod(tf.convert_to_tensor(self._step), self.log_every), 0)
      tf.cond(due, feed, lambda: tf.constant(False))
    self._step.assign_add(1)

  def _splits(self):
    return [(split, self.statistics[split]) for split in ("train", "eval")
            if split in self.statistics]

  def columns(self) -> List[str]:
    return [_column(split, key) for split, statistics in self._splits()
            for key in statistics.result_tensors()]

  def results(self) -> Dict[str, float]:
    return {_column(split, key): value for split, statistics in self._splits()
            for key, value in statistics.results().items()}

  def reset(self) -> None:
    for statistics in self.statistics.values():
      statistics.reset()
    self._step.assign(0)
