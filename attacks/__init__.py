"""Adversarial attacks that compose inside compiled train steps and compile themselves eagerly.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.training` (its
compilation choice and per-replica draws), `robust_sparse.measure`, `robust_sparse.custom_ops`.
"""

import robust_sparse  # noqa: F401  First: a quiet TensorFlow start-up (robust_sparse/core/startup.py).

from robust_sparse.attacks.apgd import apgd_ce, apgd_t
from robust_sparse.attacks.autoattack import autoattack, autoattack_report
from robust_sparse.attacks.fab import fab_t
from robust_sparse.attacks.fgsm import fgsm
from robust_sparse.attacks.pgd import pgd
from robust_sparse.attacks.square import square
from robust_sparse.attacks.registry import ATTACKS, AttackConfig, make_attack
from robust_sparse.attacks.spec import parse_attack_spec, parse_attack_specs

__all__ = ["apgd_ce", "apgd_t", "autoattack", "autoattack_report", "fab_t", "fgsm", "pgd", "square",
           "ATTACKS", "AttackConfig", "make_attack", "parse_attack_spec", "parse_attack_specs"]
