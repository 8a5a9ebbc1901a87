"""The lottery-ticket search as a Keras callback: train, prune, rewind, repeat, inside `fit`.

`LotteryTicket` runs iterative magnitude pruning (Frankle & Carbin 2019) in a
researcher's own `model.fit`, with the runner's rules: a level trains for
`epochs_per_round` epochs; at its end the smallest-magnitude unpruned weights
go (`keras_pruning.prune_low_magnitude`: `round(rate * active)` per layer, the
last masked layer at `output_rate`, or globally), then every weight of the
model is rewound and the next level trains with the new masks:

  * `rewind_to="init"` (the default; the paper's reset and the runner's
    `reinit_orig`): the weights `fit` started from;
  * `rewind_to=k` (an int): the weights after the first k training batches of
    the first level (OpenLTH's rewinding, the runner's `rewind`);
  * `rewind_to=None`: no rewind, training continues from the pruned trained
    weights (the runner's `reinit_none`).

A rewind restores every model variable but the masks (batch-norm statistics
too), times the new masks, so the ticket is `initial weights * mask`; each
optimizer gets back the state it had when `fit` began (fresh slots, as the
runner gives each level a fresh optimizer), with its iteration count (and a
`RobustModel`'s `step_iteration`, which its schedule reads) at the rewind point,
so a learning-rate schedule restarts there. The masks hold during training
through the masked layers' kernel constraint.

  ticket = LotteryTicket(prune_rate=0.2, rounds=3)   # 4 levels
  model.fit(train, epochs=4 * 2, callbacks=[ticket])  # 2 epochs per level
  ticket.levels  # per level: percent remaining, per-layer counts, last epoch's logs
"""

from typing import Dict, List, Optional, Union

import keras
import numpy as np

from robust_sparse.nn import keras_pruning
from robust_sparse.nn.layers import enforce_masks, masked_layers
from robust_sparse.nn.pruning import SCOPES

INIT = "init"


