"""Per-layer figures of phd-lab's measurements: saturation, probe accuracy, receptive field.

Two figures per run measured with `--measure=saturation`:

- saturation against epoch, one line per layer (colour from the first layer
  to the last), training batches and test set side by side;
- the paper's per-layer profile (spec 5, Figure 1): x = the conv and dense
  layers in call order; the saturation of the final evaluation period and, when
  a `--experiment=probes` run of it exists under the base folder, each
  layer's probe test accuracy, both on 0-1; the run's final test accuracy as a
  dashed line; the receptive field of each conv layer on a twin axis
  (computed from the model at the data set's image size).
"""

import glob
import json
import os
from typing import Dict, List, Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from robust_sparse.analysis import load  # noqa: E402

TRAIN = "train-saturation_"
EVAL = "eval-saturation_"


def saturation_layers(evaluations: pd.DataFrame) -> List[str]:
  """Layer names of the `train-saturation_<layer>` columns, in column (call) order."""
  return [c[len(TRAIN):] for c in evaluations.columns if c.startswith(TRAIN)]


def probe_tables(base_dir: str, pattern: str = "[0-9]*x[0-9]*_probe_performances.csv"
                 ) -> Dict[str, pd.DataFrame]:
  """{probed run folder (real path): probe table} under `base_dir`.

  From `--experiment=probes` runs (their `--pretrained_run`) and runs trained
  with `--probes` (their own folder).

  The table is the 4x4 probes' CSV (the smallest pool when 4 is absent):
  layer, train_acc, eval_acc.
  """
  tables = {}
  for run_dir in load.find_run_dirs(base_dir):
    try:
      with open(os.path.join(run_dir, load.HPARAMS_FILE)) as f:
        hparams = json.load(f)
    except (OSError, ValueError):
      continue
    source = (hparams.get("pretrained_run") if hparams.get("experiment") == "probes"
              else run_dir if hparams.get("probes") else None)
    if not source:
      continue
    paths = sorted(glob.glob(os.path.join(run_dir, pattern)))
    if not paths:
      continue
    preferred = [p for p in paths if os.path.basename(p).startswith("4x4_")]
    table = pd.read_csv((preferred or paths)[0], sep=";", index_col=0)
    table["layer"] = table["name"].str.replace(r"^train-", "", regex=True)
    tables[os.path.realpath(source)] = table
  return tables


def plot_saturation_vs_epoch(rows: pd.DataFrame, layers: List[str], title: str) -> plt.Figure:
  """Saturation of each layer per evaluation period: training batches | test set."""
  figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
  colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(layers), 1)))
  rows = rows.sort_values("epoch")
  for axis, prefix, name in ((axes[0], TRAIN, "training batches"), (axes[1], EVAL, "test set")):
    for colour, layer in zip(colours, layers):
      axis.plot(rows["epoch"], rows[prefix + layer], color=colour, marker="o", markersize=3,
                label=layer)
    axis.set_title(name)
    axis.set_xlabel("epoch")
    axis.set_ylim(0, 1.02)
    axis.grid(True, alpha=0.3)
  axes[0].set_ylabel("saturation (intrinsic dimensionality / width)")
  if len(layers) <= 20:
    axes[1].legend(fontsize=7, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
  figure.suptitle(title)
  figure.tight_layout()
  return figure


def plot_pixelwise_probes(table: pd.DataFrame, title: str) -> Optional[plt.Figure]:
  """Heat maps of the pixel-wise probes' test accuracy, one panel per conv layer."""
  parsed = table["name"].str.extract(r"^train-(?P<layer>.+)-\((?P<i>\d+),(?P<j>\d+)\)$")
  frame = pd.concat([parsed, table["eval_acc"]], axis=1).dropna()
  if frame.empty:
    return None
  frame[["i", "j"]] = frame[["i", "j"]].astype(int)
  names = list(dict.fromkeys(frame["layer"]))
  columns = min(4, len(names))
  rows = -(-len(names) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.0 * rows),
                              squeeze=False)
  for axis, name in zip(axes.flat, names):
    mine = frame[frame["layer"] == name]
    grid = np.full((mine["i"].max() + 1, mine["j"].max() + 1), np.nan)
    grid[mine["i"], mine["j"]] = mine["eval_acc"]
    image = axis.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    axis.set_title(name, fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])
  for axis in list(axes.flat)[len(names):]:
    axis.axis("off")
  figure.colorbar(image, ax=axes, shrink=0.8, label="probe test accuracy")
  figure.suptitle(title)
  return figure


