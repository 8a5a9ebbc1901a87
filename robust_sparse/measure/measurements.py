"""The runner's `--measure` list as one measurement object for the engine.

`robust_sparse.training.engine.Engine` takes one measurement: an object with
`tap_model` (the weight-sharing model the training step and the test-set
evaluation run through), `update(outputs, split)`, `variables` (checkpointed)
and, for the runner, `columns()`, `results()` and `reset()`. `Measurements`
combines the trackers that `--measure` names behind that contract:

  * `saturation`: a `saturation.SaturationTracker` of every conv and dense
    layer (train and eval splits, every batch), exactly as when it is alone;
  * `activation_sparsity`, `effective_gradient_sparsity`,
    `spectral_increase`: `activation_stats.ActivationStatistics` of every
    activation layer (layers with a `habitat`). Training batches feed "train"
    (the first <= 1024 natural examples, every `log_every`-th step counted
    from the last `reset()`, i.e. from each evaluation); test-set evaluation
    batches feed "eval" with the forward measurements only, as evaluation
    has no backward pass.

The tap model's outputs are `[logits] + saturation taps + every activation's
input + every activation's output`. When a gradient measurement is chosen it
carries `gradient_taps`, the indices of the activation outputs among the
taps, so `steps.loss_and_gradients` also returns g = dObjective/d(activation
output) from the tape that computes the weights' gradients, and the training
step appends those gradients to the taps it passes to `update`. g is the
gradient of the training objective (the batch mean of the, possibly label
smoothed, cross-entropy; with `--adv_train` the mixed loss over the natural
and adversarial halves), as the seed's backward hooks see it.

Columns (`columns()`, the keys of `results()`): saturation's own
(`train-saturation_<layer>`, ...), then per split `train`/`eval` the
`ActivationStatistics` metrics with '/' read as '_':
`train-activation_sparsity_<layer>`, `train-pre_activation_concentration_
<layer>`, `train-mean_squared_derivative_<layer>`,
`train-effective_gradient_sparsity_<p>_<layer>` (p in 1e-09, 1e-06, 0.001),
`train-spectral_increase_kkT_<layer>`, `train-spectral_increase_M_<layer>`,
each also with `<layer>` = `average` (the mean over layers); `eval-` columns
for the three forward metrics only.
"""

from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from robust_sparse.measure import activation_stats
from robust_sparse.measure import saturation as saturation_lib

SATURATION = "saturation"
ACTIVATION_MEASUREMENTS = activation_stats.MEASUREMENTS
MEASUREMENTS = (SATURATION,) + ACTIVATION_MEASUREMENTS
SPLITS = ("train", "eval")
_FORWARD = ("activation_sparsity",)


def check_names(names: Sequence[str]) -> tuple:
  """The measurement names, duplicates dropped, in the order given.

  Raises:
    ValueError: an unknown name (naming `--measure` and the known ones).
  """
  names = tuple(dict.fromkeys(names))
  unknown = [name for name in names if name not in MEASUREMENTS]
  if unknown:
    raise ValueError(f"--measure={','.join(names)}: unknown {', '.join(unknown)}; known: "
                     f"{', '.join(MEASUREMENTS)}")
  return names


def _column(split: str, key: str) -> str:
  metric, layer = key.rsplit("/", 1)
  return f"{split}-{metric.replace('/', '_')}_{layer}"


