"""Matplotlib figures of a loaded study (Agg backend; nothing is shown on screen).

Each function takes the rows of one group of runs (one data set, model, attack
and hyper-parameter setting, sometimes one training mode) and returns a
`matplotlib.figure.Figure`, or None when there is nothing to draw. Lines are
means over trials; bands are ±1 sample standard deviation (ddof=1).
"""

import os
import re
import textwrap
from typing import Dict, List, Optional, Sequence

from absl import logging
import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import colors as mcolors
from matplotlib import lines as mlines
from matplotlib import pyplot as plt
from matplotlib import ticker
import numpy as np
import pandas as pd

from robust_sparse.analysis import metrics

EXPERIMENT_LABELS = {
    "reinit_orig": "original init (ticket)",
    "reinit_rand": "random reinit",
    "reinit_none": "continued training",
    "random_reinit": "ticket's masks, random init",
    "random_prune": "random masks, original init",
    "rewind": "rewind",
    "hydra": "HYDRA (scores + fine-tuning)",
    "hydra_score": "HYDRA score phase (no fine-tuning)",
    "no_pruning": "no pruning",
    "train": "plain training",
}
# The seed's line styles: orig solid, rand dotted (1,1), none dashed (2,2).
EXPERIMENT_DASHES = {
    "reinit_orig": (None, None),
    "reinit_rand": (0, (1, 1)),
    "reinit_none": (0, (2, 2)),
    "random_reinit": (0, (3, 1, 1, 1)),
    "random_prune": (0, (1, 2)),
    "rewind": (0, (5, 1, 1, 1)),
    "hydra": (None, None),
    "hydra_score": (0, (2, 1)),
    "no_pruning": (0, (4, 1)),
    "train": (0, (4, 1)),
}
EXPERIMENT_COLOURS = {
    "reinit_orig": "tab:blue",
    "reinit_rand": "tab:orange",
    "reinit_none": "tab:green",
    "random_reinit": "tab:purple",
    "random_prune": "tab:olive",
    "rewind": "tab:red",
    "hydra": "tab:cyan",
    "hydra_score": "tab:pink",
    "no_pruning": "tab:gray",
    "train": "tab:brown",
}
EXPERIMENT_MARKERS = {
    "reinit_orig": "o", "reinit_rand": "s", "reinit_none": "^",
    "random_reinit": "v", "random_prune": "X", "rewind": "D", "no_pruning": "*", "train": "P",
    "hydra": "h", "hydra_score": "d",
}
EXPERIMENT_ORDER = metrics.EXPERIMENT_ORDER
TRAINING_MODES = ("natural", "adversarial")
CURVE_METRICS = {
    "acc": "Test accuracy (%)",
    "adv_acc": "Adversarial test accuracy (%)",
    "loss": "Test loss (training objective, nats)",
}
PERCENT_AXIS_LABEL = "Weights remaining (%, log scale)"
BAND_ALPHA = 0.18


def experiment_label(experiment: str) -> str:
  return EXPERIMENT_LABELS.get(experiment, experiment)


def _style(experiment: str) -> dict:
  dashes = EXPERIMENT_DASHES.get(experiment, (None, None))
  return {} if dashes[0] is None else {"linestyle": dashes}


def title(dataset: str, model: str, attack: str,
          mode: Optional[str] = None, setting: str = "") -> str:
  """Names the data set, model, attack and (if given) the training mode."""
  parts = [dataset, model, f"attack: {attack.upper()}"]
  if mode is not None:
    parts.append(f"{mode} training")
  text = " | ".join(parts)
  return f"{text}\n[{setting}]" if setting else text


