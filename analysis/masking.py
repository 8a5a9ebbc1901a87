"""Gradient-masking checks of the adversarially evaluated runs (a table, a figure, a section).

A defence that only hides its gradients (saturated softmax, shattered or
stochastic gradients; Athalye, Carlini & Wagner 2018) looks robust to the
gradient attacks it was trained and evaluated with, but fails simple sanity
checks (Carlini et al. 2019, "On evaluating adversarial robustness"). For
every run whose `--attack` is not "none", the final weights of each trial
(the last level every trial finished, or every level) are attacked on the
first test images, with the true labels, by FGSM, PGD, a stronger PGD, PGD at
eps 1.0 and a transfer attack (`experiments/masking_checks.py` says how).

The runner makes the attacks at the end of every level (`--masking_checks`,
on by default for adversarially trained runs) and keeps them in the level's
folder; this module reads them and never attacks again. Levels without them
(runs finished before, or with `--nomasking_checks`) are attacked once, with a
progress bar naming the run, trial and level, and the results are written
into their folders as the runner writes them, so the next analysis only
reads. The transfer check, a forward pass of trial t on the stored examples of
trial (t + 1) mod T, is cached in the level's folder too.

Each number is a robust accuracy: the fraction of images classified correctly
both clean and attacked. Over the mean of the trials, five checks give
"pass" or "suspected" (tolerance `Options.tolerance`, default 1 point):

  1. pgd_vs_fgsm: an iterative attack is at least as strong as a single-step
     one (acc_pgd <= acc_fgsm + tol);
  2. more_steps: more steps and restarts are not weaker (acc_pgd_strong <=
     acc_pgd + tol);
  3. large_eps: eps 1.0 can draw any image, so almost nothing survives
     (acc_eps1 <= 0.05);
  4. transfer: a black-box transfer attack is not stronger than white-box
     (acc_transfer >= acc_pgd - tol);
  5. fgsm_not_overstated, adversarially trained runs only ("n/a" for the
     others): PGD keeps at least half of the FGSM robust accuracy (acc_pgd >=
     acc_fgsm / 2 - tol). Checks 1-4 pass a model whose FGSM accuracy is far
     above its PGD accuracy, yet after FGSM training that gap is the classic
     sign that the model learned to defeat FGSM's single gradient step
     ("catastrophic overfitting", Wong et al. 2020) rather than to be robust;
     naturally trained models are left out because FGSM is weak on them
     without any masking.

A run is "suspected" when any check is. Runs whose weights or data cannot be
loaded get a row that says why. Where attacks must be made, one Keras model
serves every run and trial of an architecture (the trials' weights are
assigned into it), so each attack compiles once per architecture and budget.

Output: `tables/gradient_masking.{csv,md}` (one row per run, or per run and
level) and `figures/gradient_masking.<format>`.
"""

import dataclasses
import json
import os
import re
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

from absl import logging
import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import pyplot as plt
import numpy as np
import pandas as pd

from robust_sparse.analysis import load
from robust_sparse.core import files, masking_store
from robust_sparse.core.hparams import Hparams
from robust_sparse.core.run_folder import level_dir
from robust_sparse.nn.weights import assign_weights

