"""Figures and a table of the activation measurements (`--measure=activation_sparsity,...`).

The runner writes them into `train.csv` (see `robust_sparse/measure/measurements.py`):
`train-activation_sparsity_<layer>` on training batches and
`eval-activation_sparsity_<layer>` on the test set, per activation layer and
with `<layer>` = `average`, beside `train-effective_gradient_sparsity_<p>_
<layer>` and the other measurements. Only runs that logged
`train-activation_sparsity_average` get these figures; the rest of a study is
untouched. Per data set:

- a table: the final activation sparsity (training batches and test set, the
  layer average), the effective gradient sparsity below 1e-6 (training
  batches) and the test accuracy of each run variant (and prune level), mean
  ± std (n) over trials, in percent;
- a comparison: the average activation sparsity against training iteration,
  one line per run without pruning levels, labelled by the hyper-parameters
  that differ between the measured runs (vanilla vs sparsified model, natural
  vs adversarial training, ...);
- for lottery runs: the final average activation sparsity against weights
  remaining (log scale, sparser to the right), one line per experiment, a
  column per training mode;
- per run: the activation sparsity of every layer against training
  iteration, training batches and test set side by side (for a run with
  pruning levels, the dense level and the sparsest one).

Lines are means over trials; bands are ±1 sample standard deviation (ddof=1).
"""

import os
import re
import textwrap
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from matplotlib import lines as mlines
from matplotlib import pyplot as plt
from matplotlib import ticker
import numpy as np
import pandas as pd

from robust_sparse.analysis import figures
from robust_sparse.analysis import load
from robust_sparse.analysis import metrics
from robust_sparse.analysis import tables

# pylint: disable=protected-access
# The sparsity figures share the accuracy figures' axes, lines and legends.

SPARSITY = "activation_sparsity"
TRAIN_PREFIX = f"train-{SPARSITY}_"
TEST_PREFIX = f"eval-{SPARSITY}_"
AVERAGE = "average"
# The effective gradient sparsity of the table: the fraction of |g * f'(x)|
# below 1e-6 (the runner also logs 1e-9 and 1e-3).
GRADIENT_THRESHOLD = 1e-6
GRADIENT_COLUMN = f"train-effective_gradient_sparsity_{GRADIENT_THRESHOLD:g}_{AVERAGE}"
# (prefix, panel title) of the two panels of the sparsity-vs-iteration figures.
PANELS = ((TRAIN_PREFIX, "training batches"), (TEST_PREFIX, "test set"))
SPARSITY_AXIS_LABEL = "Activation sparsity (%)"
# Table measures: name -> (heading, column of the final train.csv row, or
# "acc" of the final test.csv row). Numbers are in percent.
TABLE_MEASURES = {
    "activation_sparsity_train": ("Act. sparsity, train (%)", TRAIN_PREFIX + AVERAGE),
    "activation_sparsity_test": ("Act. sparsity, test (%)", TEST_PREFIX + AVERAGE),
    "effective_gradient_sparsity": (f"Eff. grad. sparsity < {GRADIENT_THRESHOLD:g} (%)",
                                    GRADIENT_COLUMN),
    "test_acc": ("Test acc. (%)", "acc"),
}
TABLE_KEYS = ("label", "model", "experiment", "attack", "training_mode", "prune_iteration")

# label_runs(study, run_dirs, exclude) -> ({run_dir: label}, fields named):
# `report.training_labels`, passed in as the report imports this module.
LabelRuns = Callable[..., Tuple[Dict[str, str], List[str]]]


def sparsity_layers(columns: Sequence[str]) -> List[str]:
  """Layer names of the `train-activation_sparsity_<layer>` columns, `average` left out."""
  return [c[len(TRAIN_PREFIX):] for c in columns
          if c.startswith(TRAIN_PREFIX) and c != TRAIN_PREFIX + AVERAGE]


