"""Data sets: raw-file readers, image folders, per-batch preparation, train/valid/test splits.

May import: `robust_sparse.core`, `robust_sparse.nn`, `robust_sparse.training` (its shared
arrays), `robust_sparse.measure`, `robust_sparse.custom_ops`.
"""

import robust_sparse  # noqa: F401  First: a quiet TensorFlow start-up (robust_sparse/core/startup.py).

from robust_sparse.data.files import DataError
from robust_sparse.data.folders import decoded_batches, decoded_index_batches
from robust_sparse.data.registry import DATASETS, Dataset, Source, default_valid_size, load_dataset

__all__ = ["DATASETS", "DataError", "Dataset", "Source", "decoded_batches",
           "decoded_index_batches", "default_valid_size", "load_dataset"]