HEADING = "Gradient-masking checks"
TABLE_STEM = "gradient_masking"
# The robust accuracies, in the order of the table (headings: `measure_headings`).
MEASURES = ("clean", "fgsm", "pgd", "pgd_strong", "eps1", "transfer")
# Check 3's bound on the robust accuracy at eps 1.0 (absolute, not a tolerance).
LARGE_EPS_MAX_ACCURACY = 0.05
PASS, SUSPECTED, NOT_APPLICABLE = "pass", "suspected", "n/a"
# name -> (short heading, the check in one sentence). Filled in by `check_texts`:
# {tol} is the tolerance in points, the others `experiments.masking_checks`' budgets
# (read there, lazily: it imports TensorFlow, which bad input should not wait for).
CHECKS = {
    "pgd_vs_fgsm": (
        "PGD ≤ FGSM",
        "an iterative attack is at least as strong as a single-step one: PGD accuracy is at "
        "most FGSM accuracy + {tol}"),
    "more_steps": (
        "stronger PGD ≤ PGD",
        "more steps and restarts are not weaker: the accuracy under PGD with "
        "{factor}x the steps and {restarts} restarts is at most PGD accuracy + {tol}"),
    "large_eps": (
        "eps {large_eps:g} ≈ 0",
        "an eps of {large_eps:g} (the whole [0, 1] pixel range) can reach any image, so "
        "at most {bound:g} % of the images may stay correctly classified"),
    "transfer": (
        "transfer ≥ PGD",
        "a transfer attack (PGD examples crafted on another trial's model of the same run) "
        "is not stronger than white-box PGD: transfer accuracy is at least PGD accuracy - "
        "{tol}"),
    "fgsm_not_overstated": (
        "PGD ≥ FGSM / 2",
        "for adversarially trained runs (n/a for the others), PGD keeps at least half of "
        "the FGSM accuracy (minus {tol}): a model that resists FGSM far better than PGD has "
        "learned to defeat FGSM's single gradient step rather than to be robust "
        "(catastrophic overfitting of FGSM training, Wong et al. 2020)"),
}
_CSV_COLUMNS = (["run", "label", "prune_iteration", "percent_weights_remaining", "trials",
                 "examples", "eps", "step_size", "steps"]
                + [f"acc_{name}" for name in MEASURES]
                + [f"check_{name}" for name in CHECKS] + ["verdict", "note"])


def _budgets() -> dict:
  """The checks' fixed budgets, by the names `CHECKS` and `measure_headings` format."""
  return dict(factor=masking_store.STRONG_STEPS_FACTOR,
              restarts=masking_store.STRONG_RESTARTS, large_eps=masking_store.LARGE_EPS,
              large_eps_step=masking_store.LARGE_EPS_STEP_SIZE,
              large_eps_steps=masking_store.LARGE_EPS_STEPS,
              bound=100 * LARGE_EPS_MAX_ACCURACY)


def measure_headings() -> Dict[str, str]:
  """{measure: column heading}, in the order of `MEASURES`."""
  budgets = _budgets()
  return {"clean": "Clean", "fgsm": "FGSM", "pgd": "PGD",
          "pgd_strong": "PGD {factor}x steps, {restarts} restarts".format(**budgets),
          "eps1": "PGD eps {large_eps:g}".format(**budgets), "transfer": "Transfer"}


def check_texts(tolerance: float) -> Dict[str, tuple]:
  """{check: (short heading, sentence)} with the budgets and `tolerance` filled in."""
  tol = f"{100 * tolerance:g} point{'s' if tolerance != 0.01 else ''}"
  budgets = dict(_budgets(), tol=tol)
  return {name: (heading.format(**budgets), sentence.format(**budgets))
          for name, (heading, sentence) in CHECKS.items()}


@dataclasses.dataclass(frozen=True)
class Options:
  """How the checks are read or made (`run_analysis --masking_*`).

  Attributes:
    examples: the checks of the first this many test images; None: those
      stored in the level folders, whatever their number (levels without them:
      the run's `--masking_examples`, 500 by default). Stored checks of another
      number are made again with this one (and replace them).
    tolerance: the slack of checks 1, 2, 4 and 5, as a fraction (0.01: 1 point).
    data_dir: the raw data folder, where attacks must be made; None: each
      run's own `--data_dir`.
    all_levels: check every finished level, not only the last one.
  """
  examples: Optional[int] = None
  tolerance: float = 0.01
  data_dir: Optional[str] = None
  all_levels: bool = False

  def __post_init__(self):
    if self.examples is not None and self.examples < 1:
      raise ValueError(f"masking examples must be >= 1, got {self.examples}")
    if not self.tolerance >= 0:
      raise ValueError(f"masking tolerance must be >= 0, got {self.tolerance}")