def slug(text: str) -> str:
  """Makes a file-name-safe version of `text`."""
  return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def save(figure, out_dir: str, stem: str, formats: Sequence[str]) -> List[str]:
  """Saves `figure` once per format, closes it, returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for fmt in formats:
    path = os.path.join(out_dir, f"{stem}.{fmt}")
    figure.savefig(path, dpi=110)
    paths.append(path)
  # Saving drew it: a panel whose axis lost its tick labels is said once here.
  bare = missing_tick_labels(figure, draw=False)
  if bare:
    logging.warning("%s: no tick labels on %s", paths[0] if paths else stem, "; ".join(bare))
  plt.close(figure)
  return paths


def _level_colours(levels: Sequence[float]) -> Dict[float, tuple]:
  palette = plt.cm.viridis(np.linspace(0.0, 0.88, max(len(levels), 1)))
  return {level: tuple(palette[i]) for i, level in enumerate(levels)}


def _mean_std_band(axis, x, mean, std, colour, **line_kwargs):
  axis.plot(x, mean, color=colour, **line_kwargs)
  std = np.nan_to_num(np.asarray(std, dtype=float))
  axis.fill_between(x, mean - std, mean + std, color=colour, alpha=BAND_ALPHA,
                    linewidth=0)


def _modes_present(rows: pd.DataFrame) -> List[str]:
  """The training modes `rows` hold, in `TRAINING_MODES` order.

  A figure draws one column per mode present: an empty panel sharing an axis
  with a drawn one would take that axis' tick labels with it.
  """
  present = set(rows["training_mode"])
  return [mode for mode in TRAINING_MODES if mode in present]


def _mode_title(mode: str, modes: Sequence[str]) -> str:
  missing = [m for m in TRAINING_MODES if m not in modes]
  return f"{mode} training" + (
      f"\n(no runs with {' or '.join(missing)} training)" if missing else "")


def missing_tick_labels(figure, draw: bool = True) -> List[str]:
  """Names the axes of `figure` that show data without tick labels to read it by.

  An axis (x or y) of a visible panel needs at least one visible, non-empty
  tick label on itself or on a panel it is shared with (inner panels of a
  shared row leave theirs to the outer one). Image panels (heat maps) and
  colour bars' long axes are exempt where they have no ticks by design.

  Args:
    figure: a drawn figure, or any with `draw`.
    draw: draw it first (tick labels get their text when drawn); False for a
      figure just saved.

  Returns:
    One line per bare axis, e.g. "panel 2 ('adversarial training'): y axis";
    empty when every axis can be read.
  """
  if draw:
    figure.canvas.draw()
  problems = []
  for index, axes in enumerate(figure.axes):
    if not axes.get_visible() or not axes.axison:
      continue
    for name in ("x", "y"):
      axis = getattr(axes, f"{name}axis")
      if not axis.get_visible():
        continue
      ticks = getattr(axes, f"get_{name}ticks")()
      if len(ticks) == 0 and (axes.images or hasattr(axes, "_colorbar")):
        continue
      shared = getattr(axes, f"get_shared_{name}_axes")().get_siblings(axes)
      if any(label.get_visible() and label.get_text().strip()
             for sibling in shared if sibling.get_visible()
             for label in getattr(sibling, f"get_{name}ticklabels")()):
        continue
      problems.append(f"panel {index + 1} ({axes.get_title()!r}): {name} axis")
  return problems


def plot_training_curves(test_rows: pd.DataFrame, metric: str,
                         targets: Sequence[float] = metrics.SEED_PERCENT_LEVELS
                        ) -> Optional[plt.Figure]:
  """The seed's 1x3 figure of a test metric against training iteration.

  Left: the ticket (reinit_orig) at every chosen sparsity level. Middle: the
  ticket vs random reinitialisation; right: vs continued training (the dense
  level, the same training in every experiment, is left out of these two).

  Args:
    test_rows: test-split evaluations of one data set, model, attack, training
      mode and setting.
    metric: "acc", "adv_acc" or "loss".
    targets: wanted sparsity levels; the nearest present ones are drawn.

  Returns:
    The figure, or None if none of the three experiments is present.
  """
  experiments = set(test_rows["experiment"])
  if not experiments & {"reinit_orig", "reinit_rand", "reinit_none"}:
    return None
  first = test_rows.iloc[0]
  scale = 1.0 if metric == "loss" else 100.0
  curves = metrics.summarize(
      test_rows.assign(value=scale * test_rows[metric]),
      ["experiment", "prune_iteration", "iteration"], ["value"])
  levels_by_iteration = curves.groupby("prune_iteration")[
      "percent_weights_remaining"].mean()
  reference = curves[curves["experiment"] == "reinit_orig"]
  if reference.empty:
    reference = curves
  chosen_levels = metrics.nearest_levels(
      reference["percent_weights_remaining"], targets)
  chosen = {}  # prune iteration -> level
  for level in chosen_levels:
    prune_iteration = int((levels_by_iteration - level).abs().idxmin())
    chosen[prune_iteration] = level
  colours = _level_colours(chosen_levels)

  panels = [
      (base, other, panel_title) for base, other, panel_title in (
          ("reinit_orig", None, "Ticket (original init)"),
          ("reinit_orig", "reinit_rand", "Ticket vs random reinit"),
          ("reinit_orig", "reinit_none", "Ticket vs continued training"))
      # A panel with none of its experiments is left out, not drawn empty.
      if experiments & {base, other}]
  figure, axes = plt.subplots(1, len(panels), figsize=(1.5 + 5.2 * len(panels), 5.2),
                              sharey=True, squeeze=False, layout="constrained")
  axes = axes[0]
  for axis, (base, other, panel_title) in zip(axes, panels):
    axis.set_title(panel_title, fontsize=11)
    shown = [e for e in (base, other) if e is not None]
    missing = [e for e in shown if e not in experiments]
    for experiment in shown:
      for prune_iteration, level in chosen.items():
        if other is not None and prune_iteration == 0:
          continue
        curve = curves[(curves["experiment"] == experiment)
                       & (curves["prune_iteration"] == prune_iteration)]
        if curve.empty:
          continue
        _mean_std_band(axis, curve["iteration"], curve["value_mean"],
                       curve["value_std"], colours[level], linewidth=1.6,
                       **_style(experiment))
    if missing:
      axis.text(0.02, 0.02, f"no {missing[0]} runs", transform=axis.transAxes,
                fontsize=9, color="0.35")
    axis.set_xlabel("Training iteration")
    axis.grid(alpha=0.3)
    axis.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda x, _: f"{x:,.0f}"))
  axes[0].set_ylabel(CURVE_METRICS[metric])
  if metric == "loss":
    axes[0].set_ylim(bottom=0)

  handles = [mlines.Line2D([], [], color=colours[level], linewidth=2.5,
                           label=f"{metrics.level_label(level)}% weights")
             for level in chosen_levels]
  handles += [mlines.Line2D([], [], color="black", linewidth=1.6,
                            label=EXPERIMENT_LABELS[e], **_style(e))
              for e in ("reinit_orig", "reinit_rand", "reinit_none")]
  figure.legend(handles=handles, loc="outside lower center",
                ncol=len(handles), frameon=False, fontsize=9.5)
  figure.suptitle(title(first["dataset"], first["model"], first["attack"],
                        first["training_mode"], first["setting"]) +
                  f"\n{CURVE_METRICS[metric].split(' (')[0]} during training "
                  "(mean ± 1 std over trials)", fontsize=12)
  return figure


def _percent_text(percent: float) -> str:
  text = metrics.level_label(percent)
  return text[:-2] if text.endswith(".0") else text


def _percent_ticks(levels: Sequence[float]) -> List[float]:
  """Every level when there are few, else the seed's levels (nearest)."""
  distinct = sorted(set(round(float(l), 6) for l in levels), reverse=True)
  if len(distinct) <= 7:
    return distinct
  return metrics.nearest_levels(distinct, metrics.SEED_PERCENT_LEVELS)


