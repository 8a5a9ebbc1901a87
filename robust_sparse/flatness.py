"""Augmented flatness of MLP blocks (spec 2.3): the measurement, its CSV files and the figure.

The seed (cdgyp/sparsity, `hooks.py: CoefficientPlugin`) explains activation
sparsity by flat minima, measured per MLP block `value(f(key(x)))` on the
block's two linear layers. For a linear layer with input X (per token t:
X_t) and output Z = X W + b, G = dL/dZ, token t adds G_t X_t^T to the weight
gradient, of squared norm ||G_t||^2 ||X_t||^2; per block and per sample b
(spec 2.3):

  key, value   sum_t ||G_{b,t}||^2 * ||X_{b,t}||^2 of the key (resp. value)
               layer, averaged over samples b: the seed's
               `augmented_flatness/<block>.{key|value}`.
  L0_sum       mean over (b, t, h) of (dL/dA_{b,t,h})^2 * 1[A_{b,t,h} > 0] *
               ||X_key_{b,t}||^2, where A = f(key(X)) is the activation (the
               seed's `coefficients_L0/sum`).
  L0_weight    mean over (b, t, h) of 1[A > 0] (`coefficients_L0/weight`).
  L0_preview   L0_sum / L0_weight: the mean coefficient of an active unit
               (`coefficients_L0/preview`).
  L2           mean over (b, t) of ||dL/dZ_value_{b,t}||^2 (`coefficients_L2`).
  a2           mean over (b, t) of ||A_{b,t}||^2 (`a2`).
  L2_term      mean over (b, t) of ||A_{b,t}||^2 * ||dL/dZ_value_{b,t}||^2
               (`L2_term`; for the value layer, whose input is A, this is
               `value` / T).

Norms are over the feature axis; a 2-D layer input [B, d] is one token
(T = 1), [B, T, d] has T tokens (every axis between the first and the last
counts as tokens). For ReLU, (dL/dA)^2 1[A > 0] = (dL/dZ_key)^2, so
`key` = T * H * `L0_sum` (H hidden units): the key's flatness is a
coefficient times the activations' L0 norm, the value's a coefficient times
their L2 norm (the paper's argument that flat minima favour sparse
activations).

The measurement is pure, as the seed's protocol (learning rate 0, weight
decay 0, `--post-training-only --augmented-flatness-only`): the model runs in
inference mode and nothing is updated (no optimizer, no state changes, e.g.
a `mixed` activation's step stays). Per sample b, G is the gradient of that
sample's loss (`loss_reduction="sum"`: the loss summed over the batch), so
the values do not depend on the batch size; `loss_reduction="mean"` takes the
gradient of the batch-mean loss, as backward hooks on a training loss see it
(every gradient-squared term then shrinks by 1 / B^2, B the measured samples
of the batch). With `correct_samples_only` (the seed's CIFAR protocol) only
the samples the model classifies correctly count, and every mean is over
them. The seed's notebook divides its columns by `augmented_flatness_acc`
(spec 2.3), i.e. turns means over the batch with the other samples counting
zero into means over the correct ones; `summary/accuracy` is that accuracy.

Blocks (`mlp_blocks`): every top-level registry activation layer (one with a
`habitat`) fed directly by a dense layer without its own activation (the key);
the value is the dense layer that alone consumes the activation's output, or
None. The block is named after the activation, less its `_activation`
suffix: the ViT's `block{i}_mlp` (`block{i}_mlp_key`, `_activation`,
`_value`) and the residual MLP's `block{i}` (`block{i}_dense`,
`block{i}_activation`, no value layer: the residual sum follows). Blocks
without a value layer have only the key-side terms (`key`, `L0_*`).

Usage:

  results = augmented_flatness(model, test_batches, correct_samples_only=True,
                               max_iterations=128)
  results["block1_mlp"]["key"], results["average"]["value"]
  write_csv(results, "epoch_10/augmented_flatness.csv")
  plot_augmented_flatness({10: "epoch_10/augmented_flatness.csv",
                           20: "epoch_20/augmented_flatness.csv"}, "flatness.png")

Each batch is one compiled `tf.function` call (one forward and one backward
pass to the tapped layer outputs, through a weight-sharing tap model); the
sums come back as float64 and are added up over batches.
"""

import csv
import dataclasses
import itertools
import math
import numbers
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