class Measurements:
  """Saturation and activation measurements of one model behind the engine's contract.

  Build it (like the model) outside any `tf.function`: the accumulators'
  variables are created here.

  Args:
    model: a functional Keras model (logits out).
    names: the measurements (`MEASUREMENTS`), e.g. `hp.measure`.
    delta, downsampling, rule: saturation's (see `saturation.SaturationTracker`).
    log_every: activation measurements take every this-many-th training step
      counted from the last `reset()` (1: every step); saturation takes all.
    max_samples: activation measurements use the first this many examples
      of each batch (the seed's 1024).

  Attributes:
    tap_model: the weight-sharing tap model (see the module docstring).
    saturation: the `SaturationTracker`, or None.
    statistics: {"train": ActivationStatistics, "eval": ...}; a split is
      absent when none of its measurements is chosen.
    activation_names: the tapped activation layers' names.

  Raises:
    ValueError: unknown names, no activation layers for an activation
      measurement, log_every < 1, or what the trackers refuse.
  """

  def __init__(self, model: keras.Model, names: Sequence[str], *, delta: float = 0.99,
               downsampling: Optional[int] = None, rule: str = "delve", log_every: int = 1,
               max_samples: int = activation_stats.MAX_SAMPLES):
    self.names = check_names(names)
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
      raise ValueError(f"--log_every must be a positive integer, received {log_every!r}")
    self.log_every = log_every
    outputs = [model.outputs[0]]
    self.saturation = None
    self._saturation_count = 0
    if SATURATION in self.names:
      self.saturation = saturation_lib.SaturationTracker.for_model(
          model, delta=delta, downsampling=downsampling, rule=rule)
      layers = saturation_lib.tapped_layers(model)
      outputs += [layer.output for layer in layers]
      self._saturation_count = len(layers)

    chosen = [name for name in self.names if name in ACTIVATION_MEASUREMENTS]
    self.statistics: Dict[str, activation_stats.ActivationStatistics] = {}
    self.activation_names: List[str] = []
    self._activation_count = 0
    self._step = None
    gradient_taps = ()
    if chosen:
      activations = activation_stats.activation_layers(model)
      if not activations:
        raise ValueError(f"--measure={','.join(chosen)}: model {model.name!r} has no "
                         "activation layers (layers with a habitat) to measure")
      tap = activation_stats.ActivationTap(model, activations)
      self._tap = tap
      self.activation_names = tap.names
      count = self._activation_count = len(activations)
      outputs += [layer.input for layer in activations] + [layer.output for layer in activations]
      self.statistics["train"] = tap.statistics(measure=chosen, max_samples=max_samples)
      forward = [name for name in chosen if name in _FORWARD]
      if forward:
        self.statistics["eval"] = tap.statistics(measure=forward, max_samples=max_samples)
      if len(forward) < len(chosen):
        gradient_taps = tuple(range(self._saturation_count + count,
                                    self._saturation_count + 2 * count))
      self._step = keras.Variable(0, dtype="int64", trainable=False,
                                  name="activation_measure_step")
    self.tap_model = keras.Model(model.inputs[0], outputs, name=f"{model.name}_measure_taps")
    # Read by `steps.loss_and_gradients`: the taps whose gradients the step returns.
    self.tap_model.gradient_taps = gradient_taps
    self._gradients = bool(gradient_taps)

  @property
  def variables(self) -> list:
    """Every accumulator variable (saturation's first, so its checkpoints keep their names)."""
    variables = list(self.saturation.variables) if self.saturation is not None else []
    for split in SPLITS:
      if split in self.statistics:
        variables += self.statistics[split].variables()
    if self._step is not None:
      variables.append(self._step)
    return variables

  def _feed_activations(self, taps, split):
    count = self._activation_count
    pre = taps[:count]
    post = taps[count:2 * count]
    statistics = self.statistics.get(split)
    if statistics is None:
      return
    if split == "eval":
      statistics.update(pre, outputs=post)
      return
    gradients = taps[2 * count:] if self._gradients else None
    if self._gradients and len(gradients) != count:
      raise ValueError(f"the gradient measurements need the gradients at the {count} "
                       f"activation outputs after the taps, received {len(gradients)}; the "
                       "step must run through `tap_model` with `steps.loss_and_gradients`")

    def feed():
      statistics.update(pre, outputs=post, output_gradients=gradients,
                        key_kernels=self._tap.key_kernels() if self._gradients else None)
      return tf.constant(True)

    if self.log_every == 1:
      feed()
    else:
      due = tf.equal(tf.math.floormod(tf.convert_to_tensor(self._step), self.log_every), 0)
      tf.cond(due, feed, lambda: tf.constant(False))
    self._step.assign_add(1)

  def update(self, outputs, split) -> None:
    """Adds one batch's taps (`tap_model`'s outputs[1:], then any tap gradients); graph-safe.

    Args:
      outputs: the taps in `tap_model` order; training batches with a
        gradient measurement append the gradients at the activation outputs.
      split: "train" or "eval".

    Raises:
      ValueError: an unknown split or the wrong number of tensors.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, received split={split!r}")
    outputs = list(outputs)
    if self.saturation is not None:
      self.saturation.update(outputs[:self._saturation_count], split)
    if self._activation_count:
      self._feed_activations(outputs[self._saturation_count:], split)

  def columns(self) -> List[str]:
    """The keys of `results()`, in order."""
    columns = list(self.saturation.columns()) if self.saturation is not None else []
    for split in SPLITS:
      if split in self.statistics:
        columns += [_column(split, key)
                    for key in self.statistics[split].result_tensors()]
    return columns

  def results(self) -> Dict[str, float]:
    """{column: value} since the last `reset()`; NaN where a split saw no batch."""
    values = dict(self.saturation.results()) if self.saturation is not None else {}
    for split in SPLITS:
      if split in self.statistics:
        values.update({_column(split, key): value
                       for key, value in self.statistics[split].results().items()})
    return values

  def reset(self) -> None:
    """Zeroes every accumulator and the `log_every` step count."""
    if self.saturation is not None:
      self.saturation.reset()
    for statistics in self.statistics.values():
      statistics.reset()
    if self._step is not None:
      self._step.assign(0)
