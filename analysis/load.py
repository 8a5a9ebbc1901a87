"""Finds the run folders written by `run_experiments` and loads them into one table.

A run is any folder under the base directory that holds `hparams.json`; the
depth is not assumed. Inside a run, `trial_<t>/prune_iter_<k>/` holds
`train.csv`, `valid.csv`, `test.csv` and `metadata.json`. A prune iteration
(level) is finished iff its `metadata.json` says `"completed": true`; a level
whose loss became NaN or infinite says `"diverged": true` instead.

`load_study` returns a `Study`: `evaluations`, a tidy `pandas.DataFrame` with
one row per (run, trial, prune iteration, split, evaluation); `runs`, one row
per run with its full hyper-parameters; `diverged`, one row per diverged
level; and `problems`, one line per missing trial, missing, unfinished or
diverged level, or skipped run. Unfinished and diverged levels are left out of
`evaluations` (their CSVs are partial, so "the end of training" would be
wrong), but the rest of their run is kept; a run with a corrupt CSV or JSON
file is skipped as a whole.

Settings. Runs are told apart by their full hyper-parameters: a field missing
from an older `hparams.json` takes its default from
`robust_sparse.core.hparams.Hparams`, and only fields that say where or how much to
run (`NOT_DISTINGUISHING_KEYS`) are ignored. Figures and tables are organised
along `AXIS_KEYS`; runs that share an axis cell but differ in any other field
get different `setting` labels ("prune_iters=3"), so they are never pooled.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import re
import types
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from absl import logging
import numpy as np
import pandas as pd

from robust_sparse.core import files as files_lib
from robust_sparse.core.hparams import NOT_HASHED, Hparams
from robust_sparse.core.run_folder import HPARAMS_FILE, METADATA_FILE
from robust_sparse.core.run_folder import LEVEL_DIR as _PRUNE_ITER_DIR
from robust_sparse.core.run_folder import TRIAL_DIR as _TRIAL_DIR
SPLITS = ("train", "valid", "test")
METRIC_COLUMNS = ("loss", "acc", "adv_acc", "nat_loss", "adv_loss")
CSV_COLUMNS = ("iteration",) + METRIC_COLUMNS

# Hyper-parameters that define the axes of the study (figures and tables are
# organised by them).
AXIS_KEYS = ("dataset", "model", "experiment", "attack", "adv_train")
# Fields that say where or how much to run, never what a trial computes: the
# engine's hash leaves out `trials` and `data_dir` (more trials extend a run),
# and output locations or a "start over" switch cannot change a number. Any
# other field, known to `Hparams` or not, tells runs apart.
NOT_DISTINGUISHING_KEYS = frozenset(
    ("trials", "data_dir", "base_dir", "out_dir", "output_dir", "run_dir",
     "force"))
# Experiments that train once, without pruning levels.
SINGLE_LEVEL_EXPERIMENTS = ("no_pruning", "train")
# Levels that are a phase of a method at one sparsity rather than a pruning level: the
# evaluations give each its own series name, {(experiment, level): series}. HYDRA's
# prune_iter_0 is its score phase (masks learned, pretrained weights frozen), as sparse as
# its prune_iter_1 (robust fine-tuning, HYDRA's result); neither is a dense level.
PHASE_SERIES = {("hydra", 0): "hydra_score"}
# How a setting label shows a field that a run lacks and that has no default.
UNSET = "unset"



class AnalysisError(ValueError):
  """Bad input for the analysis (missing folder, no runs, no match)."""


DIVERGED_COLUMNS = ("run_dir", "trial", "prune_iteration",
                    "diverged_iteration", "last_logged_iteration")


def _no_divergence() -> pd.DataFrame:
  return pd.DataFrame(columns=list(DIVERGED_COLUMNS))


@dataclasses.dataclass
class Study:
  """Everything loaded from one base directory.

  Attributes:
    evaluations: one row per (run, trial, prune iteration, split, evaluation);
      see `EVALUATION_COLUMNS`, followed by any further numeric CSV columns
      (`epoch`, `lr`, `top5`, ...), NaN where a run did not log them.
    runs: one row per loaded run: `run_dir`, its hyper-parameters (missing
      fields filled with their defaults), `setting`, `config_id` (a hash of
      the distinguishing hyper-parameters), `run_hash` (the hash of the run's
      folder name, the engine's; `config_id` where the name has none) and
      `expected_levels`.
    problems: human-readable warnings (missing, unfinished or diverged work,
      skipped runs), each naming the path concerned.
    diverged: one row per diverged level; see `DIVERGED_COLUMNS`. The run
      need not be in `runs` (a run whose every level diverged is skipped).
    configs: `distinguishing_hparams` of each loaded run, by `run_dir`.
  """
  evaluations: pd.DataFrame
  runs: pd.DataFrame
  problems: List[str]
  diverged: pd.DataFrame = dataclasses.field(default_factory=_no_divergence)
  configs: Dict[str, Dict[str, object]] = dataclasses.field(
      default_factory=dict)


EVALUATION_COLUMNS = (
    "run_dir", "dataset", "model", "experiment", "attack", "adv_train",
    "training_mode", "setting", "trial", "prune_iteration",
    "percent_weights_remaining", "weights_remaining", "weights_total", "split",
) + CSV_COLUMNS


def level_experiment(experiment: str, prune_iteration: int) -> str:
  """The series a run's level is drawn and tabulated as: `PHASE_SERIES`'s name for a
  phase level (HYDRA's score phase: `hydra_score`), else the run's experiment."""
  return PHASE_SERIES.get((experiment, int(prune_iteration)), experiment)


def training_mode(adv_train: bool) -> str:
  """Returns "adversarial" or "natural", the label used in figures."""
  return "adversarial" if adv_train else "natural"


def hparam_defaults() -> Dict[str, object]:
  """The default of every hyper-parameter, from `robust_sparse.core.hparams.Hparams`.

  Returns:
    A flat dict.
  """
  return Hparams().to_dict()


def not_distinguishing_keys() -> frozenset:
  """Fields that never tell runs apart: ours and the engine's `NOT_HASHED`."""
  return NOT_DISTINGUISHING_KEYS | frozenset(NOT_HASHED)


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


def _matches(hparams: dict, filters: Dict[str, Optional[Sequence]],
             defaults: Callable[[], Mapping]) -> bool:
  for key, allowed in filters.items():
    if allowed is None:
      continue
    value = hparams[key] if key in hparams else defaults().get(key)
    if value not in allowed:
      return False
  return True


def _numbered_subdirs(folder: str, pattern: re.Pattern) -> Dict[int, str]:
  numbered = {}
  for name in os.listdir(folder):
    match = pattern.match(name)
    if match and os.path.isdir(os.path.join(folder, name)):
      numbered[int(match.group(1))] = os.path.join(folder, name)
  return numbered


def _recorded_levels(run_dir: Optional[str]) -> Optional[int]:
  """The level count a finished level's metadata.json records (`"levels"`), if any."""
  if run_dir is None:
    return None
  for trial_dir in _numbered_subdirs(run_dir, _TRIAL_DIR).values():
    for level_dir_ in _numbered_subdirs(trial_dir, _PRUNE_ITER_DIR).values():
      try:
        with open(os.path.join(level_dir_, METADATA_FILE)) as f:
          levels = json.load(f).get("levels")
      except (OSError, ValueError):
        continue
      if isinstance(levels, int) and not isinstance(levels, bool) and levels >= 0:
        return levels
  return None


def expected_prune_iterations(hparams: dict, run_dir: Optional[str] = None) -> int:
  """Returns how many prune iterations (levels) a finished run has per trial.

  A run's level metadata records it (`"levels"`, written by the runner), so
  reading runs needs no TensorFlow. Runs made before that ask the experiment
  registry (`levels()`, which imports the experiments and TensorFlow); an
  experiment it does not know (a run from another version) has
  `prune_iters + 1` levels unless it is one of `SINGLE_LEVEL_EXPERIMENTS`.
  """
  recorded = _recorded_levels(run_dir)
  if recorded is not None:
    return recorded
  try:
    # pylint: disable=g-import-not-at-top,import-outside-toplevel  Heavy: TensorFlow.
    from robust_sparse.experiments.registry import EXPERIMENTS
    experiment = EXPERIMENTS.get(hparams.get("experiment"))
    return int(experiment(types.SimpleNamespace(**hparams)).levels())
  except Exception:  # pylint: disable=broad-except
    pass
  if hparams.get("experiment") in SINGLE_LEVEL_EXPERIMENTS:
    return 1
  return int(hparams.get("prune_iters", 0)) + 1


def _number(text: str) -> float:
  # An empty cell is a value the engine did not measure at that evaluation.
  return float(text) if text.strip() else math.nan


def _read_csv(path: str) -> Dict[str, np.ndarray]:
  """Returns every numeric column of a log, by name, as float arrays.

  `iteration` is required; the `METRIC_COLUMNS` must be numeric where present
  and are NaN where absent (older or newer engines log different columns);
  any other column is kept if all its cells are numbers and dropped otherwise.
  The csv module is several times faster than `pandas.read_csv` on thousands
  of small files, which is what a 20-level, 5-trial study is.

  Raises:
    ValueError: the header is missing, lacks `iteration`, or a required
      column holds a value that is not a number.
  """
  with open(path, newline="") as f:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError("empty file (no header)")
    rows = [(line_number, row)
            for line_number, row in enumerate(reader, start=2) if row]
  header = [name.strip() for name in header]
  if "iteration" not in header:
    raise ValueError("missing column 'iteration'")
  columns = {}
  for position, name in enumerate(header):
    if not name or name in columns:
      continue
    values = []
    for line_number, row in rows:
      try:
        values.append(_number(row[position]))
      except (IndexError, ValueError):
        if name not in CSV_COLUMNS:
          break  # Not a numeric column (a note, a phase name): skipped.
        raise ValueError(f"line {line_number} is not numeric: "
                         f"{','.join(row)[:60]!r}") from None
    else:
      columns[name] = np.asarray(values, dtype=float)
  if not np.isfinite(columns["iteration"]).all():
    raise ValueError("column 'iteration' has an empty or non-finite value")
  for name in METRIC_COLUMNS:
    if name not in columns:
      columns[name] = np.full(len(rows), np.nan)
  return columns


class _CorruptFile(Exception):
  """A file of a run could not be parsed; the run is skipped."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = path
    self.reason = reason


@dataclasses.dataclass
class _Level:
  """What one `prune_iter_<k>` folder holds.

  `status` is "finished", "unfinished", "diverged" or "refused" (its logs
  disagree with its `metadata.json`: `reason` names the file); `level` and
  `logs` are set for finished levels, `metadata` for diverged ones.
  """
  status: str
  level: Optional[dict] = None
  reason: Optional[str] = None
  logs: Optional[Dict[str, Dict[str, np.ndarray]]] = None
  metadata: Optional[dict] = None


def _load_prune_iteration(folder: str, prune_iteration: int) -> _Level:
  metadata_path = os.path.join(folder, METADATA_FILE)
  if not os.path.exists(metadata_path):
    return _Level("unfinished")
  try:
    metadata = _read_json(metadata_path)
  except (ValueError, OSError) as error:
    raise _CorruptFile(metadata_path, str(error)) from None
  # A diverged level may also say completed; its numbers are still not final.
  if metadata.get("diverged", False):
    return _Level("diverged", metadata=metadata)
  if not metadata.get("completed", False):
    return _Level("unfinished")
  # The first level is dense; an engine that does not prune may not say so.
  default_percent = 100.0 if prune_iteration == 0 else None
  try:
    level = {
        "percent_weights_remaining": float(metadata.get(
            "percent_weights_remaining", default_percent)),
        "weights_remaining": int(metadata.get("weights_remaining", -1)),
        "weights_total": int(metadata.get("weights_total", -1)),
    }
  except (TypeError, ValueError) as error:
    raise _CorruptFile(metadata_path, f"bad or missing field {error}") from None
  # A finished level's logs must be what the runner wrote: `metadata.json`
  # records each CSV's rows, last iteration and checksum (older runs: only the
  # final iteration, which the test log's last row must reach).
  records = metadata.get("files") if isinstance(metadata.get("files"), dict) else {}
  logs = {}
  for split in SPLITS:
    path = os.path.join(folder, f"{split}.csv")
    record = records.get(f"{split}.csv")
    if isinstance(record, dict):
      reason = files_lib.check_csv_record(path, record)
      if reason:
        return _Level("refused", reason=f"{path}: {reason}")
    try:
      logs[split] = _read_csv(path)
    except (ValueError, OSError) as error:
      return _Level("refused", reason=f"{path}: {error}")
  final = metadata.get("final_iteration")
  tested = logs["test"]["iteration"]
  if (not records and isinstance(final, (int, float)) and not isinstance(final, bool)
      and (not tested.size or tested.max() != final)):
    last = f"{int(tested.max())}" if tested.size else "no row"
    return _Level("refused", reason=f"{os.path.join(folder, 'test.csv')}: ends at iteration "
                  f"{last} where its metadata.json records final iteration {int(final)}")
  return _Level("finished", level=level, logs=logs)


def _last_logged_iteration(folder: str) -> float:
  """The last evaluation a diverged level logged (NaN if unreadable)."""
  try:
    iterations = _read_csv(os.path.join(folder, "test.csv"))["iteration"]
  except (ValueError, OSError):
    return math.nan
  return float(iterations.max()) if iterations.size else math.nan


def _iteration_text(value) -> str:
  try:
    return f"iteration {int(value)}"
  except (TypeError, ValueError):
    return "an unknown iteration"


# Columns of the evaluations that a CSV column may not overwrite.
_RESERVED_COLUMNS = frozenset(EVALUATION_COLUMNS) - frozenset(CSV_COLUMNS)


def _load_run(run_dir: str, hparams: dict, prune_iterations: int, problems: List[str],
              diverged: List[dict]) -> Optional[pd.DataFrame]:
  """Loads one run of `prune_iterations` levels per trial; appends its problems and
  diverged levels.

  Returns:
    The run's evaluations, or None if it has no finished level (skipped).
  """
  trials = int(hparams.get("trials", 1))
  trial_dirs = _numbered_subdirs(run_dir, _TRIAL_DIR)
  blocks, labels = [], []
  for trial in range(max(trials, max(trial_dirs, default=-1) + 1)):
    if trial not in trial_dirs:
      problems.append(f"{run_dir}: trial {trial}: missing (expected "
                      f"{trials} trials)")
      continue
    iteration_dirs = _numbered_subdirs(trial_dirs[trial], _PRUNE_ITER_DIR)
    levels = max(prune_iterations, max(iteration_dirs, default=-1) + 1)
    diverged_at = None  # The level of this trial that diverged, if any.
    for prune_iteration in range(levels):
      if prune_iteration not in iteration_dirs:
        if diverged_at is None:
          problems.append(f"{run_dir}: trial {trial}, prune iteration "
                          f"{prune_iteration}: missing")
        continue
      folder = iteration_dirs[prune_iteration]
      loaded = _load_prune_iteration(folder, prune_iteration)
      if loaded.status == "unfinished":
        problems.append(f"{run_dir}: trial {trial}, prune iteration "
                        f"{prune_iteration}: unfinished (no completed "
                        f"{METADATA_FILE}); left out")
        continue
      if loaded.status == "refused":
        problems.append(f"{run_dir}: trial {trial}, prune iteration {prune_iteration}: "
                        f"refused, {loaded.reason}; left out")
        continue
      if loaded.status == "diverged":
        at = loaded.metadata.get("diverged_iteration")
        problems.append(f"{run_dir}: trial {trial}, prune iteration "
                        f"{prune_iteration}: diverged (loss not finite) at "
                        f"{_iteration_text(at)}; left out")
        diverged.append({
            "run_dir": run_dir, "trial": trial,
            "prune_iteration": prune_iteration,
            "diverged_iteration": at if isinstance(
                at, (int, float)) and not isinstance(at, bool) else math.nan,
            "last_logged_iteration": _last_logged_iteration(folder)})
        diverged_at = prune_iteration
        continue
      for split in SPLITS:
        blocks.append(loaded.logs[split])
        labels.append((trial, prune_iteration, loaded.level, split,
                       len(loaded.logs[split]["iteration"])))
    # The levels after a diverged one cannot be trained: one line says so.
    not_run = [k for k in range(levels)
               if diverged_at is not None and k > diverged_at
               and k not in iteration_dirs]
    if not_run:
      span = (f"{not_run[0]}" if len(not_run) == 1
              else f"{not_run[0]}-{not_run[-1]}")
      problems.append(f"{run_dir}: trial {trial}, prune iteration(s) {span}: "
                      f"not run (prune iteration {diverged_at} diverged)")
  if not blocks:
    problems.append(f"{run_dir}: no finished prune iteration; run skipped")
    return None

  def repeated(get):
    return np.repeat([get(label) for label in labels],
                     [label[-1] for label in labels])

  prune_iterations = repeated(lambda label: label[1]).astype(int)
  experiment = str(hparams.get("experiment", "?"))
  run = pd.DataFrame({
      "run_dir": run_dir,
      "dataset": str(hparams.get("dataset", "?")),
      "model": str(hparams.get("model", "?")),
      # A phase level (HYDRA's score phase) is its own series, not the method's level.
      "experiment": [level_experiment(experiment, k) for k in prune_iterations],
      "attack": str(hparams.get("attack", "?")),
      "adv_train": bool(hparams.get("adv_train", False)),
      "trial": repeated(lambda label: label[0]).astype(int),
      "prune_iteration": prune_iterations,
      "percent_weights_remaining": repeated(
          lambda label: label[2]["percent_weights_remaining"]).astype(float),
      "weights_remaining": repeated(
          lambda label: label[2]["weights_remaining"]).astype(int),
      "weights_total": repeated(
          lambda label: label[2]["weights_total"]).astype(int),
      "split": repeated(lambda label: label[3]).astype(str),
      "iteration": np.concatenate(
          [block["iteration"] for block in blocks]).astype(int),
  })
  extras = sorted({name for block in blocks for name in block}
                  - set(CSV_COLUMNS) - _RESERVED_COLUMNS)
  for column in list(METRIC_COLUMNS) + extras:
    run[column] = np.concatenate([
        block.get(column, np.full(len(block["iteration"]), np.nan))
        for block in blocks])
  return run


def _canonical(value):
  """A JSON-able form in which equal hyper-parameters are equal.

  JSON writes 0.0 as 0 in some writers and tuples as lists; both must match
  the dataclass default.
  """
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, (int, float)):
    return value
  if isinstance(value, (list, tuple)):
    return [_canonical(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _canonical(v) for k, v in value.items()}
  return str(value)


def _text(value) -> str:
  return json.dumps(value, sort_keys=True)


def distinguishing_hparams(hparams: Mapping, defaults: Mapping,
                           ignored: Iterable[str]) -> Dict[str, object]:
  """The fields that define what a run computes, missing ones at their default.

  Args:
    hparams: a run's `hparams.json`.
    defaults: `hparam_defaults()`; a field neither in `hparams` nor here is
      left out (and reads as `UNSET` when another run has it).
    ignored: fields that never tell runs apart (`not_distinguishing_keys()`).

  Returns:
    {field: canonical value}, sorted by field.
  """
  ignored = set(ignored)
  filled = {**defaults, **hparams}
  return {key: _canonical(filled[key]) for key in sorted(filled)
          if key not in ignored}


def config_id(config: Mapping) -> str:
  """A short hash of `distinguishing_hparams`: equal iff the settings are."""
  return hashlib.sha256(_text(dict(config)).encode()).hexdigest()[:10]


class _Unset:
  """The value of a field that a run lacks and that has no default."""

  def __repr__(self):
    return UNSET


UNSET_VALUE = _Unset()


def format_value(value) -> str:
  """How a setting label shows a value: `0.001`, `sgd`, `True`, `[1, 2]`."""
  if value is UNSET_VALUE:
    return UNSET
  if isinstance(value, str):
    # Quoted when the bare text would read as another type or as unset.
    try:
      json.loads(value)
    except ValueError:
      return _text(value) if value == UNSET else value
    return _text(value)
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, (int, float)):
    return repr(value)
  return _text(value)


def differing_keys(configs: Sequence[Mapping],
                   cells: Optional[Sequence[tuple]] = None,
                   exclude: Iterable[str] = AXIS_KEYS) -> List[str]:
  """The fields whose value differs between configurations of one cell.

  Args:
    configs: `distinguishing_hparams` of each run.
    cells: the cell of each run (runs are compared within a cell only); None
      compares all runs with each other.
    exclude: fields never returned (the axes, shown elsewhere).

  Returns:
    The differing fields, sorted. A field that one run lacks and another has
    differs.
  """
  if cells is None:
    cells = [()] * len(configs)
  exclude = set(exclude)
  keys = sorted({key for config in configs for key in config} - exclude)
  differing = []
  for key in keys:
    seen = {}
    for config, cell in zip(configs, cells):
      seen.setdefault(cell, set()).add(
          _text(config[key]) if key in config else UNSET)
    if any(len(values) > 1 for values in seen.values()):
      differing.append(key)
  return differing


# The fields each training method reads (`--optimizer`: `<perturbation>-<base>` or a
# base optimizer); a field that only other methods read says nothing about a run.
_SAM_FIELDS = ("rho", "sam_batch_splits", "sam_bn_stats", "sam_sync")
_FISHER_MASK_FIELDS = ("num_samples", "update_freq", "pattern", "n_structured",
                       "m_structured", "nm_conv_layout")
PERTURBATION_FIELDS = {
    "sam": _SAM_FIELDS + ("implicit",),
    "asam": _SAM_FIELDS + ("asam_eta", "asam_rule"),
    "ssamf": _SAM_FIELDS + ("sparsity", "ssam_norm") + _FISHER_MASK_FIELDS,
    "ssamd": _SAM_FIELDS + ("sparsity", "ssam_norm", "update_freq", "drop_rate",
                            "drop_strategy", "growth_strategy"),
}
BASE_OPTIMIZER_FIELDS = {"sgd": ("momentum", "nesterov")}
METHOD_FIELDS = frozenset(
    [f for fields in PERTURBATION_FIELDS.values() for f in fields]
    + [f for fields in BASE_OPTIMIZER_FIELDS.values() for f in fields])
METHOD_KEY = "optimizer"


def method_fields(config: Mapping) -> frozenset:
  """The `METHOD_FIELDS` the run's `--optimizer` reads (implicit SAM: its Fisher mask too)."""
  name = str(config.get(METHOD_KEY, ""))
  perturbation, _, base = name.partition("-")
  if perturbation not in PERTURBATION_FIELDS:
    perturbation, base = "", name
  used = set(BASE_OPTIMIZER_FIELDS.get(base, ()))
  used.update(PERTURBATION_FIELDS.get(perturbation, ()))
  if perturbation == "sam" and config.get("implicit") is True:
    used.update(_FISHER_MASK_FIELDS)
  return frozenset(used)


def setting_label(config: Mapping, keys: Sequence[str]) -> str:
  """`"k1=v1, k2=v2"` for the given fields of one configuration, the method first.

  The training method (`optimizer`), when among `keys`, leads bare
  (`"ssamf-sgd, sparsity=0.5"`); fields that only other methods read are left
  out (an SGD run is `"sgd"`, not `"optimizer=sgd, rho=0.05"`).
  """
  used = method_fields(config)
  parts = [format_value(config.get(METHOD_KEY, UNSET_VALUE))] if METHOD_KEY in keys else []
  parts += [f"{key}={format_value(config.get(key, UNSET_VALUE))}" for key in keys
            if key != METHOD_KEY and (key not in METHOD_FIELDS or key in used)]
  return ", ".join(parts)


def run_hash(run_dir: str) -> Optional[str]:
  """The hash in a run folder's name (`adv_<hash>`, `measurement/<hash>`), or None."""
  match = re.search(r"(?:^|_)([0-9a-f]{10})$", os.path.basename(os.path.normpath(run_dir)))
  return match.group(1) if match else None


def setting_labels(configs: Sequence[Mapping], cells: Sequence[tuple],
                   exclude: Iterable[str] = AXIS_KEYS,
                   groups: Optional[Sequence] = None,
                   ids: Optional[Sequence[str]] = None) -> List[str]:
  """One label per run naming the fields that differ within its cell.

  The fields are those that differ within any cell of the run's group, shown
  for every run of the group, so runs of different cells with equal settings
  share a label (a figure may compare them). Labels are unique per
  configuration within a cell; should two different values print alike, the
  configuration's hash is appended.

  Args:
    configs: `distinguishing_hparams` of each run.
    cells: the axis cell of each run.
    exclude: fields never named (the axes).
    groups: the group of each run (runs of different groups are never shown
      together, so each group names its own fields); None: one group.
    ids: what tells alike labels apart (the run folders' hashes); None: the
      configurations' `config_id`.
  """
  if groups is None:
    groups = [()] * len(configs)
  labels = [""] * len(configs)
  members = {}
  for index, group in enumerate(groups):
    members.setdefault(group, []).append(index)
  for indices in members.values():
    keys = differing_keys([configs[i] for i in indices],
                          [cells[i] for i in indices], exclude)
    for i in indices:
      labels[i] = setting_label(configs[i], keys)
  identities = [config_id(config) for config in configs]
  names = alike_suffixes(identities, ids)
  by_cell_label = {}
  for cell, label, identity in zip(cells, labels, identities):
    by_cell_label.setdefault((cell, label), set()).add(identity)
  return [
      label if len(by_cell_label[(cell, label)]) == 1
      else f"{label} #{names[identity]}".strip()
      for cell, label, identity in zip(cells, labels, identities)]


def alike_suffixes(identities: Sequence[str],
                   hashes: Optional[Sequence[Optional[str]]]) -> Dict[str, str]:
  """{config_id: the suffix that tells its label apart}: the smallest run-folder hash of
  its runs (runs of one configuration are pooled, so they share it), else the id."""
  names = {}
  for identity, folder_hash in zip(identities, hashes or [None] * len(identities)):
    candidate = folder_hash or identity
    names[identity] = min(names.get(identity, candidate), candidate)
  return names


def load_study(base_dir: str,
               datasets: Optional[Iterable[str]] = None,
               models: Optional[Iterable[str]] = None,
               attacks: Optional[Iterable[str]] = None,
               experiments: Optional[Iterable[str]] = None,
               adv_train: Optional[bool] = None,
               defaults: Optional[Mapping] = None) -> Study:
  """Loads every run under `base_dir` that matches the filters.

  Args:
    base_dir: folder searched recursively for `hparams.json`.
    datasets, models, attacks, experiments: keep only runs whose hyper-parameter
      is one of these; None keeps all.
    adv_train: keep only runs with this `adv_train`; None keeps both.
    defaults: the value of each hyper-parameter that a run's `hparams.json`
      lacks; None reads them from `robust_sparse.core.hparams.Hparams` (and adds a
      problem if that cannot be imported).

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
  problems: List[str] = []
  ignored = set(NOT_DISTINGUISHING_KEYS)

  def get_defaults() -> Mapping:
    nonlocal defaults
    if defaults is None:
      defaults = hparam_defaults()
      ignored.update(not_distinguishing_keys())
    return defaults

  filters = {
      "dataset": None if datasets is None else list(datasets),
      "model": None if models is None else list(models),
      "attack": None if attacks is None else list(attacks),
      "experiment": None if experiments is None else list(experiments),
      "adv_train": None if adv_train is None else [bool(adv_train)],
  }
  matching = []
  corrupt = 0
  for run_dir in run_dirs:
    path = os.path.join(run_dir, HPARAMS_FILE)
    try:
      hparams = _read_json(path)
    except (ValueError, OSError) as error:
      problems.append(f"{path}: corrupt ({error}); run skipped")
      corrupt += 1
      continue
    if _matches(hparams, filters, get_defaults):
      matching.append((run_dir, hparams))
  if not matching:
    _log(problems)
    readable = len(run_dirs) - corrupt
    if not readable:
      raise AnalysisError(
          f"no readable runs under {base_dir!r}: every one of the "
          f"{len(run_dirs)} {HPARAMS_FILE} files is corrupt")
    active = {k: v for k, v in filters.items() if v is not None}
    raise AnalysisError(
        f"none of the {readable} runs under {base_dir!r} match the "
        f"filters {active}")

  run_frames, run_rows, configs = [], [], []
  diverged: List[dict] = []
  for run_dir, hparams in matching:
    filled = {**get_defaults(), **hparams}
    levels = expected_prune_iterations(filled, run_dir)
    if levels == 0:
      continue  # Trains nothing (relu_count): no evaluations to load.
    try:
      frame = _load_run(run_dir, filled, levels, problems, diverged)
    except _CorruptFile as error:
      problems.append(f"{error.path}: corrupt ({error.reason}); run "
                      f"{run_dir} skipped")
      continue
    if frame is not None:
      config = distinguishing_hparams(hparams, get_defaults(), ignored)
      run_frames.append(frame)
      configs.append(config)
      row = {key: value for key, value in filled.items() if key != "run_dir"}
      run_rows.append({"run_dir": run_dir, **row,
                       "config_id": config_id(config),
                       "expected_levels": levels})
  _log(problems)
  diverged_frame = pd.DataFrame(diverged, columns=list(DIVERGED_COLUMNS))
  if not run_frames:
    reason = (f" ({len(diverged)} level{'s' if len(diverged) > 1 else ''} "
              "diverged)" if diverged else "")
    raise AnalysisError(
        f"none of the {len(matching)} matching runs under {base_dir!r} has a "
        f"readable, finished prune iteration{reason}")

  runs = pd.DataFrame(run_rows)
  runs["adv_train"] = runs["adv_train"].astype(bool)
  cells = [tuple(_text(_canonical(row.get(key))) for key in AXIS_KEYS)
           for row in run_rows]
  # Figures and tables never mix data sets or models: a field that only
  # varies in another (data set, model) does not lengthen these labels.
  runs["run_hash"] = [run_hash(run_dir) or identity
                      for run_dir, identity in zip(runs["run_dir"], runs["config_id"])]
  runs["setting"] = setting_labels(
      configs, cells, groups=list(zip(runs["dataset"], runs["model"])),
      ids=list(runs["run_hash"]))
  evaluations = pd.concat(run_frames, ignore_index=True)
  evaluations = evaluations.merge(runs[["run_dir", "setting"]], on="run_dir")
  evaluations["training_mode"] = evaluations["adv_train"].map(training_mode)
  extras = [c for c in evaluations.columns if c not in EVALUATION_COLUMNS]
  evaluations = evaluations.loc[:, list(EVALUATION_COLUMNS) + sorted(extras)]
  return Study(evaluations=evaluations, runs=runs, problems=problems,
               diverged=diverged_frame,
               configs=dict(zip(runs["run_dir"], configs)))


def _log(problems: List[str]) -> None:
  for problem in problems:
    logging.warning("%s", problem)
