"""Every run is filed under what it is, and the report shows every kind of run.

Measurement experiments (they attack nothing) live in `{experiment}/measurement/{hash}`;
folders of the earlier layout (`{attack}/natural_{hash}`) stay readable; the
augmented-flatness runs get their own report section, their figure named by the run
folder's hash.
"""

import json
import os

from robust_sparse.analysis import load
from robust_sparse.analysis import report
from robust_sparse.experiments.registry import EXPERIMENTS, Measurement
from robust_sparse.core import hparams as hparams_lib
from robust_sparse.core.hparams import Hparams
from tests import analysis_fixtures as fixtures

from robust_sparse import (  # noqa: F401  pylint: disable=unused-import  (registers every experiment)
    experiments)


def test_measurement_experiments_are_the_registered_measurements():
  registered = {name for name in EXPERIMENTS.names()
                if issubclass(EXPERIMENTS.get(name), Measurement)}
  assert registered == set(hparams_lib.MEASUREMENT_EXPERIMENTS)


def test_measurements_are_filed_under_measurement_with_the_same_hash():
  for experiment in hparams_lib.MEASUREMENT_EXPERIMENTS:
    hp = Hparams(dataset="sklearn_digits", experiment=experiment, pretrained_run="x")
    assert hp.run_dir("base") == os.path.join(
        "base", "sklearn_digits", "dense-300-100", experiment, "measurement", hp.digest())
    assert load.run_hash(hp.run_dir("base")) == hp.digest()
  trained = Hparams(dataset="sklearn_digits", experiment="train", attack="none")
  assert trained.run_dir("base") == os.path.join(
      "base", "sklearn_digits", "dense-300-100", "train", "none", f"natural_{trained.digest()}")
  assert load.run_hash(trained.run_dir("base")) == trained.digest()


def _flatness_run(run_dir, source, key_scale):
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "hparams.json"), "w") as f:
    json.dump({"dataset": "digits", "model": "residual_mlp", "experiment": "augmented_flatness",
               "attack": "fgsm", "adv_train": False, "pretrained_run": source,
               "trials": 1}, f)
  with open(os.path.join(run_dir, "augmented_flatness.csv"), "w") as f:
    f.write("iteration,epoch,batches,examples,samples,accuracy,average/key,"
            "average/L0_preview\n")
    for iteration, epoch in ((0, 0.0), (50, 1.0), (100, 2.0)):
      f.write(f"{iteration},{epoch},4,240,240,0.5,{key_scale * (1 + iteration)},0.25\n")


def test_augmented_flatness_runs_appear_in_the_report_new_and_old_layout(tmp_path):
  base = str(tmp_path / "runs")
  source = fixtures.write_run(base, experiment="train", model="residual_mlp", trials=1)
  new = os.path.join(base, "digits", "residual_mlp", "augmented_flatness", "measurement",
                     "0123456789")
  old = os.path.join(base, "digits", "residual_mlp", "augmented_flatness", "fgsm",
                     "natural_abcdef0123")
  _flatness_run(new, source, 1.0)
  _flatness_run(old, source, 2.0)
  study = load.load_study(base, defaults={"optimizer": "adam"})
  out_dir = str(tmp_path / "analysis")
  path = report.write_analysis(study, out_dir, ["png"], source=base)
  text = open(path).read()
  assert text.count("## digits / residual_mlp: augmented flatness") == 2
  for run_hash, first, last in (("0123456789", "1", "101"), ("abcdef0123", "2", "202")):
    name = f"digits_residual_mlp_augmented_flatness_{run_hash}.png"
    assert f"(figures/{name})" in text
    assert os.path.exists(os.path.join(out_dir, "figures", name))
    # The table's first and last checkpoints: iteration, epoch, accuracy, average key.
    assert f"| 0 | 0.00 | 50.00 | {first} | 0.25 |" in text
    assert f"| 100 | 2.00 | 50.00 | {last} | 0.25 |" in text