def _natural_key(text: str):
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def layer_order(run_dir: str, layers: Sequence[str]) -> List[str]:
  """`layers` in the model's call order: the column order of the run's first `train.csv`.

  The study's columns are sorted by name (`block_10` before `block_2`); a layer
  the header does not name goes last, in natural order.
  """
  header: List[str] = []
  for trial in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
    path = os.path.join(run_dir, trial, "prune_iter_0", "train.csv")
    if trial.startswith("trial_") and os.path.exists(path):
      with open(path) as f:
        header = [name.strip() for name in f.readline().split(",")]
      break
  position = {name[len(TRAIN_PREFIX):]: i for i, name in enumerate(header)
              if name.startswith(TRAIN_PREFIX)}
  return sorted(layers, key=lambda layer: (position.get(layer, len(position)),
                                           _natural_key(layer)))


def measured_rows(evaluations: pd.DataFrame) -> pd.DataFrame:
  """The `train` rows that carry an activation sparsity (every run's other rows left out)."""
  column = TRAIN_PREFIX + AVERAGE
  if column not in evaluations.columns:
    return evaluations.iloc[:0]
  rows = evaluations[evaluations["split"] == "train"]
  return rows[np.isfinite(rows[column].to_numpy(float))]


def _iteration_axis(axis):
  axis.set_xlabel("Training iteration")
  axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
  axis.grid(alpha=0.3)


def _band_values(summary: pd.DataFrame, scale: float = 1.0) -> np.ndarray:
  """Every mean ± std of a `metrics.summarize` frame: what the bands span."""
  values = []
  for mean in [c for c in summary.columns if c.endswith("_mean")]:
    centre = summary[mean].to_numpy(float)
    spread = np.nan_to_num(summary[mean[:-len("_mean")] + "_std"].to_numpy(float))
    values += [centre - spread, centre + spread]
  return scale * np.concatenate(values) if values else np.zeros(0)


def _sparsity_limits(axes, values: np.ndarray):
  """One y range for shared panels: the bands with a margin, within 0-100 %."""
  values = values[np.isfinite(values)]
  if values.size == 0:
    return
  low, high = float(values.min()), float(values.max())
  margin = max(0.08 * (high - low), 1.0)
  axes.flat[0].set_ylim(max(0.0, low - margin), min(100.0, high + margin))


