"""Layer saturation (delve): streaming covariances of layer outputs, as a Keras callback.

Saturation (Richter et al., "Size matters", spec section 5.1) measures how much
of a layer's output space its outputs really use: the share of principal
directions needed to explain a fraction `delta` of the variance of the raw
output of every conv and dense layer (before batch norm and activation).

How it is measured, as delve computes it (0.1.41, which the paper's phd-lab
ran, and 0.1.50, the fidelity reference, share the formula):
  * `tap_model(model)` is a weight-sharing functional model whose outputs are
    the model's output followed by the raw output of every conv and dense layer,
    so the taps cost no second forward pass.
  * A conv output [B, H, W, C] is first resized to `downsampling` x
    `downsampling` with PyTorch's `interpolate(mode="nearest")` when H or W is
    larger (every paper config sets 1, spec 5.1 [QUIRK]: the top-left pixel;
    None: no resize), then reshaped channelwise to [B*H*W, C]; a dense output
    to [B, units].
  * `CovarianceAccumulator`s (Keras metrics, so their float64 variables are
    summed across replicas under `tf.distribute`) add up sum(x x^T), sum(x) and
    n over every batch of the epoch, separately for training batches ("train")
    and evaluation batches ("eval"), as delve 0.1.41's tracker does. (delve
    0.1.50's tracker replaces a layer's accumulator at every batch, so it
    reports the last batch only; phd-lab cannot import that version, and its
    formula below is unchanged.) `update` is plain TensorFlow: it runs inside a
    compiled `tf.function` (XLA too).
  * At the epoch end: the biased centred covariance sum(x x^T)/n - mu mu^T in
    float64 and its eigenvalues (`numpy.linalg.eigvalsh`) clamped at 0. A
    total variance at the level of float64 cancellation (at most
    `ZERO_VARIANCE_RTOL` of the mean squared norm sum ||x||^2 / n, e.g. a
    constant channel such as MNIST's black corner under `downsampling: 1`)
    counts as no variance, so k does not depend on rounding noise (which gave
    5, 7 or 8 for the same data at different batch sizes). Then
    `intrinsic_dimensionality` at `delta` and `saturation` = k / d. A split
    that saw no batch reports NaN.
  * `rule="delve"` (the default) is what delve's code returns and the paper's
    figures show: k = the number of cumulative variance ratios below delta,
    0 for a layer without variance. `rule="intended"` applies the two rules
    delve's docstring promises but its code never reaches (k = 0 becomes 1;
    one more direction when the last ratio is more than 0.02 short of delta).

Two front-ends feed the same `SaturationTracker`:
  * A researcher's own `fit`: wrap the model, fit the wrapper, pass the
    callback (it adds `train-saturation_<layer>`, `eval-saturation_<layer>`,
    `train-intrinsic-dimensionality_<layer>` and
    `eval-intrinsic-dimensionality_<layer>` to the epoch logs, so `History`
    and `CSVLogger` record them):

      saturation = SaturationCallback(delta=0.99, downsampling=None)
      wrapped = saturation.wrap(model)   # shares every weight with `model`
      wrapped.compile(optimizer="sgd", loss=..., metrics=["accuracy"])
      wrapped.fit(train, validation_data=test, epochs=30,
                  callbacks=[saturation, keras.callbacks.CSVLogger("log.csv")])

    Training batches go to "train", validation batches to "eval". Put the
    callback before any callback that reads the logs.
  * A compiled loop of one's own (the toolkit's engine): build
    `tracker = SaturationTracker.for_model(model, delta=..., downsampling=...)`
    and `taps = tap_model(model)` once; in the step call `taps` where the model
    was called (e.g. `taps.stateless_call(trainable, non_trainable, x,
    training=True)`, whose variables are the model's) and feed
    `tracker.update(outputs[1:], "train")`, outside any stateless scope; the
    logits are `outputs[0]`. Evaluation batches: `tracker.update(...,
    "eval")`. At the epoch end `tracker.results()` gives the columns and
    `tracker.reset()` starts the next epoch; `SaturationCallback(tracker=
    tracker).on_epoch_end(epoch, logs)` does both.

`write_phd_lab_csv` writes the seed's per-epoch `;`-separated CSV. The
registry entry of `--measure=saturation` (`Saturation`, see `registry.py`) is
at the end of this module.
"""

