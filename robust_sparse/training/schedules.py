"""Learning-rate schedules as pure functions of the training iteration.

`make_schedule` returns `schedule(iteration) -> lr`, which the training engine
evaluates inside its compiled step and assigns to the optimizer's learning
rate. Being a function of the iteration alone (no scheduler state), a resumed
or rewound run gets its learning rate back by restoring the iteration.

Schedules follow the PyTorch schedulers the seeds use, stepped once per epoch
(`per="epoch"`) or evaluated at the fractional epoch of every iteration
(`per="iteration"`):

- "constant": `base_lr`.
- "cosine": `eta_min + (base_lr - eta_min) * (1 + cos(pi * t / T)) / 2`, with
  `t` the epochs since the end of warm-up and `T` the training length after
  warm-up (CosineAnnealingLR with T_max = epochs; seeds 001 and 002). After
  the end of training it stays at `eta_min` instead of rising again.
- "multistep": `base_lr * gamma ** (number of milestones <= epoch)`
  (MultiStepLR; seed 002).
- "step": `base_lr * gamma ** floor(epoch / lr_step_epochs)` (StepLR; seed
  003's `lrs60` is step 20, gamma 0.1).

Warm-up follows the SSAM seed's `CosineLRscheduler` / `MultiStepLRscheduler`
(Mi-Peng's `solver/lr_scheduler.py`): for epoch < warmup_epochs the rate is
`warmup_init_lr + epoch * (base_lr - warmup_init_lr) / warmup_epochs`, so it
starts at `warmup_init_lr` and would reach `base_lr` at the end of warm-up,
where the main schedule takes over at `base_lr`. The cosine then runs from the
end of warm-up to the end of training (SSAM's `cos(pi * (e - w) / (T - w))`);
milestones and step boundaries count epochs from the start of training, as
SSAM's multistep does, so `--milestones` means the same epochs with or
without warm-up (a milestone inside the warm-up takes effect when it ends).
With `per="epoch"` the warm-up rises once per epoch, as SSAM's does.

Two behaviours of SSAM's released code are deliberately not copied: its
scheduler is stepped with `step(epoch)` after each epoch, so epoch e trains
with the rate meant for epoch e - 1 (and epoch 0 with `base_lr`, before any
warm-up), and its multistep decays at `epoch > milestone`. Here epoch e uses
the rate for e, and milestones count when reached, as in PyTorch's
MultiStepLR. The lagged rate is `schedule(iteration - steps_per_epoch)` for
iterations past the first epoch.
"""

import dataclasses
import math
from typing import Callable, Optional, Sequence, Tuple

import tensorflow as tf

from robust_sparse.core.registry import Registry

# How often the rate changes: once per epoch, or at every iteration.
SCHEDULE_PER = ("epoch", "iteration")


@dataclasses.dataclass(frozen=True)
class ScheduleParams:
  """The validated hyper-parameters a schedule's formula reads (epochs as floats)."""
  base_lr: float
  total_epochs: float
  warmup_epochs: float
  eta_min: float
  milestones: Tuple[float, ...]
  gamma: float
  lr_step_epochs: Optional[float]


# Each entry maps (epoch as a float64 tensor, params) to the rate after warm-up.
SCHEDULES: Registry[Callable[[tf.Tensor, ScheduleParams], tf.Tensor]] = Registry("lr_schedule")


@SCHEDULES.register("constant")
def _constant(epoch: tf.Tensor, params: ScheduleParams) -> tf.Tensor:
  return tf.ones_like(epoch) * params.base_lr


@SCHEDULES.register("cosine")
def _cosine(epoch: tf.Tensor, params: ScheduleParams) -> tf.Tensor:
  length = params.total_epochs - params.warmup_epochs
  elapsed = tf.clip_by_value(epoch - params.warmup_epochs, 0.0, length)
  return params.eta_min + (params.base_lr - params.eta_min) * (
      1.0 + tf.cos(math.pi * elapsed / length)) / 2.0


@SCHEDULES.register("multistep")
def _multistep(epoch: tf.Tensor, params: ScheduleParams) -> tf.Tensor:
  milestones = tf.constant(params.milestones, tf.float64, shape=[len(params.milestones)])
  passed = tf.reduce_sum(tf.cast(milestones <= epoch, tf.float64))
  return params.base_lr * tf.pow(tf.constant(params.gamma, tf.float64), passed)


@SCHEDULES.register("step")
def _step(epoch: tf.Tensor, params: ScheduleParams) -> tf.Tensor:
  steps = tf.floor(epoch / params.lr_step_epochs)
  return params.base_lr * tf.pow(tf.constant(params.gamma, tf.float64), steps)


