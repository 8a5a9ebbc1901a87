"""The attack registry (`--attack`) and the two implementations (`--attack_impl`).

An entry is a factory taking an `AttackConfig` and returning
`attack(model, x, y=None, seed=None) -> x_adv`, a function that composes inside
a compiled train step (and compiles itself when called eagerly). `y=None`
attacks the model's own predictions (the seed's convention); given `y` are the
true labels of standard robust accuracy.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from robust_sparse.attacks.apgd import apgd_ce, apgd_t, check_first_window
from robust_sparse.attacks.autoattack import autoattack
from robust_sparse.attacks.fab import fab_t
from robust_sparse.attacks.common import check_norm
from robust_sparse.attacks.fgsm import fgsm
from robust_sparse.attacks.pgd import pgd
from robust_sparse.attacks.square import square
from robust_sparse.core.hparams import AttackHparams
from robust_sparse.core.registry import Registry

ATTACKS = Registry("attack")
IMPLEMENTATIONS = ("native", "cleverhans")
# What the attack's loss is taken against: the model's own predictions (the
# lottery-ticket seed, cleverhans' y=None) or the true labels (RobustBench).
LABELS = ("predicted", "true")
# The command line's defaults are the library's: written once, in the hyper-parameters.
_RUN = AttackHparams()


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The budget of an attack (seed defaults: L-infinity, eps 0.3, PGD 10 x 0.05).

  Attributes:
    name: a name in `ATTACKS`.
    eps: the radius of the ball in `norm`.
    step_size: PGD's step length (APGD sets its own, 2 eps halving).
    steps: PGD steps, or APGD iterations.
    random_start: PGD starts at a random point of the ball (APGD always does).
    clip_min, clip_max: the data range.
    impl: "native", or "cleverhans" (FGSM and PGD with one start only).
    restarts: PGD's random starts; the worst case per example is kept.
    norm: np.inf or 2 (PGD and APGD; FGSM is L-infinity only).
    labels: "predicted" (the seed's) or "true": `make_attack`'s function then
      ignores, or uses, the labels its callers always pass.
    n_target_classes: APGD-T's and FAB-T's targets (AutoAttack's standard: 9).
    n_queries: Square's queries (AutoAttack's standard: 5000).
    first_window: APGD's (and AutoAttack's APGD components') first checkpoint
      window: "paper" (loss increases counted from the start's loss) or "fra31"
      (from zero, as fra31's and torchattacks' code).
  """
  name: str = _RUN.attack
  eps: float = _RUN.eps
  step_size: float = _RUN.pgd_step_size
  steps: int = _RUN.pgd_steps
  random_start: bool = True
  clip_min: float = 0.0
  clip_max: float = 1.0
  impl: str = _RUN.attack_impl
  restarts: int = 1
  norm: float = np.inf
  labels: str = _RUN.attack_labels
  n_target_classes: int = 9
  n_queries: int = 5000
  first_window: str = "paper"

  def __post_init__(self):
    ATTACKS.get(self.name)
    if self.labels not in LABELS:
      raise ValueError(f"attack labels must be one of {', '.join(LABELS)}, got "
                       f"{self.labels!r}")
    if self.impl not in IMPLEMENTATIONS:
      raise ValueError(f"unknown attack implementation {self.impl!r}; known: "
                       f"{', '.join(IMPLEMENTATIONS)}")
    if self.eps < 0:
      raise ValueError(f"attack eps must be >= 0, got {self.eps}")
    if self.steps < 0 or self.step_size < 0:
      raise ValueError("attack steps and step_size must be >= 0")
    if self.restarts < 1:
      raise ValueError(f"attack restarts must be >= 1, got {self.restarts}")
    if self.n_target_classes < 1:
      raise ValueError(f"attack n_target_classes must be >= 1, got {self.n_target_classes}")
    if self.n_queries < 1:
      raise ValueError(f"attack n_queries must be >= 1, got {self.n_queries}")
    check_first_window(self.first_window)
    object.__setattr__(self, "norm", check_norm(self.norm))
    if self.name == "fgsm" and self.norm != np.inf:
      raise ValueError(f"fgsm is L-infinity only, got norm={self.norm}")
    if self.restarts > 1 and (self.name != "pgd" or not self.random_start):
      raise ValueError(f"restarts={self.restarts} needs pgd with a random start")
    if self.impl == "cleverhans":
      if self.name not in ("fgsm", "pgd"):
        raise ValueError(f"{self.name} has no cleverhans implementation; use impl='native'")
      if self.restarts > 1:
        raise ValueError("cleverhans PGD has no restarts; use impl='native'")
      if self.name == "pgd" and self.step_size > self.eps:
        raise ValueError("cleverhans PGD needs step_size <= eps")