def run_checks(accuracies: Mapping[str, float], tolerance: float = 0.01,
               adversarially_trained: bool = False) -> Dict[str, str]:
  """Each check's verdict (`PASS`, `SUSPECTED`, or `NOT_APPLICABLE`).

  Args:
    accuracies: robust accuracies in [0, 1] (means over trials) by `MEASURES` name.
    tolerance: the slack of checks 1, 2, 4 and 5 (0.01: 1 point).
    adversarially_trained: the run trained on adversarial examples; check 5
      is `NOT_APPLICABLE` otherwise.

  Returns:
    {check name (`CHECKS`): verdict}; a check whose numbers are missing (NaN)
    is `NOT_APPLICABLE`.
  """
  def get(name):
    value = accuracies.get(name, float("nan"))
    return float("nan") if value is None else float(value)

  def verdict(*values, holds):
    if any(np.isnan(v) for v in values):
      return NOT_APPLICABLE
    return PASS if holds(*values) else SUSPECTED

  return {
      "pgd_vs_fgsm": verdict(get("pgd"), get("fgsm"),
                             holds=lambda pgd, fgsm: pgd <= fgsm + tolerance),
      "more_steps": verdict(get("pgd_strong"), get("pgd"),
                            holds=lambda strong, pgd: strong <= pgd + tolerance),
      "large_eps": verdict(get("eps1"), holds=lambda eps1: eps1 <= LARGE_EPS_MAX_ACCURACY),
      "transfer": verdict(get("transfer"), get("pgd"),
                          holds=lambda transfer, pgd: transfer >= pgd - tolerance),
      "fgsm_not_overstated": (
          verdict(get("pgd"), get("fgsm"), holds=lambda pgd, fgsm: pgd >= fgsm / 2 - tolerance)
          if adversarially_trained else NOT_APPLICABLE),
  }


def overall_verdict(checks: Mapping[str, str]) -> str:
  """`SUSPECTED` if any check is, `PASS` if one passed and none is suspected, else n/a."""
  if SUSPECTED in checks.values():
    return SUSPECTED
  return PASS if PASS in checks.values() else NOT_APPLICABLE


# ---- loading runs -------------------------------------------------------------------
def finished_levels(run_dir: str) -> Dict[int, List[int]]:
  """{trial: sorted levels that finished and hold `weights_final.npz`} of a run folder."""
  def numbered(folder, prefix):
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted((int(name[len(prefix):]), os.path.join(folder, name)) for name in names
                  if re.fullmatch(re.escape(prefix) + r"\d+", name))

  def finished(folder):
    try:
      with open(os.path.join(folder, load.METADATA_FILE)) as f:
        completed = json.load(f).get("completed") is True
    except (OSError, ValueError, AttributeError):
      return False
    return completed and os.path.exists(os.path.join(folder, "weights_final.npz"))

  found = {}
  for trial, trial_dir in numbered(run_dir, "trial_"):
    levels = [level for level, folder in numbered(trial_dir, "prune_iter_") if finished(folder)]
    if levels:
      found[trial] = levels
  return found


def chosen_levels(levels: Mapping[int, Sequence[int]], all_levels: bool) -> Dict[int, List[int]]:
  """{level: trials checked at it}.

  Without `all_levels`: the last level every trial with weights finished (the
  smallest of the trials' last levels), so all trials are compared at one
  sparsity; with it, every level any trial finished.
  """
  if not levels:
    return {}
  if all_levels:
    wanted = sorted({level for found in levels.values() for level in found})
  else:
    wanted = [min(max(found) for found in levels.values())]
  return {level: [t for t, found in sorted(levels.items()) if level in found]
          for level in wanted}


def _model_signature(model) -> Optional[str]:
  """What two models must share to serve each other's weights; None: not comparable."""
  try:
    config = json.dumps(model.get_config(), sort_keys=True, default=str)
  except Exception:  # pylint: disable=broad-except
    return None
  variables = [(v.path, tuple(v.shape), str(v.dtype)) for v in model.variables]
  return json.dumps([config, variables, str(getattr(model, "dtype_policy", ""))], default=str)