import math
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
# Keras exports no public class for models built with the functional API.
from keras.src.models.functional import Functional

from robust_sparse.core.files import atomic_open
from robust_sparse.measure.registry import MEASUREMENTS, Measurement, MeasureOptions

SPLITS = ("train", "eval")

# The layers whose raw outputs are tapped: delve hooks every Conv2d and Linear.
# MaskedConv2D / MaskedDense subclass these.
TAPPED_TYPES = (keras.layers.Conv2D, keras.layers.Dense)

# The rules of the intrinsic dimensionality: what delve's code returns (the paper's
# numbers), and what its docstring intends.
RULES = ("delve", "intended")

# The intended rule adds 1 to k when the last ratio below delta is more than this below it.
_GAP = 0.02

# A covariance whose total variance is at most this share of the mean squared norm is
# float64 cancellation noise (measured: below 1e-14 for constant layers over 6e3 to 5e6
# rows), not variance: it counts as none.
ZERO_VARIANCE_RTOL = 1e-10


# ---- the formula ------------------------------------------------------------------
def check_delta(delta: float) -> float:
  """Returns `delta` as a float.

  Raises:
    ValueError: unless 0 < delta <= 1.
  """
  try:
    value = float(delta)
  except (TypeError, ValueError):
    raise ValueError(f"delta must be a number in (0, 1], received delta={delta!r}") from None
  if not 0.0 < value <= 1.0:  # Also refuses NaN.
    raise ValueError(f"delta must be in (0, 1], received delta={delta!r}")
  return value


def check_rule(rule: str) -> str:
  """Returns `rule`.

  Raises:
    ValueError: unless it is one of `RULES`.
  """
  if rule not in RULES:
    raise ValueError(f"saturation rule must be one of {', '.join(RULES)}, received "
                     f"rule={rule!r}")
  return rule


def _sorted_clamped(eigenvalues) -> np.ndarray:
  values = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
  if values.size == 0:
    raise ValueError("eigenvalues must not be empty, received an empty array")
  return np.clip(np.sort(values)[::-1], 0.0, None)


def intrinsic_dimensionality(eigenvalues, delta: float, rule: str = "delve") -> int:
  """delve's intrinsic dimensionality: principal directions for `delta` of the variance.

  The eigenvalues are sorted in descending order and clamped at 0; with the
  cumulative ratios c_i = sum_{j<=i} lambda_j / sum(lambda), k is the number of
  c_i < delta. With `rule="delve"` that count is returned as it is (delve's
  code: 0 when lambda_1 alone reaches delta or there is no variance). With
  `rule="intended"` (delve's docstring), k = 0 becomes 1 and k grows by one
  when delta - c_k > 0.02 (never beyond the number of eigenvalues); all-zero
  eigenvalues give 1.

  Args:
    eigenvalues: the covariance's eigenvalues, in any order [d].
    delta: the explained-variance threshold, in (0, 1].
    rule: "delve" or "intended".

  Returns:
    k, an int in [0, d] ("delve") or [1, d] ("intended").

  Raises:
    ValueError: for a delta outside (0, 1], an unknown rule or no eigenvalues.
  """
  delta = check_delta(delta)
  check_rule(rule)
  values = _sorted_clamped(eigenvalues)
  with np.errstate(invalid="ignore", divide="ignore"):
    ratios = np.cumsum(values) / np.sum(values)
  below = ratios < delta  # NaN ratios (no variance) count as not below.
  k = int(np.count_nonzero(below))
  if rule == "delve":
    return k
  if k == 0:
    return 1
  if delta - ratios[k - 1] > _GAP:
    k += 1
  return min(k, values.size)