@ATTACKS.register("fgsm")
def _fgsm(config: AttackConfig):
  if config.impl == "cleverhans":
    # Optional: cleverhans, only for --attack_impl=cleverhans.
    from cleverhans.tf2.attacks.fast_gradient_method import fast_gradient_method

    def attack(model, x, y=None, seed=None):
      del seed  # FGSM is deterministic.
      return tf.stop_gradient(fast_gradient_method(
          lambda z: model(z, training=False), x, config.eps, np.inf,
          clip_min=config.clip_min, clip_max=config.clip_max, y=y))
    return attack

  def attack(model, x, y=None, seed=None):
    del seed
    return fgsm(model, x, y, eps=config.eps, clip_min=config.clip_min,
                clip_max=config.clip_max)
  return attack


@ATTACKS.register("pgd")
def _pgd(config: AttackConfig):
  if config.impl == "cleverhans":
    # Optional: cleverhans, only for --attack_impl=cleverhans.
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    def attack(model, x, y=None, seed=None):
      del seed  # cleverhans draws its random start statefully.
      return tf.stop_gradient(projected_gradient_descent(
          lambda z: model(z, training=False), x, config.eps, config.step_size,
          config.steps, config.norm, clip_min=config.clip_min, clip_max=config.clip_max,
          y=y, rand_init=config.random_start, sanity_checks=False))
    return attack

  def attack(model, x, y=None, seed=None):
    return pgd(model, x, y, eps=config.eps, step_size=config.step_size,
               steps=config.steps, random_start=config.random_start,
               clip_min=config.clip_min, clip_max=config.clip_max, seed=seed,
               restarts=config.restarts, norm=config.norm)
  return attack


@ATTACKS.register("apgd_ce")
def _apgd_ce(config: AttackConfig):
  """APGD-CE for `config.steps` iterations (step size and start are APGD's own)."""

  def attack(model, x, y=None, seed=None):
    return apgd_ce(model, x, y, eps=config.eps, steps=config.steps,
                   clip_min=config.clip_min, clip_max=config.clip_max, seed=seed,
                   norm=config.norm, first_window=config.first_window)
  return attack


@ATTACKS.register("apgd_t")
def _apgd_t(config: AttackConfig):
  """APGD-T: `config.steps` iterations for each of `config.n_target_classes` targets."""

  def attack(model, x, y=None, seed=None):
    return apgd_t(model, x, y, eps=config.eps, steps=config.steps,
                  n_target_classes=config.n_target_classes, clip_min=config.clip_min,
                  clip_max=config.clip_max, seed=seed, norm=config.norm,
                  first_window=config.first_window)
  return attack


@ATTACKS.register("fab_t")
def _fab_t(config: AttackConfig):
  """FAB-T: `config.steps` iterations for each of `config.n_target_classes` targets."""

  def attack(model, x, y=None, seed=None):
    return fab_t(model, x, y, eps=config.eps, norm=config.norm, steps=config.steps,
                 n_target_classes=config.n_target_classes, clip_min=config.clip_min,
                 clip_max=config.clip_max, seed=seed)
  return attack


@ATTACKS.register("square")
def _square(config: AttackConfig):
  """Square: `config.n_queries` queries of the logits (no gradients)."""

  def attack(model, x, y=None, seed=None):
    return square(model, x, y, eps=config.eps, norm=config.norm, n_queries=config.n_queries,
                  clip_min=config.clip_min, clip_max=config.clip_max, seed=seed)
  return attack


@ATTACKS.register("autoattack")
def _autoattack(config: AttackConfig):
  """AutoAttack's standard sequence (`attacks/autoattack.py`) with the config's budget."""

  def attack(model, x, y=None, seed=None):
    return autoattack(model, x, y, eps=config.eps, norm=config.norm, steps=config.steps,
                      n_target_classes=config.n_target_classes, n_queries=config.n_queries,
                      clip_min=config.clip_min, clip_max=config.clip_max, seed=seed,
                      first_window=config.first_window)
  return attack


@ATTACKS.register("none")
def _no_attack(config: AttackConfig):
  """No attack: natural training and evaluation only (adversarial metrics are NaN).

  Long CIFAR protocols use it to skip the per-evaluation attack, which costs
  (steps + 1) forward-backward passes over the evaluation sets.
  """
  del config
  return None


def make_attack(config: AttackConfig):
  """Returns `attack(model, x, y=None, seed=None) -> x_adv` for `config` (None: "none").

  With `config.labels == "predicted"` the returned function drops the `y` it
  is given and attacks the model's predictions; with "true" it attacks `y`.
  Its attribute `labels` says which (evaluation then counts an example as
  robust only when its clean version is correct too).
  """
  attack = ATTACKS.get(config.name)(config)
  if attack is None:
    return None
  if config.labels == "true":
    def on_labels(model, x, y=None, seed=None):
      return attack(model, x, y, seed)
    on_labels.labels = "true"
    return on_labels

  def on_predictions(model, x, y=None, seed=None):
    del y  # The seed's convention: the model's own predictions.
    return attack(model, x, None, seed)

  on_predictions.labels = "predicted"
  return on_predictions
