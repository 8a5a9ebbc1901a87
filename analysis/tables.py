"""The seed's accuracy table and the best-sparsity summary, as CSV, Markdown and LaTeX.

The seed's table (one per data set and model): rows are the sparsity levels
in descending order; columns are (FGSM | PGD) x (Natural | Attack) test
accuracy of the ticket (reinit_orig) at the final evaluation; each cell reads
`mean ± std (n)` of accuracy·100 without adversarial training, then `/`, then
the same with adversarial training. std is the sample standard deviation
(ddof=1) over trials; n is the number of trials.
"""

import math
from typing import List

import pandas as pd

from robust_sparse.analysis import metrics

ATTACKS = ("fgsm", "pgd")
MEASURES = (("natural", "acc"), ("attack", "adv_acc"))
TRAINING_MODES = ("natural", "adversarial")
MISSING = "–"


def seed_table(final: pd.DataFrame, experiment: str = "reinit_orig"
              ) -> pd.DataFrame:
  """Tidy numbers of the seed's table.

  Args:
    final: `metrics.final_evaluations` rows of one data set, model and setting.
    experiment: which experiment to tabulate (the seed uses reinit_orig).

  Returns:
    One row per (prune iteration, attack, measure, training mode) with
    `percent_weights_remaining`, `mean`, `std` (ddof=1) and `n`; accuracies
    are in percent. Rows are sorted by descending weights remaining.
  """
  rows = final[final["experiment"] == experiment]
  columns = ["prune_iteration", "percent_weights_remaining", "attack",
             "measure", "training_mode", "mean", "std", "n"]
  if rows.empty:
    return pd.DataFrame(columns=columns)
  parts = []
  for measure, value in MEASURES:
    summary = metrics.summarize(
        rows.assign(value=100 * rows[value]),
        ["prune_iteration", "attack", "training_mode"], ["value"])
    summary = summary.rename(columns={
        "value_mean": "mean", "value_std": "std", "value_n": "n"})
    summary["measure"] = measure
    parts.append(summary)
  table = pd.concat(parts, ignore_index=True)
  # Every attack and training mode shares one level per prune iteration.
  table["percent_weights_remaining"] = table.groupby("prune_iteration")[
      "percent_weights_remaining"].transform("mean")
  table = table.sort_values(
      ["percent_weights_remaining", "attack", "measure", "training_mode"],
      ascending=[False, True, False, True])
  return table.loc[:, columns].reset_index(drop=True)


def format_cell(mean: float, std: float, n: int) -> str:
  """`mean ± std (n)` with two decimals; a lone trial has no std."""
  if n == 0 or (isinstance(mean, float) and math.isnan(mean)):
    return MISSING
  std_text = "n/a" if pd.isna(std) else f"{std:.2f}"
  return f"{mean:.2f} ± {std_text} ({int(n)})"


def seed_table_cells(table: pd.DataFrame) -> pd.DataFrame:
  """Formats `seed_table` numbers as the seed's text cells.

  Returns:
    A frame indexed by the level label ("51.3"), with columns
    "FGSM Natural", "FGSM Attack", "PGD Natural", "PGD Attack"; each cell is
    "<without adversarial training> / <with adversarial training>".
  """
  levels = (table.groupby("prune_iteration")["percent_weights_remaining"]
            .mean().sort_values(ascending=False))
  cells = {}
  for prune_iteration, level in levels.items():
    row = {}
    for attack in ATTACKS:
      for measure, _ in MEASURES:
        texts = []
        for mode in TRAINING_MODES:
          match = table[(table["prune_iteration"] == prune_iteration)
                        & (table["attack"] == attack)
                        & (table["measure"] == measure)
                        & (table["training_mode"] == mode)]
          if match.empty:
            texts.append(MISSING)
          else:
            found = match.iloc[0]
            texts.append(format_cell(found["mean"], found["std"], found["n"]))
        row[f"{attack.upper()} {measure.capitalize()}"] = " / ".join(texts)
    cells[metrics.level_label(level)] = row
  frame = pd.DataFrame.from_dict(cells, orient="index")
  frame.index.name = "Weights remaining (%)"
  return frame


def to_markdown(frame: pd.DataFrame, index: bool = True,
                float_format: str = "{:.2f}") -> str:
  """Renders a frame as a GitHub Markdown table (no extra dependency)."""
  def text(value):
    if isinstance(value, float):
      return MISSING if math.isnan(value) else float_format.format(value)
    return str(value).replace("|", "\\|")

  headers = ([frame.index.name or ""] if index else []) + [
      str(c) for c in frame.columns]
  lines = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for label, row in frame.iterrows():
    cells = ([text(label)] if index else []) + [text(v) for v in row]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _latex_escape(text: str) -> str:
  for char, escaped in (("\\", r"\textbackslash{}"), ("&", r"\&"),
                        ("%", r"\%"), ("_", r"\_"), ("#", r"\#")):
    text = text.replace(char, escaped)
  return text.replace("±", r"$\pm$").replace("–", "--")