def _legend_columns(count: int, per_column: int = 14) -> int:
  return max(1, -(-count // per_column))


def plot_layer_sparsity(rows: pd.DataFrame, layers: Sequence[str], heading: str
                       ) -> Optional[plt.Figure]:
  """Activation sparsity of every layer against training iteration.

  Args:
    rows: measured `train` rows (`measured_rows`) of one run, every trial, of
      the prune iterations to draw (one row of panels each, in order).
    layers: the layers to draw, in call order (`layer_order`); the layer
      average is drawn as well, dashed black.
    heading: first line(s) of the title (the run).

  Returns:
    A figure with a row per prune iteration and two columns: training batches,
    test set. None when `rows` is empty.
  """
  if rows.empty:
    return None
  prune_iterations = sorted(rows["prune_iteration"].unique())
  names = list(layers) + [AVERAGE]
  columns = [prefix + name for prefix, _ in PANELS for name in names
             if prefix + name in rows.columns]
  curves = metrics.summarize(rows.assign(**{c: 100 * rows[c] for c in columns}),
                             ["prune_iteration", "iteration"], columns)
  colours = dict(zip(layers, plt.get_cmap("viridis")(
      np.linspace(0.0, 0.9, max(len(layers), 1)))))
  colours[AVERAGE] = "black"
  figure, axes = plt.subplots(
      len(prune_iterations), 2, figsize=(12.5, 3.9 * len(prune_iterations) + 1.2),
      sharex=True, sharey=True, squeeze=False, layout="constrained")
  for row, prune_iteration in enumerate(prune_iterations):
    level = curves[curves["prune_iteration"] == prune_iteration].sort_values("iteration")
    percent = level["percent_weights_remaining"].mean()
    for column, (prefix, panel) in enumerate(PANELS):
      axis = axes[row, column]
      drawn = False
      for name in names:
        mean = f"{prefix}{name}_mean"
        if mean not in level.columns or not np.isfinite(level[mean]).any():
          continue
        curve = level[np.isfinite(level[mean])]
        average = name == AVERAGE
        figures._mean_std_band(
            axis, curve["iteration"].to_numpy(), curve[mean].to_numpy(),
            curve[f"{prefix}{name}_std"].to_numpy(), colours[name],
            linewidth=2.2 if average else 1.4, linestyle="--" if average else "-",
            marker=None if average else "o", markersize=2.5, zorder=3 if average else 2)
        drawn = True
      if not drawn:
        axis.text(0.5, 0.5, f"not measured on the {panel}", transform=axis.transAxes,
                  ha="center", va="center", fontsize=10, color="0.35")
      title = panel
      if len(prune_iterations) > 1 or percent < 100:
        title += f", {metrics.level_label(percent)}% weights remaining"
      axis.set_title(title, fontsize=11)
      _iteration_axis(axis)
      if row < len(prune_iterations) - 1:
        axis.set_xlabel("")
      if column == 0:
        axis.set_ylabel(SPARSITY_AXIS_LABEL)
  _sparsity_limits(axes, _band_values(curves))
  handles = [mlines.Line2D([], [], color=colours[name], linewidth=2.2,
                           label=name) for name in layers]
  handles.append(mlines.Line2D([], [], color="black", linewidth=2.2, linestyle="--",
                               label="average over layers"))
  figure.legend(handles=handles, loc="outside right center", frameon=False,
                fontsize=8.5 if len(handles) <= 14 else 7,
                ncol=_legend_columns(len(handles)), title="layer", title_fontsize=9)
  figure.suptitle(f"{heading}\nActivation sparsity per layer (mean ± 1 std over trials)",
                  fontsize=12)
  return figure


def plot_sparsity_comparison(rows: pd.DataFrame, labels: Sequence[str], heading: str
                            ) -> Optional[plt.Figure]:
  """The layer-average activation sparsity against training iteration, a line per label.

  Args:
    rows: measured `train` rows with a `label` column (runs sharing a label
      have equal hyper-parameters; their trials are pooled).
    labels: the labels to draw, in legend order.
    heading: first line of the title.

  Returns:
    A 1x2 figure (training batches, test set), or None when `rows` holds none
    of `labels`.
  """
  rows = rows[rows["label"].isin(labels)]
  if rows.empty:
    return None
  labels = [label for label in labels if label in set(rows["label"])]
  columns = [prefix + AVERAGE for prefix, _ in PANELS if prefix + AVERAGE in rows.columns]
  curves = metrics.summarize(rows.assign(**{c: 100 * rows[c] for c in columns}),
                             ["label", "iteration"], columns)
  palette = plt.cm.tab10(np.arange(10)) if len(labels) <= 10 else plt.cm.tab20(np.arange(20))
  colours = {label: tuple(palette[i % len(palette)]) for i, label in enumerate(labels)}
  width = 110
  longest = max(min(len(label), width) for label in labels)
  ncol = min(3 if longest <= 30 else 2 if longest <= 45 else 1, len(labels))
  wrapped = [textwrap.fill(label, width) for label in labels]
  legend_lines = -(-sum(w.count("\n") + 1 for w in wrapped) // ncol)
  # The axes keep their height however long the legend below them is.
  figure, axes = plt.subplots(1, 2, figsize=(12.5, 4.0 + 0.2 * legend_lines), sharex=True,
                              sharey=True, squeeze=False, layout="constrained")
  for axis, (prefix, panel) in zip(axes[0], PANELS):
    mean = f"{prefix}{AVERAGE}_mean"
    for label in labels:
      if mean not in curves.columns:
        break
      curve = curves[(curves["label"] == label) & np.isfinite(curves[mean])]
      curve = curve.sort_values("iteration")
      if curve.empty:
        continue
      figures._mean_std_band(axis, curve["iteration"].to_numpy(), curve[mean].to_numpy(),
                             curve[f"{prefix}{AVERAGE}_std"].to_numpy(), colours[label],
                             linewidth=1.6, marker="o", markersize=3)
    axis.set_title(panel, fontsize=11)
    _iteration_axis(axis)
  axes[0, 0].set_ylabel(f"{SPARSITY_AXIS_LABEL},\naverage over layers")
  _sparsity_limits(axes, _band_values(curves))
  handles = [mlines.Line2D([], [], color=colours[label], linewidth=2.5, label=text)
             for label, text in zip(labels, wrapped)]
  figure.legend(handles=handles, loc="outside lower center", frameon=False,
                fontsize=9, ncol=ncol)
  figure.suptitle(f"{heading}\nActivation sparsity during training, average over layers "
                  "(mean ± 1 std over trials)", fontsize=12)
  return figure


def plot_sparsity_vs_weights(final: pd.DataFrame, heading: str) -> Optional[plt.Figure]:
  """The final layer-average activation sparsity against weights remaining.

  Args:
    final: the last measured `train` row of every network (run, trial, prune
      iteration) of one data set, model, setting and attack.
    heading: first line(s) of the title.

  Returns:
    A figure with rows training batches, test set and a column per training
    mode present; one line per experiment. None when `final` is empty.
  """
  if final.empty:
    return None
  values = {"train_sparsity": TRAIN_PREFIX + AVERAGE, "test_sparsity": TEST_PREFIX + AVERAGE}
  values = {name: column for name, column in values.items() if column in final.columns}
  summary = figures._ordered(metrics.summarize(
      final.assign(**{name: final[column] for name, column in values.items()}),
      ["training_mode", "experiment", "prune_iteration"], list(values)))
  modes = [mode for mode in figures.TRAINING_MODES if mode in set(summary["training_mode"])]
  levels = summary["percent_weights_remaining"].tolist()
  figure, axes = plt.subplots(len(values), len(modes), figsize=(6.3 * len(modes) + 0.5, 7.6),
                              sharex=True, sharey="row", squeeze=False, layout="constrained")
  for column, mode in enumerate(modes):
    rows = summary[summary["training_mode"] == mode]
    for row, (name, (_, panel)) in enumerate(zip(values, PANELS)):
      axis = axes[row, column]
      figures._percent_axis(axis, levels)
      figures._series_lines(axis, rows, name, 100.0)
      axis.set_title(f"{mode} training, {panel}", fontsize=11)
      if row < len(values) - 1:
        axis.set_xlabel("")
  for row, name in enumerate(values):
    axes[row, 0].set_ylabel(f"{SPARSITY_AXIS_LABEL}\nat end of training")
    _sparsity_limits(axes[row:row + 1], _band_values(
        summary[[f"{name}_mean", f"{name}_std"]], 100.0))
  figures._shared_legend(figure, axes)
  figure.suptitle(f"{heading}\nActivation sparsity (average over layers) at the end of "
                  "training vs weights remaining (mean ± 1 std over trials)", fontsize=12)
  return figure


def final_rows(measured: pd.DataFrame, evaluations: pd.DataFrame) -> pd.DataFrame:
  """The last measured `train` row of every network, with its final test accuracy.

  Args:
    measured: `measured_rows`.
    evaluations: the study's evaluations (for the test accuracy).

  Returns:
    One row per (run, trial, prune iteration): the columns of `measured`, and
    `acc` replaced by the last test evaluation's accuracy.
  """
  final = metrics.final_evaluations(measured, "train")
  test = metrics.final_evaluations(
      evaluations[evaluations["run_dir"].isin(set(final["run_dir"]))], "test")
  test = test.loc[:, list(metrics.NETWORK_KEYS) + ["acc"]]
  return final.drop(columns="acc").merge(test, on=list(metrics.NETWORK_KEYS), how="left")


def sparsity_table(final: pd.DataFrame) -> pd.DataFrame:
  """Numbers of the table: per run variant and prune iteration, in percent.

  Args:
    final: `final_rows` with a `label` column.

  Returns:
    One row per (label, model, experiment, attack, training mode, prune
    iteration) with `percent_weights_remaining`, `trials`, the final
    `iteration` and `<measure>_mean`, `<measure>_std` (ddof=1), `<measure>_n`
    for each of `TABLE_MEASURES`.
  """
  # A measurement the runs did not log (no gradient measurement) reads NaN.
  scaled = final.assign(**{
      name: 100 * (final[column] if column in final.columns else np.nan)
      for name, (_, column) in TABLE_MEASURES.items()})
  table = metrics.summarize(scaled, list(TABLE_KEYS), list(TABLE_MEASURES))
  grouped = scaled.groupby(list(TABLE_KEYS), sort=True)
  table["trials"] = grouped["trial"].nunique().to_numpy()
  table["iteration"] = grouped["iteration"].max().to_numpy()
  order = ["label", "model", "experiment", "attack", "training_mode", "prune_iteration",
           "percent_weights_remaining", "trials", "iteration"]
  table = table.loc[:, order + [c for c in table.columns if c not in order]]
  order = {e: i for i, e in enumerate(metrics.EXPERIMENT_ORDER)}
  return table.sort_values(
      ["label", "experiment", "attack", "training_mode", "prune_iteration"],
      key=lambda c: c.map(order).fillna(len(order)) if c.name == "experiment" else c,
      kind="stable").reset_index(drop=True)


def sparsity_table_cells(table: pd.DataFrame) -> pd.DataFrame:
  """Formats `sparsity_table` as text cells `mean ± std (n)`."""
  shown = pd.DataFrame({"Variant": table["label"].replace("", tables.MISSING),
                        "Model": table["model"], "Experiment": table["experiment"],
                        "Attack": table["attack"].str.upper(),
                        "Training": table["training_mode"]})
  if table["prune_iteration"].nunique() > 1 or (table["percent_weights_remaining"] < 100).any():
    shown["Weights (%)"] = table["percent_weights_remaining"].map(metrics.level_label)
  shown["Final iteration"] = table["iteration"].map(lambda v: f"{int(v):,}")
  for name, (heading, _) in TABLE_MEASURES.items():
    shown[heading] = [tables.format_cell(mean, std, n) for mean, std, n in zip(
        table[f"{name}_mean"], table[f"{name}_std"], table[f"{name}_n"])]
  for name in ("Model", "Experiment", "Attack", "Training"):
    if shown[name].nunique() == 1:  # A constant column: the section names it once.
      shown = shown.drop(columns=name)
  return shown


def _run_heading(run: pd.Series, label: str) -> str:
  parts = [run["dataset"], run["model"], figures.experiment_label(run["experiment"]),
           f"attack: {str(run['attack']).upper()}", f"{load.training_mode(run['adv_train'])} "
           "training"]
  return " | ".join(parts) + (f"\n[{label}]" if label else "")


def sections(study: load.Study, out_dir: str, formats: Sequence[str], save, group_stem,
             tables_dir: str, label_runs: LabelRuns) -> List[tuple]:
  """Draws the figures and writes the table of every measured data set.

  Args:
    study: the loaded study.
    out_dir: the analysis folder.
    formats: figure formats.
    save: `report._save(figure, out_dir, stem, formats, caption, saved)`.
    group_stem: `report._group_stem(*parts)`, a file-name stem.
    tables_dir: the tables' folder under `out_dir`.
    label_runs: `report.training_labels`.

  Returns:
    (heading, Markdown of the table with its links, figures) per data set with
    a measured run; empty when no run measured the activation sparsity.
  """
  evaluations = study.evaluations
  measured = measured_rows(evaluations)
  if measured.empty:
    return []
  runs = study.runs.set_index("run_dir")
  layers = sparsity_layers(evaluations.columns)
  out = []
  for dataset in sorted(measured["dataset"].unique()):
    rows = measured[measured["dataset"] == dataset]
    run_dirs = sorted(rows["run_dir"].unique())
    # Runs without pruning levels are compared with each other (one line
    # each), so they are labelled by what differs between them; runs with
    # levels keep their lottery setting (experiment and training mode are
    # lines, columns and table columns of their own).
    single_dirs = [d for d in run_dirs if runs.at[d, "expected_levels"] == 1]
    label_of, keys = label_runs(study, single_dirs, exclude=("dataset",)) if (
        single_dirs) else ({}, [])
    label_of.update({d: runs.at[d, "setting"] for d in run_dirs if d not in label_of})
    rows = rows.assign(label=rows["run_dir"].map(label_of))
    saved = []
    final = final_rows(rows, evaluations)

    table = sparsity_table(final)
    stem = os.path.join(out_dir, tables_dir, group_stem(dataset, "activation_sparsity_table"))
    table.to_csv(stem + ".csv", index=False, float_format="%.6g")
    table_markdown = tables.to_markdown(sparsity_table_cells(table), index=False)
    with open(stem + ".md", "w") as f:
      f.write(table_markdown)
    named = ", ".join(f"`{key}`" for key in keys) or "their experiment"
    links = "".join(f" [{p.rsplit('.', 1)[-1]}]({os.path.relpath(p, out_dir)})"
                    for p in (stem + ".csv", stem + ".md"))
    text = (f"Runs measured with `--measure=activation_sparsity`: those without pruning "
            f"levels are labelled by {named}, those with levels by their setting. "
            "Final evaluation of each trial (the last `train.csv` row; test accuracy from "
            "the last `test.csv` row); activation sparsity is the layer average of the "
            "fraction of activation outputs in the zero region, on training batches and on "
            f"the test set; effective gradient sparsity is the fraction of |g·f'(x)| below "
            f"{GRADIENT_THRESHOLD:g} on training batches. Cells: mean ± std (n) over "
            f"trials, in percent.{links}\n\n{table_markdown}")

    single = rows[rows["run_dir"].isin(single_dirs)]
    labels = sorted(set(single["label"]))
    chunks = [labels[i:i + figures.SETTINGS_PER_FIGURE]
              for i in range(0, len(labels), figures.SETTINGS_PER_FIGURE)]
    for part, chunk in enumerate(chunks, start=1):
      suffix = f"_part{part}" if len(chunks) > 1 else ""
      models = " / ".join(sorted(single["model"].unique()))
      save(plot_sparsity_comparison(single, chunk, f"{dataset} | {models}"), out_dir,
           group_stem(dataset, "activation_sparsity_comparison") + suffix, formats,
           f"{dataset}: average activation sparsity during training, one colour per run "
           "without pruning levels" + (f" (part {part} of {len(chunks)})" if suffix else ""),
           saved)

    pruned = final[~final["run_dir"].isin(single_dirs)]
    # A lottery figure covers its (model, setting, attack), no_pruning baselines included.
    cells = set(pruned[["model", "setting", "attack"]].itertuples(index=False, name=None))
    for model, setting, attack in sorted(cells):
      cell = final[(final["model"] == model) & (final["setting"] == setting)
                   & (final["attack"] == attack)]
      heading = f"{dataset} | {model} | attack: {attack.upper()}" + (
          f"\n[{setting}]" if setting else "")
      save(plot_sparsity_vs_weights(cell, heading), out_dir,
           group_stem(dataset, model, attack, setting) + "_activation_sparsity_vs_weights",
           formats, f"{dataset} / {model} / {attack.upper()}"
           + (f" [{setting}]" if setting else "")
           + ": final activation sparsity vs weights remaining, one line per experiment",
           saved)

    for run_dir in run_dirs:
      run = runs.loc[run_dir]
      mine = rows[rows["run_dir"] == run_dir]
      run_layers = layer_order(run_dir, [layer for layer in layers
                                         if np.isfinite(mine[TRAIN_PREFIX + layer]).any()])
      levels = sorted(mine["prune_iteration"].unique())
      drawn = mine[mine["prune_iteration"].isin({levels[0], levels[-1]})]
      label = label_of[run_dir]
      mode = load.training_mode(run["adv_train"])
      stem = group_stem(dataset, run["model"], run["experiment"], run["attack"], mode,
                        run["run_hash"])
      save(plot_layer_sparsity(drawn, run_layers, _run_heading(run, label)), out_dir,
           stem + "_activation_sparsity_layers", formats,
           f"{run['model']}, {run['experiment']}, {mode} training"
           + (f" [{label}]" if label else "") + ": activation sparsity of each layer during "
           "training" + (" (dense level and sparsest level)" if len(levels) > 1 else ""),
           saved)
    models = ", ".join(sorted(rows["model"].unique()))
    out.append((f"{dataset} / {models}: activation sparsity", text, saved))
  return out
