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

The protocol is the seed's (`imagenet1k.py: train_one_epoch` with
`--post-training-only --augmented-flatness-only`, learning rate 0 and weight
decay 0), which measures on the *training* loader in *train* mode:

  * the model runs with `training=True` (dropout on, batch normalisation on
    batch statistics), as `model.train()`; nothing is updated (no optimizer;
    non-trainable state such as batch-norm moving statistics or a `mixed`
    activation's step is restored afterwards);
  * the batches are what the caller passes: the seed's are augmented training
    batches (its augmentation, MixUp / CutMix); soft labels are turned into
    their argmax, as the seed does (`minibatch_target.argmax(dim=-1)`), and
    the default loss is cross-entropy with `label_smoothing` (the seed's
    `nn.CrossEntropyLoss(label_smoothing=...)`);
  * G is the gradient of the batch-mean loss (`loss_reduction="mean"`): with
    `correct_samples_only` the seed's `(loss * correct).mean()`, a mean over
    all B samples in which the misclassified ones count zero, so every
    gradient term is a mean over the batch with zeros for them;
  * each term is computed per batch (the hooks' `observe`) and averaged over
    the batches (the seed's loss manager, never reset in this mode); the
    per-batch accuracy is averaged likewise (`augmented_flatness_acc`);
  * with `correct_samples_only` and `divide_by_accuracy` (the default) the
    gradient terms (`key`, `value`, `L0_sum`, `L0_preview`, `L2`, `L2_term`)
    are divided by that accuracy, as the seed's notebook divides its columns
    by `augmented_flatness_acc`: a mean over the batch with zeros for the
    misclassified samples becomes a mean over the correct ones.
  * `loss_scale`: the seed runs with `--amp`, and its hooks read the gradients
    of `scaler.scale(loss)`: GradScaler's initial scale 2^16 (it grows only
    after 2000 steps, more than an epoch of CIFAR-10 at batch 128), so its
    logged gradient terms are 2^32 times the unscaled ones (and computed in
    float16). The default 1 gives the unscaled values (the paper's
    quantities); `loss_scale=65536` the logged ones.

`training=False, loss_reduction="sum", label_smoothing=0` on test batches is
the toolkit's earlier measurement (the experiment's `--flatness_data=test`):
inference mode, G of each sample's own loss (so the values do not depend on
the batch size), plain cross-entropy.

Blocks (`mlp_blocks`): every top-level registry activation layer (one with a
`habitat`) fed directly by a dense layer without its own activation (the key);
the value is the dense layer that alone consumes the activation's output, or
None. The block is named after the activation, less its `_activation`
suffix: the ViT's `block{i}_mlp` (`block{i}_mlp_key`, `_activation`,
`_value`) and the residual MLP's `block{i}` (`block{i}_dense`,
`block{i}_activation`, no value layer: the residual sum follows). Blocks
without a value layer have only the key-side terms (`key`, `L0_*`).

Usage:

  results = augmented_flatness(model, augmented_train_batches, correct_samples_only=True,
                               label_smoothing=0.11, max_iterations=128)
  results["block1_mlp"]["key"], results["average"]["value"]
  write_csv(results, "epoch_10/augmented_flatness.csv")
  plot_augmented_flatness({10: "epoch_10/augmented_flatness.csv",
                           20: "epoch_20/augmented_flatness.csv"}, "flatness.png")

Each batch is one compiled `tf.function` call (one forward and one backward
pass to the tapped layer outputs, through a weight-sharing tap model); the
batch's terms come back as float64 and are averaged over batches.
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


def per_example_cross_entropy(y, logits, label_smoothing: float = 0.0):
  """Softmax cross-entropy per example against class indices, with label smoothing.

  Int labels [B] or one-hot / soft labels [B, classes]; soft labels are turned
  into their argmax first, as the seed does before its loss
  (`minibatch_target.argmax(dim=-1)`), and the target is then
  `(1 - label_smoothing) * one_hot + label_smoothing / classes`, PyTorch's
  `cross_entropy(..., label_smoothing=...)`.
  """
  logits = tf.cast(logits, tf.float32)
  labels = _labels_of(y)
  if not label_smoothing:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32),
                                                          logits=logits)
  classes = logits.shape[-1]
  targets = (tf.one_hot(labels, classes) * (1.0 - label_smoothing)
             + label_smoothing / classes)
  return tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)


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

  def __call__(self, x, training):
    return self.model(x, training=training)


def _check_max_iterations(max_iterations):
  if max_iterations is None:
    return None
  if (isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral)
      or max_iterations < 1):
    raise ValueError(f"max_iterations must be a positive integer or None, received "
                     f"{max_iterations!r}")
  return int(max_iterations)


