"""The report's section for `--experiment=augmented_flatness` runs.

Such a run trains nothing (it has no level for `load.load_study`): it measures
every checkpoint of its `--pretrained_run` and writes `augmented_flatness.csv`
(one row per checkpoint: iteration, epoch, the measurement summary and
`<block>/<term>` columns; see `experiments.flatness`). Per run, the section shows
the average block's terms against the checkpoint (the paper's figure, log y) and
a table of the first and last checkpoints; runs are found by their
`hparams.json`, wherever they are filed.
"""

import json
import os
from typing import List, Sequence

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import pyplot as plt
import numpy as np
import pandas as pd

from robust_sparse.analysis import load
from robust_sparse.analysis import tables

EXPERIMENT = "augmented_flatness"
SUMMARY_CSV = "augmented_flatness.csv"  # experiments.flatness.SUMMARY_CSV
AVERAGE = "average"
# The paper's figure: AS_k, AS_v and the L0 and L2 coefficients (robust_sparse.measure.flatness).
FIGURE_TERMS = ("key", "value", "L0_preview", "L2")
TABLE_COLUMNS = ("iteration", "epoch", "accuracy", "average/key", "average/value",
                 "average/L0_preview", "average/L2")


def measured_runs(base_dir: str) -> List[tuple]:
  """[(run folder, hparams, summary table)] of the augmented_flatness runs under `base_dir`."""
  runs = []
  for run_dir in load.find_run_dirs(base_dir):
    try:
      with open(os.path.join(run_dir, load.HPARAMS_FILE)) as f:
        hparams = json.load(f)
      if hparams.get("experiment") != EXPERIMENT:
        continue
      summary = pd.read_csv(os.path.join(run_dir, SUMMARY_CSV))
    except (OSError, ValueError):
      continue  # Unfinished (no summary yet) or unreadable: nothing to show.
    if not summary.empty and "iteration" in summary:
      runs.append((run_dir, hparams, summary.sort_values("iteration")))
  return runs


def plot_flatness(summary: pd.DataFrame, title: str):
  """The average block's terms against the checkpoint, log y; None when nothing is positive."""
  x_column = "epoch" if "epoch" in summary and summary["epoch"].notna().all() else "iteration"
  figure, axis = plt.subplots(figsize=(7.5, 4.6), layout="constrained")
  drawn = 0
  for term in FIGURE_TERMS:
    column = f"{AVERAGE}/{term}"
    if column not in summary:
      continue
    values = summary[column].to_numpy(float)
    keep = np.isfinite(values) & (values > 0)  # No place on a log axis otherwise.
    if keep.any():
      axis.plot(summary[x_column].to_numpy(float)[keep], values[keep], marker="o",
                label=f"{AVERAGE} {term}")
      drawn += 1
  if not drawn:
    plt.close(figure)
    return None
  axis.set_yscale("log")
  axis.set_xlabel("Epoch of the measured run" if x_column == "epoch"
                  else "Iteration of the measured run")
  axis.set_ylabel("Augmented flatness term")
  axis.grid(alpha=0.3, which="both")
  axis.legend(fontsize=9, frameon=False)
  axis.set_title(title, fontsize=11)
  return figure


def _table_markdown(summary: pd.DataFrame) -> str:
  columns = [c for c in TABLE_COLUMNS if c in summary]
  rows = summary.iloc[[0, -1]] if len(summary) > 1 else summary
  cells = rows[columns].astype(object)
  cells["iteration"] = [int(v) for v in cells["iteration"]]
  if "accuracy" in cells:
    cells["accuracy"] = [f"{100 * v:.2f}" for v in cells["accuracy"]]
  for column in columns:
    if column.startswith(AVERAGE):
      cells[column] = [f"{v:.4g}" for v in cells[column]]
  return tables.to_markdown(cells, index=False)


def sections(base_dir: str, out_dir: str, formats: Sequence[str], save, group_stem
             ) -> List[tuple]:
  """Draws each augmented_flatness run's figure; returns [(heading, text, figures)]."""
  out = []
  for run_dir, hparams, summary in measured_runs(base_dir):
    dataset, model = hparams.get("dataset", "?"), hparams.get("model", "?")
    source = hparams.get("pretrained_run") or "?"
    run_hash = load.run_hash(run_dir) or "run"
    heading = f"{dataset} / {model}: augmented flatness"
    saved = []
    title = f"{dataset} | {model}: augmented flatness of {os.path.basename(source)}"
    save(plot_flatness(summary, title), out_dir,
         group_stem(dataset, model, EXPERIMENT, run_hash), formats,
         f"{dataset} / {model}: augmented flatness (average over MLP blocks) of each "
         f"checkpoint of `{source}`", saved)
    text = (f"Run `{os.path.relpath(run_dir, base_dir)}` measured {len(summary)} "
            f"checkpoints of `{source}` (`--flatness_data="
            f"{hparams.get('flatness_data', 'train')}`); first and last checkpoint "
            f"(accuracy in %; every term in `{SUMMARY_CSV}` there):\n\n"
            + _table_markdown(summary) + "\n")
    out.append((heading, text, saved))
  return out