def _percent_axis(axis, levels: Sequence[float]):
  """Log-scaled x axis of weights remaining; sparser to the right."""
  axis.set_xscale("log")
  low, high = min(levels), max(levels)
  axis.set_xlim(high * 1.15, low / 1.15)
  ticks = _percent_ticks(levels)
  axis.xaxis.set_major_locator(ticker.FixedLocator(ticks))
  axis.xaxis.set_minor_locator(ticker.NullLocator())
  axis.xaxis.set_major_formatter(ticker.FuncFormatter(
      lambda x, _: _percent_text(x)))
  axis.set_xlabel(PERCENT_AXIS_LABEL)
  axis.grid(alpha=0.3, which="major")


def _series_lines(axis, summary: pd.DataFrame, value: str, scale: float):
  """One mean line (with a ±1 std band) per experiment."""
  drawn = []
  for experiment, series in summary.groupby("experiment", sort=False):
    series = series.sort_values("percent_weights_remaining", ascending=False)
    colour = EXPERIMENT_COLOURS.get(experiment, "black")
    _mean_std_band(axis, series["percent_weights_remaining"],
                   scale * series[f"{value}_mean"],
                   scale * series[f"{value}_std"], colour, linewidth=1.6,
                   marker=EXPERIMENT_MARKERS.get(experiment, "o"),
                   markersize=4, label=experiment_label(experiment),
                   **_style(experiment))
    drawn.append(experiment)
  return drawn


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
  order = {e: i for i, e in enumerate(EXPERIMENT_ORDER)}
  return frame.sort_values(
      "experiment", key=lambda c: c.map(order).fillna(len(order)),
      kind="stable")


