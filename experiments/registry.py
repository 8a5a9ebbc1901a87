"""The experiment registry (`--experiment`): what each pruning level starts from.

An experiment is a class constructed from the `Hparams` with two methods:
`levels()` (how many training runs a trial has: prune iterations + 1) and
`start(level, history)`, which returns the weights a level starts from (every
model variable by path; None: the fresh random initialisation built for it)
and the iteration it starts at (a rewound level resumes the data order and
the learning-rate schedule there).
`history` gives the saved weights of earlier levels (see `LevelHistory`).
"""

from robust_sparse.registry import Registry

EXPERIMENTS = Registry("experiment")
REWIND_TARGETS = ("init", "trained_dense")


class Experiment:
  """Base: prune after every level; subclasses choose where a level starts."""

  def __init__(self, hparams):
    self.hparams = hparams

  def levels(self) -> int:
    return self.hparams.prune_iters + 1

  def start(self, level, history):
    raise NotImplementedError


@EXPERIMENTS.register("no_pruning")
class NoPruning(Experiment):
  """Trains the dense network once (prune iteration 0 only)."""

  def levels(self):
    return 1

  def start(self, level, history):
    return None, 0


@EXPERIMENTS.register("train")
class Train(Experiment):
  """Plain training: one level, no pruning (the CIFAR protocols' baselines).

  The same as `no_pruning`; the name says what the non-lottery studies do.
  """

  def levels(self):
    return 1

  def start(self, level, history):
    return None, 0


@EXPERIMENTS.register("reinit_orig")
class ReinitOriginal(Experiment):
  """The lottery ticket: each pruned network restarts from the dense network's init.

  `rewind_to="trained_dense"` reproduces the seed's released code, which by
  mistake restarts from the *trained* dense weights (spec 1.4 [BUG]).
  """

  def start(self, level, history):
    if level == 0:
      return None, 0
    if self.hparams.rewind_to == "trained_dense":
      return history.final_weights(0), 0
    return history.initial_weights(0), 0


@EXPERIMENTS.register("reinit_rand")
class ReinitRandom(Experiment):
  """Each pruned network restarts from a fresh random initialisation."""

  def start(self, level, history):
    return None, 0


@EXPERIMENTS.register("reinit_none")
class ReinitNone(Experiment):
  """Continued training: each pruned network starts from the previous level's final weights."""

  def start(self, level, history):
    if level == 0:
      return None, 0
    return history.final_weights(level - 1), 0


@EXPERIMENTS.register("rewind")
class Rewind(Experiment):
  """OpenLTH-style rewinding to the dense run's weights at `rewind_iteration`.

  Pruned levels restart from those weights with a fresh optimiser and train from
  `rewind_iteration` to `train_iters`, seeing the same data order as the dense run.
  """

  def start(self, level, history):
    if level == 0:
      return None, 0
    return history.rewind_weights(0), self.hparams.rewind_iteration
