"""Sharpness-aware minimisation: the SAM family's registry (registry.py), SAM and ASAM
(sam.py), Sparse SAM's masks (ssam.py, sparse_perturbation.py).

`PERTURBATIONS` maps each `--optimizer=<name>-<base>` prefix to its method (a
`registry.Perturbation`); a method registers itself in its own module, which is
imported below so that the registry is complete once this package is.

May import: `robust_sparse.core`, `robust_sparse.nn`, the rest of `robust_sparse.training`
(not `steps` or `optimizers`, which import this package's registry).
"""

from robust_sparse.training.sharpness.registry import PERTURBATIONS, MaskContext, Perturbation
# The methods, registered on import (a new method adds its module to this line).
from robust_sparse.training.sharpness import sam, sparse_perturbation  # noqa: F401

__all__ = ["PERTURBATIONS", "MaskContext", "Perturbation"]
