"""The runner's `--measure` list as one measurement object for the engine.

`robust_sparse.training.engine.Engine` takes one measurement: an object with
`tap_model` (the weight-sharing model the training step and the test-set
evaluation run through), `update(outputs, split)`, `variables` (checkpointed)
and, for the runner, `columns()`, `results()` and `reset()`. `Measurements`
composes, behind that contract, the families of the measurements' registry
(`registry.MEASUREMENTS`, see `registry.py`) that `--measure` names, in their
`position` order:

  * `saturation` (`saturation.Saturation`): a `saturation.SaturationTracker`
    of every conv and dense layer (train and eval splits, every batch),
    exactly as when it is alone;
  * `activation_sparsity`, `effective_gradient_sparsity`,
    `spectral_increase` (`activation_stats.Activation`):
    `activation_stats.ActivationStatistics` of every activation layer (layers
    with a `habitat`). Training batches feed "train" (the first <= 1024
    natural examples, every `log_every`-th step counted from the last
    `reset()`, i.e. from each evaluation); test-set evaluation batches feed
    "eval" with the forward measurements only, as evaluation has no backward
    pass.

The tap model's outputs are `[logits]` followed by each family's declared
`taps` (saturation: the conv / dense outputs; activation: every activation's
input, then every activation's output). Its `gradient_taps` are the families'
own `gradient_taps` shifted to where their taps landed, so
`steps.loss_and_gradients` also returns g = dObjective/d(tap) from the tape
that computes the weights' gradients, and the training step appends those
gradients to the taps it passes to `update`; `update` hands each family its
own slice of the taps and of the gradients. g is the gradient of the training
objective (the batch mean of the, possibly label smoothed, cross-entropy; with
`--adv_train` the mixed loss over the natural and adversarial halves), as the
seed's backward hooks see it.

Columns (`columns()`, the keys of `results()`): each family's in turn:
saturation's own (`train-saturation_<layer>`, ...), then per split
`train`/`eval` the `ActivationStatistics` metrics with '/' read as '_':
`train-activation_sparsity_<layer>`, `train-pre_activation_concentration_
<layer>`, `train-mean_squared_derivative_<layer>`,
`train-effective_gradient_sparsity_<p>_<layer>` (p in 1e-09, 1e-06, 0.001),
`train-spectral_increase_kkT_<layer>`, `train-spectral_increase_M_<layer>`,
each also with `<layer>` = `average` (the mean over layers); `eval-` columns
for the three forward metrics only.
"""

from typing import Dict, List, Optional, Sequence

import keras

from robust_sparse.measure import registry
# The families register on import (a new measurement adds its module to this line).
from robust_sparse.measure import activation_stats, saturation  # noqa: F401

SPLITS = ("train", "eval")


def check_names(names: Sequence[str]) -> tuple:
  """The measurement names, duplicates dropped, in the order given.

  Raises:
    ValueError: an unknown name (naming `--measure` and the known ones).
  """
  names = tuple(dict.fromkeys(names))
  known = registry.known()
  unknown = [name for name in names if name not in known]
  if unknown:
    raise ValueError(f"--measure={','.join(names)}: unknown {', '.join(unknown)}; known: "
                     f"{', '.join(known)}")
  return names


class Measurements:
  """The chosen measurement families of one model behind the engine's contract.

  Build it (like the model) outside any `tf.function`: the accumulators'
  variables are created here.

  Args:
    model: a functional Keras model (logits out).
    names: the measurements (`registry.known()`), e.g. `hp.measure`.
    delta, downsampling, rule: saturation's (see `saturation.SaturationTracker`).
    log_every: activation measurements take every this-many-th training step
      counted from the last `reset()` (1: every step); saturation takes all.
    max_samples: activation measurements use the first this many examples
      of each batch (the seed's 1024).

  Attributes:
    tap_model: the weight-sharing tap model (see the module docstring).
    parts: {family: its `registry.Measurement`}, in composition order.
    saturation: the saturation family's `SaturationTracker`, or None.

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
    options = registry.MeasureOptions(delta=delta, downsampling=downsampling, rule=rule,
                                      log_every=log_every, max_samples=max_samples)
    self.parts: Dict[str, registry.Measurement] = {}
    outputs = [model.outputs[0]]
    gradient_taps = []
    for family in registry.families():
      chosen = [name for name in self.names if name in registry.names_of(family)]
      if not chosen:
        continue
      part = self.parts[family] = registry.MEASUREMENTS.get(family)(model, chosen, options)
      taps = list(part.taps)
      gradient_taps += [len(outputs) - 1 + i for i in part.gradient_taps]
      outputs += taps
    self._count = len(outputs) - 1
    self.tap_model = keras.Model(model.inputs[0], outputs, name=f"{model.name}_measure_taps")
    # Read by `steps.loss_and_gradients`: the taps whose gradients the step returns.
    self.tap_model.gradient_taps = tuple(gradient_taps)

  @property
  def saturation(self):
    """The `saturation.SaturationTracker` of `--measure=saturation`, or None."""
    part = self.parts.get("saturation")
    return part.tracker if part is not None else None

  @property
  def variables(self) -> list:
    """Every accumulator variable, family by family (the engine checkpoints them by index)."""
    return [variable for part in self.parts.values() for variable in part.variables]

  def update(self, outputs, split) -> None:
    """Adds one batch's taps (`tap_model`'s outputs[1:], then any tap gradients); graph-safe.

    Args:
      outputs: the taps in `tap_model` order; training batches with a
        gradient measurement append the gradients at `tap_model.gradient_taps`.
      split: "train" or "eval".

    Raises:
      ValueError: an unknown split or the wrong number of tensors.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, received split={split!r}")
    outputs = list(outputs)
    wanted = len(self.tap_model.gradient_taps) if split == "train" else 0
    count = self._count
    taps, gradients = outputs[:count], outputs[count:]
    if wanted and len(gradients) != wanted:
      raise ValueError(f"the gradient measurements need the gradients at {wanted} taps "
                       f"after the {count} taps, received {len(gradients)}; the step must "
                       "run through `tap_model` with `steps.loss_and_gradients`")
    for part in self.parts.values():
      mine, taps = taps[:len(part.taps)], taps[len(part.taps):]
      needs = len(part.gradient_taps) if wanted else 0
      part.update(mine, gradients[:needs] if needs else None, split)
      gradients = gradients[needs:]

  def columns(self) -> List[str]:
    """The keys of `results()`, in order."""
    return [column for part in self.parts.values() for column in part.columns()]

  def results(self) -> Dict[str, float]:
    """{column: value} since the last `reset()`; NaN where a split saw no batch."""
    values = {}
    for part in self.parts.values():
      values.update(part.results())
    return values

  def reset(self) -> None:
    """Zeroes every accumulator (and the `log_every` step count)."""
    for part in self.parts.values():
      part.reset()