class _Builder:
  """Builds each run's model as the runner does; one model per architecture is kept."""

  def __init__(self):
    self._models = {}

  def model(self, hp, dataset, trial: int, level: int):
    # pylint: disable=import-outside-toplevel  Heavy: TensorFlow, which reading runs never needs.
    from robust_sparse.experiments import build
    from robust_sparse.experiments.registry import EXPERIMENTS
    build.set_precision(hp.mixed_precision)
    model = build.model(hp, dataset.input_shape, dataset.num_classes,
                        EXPERIMENTS.get(hp.experiment)(hp), trial, level,
                        hp.train_examples or len(dataset.x_train))
    signature = _model_signature(model)
    if signature is None:
      return model
    return self._models.setdefault(signature, model)


def _run_label(run: Mapping) -> str:
  mode = load.training_mode(bool(run.get("adv_train", False)))
  label = " / ".join(str(run.get(key, "?")) for key in ("dataset", "model", "experiment",
                                                         "attack")) + f" / {mode}"
  setting = run.get("setting") or ""
  return label + (f" [{setting}]" if setting else "")


class _Run:
  """One run folder's stored checks, and what making missing ones needs (loaded once)."""

  def __init__(self, run_dir: str, hp, shown: str, options: Options, builder: _Builder,
               datasets: Dict[tuple, object]):
    self.run_dir, self.hp, self.shown = run_dir, hp, shown
    self._options, self._builder, self._datasets = options, builder, datasets

  def dataset(self):
    """The run's data set (one load per analysis and data set), or why it is not loaded."""
    # pylint: disable=import-outside-toplevel  Heavy: TensorFlow, which reading runs never needs.
    from robust_sparse.data import load_dataset
    hp = self.hp
    data_dir = self._options.data_dir or hp.data_dir
    key = (hp.dataset, data_dir, hp.valid_size, hp.resolution)
    if key not in self._datasets:
      try:
        try:
          dataset = load_dataset(hp.dataset, data_dir, hp.valid_size, resolution=hp.resolution)
        except ValueError:
          # The test split does not depend on valid_size, and a run started from
          # code (not the command line) may record one its data did not use.
          dataset = load_dataset(hp.dataset, data_dir, None, resolution=hp.resolution)
        self._datasets[key] = dataset
      except Exception as error:  # pylint: disable=broad-except
        self._datasets[key] = (f"data not loaded ({type(error).__name__}: {error}); pass "
                               "--data_dir")
    return self._datasets[key]

  def model(self, trial: int, level: int):
    """Trial `trial`'s network holding its final weights of `level`."""
    dataset = self.dataset()
    if isinstance(dataset, str):
      raise _DataMissing(dataset)
    model = self._builder.model(self.hp, dataset, trial, level)
    path = os.path.join(level_dir(self.run_dir, trial, level), "weights_final.npz")
    assign_weights(model, files.load_arrays(path), path)
    return model

  def level_checks(self, level: int, trials: Sequence[int]) -> List[dict]:
    """Each trial's accuracies at `level` (`MEASURES`, "transfer_from"): read where stored,
    else made once and stored (see the module docstring)."""
    hp = self.hp
    directories = {trial: level_dir(self.run_dir, trial, level) for trial in trials}
    wanted = self._options.examples
    if wanted is None:  # What is stored, if the trials agree; else the run's own number.
      counts = {stored["examples"] for stored in
                (masking_store.load_level(d, hp) for d in directories.values()) if stored}
      wanted = counts.pop() if len(counts) == 1 else hp.masking_examples
    stored = {trial: masking_store.load_level(directory, hp, wanted)
              for trial, directory in directories.items()}
    for trial in trials:
      if stored[trial] is not None:
        continue
      place = f"{self.shown} trial {trial} prune_iter {level}"
      logging.info("gradient-masking checks: no stored checks of %d images in %s; attacking "
                   "it once (the results go into its folder)", wanted, place)
      dataset = self.dataset()
      if isinstance(dataset, str):
        raise _DataMissing(dataset)
      # pylint: disable=import-outside-toplevel  Heavy: TensorFlow, which stored checks never need.
      from robust_sparse.experiments import masking_checks
      stored[trial] = masking_checks.check_level(
          hp, self.model(trial, level), dataset, trial, directories[trial], examples=wanted,
          desc=f"masking checks: {place}")
    rows = []
    for index, trial in enumerate(trials):
      row = dict(stored[trial]["accuracies"], examples=stored[trial]["examples"],
                 transfer=float("nan"), transfer_from=-1)
      if len(trials) > 1:
        source = trials[(index + 1) % len(trials)]
        row.update(transfer_from=source, transfer=masking_store.transfer(
            directories[trial], directories[source], source,
            lambda trial=trial, source=source: self._transfer(trial, source, level)))
      rows.append(row)
    return rows

  def _transfer(self, trial: int, source: int, level: int) -> float:
    """Trial `trial`'s accuracy on `source`'s stored pgd examples (not cached yet)."""
    logging.info("gradient-masking checks: transfer attack of %s trial %d prune_iter %d from "
                 "trial %d (a forward pass; cached in its folder)", self.shown, trial, level,
                 source)
    # pylint: disable=import-outside-toplevel  Heavy: TensorFlow, which stored checks never need.
    from robust_sparse.experiments import masking_checks
    return masking_checks.transfer_accuracy(
        self.model(trial, level),
        masking_store.load_examples(level_dir(self.run_dir, trial, level)),
        masking_store.load_examples(level_dir(self.run_dir, source, level)))


