"""Large arrays that NumPy and TensorFlow share instead of copying.

TensorFlow copies every NumPy array it converts to a tensor (so that a later
write to the array cannot change the tensor), and a copy writes memory the
process has not touched yet. On a 2-core VM, first touches cost 2 ms per MB:
the 157 MB of MNIST's training images took 0.34 s to copy into the engine's
tensor, and each 31 MB evaluation set 0.07 s per evaluation, against 0.01 s
for the same copy into memory already touched.

A read-only array cannot be written, so sharing it is safe: the data sets of
`data.load_dataset` are `frozen` arrays, and `as_tensor` (used by the training
engine) turns a frozen array into a tensor over the same memory.
"""

import concurrent.futures
import os

import numpy as np
import tensorflow as tf

# The alignment TensorFlow's CPU kernels assume of a tensor's buffer
# (EIGEN_MAX_ALIGN_BYTES of an AVX-512 build); a shared, misaligned buffer
# fails a check inside the kernels.
ALIGNMENT = 64

_SHAREABLE = frozenset(np.dtype(t) for t in (
    np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64))


def aligned_empty(shape, dtype) -> np.ndarray:
  """An uninitialised, writable, C-contiguous array whose buffer is `ALIGNMENT`-aligned."""
  dtype = np.dtype(dtype)
  size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  buffer = np.empty(size + ALIGNMENT, np.uint8)
  offset = -buffer.ctypes.data % ALIGNMENT
  return buffer[offset:offset + size].view(dtype).reshape(shape)


def frozen_quotient(values, divisor, dtype=np.float32) -> np.ndarray:
  """`values / divisor` (computed in `dtype`) as a new frozen, aligned array.

  In one pass (`values.astype(dtype) / divisor` makes two, 8x slower), split
  over the cores for large arrays: the cost is touching the new memory, and
  the cores touch it in parallel (MNIST's training images on 2 cores: 0.27
  against 0.48 s).
  """
  values = np.asarray(values)
  out = aligned_empty(values.shape, dtype)
  divisor = np.dtype(dtype).type(divisor)
  parts = min(os.cpu_count() or 1, 8) if out.nbytes >= 1 << 24 and len(out) > 1 else 1

  def divide(rows):
    np.divide(values[rows], divisor, out=out[rows], dtype=dtype)

  bounds = np.linspace(0, len(out), parts + 1).astype(int)
  rows = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  if len(rows) == 1:
    divide(rows[0])
  else:
    with concurrent.futures.ThreadPoolExecutor(parts) as pool:
      list(pool.map(divide, rows))  # NumPy's loops release the GIL.
  return freeze(out)


def freeze(array: np.ndarray) -> np.ndarray:
  """Makes `array` read-only (in place) and returns it."""
  array.flags.writeable = False
  return array


def _shareable(array) -> bool:
  return (isinstance(array, np.ndarray) and not array.flags.writeable
          and array.flags.c_contiguous and array.dtype in _SHAREABLE and array.size > 0
          and array.ctypes.data % ALIGNMENT == 0)


def as_tensor(array, dtype=None) -> tf.Tensor:
  """`tf.convert_to_tensor(array, dtype)`, over the memory of a read-only array.

  A read-only, C-contiguous, aligned NumPy array of a numeric dtype (what
  `aligned_empty` + `freeze` make) becomes a tensor sharing its buffer, which
  keeps the array alive; anything else is converted (copied) as usual.
  """
  if _shareable(array) and (dtype is None or tf.as_dtype(dtype) == tf.as_dtype(array.dtype)):
    # DLPack cannot export a read-only array; a writable view of it is exported
    # and dropped: the tensor holds the only writable reference, and tensors
    # are never written in place.
    view = array.view()
    try:
      view.flags.writeable = True
    except ValueError:  # Its owner is read-only too: only a copy is safe.
      pass
    else:
      return tf.experimental.dlpack.from_dlpack(view.__dlpack__())
  return tf.convert_to_tensor(array, dtype)
