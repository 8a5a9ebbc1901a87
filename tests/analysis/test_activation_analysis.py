"""Tests of the activation-sparsity figures and table (`analysis.activation`).

The study is synthetic (`tests/analysis_fixtures.py`) with the measurement
columns of `--measure=activation_sparsity,effective_gradient_sparsity` added
to every `train.csv` in closed form: 12 layers `block_<i>_act` (so name order,
block_10 before block_2, differs from call order), 2 trials each of three
`train` runs (relu, jsrelu, relu adversarially trained) and of a
reinit_orig / reinit_rand lottery pair with 3 levels, plus a run on another
data set that measured nothing. Expected numbers are read back from the CSVs
with pandas, independently of the analysis' loader.
"""

import glob
import os
import re

import numpy as np
import pandas as pd
import pytest

from robust_sparse.analysis import activation
from robust_sparse.analysis import load
from robust_sparse.analysis import report
from robust_sparse.analysis import tables
from tests import analysis_fixtures as fixtures

LAYERS = tuple(f"block_{i}_act" for i in range(12))
DEFAULTS = {"prune_iters": 20, "trials": 10, "data_dir": None}
# Activation sparsity offset of each run: tells the variants apart.
OFFSETS = {("train", "relu", False): 0.0, ("train", "jsrelu", False): 0.2,
           ("train", "relu", True): 0.1, ("reinit_orig", "relu", False): 0.0,
           ("reinit_rand", "relu", False): 0.0}


def _sparsity(layer, iteration, trial, level, offset):
  return (0.2 + 0.02 * layer + 0.1 * iteration / fixtures.TRAIN_ITERS + 0.01 * trial
          - 0.03 * level * (1 + iteration / fixtures.TRAIN_ITERS) + offset)


def _add_measurements(run_dir, offset):
  """Appends the activation columns, in call order, to every train.csv of a run."""
  for path in glob.glob(os.path.join(run_dir, "trial_*", "prune_iter_*", "train.csv")):
    trial = int(re.search(r"trial_(\d+)", path).group(1))
    level = int(re.search(r"prune_iter_(\d+)", path).group(1))
    table = pd.read_csv(path)
    columns = {}
    for prefix, shift in ((activation.TRAIN_PREFIX, 0.0), (activation.TEST_PREFIX, 0.005)):
      values = [_sparsity(i, table["iteration"], trial, level, offset) + shift
                for i in range(len(LAYERS))]
      columns.update({prefix + name: value for name, value in zip(LAYERS, values)})
      columns[prefix + activation.AVERAGE] = sum(values) / len(values)
    columns[activation.GRADIENT_COLUMN] = columns[activation.TRAIN_PREFIX + "average"] + 0.003
    pd.concat([table, pd.DataFrame(columns)], axis=1).to_csv(path, index=False)
  fixtures.rerecord(run_dir)  # As a run that measured them recorded its logs.


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  base_dir = str(tmp_path_factory.mktemp("activation_study"))
  for (experiment, function, adv_train), offset in OFFSETS.items():
    run_dir = fixtures.write_run(base_dir, experiment=experiment, adv_train=adv_train,
                                 trials=2, prune_iters=2, activation=function)
    _add_measurements(run_dir, offset)
  fixtures.write_run(base_dir, experiment="train", dataset="fashion", trials=2)
  return base_dir


@pytest.fixture(scope="module")
def study(study_dir):
  return load.load_study(study_dir, defaults=DEFAULTS)


@pytest.fixture(scope="module")
def analysis_dir(study, study_dir, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("analysis"))
  report.write_analysis(study, out_dir, ["png"], source=study_dir)
  return out_dir


def _run_dir(study, experiment, function, adv_train):
  runs = study.runs
  return runs.loc[(runs["experiment"] == experiment) & (runs["activation"] == function)
                  & (runs["adv_train"] == adv_train) & (runs["dataset"] == "digits"),
                  "run_dir"].item()