class _DataMissing(Exception):
  """The run's data set could not be loaded (the message says why)."""


def check_run(run_dir: str, options: Options, builder: "_Builder",
              datasets: Dict[tuple, object], shown: str = "") -> List[dict]:
  """The table rows of one run folder (one per checked level, or one saying why none).

  Args:
    run_dir: the run folder.
    options: how the checks are read or made.
    builder: builds the runs' models (shared by the runs of one analysis).
    datasets: the data sets loaded so far, shared likewise.
    shown: the run's name in log lines and progress bars; default `run_dir`.
  """
  def note_row(note, **values):
    return [{**values, "note": note}]

  try:
    hp = Hparams.from_dict(files.read_json(os.path.join(run_dir, load.HPARAMS_FILE)))
  except (OSError, ValueError, TypeError) as error:
    return note_row(f"hparams.json not readable: {error}")
  base = dict(eps=float(hp.eps), step_size=float(hp.pgd_step_size), steps=int(hp.pgd_steps))
  levels = chosen_levels(finished_levels(run_dir), options.all_levels)
  if not levels:
    return note_row("not checked: no finished level holds weights_final.npz", **base)
  run = _Run(run_dir, hp, shown or run_dir, options, builder, datasets)
  rows = []
  for level, trials in levels.items():
    row = dict(base, prune_iteration=level, trials=len(trials))
    try:
      per_trial = run.level_checks(level, trials)
      percent = [files.read_json(os.path.join(level_dir(run_dir, trial, level),
                                              load.METADATA_FILE))
                 .get("percent_weights_remaining", np.nan) for trial in trials]
    except _DataMissing as missing:
      if not rows and len(levels) == 1:
        return note_row(str(missing), **base)
      rows.append(dict(row, note=str(missing)))
      continue
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("gradient-masking checks of %s, level %d", run_dir, level)
      rows.append(dict(row, note=f"not checked: {type(error).__name__}: {error}"))
      continue
    accuracies = {name: float(np.nanmean([r[name] for r in per_trial]))
                  if not all(np.isnan(r[name]) for r in per_trial) else float("nan")
                  for name in MEASURES}
    checks = run_checks(accuracies, options.tolerance, adversarially_trained=hp.adv_train)
    row.update(percent_weights_remaining=float(np.mean(percent)),
               examples=per_trial[0]["examples"],
               **{f"acc_{name}": value for name, value in accuracies.items()},
               **{f"check_{name}": verdict for name, verdict in checks.items()},
               verdict=overall_verdict(checks),
               note="one trial: no transfer attack" if len(trials) < 2 else "")
    rows.append(row)
  return rows


