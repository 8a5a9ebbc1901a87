"""The attack registry (`--attack`) and the two implementations (`--attack_impl`).

An entry is a factory taking an `AttackConfig` and returning
`attack(model, x, y=None, seed=None) -> x_adv`, a function that composes inside
a compiled train step.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from attacks.fgsm import fgsm
from attacks.pgd import pgd
from robust_sparse.registry import Registry

ATTACKS = Registry("attack")
IMPLEMENTATIONS = ("native", "cleverhans")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """The budget of an L-infinity attack (seed defaults: eps 0.3, PGD 10 x 0.05)."""
  name: str = "fgsm"
  eps: float = 0.3
  step_size: float = 0.05
  steps: int = 10
  random_start: bool = True
  clip_min: float = 0.0
  clip_max: float = 1.0
  impl: str = "native"

  def __post_init__(self):
    ATTACKS.get(self.name)
    if self.impl not in IMPLEMENTATIONS:
      raise ValueError(f"unknown attack implementation {self.impl!r}; known: "
                       f"{', '.join(IMPLEMENTATIONS)}")
    if self.eps < 0:
      raise ValueError(f"attack eps must be >= 0, got {self.eps}")
    if self.steps < 0 or self.step_size < 0:
      raise ValueError("attack steps and step_size must be >= 0")
    if self.impl == "cleverhans" and self.name == "pgd" and self.step_size > self.eps:
      raise ValueError("cleverhans PGD needs step_size <= eps")


@ATTACKS.register("fgsm")
def _fgsm(config: AttackConfig):
  if config.impl == "cleverhans":
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
    from cleverhans.tf2.attacks.projected_gradient_descent import projected_gradient_descent

    def attack(model, x, y=None, seed=None):
      del seed  # cleverhans draws its random start statefully.
      return tf.stop_gradient(projected_gradient_descent(
          lambda z: model(z, training=False), x, config.eps, config.step_size,
          config.steps, np.inf, clip_min=config.clip_min, clip_max=config.clip_max,
          y=y, rand_init=config.random_start, sanity_checks=False))
    return attack

  def attack(model, x, y=None, seed=None):
    return pgd(model, x, y, eps=config.eps, step_size=config.step_size,
               steps=config.steps, random_start=config.random_start,
               clip_min=config.clip_min, clip_max=config.clip_max, seed=seed)
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
  """Returns `attack(model, x, y=None, seed=None) -> x_adv` for `config` (None: "none")."""
  return ATTACKS.get(config.name)(config)