def _by_mode_figure(n_rows: int, n_columns: int, height: float):
  figure, axes = plt.subplots(n_rows, n_columns, figsize=(1.5 + 5.25 * n_columns, height * n_rows),
                              sharex=True, sharey="row", squeeze=False,
                              layout="constrained")
  return figure, axes


def _shared_legend(figure, axes):
  handles, labels = {}, []
  for axis in axes.flat:
    for handle, label in zip(*axis.get_legend_handles_labels()):
      if label not in handles:
        handles[label] = handle
        labels.append(label)
  if not handles:
    return None
  # Two entries per column of panels at most, so that a one-column figure's legend
  # (long names such as HYDRA's score phase) stays inside its width.
  columns = np.atleast_2d(axes).shape[1]
  return figure.legend([handles[l] for l in labels], labels,
                       loc="outside lower center", ncol=min(len(labels), 4, 2 * columns),
                       frameon=False, fontsize=9.5)


def plot_accuracy_vs_sparsity(end_points: pd.DataFrame, when: str
                             ) -> Optional[plt.Figure]:
  """Test and adversarial test accuracy against weights remaining.

  Args:
    end_points: one row per network (`metrics.final_evaluations` or
      `metrics.early_stop_evaluations`) of one data set, model and attack.
    when: "end of training" or "early stopping", for the title.

  Returns:
    A figure with a row per metric: accuracy, adversarial accuracy under
    `--attack`, and the robust accuracy of each `--eval_attacks` attack the
    runs logged (`adv_acc_<name>`); columns = natural, adversarial training.
    None if `end_points` is empty.
  """
  if end_points.empty:
    return None
  first = end_points.iloc[0]
  extra = [c for c in end_points.columns
           if c.startswith("adv_acc_") and end_points[c].notna().any()]
  values = ["acc", "adv_acc"] + extra
  summary = _ordered(metrics.summarize(
      end_points, ["training_mode", "experiment", "prune_iteration"], values))
  levels = summary["percent_weights_remaining"].tolist()
  modes = _modes_present(summary)
  figure, axes = _by_mode_figure(len(values), len(modes), 3.6)
  for column, mode in enumerate(modes):
    rows = summary[summary["training_mode"] == mode]
    for row, value in enumerate(values):
      axis = axes[row, column]
      _percent_axis(axis, levels)
      _series_lines(axis, rows, value, 100.0)
    axes[0, column].set_title(_mode_title(mode, modes), fontsize=11)
  axes[0, 0].set_ylabel(f"Test accuracy (%)\nat {when}")
  axes[1, 0].set_ylabel(f"Adversarial test accuracy (%)\n{first['attack']}, at {when}")
  for row, value in enumerate(extra, start=2):
    axes[row, 0].set_ylabel(f"Robust accuracy (%)\n{value[len('adv_acc_'):]}, at {when}")
  for axis in axes[:-1].flat:
    axis.set_xlabel("")
  _shared_legend(figure, axes)
  figure.suptitle(title(first["dataset"], first["model"], first["attack"],
                        setting=first["setting"]) +
                  f"\nAccuracy at {when} vs sparsity (mean ± 1 std over "
                  "trials)", fontsize=12)
  return figure


