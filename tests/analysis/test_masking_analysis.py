"""Gradient-masking checks: made by the runner at the end of a level (`--masking_checks`,
`experiments.masking_checks`), read (or made once) by the analysis (`analysis.masking`).

A tiny study is trained in-process on sklearn_digits: a naturally trained
lottery run evaluated with PGD (2 trials, 2 levels; no checks while training,
so the analysis makes them, as for a run finished before the runner made any)
and an FGSM-trained run at a large eps (checks made by the runner; FGSM
training overfits to its single step: FGSM accuracy far above PGD).
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

from robust_sparse.analysis import load
from robust_sparse.analysis import masking
from robust_sparse.experiments import masking_checks
from robust_sparse.experiments.runner import Runner, assign_weights, level_dir
from robust_sparse.models import build_model
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from tests.conftest import NOISE_RE, REPO, user_env

# Graphs, no XLA compile per level: about the checks, not compilation (the README's quick
# start runs them after the default XLA training).
BASE = dict(dataset="sklearn_digits", model="dense-300-100", trials=2, valid_size=300,
            sharpness_examples=0, compile="graph")
PGD_RUN = dict(BASE, experiment="reinit_orig", prune_iters=1, train_iters=150,
               eval_every=150, attack="pgd", eps=0.1, pgd_step_size=0.025)
FGSM_TRAINED = dict(BASE, experiment="train", trials=1, train_iters=150, eval_every=150,
                    attack="fgsm", eps=0.3, pgd_step_size=0.05, adv_train=True)
EXAMPLES = 200
STORED = (masking_checks.RESULTS_FILE, masking_checks.EXAMPLES_FILE)


def _stored_levels(run_dir):
  """[(trial, level)] whose folder holds the runner's check files."""
  return sorted((trial, level) for trial in range(2) for level in range(2)
                if all(os.path.exists(os.path.join(level_dir(run_dir, trial, level), name))
                       for name in STORED))


@pytest.fixture(scope="module")
def study(digits, tmp_path_factory):
  """(base folder, {run: levels holding checks right after training})."""
  base_dir = str(tmp_path_factory.mktemp("masking_study"))
  after_training = {}
  for name, hparams in (("pgd", PGD_RUN), ("fgsm", FGSM_TRAINED)):
    run_dir = Runner(Hparams(**hparams, masking_examples=EXAMPLES), digits, base_dir,
                     progress=False).run()
    after_training[name] = _stored_levels(run_dir)
  return base_dir, after_training


@pytest.fixture(scope="module")
def study_dir(study):
  return study[0]


@pytest.fixture(scope="module")
def table(study_dir):
  """The first analysis: the PGD run's checks are made here (and stored)."""
  return masking.check_study(load.load_study(study_dir), masking.Options(), study_dir)


def _row(table, experiment):
  rows = table[table["label"].str.contains(f"/ {experiment} /")]
  assert len(rows) == 1, table
  return rows.iloc[0]


def _final_model(run_dir, trial, level, digits):
  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  assign_weights(model, files.load_arrays(
      os.path.join(level_dir(run_dir, trial, level), "weights_final.npz")))
  return model


def test_the_runner_keeps_checks_of_adversarially_trained_runs_only(study):
  _, after_training = study
  assert after_training == {"pgd": [], "fgsm": [(0, 0)]}


QUICK = dict(BASE, experiment="train", trials=1, train_iters=10, eval_every=10,
             attack="pgd", pgd_steps=2, masking_examples=30)


def test_the_flag_turns_them_off_for_adversarial_training_and_moves_no_folder(digits,
                                                                             tmp_path):
  adversarial = Runner(Hparams(**QUICK, adv_train=True, masking_checks=False), digits,
                       str(tmp_path), progress=False).run()
  assert _stored_levels(adversarial) == []
  for fields in (PGD_RUN, FGSM_TRAINED):
    assert (Hparams(**fields, masking_checks=not fields.get("adv_train", False),
                    masking_examples=7).run_dir("b") == Hparams(**fields).run_dir("b"))
  with pytest.raises(ValueError, match="--masking_checks .*--attack=none"):
    Runner(Hparams(**dict(QUICK, attack="none"), masking_checks=True), digits, str(tmp_path))


