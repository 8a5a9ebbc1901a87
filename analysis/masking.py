"""Gradient-masking checks of the adversarially evaluated runs (a table, a figure, a section).

A defence that only hides its gradients (saturated softmax, shattered or
stochastic gradients; Athalye, Carlini & Wagner 2018) looks robust to the
gradient attacks it was trained and evaluated with, but fails simple sanity
checks (Carlini et al. 2019, "On evaluating adversarial robustness"). For
every run whose `--attack` is not "none", the final weights of each trial
(the last level every trial finished, or every level) are attacked on the
first `Options.examples` test images, with the true labels, by

  fgsm        FGSM at the run's eps;
  pgd         PGD at the run's eps, step size and steps, random start;
  pgd_strong  the same PGD with 5x the steps and 5 random restarts;
  eps1        PGD with eps 1.0 (the whole [0, 1] pixel range), step 0.1, 20 steps;
  transfer    the `pgd` examples crafted on trial (t + 1) mod T of the same run,
              shown to trial t (skipped when the run has one trial).

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
loaded get a row that says why. One Keras model serves every run and trial
of an architecture (the trials' weights are assigned into it), so each attack
compiles once per architecture and budget; the attacks run on whole batches.

Output: `tables/gradient_masking.{csv,md}` (one row per run, or per run and
level) and `figures/gradient_masking.<format>`.
"""

import dataclasses
import json
import os
import re
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from absl import logging
import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import pyplot as plt
import numpy as np
import pandas as pd

from analysis import load

