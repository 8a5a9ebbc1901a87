"""TensorBoard event files of a run: every number the run's CSVs hold, per level.

The runner gives each level (`trial_<t>/prune_iter_<k>/`) a `LevelWriter`,
which writes one event folder `<run_dir>/tensorboard/trial_<t>/prune_iter_<k>/`
(point TensorBoard at `<run_dir>/tensorboard`, or at the base directory to
compare runs). Each CSV row the runner appends becomes one scalar per numeric
column, tagged `<split>/<column>` (`train/loss`, `test/adv_acc`,
`train/train-activation_sparsity_average`, `train/lr`, ...) at step = the row's
`iteration`. Values are stored as float32, as `tf.summary.scalar` stores them.

Writing needs TensorFlow only: scalars go through `tf.summary.write` with the
scalars plugin's metadata (what `tf.summary.scalar` does once the
`tensorboard` package is installed), so a run never fails for want of it.
Reading back (`read_scalars`) uses TensorBoard's `EventAccumulator` and needs
the `tensorboard` package.

Resuming. The caller writes each row once, when it is appended to the logs;
rows restored from a checkpoint are not written again. A process killed after
writing an evaluation but before checkpointing it writes that evaluation again
when resumed, into a new event file of the same folder: TensorBoard then holds
two (equal, as a resumed run computes the same numbers) points at that step,
and `read_scalars` keeps the last. A level that starts over (no checkpoint)
opens its writer with `fresh=True`, which deletes the folder's old event
files, so an abandoned attempt never shows beside the new one.
"""

import glob
import math
import numbers
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import tensorflow as tf

from tensorflow.core.framework import summary_pb2

TENSORBOARD_DIR = "tensorboard"
EVENT_FILE_PATTERN = "events.out.tfevents.*"
STEP_COLUMN = "iteration"
# The metadata `tf.summary.scalar` attaches (tensorboard.plugins.scalar); the
# plugin's content is its version 0, which serialises to nothing.
_SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))


def level_log_dir(run_dir: str, trial: int, level: int) -> str:
  """The event folder of one level: `<run_dir>/tensorboard/trial_<t>/prune_iter_<k>`."""
  return os.path.join(run_dir, TENSORBOARD_DIR, f"trial_{trial}", f"prune_iter_{level}")


def _number(value) -> Optional[float]:
  """`value` as a finite float, or None when it is not a number (text, None, NaN, inf).

  Booleans are flags, not measurements, and are left out too.
  """
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "iuf":
    value = value.item()
  if not isinstance(value, numbers.Real):
    return None
  value = float(value)
  return value if math.isfinite(value) else None


class LevelWriter:
  """Writes the CSV rows of one level as TensorBoard scalars.

  Create it where the level starts; call `write_row` whenever a row is
  appended to the logs, `flush` where the logs are checkpointed and `close`
  when the level ends. Also a context manager (closes on exit).

  Args:
    run_dir: the run folder.
    trial: the trial number.
    level: the prune iteration.
    fresh: the level starts over: delete the event files an earlier attempt
      left in its folder. False (a resumed level) appends a new event file.
  """

  def __init__(self, run_dir: str, trial: int, level: int, fresh: bool = False):
    self.directory = level_log_dir(run_dir, trial, level)
    if fresh:
      for path in glob.glob(os.path.join(self.directory, EVENT_FILE_PATTERN)):
        os.remove(path)
    os.makedirs(self.directory, exist_ok=True)
    self._writer = tf.summary.create_file_writer(self.directory)

  def write_row(self, split: str, row: Mapping[str, object]) -> int:
    """Writes every numeric column of `row` as `<split>/<column>` at step `row["iteration"]`.

    Args:
      split: "train", "valid" or "test" (any name without "/" is accepted).
      row: a CSV row; `iteration` is the step. Values that are not finite
        numbers (text, None, NaN, inf: an empty CSV cell) are skipped.

    Returns:
      How many scalars were written.

    Raises:
      ValueError: an empty split or one holding "/", a row without a
        non-negative integer `iteration`, or a closed writer.
    """
    if not split or "/" in split:
      raise ValueError(f"split must be a non-empty name without '/', got {split!r}")
    if self._writer is None:
      raise ValueError(f"the TensorBoard writer of {self.directory} is closed")
    step = _number(row.get(STEP_COLUMN))
    if step is None or step < 0 or step != int(step):
      raise ValueError(f"a {split} row needs a non-negative integer {STEP_COLUMN!r}, got "
                       f"{row.get(STEP_COLUMN)!r}")
    written = 0
    with self._writer.as_default(step=int(step)):
      for column, value in row.items():
        value = _number(value)
        if column == STEP_COLUMN or value is None:
          continue
        tf.summary.write(f"{split}/{column}", tf.constant(value, tf.float32),
                         metadata=_SCALAR_METADATA)
        written += 1
    return written

  def flush(self):
    """Writes what is buffered to disk (call it where the logs are checkpointed)."""
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    """Flushes and closes the event file; further `close` calls do nothing."""
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


def read_scalars(directory: str) -> Dict[str, List[Tuple[int, float]]]:
  """Reads the scalars of the event files in `directory` (not its subfolders).

  Args:
    directory: an event folder, e.g. `level_log_dir(run_dir, trial, level)`.

  Returns:
    {tag: [(step, value), ...]} sorted by step; where a step was written more
    than once (a resumed level, see the module docstring) the last value
    written is kept.

  Raises:
    ImportError: the `tensorboard` package is missing (with how to install it).
    FileNotFoundError: `directory` holds no event file.
  """
  try:
    # pylint: disable=g-import-not-at-top,import-outside-toplevel  Optional: reading only.
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util
  except ImportError as error:
    raise ImportError("reading TensorBoard event files needs the tensorboard package: "
                      "pip install -r requirements.txt (or pip install tensorboard)") from error
  if not glob.glob(os.path.join(directory, EVENT_FILE_PATTERN)):
    raise FileNotFoundError(f"no TensorBoard event file ({EVENT_FILE_PATTERN}) in {directory}")
  # Size 0 keeps every point (the default samples 10 tensors per tag); no
  # purging: a resumed writer does not log the restart TensorBoard looks for.
  accumulator = event_accumulator.EventAccumulator(
      directory, size_guidance={event_accumulator.TENSORS: 0,
                                event_accumulator.SCALARS: 0},
      purge_orphaned_data=False)
  accumulator.Reload()
  tags = accumulator.Tags()
  by_tag: Dict[str, Dict[int, float]] = {}
  for tag in tags.get(event_accumulator.TENSORS, []):
    if accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "scalars":
      continue
    points = by_tag.setdefault(tag, {})
    for event in accumulator.Tensors(tag):  # In the order written: the last wins.
      points[int(event.step)] = float(tensor_util.make_ndarray(event.tensor_proto))
  for tag in tags.get(event_accumulator.SCALARS, []):  # Summaries of TF1's writer.
    points = by_tag.setdefault(tag, {})
    for event in accumulator.Scalars(tag):
      points[int(event.step)] = float(event.value)
  return {tag: sorted(points.items()) for tag, points in sorted(by_tag.items())}
