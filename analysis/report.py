"""Writes every figure and table of a study, and `report.md` that shows them all.

Lottery-ticket sections cover each (data set, model, setting) holding a run
with pruning levels. Runs without pruning levels (`train`, `no_pruning`, or
`prune_iters=0`) also get learning curves and a final table per (data set,
model), each setting labelled by the hyper-parameters that differ between
those runs; a `no_pruning` baseline beside a lottery study appears in both.

Layout of `out_dir`:
  report.md                      open this one file to see the whole study
  figures/<dataset>_<model>_<attack>[_<setting>]_<figure>.<format>
  figures/<dataset>_<model>_learning_curves[_part<n>].<format>
  tables/<dataset>_<model>[_<setting>]_accuracy_table.{csv,md,tex}
  tables/<dataset>_<model>_final_table.{csv,md}   runs without pruning levels
  tables/best_sparsity.{csv,md}
  tables/summary_by_level.csv    every level of every series, in numbers
  tables/diverged.csv            levels whose loss became NaN or infinite
  figures/<dataset>_<model>_relu.<format>           ReLU reduction (relu_prune)
  figures/<dataset>_<model>[_<setting>]_{saturation,layers}.<format>   --measure=saturation
  figures/<dataset>_activation_sparsity_comparison.<format>   --measure=activation_sparsity
  figures/<dataset>_<model>_<attack>[_<setting>]_activation_sparsity_vs_weights.<format>
  figures/<dataset>_<model>_<experiment>_<attack>_<mode>_<run hash>_activation_sparsity_layers
      .<format>
  tables/<dataset>_activation_sparsity_table.{csv,md}
  tables/<dataset>_<model>_relu_{points,pareto}.csv
  tables/gradient_masking.{csv,md}, figures/gradient_masking.<format>   with masking_options
  tables/robustness_curves.{csv,md}, figures/robustness_{curves,area}.<format>   --eps_sweep runs
  figures/<dataset>_<model>_augmented_flatness_<run hash>.<format>   augmented_flatness runs
"""

import dataclasses
import collections
import os
from typing import Dict, List, Optional, Sequence, Tuple

import pandas as pd

from robust_sparse.analysis import activation
from robust_sparse.analysis import figures
from robust_sparse.analysis import flatness
from robust_sparse.analysis import layers
from robust_sparse.analysis import load
from robust_sparse.analysis import masking
from robust_sparse.analysis import robustness_curves
from robust_sparse.analysis import metrics
from robust_sparse.analysis import relu
from robust_sparse.analysis import tables

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
IMAGE_FORMATS = ("png", "svg", "jpg", "jpeg")
# A lottery section: the runs one seed table and its figures cover.
_SECTION_KEYS = ("dataset", "model", "setting")


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


@dataclasses.dataclass
class TrainingSection:
  """Learning curves and final table of the unpruned runs of one model."""
  heading: str
  label_keys: List[str]
  settings: int
  table_markdown: str
  table_paths: List[str]
  figures: List[Figure]


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


def _lottery_mask(frame: pd.DataFrame, cells: set) -> pd.Series:
  keys = frame[list(_SECTION_KEYS)].itertuples(index=False, name=None)
  return pd.Series([key in cells for key in keys], index=frame.index,
                   dtype=bool)


def _lottery_sections(evaluations: pd.DataFrame, final: pd.DataFrame,
                      early: pd.DataFrame, out_dir: str,
                      formats: Sequence[str]) -> List[Section]:
  sections = []
  groups = final.groupby(list(_SECTION_KEYS), sort=True)
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
  return sections


MAX_LABEL = 100  # Characters of a legend label; longer ones end in "...".
# Fields named first in a label: what a comparison is usually about.
LABEL_PRIORITY = ("optimizer", "experiment", "vit_variant", "model", "activation", "adv_train",
                  "attack", "attack_labels", "learning_rate", "epochs")