class LotteryTicket(keras.callbacks.Callback):
  """Iterative magnitude pruning with rewinding, one level per `epochs_per_round` epochs.

  Fit for `(rounds + 1) * epochs_per_round` epochs: level 0 trains the model
  as it is (dense, or with the masks it has), each of the `rounds` later
  levels after one pruning step and a rewind. After the last level nothing is
  pruned. Put it before callbacks that read the model's weights at the end
  of an epoch: they then see the pruned, rewound weights.

  Args:
    prune_rate: fraction in [0, 1] of the unpruned weights each step removes
      (every masked layer but the last, or all with global scope); the
      seed's 0.2.
    rounds: pruning steps (>= 1).
    output_rate: the last masked layer's rate with layer scope (the seed's
      0.1, half the hidden rate); unused with global scope, as the runner's
      `--prune_rate_output` with `--prune_scope=global`.
    scope: "layer" or "global".
    rewind_to: "init", a number of training batches k >= 0 (0 is "init"),
      or None (no rewind); see the module docstring.
    epochs_per_round: epochs per level; None: `fit`'s `epochs` divided by
      `rounds + 1`.
    layers: names of the masked layers to prune; None: all.
    verbose: 1 prints each level's sparsity report.

  Attributes:
    levels: one dict per finished level: `level`, `percent_remaining`,
      `remaining` ({layer: unpruned weights}) and `logs` (its last epoch's).

  Raises:
    ValueError: bad arguments here; at `fit`: a model without masked layers,
      `epochs` that are not `(rounds + 1) * epochs_per_round`, or a rewind
      point the first level does not reach or that `steps_per_execution` skips.
  """

  def __init__(self, prune_rate: float = 0.2, *, rounds: int, output_rate: float = 0.1,
               scope: str = "layer", rewind_to: Union[str, int, None] = INIT,
               epochs_per_round: Optional[int] = None, layers=None, verbose: int = 0):
    super().__init__()
    for label, value in (("prune_rate", prune_rate), ("output_rate", output_rate)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"LotteryTicket {label} must be in [0, 1], received {value!r}")
    if scope not in SCOPES:
      raise ValueError(f"LotteryTicket scope must be one of {', '.join(SCOPES)}, received "
                       f"{scope!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
      raise ValueError(f"LotteryTicket rounds must be an integer >= 1, received {rounds!r}")
    if rewind_to == INIT:
      rewind_to = 0
    if rewind_to is not None and (isinstance(rewind_to, bool) or not isinstance(rewind_to, int)
                                  or rewind_to < 0):
      raise ValueError(f"LotteryTicket rewind_to must be 'init', an integer >= 0 (training "
                       f"batches) or None, received {rewind_to!r}")
    if epochs_per_round is not None and (isinstance(epochs_per_round, bool) or not isinstance(
        epochs_per_round, int) or epochs_per_round < 1):
      raise ValueError(f"LotteryTicket epochs_per_round must be an integer >= 1, received "
                       f"{epochs_per_round!r}")
    self.prune_rate = prune_rate
    self.output_rate = output_rate
    self.rounds = rounds
    self.scope = scope
    self.rewind_to = rewind_to
    self.epochs_per_round = epochs_per_round
    self.layers = None if layers is None else list(layers)
    self.verbose = verbose
    self.levels: List[Dict] = []
    self._rewind_point = None  # [(variable, value)] once saved.
    self._optimizers = []  # [(optimizer, [initial values])]

  # ---- what is rewound -----------------------------------------------------------
  def _weights(self):
    """Every model variable but the masks."""
    masks = {id(layer.mask) for layer in masked_layers(self.model)}
    return [v for v in self.model.variables if id(v) not in masks]

  def _all_optimizers(self):
    optimizers = [getattr(group, "optimizer", None)
                  for group in getattr(self.model, "groups", None) or []]  # A RobustModel's.
    optimizers.append(getattr(self.model, "optimizer", None))
    unique = []
    for optimizer in optimizers:
      if optimizer is not None and all(optimizer is not o for o in unique):
        unique.append(optimizer)
    return unique

  def _save_rewind_point(self):
    self._rewind_point = [(v, np.array(v.numpy(), copy=True)) for v in self._weights()]

  # ---- Keras hooks ---------------------------------------------------------------
  def on_train_begin(self, logs=None):
    keras_pruning._checked_layers(self.model, self.layers)  # pylint: disable=protected-access
    epochs = self.params.get("epochs")
    per_round = self.epochs_per_round
    if per_round is None:
      if epochs is None or epochs % (self.rounds + 1):
        raise ValueError(f"LotteryTicket with rounds={self.rounds} needs fit's epochs to be a "
                         f"multiple of {self.rounds + 1} (one part per level), received "
                         f"epochs={epochs}; or pass epochs_per_round")
      per_round = epochs // (self.rounds + 1)
    elif epochs is not None and epochs != per_round * (self.rounds + 1):
      raise ValueError(f"LotteryTicket with rounds={self.rounds} and epochs_per_round="
                       f"{per_round} needs fit(epochs={per_round * (self.rounds + 1)}), "
                       f"received epochs={epochs}")
    self._per_round = per_round
    self._level = 0
    self._iteration = 0
    self._epoch_start = 0
    self.levels = []
    self._rewind_point = None
    enforce_masks(self.model)
    self._optimizers = [(o, [np.array(v.numpy(), copy=True) for v in o.variables])
                        for o in self._all_optimizers()]
    if self.rewind_to == 0:
      self._save_rewind_point()

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch_start = self._iteration

  def on_train_batch_end(self, batch, logs=None):
    # With steps_per_execution > 1, `batch` is the last of the executed steps.
    self._iteration = self._epoch_start + batch + 1
    if self._rewind_point is None and self.rewind_to is not None:
      if self._iteration == self.rewind_to:
        self._save_rewind_point()
      elif self._iteration > self.rewind_to:
        raise ValueError(f"LotteryTicket rewind_to={self.rewind_to}: fit ran batches in steps "
                         f"of steps_per_execution and never stopped at batch "
                         f"{self.rewind_to}; choose a multiple of steps_per_execution")

  def on_epoch_end(self, epoch, logs=None):
    if (epoch + 1) % self._per_round:
      return
    report = keras_pruning.sparsity_report(self.model)
    self.levels.append(dict(level=self._level, percent_remaining=report.percent_remaining,
                            remaining={name: remaining
                                       for name, (remaining, _) in report.layers.items()},
                            logs=dict(logs or {})))
    if self.verbose:
      print(f"\nlottery ticket: level {self._level} trained at "
            f"{report.percent_remaining:.2f} % of the weights")
    if self._level >= self.rounds:
      return
    if self.rewind_to is not None and self._rewind_point is None:
      raise ValueError(f"LotteryTicket rewind_to={self.rewind_to}: the first level ran only "
                       f"{self._iteration} training batches")
    report = keras_pruning.prune_low_magnitude(
        self.model, self.prune_rate, scope=self.scope,
        output_rate=self.output_rate if self.scope == "layer" else None, layers=self.layers)
    if self.rewind_to is not None:
      self._rewind()
    self._level += 1
    if self.verbose:
      print(f"lottery ticket: pruned to {report.percent_remaining:.2f} %\n{report}")

  def _rewind(self):
    for variable, value in self._rewind_point:
      variable.assign(value)
    enforce_masks(self.model)  # Rewound weights times the new masks.
    for optimizer, values in self._optimizers:
      for variable, value in zip(optimizer.variables, values):
        variable.assign(value)
      optimizer.iterations.assign(self.rewind_to)
    step_iteration = getattr(self.model, "step_iteration", None)  # A RobustModel's schedule.
    if step_iteration is not None:
      step_iteration.assign(self.rewind_to)