HEADING = "Gradient-masking checks"
TABLE_STEM = "gradient_masking"
# Robust accuracies, in the order of the table: name -> column heading.
MEASURES = {
    "clean": "Clean",
    "fgsm": "FGSM",
    "pgd": "PGD",
    "pgd_strong": "PGD 5x steps, 5 restarts",
    "eps1": "PGD eps 1",
    "transfer": "Transfer",
}
STRONG_STEPS_FACTOR = 5
STRONG_RESTARTS = 5
LARGE_EPS = 1.0
LARGE_EPS_STEP_SIZE = 0.1
LARGE_EPS_STEPS = 20
# Check 3's bound on the robust accuracy at eps 1.0 (absolute, not a tolerance).
LARGE_EPS_MAX_ACCURACY = 0.05
PASS, SUSPECTED, NOT_APPLICABLE = "pass", "suspected", "n/a"
# name -> (short heading, the check in one sentence; {tol} is the tolerance in points).
CHECKS = {
    "pgd_vs_fgsm": (
        "PGD ≤ FGSM",
        "an iterative attack is at least as strong as a single-step one: PGD accuracy is at "
        "most FGSM accuracy + {tol}"),
    "more_steps": (
        "stronger PGD ≤ PGD",
        f"more steps and restarts are not weaker: the accuracy under PGD with "
        f"{STRONG_STEPS_FACTOR}x the steps and {STRONG_RESTARTS} restarts is at most PGD "
        "accuracy + {tol}"),
    "large_eps": (
        "eps 1 ≈ 0",
        f"an eps of {LARGE_EPS:g} (the whole [0, 1] pixel range) can reach any image, so "
        f"at most {100 * LARGE_EPS_MAX_ACCURACY:g} % of the images may stay correctly "
        "classified"),
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


@dataclasses.dataclass(frozen=True)
class Options:
  """How the checks run (`run_analysis --masking_*`).

  Attributes:
    examples: the first this many test images are attacked.
    tolerance: the slack of checks 1, 2, 4 and 5, as a fraction (0.01: 1 point).
    data_dir: the raw data folder; None: each run's own `--data_dir`.
    all_levels: check every finished level, not only the last one.
    batch_size: images per attack batch (every batch is padded to this size,
      so each compiled attack sees one shape).
    seed: the attacks' random starts derive from it.
  """
  examples: int = 500
  tolerance: float = 0.01
  data_dir: Optional[str] = None
  all_levels: bool = False
  batch_size: int = 500
  seed: int = 0

  def __post_init__(self):
    if self.examples < 1:
      raise ValueError(f"masking examples must be >= 1, got {self.examples}")
    if not self.tolerance >= 0:
      raise ValueError(f"masking tolerance must be >= 0, got {self.tolerance}")
    if self.batch_size < 1:
      raise ValueError(f"masking batch size must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class Budget:
  """A run's L-infinity attack budget (`--eps`, `--pgd_step_size`, `--pgd_steps`)."""
  eps: float
  step_size: float
  steps: int


def attack_configs(budget: Budget) -> dict:
  """{measure: `attacks.AttackConfig`} of the four white-box attacks (true labels)."""
  from attacks import AttackConfig  # pylint: disable=import-outside-toplevel
  pgd = AttackConfig("pgd", eps=budget.eps, step_size=budget.step_size, steps=budget.steps,
                     random_start=True, labels="true")
  return {
      "fgsm": AttackConfig("fgsm", eps=budget.eps, labels="true"),
      "pgd": pgd,
      "pgd_strong": dataclasses.replace(pgd, steps=STRONG_STEPS_FACTOR * budget.steps,
                                        restarts=STRONG_RESTARTS),
      "eps1": AttackConfig("pgd", eps=LARGE_EPS, step_size=LARGE_EPS_STEP_SIZE,
                           steps=LARGE_EPS_STEPS, random_start=True, labels="true"),
  }


def _in_batches(fn: Callable, count: int, batch_size: int) -> np.ndarray:
  """`fn(indices, batch_number)` over `range(count)` in equal batches, concatenated.

  The last batch is padded with the first images (and the padding dropped), so
  a compiled function sees one batch shape and XLA compiles it once.
  """
  size = min(batch_size, count)
  outputs = []
  for number, start in enumerate(range(0, count, size)):
    indices = np.arange(start, start + size) % count
    real = min(size, count - start)
    outputs.append(np.asarray(fn(indices, number))[:real])
  return np.concatenate(outputs)


def _correct(model, x: np.ndarray, y: np.ndarray, batch_size: int) -> np.ndarray:
  """Boolean [n]: `model` classifies each image of `x` as `y`."""
  def predict(indices, _):
    logits = model(x[indices], training=False)
    return np.argmax(np.asarray(logits), axis=-1)
  return _in_batches(predict, len(y), batch_size) == y


def evaluate_trials(model_of: Callable[[int], object], trials: int, x: np.ndarray,
                    y: np.ndarray, budget: Budget, *, seed: int = 0,
                    batch_size: int = 500) -> List[Dict[str, float]]:
  """Robust accuracies of each trial of one run under the five attacks.

  Args:
    model_of: `model_of(t)` returns trial t's model, ready to call. It may
      return the same model object every time with trial t's weights assigned
      (the attacks then compile once); it is called twice per trial (the
      transfer attack needs every trial's examples first).
    trials: the number of trials T.
    x: float32 images in [0, 1], [n, ...], as the model sees them.
    y: int true labels [n].
    budget: the run's attack budget.
    seed: the attacks' random starts derive from it and the trial.
    batch_size: images per attack batch.

  Returns:
    One dict per trial: `MEASURES` -> robust accuracy in [0, 1] ("clean" is the
    clean accuracy; "transfer" is NaN when T == 1), and "transfer_from": the
    trial whose PGD examples were transferred (-1 when T == 1).
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from attacks import make_attack  # pylint: disable=import-outside-toplevel
  from experiments.runner import derived_seed  # pylint: disable=import-outside-toplevel

  x = np.asarray(x, np.float32)
  y = np.asarray(y).astype(np.int64)
  y_tensor = tf.constant(y, tf.int32)
  configs = attack_configs(budget)
  attacks = {name: make_attack(config) for name, config in configs.items()}
  results, clean, crafted = [], [], []
  for trial in range(trials):
    model = model_of(trial)
    correct = _correct(model, x, y, batch_size)
    row = {"clean": float(correct.mean())}
    for name, attack in attacks.items():
      # The strong PGD's first restart starts where PGD does: a luckier random
      # start cannot make either look stronger than the other.
      stream = "pgd" if name == "pgd_strong" else name

      def craft(indices, number, attack=attack, stream=stream, model=model, trial=trial):
        seed_pair = tf.constant([derived_seed(seed, trial, stream, int(number)), 0], tf.int64)
        return attack(model, x[indices], tf.gather(y_tensor, indices), seed=seed_pair)

      adversarial = _in_batches(craft, len(y), batch_size)
      row[name] = float((correct & _correct(model, adversarial, y, batch_size)).mean())
      if name == "pgd":
        crafted.append(adversarial)
    clean.append(correct)
    results.append(row)
  for trial, row in enumerate(results):
    if trials < 2:
      row.update(transfer=float("nan"), transfer_from=-1)
      continue
    source = (trial + 1) % trials
    model = model_of(trial)
    survived = _correct(model, crafted[source], y, batch_size)
    row.update(transfer=float((clean[trial] & survived).mean()), transfer_from=source)
  return results


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
    # pylint: disable=import-outside-toplevel
    from experiments.registry import EXPERIMENTS
    from experiments.runner import set_precision
    from models import build_model
    set_precision(hp.mixed_precision)
    experiment = EXPERIMENTS.get(hp.experiment)(hp)
    num_train = hp.train_examples or len(dataset.x_train)
    options = {**hp.model_options(), **experiment.model_options(level, num_train)}
    model = build_model(hp.model, dataset.input_shape, dataset.num_classes,
                        activation=experiment.activation(level, num_train), l1_reg=hp.l1_reg,
                        normalize=hp.normalize, dropout=hp.dropout, **options)
    model = experiment.transform_model(model, trial, level)
    signature = _model_signature(model)
    if signature is None:
      return model
    return self._models.setdefault(signature, model)


def test_images(dataset, count: int):
  """The first `count` test images as the model sees them (decoded, prepared), and labels."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  count = min(count, len(dataset.y_test))
  x, y = dataset.x_test[:count], np.asarray(dataset.y_test[:count])
  if dataset.decode_eval is not None:
    x = np.stack([dataset.decode_eval(tf.constant(path)).numpy() for path in x])
  if dataset.prepare is not None:
    # A fixed seed: the runner's evaluation seeds its random positioning per batch.
    x = dataset.prepare(tf.constant(x, tf.float32), tf.constant([0, 7], tf.int64)).numpy()
  return np.asarray(x, np.float32), y


def _run_label(run: Mapping) -> str:
  mode = load.training_mode(bool(run.get("adv_train", False)))
  label = " / ".join(str(run.get(key, "?")) for key in ("dataset", "model", "experiment",
                                                         "attack")) + f" / {mode}"
  setting = run.get("setting") or ""
  return label + (f" [{setting}]" if setting else "")


def check_run(run_dir: str, options: Options, builder: "_Builder",
              datasets: Dict[tuple, object]) -> List[dict]:
  """The table rows of one run folder (one per checked level, or one saying why none)."""
  # pylint: disable=import-outside-toplevel
  from data import load_dataset
  from experiments.runner import assign_weights, level_dir
  from robust_sparse import files
  from robust_sparse.hparams import Hparams

  def note_row(note, **values):
    return [{**values, "note": note}]

  try:
    hp = Hparams.from_dict(files.read_json(os.path.join(run_dir, load.HPARAMS_FILE)))
  except (OSError, ValueError, TypeError) as error:
    return note_row(f"hparams.json not readable: {error}")
  budget = Budget(float(hp.eps), float(hp.pgd_step_size), int(hp.pgd_steps))
  base = dict(eps=budget.eps, step_size=budget.step_size, steps=budget.steps)
  levels = chosen_levels(finished_levels(run_dir), options.all_levels)
  if not levels:
    return note_row("not checked: no finished level holds weights_final.npz", **base)
  data_dir = options.data_dir or hp.data_dir
  key = (hp.dataset, data_dir, hp.valid_size, hp.resolution)
  if key not in datasets:
    try:
      try:
        dataset = load_dataset(hp.dataset, data_dir, hp.valid_size, resolution=hp.resolution)
      except ValueError:
        # The test split does not depend on valid_size, and a run started from
        # code (not the command line) may record one its data did not use.
        dataset = load_dataset(hp.dataset, data_dir, None, resolution=hp.resolution)
      datasets[key] = (dataset, test_images(dataset, options.examples))
    except Exception as error:  # pylint: disable=broad-except
      datasets[key] = f"data not loaded ({type(error).__name__}: {error}); pass --data_dir"
  if isinstance(datasets[key], str):
    return note_row(datasets[key], **base)
  dataset, (x, y) = datasets[key]
  rows = []
  for level, trials in levels.items():
    row = dict(base, prune_iteration=level, trials=len(trials), examples=len(y))
    weights, percent = {}, []
    try:
      for trial in trials:
        directory = level_dir(run_dir, trial, level)
        weights[trial] = files.load_arrays(os.path.join(directory, "weights_final.npz"))
        percent.append(files.read_json(os.path.join(directory, load.METADATA_FILE))
                       .get("percent_weights_remaining", np.nan))
      model = builder.model(hp, dataset, trials[0], level)

      def model_of(index, model=model, weights=weights, trials=trials, level=level):
        trial = trials[index]
        assign_weights(model, weights[trial],
                       f"{level_dir(run_dir, trial, level)}/weights_final.npz")
        return model

      per_trial = evaluate_trials(model_of, len(trials), x, y, budget, seed=options.seed,
                                  batch_size=options.batch_size)
    except Exception as error:  # pylint: disable=broad-except
      logging.exception("gradient-masking checks of %s, level %d", run_dir, level)
      rows.append(dict(row, note=f"not checked: {type(error).__name__}: {error}"))
      continue
    accuracies = {name: float(np.nanmean([r[name] for r in per_trial]))
                  if not all(np.isnan(r[name]) for r in per_trial) else float("nan")
                  for name in MEASURES}
    checks = run_checks(accuracies, options.tolerance, adversarially_trained=hp.adv_train)
    row.update(percent_weights_remaining=float(np.mean(percent)),
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
  policy = None
  builder, datasets, rows = _Builder(), {}, []
  began = time.time()
  try:
    for number, run in enumerate(runs.to_dict("records"), start=1):
      run_dir = run["run_dir"]
      if policy is None and finished_levels(run_dir):
        import keras  # pylint: disable=import-outside-toplevel
        policy = keras.mixed_precision.global_policy()
      logging.info("gradient-masking checks: run %d of %d: %s", number, len(runs), run_dir)
      shown = os.path.relpath(run_dir, source) if source else run_dir
      for row in check_run(run_dir, options, builder, datasets):
        rows.append({"run": shown, "label": _run_label(run), **row})
  finally:
    if policy is not None:
      import keras  # pylint: disable=import-outside-toplevel
      keras.mixed_precision.set_global_policy(policy)
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


def table_markdown(frame: pd.DataFrame) -> str:
  """The table as GitHub Markdown: accuracies in %, verdicts (suspected in bold)."""
  by_level = frame["prune_iteration"].nunique(dropna=True) > 1 or any(
      frame.groupby("run").size() > 1)
  headers = (["Run"] + (["Level (% weights)"] if by_level else ["% weights"]) + ["Trials"]
             + [f"{heading} (%)" for heading in MEASURES.values()]
             + [f"{i}. {CHECKS[name][0]}" for i, name in enumerate(CHECKS, start=1)]
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
  for name, heading in MEASURES.items():
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
  markdown = table_markdown(frame)
  with open(stem + ".md", "w") as f:
    f.write(markdown)
  saved = []
  save(plot_accuracies(frame), out_dir, TABLE_STEM, formats,
       "Gradient-masking checks: robust accuracy of each run under every attack (mean over "
       "trials); suspected runs in red; dotted: the large-eps bound", saved)
  tol = f"{100 * options.tolerance:g} point{'s' if options.tolerance != 0.01 else ''}"
  links = "".join(f" [{ext}]({os.path.relpath(stem + '.' + ext, out_dir)})"
                  for ext in ("csv", "md"))
  level = ("every finished level" if options.all_levels
           else "the last level every trial finished")
  checks = "\n".join(f"{i}. **{heading}**: {sentence.format(tol=tol)}."
                     for i, (heading, sentence) in enumerate(CHECKS.values(), start=1))
  suspected = int((frame["verdict"] == SUSPECTED).sum())
  text = (
      "Is the robustness real, or are the gradients hidden (Athalye et al. 2018)? Every run "
      f"with an `--attack` is attacked again: the final weights of each trial at {level}, "
      f"on the first {options.examples} test images (all of them where the test set is "
      "smaller), with the true labels. Numbers are "
      "robust accuracies (correct both clean and attacked), means over trials, in percent: "
      "FGSM and PGD at the run's eps (PGD with its step size and steps, random start), PGD "
      f"with {STRONG_STEPS_FACTOR}x the steps and {STRONG_RESTARTS} restarts, PGD at eps "
      f"{LARGE_EPS:g} (step {LARGE_EPS_STEP_SIZE:g}, {LARGE_EPS_STEPS} steps), and transfer "
      "(trial t's model shown the PGD examples crafted on trial (t + 1) mod T's model of the "
      "same run). The checks:\n\n"
      f"{checks}\n\nA run is *suspected* when any check is. Suspected: {suspected} of "
      f"{len(frame)} rows.{links}\n\n{markdown}")
  return [(HEADING, text, saved)]