def _short_label(config: dict, configs: Sequence[dict], keys: Sequence[str]) -> str:
  """The fields of `keys` where `config` departs from the most common value of `configs`.

  The method (`optimizer`) leads whenever the runs differ in it, named bare,
  and only the fields it reads follow (`load.setting_label`). Fields of
  `LABEL_PRIORITY` come first; unset (None) values are not named; the
  run that departs nowhere is named by its first two distinguishing fields; a
  label over `MAX_LABEL` characters is cut.
  """
  def key_value(config, key):
    return repr(config.get(key))

  modes = {key: collections.Counter(key_value(c, key) for c in configs).most_common(1)[0][0]
           for key in keys}
  order = {key: i for i, key in enumerate(LABEL_PRIORITY)}
  keys = sorted(keys, key=lambda k: (order.get(k, len(order)), k))
  own = [key for key in keys
         if key_value(config, key) != modes[key] and config.get(key) is not None]
  # The method leads every label it tells apart, shared or not ("ssamf-sgd, sparsity=0.5").
  if load.METHOD_KEY in keys and load.METHOD_KEY not in own:
    own.insert(0, load.METHOD_KEY)
  # Runs that differ only in fields their method does not read are named by it.
  label = (load.setting_label(config, own or list(keys)[:2])
           or load.setting_label(config, [load.METHOD_KEY]))
  if len(label) > MAX_LABEL:
    label = label[:MAX_LABEL - 3].rstrip(", ") + "..."
  return label


def training_labels(study: load.Study, run_dirs: Sequence[str],
                    exclude: Sequence[str] = ("dataset", "model")
                   ) -> Tuple[Dict[str, str], List[str]]:
  """Labels runs without pruning levels by the fields that differ between them.

  Args:
    study: the loaded study (its `configs`).
    run_dirs: runs of one data set and model (of one data set when
      `exclude` leaves "model" out).
    exclude: fields never named (those the runs share by construction).

  Returns:
    ({run_dir: label}, the fields named). Runs with equal labels have equal
    hyper-parameters. When all runs share one setting, the label names the
    experiment, attack and training mode instead.
  """
  configs = [study.configs[run_dir] for run_dir in run_dirs]
  keys = load.differing_keys(configs, exclude=exclude)
  if not keys:
    keys = ["experiment", "attack", "adv_train"]
    labels = [load.setting_label(config, keys) for config in configs]
  else:
    labels = [_short_label(config, configs, keys) for config in configs]
  # Different configurations that print alike get their run folder's hash appended.
  ids = [load.config_id(config) for config in configs]
  names = load.alike_suffixes(ids, [load.run_hash(run_dir) for run_dir in run_dirs])
  per_label = {}
  for label, identity in zip(labels, ids):
    per_label.setdefault(label, set()).add(identity)
  labels = [label if len(per_label[label]) == 1 else f"{label} #{names[identity]}"
            for label, identity in zip(labels, ids)]
  return dict(zip(run_dirs, labels)), keys


