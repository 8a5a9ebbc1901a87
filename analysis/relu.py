"""ReLU reduction (`--experiment=relu_prune`): accuracy against the ReLUs left.

Private-inference papers report a network by its ReLU count (each ReLU is a
garbled circuit), so a ReLU-reduction run becomes one point per trial: the
ReLU count and the natural and adversarial test accuracy at the final
evaluation of its last level (fine-tuning, or the mask phase when
`--epochs=0`). Runs of one data set and model are drawn as one line per
variant (the hyper-parameters that differ, the target excluded), on a log x
axis, beside AutoReP's published CIFAR-10 points (spec 3.4) where the model is
theirs. The Pareto front lists the points no other point beats with as few
or fewer ReLUs.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from robust_sparse.analysis import load  # noqa: E402

EXPERIMENT = "relu_prune"
# Fields that place a run along its variant's line rather than naming the variant.
TARGET_KEYS = ("relu_sparsity", "relu_count")

# AutoReP's published CIFAR-10 numbers (spec 3.4): {model: [(label, [(relus, acc %)])]}.
# Their "resnet18" is the toolkit's resnet18_maxpool, their "ResNet18" its resnet18.
# Left out: the poly / autopoly rows of e37c8bb (artefacts of its in-place relu bug).
REFERENCES: Dict[str, List[Tuple[str, List[Tuple[int, float]]]]] = {
    "resnet18_maxpool": [
        ("AutoReP baseline", [(188416, 93.84)]),
        ("AutoReP spgrad + fine-tune", [(91709, 92.73), (18593, 89.40), (9367, 88.29)]),
        ("AutoReP spgrad relay 0.003 + fine-tune",
         [(94157, 92.70), (18830, 89.70), (9416, 88.70)]),
        ("AutoReP trainable w2x²+w1x+w0 (af8dc5a)",
         [(1800, 90.81), (12900, 91.93), (24900, 92.36), (51200, 92.94)]),
        ("AutoReP trainable w1x+w0 (af8dc5a)",
         [(1800, 87.49), (12900, 91.58), (24900, 92.54), (51200, 92.86)]),
    ],
    "resnet18": [
        ("AutoReP baseline", [(557056, 95.75)]),
        ("AutoReP spgrad + fine-tune (stale)",
         [(266622, 94.38), (196828, 93.94), (100050, 91.57), (49791, 88.85),
          (29166, 86.47), (19887, 84.78)]),
    ],
}
_REFERENCE_MARKERS = "sPD^vX"


def points(study: load.Study) -> pd.DataFrame:
  """One row per finished relu_prune trial: its ReLU count and final accuracies.

  Columns: dataset, model, run_dir, variant, target (the target density),
  trial, prune_iteration (the last finished level), relu_count,
  relu_density, acc, adv_acc (test set, fractions).
  """
  runs = study.runs[study.runs["experiment"] == EXPERIMENT]
  columns = ["dataset", "model", "run_dir", "variant", "target", "trial", "prune_iteration",
             "relu_count", "relu_density", "acc", "adv_acc"]
  if runs.empty or "relu_count" not in study.evaluations:
    return pd.DataFrame(columns=columns)
  rows = []
  evaluations = study.evaluations[study.evaluations["run_dir"].isin(runs["run_dir"])]
  for (dataset, model), group in runs.groupby(["dataset", "model"], sort=True):
    configs = [study.configs[run_dir] for run_dir in group["run_dir"]]
    keys = [k for k in load.differing_keys(configs, exclude=("dataset", "model"))
            if k not in TARGET_KEYS]
    for (_, run), config in zip(group.iterrows(), configs):
      variant = (load.setting_label(config, keys) if keys
                 else f"{run['relu_replacement']}")
      mine = evaluations[evaluations["run_dir"] == run["run_dir"]]
      for trial, trial_rows in mine.groupby("trial"):
        level = trial_rows["prune_iteration"].max()
        at_level = trial_rows[trial_rows["prune_iteration"] == level]
        last = at_level["iteration"].max()
        final = at_level[at_level["iteration"] == last].set_index("split")
        if "test" not in final.index or "train" not in final.index:
          continue
        rows.append({
            "dataset": dataset, "model": model, "run_dir": run["run_dir"],
            "variant": variant, "target": _target(run), "trial": int(trial),
            "prune_iteration": int(level),
            "relu_count": float(final.loc["train", "relu_count"]),
            "relu_density": float(final.loc["train", "relu_density"]),
            "acc": float(final.loc["test", "acc"]),
            "adv_acc": float(final.loc["test", "adv_acc"])})
  return pd.DataFrame(rows, columns=columns)


def baselines(study: load.Study, frame: pd.DataFrame) -> pd.DataFrame:
  """The `--pretrained_run`s of the points in `frame` found in the study, at full ReLU count.

  Columns: dataset, model, run_dir, relu_count (the model's total), acc, adv_acc
  (final test evaluation, mean over trials).
  """
  columns = ["dataset", "model", "run_dir", "relu_count", "acc", "adv_acc"]
  if frame.empty:
    return pd.DataFrame(columns=columns)
  runs = study.runs.set_index("run_dir")
  known = {os.path.realpath(path): path for path in study.runs["run_dir"]}
  rows = []
  for run_dir, group in frame.groupby("run_dir"):
    source = runs.loc[run_dir].get("pretrained_run")
    baseline = known.get(os.path.realpath(source)) if isinstance(source, str) else None
    if baseline is None:
      continue
    tests = study.evaluations[(study.evaluations["run_dir"] == baseline)
                              & (study.evaluations["split"] == "test")]
    last = tests[tests["iteration"] == tests.groupby("trial")["iteration"].transform("max")]
    total = float((group["relu_count"] / group["relu_density"]).iloc[0])
    rows.append({"dataset": group["dataset"].iloc[0], "model": group["model"].iloc[0],
                 "run_dir": baseline, "relu_count": round(total),
                 "acc": float(last["acc"].mean()), "adv_acc": float(last["adv_acc"].mean())})
  return pd.DataFrame(rows, columns=columns).drop_duplicates("run_dir")


def _target(run) -> str:
  sparsity, count = run.get("relu_sparsity"), run.get("relu_count")
  if sparsity is not None and not pd.isna(sparsity):
    return f"sparsity {sparsity:g}"
  return f"{count:g}K ReLUs"


def pareto_front(frame: pd.DataFrame, value: str = "acc") -> pd.DataFrame:
  """The rows no other row beats: none has as few or fewer ReLUs and a higher `value`.

  Means over trials first (one row per run); sorted by ReLU count.
  """
  if frame.empty:
    return frame
  mean = (frame.groupby(["run_dir", "variant", "target"], as_index=False)
          [["relu_count", "relu_density", "acc", "adv_acc"]].mean()
          .sort_values(["relu_count", value], ascending=[True, False]))
  best = -np.inf
  keep = []
  for index, row in mean.iterrows():
    if row[value] > best:
      keep.append(index)
      best = row[value]
  return mean.loc[keep].reset_index(drop=True)


def plot_accuracy_vs_relu_count(frame: pd.DataFrame, title: str,
                                model: Optional[str] = None,
                                baseline: Optional[pd.DataFrame] = None) -> plt.Figure:
  """Test accuracy and robust accuracy (%) against ReLU count, log x, one line per variant.

  Each variant's points are its runs' trial means, joined in ReLU order, with
  the trials' spread as error bars; the runs' baselines (all ReLUs) are black
  stars; AutoReP's points for `model` are hollow reference markers on the
  accuracy panel.
  """
  figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
  summary = (frame.groupby(["variant", "run_dir"], as_index=False)
             .agg(relu_count=("relu_count", "mean"), acc=("acc", "mean"),
                  acc_std=("acc", "std"), adv_acc=("adv_acc", "mean"),
                  adv_std=("adv_acc", "std")))
  colours = plt.get_cmap("tab10")
  for number, (variant, rows) in enumerate(summary.groupby("variant", sort=True)):
    rows = rows.sort_values("relu_count")
    for axis, value, spread in ((axes[0], "acc", "acc_std"), (axes[1], "adv_acc", "adv_std")):
      axis.errorbar(rows["relu_count"], 100 * rows[value], yerr=100 * rows[spread].fillna(0),
                    marker="o", capsize=3, color=colours(number % 10), label=variant)
  if baseline is not None and not baseline.empty:
    for axis, value in ((axes[0], "acc"), (axes[1], "adv_acc")):
      axis.plot(baseline["relu_count"], 100 * baseline[value], linestyle="none", marker="*",
                markersize=12, color="black", label="baseline (--pretrained_run)")
  for number, (label, values) in enumerate(REFERENCES.get(model, [])):
    counts, accuracies = zip(*values)
    axes[0].plot(counts, accuracies, linestyle="none",
                 marker=_REFERENCE_MARKERS[number % len(_REFERENCE_MARKERS)],
                 markerfacecolor="none", markeredgecolor="0.35", markersize=7, label=label)
  for axis, name in ((axes[0], "test accuracy (%)"), (axes[1], "robust test accuracy (%)")):
    axis.set_xscale("log")
    axis.set_xlabel("ReLUs per image (log scale)")
    axis.set_ylabel(name)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].set_title("natural")
  axes[1].set_title("adversarial (the run's --attack)")
  handles, labels = axes[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
  figure.suptitle(title)
  rows = (len(labels) + 1) // 2
  figure.tight_layout(rect=(0, min(0.45, 0.06 * rows + 0.02), 1, 1))
  return figure


def markdown(front: pd.DataFrame) -> str:
  """The Pareto front as a Markdown table (accuracies in %)."""
  lines = ["| Variant | Target | ReLUs | Density | Test acc (%) | Robust acc (%) |",
           "|---|---|---|---|---|---|"]
  for _, row in front.iterrows():
    lines.append(f"| {row['variant']} | {row['target']} | {row['relu_count']:,.0f} | "
                 f"{row['relu_density']:.4f} | {100 * row['acc']:.2f} | "
                 f"{100 * row['adv_acc']:.2f} |")
  return "\n".join(lines) + "\n"


def sections(study: load.Study, out_dir: str, formats: Sequence[str], save, group_stem,
             tables_dir: str):
  """Writes each (data set, model)'s figure and tables; returns (heading, lines) pairs.

  Args:
    save: `report._save`-like `(figure, out_dir, stem, formats, caption, saved)`.
    group_stem: `report._group_stem`.
    tables_dir: the tables folder name under `out_dir`.
  """
  frame = points(study)
  out = []
  for (dataset, model), group in frame.groupby(["dataset", "model"], sort=True):
    stem = group_stem(dataset, model) + "_relu"
    group.to_csv(os.path.join(out_dir, tables_dir, f"{stem}_points.csv"), index=False,
                 float_format="%.6g")
    front = pareto_front(group)
    front.to_csv(os.path.join(out_dir, tables_dir, f"{stem}_pareto.csv"), index=False,
                 float_format="%.6g")
    saved = []
    caption = (f"{dataset}, {model}: test and robust test accuracy against ReLUs per image "
               "(trial means, error bars: std over trials)"
               + ("; hollow markers: AutoReP's published CIFAR-10 numbers"
                  if model in REFERENCES and dataset == "cifar10" else ""))
    save(plot_accuracy_vs_relu_count(group, f"{dataset} | {model}: ReLU reduction",
                                     model if dataset == "cifar10" else None,
                                     baselines(study, group)),
         out_dir, stem, formats, caption, saved)
    out.append((f"{dataset} / {model}: ReLU reduction", markdown(front), saved,
                [os.path.join(out_dir, tables_dir, f"{stem}_{kind}.csv")
                 for kind in ("points", "pareto")]))
  return out
