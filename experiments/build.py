"""Objects built from an experiment's hyper-parameters: its attacks.

The hyper-parameters (`robust_sparse.core.hparams`) are plain values, read
without TensorFlow; this module is where they become the objects a run uses.
"""

from typing import Callable, List, Tuple

from robust_sparse.attacks import spec
from robust_sparse.attacks.registry import AttackConfig
from robust_sparse.core.hparams import AttackHparams


def attack_config(hparams: AttackHparams) -> AttackConfig:
  """The budget of `--attack`, the attack of adversarial training and evaluation."""
  return AttackConfig(name=hparams.attack, eps=hparams.eps, step_size=hparams.pgd_step_size,
                      steps=hparams.pgd_steps, impl=hparams.attack_impl,
                      labels=hparams.attack_labels)


def eval_attack_specs(hparams: AttackHparams) -> List[Tuple[str, Callable]]:
  """[(column name, attack)] of `--eval_attacks` (one-line ValueError on a bad spec)."""
  if not hparams.eval_attacks.strip():
    return []
  return spec.parse_attack_specs(spec.split_attack_specs(hparams.eval_attacks),
                                 attack_config(hparams))