def saturation(eigenvalues, delta: float, rule: str = "delve") -> float:
  """Layer saturation: `intrinsic_dimensionality(eigenvalues, delta, rule) / d`.

  Args:
    eigenvalues: the covariance's d eigenvalues, in any order.
    delta: the explained-variance threshold, in (0, 1].
    rule: "delve" or "intended".

  Returns:
    A float in [0, 1] ("delve") or (0, 1] ("intended").

  Raises:
    ValueError: for a delta outside (0, 1], an unknown rule or no eigenvalues.
  """
  return intrinsic_dimensionality(eigenvalues, delta, rule) / np.asarray(eigenvalues).size


def eigenvalues_from_sums(sum_outer, sum_x, count) -> np.ndarray:
  """The eigenvalues of the covariance of streamed sums, zero where it is only rounding.

  Args:
    sum_outer: sum of x x^T [d, d].
    sum_x: sum of x [d].
    count: n, the number of rows summed (> 0).

  Returns:
    The d eigenvalues (float64, ascending) of `covariance_from_sums`; all zero
    when the clamped total variance is at most `ZERO_VARIANCE_RTOL` times
    trace(sum_outer) / n (the covariance is then cancellation noise).

  Raises:
    ValueError: if count is not positive.
  """
  covariance = covariance_from_sums(sum_outer, sum_x, count)
  eigenvalues = np.linalg.eigvalsh(covariance)
  scale = float(np.trace(np.asarray(sum_outer, np.float64))) / float(count)
  if np.sum(np.clip(eigenvalues, 0.0, None)) <= ZERO_VARIANCE_RTOL * scale:
    return np.zeros_like(eigenvalues)
  return eigenvalues


