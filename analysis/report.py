"""Writes every figure and table of a study, and `report.md` that shows them all.

Layout of `out_dir`:
  report.md                      open this one file to see the whole study
  figures/<dataset>_<model>_<attack>[_<setting>]_<figure>.<format>
  tables/<dataset>_<model>[_<setting>]_accuracy_table.{csv,md,tex}
  tables/best_sparsity.{csv,md}
  tables/summary_by_level.csv    every level of every series, in numbers
"""

import dataclasses
import os
from typing import List, Optional, Sequence

import pandas as pd

from analysis import figures
from analysis import load
from analysis import metrics
from analysis import tables

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
IMAGE_FORMATS = ("png", "svg", "jpg", "jpeg")


@dataclasses.dataclass
class Figure:
  """One saved figure: its paths (one per format) and a caption."""
  paths: List[str]
  caption: str


@dataclasses.dataclass
class Section:
  """The figures and tables of one (data set, model, setting)."""
  heading: str
  table_markdown: str
  table_paths: List[str]
  figures_by_attack: dict  # attack -> list of Figure


def _group_stem(*parts: str) -> str:
  return "_".join(figures.slug(p) for p in parts if p)


def _save(figure, out_dir, stem, formats, caption, saved: List[Figure]):
  if figure is None:
    return
  saved.append(Figure(figures.save(figure, os.path.join(
      out_dir, FIGURES_DIR), stem, formats), caption))


def _attack_figures(evaluations: pd.DataFrame, final: pd.DataFrame,
                    early: pd.DataFrame, out_dir: str, stem: str,
                    formats: Sequence[str]) -> List[Figure]:
  """Draws every figure of one data set, model, setting and attack."""
  saved: List[Figure] = []
  test_rows = evaluations[evaluations["split"] == "test"]
  for mode in figures.TRAINING_MODES:
    rows = test_rows[test_rows["training_mode"] == mode]
    if rows.empty:
      continue
    for metric, label in figures.CURVE_METRICS.items():
      caption = (f"{label.split(' (')[0]} during training, {mode} training "
                 "(left: ticket; middle: vs random reinit; right: vs "
                 "continued training)")
      _save(figures.plot_training_curves(rows, metric), out_dir,
            f"{stem}_{mode}_test_{metric}", formats, caption, saved)
  _save(figures.plot_accuracy_vs_sparsity(final, "end of training"), out_dir,
        f"{stem}_accuracy_vs_sparsity_final", formats,
        "Accuracy at the end of training vs weights remaining", saved)
  _save(figures.plot_accuracy_vs_sparsity(early, "early stopping"), out_dir,
        f"{stem}_accuracy_vs_sparsity_early_stop", formats,
        "Accuracy at early stopping (min. validation loss) vs weights "
        "remaining", saved)
  _save(figures.plot_early_stop_iteration(early), out_dir,
        f"{stem}_early_stop_iteration", formats,
        "Early-stop iteration vs weights remaining", saved)
  _save(figures.plot_tradeoff(final), out_dir, f"{stem}_tradeoff", formats,
        "Adversarial vs natural accuracy across sparsity levels", saved)
  return saved


def level_summary(final: pd.DataFrame, early: pd.DataFrame) -> pd.DataFrame:
  """Mean/std/n per series and level: final and early-stop numbers."""
  keys = list(metrics.SERIES_KEYS) + ["prune_iteration"]
  at_end = metrics.summarize(final, keys, ["acc", "adv_acc"])
  at_stop = metrics.summarize(
      early.rename(columns={"acc": "early_stop_acc",
                            "adv_acc": "early_stop_adv_acc"}), keys,
      ["early_stop_iteration", "early_stop_acc", "early_stop_adv_acc"])
  return at_end.merge(at_stop.drop(columns="percent_weights_remaining"),
                      on=keys, how="outer")


