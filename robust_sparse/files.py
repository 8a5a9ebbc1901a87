"""Crash-safe file writes: a killed run never leaves a half-written file behind."""

import contextlib
import csv
import io
import json
import os
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode="w"):
  """Writes to a temporary file beside `path`, then renames it into place."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_json(path, obj):
  with atomic_open(path) as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def read_json(path):
  with open(path) as f:
    return json.load(f)


def write_csv(path, columns, rows):
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(columns)
  for row in rows:
    writer.writerow([row[c] for c in columns])
  with atomic_open(path) as f:
    f.write(buffer.getvalue())


def save_arrays(path, arrays):
  """Saves a dict of arrays as `.npz`, atomically."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def load_arrays(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def save_npy(path, array):
  with atomic_open(path, "wb") as f:
    np.save(f, array)