def test_stored_checks_are_what_the_checks_compute_on_the_final_weights(study_dir, digits):
  run_dir = Hparams(**FGSM_TRAINED).run_dir(study_dir)
  directory = level_dir(run_dir, 0, 0)
  stored = files.read_json(os.path.join(directory, masking_checks.RESULTS_FILE))
  arrays = masking_checks.load_examples(directory)
  assert stored["examples"] == EXAMPLES and stored["seed"] == 0
  assert (stored["eps"], stored["step_size"], stored["steps"]) == (0.3, 0.05, 10)
  x, y = masking_checks.test_images(digits, EXAMPLES)
  model = _final_model(run_dir, 0, 0, digits)
  budget = masking_checks.Budget(eps=0.3, step_size=0.05, steps=10)
  # The in-memory computation the analysis made before the runner kept the checks.
  [direct] = masking_checks.evaluate_trials(lambda _: model, 1, x, y, budget)
  assert {name: direct[name] for name in stored["accuracies"]} == stored["accuracies"]
  accuracies, direct_arrays = masking_checks.attack_network(model, x, y, budget, seed=0,
                                                            trial=0)
  assert accuracies == stored["accuracies"]
  for name, array in direct_arrays.items():
    np.testing.assert_array_equal(arrays[name], array)
  assert arrays["adversarial"].shape == (EXAMPLES, *digits.input_shape)
  assert np.abs(arrays["adversarial"] - x).max() <= 0.3 + 1e-6


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
  # The PGD run's checks were made by the analysis with the run's --masking_examples.
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


def test_a_run_without_stored_checks_gets_them_made_once_and_stored(table, study_dir, digits,
                                                                     monkeypatch):
  run_dir = Hparams(**PGD_RUN).run_dir(study_dir)
  # The checked level only (the last one), both trials, and the transfer cache.
  assert _stored_levels(run_dir) == [(0, 1), (1, 1)]
  for trial in range(2):
    cache = files.read_json(os.path.join(level_dir(run_dir, trial, 1),
                                         masking_checks.TRANSFER_FILE))
    assert list(cache) == [str(1 - trial)]
  # The numbers are those of the in-memory computation on both trials' final weights.
  x, y = masking_checks.test_images(digits, EXAMPLES)
  model = _final_model(run_dir, 0, 1, digits)

  def model_of(trial):
    assign_weights(model, files.load_arrays(
        os.path.join(level_dir(run_dir, trial, 1), "weights_final.npz")))
    return model

  direct = masking_checks.evaluate_trials(model_of, 2, x, y,
                                          masking_checks.Budget(0.1, 0.025, 10))
  natural = _row(table, "reinit_orig")
  for name in masking.MEASURES:
    assert natural[f"acc_{name}"] == pytest.approx(np.mean([r[name] for r in direct]),
                                                   abs=1e-12), name

  # A second analysis reads everything: no attack, no forward pass.
  def never(*args, **kwargs):
    raise AssertionError("the analysis attacked again")

  monkeypatch.setattr(masking_checks, "attack_network", never)
  monkeypatch.setattr(masking_checks, "transfer_accuracy", never)
  again = masking.check_study(load.load_study(study_dir), masking.Options(), study_dir)
  pd.testing.assert_frame_equal(again, table)


def test_the_analysis_shows_the_stored_numbers(table, study_dir, tmp_path, monkeypatch):
  copy = str(tmp_path / "fgsm_run")
  shutil.copytree(Hparams(**FGSM_TRAINED).run_dir(study_dir), copy)
  path = os.path.join(level_dir(copy, 0, 0), masking_checks.RESULTS_FILE)
  stored = files.read_json(path)
  stored["accuracies"] = dict(clean=0.987654, fgsm=0.123456, pgd=0.111111,
                              pgd_strong=0.101010, eps1=0.042)
  files.write_json(path, stored)
  monkeypatch.setattr(masking_checks, "attack_network", None)  # Calling it fails.
  [row] = masking.check_study(load.load_study(str(tmp_path)), masking.Options(),
                              str(tmp_path)).to_dict("records")
  assert {name: row[f"acc_{name}"] for name in stored["accuracies"]} == stored["accuracies"]
  assert row["check_large_eps"] == "pass"  # 4.2 % <= 5 %.
  assert row["examples"] == EXAMPLES
  original = _row(table, "train")
  assert original["acc_fgsm"] != 0.123456


def test_checks_of_another_number_of_images_are_made_again_and_replace_them(study_dir,
                                                                            tmp_path):
  copy = str(tmp_path / "fgsm_run")
  shutil.copytree(Hparams(**FGSM_TRAINED).run_dir(study_dir), copy)
  frame = masking.check_study(load.load_study(str(tmp_path)), masking.Options(examples=40),
                              str(tmp_path))
  assert frame["examples"].tolist() == [40]
  stored = files.read_json(os.path.join(level_dir(copy, 0, 0), masking_checks.RESULTS_FILE))
  assert stored["examples"] == 40