def _validate(name, base_lr, total_iterations, steps_per_epoch, per, eta_min, milestones,
              gamma, lr_step_epochs, warmup_epochs, warmup_init_lr):
  """Raises a ValueError naming the flag of the first invalid argument."""
  if per not in SCHEDULE_PER:
    raise ValueError(f"--schedule_per must be one of {', '.join(SCHEDULE_PER)}, got {per!r}")
  if steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
  if total_iterations < 1:
    raise ValueError(f"total_iterations must be >= 1, got {total_iterations}")
  if base_lr < 0:
    raise ValueError(f"--learning_rate must be >= 0, got {base_lr}")
  if eta_min < 0:
    raise ValueError(f"--eta_min must be >= 0, got {eta_min}")
  if gamma <= 0:
    raise ValueError(f"--gamma must be > 0, got {gamma}")
  shown = ",".join(f"{m:g}" for m in milestones)
  if any(b <= a for a, b in zip(milestones, milestones[1:])):
    raise ValueError(f"--milestones must be strictly increasing, got {shown}")
  if any(m < 0 for m in milestones):
    raise ValueError(f"--milestones must be >= 0, got {shown}")
  if lr_step_epochs is not None and lr_step_epochs <= 0:
    raise ValueError(f"--lr_step_epochs must be > 0, got {lr_step_epochs}")
  if name == "step" and lr_step_epochs is None:
    raise ValueError("--lr_schedule=step needs --lr_step_epochs")
  if warmup_epochs < 0:
    raise ValueError(f"--warmup_epochs must be >= 0, got {warmup_epochs}")
  total_epochs = total_iterations / steps_per_epoch
  if warmup_epochs >= total_epochs:
    raise ValueError(f"--warmup_epochs must be shorter than training ({total_epochs:g} "
                     f"epochs), got {warmup_epochs}")
  if warmup_init_lr < 0:
    raise ValueError(f"--warmup_init_lr must be >= 0, got {warmup_init_lr}")


def make_schedule(name: str, base_lr: float, *, total_iterations: int, steps_per_epoch: int,
                  per: str = "epoch", eta_min: float = 0.0, milestones: Sequence[float] = (),
                  gamma: float = 0.1, lr_step_epochs: Optional[float] = None,
                  warmup_epochs: float = 0.0,
                  warmup_init_lr: float = 0.0) -> Callable[[tf.Tensor], tf.Tensor]:
  """Builds the learning-rate schedule called `name` (see the module docstring).

  Args:
    name: "constant", "cosine", "multistep" or "step".
    base_lr: the peak rate, reached at the end of warm-up.
    total_iterations: the length of training in iterations.
    steps_per_epoch: iterations per epoch, which converts iterations to epochs.
    per: "epoch" (the epoch is floor(iteration / steps_per_epoch), as PyTorch
      schedulers stepped once per epoch) or "iteration" (iteration /
      steps_per_epoch, so the rate changes at every step).
    eta_min: the cosine's final rate.
    milestones: "multistep"'s epochs, strictly increasing, from the start of
      training.
    gamma: the decay factor of "multistep" and "step", > 0.
    lr_step_epochs: "step"'s period in epochs; required by "step".
    warmup_epochs: the length of the linear warm-up, shorter than training.
    warmup_init_lr: the rate at iteration 0 when warming up.

  Returns:
    `schedule(iteration)`: the rate (a float32 scalar tensor) for the step
    about to be taken, given its 0-based global iteration as a Python int or
    an integer scalar tensor; usable inside a jit-compiled `tf.function`.

  Raises:
    ValueError: for an unknown name (the message lists the known ones) or an
      invalid argument; each message names the command-line flag.
  """
  try:
    formula = SCHEDULES.get(name)
  except ValueError as error:
    raise ValueError(f"--lr_schedule: {error}") from None
  milestones = tuple(float(m) for m in milestones)
  _validate(name, base_lr, total_iterations, steps_per_epoch, per, eta_min, milestones, gamma,
            lr_step_epochs, warmup_epochs, warmup_init_lr)
  params = ScheduleParams(
      base_lr=float(base_lr), total_epochs=total_iterations / steps_per_epoch,
      warmup_epochs=float(warmup_epochs), eta_min=float(eta_min), milestones=milestones,
      gamma=float(gamma),
      lr_step_epochs=None if lr_step_epochs is None else float(lr_step_epochs))
  warmup_init_lr = float(warmup_init_lr)

  def schedule(iteration) -> tf.Tensor:
    iteration = tf.cast(iteration, tf.int64)
    # float64 so that the epoch and the formulas are exact enough to give the
    # same float32 rate in eager mode and under XLA.
    if per == "epoch":
      epoch = tf.cast(iteration // steps_per_epoch, tf.float64)
    else:
      epoch = tf.cast(iteration, tf.float64) / steps_per_epoch
    rate = formula(epoch, params)
    if params.warmup_epochs > 0:
      warming = warmup_init_lr + epoch * (params.base_lr - warmup_init_lr) / params.warmup_epochs
      rate = tf.where(epoch < params.warmup_epochs, warming, rate)
    return tf.cast(rate, tf.float32)

  return schedule
