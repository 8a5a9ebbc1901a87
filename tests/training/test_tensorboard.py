"""Tests of `robust_sparse.training.tensorboard`: the event files hold the numbers the CSVs hold.

Rows shaped like the runner's (the seed's columns, `epoch`, `lr`, the
activation measurements, a text column and empty cells) are written to a CSV
with the runner's writer and to TensorBoard, then read back: through
TensorBoard's `EventAccumulator` (`read_scalars`) and, independently of the
`tensorboard` package, through TensorFlow's own event reader.
"""

import glob
import math
import os

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from robust_sparse.core import files
from robust_sparse.training import tensorboard

MEASURED = ("train-activation_sparsity_hidden_1_activation",
            "train-activation_sparsity_average",
            "train-effective_gradient_sparsity_1e-06_average",
            "eval-activation_sparsity_average")
TRAIN_COLUMNS = ("iteration", "loss", "acc", "adv_acc", "nat_loss", "adv_loss", "epoch",
                 "lr") + MEASURED
EVAL_COLUMNS = TRAIN_COLUMNS[:8]


def _rows(split, iterations):
  """Rows with distinct, non-round numbers (float32 rounding shows), like the runner's."""
  rng = np.random.default_rng(len(split))
  columns = TRAIN_COLUMNS if split == "train" else EVAL_COLUMNS
  rows = []
  for iteration in iterations:
    row = {"iteration": iteration}
    row.update({c: float(rng.uniform(0.0, 3.0)) for c in columns[1:]})
    row["epoch"] = round(iteration / 7, 6)
    rows.append(row)
  return rows


def _write_level(run_dir, trial=0, level=0):
  """Writes train/valid/test CSVs and event files of one level; returns {split: rows}."""
  logs = {"train": _rows("train", (50, 100, 150)),
          "valid": _rows("valid", (0, 50, 100, 150)),
          "test": _rows("test", (0, 50, 100, 150))}
  logs["train"][1]["train-activation_sparsity_average"] = None  # Not measured: empty cell.
  directory = os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}")
  os.makedirs(directory)
  with tensorboard.LevelWriter(run_dir, trial, level, fresh=True) as writer:
    for split, rows in logs.items():
      columns = TRAIN_COLUMNS if split == "train" else EVAL_COLUMNS
      files.write_csv(os.path.join(directory, f"{split}.csv"), columns, rows)
      for row in rows:
        writer.write_row(split, row)
  return logs


def test_event_files_hold_the_numbers_of_the_csvs(tmp_path):
  run_dir = str(tmp_path / "run")
  _write_level(run_dir, trial=1, level=2)
  log_dir = tensorboard.level_log_dir(run_dir, 1, 2)
  assert log_dir == os.path.join(run_dir, "tensorboard", "trial_1", "prune_iter_2")
  scalars = tensorboard.read_scalars(log_dir)

  expected_tags = set()
  for split in ("train", "valid", "test"):
    table = pd.read_csv(os.path.join(run_dir, "trial_1", "prune_iter_2", f"{split}.csv"))
    for column in table.columns.drop("iteration"):
      tag = f"{split}/{column}"
      expected_tags.add(tag)
      present = table[column].notna()
      assert [step for step, _ in scalars[tag]] == list(table.loc[present, "iteration"])
      np.testing.assert_allclose([value for _, value in scalars[tag]],
                                 table.loc[present, column].astype(np.float32),
                                 rtol=1e-6, atol=0, err_msg=tag)
  assert set(scalars) == expected_tags
  assert "train/iteration" not in scalars
  # The empty cell (iteration 100) is left out; its neighbours are there.
  assert [s for s, _ in scalars["train/train-activation_sparsity_average"]] == [50, 150]
  assert len(scalars["test/lr"]) == 4


def test_tensorflow_reads_the_events_as_tensorboard_scalars(tmp_path):
  """Without the tensorboard package: each value is a float32 scalar of the scalars plugin."""
  run_dir = str(tmp_path / "run")
  logs = _write_level(run_dir)
  expected = {(f"{split}/{column}", row["iteration"]): value
              for split, rows in logs.items() for row in rows
              for column, value in row.items() if column != "iteration" and value is not None}
  found = {}
  for path in glob.glob(os.path.join(tensorboard.level_log_dir(run_dir, 0, 0),
                                     tensorboard.EVENT_FILE_PATTERN)):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"
        array = tf.make_ndarray(value.tensor)
        assert array.shape == () and array.dtype == np.float32
        found[(value.tag, event.step)] = float(array)
  assert set(found) == set(expected)
  for key, value in expected.items():
    assert found[key] == pytest.approx(value, rel=1e-6), key


def test_non_numeric_and_non_finite_values_are_skipped(tmp_path):
  writer = tensorboard.LevelWriter(str(tmp_path), 0, 0)
  count = writer.write_row("test", {
      "iteration": np.int64(10), "acc": np.float32(0.25), "loss": 2, "zero": 0.0,
      "array": np.array(1.5), "note": "phase 2", "missing": None, "nan": math.nan,
      "inf": math.inf, "flag": True})
  writer.close()
  writer.close()  # A second close does nothing.
  assert count == 4
  scalars = tensorboard.read_scalars(tensorboard.level_log_dir(str(tmp_path), 0, 0))
  assert scalars == {"test/acc": [(10, 0.25)], "test/array": [(10, 1.5)],
                     "test/loss": [(10, 2.0)], "test/zero": [(10, 0.0)]}