def covariance_from_sums(sum_outer, sum_x, count) -> np.ndarray:
  """The biased centred covariance sum(x x^T)/n - mu mu^T, in float64.

  Args:
    sum_outer: sum of x x^T [d, d].
    sum_x: sum of x [d].
    count: n, the number of rows summed (> 0).

  Returns:
    The covariance [d, d] (float64).

  Raises:
    ValueError: if count is not positive.
  """
  count = float(count)
  if not count > 0:
    raise ValueError(f"count must be positive, received count={count}")
  mean = np.asarray(sum_x, np.float64) / count
  return np.asarray(sum_outer, np.float64) / count - np.outer(mean, mean)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source rows of PyTorch's `interpolate(mode="nearest")` from in_size to out_size.

  PyTorch computes `min(floor(i * float32(in / out)), in - 1)` in float32;
  this does the same, so sizes that do not divide give its rows.

  Args:
    in_size, out_size: positive ints.

  Returns:
    int32 indices [out_size].
  """
  scale = np.float32(in_size) / np.float32(out_size)
  rows = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(rows, in_size - 1).astype(np.int32)


def _nearest_indices_tensor(in_size, out_size):
  """`nearest_indices` for sizes known only when the graph runs."""
  scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
  rows = tf.floor(tf.cast(tf.range(out_size), tf.float32) * scale)
  return tf.minimum(tf.cast(rows, tf.int32), in_size - 1)


def channelwise(outputs, downsampling: Optional[int] = None, channels_first: bool = False):
  """A layer output as rows of features: conv maps channelwise, after delve's resize.

  Args:
    outputs: a dense output [..., units] or a conv output [B, H, W, C]
      ([B, C, H, W] with `channels_first`).
    downsampling: when H or W is larger, the map is first resized to
      downsampling x downsampling (nearest, as PyTorch); None: never.
    channels_first: the conv output's layout.

  Returns:
    float64 rows [N, features].
  """
  outputs = tf.convert_to_tensor(outputs)
  if outputs.shape.rank == 4:
    if channels_first:
      outputs = tf.transpose(outputs, [0, 2, 3, 1])
    if downsampling is not None:
      height, width = outputs.shape[1], outputs.shape[2]
      if height is not None and width is not None:
        # Static sizes (the usual case): constant indices, so XLA compiles it.
        if height > downsampling or width > downsampling:
          outputs = tf.gather(outputs, nearest_indices(height, downsampling), axis=1)
          outputs = tf.gather(outputs, nearest_indices(width, downsampling), axis=2)
      else:
        shape = tf.shape(outputs)
        height, width = shape[1], shape[2]
        resize = tf.logical_or(height > downsampling, width > downsampling)
        out_height = tf.where(resize, downsampling, height)
        out_width = tf.where(resize, downsampling, width)
        outputs = tf.gather(outputs, _nearest_indices_tensor(height, out_height), axis=1)
        outputs = tf.gather(outputs, _nearest_indices_tensor(width, out_width), axis=2)
  features = outputs.shape[-1]
  return tf.reshape(tf.cast(outputs, tf.float64), [-1, features])


# ---- streaming accumulation ----------------------------------------------------------
class CovarianceAccumulator(keras.metrics.Metric):
  """Streaming float64 sums of one layer's outputs: sum(x x^T), sum(x) and n.

  A Keras metric, so its variables are non-trainable, aggregate by sum across
  replicas under `tf.distribute`, and `reset_state()` zeroes them. It is not
  meant for `compile(metrics=...)`: `result()` is the covariance matrix.

  Args:
    width: d, the features per row (channels or units).
    downsampling: see `channelwise`.
    channels_first: see `channelwise`.
    name: the metric's name (its variables' path prefix).
  """

  def __init__(self, width: int, downsampling: Optional[int] = None,
               channels_first: bool = False, name: Optional[str] = None, **kwargs):
    super().__init__(name=name, dtype="float64", **kwargs)
    if int(width) < 1:
      raise ValueError(f"width must be a positive int, received width={width!r}")
    if downsampling is not None and int(downsampling) < 1:
      raise ValueError(f"downsampling must be a positive int or None, received "
                       f"downsampling={downsampling!r}")
    self.width = int(width)
    self.downsampling = None if downsampling is None else int(downsampling)
    self.channels_first = bool(channels_first)
    self.sum_outer = self.add_variable(shape=(self.width, self.width), initializer="zeros",
                                       dtype="float64", name="sum_outer")
    self.sum = self.add_variable(shape=(self.width,), initializer="zeros", dtype="float64",
                                 name="sum")
    self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64",
                                   name="count")

  def update_state(self, outputs):
    """Adds one batch of the layer's raw outputs (any float dtype)."""
    rows = channelwise(outputs, self.downsampling, self.channels_first)
    self.sum_outer.assign_add(tf.matmul(rows, rows, transpose_a=True))
    self.sum.assign_add(tf.reduce_sum(rows, axis=0))
    self.count.assign_add(tf.cast(tf.shape(rows)[0], tf.float64))

  def result(self):
    """The biased centred covariance [d, d] (NaN before any update)."""
    mean = self.sum / self.count
    return self.sum_outer / self.count - mean[:, None] * mean[None, :]

  def sums(self):
    """(sum_outer [d, d], sum [d], count) as float64 NumPy values (summed over replicas)."""
    return tuple(np.asarray(tf.convert_to_tensor(v).numpy(), np.float64)
                 for v in (self.sum_outer, self.sum, self.count))

  def get_config(self):
    return dict(super().get_config(), width=self.width, downsampling=self.downsampling,
                channels_first=self.channels_first)


# ---- which layers, and the weight-sharing tap model --------------------------------------
def _functional(model):
  """The functional graph of `model` (a Sequential's inner one), or a ValueError."""
  if isinstance(model, keras.Sequential):
    inner = getattr(model, "_functional", None)
    if inner is None:
      raise ValueError(f"model {model.name!r} is a Sequential model that is not built; "
                       f"give it an Input or call it once first")
    return inner
  if not isinstance(model, Functional):
    raise ValueError(f"model {model.name!r} is a subclassed (non-functional) Keras model, whose "
                     f"layer outputs cannot be tapped; build it with the functional API")
  return model


def graph_nodes(model) -> list:
  """The call nodes of a functional (or built Sequential) model in topological order.

  Each node has `operation` (the layer), `input_tensors`, `outputs` and
  `arguments`; Input nodes are left out.

  Raises:
    ValueError: for a subclassed model or an unbuilt Sequential one.
  """
  functional = _functional(model)
  return [node for depth in sorted(functional._nodes_by_depth, reverse=True)
          for node in functional._nodes_by_depth[depth]
          if node.operation is not None and not node.is_input]