KEY_TERMS = ("key", "L0_sum", "L0_weight", "L0_preview")
VALUE_TERMS = ("value", "L2", "a2", "L2_term")
TERMS = KEY_TERMS + VALUE_TERMS
# Pseudo-blocks of the results: the mean of each term over the blocks that
# have it, and the measurement itself (batches, examples, samples, accuracy).
AVERAGE = "average"
SUMMARY = "summary"
SUMMARY_TERMS = ("batches", "examples", "samples", "accuracy")
LOSS_REDUCTIONS = ("sum", "mean")
# The terms of the paper's figure: AS_k, AS_v and the L0 and L2 coefficients.
FIGURE_TERMS = ("key", "value", "L0_preview", "L2")
CSV_COLUMNS = ("block", "term", "value")

Results = Dict[str, Dict[str, float]]


@dataclasses.dataclass(frozen=True)
class MLPBlock:
  """One MLP block `value(f(key(x)))` of a functional model.

  Attributes:
    name: the block's name in the results.
    key: the dense layer before the activation.
    activation: the activation layer (its output is A).
    value: the dense layer after the activation, or None.
  """
  name: str
  key: keras.layers.Layer
  activation: keras.layers.Layer
  value: Optional[keras.layers.Layer]


# ----------------------------------------------------------------------------
# Finding the blocks.


def _is_linear_dense(layer) -> bool:
  """A dense layer (MaskedDense included) whose output is its linear map."""
  if not isinstance(layer, keras.layers.Dense):
    return False
  activation = getattr(layer, "activation", None)
  return activation is None or activation is keras.activations.linear


def _producer(layer):
  try:
    return layer.input._keras_history.operation
  except (AttributeError, ValueError):  # Not called once in a functional graph.
    return None


def _consumers(layer):
  return [node.operation for node in getattr(layer, "_outbound_nodes", [])]


def _block_name(activation_name: str) -> str:
  suffix = "_activation"
  if activation_name.endswith(suffix) and len(activation_name) > len(suffix):
    return activation_name[:-len(suffix)]
  return activation_name


def _network(model):
  """The functional model inside a `RobustModel`-like wrapper, or the model."""
  network = getattr(model, "network", None)
  return network if isinstance(network, keras.Model) else model


def mlp_blocks(model: keras.Model,
               blocks: Optional[Mapping[str, Tuple[str, str, Optional[str]]]] = None
               ) -> List[MLPBlock]:
  """The MLP blocks of a functional model (see the module docstring).

  Args:
    model: a functional `keras.Model` (or a wrapper with a `network`).
    blocks: optional explicit blocks, {name: (key layer, activation layer,
      value layer or None)} by layer name; default: found from the graph.

  Returns:
    The blocks, in the model's layer order (or `blocks`' order).

  Raises:
    ValueError: a named layer that does not exist or is not a dense layer
      without activation, or a model without any MLP block.
  """
  model = _network(model)
  found = []
  if blocks is not None:
    for name, names in blocks.items():
      if len(names) != 3:
        raise ValueError(f"blocks[{name!r}] must be (key, activation, value or None) layer "
                         f"names, received {names!r}")
      if names[0] is None or names[1] is None:
        raise ValueError(f"blocks[{name!r}] needs a key and an activation layer, received "
                         f"{names!r}")
      key, activation, value = (None if layer_name is None else model.get_layer(layer_name)
                                for layer_name in names)
      for role, layer in (("key", key), ("value", value)):
        if layer is not None and not _is_linear_dense(layer):
          raise ValueError(f"blocks[{name!r}]: the {role} layer {layer.name!r} must be a "
                           "dense layer without activation")
      found.append(MLPBlock(name, key, activation, value))
  else:
    for layer in model.layers:
      if not hasattr(layer, "habitat"):
        continue
      key = _producer(layer)
      if key is None or not _is_linear_dense(key):
        continue
      consumers = _consumers(layer)
      value = consumers[0] if len(consumers) == 1 and _is_linear_dense(consumers[0]) else None
      found.append(MLPBlock(_block_name(layer.name), key, layer, value))
  if not found:
    raise ValueError(f"model {model.name!r} has no MLP block (a dense layer feeding an "
                     "activation layer); pass blocks= to name them")
  return found


# ----------------------------------------------------------------------------
# The measurement.


def per_example_cross_entropy(y, logits):
  """Softmax cross-entropy per example: int labels [B] or soft labels [B, classes]."""
  logits = tf.cast(logits, tf.float32)
  if y.dtype.is_integer:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                          logits=logits)
  return tf.nn.softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.float32), logits=logits)


