"""L-infinity adversarial attacks that compose inside compiled train steps."""

from attacks.fgsm import fgsm
from attacks.pgd import pgd
from attacks.registry import ATTACKS, AttackConfig, make_attack

__all__ = ["fgsm", "pgd", "ATTACKS", "AttackConfig", "make_attack"]