def graph_layers(model) -> List[keras.layers.Layer]:
  """The layers of a functional (or built Sequential) model in topological (call) order."""
  ordered, seen = [], set()
  for node in graph_nodes(model):
    if id(node.operation) not in seen:
      seen.add(id(node.operation))
      ordered.append(node.operation)
  return ordered


def tapped_layers(model, layers: Optional[Sequence[Union[str, keras.layers.Layer]]] = None
                  ) -> List[keras.layers.Layer]:
  """The conv and dense layers of `model` whose outputs are tapped, in call order.

  Args:
    model: a functional (or built Sequential) Keras model.
    layers: names or layer objects to tap (in call order whatever the order
      given); None: every `Conv2D` / `Dense` (masked ones included).

  Returns:
    The layers.

  Raises:
    ValueError: for a subclassed model, an unknown or untappable layer, a layer
      called more than once, or a nested model holding conv / dense layers.
  """
  ordered = graph_layers(model)
  for layer in ordered:
    if isinstance(layer, keras.Model) and any(
        isinstance(inner, TAPPED_TYPES) for inner in layer._flatten_layers(include_self=False)):
      raise ValueError(f"model {model.name!r} nests model {layer.name!r}, whose conv and dense "
                       f"layers cannot be tapped from outside; build one flat functional model")
  candidates = [layer for layer in ordered if isinstance(layer, TAPPED_TYPES)]
  if layers is not None:
    wanted = {getattr(layer, "name", layer) for layer in layers}
    known = {layer.name for layer in candidates}
    unknown = sorted(wanted - known)
    if unknown:
      raise ValueError(f"layers {unknown} are not conv or dense layers of model {model.name!r}; "
                       f"known: {', '.join(sorted(known))}")
    candidates = [layer for layer in candidates if layer.name in wanted]
  for layer in candidates:
    if len(layer._inbound_nodes) != 1:
      raise ValueError(f"layer {layer.name!r} is called {len(layer._inbound_nodes)} times; a "
                       f"tap needs a layer called once")
  return candidates


def tap_model(model, layers: Optional[Sequence[Union[str, keras.layers.Layer]]] = None
              ) -> keras.Model:
  """A model sharing every weight of `model` whose outputs also hold the raw layer outputs.

  Args:
    model: a functional (or built Sequential) Keras model.
    layers: see `tapped_layers`; None: every conv and dense layer.

  Returns:
    A `keras.Model` with `model`'s inputs and outputs `[model's output] + [each
    tapped layer's own output]` (before any following batch norm or
    activation layer; a layer's built-in `activation` is part of its output).
    Its `variables` are `model`'s own, so `tap.stateless_call` takes the
    values of `tap.trainable_variables` / `tap.non_trainable_variables`.

  Raises:
    ValueError: as `tapped_layers`.
  """
  functional = _functional(model)
  taps = tapped_layers(model, layers)
  return keras.Model(functional.input, [functional.output] + [layer.output for layer in taps],
                     name=f"{model.name}_taps")


# ---- the tracker ---------------------------------------------------------------------
def column_names(layer_names: Sequence[str]) -> List[str]:
  """delve's column names, in its order: per split, per layer, saturation then dimensionality."""
  return [f"{split}-{stat}_{name}" for split in SPLITS for name in layer_names
          for stat in ("saturation", "intrinsic-dimensionality")]


