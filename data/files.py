"""Readers for the official raw files: MNIST-style IDX (.gz), CIFAR-10 and CIFAR-100 binaries.

Every reader checks what it reads and raises `DataError` with a message naming
the file and the problem, so a corrupt download is a one-line error.
"""

import gzip
import os
import zlib

import numpy as np


class DataError(ValueError):
  """A data file is missing, truncated or not what its name says."""


_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: str) -> np.ndarray:
  """Reads a (gzipped) IDX file of unsigned bytes, such as `train-images-idx3-ubyte.gz`."""
  if not os.path.isfile(path):
    raise DataError(f"missing data file {path}")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f"corrupt data file {path}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise DataError(f"corrupt data file {path}: not an IDX file of unsigned bytes")
  ndim = raw[3]
  header = 4 + 4 * ndim
  if ndim == 0 or len(raw) < header:
    raise DataError(f"corrupt data file {path}: truncated header")
  shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  expected = header + int(np.prod(shape))
  if len(raw) != expected:
    raise DataError(f"corrupt data file {path}: {len(raw)} bytes, expected {expected} "
                    f"for shape {shape}")
  return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_idx_split(folder: str, prefix: str):
  """Reads `{prefix}-images-idx3-ubyte.gz` and `{prefix}-labels-idx1-ubyte.gz`."""
  images = read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"))
  if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
    raise DataError(f"corrupt data in {folder}: {prefix} images {images.shape} do not "
                    f"match labels {labels.shape}")
  if labels.max(initial=0) > 9:
    raise DataError(f"corrupt data in {folder}: {prefix} labels outside 0-9")
  return images[..., None], labels.astype(np.int64)


_CIFAR_RECORD = 1 + 32 * 32 * 3


def _read_records(path: str, record_size: int) -> np.ndarray:
  """The fixed-size byte records of a CIFAR binary file, [n, record_size] uint8.

  Raises:
    DataError: the file is missing or is not a whole, non-zero number of records.
  """
  if not os.path.isfile(path):
    raise DataError(f"missing data file {path}")
  raw = np.fromfile(path, dtype=np.uint8)
  if raw.size == 0 or raw.size % record_size:
    raise DataError(f"corrupt data file {path}: {raw.size} bytes is not a whole number "
                    f"of {record_size}-byte records")
  return raw.reshape(-1, record_size)


def read_cifar_batch(path: str):
  """Reads a CIFAR-10 binary batch (label byte + R, G, B planes of 32x32 per record).

  Files with fewer than the official 10000 records are accepted.
  """
  records = _read_records(path, _CIFAR_RECORD)
  labels = records[:, 0].astype(np.int64)
  if labels.max() > 9:
    raise DataError(f"corrupt data file {path}: labels outside 0-9")
  images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


_CIFAR100_RECORD = 2 + 32 * 32 * 3


def read_cifar100_binary(path: str):
  """Reads a CIFAR-100 binary file (`train.bin` / `test.bin` of `cifar-100-binary/`).

  A record is the coarse label byte (0-19), the fine label byte (0-99), then
  the R, G, B planes of a 32x32 image. Files with fewer than the official
  50000 / 10000 records are accepted.

  Returns:
    `(images, fine_labels, coarse_labels)`: uint8 [n, 32, 32, 3], int64 [n], int64 [n].

  Raises:
    DataError: the file is missing, is not a whole number of records, or holds
      a label out of range; the message names the file.
  """
  records = _read_records(path, _CIFAR100_RECORD)
  coarse = records[:, 0].astype(np.int64)
  fine = records[:, 1].astype(np.int64)
  if coarse.max() > 19 or fine.max() > 99:
    raise DataError(f"corrupt data file {path}: coarse labels outside 0-19 or fine labels "
                    "outside 0-99")
  images = records[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, fine, coarse