def plot_layer_profile(layers: List[str], saturation: List[float], test_acc: float,
                       probe: Optional[pd.DataFrame], receptive: Dict[str, float],
                       title: str) -> plt.Figure:
  """The paper's per-layer figure (see the module docstring)."""
  figure, axis = plt.subplots(figsize=(max(6.0, 0.45 * len(layers) + 2), 5.6))
  x = np.arange(len(layers))
  axis.plot(x, saturation, marker="o", color="tab:blue", label="saturation (train)")
  if probe is not None:
    accuracy = probe.set_index("layer")["eval_acc"]
    axis.plot(x, [accuracy.get(layer, np.nan) for layer in layers], marker="s",
              color="tab:green", label="probe test accuracy")
  axis.axhline(test_acc, linestyle="--", color="black", label=f"model test accuracy "
               f"({100 * test_acc:.1f} %)")
  axis.set_ylim(0, 1.02)
  axis.set_ylabel("saturation / accuracy")
  axis.set_xticks(x)
  axis.set_xticklabels(layers, rotation=60, ha="right", fontsize=8)
  twin = axis.twinx()
  twin.plot(x, [receptive.get(layer, np.nan) for layer in layers], marker="^",
            linestyle=":", color="tab:red", label="receptive field (px)")
  twin.set_ylabel("receptive field (px)", color="tab:red")
  handles, labels = axis.get_legend_handles_labels()
  more_handles, more_labels = twin.get_legend_handles_labels()
  # Below the axes: inside, "best" sees only the left axis and can cover the twin's line.
  axis.legend(handles + more_handles, labels + more_labels, fontsize=8, frameon=False,
              loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2)
  axis.grid(True, alpha=0.3)
  axis.set_title(title)
  figure.tight_layout()
  return figure


def _receptive_fields(config: dict, input_shape) -> Dict[str, float]:
  # Heavy: TensorFlow, which reading runs never needs.
  from robust_sparse.models import build_model  # pylint: disable=import-outside-toplevel
  from robust_sparse.measure import receptive_field  # pylint: disable=import-outside-toplevel
  try:
    model = build_model(config["model"], input_shape, 10,
                        normalize=config.get("normalize", "none"))
    return {row.layer: float(row.receptive_field)
            for row in receptive_field.receptive_fields(model)}
  except Exception:  # pylint: disable=broad-except
    return {}  # A model the recursion cannot follow: the figure leaves the axis empty.


def sections(study: load.Study, base_dir: str, out_dir: str, formats, save, group_stem):
  """Draws both figures for every run with saturation columns; returns (heading, figures)."""
  evaluations = study.evaluations
  layers = saturation_layers(evaluations)
  if not layers:
    return []
  probes = probe_tables(base_dir)
  pixelwise = probe_tables(base_dir, "pixelwise_probe_performances.csv")
  out = []
  measured = evaluations[evaluations["split"] == "train"].dropna(subset=[TRAIN + layers[0]])
  for run_dir, rows in measured.groupby("run_dir", sort=True):
    run = study.runs.set_index("run_dir").loc[run_dir]
    mine = [layer for layer in layers if not rows[TRAIN + layer].isna().all()]
    rows = rows[(rows["trial"] == 0) & (rows["prune_iteration"] == rows["prune_iteration"].max())]
    label = f"{run['dataset']} | {run['model']}" + (f" [{run['setting']}]" if run["setting"]
                                                  else "")
    stem = group_stem(run["dataset"], run["model"], run["setting"] or "") + "_saturation"
    saved = []
    save(plot_saturation_vs_epoch(rows, mine, f"{label}: saturation per layer"), out_dir,
         stem, formats, f"{label}: saturation of each layer per evaluation period", saved)
    tests = evaluations[(evaluations["run_dir"] == run_dir) & (evaluations["split"] == "test")
                        & (evaluations["trial"] == 0)]
    test_acc = float(tests.loc[tests["iteration"].idxmax(), "acc"])
    last = rows.loc[rows["iteration"].idxmax()]
    resolution = run.get("resolution")
    size = int(resolution) if resolution and not pd.isna(resolution) else 32
    receptive = _receptive_fields(dict(run), (size, size, 3))
    probe = probes.get(os.path.realpath(run_dir))
    save(plot_layer_profile(mine, [float(last[TRAIN + layer]) for layer in mine], test_acc,
                            probe, receptive, f"{label}: per layer"),
         out_dir, stem.replace("_saturation", "_layers"), formats,
         f"{label}: final saturation, probe test accuracy"
         + ("" if probe is not None else " (no probes run found)")
         + " and receptive field per layer; dashed: the model's test accuracy", saved)
    if os.path.realpath(run_dir) in pixelwise:
      heat = plot_pixelwise_probes(pixelwise[os.path.realpath(run_dir)],
                                   f"{label}: pixel-wise probes")
      if heat is not None:
        save(heat, out_dir, stem.replace("_saturation", "_pixelwise_probes"), formats,
             f"{label}: test accuracy of one probe per position of each conv map", saved)
    out.append((f"{run['dataset']} / {run['model']}: layer saturation", saved))
  return out