def check_study(study: load.Study, options: Options, source: str = "") -> pd.DataFrame:
  """One row per checked run (and level) of `study`: `_CSV_COLUMNS`; empty: no run attacked.

  Runs with `--attack=none` are left out. The global Keras precision policy is
  restored afterwards (a mixed-precision run's model is built under its own).
  """
  runs = study.runs[study.runs["attack"].astype(str) != "none"]
  if runs.empty:
    return pd.DataFrame(columns=_CSV_COLUMNS)
  # Keras (TensorFlow) only where a check is computed: stored results need neither.
  keras = sys.modules.get("keras")
  policy = keras.mixed_precision.global_policy() if keras is not None else None
  builder, datasets, rows = _Builder(), {}, []
  began = time.time()
  try:
    for number, run in enumerate(runs.to_dict("records"), start=1):
      run_dir = run["run_dir"]
      shown = os.path.relpath(run_dir, source) if source else run_dir
      logging.info("gradient-masking checks: run %d of %d: %s", number, len(runs), shown)
      for row in check_run(run_dir, options, builder, datasets, shown):
        rows.append({"run": shown, "label": _run_label(run), **row})
  finally:
    keras = sys.modules.get("keras")
    if keras is not None:  # A mixed-precision run's model may have set another.
      keras.mixed_precision.set_global_policy(policy or "float32")
  logging.info("gradient-masking checks of %d runs took %.1f s", len(runs),
               time.time() - began)
  frame = pd.DataFrame(rows, columns=_CSV_COLUMNS)
  text = ["run", "label", "note", "verdict"] + [f"check_{name}" for name in CHECKS]
  frame[text] = frame[text].astype(object).fillna("")
  return frame


# ---- the table, the figure and the section --------------------------------------------
def _percent(value) -> str:
  return "–" if value is None or pd.isna(value) else f"{100 * float(value):.1f}"


def _verdict_cell(verdict) -> str:
  if not isinstance(verdict, str) or not verdict:
    return "–"
  return f"**{verdict}**" if verdict == SUSPECTED else verdict


def table_markdown(frame: pd.DataFrame, tolerance: float = 0.01) -> str:
  """The table as GitHub Markdown: accuracies in %, verdicts (suspected in bold)."""
  texts = check_texts(tolerance)
  by_level = frame["prune_iteration"].nunique(dropna=True) > 1 or any(
      frame.groupby("run").size() > 1)
  headers = (["Run"] + (["Level (% weights)"] if by_level else ["% weights"]) + ["Trials"]
             + [f"{heading} (%)" for heading in measure_headings().values()]
             + [f"{i}. {texts[name][0]}" for i, name in enumerate(CHECKS, start=1)]
             + ["Verdict", "Note"])
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  for row in frame.to_dict("records"):
    percent = ("–" if pd.isna(row["percent_weights_remaining"])
               else f"{row['percent_weights_remaining']:.1f}")
    level = (f"{int(row['prune_iteration'])} ({percent})"
             if by_level and not pd.isna(row["prune_iteration"]) else percent)
    trials = "–" if pd.isna(row["trials"]) else str(int(row["trials"]))
    cells = ([f"{row['label']}<br>`{row['run']}`", level, trials]
             + [_percent(row[f"acc_{name}"]) for name in MEASURES]
             + [_verdict_cell(row[f"check_{name}"]) for name in CHECKS]
             + [_verdict_cell(row["verdict"]), str(row["note"] or "")])
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  return "\n".join(lines) + "\n"


_MARKERS = {"clean": ("o", "black"), "fgsm": ("s", "tab:blue"), "pgd": ("D", "tab:orange"),
            "pgd_strong": ("v", "tab:red"), "eps1": ("x", "tab:purple"),
            "transfer": ("^", "tab:green")}