def _check_number(name, value, low, high=None):
  if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= low
      or (high is not None and not value <= high)):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be a number {bound}, received {value!r}")
  return float(value)


# The terms built from G (zero for the samples a correct-only loss leaves out):
# the ones the seed's notebook divides by the accuracy, and `loss_scale` scales.
GRADIENT_TERMS = ("key", "L0_sum", "L0_preview", "value", "L2", "L2_term")


def _batch_function(tap: _Tap, blocks: Sequence[MLPBlock], loss_fn: Callable,
                    correct_samples_only: bool, loss_reduction: str, training: bool,
                    loss_scale: float):
  """The compiled per-batch measurement: float64 terms per block and the batch's counts."""

  # No AutoGraph: there is no tensor-dependent control flow, and a bad
  # loss_fn then raises its one-line ValueError unwrapped.
  @tf.function(reduce_retracing=True, autograph=False)
  def measure(x, y):
    with tf.GradientTape() as tape:
      outputs = tap(x, training)
      logits = outputs[0]
      losses = tf.convert_to_tensor(loss_fn(y, logits))
      if losses.shape.rank != 1:
        raise ValueError(f"loss_fn must return per-example losses of shape [batch], got "
                         f"shape {losses.shape}")
      correct = tf.equal(tf.argmax(logits, axis=-1), _labels_of(y))
      keep = (tf.cast(correct, tf.float32) if correct_samples_only
              else tf.ones_like(losses, tf.float32))
      loss = tf.reduce_sum(tf.cast(losses, tf.float32) * keep)
      if loss_reduction == "mean":  # The seed's `(loss * correct).mean()`: over all B.
        loss = loss / tf.cast(tf.size(losses), tf.float32)
      loss = loss * loss_scale
    sources = []
    for slots in tap.slots:
      sources += [outputs[slots["key_output"]], outputs[slots["activation"]]]
      if "value_output" in slots:
        sources.append(outputs[slots["value_output"]])
    gradients = tape.gradient(loss, sources)
    if any(gradient is None for gradient in gradients):
      raise ValueError("augmented_flatness: the loss does not depend on every tapped layer "
                       "output (a block outside the path to the logits?)")
    terms = {"examples": tf.cast(tf.size(losses), tf.float64),
             "accuracy": tf.reduce_mean(tf.cast(correct, tf.float64)),
             "samples": tf.reduce_sum(tf.cast(keep, tf.float64))}
    gradients = iter(gradients)
    for block, slots in zip(blocks, tap.slots):
      # The seed's hooks, per batch: means over all B samples (and tokens, units).
      key_x2 = _squared_norms(_tokens(outputs[slots["key_input"]]))  # [B, T]
      key_g = _tokens(next(gradients))
      activation = _tokens(outputs[slots["activation"]])
      activation_g = _tokens(next(gradients))
      active = tf.cast(activation > 0, tf.float64)
      coefficient = tf.cast(tf.square(activation_g), tf.float64) * active * key_x2[..., None]
      prefix = block.name + "/"
      terms[prefix + "key"] = tf.reduce_mean(
          tf.reduce_sum(_squared_norms(key_g) * key_x2, axis=1))
      terms[prefix + "L0_sum"] = tf.reduce_mean(coefficient)
      terms[prefix + "L0_weight"] = tf.reduce_mean(active)
      terms[prefix + "L0_preview"] = terms[prefix + "L0_sum"] / terms[prefix + "L0_weight"]
      if "value_output" in slots:
        value_x2 = _squared_norms(_tokens(outputs[slots["value_input"]]))
        value_g2 = _squared_norms(_tokens(next(gradients)))
        activation2 = _squared_norms(activation)
        terms[prefix + "value"] = tf.reduce_mean(tf.reduce_sum(value_g2 * value_x2, axis=1))
        terms[prefix + "L2"] = tf.reduce_mean(value_g2)
        terms[prefix + "a2"] = tf.reduce_mean(activation2)
        terms[prefix + "L2_term"] = tf.reduce_mean(activation2 * value_g2)
    return terms

  return measure


def _ratio(numerator, denominator):
  return float(numerator / denominator) if denominator > 0 else math.nan


