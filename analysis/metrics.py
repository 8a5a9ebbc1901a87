"""Per-trial end points (final evaluation, early stopping) and their summaries.

Every statistic over trials is the mean and the *sample* standard deviation
(ddof=1, as pandas and seaborn compute it; NaN for a single trial) together
with the number of trials n, so a reader can tell a tight band from a lone run.
"""

from typing import List, Sequence

import numpy as np
import pandas as pd

# The sparsity levels drawn by the seed's figures (percent of weights left).
SEED_PERCENT_LEVELS = (100.0, 51.3, 16.9, 8.7, 3.6, 1.8)

# Columns that identify one line of a figure: a run's configuration.
SERIES_KEYS = ("dataset", "model", "attack", "training_mode", "experiment",
               "setting")
# One trained network: a trial of a run at one prune iteration.
NETWORK_KEYS = ("run_dir", "trial", "prune_iteration")
# The order in which experiments are listed and drawn.
EXPERIMENT_ORDER = ("reinit_orig", "reinit_rand", "reinit_none", "random_reinit", "random_prune",
                    "rewind", "hydra", "hydra_score", "no_pruning", "train")
# A level counts as dense when it keeps this percent of the weights or more.
DENSE_PERCENT = 99.999
DENSE_TOLERANCE_POINTS = 1.0


def final_evaluations(evaluations: pd.DataFrame,
                      split: str = "test") -> pd.DataFrame:
  """Returns the last evaluation of every network on `split`.

  Args:
    evaluations: `Study.evaluations`.
    split: "train", "valid" or "test".

  Returns:
    One row per (run, trial, prune iteration) with the columns of
    `evaluations`; `iteration` is the final training iteration.
  """
  rows = evaluations[evaluations["split"] == split]
  last = rows.groupby(list(NETWORK_KEYS))["iteration"].idxmax()
  return rows.loc[last.values].reset_index(drop=True)


def early_stop_evaluations(evaluations: pd.DataFrame) -> pd.DataFrame:
  """Returns the test evaluation at each network's early-stop iteration.

  The early-stop iteration is the evaluation with the smallest validation
  `loss` (the training objective, as in the seed); ties go to the earliest.

  Returns:
    One row per (run, trial, prune iteration) with the columns of
    `evaluations` for the test split, plus `early_stop_iteration`.
  """
  valid = evaluations[evaluations["split"] == "valid"]
  # A NaN loss is no minimum; a network without a finite one has no stop.
  valid = valid[np.isfinite(valid["loss"])]
  valid = valid.sort_values(list(NETWORK_KEYS) + ["iteration"], kind="stable")
  best = valid.loc[valid.groupby(list(NETWORK_KEYS))["loss"].idxmin().values]
  best = best.loc[:, list(NETWORK_KEYS) + ["iteration"]].rename(
      columns={"iteration": "early_stop_iteration"})
  test = evaluations[evaluations["split"] == "test"].sort_values("iteration")
  best = best.sort_values("early_stop_iteration")
  # The test set is evaluated at the same iterations as the validation set;
  # `merge_asof` also copes with a test log that skipped one.
  merged = pd.merge_asof(
      best, test, left_on="early_stop_iteration", right_on="iteration",
      by=list(NETWORK_KEYS), direction="nearest")
  return merged.sort_values(list(NETWORK_KEYS)).reset_index(drop=True)


def summarize(frame: pd.DataFrame, by: Sequence[str],
              values: Sequence[str]) -> pd.DataFrame:
  """Mean, sample std (ddof=1) and count of `values` over trials.

  Args:
    frame: one row per trial (and whatever `by` distinguishes).
    by: grouping columns; `percent_weights_remaining` is averaged over the
      group (the trials of one prune iteration have the same level up to ties).
    values: columns to summarize.

  Returns:
    One row per group with `by`, `percent_weights_remaining` (when present) and
    `<value>_mean`, `<value>_std`, `<value>_n` for each value.
  """
  grouped = frame.groupby(list(by), sort=True)
  parts = {}
  if "percent_weights_remaining" in frame.columns and (
      "percent_weights_remaining" not in by):
    parts["percent_weights_remaining"] = grouped[
        "percent_weights_remaining"].mean()
  for value in values:
    parts[f"{value}_mean"] = grouped[value].mean()
    parts[f"{value}_std"] = grouped[value].std(ddof=1)
    parts[f"{value}_n"] = grouped[value].count()
  return pd.DataFrame(parts).reset_index()