def _last_rows(run_dir, level, split):
  """The last row of `split`.csv of every trial of one level, read with pandas."""
  return pd.DataFrame([
      pd.read_csv(os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}",
                               f"{split}.csv")).iloc[-1] for trial in range(2)])


def test_layers_are_found_and_put_in_call_order(study):
  layers = activation.sparsity_layers(study.evaluations.columns)
  assert sorted(layers) == sorted(LAYERS)
  assert layers != list(LAYERS)  # The study's columns are sorted by name...
  run_dir = _run_dir(study, "train", "relu", False)
  assert activation.layer_order(run_dir, layers) == list(LAYERS)  # ...the CSV's are not.
  # Without a readable header, natural order (block_2 before block_10).
  assert activation.layer_order("/nonexistent", layers) == list(LAYERS)


def test_only_measured_runs_are_measured_rows(study):
  rows = activation.measured_rows(study.evaluations)
  assert set(rows["split"]) == {"train"}
  assert set(rows["dataset"]) == {"digits"}
  assert rows["run_dir"].nunique() == len(OFFSETS)
  unmeasured = study.evaluations[study.evaluations["dataset"] == "fashion"]
  assert activation.measured_rows(unmeasured).empty
  assert activation.measured_rows(unmeasured.drop(
      columns=[c for c in unmeasured.columns if "activation" in c])).empty


def test_report_writes_every_activation_figure_and_table(study, analysis_dir):
  figures_dir = os.path.join(analysis_dir, "figures")
  expected = {"digits_activation_sparsity_comparison.png",
              "digits_dense-300-100_fgsm_activation-relu_activation_sparsity_vs_weights.png"}
  for (experiment, function, adv_train) in OFFSETS:
    run = study.runs.set_index("run_dir").loc[_run_dir(study, experiment, function,
                                                       adv_train)]
    mode = load.training_mode(adv_train)
    expected.add(f"digits_dense-300-100_{experiment}_fgsm_{mode}_{run['run_hash']}"
                 "_activation_sparsity_layers.png")
  found = {name for name in os.listdir(figures_dir) if "activation_sparsity" in name}
  assert found == expected
  for name in found:
    assert os.path.getsize(os.path.join(figures_dir, name)) > 10_000, name
  # The run without measurements gets its usual figures only.
  assert not [n for n in os.listdir(figures_dir) if n.startswith("fashion")
              and "activation" in n]
  assert sorted(n for n in os.listdir(os.path.join(analysis_dir, "tables"))
                if "activation_sparsity" in n) == ["digits_activation_sparsity_table.csv",
                                          "digits_activation_sparsity_table.md"]

  with open(os.path.join(analysis_dir, report.REPORT_FILE)) as f:
    text = f.read()
  assert "## digits / dense-300-100: activation sparsity" in text
  assert "labelled by `activation`, `adv_train`" in text
  for name in expected:
    assert f"(figures/{name})" in text
  assert "(tables/digits_activation_sparsity_table.csv)" in text
  for link in re.findall(r"\]\(([^)]+)\)", text):
    assert os.path.exists(os.path.join(analysis_dir, link)), link


