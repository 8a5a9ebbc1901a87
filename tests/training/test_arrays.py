"""Read-only arrays that NumPy and TensorFlow share (robust_sparse/training/arrays.py)."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.data import load_dataset
from robust_sparse.training import arrays
from robust_sparse.training.engine import Engine
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn
from tests.data.test_datasets import _write_idx  # The official IDX format.


def _frozen(values):
  array = arrays.aligned_empty(values.shape, values.dtype)
  array[...] = values
  return arrays.freeze(array)


def _shares(array, tensor):
  """Whether `tensor`'s buffer is `array`'s (exported back to NumPy without a copy)."""
  return np.shares_memory(array, np.from_dlpack(tensor))


def test_aligned_empty_is_aligned_and_writable():
  for shape, dtype in (((7, 3), np.float32), ((5,), np.uint8), ((2, 3, 4), np.int64)):
    array = arrays.aligned_empty(shape, dtype)
    assert array.ctypes.data % arrays.ALIGNMENT == 0
    assert array.shape == shape and array.dtype == dtype and array.flags.writeable
    assert array.flags.c_contiguous


def test_frozen_array_becomes_a_tensor_over_its_memory():
  values = np.random.default_rng(0).random((50, 28, 28, 1), dtype=np.float32)
  array = _frozen(values)
  tensor = arrays.as_tensor(array)
  assert _shares(array, tensor)
  np.testing.assert_array_equal(tensor.numpy(), values)
  assert not array.flags.writeable  # Still read-only: nothing can change the tensor.
  with pytest.raises(ValueError, match="read-only"):
    array[0] = 1
  # The tensor keeps the memory alive once the array is gone.
  del array
  np.testing.assert_array_equal(tf.gather(tensor, [3, 1]).numpy(), values[[3, 1]])


def test_other_arrays_are_copied():
  values = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
  writable = arrays.aligned_empty(values.shape, values.dtype)
  writable[...] = values
  tensor = arrays.as_tensor(writable)
  writable[0] = -1  # A writable array may change: the tensor must not.
  np.testing.assert_array_equal(tensor.numpy(), values)
  misaligned = _frozen(np.arange(65, dtype=np.float32))[1:]
  assert misaligned.ctypes.data % arrays.ALIGNMENT and not misaligned.flags.writeable
  assert not _shares(misaligned, arrays.as_tensor(misaligned))
  np.testing.assert_array_equal(arrays.as_tensor(misaligned).numpy(), np.arange(1, 65))
  owner = np.arange(16, dtype=np.float32)  # Read-only owner: no writable view to export.
  owner.flags.writeable = False
  np.testing.assert_array_equal(arrays.as_tensor(owner).numpy(), np.arange(16))
  frozen = _frozen(values)  # Another dtype asked for: converted.
  assert arrays.as_tensor(frozen, tf.float64).dtype == tf.float64
  assert _shares(frozen, arrays.as_tensor(frozen, tf.float32))


@pytest.mark.parametrize("rows", [3, 4099])  # 4099 rows: 16 MB, divided in threads.
def test_frozen_quotient_is_the_two_pass_quotient(rows):
  values = np.random.default_rng(1).integers(0, 256, (rows, 32, 32), dtype=np.uint8)
  quotient = arrays.frozen_quotient(values, 255)
  assert quotient.dtype == np.float32 and not quotient.flags.writeable
  assert quotient.ctypes.data % arrays.ALIGNMENT == 0
  np.testing.assert_array_equal(quotient, values.astype(np.float32) / 255)


def test_in_memory_data_sets_are_frozen_scaled_images_the_engine_shares(tmp_path):
  folder = os.path.join(tmp_path, "mnist")
  os.makedirs(folder)
  rng = np.random.default_rng(3)
  images = {"train": rng.integers(0, 256, (30, 28, 28)),
            "t10k": rng.integers(0, 256, (6, 28, 28))}
  for prefix, count in (("train", 30), ("t10k", 6)):
    _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), images[prefix])
    _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
               rng.integers(0, 10, count))
  data = load_dataset("digits", str(tmp_path), valid_size=10)
  expected = images["train"].astype(np.uint8)[..., None].astype(np.float32) / 255
  np.testing.assert_array_equal(data.x_valid, expected[:10])
  np.testing.assert_array_equal(data.x_train, expected[10:])
  for split in (data.x_train, data.x_valid, data.x_test):
    assert split.dtype == np.float32 and not split.flags.writeable
  model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                            keras.layers.Dense(10)])
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10),
                  [OptimizerGroup("weights", make_optimizer("sgd", 0.1))],
                  x_train=data.x_train, y_train=data.y_train, batch_size=5,
                  attack=lambda model, x, y, seed: x)
  assert _shares(data.x_train, engine.x_train)