def _training_sections(study: load.Study, out_dir: str,
                       formats: Sequence[str]) -> List[TrainingSection]:
  runs = study.runs[(study.runs["expected_levels"] == 1)
                    & (study.runs["experiment"] != relu.EXPERIMENT)]
  evaluations = study.evaluations[
      study.evaluations["run_dir"].isin(runs["run_dir"])]
  sections = []
  for (dataset, model), group in runs.groupby(["dataset", "model"],
                                              sort=True):
    label_of, keys = training_labels(study, list(group["run_dir"]))
    rows = evaluations[evaluations["run_dir"].isin(label_of)]
    rows = rows.assign(label=rows["run_dir"].map(label_of))
    final = metrics.final_evaluations(rows, "test")
    if "epoch" in final.columns:
      # A run of --train_iters ends mid-epoch ("7.895"): its final epoch says nothing.
      by_epochs = (set(group.loc[group["epochs"].notna(), "run_dir"])
                   if "epochs" in group.columns else set())
      final = final.assign(epoch=final["epoch"].where(final["run_dir"].isin(by_epochs)))
    stem = _group_stem(dataset, model)
    table = tables.final_table(final)
    table_path = os.path.join(out_dir, TABLES_DIR, f"{stem}_final_table")
    table.to_csv(table_path + ".csv", index=False, float_format="%.6g")
    table_markdown = tables.to_markdown(tables.final_table_cells(table),
                                        index=False)
    with open(table_path + ".md", "w") as f:
      f.write(table_markdown)
    labels = sorted(set(label_of.values()))
    chunks = [labels[i:i + figures.SETTINGS_PER_FIGURE]
              for i in range(0, len(labels), figures.SETTINGS_PER_FIGURE)]
    saved: List[Figure] = []
    for part, chunk in enumerate(chunks, start=1):
      suffix = f"_part{part}" if len(chunks) > 1 else ""
      caption = ("Loss, accuracy and adversarial accuracy during training, "
                 "one colour per setting"
                 + (f" (settings {part} of {len(chunks)})" if suffix else ""))
      _save(figures.plot_learning_curves(rows, chunk, f"{dataset} | {model}"),
            out_dir, f"{stem}_learning_curves{suffix}", formats, caption,
            saved)
    sections.append(TrainingSection(
        f"{dataset} / {model}: runs without pruning levels", keys,
        len(labels), table_markdown,
        [table_path + ".csv", table_path + ".md"], saved))
  return sections


def write_analysis(study: load.Study, out_dir: str,
                   formats: Sequence[str] = ("png",),
                   source: str = "", command: Optional[str] = None,
                   masking_options: Optional[masking.Options] = None) -> str:
  """Writes all figures, tables and the report of `study` into `out_dir`.

  Args:
    study: from `load.load_study`.
    out_dir: output folder (created).
    formats: figure formats, e.g. ("png", "svg", "pdf").
    source: the base directory, named in the report.
    command: the command line that produced the analysis, for the report.
    masking_options: the gradient-masking checks (`analysis.masking`) of
      every run with an attack, read from its level folders (levels without
      them are attacked once, and the results stored there); None: skip them.

  Returns:
    The path of the report.
  """
  os.makedirs(os.path.join(out_dir, TABLES_DIR), exist_ok=True)
  pruned_runs = study.runs.loc[(study.runs["expected_levels"] > 1)
                               & (study.runs["experiment"] != relu.EXPERIMENT), "run_dir"]
  everything = study.evaluations
  # Sections holding a run with pruning levels are lottery sections; their
  # single-level runs (no_pruning baselines) are drawn beside the tickets.
  lottery_cells = set(
      everything.loc[everything["run_dir"].isin(pruned_runs),
                     list(_SECTION_KEYS)].itertuples(index=False, name=None))
  evaluations = everything[_lottery_mask(everything, lottery_cells)]

  sections, best_markdown = [], None
  if not evaluations.empty:
    final = metrics.final_evaluations(evaluations, "test")
    early = metrics.early_stop_evaluations(evaluations)
    sections = _lottery_sections(evaluations, final, early, out_dir, formats)
    best = metrics.best_sparsity_summary(evaluations)
    best_stem = os.path.join(out_dir, TABLES_DIR, "best_sparsity")
    best.to_csv(best_stem + ".csv", index=False, float_format="%.6g")
    best_markdown = tables.best_sparsity_markdown(best)
    with open(best_stem + ".md", "w") as f:
      f.write(best_markdown)
    level_summary(final, early).to_csv(
        os.path.join(out_dir, TABLES_DIR, "summary_by_level.csv"),
        index=False, float_format="%.6g")
  training = _training_sections(study, out_dir, formats)
  relu_sections = relu.sections(study, out_dir, formats, _save, _group_stem, TABLES_DIR)
  layer_sections = (layers.sections(study, source, out_dir, formats, _save, _group_stem)
                    if source else [])
  activation_sections = activation.sections(study, out_dir, formats, _save, _group_stem,
                                            TABLES_DIR, training_labels)
  flatness_sections = (flatness.sections(source, out_dir, formats, _save, _group_stem)
                       if source else [])
  masking_sections = (masking.sections(study, source, out_dir, formats, _save, TABLES_DIR,
                                       masking_options)
                      if masking_options is not None else [])
  masking_sections += robustness_curves.sections(study, source, out_dir, formats, _save,
                                                 TABLES_DIR)
  if not study.diverged.empty:
    study.diverged.to_csv(os.path.join(out_dir, TABLES_DIR, "diverged.csv"),
                          index=False)

  path = os.path.join(out_dir, REPORT_FILE)
  with open(path, "w") as f:
    f.write(render_report(study, sections, best_markdown, out_dir, source,
                          command, training, relu_sections, layer_sections,
                          activation_sections, masking_sections, flatness_sections))
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