def _labels_of(y):
  """Class indices of int labels [B] or of one-hot / soft labels [B, classes]."""
  if y.dtype.is_integer:
    return tf.cast(tf.reshape(y, [-1]), tf.int64)
  return tf.argmax(y, axis=-1)


def _tokens(x):
  """[B, ..., d] as float32 [B, T, d] (T = 1 for [B, d])."""
  x = tf.cast(x, tf.float32)
  return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])


def _squared_norms(x):
  """||x_{b,t}||^2 over the feature axis, float64 [B, T]."""
  return tf.cast(tf.reduce_sum(tf.square(x), axis=-1), tf.float64)


class _Tap:
  """A weight-sharing functional model returning the logits and the blocks' tensors."""

  def __init__(self, model: keras.Model, blocks: Sequence[MLPBlock]):
    try:
      single = len(model.inputs) == 1 and len(model.outputs) == 1
    except (AttributeError, TypeError, ValueError):
      single = False
    if not single:
      raise ValueError(f"augmented_flatness needs a functional model with one input and one "
                       f"output, received {model!r}")
    tensors, self._index = [], {}

    def add(tensor):
      if id(tensor) not in self._index:
        self._index[id(tensor)] = len(tensors)
        tensors.append(tensor)
      return self._index[id(tensor)]

    add(model.outputs[0])
    self.slots = []
    for block in blocks:
      slots = {"key_input": add(block.key.input), "key_output": add(block.key.output),
               "activation": add(block.activation.output)}
      if block.value is not None:
        slots["value_input"] = add(block.value.input)
        slots["value_output"] = add(block.value.output)
      self.slots.append(slots)
    self.model = keras.Model(model.inputs[0], tensors, name=f"{model.name}_flatness_tap")

  def __call__(self, x):
    return self.model(x, training=False)


def _check_max_iterations(max_iterations):
  if max_iterations is None:
    return None
  if (isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral)
      or max_iterations < 1):
    raise ValueError(f"max_iterations must be a positive integer or None, received "
                     f"{max_iterations!r}")
  return int(max_iterations)


def _batch_function(tap: _Tap, blocks: Sequence[MLPBlock], loss_fn: Callable,
                    correct_samples_only: bool, loss_reduction: str):
  """The compiled per-batch measurement: float64 sums per block and counts."""

  # No AutoGraph: there is no tensor-dependent control flow, and a bad
  # loss_fn then raises its one-line ValueError unwrapped.
  @tf.function(reduce_retracing=True, autograph=False)
  def measure(x, y):
    with tf.GradientTape() as tape:
      outputs = tap(x)
      logits = outputs[0]
      losses = tf.convert_to_tensor(loss_fn(y, logits))
      if losses.shape.rank != 1:
        raise ValueError(f"loss_fn must return per-example losses of shape [batch], got "
                         f"shape {losses.shape}")
      correct = tf.equal(tf.argmax(logits, axis=-1), _labels_of(y))
      keep = (tf.cast(correct, tf.float32) if correct_samples_only
              else tf.ones_like(losses, tf.float32))
      loss = tf.reduce_sum(tf.cast(losses, tf.float32) * keep)
      if loss_reduction == "mean":
        loss = loss / tf.maximum(tf.reduce_sum(keep), 1.0)
    sources = []
    for slots in tap.slots:
      sources += [outputs[slots["key_output"]], outputs[slots["activation"]]]
      if "value_output" in slots:
        sources.append(outputs[slots["value_output"]])
    gradients = tape.gradient(loss, sources)
    if any(gradient is None for gradient in gradients):
      raise ValueError("augmented_flatness: the loss does not depend on every tapped layer "
                       "output (a block outside the path to the logits?)")
    keep64 = tf.cast(keep, tf.float64)
    sums = {"examples": tf.cast(tf.size(losses), tf.float64),
            "correct": tf.reduce_sum(tf.cast(correct, tf.float64)),
            "samples": tf.reduce_sum(keep64)}
    gradients = iter(gradients)
    for block, slots in zip(blocks, tap.slots):
      key_x = _tokens(outputs[slots["key_input"]])
      key_g = _tokens(next(gradients))
      activation = _tokens(outputs[slots["activation"]])
      activation_g = _tokens(next(gradients))
      key_x2 = _squared_norms(key_x)  # [B, T]
      per_sample = tf.reduce_sum(_squared_norms(key_g) * key_x2, axis=1)
      active = tf.cast(activation > 0, tf.float64)
      coefficient = tf.cast(tf.square(activation_g), tf.float64) * active * key_x2[..., None]
      kept = keep64[:, None, None]
      tokens = tf.cast(tf.shape(activation)[1], tf.float64)
      units = tf.cast(tf.shape(activation)[2], tf.float64)
      prefix = block.name + "/"
      sums[prefix + "key"] = tf.reduce_sum(keep64 * per_sample)
      sums[prefix + "L0_sum"] = tf.reduce_sum(kept * coefficient)
      sums[prefix + "L0_active"] = tf.reduce_sum(kept * active)
      sums[prefix + "entries"] = sums["samples"] * tokens * units
      if "value_output" in slots:
        value_x2 = _squared_norms(_tokens(outputs[slots["value_input"]]))
        value_g2 = _squared_norms(_tokens(next(gradients)))
        activation2 = _squared_norms(activation)
        kept = keep64[:, None]
        sums[prefix + "value"] = tf.reduce_sum(keep64 * tf.reduce_sum(value_g2 * value_x2, 1))
        sums[prefix + "L2"] = tf.reduce_sum(kept * value_g2)
        sums[prefix + "a2"] = tf.reduce_sum(kept * activation2)
        sums[prefix + "L2_term"] = tf.reduce_sum(kept * activation2 * value_g2)
        sums[prefix + "tokens"] = sums["samples"] * tokens
    return sums

  return measure


