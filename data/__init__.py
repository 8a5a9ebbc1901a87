"""Data sets: raw-file readers, tensorflow-datasets fallback, train/valid/test splits."""

from data.files import DataError
from data.registry import DATASETS, Dataset, default_valid_size, load_dataset

__all__ = ["DATASETS", "DataError", "Dataset", "default_valid_size", "load_dataset"]