def plot_accuracies(frame: pd.DataFrame) -> Optional[plt.Figure]:
  """Each checked row's robust accuracies on one line; suspected rows' labels in red."""
  checked = frame[frame["verdict"].isin([PASS, SUSPECTED, NOT_APPLICABLE])
                  & frame["acc_clean"].notna()]
  if checked.empty:
    return None
  by_level = checked.groupby("run").size().max() > 1
  labels = [row["label"] + (f" (level {int(row['prune_iteration'])})" if by_level else "")
            + (" – suspected" if row["verdict"] == SUSPECTED else "")
            for row in checked.to_dict("records")]
  figure, axis = plt.subplots(figsize=(9.5, 1.6 + 0.5 * len(checked)))
  positions = np.arange(len(checked))[::-1]
  for name, heading in measure_headings().items():
    marker, colour = _MARKERS[name]
    axis.scatter(100 * checked[f"acc_{name}"].to_numpy(float), positions, marker=marker,
                 color=colour, s=46, label=heading, zorder=3)
  axis.axvline(100 * LARGE_EPS_MAX_ACCURACY, color="tab:purple", linestyle=":", linewidth=1)
  axis.set_yticks(positions)
  axis.set_yticklabels(labels, fontsize=8)
  for tick, verdict in zip(axis.get_yticklabels(), checked["verdict"]):
    if verdict == SUSPECTED:
      tick.set_color("tab:red")
  axis.set_xlim(-2, 102)
  axis.set_ylim(-0.7, len(checked) - 0.3)
  axis.set_xlabel("robust test accuracy, true labels (%)")
  axis.grid(True, axis="x", alpha=0.3)
  axis.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
  figure.tight_layout()
  return figure


def sections(study: load.Study, source: str, out_dir: str, formats: Sequence[str], save,
             tables_dir: str, options: Options) -> List[tuple]:
  """Runs the checks, writes the table and the figure; returns [(heading, text, figures)].

  Args:
    study: the loaded study.
    source: the base directory (rows name runs relative to it).
    out_dir: the analysis folder.
    formats: figure formats.
    save: `report._save(figure, out_dir, stem, formats, caption, saved)`.
    tables_dir: the tables' folder under `out_dir`.
    options: how the checks run.

  Returns:
    One section, or none when no run was attacked (`--attack=none` everywhere).
  """
  frame = check_study(study, options, source)
  if frame.empty:
    return []
  stem = os.path.join(out_dir, tables_dir, TABLE_STEM)
  frame.to_csv(stem + ".csv", index=False, float_format="%.6g")
  markdown = table_markdown(frame, options.tolerance)
  with open(stem + ".md", "w") as f:
    f.write(markdown)
  saved = []
  save(plot_accuracies(frame), out_dir, TABLE_STEM, formats,
       "Gradient-masking checks: robust accuracy of each run under every attack (mean over "
       "trials); suspected runs in red; dotted: the large-eps bound", saved)
  links = "".join(f" [{ext}]({os.path.relpath(stem + '.' + ext, out_dir)})"
                  for ext in ("csv", "md"))
  level = ("every finished level" if options.all_levels
           else "the last level every trial finished")
  counts = sorted({int(n) for n in frame["examples"].dropna()})
  images = (f"the first {counts[0]} test images" if len(counts) == 1 else
            "the first test images (how many: the CSV's `examples`)")
  checks = "\n".join(f"{i}. **{heading}**: {sentence}."
                     for i, (heading, sentence) in enumerate(
                         check_texts(options.tolerance).values(), start=1))
  budgets = _budgets()
  suspected = int((frame["verdict"] == SUSPECTED).sum())
  text = (
      "Is the robustness real, or are the gradients hidden (Athalye et al. 2018)? Every run "
      f"with an `--attack` is attacked again: the final weights of each trial at {level}, "
      f"on {images}, with the true labels (the runner attacks every level as it "
      "finishes, `--masking_checks`; levels without stored checks were attacked by this "
      "analysis, once). Numbers are "
      "robust accuracies (correct both clean and attacked), means over trials, in percent: "
      "FGSM and PGD at the run's eps (PGD with its step size and steps, random start), PGD "
      "with {factor}x the steps and {restarts} restarts, PGD at eps {large_eps:g} (step "
      "{large_eps_step:g}, {large_eps_steps} steps), and transfer ".format(**budgets) +
      "(trial t's model shown the PGD examples crafted on trial (t + 1) mod T's model of the "
      "same run). The checks:\n\n"
      f"{checks}\n\nA run is *suspected* when any check is. Suspected: {suspected} of "
      f"{len(frame)} rows.{links}\n\n{markdown}")
  return [(HEADING, text, saved)]