def _ratio(numerator, denominator):
  return float(numerator / denominator) if denominator > 0 else math.nan


def augmented_flatness(model: keras.Model, dataset_batches: Iterable, *,
                       loss_fn: Optional[Callable] = None, correct_samples_only: bool = False,
                       max_iterations: Optional[int] = None, loss_reduction: str = "sum",
                       blocks: Optional[Mapping[str, Tuple[str, str, Optional[str]]]] = None
                       ) -> Results:
  """Augmented flatness and the L0 / L2 coefficient terms of every MLP block (spec 2.3).

  A pure measurement (learning rate 0 and weight decay 0: nothing changes):
  see the module docstring for the formulas.

  Args:
    model: a functional `keras.Model` with one input and one output (logits),
      or a wrapper with such a `network` (`RobustModel`).
    dataset_batches: an iterable of `(x, y, ...)` batches (a `tf.data.Dataset`,
      a list of arrays); `y` int labels [B] or one-hot / soft labels [B, C].
    loss_fn: `loss_fn(y, logits) -> per-example losses [B]`; default
      softmax cross-entropy (`per_example_cross_entropy`). Keras losses with
      `reduction=None` fit.
    correct_samples_only: measure only the samples the model classifies
      correctly (argmax of the logits equals the label's).
    max_iterations: measure at most this many batches; None: all.
    loss_reduction: "sum" (default: G of each sample's own loss) or "mean"
      (G of the batch-mean loss over the measured samples, as the seed's
      hooks).
    blocks: explicit blocks, as `mlp_blocks`; default: found from the graph.

  Returns:
    {block: {term: value}} for every block (the `KEY_TERMS`, plus the
    `VALUE_TERMS` where the block has a value layer), `AVERAGE`: each term's
    mean over the blocks that have it, and `SUMMARY`: `batches`, `examples`
    (seen), `samples` (measured), `accuracy` (correct / examples). Values
    are NaN where no sample was measured.

  Raises:
    ValueError: max_iterations not a positive integer, an unknown
      loss_reduction, a model without MLP blocks or not functional, no
      batches, a loss_fn that does not return per-example losses.
  """
  max_iterations = _check_max_iterations(max_iterations)
  if loss_reduction not in LOSS_REDUCTIONS:
    raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, received "
                     f"{loss_reduction!r}")
  network = _network(model)
  found = mlp_blocks(network, blocks)
  tap = _Tap(network, found)
  measure = _batch_function(tap, found, loss_fn or per_example_cross_entropy,
                            bool(correct_samples_only), loss_reduction)
  totals: Dict[str, float] = {}
  batches = 0
  for batch in itertools.islice(dataset_batches, max_iterations):
    x, y = batch[0], batch[1]
    sums = measure(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
    for name, value in sums.items():
      totals[name] = totals.get(name, 0.0) + float(value.numpy())
    batches += 1
  if not batches:
    raise ValueError("dataset_batches gave no batches to measure")

  results: Results = {}
  samples = totals["samples"]
  for block in found:
    prefix = block.name + "/"
    terms = {
        "key": _ratio(totals[prefix + "key"], samples),
        "L0_sum": _ratio(totals[prefix + "L0_sum"], totals[prefix + "entries"]),
        "L0_weight": _ratio(totals[prefix + "L0_active"], totals[prefix + "entries"]),
        "L0_preview": _ratio(totals[prefix + "L0_sum"], totals[prefix + "L0_active"]),
    }
    if block.value is not None:
      terms["value"] = _ratio(totals[prefix + "value"], samples)
      for term in ("L2", "a2", "L2_term"):
        terms[term] = _ratio(totals[prefix + term], totals[prefix + "tokens"])
    results[block.name] = {term: terms[term] for term in TERMS if term in terms}
  average = {}
  for term in TERMS:
    values = [terms[term] for terms in results.values() if term in terms]
    if values:
      average[term] = float(np.mean(values))
  results[AVERAGE] = average
  results[SUMMARY] = {"batches": float(batches), "examples": totals["examples"],
                      "samples": samples,
                      "accuracy": _ratio(totals["correct"], totals["examples"])}
  return results


# ----------------------------------------------------------------------------
# Files and the figure.


def write_csv(results: Results, path: Union[str, os.PathLike]) -> str:
  """Writes `results` as `block,term,value` rows (one per block and term); returns the path."""
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(CSV_COLUMNS)
    for block, terms in results.items():
      for term, value in terms.items():
        writer.writerow([block, term, repr(float(value))])
  return os.fspath(path)


def read_csv(path: Union[str, os.PathLike]) -> Results:
  """Reads a `write_csv` file back into {block: {term: value}}.

  Raises:
    ValueError: a file without the `block,term,value` header.
  """
  with open(path, newline="") as handle:
    reader = csv.reader(handle)
    header = next(reader, None)
    if header is None or tuple(header) != CSV_COLUMNS:
      raise ValueError(f"path {os.fspath(path)!r} is not an augmented-flatness CSV (header "
                       f"{header!r}, expected {','.join(CSV_COLUMNS)})")
    results: Results = {}
    for block, term, value in reader:
      results.setdefault(block, {})[term] = float(value)
  return results


def plot_augmented_flatness(checkpoints, path: Optional[Union[str, os.PathLike]] = None, *,
                            blocks: Sequence[str] = (AVERAGE,),
                            terms: Sequence[str] = FIGURE_TERMS, xlabel: str = "epoch",
                            title: Optional[str] = None):
  """The paper's figure: terms against checkpoints, log y, one line per block and term.

  The seed's notebook averages the keys (AS_k) and values (AS_v) over layers
  and plots them with the L0 and L2 coefficients: the defaults. Points that
  are NaN or not positive (no place on a log axis) are left out.

  Args:
    checkpoints: {x: results or CSV path} or a sequence of (x, results or
      CSV path) pairs; x is the checkpoint's epoch (or step), the x axis.
    path: where to save the figure (format from the suffix); None: not saved.
    blocks: the blocks to draw (`AVERAGE` is the mean over blocks).
    terms: the terms to draw for each block.
    xlabel: the x axis' label.
    title: the figure's title.

  Returns:
    The `matplotlib.figure.Figure` (drawn with the Agg canvas, no pyplot).

  Raises:
    ValueError: no checkpoints, or no point to draw.
  """
  items = sorted(dict(checkpoints).items(), key=lambda item: item[0])
  if not items:
    raise ValueError("checkpoints must name at least one checkpoint's results")
  loaded = [(x, results if isinstance(results, Mapping) else read_csv(results))
            for x, results in items]
  # The object-oriented API with the Agg canvas: no pyplot, no global backend;
  # imported here, since matplotlib costs a run that draws nothing 0.2 s.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(6.4, 4.2))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot(1, 1, 1)
  lines = 0
  for block in blocks:
    for term in terms:
      points = [(float(x), results.get(block, {}).get(term, math.nan)) for x, results in loaded]
      points = [(x, y) for x, y in points if math.isfinite(y) and y > 0]
      if not points:
        continue
      xs, ys = zip(*points)
      axes.plot(xs, ys, marker="o", label=f"{block} {term}")
      lines += 1
  if not lines:
    raise ValueError(f"no positive value of terms {list(terms)} for blocks {list(blocks)} "
                     "in the checkpoints")
  axes.set_yscale("log")
  axes.set_xlabel(xlabel)
  axes.set_ylabel("augmented flatness / coefficient")
  if title:
    axes.set_title(title)
  axes.grid(True, which="both", alpha=0.3)
  axes.legend(fontsize="small")
  figure.tight_layout()
  if path is not None:
    directory = os.path.dirname(os.fspath(path))
    if directory:
      os.makedirs(directory, exist_ok=True)
    figure.savefig(path)
  return figure