class SaturationTracker:
  """Train and eval `CovarianceAccumulator`s for a list of layers.

  Args:
    layer_names: the tapped layers' names, in the order the taps come.
    widths: each layer's d (channels or units).
    delta: the explained-variance threshold, in (0, 1] (delve's 0.99).
    downsampling: see `channelwise`; None: no resize.
    channels_first: per layer, whether its conv output is [B, C, H, W];
      default all False.
    rule: "delve" (its code, the default) or "intended" (its docstring); see
      `intrinsic_dimensionality`.

  Raises:
    ValueError: for a delta outside (0, 1], an unknown rule, mismatched lists or
      a bad width.
  """

  def __init__(self, layer_names: Sequence[str], widths: Sequence[int], *, delta: float = 0.99,
               downsampling: Optional[int] = None,
               channels_first: Optional[Sequence[bool]] = None, rule: str = "delve"):
    self.delta = check_delta(delta)
    self.rule = check_rule(rule)
    self.layer_names = list(layer_names)
    channels_first = list(channels_first or [False] * len(self.layer_names))
    if not len(self.layer_names) == len(widths) == len(channels_first):
      raise ValueError(f"layer_names, widths and channels_first must have the same length, "
                       f"received {len(self.layer_names)}, {len(widths)}, {len(channels_first)}")
    if len(set(self.layer_names)) != len(self.layer_names):
      raise ValueError(f"layer_names must be unique, received {self.layer_names}")
    self.downsampling = downsampling
    self.accumulators = {
        split: [CovarianceAccumulator(width, downsampling, first,
                                      name=f"saturation_{split}_{name}")
                for name, width, first in zip(self.layer_names, widths, channels_first)]
        for split in SPLITS}

  @classmethod
  def for_model(cls, model, layers=None, *, delta: float = 0.99,
                downsampling: Optional[int] = None, rule: str = "delve") -> "SaturationTracker":
    """A tracker for `tapped_layers(model, layers)`, in the order `tap_model` emits them."""
    taps = tapped_layers(model, layers)
    widths = [int(layer.output.shape[1 if _channels_first(layer) else -1]) for layer in taps]
    return cls([layer.name for layer in taps], widths, delta=delta, downsampling=downsampling,
               channels_first=[_channels_first(layer) for layer in taps], rule=rule)

  @property
  def variables(self) -> List[keras.Variable]:
    """Every accumulator variable (for a checkpoint of a run stopped mid-epoch)."""
    return [v for split in SPLITS for acc in self.accumulators[split] for v in acc.variables]

  def columns(self) -> List[str]:
    """The keys of `results()`, in delve's order."""
    return column_names(self.layer_names)

  def update(self, taps, split):
    """Adds one batch of tapped outputs; plain TensorFlow, safe inside `tf.function`.

    Args:
      taps: the layer outputs in `layer_names` order (a list, e.g. a tap
        model's `outputs[1:]`), or a dict from layer name to output.
      split: "train" or "eval", or a bool / boolean tensor (True: "train").

    Raises:
      ValueError: for an unknown split or the wrong number of taps.
    """
    if isinstance(taps, Mapping):
      taps = [taps[name] for name in self.layer_names]
    taps = list(taps)
    if len(taps) != len(self.layer_names):
      raise ValueError(f"taps must hold {len(self.layer_names)} outputs ({self.layer_names}), "
                       f"received {len(taps)}")
    if isinstance(split, (bool, np.bool_)):
      split = "train" if split else "eval"
    if isinstance(split, str):
      if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, received split={split!r}")
      for accumulator, outputs in zip(self.accumulators[split], taps):
        accumulator.update_state(outputs)
      return

    def feed(name):
      def fn():
        for accumulator, outputs in zip(self.accumulators[name], taps):
          accumulator.update_state(outputs)
        return tf.constant(True)
      return fn

    tf.cond(tf.cast(split, tf.bool), feed("train"), feed("eval"))

  def results(self) -> Dict[str, float]:
    """Saturation and intrinsic dimensionality of every layer and split, by column name.

    Returns:
      `{"train-saturation_<layer>": s, "train-intrinsic-dimensionality_<layer>": k,
      ..., "eval-...": ...}` in delve's column order; NaN for a split without
      any batch since the last reset.
    """
    values = {}
    for split in SPLITS:
      for name, accumulator in zip(self.layer_names, self.accumulators[split]):
        sum_outer, sum_x, count = accumulator.sums()
        if count > 0:
          eigenvalues = eigenvalues_from_sums(sum_outer, sum_x, count)
          k = intrinsic_dimensionality(eigenvalues, self.delta, self.rule)
          values[f"{split}-saturation_{name}"] = k / accumulator.width
          values[f"{split}-intrinsic-dimensionality_{name}"] = float(k)
        else:
          values[f"{split}-saturation_{name}"] = math.nan
          values[f"{split}-intrinsic-dimensionality_{name}"] = math.nan
    return values

  def reset(self):
    """Zeroes every accumulator (delve resets the covariances after each epoch)."""
    for split in SPLITS:
      for accumulator in self.accumulators[split]:
        accumulator.reset_state()