def nearest_levels(available: Sequence[float],
                   targets: Sequence[float] = SEED_PERCENT_LEVELS
                  ) -> List[float]:
  """Picks, for each target level, the nearest available one (log scale).

  Args:
    available: percent of weights remaining that the data has.
    targets: wanted levels, e.g. the seed's 100, 51.3, ..., 1.8.

  Returns:
    The distinct chosen levels, in descending order. Targets below the
    sparsest available level all map to it, so a short run yields fewer lines.
  """
  available = np.asarray(sorted(set(float(a) for a in available)))
  if available.size == 0:
    return []
  chosen = set()
  for target in targets:
    distance = np.abs(np.log(available) - np.log(target))
    chosen.add(float(available[int(np.argmin(distance))]))
  return sorted(chosen, reverse=True)


def level_label(percent_weights_remaining: float) -> str:
  """Formats a sparsity level the way the seed labels it ("51.3")."""
  return f"{percent_weights_remaining:.1f}"


def best_sparsity_summary(evaluations: pd.DataFrame,
                          tolerance_points: float = DENSE_TOLERANCE_POINTS
                         ) -> pd.DataFrame:
  """Finds, per run, the sparsest level whose accuracy stays near the dense one.

  Uses the mean final test accuracy over trials. A level qualifies when its
  mean is at least the dense (prune iteration 0, all weights) mean minus
  `tolerance_points` percentage points; the smallest qualifying percent of weights
  remaining wins (levels in between need not qualify). A run without a dense level
  (HYDRA: its score phase and fine-tuning are both sparse) gets NaNs.

  Returns:
    One row per run: the series keys, `run_dir`, `trials`, the dense and best
    accuracies (in %), `best_prune_iteration` and
    `best_percent_weights_remaining`.
  """
  final = final_evaluations(evaluations, "test")
  levels = summarize(final, ["run_dir", "prune_iteration"], ["acc"])
  rows = []
  for run_dir, run_levels in levels.groupby("run_dir", sort=True):
    # The run's last level names it (HYDRA's level 0 is its score-phase series).
    run = final[final["run_dir"] == run_dir].sort_values("prune_iteration").iloc[-1]
    dense = run_levels[(run_levels["prune_iteration"] == 0)
                       & (run_levels["percent_weights_remaining"] >= DENSE_PERCENT)]
    row = {key: run[key] for key in SERIES_KEYS}
    row["run_dir"] = run_dir
    row["trials"] = int(final[final["run_dir"] == run_dir]["trial"].nunique())
    if dense.empty:
      row.update(dense_test_acc=np.nan, best_prune_iteration=np.nan,
                 best_percent_weights_remaining=np.nan, best_test_acc=np.nan)
      rows.append(row)
      continue
    dense_acc = 100 * float(dense["acc_mean"].iloc[0])
    within = run_levels[100 * run_levels["acc_mean"] >=
                        dense_acc - tolerance_points - 1e-9]
    best = within.loc[within["percent_weights_remaining"].idxmin()]
    row.update(
        dense_test_acc=dense_acc,
        best_prune_iteration=int(best["prune_iteration"]),
        best_percent_weights_remaining=float(
            best["percent_weights_remaining"]),
        best_test_acc=100 * float(best["acc_mean"]))
    rows.append(row)
  order = {e: i for i, e in enumerate(EXPERIMENT_ORDER)}
  return pd.DataFrame(rows).sort_values(
      ["dataset", "model", "setting", "attack", "training_mode", "experiment"],
      key=lambda c: c.map(order) if c.name == "experiment" else c,
      ascending=[True, True, True, True, False, True],
      kind="stable").reset_index(drop=True)
