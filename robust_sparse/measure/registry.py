"""The measurements' registry: what each `--measure` name reads from the model, and how.

Every measurement the training step feeds is one `Measurement` subclass,
registered in its own module (a family: one or more `--measure` names that
share their taps and accumulators, built once for the names chosen):

  @MEASUREMENTS.register("saturation")
  class Saturation(Measurement):
    position = 0

    def __init__(self, model, chosen, options):
      self.tracker = SaturationTracker.for_model(model, ...)
      self.taps = [layer.output for layer in tapped_layers(model)]

and declares there its taps (`taps`: the tensors of the model it needs, which
the weight-sharing tap model outputs so the step's own forward pass computes
them; `gradient_taps`: those of its taps whose gradients of the training
objective it also needs) and how it consumes them (`update(taps, gradients,
split)` gets exactly its own slice), beside its checkpointed `variables` and
its CSV `columns()` / `results()` / `reset()`.
`measurements.Measurements` composes the chosen families in `position` order
(then by name) by iterating over them and slicing the taps by each one's
declared count; nobody writes an offset. The families' modules register on
import: `measurements.py` imports each of them (a new measurement adds its
module there).

Pure Python, so any module of `robust_sparse.measure` may import it.
"""

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

from robust_sparse.core.registry import Registry

@dataclasses.dataclass(frozen=True)
class MeasureOptions:
  """The `--measure` options, given to every family (each reads its own).

  Attributes:
    delta, downsampling, rule: saturation's (see `saturation.SaturationTracker`).
    log_every: activation measurements take every this-many-th training step
      counted from the last `reset()` (1: every step).
    max_samples: activation measurements use the first this many examples of
      each batch.
  """
  delta: float
  downsampling: Optional[int]
  rule: str
  log_every: int
  max_samples: int


class Measurement:
  """One family of `--measure` names behind its own taps; the base of every entry.

  Subclasses set the class attributes and, in `__init__(model, chosen,
  options)`, the instance attributes:

  Attributes:
    names: the `--measure` names the family answers, in order (default: the
      name it is registered under).
    position: where the family goes among the chosen ones (its taps, variables
      and columns): lower first, then by registered name. The built-in ones use
      0 (saturation) and 1 (activation); the default puts a new family after them.
    taps: the Keras tensors of `model` it reads (set by `__init__`).
    gradient_taps: indices into `taps` whose gradients of the training
      objective it needs on training batches (set by `__init__`; none by default).
  """

  names: Tuple[str, ...] = ()
  position: int = 100
  taps: Sequence = ()
  gradient_taps: Tuple[int, ...] = ()

  def __init__(self, model, chosen: Sequence[str], options: MeasureOptions):
    """Builds the accumulators (outside any `tf.function`).

    Args:
      model: the functional Keras model measured (logits out).
      chosen: the family's names that `--measure` chose, in the order given.
      options: the `--measure` options.
    """
    del model, chosen, options

  @property
  def variables(self) -> list:
    """Every accumulator variable, in a stable order (the engine checkpoints them)."""
    return []

  def update(self, taps: list, gradients: Optional[list], split: str) -> None:
    """Adds one batch; graph-safe.

    Args:
      taps: the values of `taps`, in order.
      gradients: on training batches of a family with `gradient_taps`, the
        gradients at those taps, in order; else None.
      split: "train" or "eval".
    """
    raise NotImplementedError

  def columns(self) -> List[str]:
    """The keys of `results()`, in order."""
    raise NotImplementedError

  def results(self) -> Dict[str, float]:
    """{column: value} since the last `reset()`."""
    raise NotImplementedError

  def reset(self) -> None:
    """Zeroes every accumulator."""
    raise NotImplementedError


MEASUREMENTS: Registry[type] = Registry("measurement")


def families() -> List[str]:
  """The registered families, in composition order (`position`, then name)."""
  return sorted(MEASUREMENTS.names(), key=lambda name: (MEASUREMENTS.get(name).position, name))


def names_of(family: str) -> Tuple[str, ...]:
  """The `--measure` names of `family`."""
  return tuple(MEASUREMENTS.get(family).names) or (family,)


def known() -> Tuple[str, ...]:
  """Every `--measure` name, in composition order."""
  return tuple(name for family in families() for name in names_of(family))