def test_resumed_level_appends_and_rewritten_steps_keep_the_last_value(tmp_path):
  run_dir = str(tmp_path)
  log_dir = tensorboard.level_log_dir(run_dir, 0, 3)
  with tensorboard.LevelWriter(run_dir, 0, 3, fresh=True) as writer:
    for iteration, loss in ((0, 2.0), (50, 1.0), (100, 0.75)):
      writer.write_row("test", {"iteration": iteration, "loss": loss})
  # Killed after writing iteration 100, before its checkpoint: the resumed
  # process (a new event file) writes iteration 100 again, then goes on.
  with tensorboard.LevelWriter(run_dir, 0, 3) as writer:
    writer.write_row("test", {"iteration": 100, "loss": 0.5})
    writer.write_row("test", {"iteration": 150, "loss": 0.25})
  assert len(glob.glob(os.path.join(log_dir, tensorboard.EVENT_FILE_PATTERN))) == 2
  assert tensorboard.read_scalars(log_dir)["test/loss"] == [
      (0, 2.0), (50, 1.0), (100, 0.5), (150, 0.25)]

  # A level that starts over drops the abandoned attempt's curve.
  with tensorboard.LevelWriter(run_dir, 0, 3, fresh=True) as writer:
    writer.write_row("test", {"iteration": 0, "loss": 3.0})
  assert len(glob.glob(os.path.join(log_dir, tensorboard.EVENT_FILE_PATTERN))) == 1
  assert tensorboard.read_scalars(log_dir) == {"test/loss": [(0, 3.0)]}


def test_flush_makes_rows_readable_while_the_writer_is_open(tmp_path):
  writer = tensorboard.LevelWriter(str(tmp_path), 2, 0)
  writer.write_row("train", {"iteration": 5, "loss": 0.5})
  writer.flush()
  scalars = tensorboard.read_scalars(tensorboard.level_log_dir(str(tmp_path), 2, 0))
  writer.close()
  assert scalars == {"train/loss": [(5, 0.5)]}


@pytest.mark.parametrize("split, row, message", [
    ("test", {"loss": 1.0}, "non-negative integer 'iteration'"),
    ("test", {"iteration": 2.5, "loss": 1.0}, "non-negative integer 'iteration'"),
    ("test", {"iteration": -1, "loss": 1.0}, "non-negative integer 'iteration'"),
    ("test", {"iteration": "ten", "loss": 1.0}, "non-negative integer 'iteration'"),
    ("", {"iteration": 0}, "non-empty name"),
    ("train/x", {"iteration": 0}, "without '/'"),
])
def test_bad_rows_are_refused(tmp_path, split, row, message):
  with tensorboard.LevelWriter(str(tmp_path), 0, 0) as writer:
    with pytest.raises(ValueError, match=message):
      writer.write_row(split, row)


def test_closed_writer_and_empty_folder_are_errors(tmp_path):
  writer = tensorboard.LevelWriter(str(tmp_path), 0, 0)
  writer.close()
  with pytest.raises(ValueError, match="closed"):
    writer.write_row("test", {"iteration": 0, "loss": 1.0})
  with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
    tensorboard.read_scalars(str(tmp_path))


def test_a_runner_level_writes_every_csv_number_to_tensorboard(tmp_path):
  """The runner's own event files, read back, equal its train/valid/test CSVs."""
  from robust_sparse.data import load_dataset  # pylint: disable=import-outside-toplevel
  from robust_sparse.experiments.runner import (  # pylint: disable=import-outside-toplevel
      Runner, level_dir)
  from robust_sparse.core.hparams import Hparams  # pylint: disable=import-outside-toplevel
  hp = Hparams(dataset="sklearn_digits", experiment="reinit_orig", prune_iters=1, trials=1,
               train_iters=40, eval_every=20, eps=0.1, sharpness_examples=0,
               measure=("activation_sparsity",))
  run_dir = Runner(hp, load_dataset("sklearn_digits", None, 300), str(tmp_path),
                   progress=False).run()
  for level in (0, 1):
    scalars = tensorboard.read_scalars(
        os.path.join(run_dir, "tensorboard", "trial_0", f"prune_iter_{level}"))
    checked = 0
    for split in ("train", "valid", "test"):
      frame = pd.read_csv(os.path.join(level_dir(run_dir, 0, level), f"{split}.csv"))
      for column in frame.columns:
        values = frame[column].to_numpy(float)
        if column == "iteration" or np.isnan(values).all():
          continue
        steps, got = zip(*scalars[f"{split}/{column}"])
        assert list(steps) == frame["iteration"].tolist()
        np.testing.assert_allclose(got, values, rtol=1e-6)
        checked += 1
    assert checked > 20
    assert "train/lr" in scalars and "train/train-activation_sparsity_average" in scalars
