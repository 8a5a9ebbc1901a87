"""The experiment registry (`--experiment`): what each level of a trial does.

An experiment is a class constructed from the `Hparams` with two methods:
`levels()` (how many training runs a trial has: prune iterations + 1) and
`start(level, history, fresh)`, which returns the weights a level starts from
(every model variable by path; None: `fresh`, the random initialisation built
for it) and the iteration it starts at (a rewound level resumes the data
order and the learning-rate schedule there).
`history` gives the saved weights of earlier levels (see `LevelHistory`).

The lottery experiments need nothing else. An experiment that is not weight
pruning (ReLU reduction, say) overrides the other hooks of `Experiment`,
each a no-op by default: the runner asks them how to build a level's model,
its optimizer groups and loss, how long it trains, which weights to save
on the way, what to measure at each evaluation and what to record when it
finishes; levels of one `phase` share
one compiled engine. The experiment never copies the runner's loop.
"""

import os
from typing import Callable, Dict, NamedTuple

import numpy as np

from robust_sparse.nn import pruning
from robust_sparse.core.registry import Registry
from robust_sparse.core.run_folder import (REWIND_WEIGHTS, check_matches, derived_seed,
                                           level_dir, read_hparams)

EXPERIMENTS = Registry("experiment")
REWIND_TARGETS = ("init", "trained_dense")


class Defaults(NamedTuple):
  """What the flags build for a level, for an experiment's hooks to use or extend.

  Attributes:
    groups: `() -> [OptimizerGroup]`, the weights' group of `--optimizer`,
      `--learning_rate`, `--lr_schedule`, ... over the run's length.
    loss_grad_fn: `(distill=True) -> LossGradFn`, the usual composition
      (cross-entropy, distillation from `--teacher_dir` unless `distill` is
      False, sharpness, adversarial training).
  """
  groups: Callable
  loss_grad_fn: Callable


class Experiment:
  """Base: prune after every level; subclasses choose where a level starts.

  Attributes:
    prunes: weights are pruned between levels (`--prune_rate`); False: every
      level keeps the masks its starting weights hold.
    columns: extra train.csv columns, filled by `measure`.
  """
  prunes = True
  columns = ()

  def __init__(self, hparams):
    self.hparams = hparams

  def levels(self) -> int:
    return self.hparams.prune_iters + 1

  def start(self, level, history, fresh):
    raise NotImplementedError

  # ---- hooks for experiments that are not weight pruning ------------------------
  def check(self, dataset, num_train):
    """Raises ValueError (naming the flag) for settings this experiment cannot run."""
    if self.hparams.epochs is not None and self.hparams.epochs <= 0:
      raise ValueError(f"--epochs must be > 0, got {self.hparams.epochs}")

  def phase(self, level) -> str:
    """Levels of one phase share a model and a compiled engine."""
    return "train"

  def activation(self, level, num_train) -> str:
    """The activation spec the level's model is built with."""
    return self.hparams.activation

  def model_options(self, level, num_train) -> dict:
    """Model options beyond the flags' (`models.build_model`), e.g. a LayerNorm mode."""
    return {}

  def transform_model(self, model, trial, level):
    """The model a level trains, from the registry's freshly built one."""
    return model

  def level_masks(self, trial, level, layers):
    """The masks a level trains with ({layer name: 0/1 array}), or None: the runner's
    (pruned from the previous level when `prunes`, else those the weights hold)."""
    return None

  def total_iterations(self, level, num_train) -> int:
    return self.hparams.total_iterations(num_train)

  def optimizer_groups(self, level, model, num_train, defaults: Defaults):
    """The level's optimizer groups."""
    return defaults.groups()

  def loss_grad_fn(self, level, model, defaults: Defaults):
    """The level's `LossGradFn` (of the groups without their own)."""
    return defaults.loss_grad_fn()

  def snapshots(self, level) -> Dict[int, str]:
    """{iteration: file name}: weights the loop saves in the level's folder when it
    reaches the iteration (every model variable by path, as `weights_final.npz`)."""
    return {}

  def measure(self, level, model) -> dict:
    """Values of `columns` at each evaluation."""
    return {}

  def on_evaluate(self, level, model, logs, directory):
    """Called after every evaluation (logs: every row so far, by split)."""

  def metadata(self, level, model, directory, logs) -> dict:
    """Extra fields of the level's `metadata.json`."""
    return {}

  def after_run(self, runner):
    """Work once all levels are done; returns a line to print last, or None."""
    return None


class MaskPhaseExperiment(Experiment):
  """Two levels: a mask phase of `--mask_epochs` (level 0), then fine-tuning (level 1).

  The shape of ReLU reduction (AutoReP) and HYDRA: level 0 learns which units
  or weights to keep, with its own optimizer groups; level 1 trains the kept
  ones for the run's epochs with the usual groups.
  """

  # How `--mask_epochs`' error message names the mask phase.
  mask_phase = "the mask phase"

  def levels(self) -> int:
    return 1 if self.hparams.epochs == 0 else 2  # --epochs=0: the mask phase alone.

  def check(self, dataset, num_train):
    hp = self.hparams
    if hp.epochs is not None and hp.epochs < 0:
      raise ValueError(f"--epochs must be >= 0 (0: no fine-tuning), got {hp.epochs}")
    if not hp.mask_epochs > 0:
      raise ValueError(f"--mask_epochs ({self.mask_phase}) must be > 0, got {hp.mask_epochs}")

  def total_iterations(self, level, num_train) -> int:
    hp = self.hparams
    if level == 0:
      return max(1, int(round(hp.mask_epochs * hp.steps_per_epoch(num_train))))
    return hp.total_iterations(num_train)

  def optimizer_groups(self, level, model, num_train, defaults: Defaults):
    if level == 1:
      return defaults.groups()
    return self.mask_phase_groups(model, num_train, defaults)

  def mask_phase_groups(self, model, num_train, defaults: Defaults):
    """Level 0's optimizer groups."""
    raise NotImplementedError