def test_stored_checks_serve_every_request_that_gets_the_same_images(tmp_path):
  hp = Hparams(**FGSM_TRAINED)
  directory = str(tmp_path)
  files.save_arrays(os.path.join(directory, masking_checks.EXAMPLES_FILE), {})
  stored = dict(accuracies={}, examples=360, requested_examples=500, seed=0, batch_size=500,
                eps=0.3, step_size=0.05, steps=10, digest="")
  files.write_json(os.path.join(directory, masking_checks.RESULTS_FILE), stored)
  # 500 asked of a test set of 360: any request of 360 or more gets these images.
  for examples in (None, 360, 400, 500, 10000):
    assert masking_checks.load_level(directory, hp, examples) == stored, examples
  for examples in (359, 100):
    assert masking_checks.load_level(directory, hp, examples) is None, examples
  # Other settings than the run's: made again.
  assert masking_checks.load_level(directory, Hparams(**FGSM_TRAINED, seed=1)) is None
  assert masking_checks.load_level(directory, Hparams(**dict(FGSM_TRAINED, eps=0.2))) is None
  files.write_json(os.path.join(directory, masking_checks.RESULTS_FILE),
                   dict(stored, requested_examples=360))
  assert masking_checks.load_level(directory, hp, 360) is not None
  assert masking_checks.load_level(directory, hp, 400) is None  # The test set may be larger.


def test_the_flag_turns_them_on_for_natural_training_and_a_killed_level_redoes_them(
    digits, tmp_path, monkeypatch):
  hp = Hparams(**QUICK, masking_checks=True)
  write_json = files.write_json

  class Killed(Exception):
    pass

  def killed_at_metadata(path, obj):
    if path.endswith("metadata.json"):
      raise Killed(path)
    write_json(path, obj)

  monkeypatch.setattr(files, "write_json", killed_at_metadata)
  runner = Runner(hp, digits, str(tmp_path), progress=False)
  with pytest.raises(Killed):
    runner.run()
  monkeypatch.setattr(files, "write_json", write_json)
  directory = level_dir(hp.run_dir(str(tmp_path)), 0, 0)
  # The checks come before metadata.json: the killed level kept them, unfinished.
  first = files.read_json(os.path.join(directory, masking_checks.RESULTS_FILE))
  assert not os.path.exists(os.path.join(directory, "metadata.json"))
  os.remove(os.path.join(directory, masking_checks.RESULTS_FILE))
  runner.run()  # Resumes from the level's checkpoint (its model: attacks compiled already).
  assert files.read_json(os.path.join(directory, "metadata.json"))["completed"]
  assert files.read_json(os.path.join(directory, masking_checks.RESULTS_FILE)) == first
  assert first["examples"] == 30 and _stored_levels(hp.run_dir(str(tmp_path))) == [(0, 0)]


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

  x, y = masking_checks.test_images(digits, EXAMPLES)
  budget = masking_checks.Budget(eps=0.1, step_size=0.025, steps=10)
  masked, plain = masking_checks.evaluate_trials(model_of, 2, x, y, budget)
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
  """A copy of the PGD run, without stored checks, whose hparams.json says `changes`."""
  shutil.copytree(Hparams(**PGD_RUN).run_dir(study_dir), run_dir,
                  ignore=shutil.ignore_patterns("masking*"))
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


def _run_analysis(base_dir, out_dir, *args):
  """`python -m run_analysis` as a user runs it (TensorFlow's start-up lines not hidden)."""
  return subprocess.run(
      [sys.executable, "-m", "run_analysis", f"--base_dir={base_dir}", f"--out_dir={out_dir}",
       *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
      env=user_env())


def test_run_analysis_makes_missing_checks_once_with_progress_then_reads_them(study_dir,
                                                                              tmp_path):
  # A copy of the FGSM-trained run as a run finished before the runner kept checks.
  base_dir = str(tmp_path / "study")
  run_dir = os.path.join(base_dir, "fgsm_run")
  shutil.copytree(Hparams(**FGSM_TRAINED).run_dir(study_dir), run_dir,
                  ignore=shutil.ignore_patterns("masking*"))
  out_dir = str(tmp_path / "analysis")
  result = _run_analysis(base_dir, out_dir, "--masking_tolerance=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fgsm_run trial 0 prune_iter 0" in result.stderr  # Progress names what it attacks.
  # It imported TensorFlow for the checks, quietly (robust_sparse/core/startup.py).
  assert not NOISE_RE.search(result.stderr), result.stderr[-3000:]
  stored = os.path.join(level_dir(run_dir, 0, 0), masking_checks.RESULTS_FILE)
  modified = os.stat(stored).st_mtime_ns
  frame = pd.read_csv(os.path.join(out_dir, "tables", "gradient_masking.csv"))
  assert len(frame) == 1 and frame["run"].iloc[0] == "fgsm_run"
  assert frame["verdict"].iloc[0] == "suspected"
  assert frame["examples"].iloc[0] == EXAMPLES  # The run's own --masking_examples.
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
  assert f"on the first {EXAMPLES} test images" in report

  again = _run_analysis(base_dir, str(tmp_path / "again"))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "prune_iter 0" not in again.stderr  # Nothing attacked ...
  assert os.stat(stored).st_mtime_ns == modified  # ... nor written.
  pd.testing.assert_frame_equal(
      pd.read_csv(os.path.join(str(tmp_path / "again"), "tables", "gradient_masking.csv")),
      frame)