def augmented_flatness(model: keras.Model, dataset_batches: Iterable, *,
                       loss_fn: Optional[Callable] = None, correct_samples_only: bool = False,
                       max_iterations: Optional[int] = None, loss_reduction: str = "mean",
                       training: bool = True, label_smoothing: float = 0.0,
                       divide_by_accuracy: bool = True, loss_scale: float = 1.0,
                       blocks: Optional[Mapping[str, Tuple[str, str, Optional[str]]]] = None
                       ) -> Results:
  """Augmented flatness and the L0 / L2 coefficient terms of every MLP block (spec 2.3).

  Learning rate 0 and weight decay 0: nothing changes (non-trainable state is
  restored). The defaults are the seed's protocol; see the module docstring
  for the formulas and the protocol.

  Args:
    model: a functional `keras.Model` with one input and one output (logits),
      or a wrapper with such a `network` (`RobustModel`).
    dataset_batches: an iterable of `(x, y, ...)` batches (a `tf.data.Dataset`,
      a list of arrays); `y` int labels [B] or one-hot / soft labels [B, C].
      The seed's: augmented training batches.
    loss_fn: `loss_fn(y, logits) -> per-example losses [B]`; default
      `per_example_cross_entropy` with `label_smoothing`. Keras losses with
      `reduction=None` fit.
    correct_samples_only: only the samples the model classifies correctly
      (argmax of the logits equals the label's) enter the loss.
    max_iterations: measure at most this many batches; None: all.
    loss_reduction: "mean" (default, the seed's: G of the loss averaged over
      the batch's B samples, the left-out ones counting zero) or "sum" (G of
      each sample's own loss).
    training: call the model in training mode (the seed's `model.train()`);
      False: inference mode.
    label_smoothing: the default loss' label smoothing (the seed's CIFAR-10 and
      ImageNet runs: 0.11).
    divide_by_accuracy: with `correct_samples_only`, divide the gradient terms
      (`GRADIENT_TERMS`) by the accuracy, as the seed's notebook does.
    loss_scale: multiply the loss by this before differentiating (the seed's
      AMP loss scale, 65536, reproduces its logged values).
    blocks: explicit blocks, as `mlp_blocks`; default: found from the graph.

  Returns:
    {block: {term: value}} for every block (the `KEY_TERMS`, plus the
    `VALUE_TERMS` where the block has a value layer): each term's mean over
    the batches of its per-batch value; `AVERAGE`: each term's mean over the
    blocks that have it; `SUMMARY`: `batches`, `examples` (seen), `samples`
    (in the loss), `accuracy` (mean over batches of the batch's accuracy).

  Raises:
    ValueError: max_iterations not a positive integer, an unknown
      loss_reduction, label_smoothing outside [0, 1], loss_scale not
      positive, a model without MLP blocks or not functional, no batches, a
      loss_fn that does not return per-example losses.
  """
  max_iterations = _check_max_iterations(max_iterations)
  if loss_reduction not in LOSS_REDUCTIONS:
    raise ValueError(f"loss_reduction must be one of {', '.join(LOSS_REDUCTIONS)}, received "
                     f"{loss_reduction!r}")
  label_smoothing = _check_number("label_smoothing", label_smoothing, 0.0, 1.0)
  loss_scale = _check_number("loss_scale", loss_scale, 0.0)
  if not loss_scale > 0:
    raise ValueError(f"loss_scale must be positive, received {loss_scale!r}")
  if loss_fn is None:
    def loss_fn(y, logits):
      return per_example_cross_entropy(y, logits, label_smoothing)
  network = _network(model)
  found = mlp_blocks(network, blocks)
  tap = _Tap(network, found)
  measure = _batch_function(tap, found, loss_fn, bool(correct_samples_only), loss_reduction,
                            bool(training), loss_scale)
  # A training call may move state (batch-norm moving statistics, a `mixed`
  # activation's step): the measurement puts it back.
  state = list(network.non_trainable_variables)
  saved = [variable.numpy() for variable in state]
  totals: Dict[str, float] = {}
  batches = 0
  try:
    for batch in itertools.islice(dataset_batches, max_iterations):
      x, y = batch[0], batch[1]
      terms = measure(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
      for name, value in terms.items():
        totals[name] = totals.get(name, 0.0) + float(value.numpy())
      batches += 1
  finally:
    for variable, value in zip(state, saved):
      variable.assign(value)
  if not batches:
    raise ValueError("dataset_batches gave no batches to measure")

  accuracy = totals["accuracy"] / batches
  divisor = accuracy if correct_samples_only and divide_by_accuracy else 1.0
  results: Results = {}
  for block in found:
    prefix = block.name + "/"
    terms = {}
    for term in TERMS:
      if prefix + term in totals:
        value = totals[prefix + term] / batches
        terms[term] = _ratio(value, divisor) if term in GRADIENT_TERMS else value
    results[block.name] = terms
  average = {}
  for term in TERMS:
    values = [terms[term] for terms in results.values() if term in terms]
    if values:
      average[term] = float(np.mean(values))
  results[AVERAGE] = average
  results[SUMMARY] = {"batches": float(batches), "examples": totals["examples"],
                      "samples": totals["samples"], "accuracy": accuracy}
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