def _relative(run_dir: str, source: str) -> str:
  return os.path.relpath(run_dir, source or ".")


def _diverged_lines(diverged: pd.DataFrame, source: str) -> List[str]:
  def number(value):
    return "?" if pd.isna(value) else f"{int(value):,}"

  lines = [
      "## Diverged runs", "",
      "Levels whose loss became NaN or infinite. They are left out of every "
      "figure and table (a diverged trial counts as missing there); the "
      f"training logs up to the last finite evaluation stay in the run "
      f"folder. ([csv]({TABLES_DIR}/diverged.csv))", "",
      "| Run | Trial | Level (prune iteration) | Diverged at iteration | "
      "Last finite evaluation (iteration) |",
      "|---|---|---|---|---|"]
  for row in diverged.sort_values(["run_dir", "trial",
                                   "prune_iteration"]).itertuples():
    lines.append(
        f"| `{_relative(row.run_dir, source)}` | {row.trial} | "
        f"{row.prune_iteration} | {number(row.diverged_iteration)} | "
        f"{number(row.last_logged_iteration)} |")
  return lines + [""]


def _training_lines(section: TrainingSection, out_dir: str) -> List[str]:
  named = ", ".join(f"`{key}`" for key in section.label_keys)
  if section.settings == 1:
    about = (f"These runs share one setting (labelled by {named}); their "
             "trials are pooled.")
  else:
    about = (f"{section.settings} settings, each labelled by {named}: the "
             "hyper-parameters that differ between these runs. Runs that "
             "share a label have equal hyper-parameters and are pooled; runs "
             "that differ in any field are not.")
  lines = [
      f"## {section.heading}", "", about, "",
      "### Final evaluation", "",
      "The last test evaluation of each trial; cells: mean ± std (n) over "
      "trials, in percent."
      + "".join(f" [{p.rsplit('.', 1)[-1]}]({_link(p, out_dir)})"
                for p in section.table_paths), "",
      section.table_markdown,
      "### Learning curves", ""]
  for figure in section.figures:
    lines.append(_figure_markdown(figure, out_dir))
  return lines


def _attack_labels_note(runs: pd.DataFrame) -> List[str]:
  """Says which labels the attacks of the runs used (`--attack_labels`), or nothing."""
  if "attack_labels" not in runs or "attack" not in runs:
    return []
  attacked = runs[runs["attack"] != "none"]
  if attacked.empty:
    return []
  counts = attacked["attack_labels"].fillna("predicted").value_counts()
  meaning = {"predicted": "the model's own predictions (the seed's convention)",
             "true": "the true labels (standard robust accuracy)"}
  parts = [f"{meaning.get(label, label)} in {count} run{'s' if count > 1 else ''}"
           for label, count in counts.items()]
  return ["Adversarial accuracy (`adv_acc`) attacks " + "; ".join(parts)
          + " (`--attack_labels`). `adv_acc_<attack>` columns (`--eval_attacks`) count "
          "an example as robust only when it is classified correctly both clean and "
          "under that attack.", ""]


