"""Robust accuracy against epsilon (`--eps_sweep`): curves per sparsity level and per method.

The runner keeps each level's sweep in the level's folder (`eps_sweep.json`,
written by `experiments/eps_sweep.py` at the end of the level). This module
only reads them:

  tables/robustness_curves.{csv,md}       one row per run and level: the mean robust
                                          accuracy over trials at each eps, and the area
  figures/robustness_curves.<format>      a panel per run: accuracy against eps, a line
                                          per sparsity level (mean over trials, min-max band)
  figures/robustness_area.<format>        a panel per data set and model: the area against
                                          the weights remaining, a line per method

The area is the integral of robust accuracy over the swept budgets divided by
their range (trapezoids): the mean robust accuracy over [eps_min, eps_max], in
[0, 1]; it ranks methods without choosing one budget.
"""

import os
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import cm
from matplotlib import pyplot as plt
import numpy as np
import pandas as pd

from robust_sparse.analysis import figures, load, metrics
from robust_sparse.core import files
from robust_sparse.core.run_folder import EPS_SWEEP_FILE, level_dir

TABLE_STEM = "robustness_curves"
AREA_STEM = "robustness_area"
HEADING = "Robust accuracy against epsilon"
COLUMNS = ("run_dir", "dataset", "model", "method", "trial", "prune_iteration",
           "percent_weights_remaining", "attack", "examples", "eps", "accuracy")


def area(eps: Sequence[float], accuracy: Sequence[float]) -> float:
  """The area under accuracy(eps) over the swept range divided by its width (trapezoids):
  the mean robust accuracy over the budgets; one budget: its accuracy."""
  eps, accuracy = np.asarray(eps, float), np.asarray(accuracy, float)
  if len(eps) == 1 or eps[-1] == eps[0]:
    return float(accuracy.mean())
  return float(np.trapezoid(accuracy, eps) / (eps[-1] - eps[0]))


def method_label(run: Dict, prune_iteration: Optional[int] = None) -> str:
  """`method / attack / training mode [setting]`, the method as the figures name it; with
  `prune_iteration`, a phase level is its own method (HYDRA's score phase, level 0, is not
  HYDRA's result: `load.level_experiment`)."""
  experiment = str(run.get("experiment", "?"))
  if prune_iteration is not None:
    experiment = load.level_experiment(experiment, prune_iteration)
  label = f"{figures.experiment_label(experiment)} / {run.get('attack', '?')}"
  label += " / " + load.training_mode(bool(run.get("adv_train", False)))
  setting = run.get("setting") or ""
  if (run.get("adv_train") and run.get("adv_loss", "pgd_ce") != "pgd_ce"
      and "adv_loss=" not in setting):  # The setting may name the loss already.
    label += f" ({run['adv_loss']})"
  return label + (f" [{setting}]" if setting else "")


def collect(study: load.Study) -> pd.DataFrame:
  """One row per (run, trial, level, eps) of every stored sweep (`COLUMNS`); empty: none."""
  rows = []
  levels = (study.evaluations[["run_dir", "trial", "prune_iteration",
                               "percent_weights_remaining"]]
            .drop_duplicates(["run_dir", "trial", "prune_iteration"]))
  runs = {run["run_dir"]: run for run in study.runs.to_dict("records")}
  for level in levels.itertuples(index=False):
    run = runs.get(level.run_dir)
    if run is None or not list(run.get("eps_sweep") or ()):
      continue
    path = os.path.join(level_dir(level.run_dir, int(level.trial), int(level.prune_iteration)),
                        EPS_SWEEP_FILE)
    if not os.path.exists(path):
      continue
    sweep = files.read_json(path)
    for eps, accuracy in zip(sweep["eps"], sweep["accuracy"]):
      rows.append({"run_dir": level.run_dir, "dataset": run["dataset"], "model": run["model"],
                   "method": method_label(run, int(level.prune_iteration)),
                   "trial": int(level.trial),
                   "prune_iteration": int(level.prune_iteration),
                   "percent_weights_remaining": float(level.percent_weights_remaining),
                   "attack": sweep["attack"], "examples": int(sweep["examples"]),
                   "eps": float(eps), "accuracy": float(accuracy)})
  return pd.DataFrame(rows, columns=COLUMNS)


def areas(frame: pd.DataFrame) -> pd.DataFrame:
  """One row per (run, trial, level): the area of its curve."""
  keys = ["run_dir", "dataset", "model", "method", "trial", "prune_iteration",
          "percent_weights_remaining"]
  out = [dict(zip(keys, key), area=area(group["eps"], group["accuracy"]))
         for key, group in frame.sort_values("eps").groupby(keys, sort=True)]
  return pd.DataFrame(out, columns=keys + ["area"])


def summary(frame: pd.DataFrame) -> pd.DataFrame:
  """One row per (run, level): trials, mean accuracy at each eps (`acc_eps=<e>`), the area's
  mean and standard deviation over trials."""
  keys = ["run_dir", "dataset", "model", "method", "prune_iteration"]
  level_area = areas(frame).groupby(keys)["area"]
  spread = {key: (float(values.mean()), float(values.std(ddof=0))) for key, values in level_area}
  rows = []
  for key, group in frame.groupby(keys, sort=True):
    row = dict(zip(keys, key))
    row["percent_weights_remaining"] = float(group["percent_weights_remaining"].mean())
    row["trials"] = int(group["trial"].nunique())
    row["attack"] = group["attack"].iloc[0]
    for eps, at_eps in group.groupby("eps"):
      row[f"acc_eps={eps:g}"] = float(at_eps["accuracy"].mean())
    row["area_mean"], row["area_std"] = spread[key]
    rows.append(row)
  table = pd.DataFrame(rows)
  return table.sort_values(["dataset", "model", "method", "percent_weights_remaining"],
                           ascending=[True, True, True, False]).reset_index(drop=True)