def _channels_first(layer) -> bool:
  return getattr(layer, "data_format", "channels_last") == "channels_first"


# ---- the Keras front-end ---------------------------------------------------------------
class SaturationModel(keras.Model):
  """`network` for `fit`: the same weights, and every call feeds a `SaturationTracker`.

  Calls with `training=True` (fit's training batches) feed the "train"
  accumulators, other calls (validation, `evaluate`, `predict`) the "eval"
  ones. Save `network`, not this wrapper.

  Args:
    network: a functional (or built Sequential) Keras model.
    tracker: the tracker its tapped layers feed (e.g.
      `SaturationTracker.for_model(network)`).
  """

  def __init__(self, network: keras.Model, tracker: SaturationTracker, **kwargs):
    kwargs.setdefault("name", f"{network.name}_saturation")
    super().__init__(**kwargs)
    self.network = network
    self.taps = tap_model(network, tracker.layer_names)
    # A plain attribute: Keras does not see the accumulators, so `fit` neither
    # logs their `result()` every batch nor resets them at each epoch start.
    self._saturation_tracker = [tracker]

  @property
  def tracker(self) -> SaturationTracker:
    return self._saturation_tracker[0]

  def call(self, inputs, training=False):
    outputs = self.taps(inputs, training=training)
    self.tracker.update(outputs[1:], training if tf.is_tensor(training) else bool(training))
    return outputs[0]


class SaturationCallback(keras.callbacks.Callback):
  """Adds per-layer saturation and intrinsic dimensionality to each epoch's logs.

  In `fit`: `wrapped = callback.wrap(model)`, then `wrapped.fit(...,
  callbacks=[callback, ...])` (see the module docstring). In a loop of one's
  own: pass the `tracker` that loop feeds and call `on_epoch_end`.

  Args:
    delta: the explained-variance threshold, in (0, 1] (delve: 0.99).
    downsampling: conv maps larger than this are resized to it first
      (nearest); None: no resize.
    layers: names of the conv / dense layers to track; None: all.
    rule: "delve" (its code, the default) or "intended" (its docstring).
    tracker: an existing tracker (then delta, downsampling, rule and layers
      are its own and `wrap` is not needed).

  Raises:
    ValueError: for a delta outside (0, 1] or an unknown rule.
  """

  def __init__(self, *, delta: float = 0.99, downsampling: Optional[int] = None,
               layers: Optional[Sequence[str]] = None, rule: str = "delve",
               tracker: Optional[SaturationTracker] = None):
    super().__init__()
    self.delta = check_delta(delta) if tracker is None else tracker.delta
    self.rule = check_rule(rule) if tracker is None else tracker.rule
    self.downsampling = downsampling if tracker is None else tracker.downsampling
    self.layers = layers
    self.tracker = tracker
    self._wrapped = None

  def wrap(self, model: keras.Model) -> SaturationModel:
    """A model sharing `model`'s weights whose training and evaluation feed this callback.

    Create it (like the model) inside a `tf.distribute` strategy's scope when
    training under one. Compile and fit the returned model.

    Raises:
      ValueError: for a model whose layers cannot be tapped (see `tapped_layers`),
        or a `RobustModel` (see below).
    """
    if hasattr(model, "network") and hasattr(model, "loss_grad_fn"):  # A RobustModel.
      raise ValueError(
          f"SaturationCallback.wrap cannot tap {model.name!r}, a RobustModel, whose step calls "
          "its network directly; build RobustModel(network, measurement=measurements."
          "Measurements(network, ['saturation'])) and pass "
          "SaturationCallback(tracker=measurement.saturation) to its fit")
    if self.tracker is None:
      self.tracker = SaturationTracker.for_model(model, self.layers, delta=self.delta,
                                                 downsampling=self.downsampling, rule=self.rule)
    self._wrapped = SaturationModel(model, self.tracker)
    return self._wrapped

  def on_train_begin(self, logs=None):
    if self.tracker is None:
      raise ValueError("SaturationCallback has no tracker: fit the model returned by "
                       "`callback.wrap(model)`, or pass `tracker=`")
    if self._wrapped is not None and self.model is not self._wrapped:
      raise ValueError("SaturationCallback measures the model returned by its `wrap(model)`; "
                       "call fit on that model")
    self.tracker.reset()

  def on_epoch_begin(self, epoch, logs=None):
    # Drops batches seen between epochs (e.g. other callbacks' predictions).
    self.tracker.reset()

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update(self.tracker.results())
    self.tracker.reset()