def plot_early_stop_iteration(early_stops: pd.DataFrame
                             ) -> Optional[plt.Figure]:
  """Iteration of minimum validation loss against weights remaining.

  Args:
    early_stops: `metrics.early_stop_evaluations` rows of one data set, model
      and attack.

  Returns:
    A 1x2 figure (natural, adversarial training), or None if empty.
  """
  if early_stops.empty:
    return None
  first = early_stops.iloc[0]
  summary = _ordered(metrics.summarize(
      early_stops, ["training_mode", "experiment", "prune_iteration"],
      ["early_stop_iteration"]))
  levels = summary["percent_weights_remaining"].tolist()
  modes = _modes_present(summary)
  figure, axes = _by_mode_figure(1, len(modes), 4.2)
  for column, mode in enumerate(modes):
    axis = axes[0, column]
    _percent_axis(axis, levels)
    axis.set_title(_mode_title(mode, modes), fontsize=11)
    rows = summary[summary["training_mode"] == mode]
    _series_lines(axis, rows, "early_stop_iteration", 1.0)
  axes[0, 0].set_ylabel("Early-stop iteration\n(min. validation loss)")
  axes[0, 0].set_ylim(bottom=0)
  axes[0, 0].yaxis.set_major_formatter(ticker.FuncFormatter(
      lambda y, _: f"{y:,.0f}"))
  _shared_legend(figure, axes)
  figure.suptitle(title(first["dataset"], first["model"], first["attack"],
                        setting=first["setting"]) +
                  "\nEarly-stop iteration vs sparsity (mean ± 1 std over "
                  "trials)", fontsize=12)
  return figure