def test_table_numbers_are_the_last_rows_of_the_csvs(study, analysis_dir):
  table = pd.read_csv(os.path.join(analysis_dir, "tables",
                                   "digits_activation_sparsity_table.csv"))
  # Each run is named by where it departs from the most common setting.
  labels = {("train", "relu", False): "activation=relu, adv_train=False",
            ("train", "jsrelu", False): "activation=jsrelu",
            ("train", "relu", True): "adv_train=True",
            # Runs with levels keep their lottery setting.
            ("reinit_orig", "relu", False): "activation=relu",
            ("reinit_rand", "relu", False): "activation=relu"}
  assert len(table) == 3 + 2 * 3  # train runs + lottery runs x levels
  with open(os.path.join(analysis_dir, report.REPORT_FILE)) as f:
    text = f.read()
  for key, label in labels.items():
    run_dir = _run_dir(study, *key)
    for level in range(1 if key[0] == "train" else 3):
      row = table[(table["label"] == label) & (table["experiment"] == key[0])
                  & (table["training_mode"] == load.training_mode(key[2]))
                  & (table["prune_iteration"] == level)]
      assert len(row) == 1, (key, level)
      row = row.iloc[0]
      train, test = _last_rows(run_dir, level, "train"), _last_rows(run_dir, level, "test")
      expected = {
          "activation_sparsity_train": train[activation.TRAIN_PREFIX + "average"],
          "activation_sparsity_test": train[activation.TEST_PREFIX + "average"],
          "effective_gradient_sparsity": train[activation.GRADIENT_COLUMN],
          "test_acc": test["acc"]}
      for name, values in expected.items():
        assert row[f"{name}_mean"] == pytest.approx(100 * values.mean(), rel=1e-5), name
        assert row[f"{name}_std"] == pytest.approx(100 * values.std(ddof=1), rel=1e-4)
        assert row[f"{name}_n"] == 2
      assert row["trials"] == 2 and row["iteration"] == fixtures.TRAIN_ITERS
      assert row["percent_weights_remaining"] == pytest.approx(
          100.0 if key[0] == "train" else fixtures.percent_weights_remaining(level))
      if key == ("train", "jsrelu", False):
        cell = tables.format_cell(100 * expected["activation_sparsity_test"].mean(),
                                  100 * expected["activation_sparsity_test"].std(ddof=1), 2)
        assert f"| {label} | train | natural | 100.0 | 300 | " in text
        assert cell in text
  # Closed form: jsrelu's offset is 0.2 over relu's, the test set 0.005 over training.
  train_rows = table[table["experiment"] == "train"].set_index("label")
  assert (train_rows.at["activation=jsrelu", "activation_sparsity_train_mean"]
          - train_rows.at["activation=relu, adv_train=False",
                          "activation_sparsity_train_mean"]) == pytest.approx(20.0)
  assert (table["activation_sparsity_test_mean"]
          - table["activation_sparsity_train_mean"]).to_numpy() == pytest.approx(0.5)


def test_study_without_measurements_gets_no_activation_output(tmp_path):
  base_dir = str(tmp_path / "runs")
  fixtures.write_run(base_dir, experiment="train", trials=2)
  study = load.load_study(base_dir, defaults=DEFAULTS)
  assert activation.sections(study, str(tmp_path), ["png"], None, None, "tables",
                             report.training_labels) == []
  assert activation.plot_layer_sparsity(study.evaluations.iloc[:0], LAYERS, "") is None
  assert activation.plot_sparsity_comparison(
      study.evaluations.assign(label="x").iloc[:0], ["x"], "") is None
  assert activation.plot_sparsity_vs_weights(study.evaluations.iloc[:0], "") is None


def test_sparsity_vs_weights_draws_one_line_per_experiment_and_mode(study):
  rows = activation.measured_rows(study.evaluations)
  final = activation.final_rows(rows, study.evaluations)
  assert len(final) == 3 * 2 + 2 * 3 * 2  # networks: (run, trial, level)
  figure = activation.plot_sparsity_vs_weights(final, "digits")
  axes = figure.axes
  assert len(axes) == 4  # (training batches, test set) x (natural, adversarial)
  natural_train = axes[0]
  assert natural_train.get_title() == "natural training, training batches"
  lines = {line.get_label(): line for line in natural_train.get_lines()
           if not line.get_label().startswith("_")}
  assert set(lines) == {"original init (ticket)", "random reinit", "plain training"}
  ticket = lines["original init (ticket)"]
  np.testing.assert_allclose(ticket.get_xdata(), [fixtures.percent_weights_remaining(k)
                                                  for k in range(3)])
  # Mean over trials 0 and 1 of the last row: level k loses 6 points.
  expected = [100 * np.mean([_sparsity(i, 300, t, k, 0.0) for i in range(12)
                             for t in range(2)]) for k in range(3)]
  np.testing.assert_allclose(ticket.get_ydata(), expected, rtol=1e-6)
  activation.plt.close(figure)
