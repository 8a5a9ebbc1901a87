"""Crash-safe file writes: a killed run never leaves a half-written file behind."""

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile

import numpy as np


@contextlib.contextmanager
def atomic_open(path, mode="w", exclusive=False):
  """Writes to a temporary file beside `path`, then renames it into place.

  With `exclusive`, it is linked into place instead, which raises
  FileExistsError where `path` exists: of two processes racing to write it,
  the first one's file stays whole. On a file system without hard links,
  `path` is then created exclusively and the file copied in (a reader racing
  the writer may see it before it is whole).
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
  try:
    with os.fdopen(fd, mode) as f:
      yield f
    if not exclusive:
      os.replace(tmp, path)
      return
    try:
      os.link(tmp, path)
    except FileExistsError:
      raise
    except OSError:  # No hard links here.
      with open(tmp, "rb") as source, open(path, "xb") as target:
        shutil.copyfileobj(source, target)
  finally:
    with contextlib.suppress(OSError):
      os.remove(tmp)  # Gone already where it was renamed into place.


def write_json(path, obj, exclusive=False):
  """`obj` as indented JSON; `exclusive`: as `atomic_open`'s (FileExistsError if `path`
  exists)."""
  with atomic_open(path, exclusive=exclusive) as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def write_json_once(path, obj) -> bool:
  """Writes `path` whole (as `write_json`) unless it exists; False if it did (the first
  of two racing writers wins, `atomic_open`'s `exclusive`)."""
  try:
    write_json(path, obj, exclusive=True)
    return True
  except FileExistsError:
    return False


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


def csv_record(path) -> dict:
  """What a finished log must hold: `{"rows", "last_iteration", "sha256"}` of a CSV.

  Written into a level's `metadata.json` by the runner and checked by the
  analysis (`check_csv_record`), so a truncated, edited or replaced log is
  refused instead of reported. `last_iteration` is the `iteration` cell of the
  last row (None without rows).
  """
  with open(path, "rb") as f:
    data = f.read()
  lines = [line for line in data.decode().splitlines() if line.strip()]
  last = None
  if len(lines) > 1:
    header = next(csv.reader([lines[0]]))
    row = next(csv.reader([lines[-1]]))
    if "iteration" in header and len(row) > header.index("iteration"):
      last = int(float(row[header.index("iteration")]))
  return {"rows": max(0, len(lines) - 1), "last_iteration": last,
          "sha256": hashlib.sha256(data).hexdigest()}


def check_csv_record(path, expected: dict):
  """None if the CSV at `path` holds what `expected` (a `csv_record`) says, else why not."""
  try:
    found = csv_record(path)
  except FileNotFoundError:
    return "missing"
  except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
    return f"unreadable ({error})"
  if found["rows"] != expected.get("rows"):
    return f"{found['rows']} rows where its metadata.json records {expected.get('rows')}"
  if found["last_iteration"] != expected.get("last_iteration"):
    return (f"last iteration {found['last_iteration']} where its metadata.json records "
            f"{expected.get('last_iteration')}")
  if expected.get("sha256") and found["sha256"] != expected["sha256"]:
    return "contents changed since the run wrote it (checksum differs from metadata.json)"
  return None


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
