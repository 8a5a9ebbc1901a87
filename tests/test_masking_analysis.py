"""Gradient-masking checks (`analysis.masking`, `run_analysis --masking_checks`).

A tiny study is trained in-process on sklearn_digits: a naturally trained
lottery run evaluated with PGD (2 trials, 2 levels) and an FGSM-trained run at
a large eps (FGSM training overfits to its single step: FGSM accuracy far
above PGD).
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest

from analysis import load
from analysis import masking
from experiments.runner import Runner, assign_weights, level_dir
from models import build_model
from robust_sparse import files
from robust_sparse.hparams import Hparams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = dict(dataset="sklearn_digits", model="dense-300-100", trials=2, valid_size=300,
            sharpness_examples=0)
PGD_RUN = dict(BASE, experiment="reinit_orig", prune_iters=1, train_iters=150,
               eval_every=150, attack="pgd", eps=0.1, pgd_step_size=0.025)
FGSM_TRAINED = dict(BASE, experiment="train", trials=1, train_iters=150, eval_every=150,
                    attack="fgsm", eps=0.3, pgd_step_size=0.05, adv_train=True)
EXAMPLES = 200


@pytest.fixture(scope="module")
def study_dir(digits, tmp_path_factory):
  base_dir = str(tmp_path_factory.mktemp("masking_study"))
  for hparams in (PGD_RUN, FGSM_TRAINED):
    Runner(Hparams(**hparams), digits, base_dir, progress=False).run()
  return base_dir


@pytest.fixture(scope="module")
def table(study_dir):
  return masking.check_study(load.load_study(study_dir), masking.Options(examples=EXAMPLES),
                             study_dir)


def _row(table, experiment):
  rows = table[table["label"].str.contains(f"/ {experiment} /")]
  assert len(rows) == 1, table
  return rows.iloc[0]


def test_one_row_per_attacked_run_with_accuracies_and_verdicts(table):
  assert len(table) == 2
  assert list(table.columns) == masking._CSV_COLUMNS  # pylint: disable=protected-access
  accuracies = table[[f"acc_{name}" for name in masking.MEASURES]].to_numpy(float)
  one_trial = table["trials"].to_numpy() == 1
  assert np.isnan(accuracies[one_trial, -1]).all()  # No transfer attack with one trial.
  accuracies = np.concatenate([accuracies[:, :-1].ravel(), accuracies[~one_trial, -1]])
  assert ((accuracies >= 0) & (accuracies <= 1)).all()  # NaN fails too.
  verdicts = table[[f"check_{name}" for name in masking.CHECKS] + ["verdict"]]
  assert set(verdicts.to_numpy().ravel()) <= {"pass", "suspected", "n/a"}
  assert (table["examples"] == EXAMPLES).all()

  natural = _row(table, "reinit_orig")
  assert natural["trials"] == 2
  assert natural["prune_iteration"] == 1  # The last level, not the dense one.
  assert natural["percent_weights_remaining"] < 100
  assert natural["acc_pgd"] <= natural["acc_fgsm"]
  assert natural["acc_pgd_strong"] <= natural["acc_pgd"] + 0.01
  assert natural["acc_eps1"] <= 0.01
  assert natural["acc_pgd"] < natural["acc_clean"]
  assert natural["check_fgsm_not_overstated"] == "n/a"  # Naturally trained.
  assert natural["verdict"] == "pass", natural.to_dict()


def test_fgsm_trained_run_is_suspected_of_overstated_fgsm_robustness(table):
  fgsm = _row(table, "train")
  assert fgsm["acc_fgsm"] > 2 * fgsm["acc_pgd"] + 0.05, fgsm.to_dict()
  assert fgsm["check_pgd_vs_fgsm"] == "pass"  # PGD is the stronger attack ...
  assert fgsm["check_fgsm_not_overstated"] == "suspected"  # ... by far.
  assert fgsm["verdict"] == "suspected"
  assert fgsm["check_transfer"] == "n/a" and "one trial" in fgsm["note"]


def test_run_checks_and_levels_follow_their_definitions():
  honest = dict(clean=0.9, fgsm=0.5, pgd=0.4, pgd_strong=0.39, eps1=0.0, transfer=0.6)
  assert set(masking.run_checks(honest, adversarially_trained=True).values()) == {"pass"}
  checks = masking.run_checks(dict(honest, pgd=0.52, pgd_strong=0.6, eps1=0.2, transfer=0.4))
  assert checks == {"pgd_vs_fgsm": "suspected", "more_steps": "suspected",
                    "large_eps": "suspected", "transfer": "suspected",
                    "fgsm_not_overstated": "n/a"}
  within = masking.run_checks(dict(honest, pgd=0.509, transfer=0.499), tolerance=0.01)
  assert within["pgd_vs_fgsm"] == within["transfer"] == "pass"
  one_trial = masking.run_checks(dict(honest, transfer=float("nan")))
  assert one_trial["transfer"] == "n/a"
  assert masking.overall_verdict(one_trial) == "pass"
  assert masking.overall_verdict(checks) == "suspected"
  levels = {0: [0, 1, 2], 1: [0, 1]}  # Trial 1 has not finished level 2.
  assert masking.chosen_levels(levels, all_levels=False) == {1: [0, 1]}
  assert masking.chosen_levels(levels, all_levels=True) == {0: [0, 1], 1: [0, 1], 2: [0]}


class _Scale(keras.layers.Layer):
  """Multiplies the logits by a variable: 1 leaves the model as it is, 1000 masks it."""

  def build(self, input_shape):
    self.scale = self.add_weight(name="scale", shape=(), initializer="ones", trainable=False)

  def call(self, inputs):
    return inputs * self.scale


def test_a_gradient_masked_model_is_flagged(study_dir, digits):
  # Logits scaled by 1000 saturate the softmax: the cross-entropy gradient of
  # every confidently classified image is exactly zero, so FGSM and PGD barely
  # move, while examples crafted on the same network unscaled still fool it.
  run_dir = Hparams(**PGD_RUN).run_dir(study_dir)
  weights = [files.load_arrays(os.path.join(level_dir(run_dir, trial, 1), "weights_final.npz"))
             for trial in range(2)]
  network = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  scale = _Scale()
  model = keras.Sequential([keras.Input(digits.input_shape), network, scale])

  def model_of(trial):  # Trial 0 masked, trial 1 (the transfer source) plain.
    assign_weights(network, weights[trial])
    scale.scale.assign(1000.0 if trial == 0 else 1.0)
    return model

  x, y = masking.test_images(digits, EXAMPLES)
  budget = masking.Budget(eps=0.1, step_size=0.025, steps=10)
  masked, plain = masking.evaluate_trials(model_of, 2, x, y, budget)
  assert masked["transfer_from"] == 1 and plain["transfer_from"] == 0
  assert masked["fgsm"] > masked["clean"] - 0.05  # White-box attacks barely work ...
  assert plain["fgsm"] < plain["clean"] - 0.1
  assert masked["transfer"] < masked["pgd"] - 0.1  # ... than a transfer attack.
  checks = masking.run_checks(masked)
  assert checks["transfer"] == "suspected"
  assert checks["large_eps"] == "suspected"
  assert masking.overall_verdict(checks) == "suspected"
  assert masking.overall_verdict(masking.run_checks(plain)) == "pass"


def _copy_run(study_dir, run_dir, **changes):
  """A copy of the PGD run whose hparams.json says `changes`."""
  shutil.copytree(Hparams(**PGD_RUN).run_dir(study_dir), run_dir)
  path = os.path.join(run_dir, "hparams.json")
  with open(path) as f:
    hparams = json.load(f)
  hparams.update(changes)
  with open(path, "w") as f:
    json.dump(hparams, f)


def test_unloadable_data_gets_a_row_saying_so_and_unattacked_runs_none(study_dir, tmp_path):
  _copy_run(study_dir, str(tmp_path / "mnist_run"), dataset="mnist",
            data_dir=str(tmp_path / "no_such_folder"))
  _copy_run(study_dir, str(tmp_path / "natural_run"), attack="none")
  frame = masking.check_study(load.load_study(str(tmp_path)), masking.Options(), str(tmp_path))
  assert list(frame["run"]) == ["mnist_run"]
  assert "data not loaded" in frame["note"].iloc[0]
  assert "--data_dir" in frame["note"].iloc[0]
  assert frame["verdict"].iloc[0] == ""
  assert "data not loaded" in masking.table_markdown(frame)


def test_run_analysis_writes_the_table_figure_and_report_section(study_dir, tmp_path):
  out_dir = str(tmp_path / "analysis")
  # The runs without pruning levels only: their figures are few.
  result = subprocess.run(
      [sys.executable, "-m", "run_analysis", f"--base_dir={study_dir}", f"--out_dir={out_dir}",
       "--experiment=train", f"--masking_examples={EXAMPLES}", "--masking_tolerance=0.02"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO))
  assert result.returncode == 0, result.stderr[-3000:]
  frame = pd.read_csv(os.path.join(out_dir, "tables", "gradient_masking.csv"))
  assert len(frame) == 1  # The FGSM-trained run.
  assert frame["run"].iloc[0] == os.path.relpath(Hparams(**FGSM_TRAINED).run_dir(study_dir),
                                                 study_dir)
  assert frame["verdict"].iloc[0] == "suspected"
  with open(os.path.join(out_dir, "tables", "gradient_masking.md")) as f:
    markdown = f.read()
  with open(os.path.join(out_dir, "report.md")) as f:
    report = f.read()
  assert "## Gradient-masking checks" in report
  assert markdown in report and "**suspected**" in markdown
  assert "(tables/gradient_masking.csv)" in report
  assert "(figures/gradient_masking.png)" in report
  assert os.path.exists(os.path.join(out_dir, "figures", "gradient_masking.png"))
  assert "at most FGSM accuracy + 2 points" in report  # --masking_tolerance=0.02