def seed_table_latex(cells: pd.DataFrame, caption: str) -> str:
  """The seed's LaTeX layout: FGSM and PGD, each split into Natural | Attack."""
  lines = [
      r"\begin{table}[ht]",
      r"\centering",
      r"\small",
      r"\begin{tabular}{r|cc|cc}",
      r"\hline",
      r" & \multicolumn{2}{c|}{FGSM} & \multicolumn{2}{c}{PGD} \\",
      r"Weights remaining (\%) & Natural & Attack & Natural & Attack \\",
      r"\hline",
  ]
  for label, row in cells.iterrows():
    values = [_latex_escape(str(row.get(f"{a.upper()} {m.capitalize()}",
                                        MISSING)))
              for a in ATTACKS for m, _ in MEASURES]
    lines.append(f"{label} & " + " & ".join(values) + r" \\")
  lines += [
      r"\hline",
      r"\end{tabular}",
      rf"\caption{{{_latex_escape(caption)}}}",
      r"\end{table}",
  ]
  return "\n".join(lines) + "\n"


def best_sparsity_markdown(summary: pd.DataFrame) -> str:
  """Markdown of `metrics.best_sparsity_summary`, one row per run."""
  if summary.empty:
    return "_No runs._\n"
  shown = pd.DataFrame({
      "Data set": summary["dataset"],
      "Model": summary["model"],
      "Attack": summary["attack"].str.upper(),
      "Training": summary["training_mode"],
      "Experiment": summary["experiment"],
      "Setting": summary["setting"].replace("", MISSING),
      "Trials": summary["trials"],
      "Dense test acc. (%)": summary["dense_test_acc"],
      "Sparsest within 1 point (% weights)": summary[
          "best_percent_weights_remaining"].map(
              lambda v: MISSING if pd.isna(v) else metrics.level_label(v)),
      "Its test acc. (%)": summary["best_test_acc"],
  })
  if (shown["Setting"] == MISSING).all():
    shown = shown.drop(columns="Setting")
  return to_markdown(shown, index=False)


def write_seed_table(table: pd.DataFrame, cells: pd.DataFrame, caption: str,
                     stem: str) -> List[str]:
  """Writes `<stem>.csv` (numbers), `<stem>.md` and `<stem>.tex`."""
  paths = [f"{stem}.csv", f"{stem}.md", f"{stem}.tex"]
  table.to_csv(paths[0], index=False, float_format="%.6g")
  with open(paths[1], "w") as f:
    f.write(to_markdown(cells))
  with open(paths[2], "w") as f:
    f.write(seed_table_latex(cells, caption))
  return paths


# The final table of runs without pruning levels: measure -> column heading.
FINAL_MEASURES = {
    "acc": "Test acc. (%)",
    "adv_acc": "Adv. test acc. (%)",
    "top5": "Top-5 test acc. (%)",
}


def final_table(final: pd.DataFrame) -> pd.DataFrame:
  """Numbers of the final table: the last test evaluation of each setting.

  Args:
    final: `metrics.final_evaluations` rows (one per trial) with a `label`
      column; runs that share a label have equal hyper-parameters.

  Returns:
    One row per label with `experiment`, `attack`, `training_mode`, `trials`,
    the final `iteration` (and `epoch` where logged) and
    `<measure>_mean`, `<measure>_std` (ddof=1), `<measure>_n` in percent for
    each of `FINAL_MEASURES` that some run logged.
  """
  measures = [m for m in FINAL_MEASURES
              if m in final.columns and final[m].notna().any()]
  keys = ["label", "experiment", "attack", "training_mode"]
  scaled = final.assign(**{m: 100 * final[m] for m in measures})
  table = metrics.summarize(scaled, keys, measures)
  grouped = final.groupby(keys, sort=True)
  table["trials"] = grouped["trial"].count().to_numpy()
  table["iteration"] = grouped["iteration"].max().to_numpy()
  if "epoch" in final.columns and final["epoch"].notna().any():
    table["epoch"] = grouped["epoch"].max().to_numpy()
  table = table.drop(columns="percent_weights_remaining", errors="ignore")
  return table.sort_values("label", kind="stable").reset_index(drop=True)


def final_table_cells(table: pd.DataFrame) -> pd.DataFrame:
  """Formats `final_table` as text cells `mean ± std (n)`, a row a setting."""
  shown = pd.DataFrame({"Setting": table["label"],
                        "Attack": table["attack"].str.upper(),
                        "Training": table["training_mode"]})
  if "epoch" in table.columns:
    shown["Final epoch"] = table["epoch"].map(
        lambda v: MISSING if pd.isna(v) else f"{v:.4g}")
  shown["Final iteration"] = table["iteration"].map(lambda v: f"{int(v):,}")
  for measure, heading in FINAL_MEASURES.items():
    if f"{measure}_mean" not in table.columns:
      continue
    shown[heading] = [
        format_cell(mean, std, n) for mean, std, n in zip(
            table[f"{measure}_mean"], table[f"{measure}_std"],
            table[f"{measure}_n"])]
  return shown
