"""The data set registry (`--dataset`) and the split into train / validation / test.

An entry maps `data_dir` (or None) to uint8 images [n, height, width, channels]
and integer labels for the official train and test splits. With a `data_dir`
the official raw files are read from it; without one, tensorflow-datasets
loads (and, when online, downloads) the data set.
"""

import dataclasses
import glob
import os
from typing import Optional

import numpy as np
from absl import logging

from data.files import DataError, read_cifar_batch, read_idx_split
from robust_sparse.registry import Registry

DATASETS = Registry("dataset")

# Seed default: the first 10000 training images validate. The 8x8 digits have
# only 1797 images, so they get a smaller default.
DEFAULT_VALID_SIZE = 10000
DEFAULT_VALID_SIZES = {"sklearn_digits": 300}


@dataclasses.dataclass
class Dataset:
  """Float32 images in [0, 1], shape [n, height, width, channels]; int labels."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self):
    return self.x_train.shape[1:]


def _from_tfds(name):
  import tensorflow_datasets as tfds
  train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1,
                                        as_supervised=True))
  return train[0], train[1].astype(np.int64), test[0], test[1].astype(np.int64)


def _idx_loader(folder_name, tfds_name):
  def load(data_dir):
    if data_dir is None:
      return _from_tfds(tfds_name)
    folder = os.path.join(data_dir, folder_name)
    if not os.path.isdir(folder):
      raise DataError(f"--data_dir={data_dir} has no {folder_name}/ folder with the "
                      "four IDX .gz files")
    return (*read_idx_split(folder, "train"), *read_idx_split(folder, "t10k"))
  return load


DATASETS.register("digits")(_idx_loader("mnist", "mnist"))
DATASETS.register("fashion")(_idx_loader("fashion-mnist", "fashion_mnist"))


@DATASETS.register("cifar10")
def _cifar10(data_dir):
  if data_dir is None:
    return _from_tfds("cifar10")
  folder = os.path.join(data_dir, "cifar-10", "cifar-10-batches-bin")
  train_files = sorted(glob.glob(os.path.join(folder, "data_batch_*.bin")))
  test_file = os.path.join(folder, "test_batch.bin")
  if not train_files or not os.path.isfile(test_file):
    raise DataError(f"--data_dir={data_dir} has no cifar-10/cifar-10-batches-bin/ folder "
                    "with data_batch_*.bin and test_batch.bin")
  if len(train_files) < 5:
    logging.warning("CIFAR-10: only %d of the 5 training batches are in %s",
                    len(train_files), folder)
  train = [read_cifar_batch(f) for f in train_files]
  x_test, y_test = read_cifar_batch(test_file)
  return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
          x_test, y_test)


@DATASETS.register("sklearn_digits")
def _sklearn_digits(data_dir):
  """scikit-learn's embedded 8x8 digits (no download): last 360 images test."""
  del data_dir
  from sklearn.datasets import load_digits
  digits = load_digits()
  # Pixel values are 0..16; scale to bytes so every loader returns uint8.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  return images[:-360], labels[:-360], images[-360:], labels[-360:]


def default_valid_size(name: str) -> int:
  return DEFAULT_VALID_SIZES.get(name, DEFAULT_VALID_SIZE)


def load_dataset(name: str, data_dir: Optional[str] = None,
                 valid_size: Optional[int] = None) -> Dataset:
  """Loads `name` and holds out the first `valid_size` training images for validation.

  Raises:
    ValueError: unknown name or a `valid_size` that leaves no training data.
    DataError: missing or corrupt files.
  """
  loader = DATASETS.get(name)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"--data_dir={data_dir} is not a folder")
  x_train, y_train, x_test, y_test = loader(data_dir)
  if valid_size is None:
    valid_size = default_valid_size(name)
  if not 0 < valid_size < len(x_train):
    raise ValueError(f"valid_size must be between 1 and {len(x_train) - 1} for {name}, "
                     f"got {valid_size}")

  def scale(images):
    return (np.asarray(images, dtype=np.float32) / 255.0)

  return Dataset(name=name,
                 x_train=scale(x_train[valid_size:]), y_train=y_train[valid_size:],
                 x_valid=scale(x_train[:valid_size]), y_valid=y_train[:valid_size],
                 x_test=scale(x_test), y_test=y_test,
                 num_classes=int(max(y_train.max(), y_test.max())) + 1)