def table_markdown(table: pd.DataFrame) -> str:
  eps_columns = [c for c in table.columns if c.startswith("acc_eps=")]
  headers = (["Run", "% weights", "Trials"] + [f"eps {c.split('=')[1]} (%)" for c in eps_columns]
             + ["Area (%)"])
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in table.to_dict("records"):
    cells = ([row["method"], metrics.level_label(row["percent_weights_remaining"]),
              str(row["trials"])]
             + [f"{100 * row[c]:.1f}" if not pd.isna(row[c]) else "–" for c in eps_columns]
             + [f"{100 * row['area_mean']:.1f} ± {100 * row['area_std']:.1f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(frame: pd.DataFrame):
  """A panel per run: robust accuracy (%) against eps, a line per sparsity level."""
  runs = list(frame.groupby(["run_dir", "method"], sort=True))
  columns = min(3, len(runs))
  rows = int(np.ceil(len(runs) / columns))
  figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.8 * rows),
                              squeeze=False)
  for axis, ((_, method), group) in zip(axes.flat, runs):
    levels = sorted(group["percent_weights_remaining"].unique(), reverse=True)
    colours = cm.viridis(np.linspace(0, 0.9, len(levels)))
    for colour, percent in zip(colours, levels):
      at_level = group[group["percent_weights_remaining"] == percent]
      stats = at_level.groupby("eps")["accuracy"].agg(["mean", "min", "max"]).sort_index()
      axis.plot(stats.index, 100 * stats["mean"], marker="o", markersize=3, color=colour,
                label=f"{metrics.level_label(percent)} %")
      if at_level["trial"].nunique() > 1:
        axis.fill_between(stats.index, 100 * stats["min"], 100 * stats["max"], color=colour,
                          alpha=0.15, linewidth=0)
    dataset, model = group["dataset"].iloc[0], group["model"].iloc[0]
    axis.set_title(f"{dataset} / {model}\n{method}", fontsize=9)
    # The attack's spec may be long (autoattack(steps=50,...)): a line of its own.
    axis.set_xlabel(f"eps ({int(group['examples'].iloc[0])} test images)\n"
                    f"{group['attack'].iloc[0]}", fontsize=9)
    axis.set_ylabel("robust accuracy (%)")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(title="weights remaining", fontsize=7, title_fontsize=7, loc="upper right")
  for axis in list(axes.flat)[len(runs):]:
    axis.set_visible(False)
  figure.tight_layout()
  return figure


def plot_areas(frame: pd.DataFrame):
  """A panel per data set and model: the area (%) against weights remaining, a line per
  method (mean over trials, min-max band)."""
  level_area = areas(frame)
  groups = list(level_area.groupby(["dataset", "model"], sort=True))
  figure, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 4.0), squeeze=False)
  for axis, ((dataset, model), group) in zip(axes.flat, groups):
    for method, by_method in group.groupby("method", sort=True):
      stats = (by_method.groupby("percent_weights_remaining")["area"]
               .agg(["mean", "min", "max"]).sort_index(ascending=False))
      line, = axis.plot(stats.index, 100 * stats["mean"], marker="o", markersize=3,
                        label=method)
      if by_method["trial"].nunique() > 1:
        axis.fill_between(stats.index, 100 * stats["min"], 100 * stats["max"],
                          color=line.get_color(), alpha=0.15, linewidth=0)
    if group["percent_weights_remaining"].nunique() > 1:
      figures._percent_axis(axis, group["percent_weights_remaining"].tolist())  # pylint: disable=protected-access
    else:
      axis.set_xlabel(figures.PERCENT_AXIS_LABEL)
    axis.set_title(f"{dataset} / {model}", fontsize=9)
    axis.set_ylabel("area under robust accuracy vs eps (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
  figure.tight_layout()
  return figure


def sections(study: load.Study, source: str, out_dir: str, formats: Sequence[str], save,
             tables_dir: str) -> List[tuple]:
  """Writes the table and the figures; returns [(heading, text, figures)] (none: no sweep)."""
  frame = collect(study)
  if frame.empty:
    return []
  table = summary(frame)
  shown = table.copy()
  if source:
    shown["run_dir"] = [os.path.relpath(path, source) for path in shown["run_dir"]]
  stem = os.path.join(out_dir, tables_dir, TABLE_STEM)
  shown.to_csv(stem + ".csv", index=False, float_format="%.6g")
  markdown = table_markdown(table)
  with open(stem + ".md", "w") as f:
    f.write(markdown)
  saved = []
  save(plot_curves(frame), out_dir, TABLE_STEM, formats,
       "Robust accuracy against eps, a line per sparsity level (mean over trials; band: "
       "min-max)", saved)
  save(plot_areas(frame), out_dir, AREA_STEM, formats,
       "Area under robust accuracy against eps, per method and weights remaining", saved)
  links = "".join(f" [{ext}]({os.path.relpath(stem + '.' + ext, out_dir)})"
                  for ext in ("csv", "md"))
  attacks = ", ".join(sorted(frame["attack"].unique()))
  text = (f"Every level's final network attacked at each `--eps_sweep` budget ({attacks}, true "
          "labels; robust accuracy = correct both clean and attacked; eps 0 is the clean "
          "accuracy), means over trials in percent. Area: the mean robust accuracy over the "
          f"swept range (trapezoids), ± its standard deviation over trials.{links}\n\n"
          f"{markdown}")
  return [(HEADING, text, saved)]
