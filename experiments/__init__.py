"""The experiments (`--experiment`) and the loop that runs them.

Importing an experiment family's module registers it in EXPERIMENTS. The runner
(runner.py) is the loop; build.py turns hyper-parameters into objects;
level_log.py writes a level's log; the run folder's files are named by
`robust_sparse.core.run_folder`.

May import: everything below it (`robust_sparse.core`, `nn`, `training`, `measure`,
`robust_sparse.data`, `attacks`, `models`, `custom_ops`); never `analysis` nor the entry points.
"""

import robust_sparse  # noqa: F401  First: a quiet TensorFlow start-up (robust_sparse/core/startup.py).

from robust_sparse.experiments import flatness  # noqa: F401
from robust_sparse.experiments import hydra  # noqa: F401
from robust_sparse.experiments import phd_lab  # noqa: F401
from robust_sparse.experiments import relu_reduction  # noqa: F401
from robust_sparse.experiments import sparsify  # noqa: F401
from robust_sparse.experiments.registry import EXPERIMENTS, REWIND_TARGETS

__all__ = ["EXPERIMENTS", "REWIND_TARGETS"]
