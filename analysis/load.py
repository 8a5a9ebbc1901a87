"""Finds the run folders written by `run_experiments` and loads them into one table.

A run is any folder under the base directory that holds `hparams.json`; the
depth is not assumed. Inside a run, `trial_<t>/prune_iter_<k>/` holds
`train.csv`, `valid.csv`, `test.csv` and `metadata.json`. A prune iteration is
finished iff its `metadata.json` says `"completed": true`.

`load_study` returns a `Study`: `evaluations`, a tidy `pandas.DataFrame` with
one row per (run, trial, prune iteration, split, evaluation), and `problems`,
one line per missing trial, missing or unfinished prune iteration, or skipped
run. Unfinished prune iterations are left out of `evaluations` (their CSVs are
partial, so "the end of training" would be wrong), but the rest of their run
is kept; a run with a corrupt CSV or JSON file is skipped as a whole.
"""

import csv
import dataclasses
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import pandas as pd

HPARAMS_FILE = "hparams.json"
METADATA_FILE = "metadata.json"
SPLITS = ("train", "valid", "test")
METRIC_COLUMNS = ("loss", "acc", "adv_acc", "nat_loss", "adv_loss")
CSV_COLUMNS = ("iteration",) + METRIC_COLUMNS

# Hyper-parameters that define the axes of the study (figures and tables are
# organised by them), and bookkeeping ones that never distinguish two settings.
AXIS_KEYS = ("dataset", "model", "experiment", "attack", "adv_train")
BOOKKEEPING_KEYS = frozenset(
    ("trials", "prune_iters", "force", "base_dir", "data_dir", "devices",
     "output_dir", "run_dir"))

_TRIAL_DIR = re.compile(r"^trial_(\d+)$")
_PRUNE_ITER_DIR = re.compile(r"^prune_iter_(\d+)$")


class AnalysisError(ValueError):
  """Bad input for the analysis (missing folder, no runs, no match)."""


@dataclasses.dataclass
class Study:
  """Everything loaded from one base directory.

  Attributes:
    evaluations: one row per (run, trial, prune iteration, split, evaluation);
      see `EVALUATION_COLUMNS`.
    runs: one row per loaded run: `run_dir` plus its hyper-parameters.
    problems: human-readable warnings (missing or unfinished work, skipped
      runs), each naming the path concerned.
  """
  evaluations: pd.DataFrame
  runs: pd.DataFrame
  problems: List[str]


EVALUATION_COLUMNS = (
    "run_dir", "dataset", "model", "experiment", "attack", "adv_train",
    "training_mode", "setting", "trial", "prune_iteration",
    "percent_weights_remaining", "weights_remaining", "weights_total", "split",
) + CSV_COLUMNS


def training_mode(adv_train: bool) -> str:
  """Returns "adversarial" or "natural", the label used in figures."""
  return "adversarial" if adv_train else "natural"


def find_run_dirs(base_dir: str) -> List[str]:
  """Returns every folder under `base_dir` that holds `hparams.json`, sorted.

  Raises:
    AnalysisError: if `base_dir` does not exist or is not a folder.
  """
  if not os.path.exists(base_dir):
    raise AnalysisError(f"base_dir {base_dir!r} does not exist")
  if not os.path.isdir(base_dir):
    raise AnalysisError(f"base_dir {base_dir!r} is not a folder")
  run_dirs = []
  for folder, subfolders, files in os.walk(base_dir):
    if HPARAMS_FILE in files:
      run_dirs.append(folder)
      subfolders[:] = []  # A run does not contain other runs.
    else:
      subfolders.sort()
  return sorted(run_dirs)


def _read_json(path: str) -> dict:
  with open(path) as f:
    value = json.load(f)
  if not isinstance(value, dict):
    raise ValueError(f"expected a JSON object, got {type(value).__name__}")
  return value


def _matches(hparams: dict, filters: Dict[str, Optional[Sequence]]) -> bool:
  for key, allowed in filters.items():
    if allowed is None:
      continue
    if hparams.get(key) not in allowed:
      return False
  return True


def _numbered_subdirs(folder: str, pattern: re.Pattern) -> Dict[int, str]:
  numbered = {}
  for name in os.listdir(folder):
    match = pattern.match(name)
    if match and os.path.isdir(os.path.join(folder, name)):
      numbered[int(match.group(1))] = os.path.join(folder, name)
  return numbered


def expected_prune_iterations(hparams: dict) -> int:
  """Returns how many prune iterations a finished run has per trial."""
  if hparams.get("experiment") == "no_pruning":
    return 1
  return int(hparams.get("prune_iters", 0)) + 1