def plot_tradeoff(final: pd.DataFrame) -> Optional[plt.Figure]:
  """Adversarial vs natural test accuracy at the end of training.

  One line per experiment runs through its sparsity levels; the points are
  coloured by percent of weights remaining (log colour scale) and the dense
  and sparsest levels are annotated.

  Args:
    final: `metrics.final_evaluations` rows of one data set, model and attack.

  Returns:
    A 1x2 figure (natural, adversarial training), or None if empty.
  """
  if final.empty:
    return None
  first = final.iloc[0]
  summary = _ordered(metrics.summarize(
      final, ["training_mode", "experiment", "prune_iteration"],
      ["acc", "adv_acc"]))
  percents = summary["percent_weights_remaining"]
  norm = mcolors.LogNorm(vmin=percents.min(),
                         vmax=max(percents.max(), percents.min() * 1.01))
  colour_map = plt.cm.viridis
  modes = _modes_present(summary)
  figure, axes = plt.subplots(1, len(modes), figsize=(2.5 + 5 * len(modes), 5.2),
                              squeeze=False, layout="constrained")
  axes = axes[0]
  scatter = None
  for axis, mode in zip(axes, modes):
    axis.set_title(_mode_title(mode, modes), fontsize=11)
    rows = summary[summary["training_mode"] == mode]
    for experiment, series in rows.groupby("experiment", sort=False):
      series = series.sort_values("percent_weights_remaining",
                                  ascending=False)
      x, y = 100 * series["acc_mean"], 100 * series["adv_acc_mean"]
      axis.plot(x, y, color=EXPERIMENT_COLOURS.get(experiment, "black"),
                linewidth=1.2, alpha=0.8, zorder=1,
                marker=EXPERIMENT_MARKERS.get(experiment, "o"),
                markersize=0, markerfacecolor="white",
                markeredgecolor="black", label=experiment_label(experiment),
                **_style(experiment))
      scatter = axis.scatter(
          x, y, c=series["percent_weights_remaining"], cmap=colour_map,
          norm=norm, marker=EXPERIMENT_MARKERS.get(experiment, "o"), s=36,
          edgecolors="black", linewidths=0.4, zorder=2)
      if experiment == "reinit_orig":
        # Name the two ends of the ticket's path, outside the point cloud.
        for index, offset, align in ((0, (8, 6), "left"),
                                     (len(series) - 1, (-10, -14), "right")):
          level = series["percent_weights_remaining"].iloc[index]
          axis.annotate(
              f"{metrics.level_label(level)}% weights",
              (x.iloc[index], y.iloc[index]), textcoords="offset points",
              xytext=offset, ha=align, fontsize=8, color="0.2", zorder=3,
              bbox={"boxstyle": "round,pad=0.2", "facecolor": "white",
                    "edgecolor": "0.7", "alpha": 0.85},
              arrowprops={"arrowstyle": "-", "color": "0.5",
                          "linewidth": 0.6})
    axis.set_xlabel("Test accuracy (%)")
    axis.set_ylabel("Adversarial test accuracy (%)")
    axis.grid(alpha=0.3)
    axis.margins(0.12)
  legend = _shared_legend(figure, axes[np.newaxis, :])
  if legend is not None:
    for handle in legend.legend_handles:  # The lines carry no markers.
      handle.set_markersize(6)
  if scatter is not None:
    colour_bar = figure.colorbar(scatter, ax=list(axes))
    colour_bar.set_label("Weights remaining (%)")
    colour_bar.set_ticks(_percent_ticks(percents))
    colour_bar.ax.yaxis.set_minor_locator(ticker.NullLocator())
    colour_bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: _percent_text(v)))
  figure.suptitle(title(first["dataset"], first["model"], first["attack"],
                        setting=first["setting"]) +
                  "\nAdversarial vs natural test accuracy at the end of "
                  "training, across sparsity", fontsize=12)
  return figure


# Learning curves of studies without pruning levels: one row per metric.
LEARNING_CURVE_METRICS = {
    "loss": ("Loss (training objective)", 1.0),
    "acc": ("Accuracy (%)", 100.0),
    "adv_acc": ("Adversarial accuracy (%)", 100.0),
    "top5": ("Top-5 accuracy (%)", 100.0),
    # Training-set measurements (train.csv only): flatness for SGD vs SAM vs
    # SSAM, and the fraction SSAM perturbs.
    "sharpness": ("Sharpness L(w+e) - L(w)", 1.0),
    "m_sharpness": ("m-sharpness", 1.0),
    "mask_lived_weight": ("Perturbed weights (%)", 100.0),
}
LEARNING_CURVE_SPLITS = ("train", "valid", "test")
SPLIT_TITLES = {
    "train": "train (running mean since the last evaluation)",
    "valid": "validation",
    "test": "test",
}
SETTINGS_PER_FIGURE = 10


def learning_curve_axis(rows: pd.DataFrame) -> str:
  """"epoch" when every drawn row logged one, else "iteration"."""
  if "epoch" in rows.columns and rows["epoch"].notna().all():
    return "epoch"
  return "iteration"