def render_report(study: load.Study, sections: Sequence[Section],
                  best_markdown: Optional[str], out_dir: str,
                  source: str = "", command: Optional[str] = None,
                  training: Sequence[TrainingSection] = (),
                  relu_sections: Sequence[tuple] = (),
                  layer_sections: Sequence[tuple] = (),
                  activation_sections: Sequence[tuple] = (),
                  masking_sections: Sequence[tuple] = (),
                  flatness_sections: Sequence[tuple] = ()) -> str:
  """Returns the Markdown of the report (links relative to `out_dir`).

  Args:
    study: the loaded study.
    sections: lottery-ticket sections.
    best_markdown: the best-sparsity table; None when no run was pruned.
    out_dir: where the report goes (links are relative to it).
    source: the base directory, named in the report.
    command: the command line, for the report.
    training: sections of runs without pruning levels.
    relu_sections: (heading, Pareto markdown, figures, table paths) of the
      ReLU-reduction runs (`analysis.relu.sections`).
    layer_sections: (heading, figures) of the runs measured with
      `--measure=saturation` (`analysis.layers.sections`).
    activation_sections: (heading, table Markdown, figures) of the runs
      measured with `--measure=activation_sparsity` (`analysis.activation.sections`).
    masking_sections: (heading, text with the table, figures) of the
      gradient-masking checks (`analysis.masking.sections`).
    flatness_sections: (heading, text with the table, figures) of the
      `augmented_flatness` runs (`analysis.flatness.sections`).
  """
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
      "validation loss (the training objective)."
      + (" Sparsity levels are the percent of weights remaining."
         if sections else ""),
      "",
  ]
  lines += _attack_labels_note(runs)
  if study.problems:
    lines += ["## Warnings", "",
              "Missing, unfinished, diverged or refused work (left out of every "
              "number below):", ""]
    lines += [f"- {problem}" for problem in study.problems]
    lines.append("")
  if not study.diverged.empty:
    lines += _diverged_lines(study.diverged, source)
  if best_markdown is not None:
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
  for section in training:
    lines += _training_lines(section, out_dir)
  for heading, front, saved, table_paths in relu_sections:
    lines += [f"## {heading}", "",
              "One point per run (mean over trials): the ReLU count and test accuracy at "
              "the final evaluation of its last level. Pareto front (no run has as few "
              "ReLUs and a higher accuracy):"
              + "".join(f" [{os.path.basename(p)}]({_link(p, out_dir)})"
                        for p in table_paths), "", front]
    lines += [_figure_markdown(figure, out_dir) for figure in saved]
  for heading, saved in layer_sections:
    lines += [f"## {heading}", ""] + [_figure_markdown(figure, out_dir) for figure in saved]
  for heading, text, saved in activation_sections:
    lines += [f"## {heading}", "", text] + [_figure_markdown(figure, out_dir) for figure in saved]
  for heading, text, saved in flatness_sections:
    lines += [f"## {heading}", "", text] + [_figure_markdown(figure, out_dir) for figure in saved]
  for heading, text, saved in masking_sections:
    lines += [f"## {heading}", "", text] + [_figure_markdown(figure, out_dir) for figure in saved]
  with_setting = (runs["setting"] != "").any()
  lines += ["## Runs", "",
            "| Run | Experiment | Attack | Training |"
            + (" Setting |" if with_setting else "") + " Trials loaded |",
            "|---|---|---|---|" + ("---|" if with_setting else "") + "---|"]
  for _, run in runs.iterrows():
    setting = f" {run['setting'] or tables.MISSING} |" if with_setting else ""
    lines.append(
        f"| `{_relative(run['run_dir'], source)}` | "
        f"{run['experiment']} | {run['attack']} | "
        f"{load.training_mode(run['adv_train'])} |{setting} "
        f"{trials.get(run['run_dir'], 0)} of {run.get('trials', '?')} |")
  return "\n".join(lines) + "\n"
