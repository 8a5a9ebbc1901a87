"""The experiments (`--experiment`) and the loop that runs them.

Importing an experiment family's module registers it in EXPERIMENTS.
"""

import robust_sparse  # noqa: F401  First: a quiet TensorFlow start-up (robust_sparse/core/startup.py).

from robust_sparse.experiments import flatness  # noqa: F401
from robust_sparse.experiments import phd_lab  # noqa: F401
from robust_sparse.experiments import relu_reduction  # noqa: F401
from robust_sparse.experiments import sparsify  # noqa: F401
from robust_sparse.experiments.registry import EXPERIMENTS, REWIND_TARGETS

__all__ = ["EXPERIMENTS", "REWIND_TARGETS"]