def write_analysis(study: load.Study, out_dir: str,
                   formats: Sequence[str] = ("png",),
                   source: str = "", command: Optional[str] = None) -> str:
  """Writes all figures, tables and the report of `study` into `out_dir`.

  Args:
    study: from `load.load_study`.
    out_dir: output folder (created).
    formats: figure formats, e.g. ("png", "svg", "pdf").
    source: the base directory, named in the report.
    command: the command line that produced the analysis, for the report.

  Returns:
    The path of the report.
  """
  os.makedirs(os.path.join(out_dir, TABLES_DIR), exist_ok=True)
  evaluations = study.evaluations
  final = metrics.final_evaluations(evaluations, "test")
  early = metrics.early_stop_evaluations(evaluations)

  sections = []
  groups = final.groupby(["dataset", "model", "setting"], sort=True)
  for (dataset, model, setting), group_final in groups:
    in_group = ((evaluations["dataset"] == dataset)
                & (evaluations["model"] == model)
                & (evaluations["setting"] == setting))
    table = tables.seed_table(group_final)
    table_stem = _group_stem(dataset, model, setting) + "_accuracy_table"
    heading = f"{dataset} / {model}" + (f" [{setting}]" if setting else "")
    if table.empty:
      table_markdown, table_paths = "_No reinit_orig runs: no table._\n", []
    else:
      cells = tables.seed_table_cells(table)
      caption = (f"{dataset}, {model}: test accuracy (%) of the ticket "
                 "(reinit_orig) at the final evaluation, mean ± std (n) over "
                 "trials; without / with adversarial training.")
      table_paths = tables.write_seed_table(
          table, cells, caption,
          os.path.join(out_dir, TABLES_DIR, table_stem))
      table_markdown = tables.to_markdown(cells)
    by_attack = {}
    for attack in sorted(group_final["attack"].unique()):
      stem = _group_stem(dataset, model, attack, setting)
      by_attack[attack] = _attack_figures(
          evaluations[in_group & (evaluations["attack"] == attack)],
          group_final[group_final["attack"] == attack],
          early[(early["dataset"] == dataset) & (early["model"] == model)
                & (early["setting"] == setting)
                & (early["attack"] == attack)],
          out_dir, stem, formats)
    sections.append(Section(heading, table_markdown, table_paths, by_attack))

  best = metrics.best_sparsity_summary(evaluations)
  best_stem = os.path.join(out_dir, TABLES_DIR, "best_sparsity")
  best.to_csv(best_stem + ".csv", index=False, float_format="%.6g")
  best_markdown = tables.best_sparsity_markdown(best)
  with open(best_stem + ".md", "w") as f:
    f.write(best_markdown)
  level_summary(final, early).to_csv(
      os.path.join(out_dir, TABLES_DIR, "summary_by_level.csv"), index=False,
      float_format="%.6g")

  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, "w") as f:
    f.write(render_report(study, sections, best_markdown, out_dir, source,
                          command))
  return path


def _link(path: str, out_dir: str) -> str:
  return os.path.relpath(path, out_dir).replace(os.sep, "/")


def _figure_markdown(figure: Figure, out_dir: str) -> str:
  shown = next((p for p in figure.paths
                if p.rsplit(".", 1)[-1] in IMAGE_FORMATS), None)
  others = ", ".join(f"[{p.rsplit('.', 1)[-1]}]({_link(p, out_dir)})"
                     for p in figure.paths if p != shown)
  text = f"**{figure.caption}**"
  if others:
    text += f" ({others})"
  if shown is not None:
    text += f"\n\n![{figure.caption}]({_link(shown, out_dir)})"
  return text + "\n"


def render_report(study: load.Study, sections: Sequence[Section],
                  best_markdown: str, out_dir: str, source: str = "",
                  command: Optional[str] = None) -> str:
  """Returns the Markdown of the report (links relative to `out_dir`)."""
  runs = study.runs
  trials = study.evaluations.groupby("run_dir")["trial"].nunique()
  lines = [
      "# Robust sparse networks: analysis",
      "",
      f"Runs under `{source}`: {len(runs)}."
      + (f" Produced by `{command}`." if command else ""),
      "",
      "Every statistic is over trials: mean ± sample standard deviation "
      "(ddof=1) with the number of trials n. *End of training* is the last "
      "evaluation; *early stopping* is the evaluation with the smallest "
      "validation loss (the training objective). Sparsity levels are the "
      "percent of weights remaining.",
      "",
  ]
  if study.problems:
    lines += ["## Warnings", "",
              "Missing or unfinished work (left out of every number below):",
              ""]
    lines += [f"- {problem}" for problem in study.problems]
    lines.append("")
  lines += [
      "## Sparsest level within one point of dense",
      "",
      "Per run: the smallest percent of weights remaining whose mean final "
      "test accuracy is at most 1 percentage point below the dense (100 %) "
      f"level. ([csv]({TABLES_DIR}/best_sparsity.csv); all levels in "
      f"[summary_by_level.csv]({TABLES_DIR}/summary_by_level.csv))",
      "",
      best_markdown,
  ]
  for section in sections:
    lines += [f"## {section.heading}", "",
              "### Test accuracy of the ticket (reinit_orig) at the final "
              "evaluation", "",
              "Cells: accuracy (%) mean ± std (n) without adversarial "
              "training / with adversarial training."
              + "".join(f" [{p.rsplit('.', 1)[-1]}]({_link(p, out_dir)})"
                        for p in section.table_paths), "",
              section.table_markdown]
    for attack, saved in section.figures_by_attack.items():
      lines += [f"### Attack: {attack.upper()}", ""]
      for figure in saved:
        lines += [_figure_markdown(figure, out_dir)]
  lines += ["## Runs", "",
            "| Run | Experiment | Attack | Training | Trials loaded |",
            "|---|---|---|---|---|"]
  for _, run in runs.iterrows():
    lines.append(
        f"| `{os.path.relpath(run['run_dir'], source or '.')}` | "
        f"{run['experiment']} | {run['attack']} | "
        f"{load.training_mode(run['adv_train'])} | "
        f"{trials.get(run['run_dir'], 0)} of {run.get('trials', '?')} |")
  return "\n".join(lines) + "\n"
