"""Tests of the analysis on synthetic run folders with known numbers.

The fixture (`tests/analysis_fixtures.py`) writes 8 runs: reinit_orig and
reinit_rand x fgsm and pgd x natural and adversarial training, 3 trials,
prune iterations 0..3. Final test accuracies of trials 0, 1, 2 differ by one
point, so every mean is the middle trial and every sample std (ddof=1) is
exactly 1.00 point (the population std, ddof=0, would be 0.82). Pooling two
such runs by mistake shows as n=6 and std 0.89.

Further tests write studies of one kind each: runs that differ in one field,
`train` studies (one level, new log columns) and diverged levels.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from matplotlib import pyplot as plt

from robust_sparse.analysis import figures
from robust_sparse.analysis import load
from robust_sparse.analysis import metrics
from robust_sparse.analysis import report
from robust_sparse.analysis import tables
from tests import analysis_fixtures as fixtures

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED_COUNTS = (266200, 213057, 170532, 136503, 109272, 87480, 70040, 56081,
               44909, 35967, 28809, 23079, 18490, 14816, 11874, 9518, 7631,
               6119, 4908, 3938, 3160)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  return fixtures.write_study(str(tmp_path_factory.mktemp("study")))


@pytest.fixture(scope="module")
def study(study_dir):
  return load.load_study(study_dir)


@pytest.fixture(scope="module")
def final(study):
  return metrics.final_evaluations(study.evaluations, "test")


def run_cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "run_analysis", *args], cwd=REPO_ROOT,
      capture_output=True, text=True, timeout=120, check=False)


def test_loads_one_row_per_run_trial_prune_iteration_split_evaluation(study):
  evaluations = study.evaluations
  assert study.problems == []
  assert len(study.runs) == 8
  assert list(evaluations.columns) == list(load.EVALUATION_COLUMNS)
  # 8 runs x 3 trials x 4 prune iterations x (3 train + 4 valid + 4 test rows).
  assert len(evaluations) == 8 * 3 * 4 * 11
  assert sorted(evaluations["iteration"].unique()) == [0, 100, 200, 300]
  assert not ((evaluations["split"] == "train")
              & (evaluations["iteration"] == 0)).any()
  levels = evaluations.groupby("prune_iteration")[
      "percent_weights_remaining"].unique()
  assert levels[3][0] == pytest.approx(100 * 136503 / 266200)
  assert set(evaluations["training_mode"]) == {"natural", "adversarial"}
  assert (evaluations["setting"] == "").all()


def test_filters_select_runs(study_dir):
  natural_pgd = load.load_study(study_dir, attacks=["pgd"], adv_train=False)
  assert set(natural_pgd.runs["attack"]) == {"pgd"}
  assert not natural_pgd.runs["adv_train"].any()
  assert len(natural_pgd.runs) == 2
  both_modes = load.load_study(study_dir, experiments=["reinit_rand"])
  assert set(both_modes.runs["adv_train"]) == {False, True}


def test_seed_table_mean_sample_std_and_count(final):
  table = tables.seed_table(final[final["dataset"] == "digits"])
  dense_fgsm_natural = table[
      (table["prune_iteration"] == 0) & (table["attack"] == "fgsm")
      & (table["measure"] == "natural")
      & (table["training_mode"] == "natural")].iloc[0]
  assert dense_fgsm_natural["mean"] == pytest.approx(96.0)
  assert dense_fgsm_natural["std"] == pytest.approx(1.0)  # ddof=1
  assert dense_fgsm_natural["n"] == 3
  # PGD attack accuracy with adversarial training at prune iteration 3:
  # 0.10 + 0.40 - 0.03 + 0.01 (mean trial offset) = 48 %.
  sparse_pgd_attack = table[
      (table["prune_iteration"] == 3) & (table["attack"] == "pgd")
      & (table["measure"] == "attack")
      & (table["training_mode"] == "adversarial")].iloc[0]
  assert sparse_pgd_attack["mean"] == pytest.approx(48.0)
  assert sparse_pgd_attack["std"] == pytest.approx(1.0)
  # Only reinit_orig is tabulated: 4 levels x 2 attacks x 2 measures x 2 modes.
  assert len(table) == 32
  assert table["percent_weights_remaining"].is_monotonic_decreasing

  cells = tables.seed_table_cells(table)
  assert list(cells.index) == ["100.0", "80.0", "64.1", "51.3"]
  assert list(cells.columns) == ["FGSM Natural", "FGSM Attack", "PGD Natural",
                                 "PGD Attack"]
  assert cells.loc["100.0", "FGSM Natural"] == (
      "96.00 ± 1.00 (3) / 91.00 ± 1.00 (3)")
  assert cells.loc["51.3", "PGD Attack"] == (
      "8.00 ± 1.00 (3) / 48.00 ± 1.00 (3)")
  latex = tables.seed_table_latex(cells, "caption")
  assert r"\multicolumn{2}{c|}{FGSM}" in latex
  assert r"96.00 $\pm$ 1.00 (3) / 91.00 $\pm$ 1.00 (3)" in latex


def test_format_cell_single_trial_has_no_std():
  assert tables.format_cell(95.0, float("nan"), 1) == "95.00 ± n/a (1)"


def test_final_evaluation_is_last_iteration(final):
  assert (final["iteration"] == fixtures.TRAIN_ITERS).all()
  row = final[(final["experiment"] == "reinit_rand")
              & (final["attack"] == "fgsm") & (~final["adv_train"])
              & (final["trial"] == 2) & (final["prune_iteration"] == 1)]
  assert row["acc"].item() == pytest.approx(0.95 - 0.02 + 0.02)


def test_early_stop_iteration_is_argmin_of_validation_loss(study):
  early = metrics.early_stop_evaluations(study.evaluations)
  assert len(early) == 8 * 3 * 4
  for prune_iteration, group in early.groupby("prune_iteration"):
    expected = fixtures.early_stop_iteration(prune_iteration)
    assert (group["early_stop_iteration"] == expected).all()
    assert (group["iteration"] == expected).all()  # test row at that point
  row = early[(early["experiment"] == "reinit_orig")
              & (early["attack"] == "fgsm") & (~early["adv_train"])
              & (early["trial"] == 0) & (early["prune_iteration"] == 0)]
  # Accuracy rises by 0.1 over 300 iterations; stop at 100 -> final - 0.0667.
  assert row["acc"].item() == pytest.approx(0.95 - 0.1 * 2 / 3)


def test_best_sparsity_within_one_point_of_dense(study):
  summary = metrics.best_sparsity_summary(study.evaluations)
  assert len(summary) == 8
  orig = summary[summary["experiment"] == "reinit_orig"]
  rand = summary[summary["experiment"] == "reinit_rand"]
  # reinit_orig loses 0.4 points per prune iteration: iteration 2 (-0.8) is the
  # last within one point; reinit_rand loses 2 points, so only dense qualifies.
  assert (orig["best_prune_iteration"] == 2).all()
  assert orig["best_percent_weights_remaining"].to_numpy() == pytest.approx(
      100 * 170532 / 266200)
  assert (rand["best_prune_iteration"] == 0).all()
  assert (rand["best_percent_weights_remaining"] == 100).all()
  natural_fgsm = orig[(orig["attack"] == "fgsm")
                      & (orig["training_mode"] == "natural")].iloc[0]
  assert natural_fgsm["dense_test_acc"] == pytest.approx(96.0)
  assert natural_fgsm["best_test_acc"] == pytest.approx(95.2)
  assert natural_fgsm["trials"] == 3


def test_nearest_levels_of_the_seed_pruning_schedule():
  available = [100 * c / SEED_COUNTS[0] for c in SEED_COUNTS]
  chosen = metrics.nearest_levels(available)
  assert [metrics.level_label(l) for l in chosen] == [
      "100.0", "51.3", "16.9", "8.7", "3.6", "1.8"]
  # A short run draws the levels it has, once each.
  assert metrics.nearest_levels(available[:3]) == pytest.approx(
      [100.0, 100 * 170532 / 266200])


def test_unfinished_and_missing_work_is_warned_and_left_out(tmp_path):
  run_dir = fixtures.write_run(str(tmp_path), unfinished=[(1, 2)],
                               skip_trials=[2])
  study = load.load_study(str(tmp_path))
  assert study.problems == [
      f"{run_dir}: trial 1, prune iteration 2: unfinished (no completed "
      "metadata.json); left out",
      f"{run_dir}: trial 2: missing (expected 3 trials)",
  ]
  loaded = study.evaluations.groupby("trial")["prune_iteration"].unique()
  assert sorted(loaded[0]) == [0, 1, 2, 3]
  assert sorted(loaded[1]) == [0, 1, 3]
  assert 2 not in loaded.index


def test_no_pruning_expects_a_single_prune_iteration(tmp_path):
  fixtures.write_run(str(tmp_path), experiment="no_pruning", prune_iters=20)
  study = load.load_study(str(tmp_path))
  assert study.problems == []
  assert set(study.evaluations["prune_iteration"]) == {0}


def test_corrupt_files_skip_only_their_run(tmp_path):
  bad_csv_run = fixtures.write_run(str(tmp_path), experiment="reinit_orig")
  bad_json_run = fixtures.write_run(str(tmp_path), experiment="reinit_rand")
  good_run = fixtures.write_run(str(tmp_path), experiment="reinit_none")
  bad_csv = os.path.join(bad_csv_run, "trial_1", "prune_iter_2", "test.csv")
  with open(bad_csv, "w") as f:
    f.write("iteration,loss,acc\n0,zero,one\n")
  bad_json = os.path.join(bad_json_run, "trial_0", "prune_iter_1",
                          "metadata.json")
  with open(bad_json, "w") as f:
    f.write("{not json")
  study = load.load_study(str(tmp_path))
  # A bad log refuses only its level; a bad metadata.json skips its run.
  assert sorted(study.runs["run_dir"]) == sorted([bad_csv_run, good_run])
  assert len(study.problems) == 2
  assert any(bad_csv in p and "refused" in p for p in study.problems)
  assert any(p.startswith(bad_json) and "skipped" in p
             for p in study.problems)
  levels = study.evaluations[study.evaluations["run_dir"] == bad_csv_run]
  assert not ((levels["trial"] == 1) & (levels["prune_iteration"] == 2)).any()


def _truncate(path):
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines[:2]) + "\n")  # The header and the first row.


def _edit_last_accuracy(path):
  with open(path) as f:
    lines = f.read().splitlines()
  cells = lines[-1].split(",")
  cells[2] = "0.999"  # acc: a changed number, same rows and iterations.
  lines[-1] = ",".join(cells)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("damage", ["truncate", "delete", "edit", "garble"])
def test_a_level_whose_logs_disagree_with_its_metadata_is_refused(tmp_path, split, damage):
  run_dir = fixtures.write_run(str(tmp_path), trials=1, prune_iters=2)
  path = os.path.join(run_dir, "trial_0", "prune_iter_1", f"{split}.csv")
  if damage == "truncate":
    _truncate(path)
  elif damage == "delete":
    os.remove(path)
  elif damage == "edit":
    _edit_last_accuracy(path)
  else:
    with open(path, "wb") as f:
      f.write(b"\xff\xfe garbage")
  study = load.load_study(str(tmp_path))
  refused = [p for p in study.problems if "refused" in p]
  assert len(refused) == 1 and path in refused[0], study.problems
  assert sorted(set(study.evaluations["prune_iteration"])) == [0, 2]


def test_older_levels_without_records_are_checked_against_their_final_iteration(tmp_path):
  run_dir = fixtures.write_run(str(tmp_path), trials=1, prune_iters=1)
  folder = os.path.join(run_dir, "trial_0", "prune_iter_1")
  metadata_path = os.path.join(folder, "metadata.json")
  with open(metadata_path) as f:
    metadata = json.load(f)
  del metadata["files"]
  with open(metadata_path, "w") as f:
    json.dump(metadata, f)
  _truncate(os.path.join(folder, "test.csv"))
  study = load.load_study(str(tmp_path))
  assert any("refused" in p and "final iteration" in p for p in study.problems)
  assert set(study.evaluations["prune_iteration"]) == {0}


def test_only_corrupt_hparams_is_an_error(tmp_path):
  run_dir = fixtures.write_run(str(tmp_path), trials=1, prune_iters=0)
  with open(os.path.join(run_dir, "hparams.json"), "w") as f:
    f.write("[1, 2")
  with pytest.raises(load.AnalysisError, match="no readable runs"):
    load.load_study(str(tmp_path))


def test_setting_tells_apart_runs_of_one_experiment(tmp_path):
  fixtures.write_run(str(tmp_path), learning_rate=0.001)
  fixtures.write_run(str(tmp_path), learning_rate=0.01)
  # A key that differs only between experiments does not split the study.
  fixtures.write_run(str(tmp_path), experiment="reinit_rand",
                     learning_rate=0.001, rewind_iteration=0)
  study = load.load_study(str(tmp_path))
  assert set(study.runs["setting"]) == {"learning_rate=0.001",
                                        "learning_rate=0.01"}


def test_missing_experiment_panel_says_so(final, study):
  test_rows = study.evaluations[
      (study.evaluations["split"] == "test")
      & (study.evaluations["attack"] == "fgsm")
      & (study.evaluations["training_mode"] == "natural")]
  figure = figures.plot_training_curves(test_rows, "acc")
  panel_texts = [t.get_text() for t in figure.axes[2].texts]
  assert panel_texts == ["no reinit_none runs"]
  assert figure.axes[0].get_xlabel() == "Training iteration"
  assert figure.axes[0].get_ylabel() == "Test accuracy (%)"
  assert "digits | dense-300-100 | attack: FGSM | natural training" in (
      figure._suptitle.get_text())  # pylint: disable=protected-access
  figures.plt.close(figure)

  natural_only = final[~final["adv_train"] & (final["attack"] == "fgsm")]
  figure = figures.plot_accuracy_vs_sparsity(natural_only, "end of training")
  axes = figure.axes
  # No empty adversarial column (it would share, and hide, the y tick labels).
  assert len(axes) == 2
  assert axes[0].get_title() == ("natural training\n"
                                 "(no runs with adversarial training)")
  assert axes[0].get_xscale() == "log"
  assert axes[0].get_xlim()[0] > axes[0].get_xlim()[1]  # sparser to the right
  assert figures.missing_tick_labels(figure) == []
  figures.plt.close(figure)


def test_write_analysis_produces_every_figure_table_and_report(
    study_dir, tmp_path):
  # One attack keeps the test fast; the CLI test below draws PGD.
  fgsm_study = load.load_study(study_dir, attacks=["fgsm"])
  out_dir = str(tmp_path / "analysis")
  path = report.write_analysis(fgsm_study, out_dir, ["png"],
                               source=study_dir)
  stem = "digits_dense-300-100"
  expected_figures = []
  for attack in ("fgsm",):
    for mode in ("natural", "adversarial"):
      for metric in ("acc", "adv_acc", "loss"):
        expected_figures.append(f"{stem}_{attack}_{mode}_test_{metric}.png")
    for name in ("accuracy_vs_sparsity_final",
                 "accuracy_vs_sparsity_early_stop", "early_stop_iteration",
                 "tradeoff"):
      expected_figures.append(f"{stem}_{attack}_{name}.png")
  assert sorted(os.listdir(os.path.join(out_dir, "figures"))) == sorted(
      expected_figures)
  assert sorted(os.listdir(os.path.join(out_dir, "tables"))) == sorted([
      f"{stem}_accuracy_table.csv", f"{stem}_accuracy_table.md",
      f"{stem}_accuracy_table.tex", "best_sparsity.csv", "best_sparsity.md",
      "summary_by_level.csv"])
  with open(path) as f:
    text = f.read()
  links = re.findall(r"\]\(([^)]+)\)", text)
  for link in links:
    assert not os.path.isabs(link)
    assert os.path.exists(os.path.join(out_dir, link)), link
  for name in expected_figures:
    assert f"(figures/{name})" in text
  assert "| 100.0 | 96.00 ± 1.00 (3) / 91.00 ± 1.00 (3) |" in text

  numbers = pd.read_csv(os.path.join(out_dir, "tables",
                                     f"{stem}_accuracy_table.csv"))
  assert list(numbers.columns) == [
      "prune_iteration", "percent_weights_remaining", "attack", "measure",
      "training_mode", "mean", "std", "n"]
  assert np.allclose(numbers["std"], 1.0)
  assert (numbers["n"] == 3).all()
  assert len(numbers) == 4 * 2 * 2  # levels x measures x training modes


def test_cli_writes_filtered_analysis_and_warns(tmp_path):
  base_dir = str(tmp_path / "runs")
  run_dir = fixtures.write_run(base_dir, attack="pgd", trials=2,
                               prune_iters=1, unfinished=[(1, 1)])
  fixtures.write_run(base_dir, attack="fgsm", trials=2, prune_iters=1)
  # A mixed base folder: a `train` study beside the lottery runs.
  fixtures.write_run(base_dir, experiment="train", attack="pgd",
                     dataset="cifar10", trials=2, new_columns=True)
  result = run_cli(f"--base_dir={base_dir}", "--attack=pgd", "--noadv_train",
                   "--format=png,svg")
  assert result.returncode == 0, result.stderr
  assert f"{run_dir}: trial 1, prune iteration 1: unfinished" in result.stderr
  # Reading the defaults imports TensorFlow; its C++ start-up lines are hidden.
  assert "cudart" not in result.stderr
  assert "InitializeLog" not in result.stderr
  out_dir = os.path.join(base_dir, "analysis")
  produced = os.listdir(os.path.join(out_dir, "figures"))
  assert "digits_dense-300-100_pgd_tradeoff.png" in produced
  assert "digits_dense-300-100_pgd_tradeoff.svg" in produced
  assert "cifar10_dense-300-100_learning_curves.svg" in produced
  assert not any("fgsm" in name for name in produced)
  with open(os.path.join(out_dir, "report.md")) as f:
    assert "unfinished" in f.read()


@pytest.mark.parametrize("case", ["missing", "empty", "foreign", "no_match"])
def test_cli_bad_input_is_one_line_and_exit_1(tmp_path, case):
  base_dir = tmp_path / "base"
  expected = {
      "missing": "does not exist",
      "empty": "no runs under",
      "foreign": "no runs under",
      "no_match": "match the filters",
  }[case]
  args = [f"--base_dir={base_dir}"]
  if case != "missing":
    base_dir.mkdir()
  if case == "foreign":
    (base_dir / "notes").mkdir()
    (base_dir / "notes" / "results.csv").write_text("a,b\n1,2\n")
  if case == "no_match":
    fixtures.write_run(str(base_dir), trials=1, prune_iters=0)
    args.append("--dataset=fashion")
  result = run_cli(*args)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith("run_analysis: error: ")
  assert expected in lines[0]
  assert "Traceback" not in result.stderr


# Defaults for tests that must not depend on the engine's current fields.
DEFAULTS = {"weight_decay": 0.0, "optimizer": "sgd", "prune_iters": 20,
            "label_smoothing": 0.1, "trials": 10, "data_dir": None}


def dense_level(final, **where):
  """n, mean and sample std (in %) of final test acc at prune iteration 0."""
  rows = final[final["prune_iteration"] == 0]
  for key, value in where.items():
    rows = rows[rows[key] == value]
  acc = 100 * rows["acc"]
  return len(acc), acc.mean(), acc.std(ddof=1)


def test_runs_differing_only_in_prune_iters_are_kept_apart(tmp_path):
  fixtures.write_run(str(tmp_path), prune_iters=3)
  fixtures.write_run(str(tmp_path), prune_iters=5)
  study = load.load_study(str(tmp_path))  # Defaults from the engine.
  assert study.problems == []
  assert sorted(study.runs["setting"]) == ["prune_iters=3", "prune_iters=5"]
  final = metrics.final_evaluations(study.evaluations)
  for setting in ("prune_iters=3", "prune_iters=5"):
    n, mean, std = dense_level(final, setting=setting)
    assert (n, mean, std) == (3, pytest.approx(96.0), pytest.approx(1.0))
  # The seed table of one setting has its own levels only.
  table = tables.seed_table(final[final["setting"] == "prune_iters=3"])
  assert table["prune_iteration"].max() == 3
  assert (table["n"] == 3).all() and np.allclose(table["std"], 1.0)
  summary = report.level_summary(
      final, metrics.early_stop_evaluations(study.evaluations))
  assert (summary["acc_n"] == 3).all()


def test_field_absent_from_an_older_run_counts_as_its_default(tmp_path):
  older = fixtures.write_run(str(tmp_path))  # No weight_decay at all.
  explicit = fixtures.write_run(str(tmp_path), weight_decay=0.0)
  changed = fixtures.write_run(str(tmp_path), weight_decay=0.0005)
  study = load.load_study(str(tmp_path), defaults=DEFAULTS)
  setting = dict(zip(study.runs["run_dir"], study.runs["setting"]))
  assert setting[older] == setting[explicit] == "weight_decay=0"
  assert setting[changed] == "weight_decay=0.0005"
  config = dict(zip(study.runs["run_dir"], study.runs["config_id"]))
  assert config[older] == config[explicit] != config[changed]
  final = metrics.final_evaluations(study.evaluations)
  assert dense_level(final, setting="weight_decay=0")[0] == 6  # pooled
  n, _, std = dense_level(final, setting="weight_decay=0.0005")
  assert (n, std) == (3, pytest.approx(1.0))


def test_missing_field_uses_the_engine_default(tmp_path):
  defaults = load.hparam_defaults()
  assert defaults, "robust_sparse.core.hparams.Hparams could not be read"
  field = "weight_decay" if "weight_decay" in defaults else "label_smoothing"
  default = defaults[field]
  older = fixtures.write_run(str(tmp_path))
  explicit = fixtures.write_run(str(tmp_path), **{field: default})
  changed = fixtures.write_run(str(tmp_path), **{field: default + 0.25})
  study = load.load_study(str(tmp_path))
  assert study.problems == []
  setting = dict(zip(study.runs["run_dir"], study.runs["setting"]))
  assert setting[older] == setting[explicit] != setting[changed]
  assert setting[changed] == f"{field}={default + 0.25!r}"


def test_field_unknown_to_the_engine_tells_runs_apart(tmp_path):
  with_knob = fixtures.write_run(str(tmp_path), new_knob=2)
  without = fixtures.write_run(str(tmp_path))
  study = load.load_study(str(tmp_path), defaults=DEFAULTS)
  setting = dict(zip(study.runs["run_dir"], study.runs["setting"]))
  assert setting == {with_knob: "new_knob=2", without: "new_knob=unset"}
  # Output locations and the trial count never tell runs apart.
  assert load.differing_keys(
      [{"a": 1}, {"a": 1}]) == []
  config = load.distinguishing_hparams(
      {"trials": 3, "data_dir": "/x", "base_dir": "/y", "seed": 1}, DEFAULTS,
      load.NOT_DISTINGUISHING_KEYS)
  assert "trials" not in config and "data_dir" not in config
  assert "base_dir" not in config and config["seed"] == 1


def test_csvs_with_extra_columns_in_any_order_load(tmp_path):
  old = fixtures.write_run(str(tmp_path), experiment="train", trials=2)
  new = fixtures.write_run(str(tmp_path), experiment="train", trials=2,
                           new_columns=True, seed=7)
  log = os.path.join(new, "trial_0", "prune_iter_0", "test.csv")
  with open(log) as f:
    header, *rows = f.read().splitlines()
  assert header.split(",") == list(fixtures.NEW_COLUMNS)
  # A text column (a future engine's note) is dropped, not an error.
  with open(log, "w") as f:
    f.write(header + ",phase\n" + "\n".join(r + ",warmup" for r in rows)
            + "\n")
  fixtures.rerecord(new)  # As that engine would have recorded it.
  study = load.load_study(str(tmp_path), defaults=DEFAULTS)
  assert study.problems == []
  evaluations = study.evaluations
  assert list(evaluations.columns) == list(load.EVALUATION_COLUMNS) + [
      "epoch", "lr", "top5"]
  old_rows = evaluations[evaluations["run_dir"] == old]
  new_rows = evaluations[evaluations["run_dir"] == new]
  assert old_rows[["epoch", "lr", "top5"]].isna().all().all()
  last = new_rows[(new_rows["split"] == "test") & (new_rows["trial"] == 1)
                  & (new_rows["iteration"] == fixtures.TRAIN_ITERS)].iloc[0]
  assert last["epoch"] == fixtures.TRAIN_ITERS / fixtures.ITERATIONS_PER_EPOCH
  assert last["acc"] == pytest.approx(0.96)  # Read by name, not position.
  assert last["top5"] == pytest.approx(1.0)
  assert (new_rows["percent_weights_remaining"] == 100.0).all()


@pytest.fixture(scope="module")
def train_study_dir(tmp_path_factory):
  """A `train` study: weight decay 0 and 5e-4 (one trial of it diverged)."""
  base_dir = str(tmp_path_factory.mktemp("train_study"))
  fixtures.write_run(base_dir, experiment="train", dataset="cifar100",
                     model="resnet20", new_columns=True)
  fixtures.write_run(base_dir, experiment="train", dataset="cifar100",
                     model="resnet20", new_columns=True, weight_decay=0.0005,
                     acc_offset=-0.05, diverged=[(1, 0)])
  return base_dir


def test_diverged_level_is_warned_and_left_out(train_study_dir):
  study = load.load_study(train_study_dir, defaults=DEFAULTS)
  run_dir = study.runs.loc[study.runs["setting"] == "weight_decay=0.0005",
                           "run_dir"].item()
  assert study.problems == [
      f"{run_dir}: trial 1, prune iteration 0: diverged (loss not finite) at "
      f"iteration {fixtures.DIVERGED_ITERATION}; left out"]
  assert study.diverged.to_dict("records") == [{
      "run_dir": run_dir, "trial": 1, "prune_iteration": 0,
      "diverged_iteration": fixtures.DIVERGED_ITERATION,
      "last_logged_iteration": fixtures.DIVERGED_ITERATION - 100}]
  rows = study.evaluations[study.evaluations["run_dir"] == run_dir]
  assert sorted(rows["trial"].unique()) == [0, 2]


def test_diverged_lottery_level_says_later_levels_were_not_run(tmp_path):
  run_dir = fixtures.write_run(str(tmp_path), diverged=[(1, 1)])
  study = load.load_study(str(tmp_path), defaults=DEFAULTS)
  assert study.problems == [
      f"{run_dir}: trial 1, prune iteration 1: diverged (loss not finite) at "
      f"iteration {fixtures.DIVERGED_ITERATION}; left out",
      f"{run_dir}: trial 1, prune iteration(s) 2-3: not run (prune iteration "
      "1 diverged)"]
  loaded = study.evaluations.groupby("trial")["prune_iteration"].unique()
  assert sorted(loaded[1]) == [0]
  early = metrics.early_stop_evaluations(study.evaluations)
  assert np.isfinite(early["acc"]).all()


def test_nothing_finished_is_an_error_that_counts_divergence(tmp_path):
  fixtures.write_run(str(tmp_path), experiment="train", trials=1,
                     diverged=[(0, 0)])
  with pytest.raises(load.AnalysisError,
                     match=r"finished prune iteration \(1 level diverged\)"):
    load.load_study(str(tmp_path), defaults=DEFAULTS)


def test_train_study_draws_learning_curves_and_final_table(
    train_study_dir, tmp_path):
  study = load.load_study(train_study_dir, defaults=DEFAULTS)
  out_dir = str(tmp_path / "analysis")
  path = report.write_analysis(study, out_dir, ["png"],
                               source=train_study_dir)
  # No sparsity figure, table or best-sparsity summary without pruning.
  assert os.listdir(os.path.join(out_dir, "figures")) == [
      "cifar100_resnet20_learning_curves.png"]
  assert sorted(os.listdir(os.path.join(out_dir, "tables"))) == [
      "cifar100_resnet20_final_table.csv", "cifar100_resnet20_final_table.md",
      "diverged.csv"]

  table = pd.read_csv(os.path.join(out_dir, "tables",
                                   "cifar100_resnet20_final_table.csv"))
  assert list(table["label"]) == ["weight_decay=0", "weight_decay=0.0005"]
  assert list(table["trials"]) == [3, 2]  # The diverged trial is left out.
  # Trials 0 and 2 of the second setting: 90 and 92 %.
  assert table["acc_mean"].to_numpy() == pytest.approx([96.0, 91.0])
  assert table["acc_std"].iloc[0] == pytest.approx(1.0)
  # Runs of --train_iters: no "Final epoch" (it would end mid-epoch in general).
  assert "epoch" not in table.columns
  assert "top5_mean" in table.columns

  with open(path) as f:
    text = f.read()
  assert "## Diverged runs" in text
  run_dir = study.diverged["run_dir"].item()
  relative = os.path.relpath(run_dir, train_study_dir)
  assert (f"| `{relative}` | 1 | 0 | {fixtures.DIVERGED_ITERATION} | "
          f"{fixtures.DIVERGED_ITERATION - 100} |") in text
  assert "## cifar100 / resnet20: runs without pruning levels" in text
  assert ("| weight_decay=0.0005 | FGSM | natural | 300 | "
          "91.00 ± 1.41 (2)") in text
  assert "(figures/cifar100_resnet20_learning_curves.png)" in text
  for link in re.findall(r"\]\(([^)]+)\)", text):
    assert os.path.exists(os.path.join(out_dir, link)), link


def test_learning_curves_plot_finite_values_against_epoch(train_study_dir):
  study = load.load_study(train_study_dir, defaults=DEFAULTS)
  label_of, keys = report.training_labels(study, list(study.runs["run_dir"]))
  assert keys == ["weight_decay"]
  rows = study.evaluations.assign(
      label=study.evaluations["run_dir"].map(label_of))
  labels = sorted(set(label_of.values()))
  figure = figures.plot_learning_curves(rows, labels, "cifar100 | resnet20")
  axes = np.array(figure.axes).reshape(4, 3)
  assert [a.get_ylabel() for a in axes[:, 0]] == [
      "Loss (training objective)", "Accuracy (%)",
      "Adversarial accuracy (%)", "Top-5 accuracy (%)"]
  assert axes[-1, 0].get_xlabel() == "Epoch"
  for axis in axes.flat:
    lines = axis.get_lines()
    assert len(lines) == 2  # One per setting; no empty panel.
    for line in lines:
      assert np.isfinite(line.get_ydata()).all()
  legend = [t.get_text() for t in figure.legends[0].get_texts()]
  assert legend == ["weight_decay=0", "weight_decay=0.0005"]
  plt.close(figure)


def test_final_epoch_is_shown_for_runs_of_epochs_only(tmp_path):
  by_epochs = fixtures.write_run(str(tmp_path), experiment="train", trials=2,
                                 new_columns=True, epochs=6.0)
  by_iterations = fixtures.write_run(str(tmp_path), experiment="train", trials=2,
                                     new_columns=True)
  study = load.load_study(str(tmp_path), defaults=dict(DEFAULTS, epochs=None))
  out_dir = str(tmp_path / "analysis")
  report.write_analysis(study, out_dir, ["png"], source=str(tmp_path))
  table = pd.read_csv(os.path.join(out_dir, "tables", "digits_dense-300-100_final_table.csv"))
  label = dict(zip(study.runs["run_dir"], study.runs["epochs"].map(
      lambda v: "epochs=6" if v == 6 else "epochs=None")))
  epochs = dict(zip(table["label"], table["epoch"]))
  assert epochs[label[by_epochs]] == pytest.approx(6.0)
  assert np.isnan(epochs[label[by_iterations]])


def test_level_count_comes_from_the_runs_metadata_before_the_registry(tmp_path):
  """A run records its level count (metadata.json "levels"); reading it needs no experiment import."""
  hparams = {**load.hparam_defaults(), "experiment": "hydra", "prune_iters": 5, "epochs": 3}
  assert load.expected_prune_iterations(hparams, str(tmp_path)) == 2  # No metadata: the registry.
  level = tmp_path / "trial_0" / "prune_iter_0"
  level.mkdir(parents=True)
  (level / "metadata.json").write_text(json.dumps({"completed": True, "levels": 7}))
  assert load.expected_prune_iterations(hparams, str(tmp_path)) == 7
  (level / "metadata.json").write_text(json.dumps({"completed": True, "levels": "x"}))
  assert load.expected_prune_iterations(hparams, str(tmp_path)) == 2  # Unreadable: the registry.
