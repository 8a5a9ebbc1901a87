"""Legends and file names: the method first with its own fields, the run folder's hash."""

import os

from robust_sparse.analysis import load
from robust_sparse.analysis import report
from tests import analysis_fixtures as fixtures

DEFAULTS = {"optimizer": "adam", "rho": 0.05, "sparsity": 0.2, "num_samples": 1024,
            "update_freq": 5, "momentum": 0.0, "learning_rate": 0.0012}
SSAM = dict(optimizer="ssamf-sgd", momentum=0.9, rho=0.1, num_samples=16, update_freq=1)


def test_legends_name_the_method_first_with_its_own_fields(tmp_path):
  base = str(tmp_path)
  sgd = fixtures.write_run(base, experiment="train", trials=1, optimizer="sgd", momentum=0.9)
  half = fixtures.write_run(base, experiment="train", trials=1, sparsity=0.5, **SSAM)
  most = fixtures.write_run(base, experiment="train", trials=1, sparsity=0.9, **SSAM)
  sam = fixtures.write_run(base, experiment="train", trials=1, optimizer="sam-sgd",
                           momentum=0.9, rho=0.1)
  study = load.load_study(base, defaults=DEFAULTS)
  labels, _ = report.training_labels(study, list(study.runs["run_dir"]))
  assert labels == {sgd: "sgd", half: "ssamf-sgd, sparsity=0.5",
                    most: "ssamf-sgd, sparsity=0.9", sam: "sam-sgd"}


def test_setting_label_leaves_out_fields_of_other_methods():
  keys = ["momentum", "optimizer", "rho", "sparsity", "update_freq"]
  assert load.setting_label({"optimizer": "sgd", "momentum": 0.9, "rho": 0.05,
                             "sparsity": 0.2, "update_freq": 5}, keys) == "sgd, momentum=0.9"
  assert load.setting_label({"optimizer": "ssamd-adam", "momentum": 0.9, "rho": 0.1,
                             "sparsity": 0.5, "update_freq": 2}, keys) == (
                                 "ssamd-adam, rho=0.1, sparsity=0.5, update_freq=2")
  assert load.setting_label({"optimizer": "sam-sgd", "implicit": True, "update_freq": 2,
                             "momentum": 0.0}, ["optimizer", "update_freq"]) == (
                                 "sam-sgd, update_freq=2")


def test_alike_labels_carry_the_run_folders_hash(tmp_path):
  base = str(tmp_path)
  one = fixtures.write_run(base, experiment="train", trials=1, optimizer="sgd", rho=0.1)
  two = fixtures.write_run(base, experiment="train", trials=1, optimizer="sgd", rho=0.2)
  study = load.load_study(base, defaults=DEFAULTS)
  labels, _ = report.training_labels(study, [one, two])
  hashes = [os.path.basename(d).split("_")[-1] for d in (one, two)]
  # SGD does not read rho: both are "sgd", told apart by their folders' hashes.
  assert labels == {one: f"sgd #{hashes[0]}", two: f"sgd #{hashes[1]}"}
  assert set(study.runs["run_hash"]) == set(hashes)