def plot_learning_curves(rows: pd.DataFrame, labels: Sequence[str],
                         heading: str) -> Optional[plt.Figure]:
  """Loss, accuracy, adversarial (and top-5) accuracy during training.

  Rows of the figure are metrics (those with at least one finite value),
  columns are the splits; one colour per setting. Lines are means over the
  trials of a setting, bands ±1 sample std. The x axis is the epoch when every
  row logged one, else the training iteration.

  Args:
    rows: evaluations (every split) with a `label` column naming each run's
      setting; runs that share a label have equal hyper-parameters.
    labels: the labels to draw, in legend order (at most `len(tab10)` read
      well; the caller splits longer lists).
    heading: first line of the title (data set and model).

  Returns:
    The figure, or None when `rows` holds none of `labels`.
  """
  rows = rows[rows["label"].isin(labels)]
  if rows.empty:
    return None
  x_column = learning_curve_axis(rows)
  metric_names = [m for m in LEARNING_CURVE_METRICS
                  if m in rows.columns and np.isfinite(rows[m]).any()]
  # A split with no finite value (no validation set: --valid_size=0) gets no
  # column.
  splits = [s for s in LEARNING_CURVE_SPLITS
            if np.isfinite(rows.loc[rows["split"] == s, metric_names].to_numpy(float)).any()]
  # Trials of one setting share their evaluation iterations; the epoch of an
  # iteration is averaged (it is the same up to rounding).
  summary = metrics.summarize(
      rows.assign(x=rows[x_column].astype(float)),
      ["label", "split", "iteration"], ["x"] + metric_names)
  palette = plt.cm.tab10(np.arange(10)) if len(labels) <= 10 else (
      plt.cm.tab20(np.arange(20)))
  colours = {label: tuple(palette[i % len(palette)])
             for i, label in enumerate(labels)}

  figure, axes = plt.subplots(
      len(metric_names), len(splits),
      figsize=(4.6 * len(splits) + 1, 2.9 * len(metric_names) + 1.4),
      sharex=True, sharey="row", squeeze=False, layout="constrained")
  for row, metric in enumerate(metric_names):
    axis_label, scale = LEARNING_CURVE_METRICS[metric]
    for column, split in enumerate(splits):
      axis = axes[row, column]
      drawn = False
      for label in labels:
        curve = summary[(summary["label"] == label)
                        & (summary["split"] == split)
                        & np.isfinite(summary[f"{metric}_mean"])]
        if curve.empty:
          continue
        curve = curve.sort_values("iteration")
        _mean_std_band(axis, curve["x_mean"].to_numpy(),
                       scale * curve[f"{metric}_mean"].to_numpy(),
                       scale * curve[f"{metric}_std"].to_numpy(),
                       colours[label], linewidth=1.5, marker="o",
                       markersize=2.5, label=label)
        drawn = True
      axis.grid(alpha=0.3)
      if not drawn:
        # Only a note: hiding this panel's ticks would hide the whole row's
        # and column's (the axes are shared, labelled on the outer panels).
        axis.text(0.5, 0.5, f"{metric} not logged on {split}",
                  transform=axis.transAxes, ha="center", va="center",
                  fontsize=10, color="0.35")
      if row == 0:
        axis.set_title(SPLIT_TITLES[split], fontsize=11)
      if row == len(metric_names) - 1:
        axis.set_xlabel("Epoch" if x_column == "epoch"
                        else "Training iteration")
      if column == 0:
        axis.set_ylabel(axis_label)
    if metric == "loss":
      axes[row, 0].set_ylim(bottom=0)
  if x_column == "iteration":
    axes[-1, 0].xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda x, _: f"{x:,.0f}"))
  # Settings that differ in many fields get long labels: wrap them to the
  # figure's width rather than let the legend run off the page.
  width = int(26 * len(splits) + 20)
  handles = [mlines.Line2D([], [], color=colours[label], linewidth=2.5,
                           label=textwrap.fill(label, width)) for label in labels]
  longest = max(min(len(label), width) for label in labels)
  columns = 4 if longest <= 25 else 2 if longest <= 50 else 1
  figure.legend(handles=handles, loc="outside lower center",
                ncol=min(columns, len(labels)), frameon=False, fontsize=9.5)
  figure.suptitle(f"{heading}\nLearning curves (mean ± 1 std over trials)",
                  fontsize=12)
  return figure