def _read_csv(path: str) -> np.ndarray:
  """Returns the `CSV_COLUMNS` of a log as an (evaluations, 6) float array.

  The csv module is several times faster than `pandas.read_csv` on thousands
  of small files, which is what a 20-level, 5-trial study is.
  """
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError("empty file (no header)")
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
      raise ValueError(f"missing columns {missing}")
    positions = [header.index(c) for c in CSV_COLUMNS]
    rows = []
    for line_number, row in enumerate(reader, start=2):
      if not row:
        continue
      try:
        rows.append([float(row[i]) for i in positions])
      except (IndexError, ValueError):
        raise ValueError(f"line {line_number} is not numeric: "
                         f"{','.join(row)[:60]!r}") from None
  return np.asarray(rows, dtype=float).reshape(-1, len(CSV_COLUMNS))


class _CorruptFile(Exception):
  """A file of a run could not be parsed; the run is skipped."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


def _load_prune_iteration(folder: str) -> Optional[Tuple[dict, Dict[str,
                                                                     np.ndarray]]]:
  """Returns (metadata, {split: log array}), or None when unfinished."""
  metadata_path = os.path.join(folder, METADATA_FILE)
  if not os.path.exists(metadata_path):
    return None
  try:
    metadata = _read_json(metadata_path)
  except (ValueError, OSError) as error:
    raise _CorruptFile(metadata_path, str(error)) from None
  if not metadata.get("completed", False):
    return None
  try:
    level = {
        "percent_weights_remaining": float(
            metadata["percent_weights_remaining"]),
        "weights_remaining": int(metadata.get("weights_remaining", -1)),
        "weights_total": int(metadata.get("weights_total", -1)),
    }
  except (KeyError, TypeError, ValueError) as error:
    raise _CorruptFile(metadata_path, f"bad or missing field {error}") from None
  logs = {}
  for split in SPLITS:
    path = os.path.join(folder, f"{split}.csv")
    try:
      logs[split] = _read_csv(path)
    except (ValueError, OSError) as error:
      raise _CorruptFile(path, str(error)) from None
  return level, logs


def _load_run(run_dir: str, hparams: dict,
              problems: List[str]) -> Optional[pd.DataFrame]:
  """Loads one run; appends its problems; returns None if it is skipped."""
  trials = int(hparams.get("trials", 1))
  prune_iterations = expected_prune_iterations(hparams)
  trial_dirs = _numbered_subdirs(run_dir, _TRIAL_DIR)
  blocks, labels = [], []
  for trial in range(max(trials, max(trial_dirs, default=-1) + 1)):
    if trial not in trial_dirs:
      problems.append(f"{run_dir}: trial {trial}: missing (expected "
                      f"{trials} trials)")
      continue
    iteration_dirs = _numbered_subdirs(trial_dirs[trial], _PRUNE_ITER_DIR)
    for prune_iteration in range(
        max(prune_iterations, max(iteration_dirs, default=-1) + 1)):
      if prune_iteration not in iteration_dirs:
        problems.append(f"{run_dir}: trial {trial}, prune iteration "
                        f"{prune_iteration}: missing")
        continue
      loaded = _load_prune_iteration(iteration_dirs[prune_iteration])
      if loaded is None:
        problems.append(f"{run_dir}: trial {trial}, prune iteration "
                        f"{prune_iteration}: unfinished (no completed "
                        f"{METADATA_FILE}); left out")
        continue
      level, logs = loaded
      for split in SPLITS:
        blocks.append(logs[split])
        labels.append((trial, prune_iteration, level, split,
                       len(logs[split])))
  if not blocks:
    problems.append(f"{run_dir}: no finished prune iteration; run skipped")
    return None

  def repeated(get):
    return np.repeat([get(label) for label in labels],
                     [label[-1] for label in labels])

  values = np.concatenate(blocks)
  run = pd.DataFrame({
      "run_dir": run_dir,
      "dataset": str(hparams.get("dataset", "?")),
      "model": str(hparams.get("model", "?")),
      "experiment": str(hparams.get("experiment", "?")),
      "attack": str(hparams.get("attack", "?")),
      "adv_train": bool(hparams.get("adv_train", False)),
      "trial": repeated(lambda label: label[0]).astype(int),
      "prune_iteration": repeated(lambda label: label[1]).astype(int),
      "percent_weights_remaining": repeated(
          lambda label: label[2]["percent_weights_remaining"]).astype(float),
      "weights_remaining": repeated(
          lambda label: label[2]["weights_remaining"]).astype(int),
      "weights_total": repeated(
          lambda label: label[2]["weights_total"]).astype(int),
      "split": repeated(lambda label: label[3]).astype(str),
      "iteration": values[:, 0].astype(int),
  })
  for position, column in enumerate(METRIC_COLUMNS, start=1):
    run[column] = values[:, position]
  return run


def setting_keys(runs: pd.DataFrame) -> List[str]:
  """Returns the hyper-parameters that tell apart runs of one experiment.

  A key counts if every run has it, it is neither an axis of the study nor
  bookkeeping, and it takes more than one value among the runs of one
  (dataset, model, experiment). Keys that only differ between experiments (a
  rewind point that only `rewind` sets) therefore do not split the study.
  """
  keys = []
  for key in runs.columns:
    if key in AXIS_KEYS or key in BOOKKEEPING_KEYS or key == "run_dir":
      continue
    values = runs[key]
    if values.isna().any():
      continue
    as_text = values.map(lambda v: json.dumps(v, sort_keys=True))
    varies = as_text.groupby(
        [runs["dataset"], runs["model"], runs["experiment"]]).nunique()
    if (varies > 1).any():
      keys.append(key)
  return sorted(keys)


def _setting_labels(runs: pd.DataFrame) -> pd.Series:
  keys = setting_keys(runs)
  if not keys:
    return pd.Series("", index=runs.index)
  return runs.apply(
      lambda row: ", ".join(f"{k}={row[k]}" for k in keys), axis=1)


def load_study(base_dir: str,
               datasets: Optional[Iterable[str]] = None,
               models: Optional[Iterable[str]] = None,
               attacks: Optional[Iterable[str]] = None,
               experiments: Optional[Iterable[str]] = None,
               adv_train: Optional[bool] = None) -> Study:
  """Loads every run under `base_dir` that matches the filters.

  Args:
    base_dir: folder searched recursively for `hparams.json`.
    datasets, models, attacks, experiments: keep only runs whose hyper-parameter
      is one of these; None keeps all.
    adv_train: keep only runs with this `adv_train`; None keeps both.

  Returns:
    A `Study`. Problems are also logged as warnings.

  Raises:
    AnalysisError: if `base_dir` is missing, holds no run, no run matches the
      filters, or no matching run could be loaded.
  """
  run_dirs = find_run_dirs(base_dir)
  if not run_dirs:
    raise AnalysisError(
        f"no runs under {base_dir!r} (no {HPARAMS_FILE} found in any folder)")
  filters = {
      "dataset": None if datasets is None else list(datasets),
      "model": None if models is None else list(models),
      "attack": None if attacks is None else list(attacks),
      "experiment": None if experiments is None else list(experiments),
      "adv_train": None if adv_train is None else [bool(adv_train)],
  }
  problems: List[str] = []
  matching = []
  for run_dir in run_dirs:
    path = os.path.join(run_dir, HPARAMS_FILE)
    try:
      hparams = _read_json(path)
    except (ValueError, OSError) as error:
      problems.append(f"{path}: corrupt ({error}); run skipped")
      continue
    if _matches(hparams, filters):
      matching.append((run_dir, hparams))
  if not matching:
    _log(problems)
    readable = len(run_dirs) - len(problems)
    if not readable:
      raise AnalysisError(
          f"no readable runs under {base_dir!r}: every one of the "
          f"{len(run_dirs)} {HPARAMS_FILE} files is corrupt")
    active = {k: v for k, v in filters.items() if v is not None}
    raise AnalysisError(
        f"none of the {readable} runs under {base_dir!r} match the "
        f"filters {active}")

  run_frames, run_rows = [], []
  for run_dir, hparams in matching:
    try:
      frame = _load_run(run_dir, hparams, problems)
    except _CorruptFile as error:
      problems.append(f"{error.path}: corrupt ({error.reason}); run "
                      f"{run_dir} skipped")
      continue
    if frame is not None:
      run_frames.append(frame)
      run_rows.append({"run_dir": run_dir, **hparams})
  _log(problems)
  if not run_frames:
    raise AnalysisError(
        f"none of the {len(matching)} matching runs under {base_dir!r} has a "
        "readable, finished prune iteration")

  runs = pd.DataFrame(run_rows)
  runs["adv_train"] = runs["adv_train"].astype(bool)
  runs["setting"] = _setting_labels(runs)
  evaluations = pd.concat(run_frames, ignore_index=True)
  evaluations = evaluations.merge(runs[["run_dir", "setting"]], on="run_dir")
  evaluations["training_mode"] = evaluations["adv_train"].map(training_mode)
  evaluations = evaluations.loc[:, list(EVALUATION_COLUMNS)]
  return Study(evaluations=evaluations, runs=runs, problems=problems)


def _log(problems: List[str]) -> None:
  for problem in problems:
    logging.warning("%s", problem)