# ---- the seed's CSV --------------------------------------------------------------------
# The seed's metric columns (phd-lab `Trainer`), ahead of delve's columns.
PHD_LAB_METRICS = ("training_accuracy", "training_top5-accuracy", "training_loss",
                   "test_accuracy", "test_top5-accuracy", "test_loss")


def phd_lab_csv_name(model: str, dataset: str, resolution: int, batch_size: int,
                     epochs: int) -> str:
  """The seed's file name: `{Model}-{Dataset}-r{res}-bs{B}-e{E}.csv`."""
  return f"{model}-{dataset}-r{resolution}-bs{batch_size}-e{epochs}.csv"


def write_phd_lab_csv(path: str, epoch: int, row: Mapping[str, float]):
  """Writes epoch `epoch`'s row of the seed's `;`-separated per-epoch CSV.

  The file is what delve's `CSVandPlottingWriter` writes with pandas: an
  unnamed index column (the epoch, from 0) and the columns in the order of the
  first row, e.g. `PHD_LAB_METRICS` then `SaturationTracker.results()`.
  Rows of epochs >= `epoch` already in the file are replaced, so a resumed run
  rewrites the epochs it repeats; the write is atomic.

  Args:
    path: the CSV file.
    epoch: the 0-based epoch of `row`; the file must hold epochs 0..epoch-1.
    row: column name -> value.

  Raises:
    ValueError: for a negative epoch or a file missing earlier epochs.
  """
  if epoch < 0:
    raise ValueError(f"epoch must be >= 0, received epoch={epoch}")
  frame = pd.DataFrame([dict(row)], index=[epoch])
  if epoch > 0:
    if not os.path.exists(path):
      raise ValueError(f"epoch={epoch} but {path} does not exist (epochs start at 0)")
    previous = pd.read_csv(path, sep=";", index_col=0)
    previous = previous[previous.index < epoch]
    if len(previous) != epoch:
      raise ValueError(f"epoch={epoch} but {path} holds {len(previous)} earlier epochs")
    frame = pd.concat([previous, frame])
  with atomic_open(path) as f:
    frame.to_csv(f, sep=";")


# ---- the registry entry: --measure=saturation --------------------------------------------
@MEASUREMENTS.register("saturation")
class Saturation(Measurement):
  """`--measure=saturation`: a `SaturationTracker` of every conv and dense layer (train
  and eval splits, every batch), tapping their outputs.

  Attributes:
    tracker: the `SaturationTracker`.
  """

  position = 0

  def __init__(self, model, chosen: Sequence[str], options: MeasureOptions):
    del chosen
    self.tracker = SaturationTracker.for_model(model, delta=options.delta,
                                               downsampling=options.downsampling,
                                               rule=options.rule)
    self.taps = [layer.output for layer in tapped_layers(model)]

  @property
  def variables(self) -> list:
    return list(self.tracker.variables)

  def update(self, taps, gradients, split) -> None:
    del gradients
    self.tracker.update(taps, split)

  def columns(self) -> List[str]:
    return list(self.tracker.columns())

  def results(self) -> Dict[str, float]:
    return dict(self.tracker.results())

  def reset(self) -> None:
    self.tracker.reset()