class Measurement(Experiment):
  """An experiment with no training level: its work is done in `after_run`."""
  prunes = False

  def levels(self):
    return 0

  def check(self, dataset, num_train):
    pass


@EXPERIMENTS.register("train")
@EXPERIMENTS.register("no_pruning")
class Train(Experiment):
  """Plain training: the dense network once, one level, no pruning.

  Registered twice: `no_pruning` (the lottery studies' dense baseline) and
  `train` (the name the non-lottery studies, e.g. the CIFAR protocols, use).
  """

  def levels(self):
    return 1

  def start(self, level, history, fresh):
    return None, 0


@EXPERIMENTS.register("reinit_orig")
class ReinitOriginal(Experiment):
  """The lottery ticket: each pruned network restarts from the dense network's init.

  `rewind_to="trained_dense"` reproduces the seed's released code, which by
  mistake restarts from the *trained* dense weights (spec 1.4 [BUG]).
  """

  def start(self, level, history, fresh):
    if level == 0:
      return None, 0
    if self.hparams.rewind_to == "trained_dense":
      return history.final_weights(0), 0
    return history.initial_weights(0), 0


@EXPERIMENTS.register("reinit_rand")
class ReinitRandom(Experiment):
  """Each pruned network restarts from a fresh random initialisation."""

  def start(self, level, history, fresh):
    return None, 0


@EXPERIMENTS.register("reinit_none")
class ReinitNone(Experiment):
  """Continued training: each pruned network starts from the previous level's final weights."""

  def start(self, level, history, fresh):
    if level == 0:
      return None, 0
    return history.final_weights(level - 1), 0


@EXPERIMENTS.register("rewind")
class Rewind(Experiment):
  """OpenLTH-style rewinding to the dense run's weights at `rewind_iteration`.

  Pruned levels restart from those weights with a fresh optimiser and train from
  `rewind_iteration` to `train_iters`, seeing the same data order as the dense run.
  The dense level saves them (`snapshots`).
  """

  def snapshots(self, level):
    return {self.hparams.rewind_iteration: REWIND_WEIGHTS} if level == 0 else {}

  def start(self, level, history, fresh):
    if level == 0:
      return None, 0
    return history.rewind_weights(0), self.hparams.rewind_iteration


class _TicketControl(Experiment):
  """Base of the lottery-ticket controls: a finished pruning run's masks, level by level.

  `--ticket_run=DIR` names the ticket (a finished or running `reinit_orig` run
  of the same data set and model); level l of trial t uses what DIR's trial
  t, level l trained with (its `masks/`, written when that level started).
  """
  prunes = False

  def check(self, dataset, num_train):
    super().check(dataset, num_train)
    hp = self.hparams
    name = hp.experiment
    if not hp.ticket_run:
      raise ValueError(f"{name} needs --ticket_run=DIR, a reinit_orig run folder")
    ticket = read_hparams(hp.ticket_run, "--ticket_run")
    check_matches(ticket, hp, ("dataset", "model", "resolution", "activation", "normalize"),
                  f"--ticket_run={hp.ticket_run}")
    if ticket.prune_iters < hp.prune_iters or ticket.trials < hp.trials:
      raise ValueError(f"--ticket_run={hp.ticket_run} has {ticket.trials} trials of "
                       f"{ticket.prune_iters} pruning iterations; --trials={hp.trials} "
                       f"--prune_iters={hp.prune_iters} need more")

  def ticket_masks(self, trial, level, layers):
    directory = os.path.join(level_dir(self.hparams.ticket_run, trial, level), "masks")
    try:
      return {layer.name: np.load(os.path.join(directory, f"{layer.name}.npy"))
              for layer in layers}
    except OSError:
      raise ValueError(f"--ticket_run={self.hparams.ticket_run}: trial {trial}, prune_iter "
                       f"{level} has no masks yet (run the ticket first)") from None


@EXPERIMENTS.register("random_reinit")
class RandomReinit(_TicketControl):
  """The ticket's masks with a fresh random initialisation per level (OpenLTH's
  `randomly_reinitialize`): does the ticket's initialisation matter?"""

  def level_masks(self, trial, level, layers):
    return self.ticket_masks(trial, level, layers)

  def start(self, level, history, fresh):
    return None, 0


@EXPERIMENTS.register("random_prune")
class RandomPrune(_TicketControl):
  """Random masks with the ticket's per-layer counts, from the original initialisation
  (OpenLTH's `randomly_prune`): does the ticket's choice of weights matter?"""

  def level_masks(self, trial, level, layers):
    ticket = self.ticket_masks(trial, level, layers)
    if level == 0:
      return ticket
    return pruning.random_masks(
        ticket, derived_seed(self.hparams.seed, trial, level, "random_prune"))

  def start(self, level, history, fresh):
    if level == 0:
      return None, 0
    return history.initial_weights(0), 0
