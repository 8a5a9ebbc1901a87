"""--distribution=mirrored: 2 replicas on logical CPU devices train what one device trains.

Logical CPU devices must exist before TensorFlow starts its devices, so the
runs are other processes: the single-device and mirrored runs one after
another in one `tests.cli_batch` process (`run_experiments`' own flag parsing
and `main`, TensorFlow started once, its first command making the 2 devices),
the resumed run and the README's example as `python -m run_experiments`
commands. Their saved weights and CSVs are compared here.
"""

import concurrent.futures
import csv
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, child_env, one_line_error, run_cli_batch, run_module

# dense-300-100 (no batch norm), 30 steps of 32 on 512 sklearn digits.
BASE = ["--dataset=sklearn_digits", "--experiment=train", "--trials=1", "--train_iters=30",
        "--eval_every=15", "--batch_size=32", "--train_examples=512", "--sharpness_examples=0",
        "--noprogress", "--nomasking_checks"]
MIRRORED = ["--distribution=mirrored", "--cpu_replicas=2"]
# Natural and SAM runs without an attack: evaluations compile faster.
SAM = ["--attack=none", "--optimizer=sam-sgd", "--learning_rate=0.05"]
RUNS = {
    "natural": ["--attack=none"],
    "natural_mirrored": ["--attack=none", *MIRRORED],
    # Adversarial training with PGD (the README's mirrored example below runs FGSM's).
    # PGD's random start: each replica takes its rows of the global batch's draw.
    "pgd": ["--attack=pgd", "--adv_train", "--pgd_steps=3"],
    "pgd_mirrored": ["--attack=pgd", "--adv_train", "--pgd_steps=3", *MIRRORED],
    "sam": SAM,
    "sam_sync_mirrored": [*SAM, *MIRRORED, "--sam_sync"],
    "sam_per_replica_mirrored": [*SAM, *MIRRORED],
}
TOLERANCE = 1e-5

# Stops a mirrored run after its first evaluation (its checkpoint is written by then).
INTERRUPTED = """
import json, sys
from robust_sparse.core import startup
startup.import_tensorflow()
from robust_sparse.training import distribute
distribute.configure_devices(2)  # Before anything starts TensorFlow's devices.
import keras
from robust_sparse.data import load_dataset
from robust_sparse.experiments.runner import Runner
from robust_sparse.core.hparams import Hparams

class Interrupt(keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    raise SystemExit(3)

hparams = Hparams(**json.loads(sys.argv[1]))
dataset = load_dataset(hparams.dataset, None, hparams.valid_size)
print(Runner(hparams, dataset, sys.argv[2], progress=False, callbacks=[Interrupt()]).run_dir)
Runner(hparams, dataset, sys.argv[2], progress=False, callbacks=[Interrupt()]).run()
"""


def _run(args, base_dir):
  result = run_module("run_experiments", *BASE, *args, f"--base_dir={base_dir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


def _run_folder(base_dir):
  [folder] = glob.glob(os.path.join(base_dir, "*", "*", "*", "*", "*"))
  return folder


def _interrupted_then_resumed(base_dir):
  """(run folder, the checkpoint's iteration when interrupted) of natural_mirrored."""
  hparams = dict(dataset="sklearn_digits", experiment="train", trials=1, train_iters=30,
                 eval_every=15, batch_size=32, train_examples=512, sharpness_examples=0,
                 valid_size=300, attack="none", distribution="mirrored", cpu_replicas=2)
  env = child_env()
  first = subprocess.run([sys.executable, "-c", INTERRUPTED, json.dumps(hparams), base_dir],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert first.returncode == 3, first.stderr[-3000:]
  run_dir = first.stdout.strip().splitlines()[-1]
  level = os.path.join(run_dir, "trial_0", "prune_iter_0")
  checkpoint = np.load(os.path.join(level, "checkpoint.npz"))
  interrupted_at = int(checkpoint["engine/iteration"])
  assert not os.path.exists(os.path.join(level, "weights_final.npz"))
  assert _run(RUNS["natural_mirrored"], base_dir) == run_dir  # Resumes the same folder.
  return run_dir, interrupted_at


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: run folder} of every run of RUNS, plus "resumed" (natural_mirrored
  interrupted after its first evaluation, then run again) and its "interrupted_at",
  and "bad_flags": {argv: (status, stderr)} of BAD_FLAGS."""
  base = str(tmp_path_factory.mktemp("distribute"))
  # A mirrored command first: it makes the logical devices before TensorFlow starts.
  names = sorted(RUNS, key=lambda name: "mirrored" not in name)
  cases = [[*BASE, *RUNS[name], f"--base_dir={os.path.join(base, name)}"] for name in names]
  bad = [["--dataset=sklearn_digits", "--noprogress", "--train_iters=5", *args,
          f"--base_dir={os.path.join(base, 'bad')}"] for args, _ in BAD_FLAGS]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    # Its own process: the first case makes the devices before TensorFlow starts them.
    batch = pool.submit(run_cli_batch, cases + bad, fresh=True)
    resumed = pool.submit(_interrupted_then_resumed, os.path.join(base, "resumed"))
    outcomes = batch.result()
    folders = dict(zip(("resumed", "interrupted_at"), resumed.result()))
  for name, case in zip(names, cases):
    status, stderr = outcomes[tuple(case)]
    assert status == 0, (name, stderr[-3000:])
    folders[name] = _run_folder(os.path.join(base, name))
  folders["bad_flags"] = {tuple(argv[3:-1]): outcomes[tuple(argv)] for argv in bad}
  return folders


def _weights(run_dir):
  path = os.path.join(run_dir, "trial_0", "prune_iter_0", "weights_final.npz")
  with np.load(path) as arrays:
    return {name: arrays[name] for name in arrays.files}


def _rows(run_dir, split):
  with open(os.path.join(run_dir, "trial_0", "prune_iter_0", f"{split}.csv")) as f:
    return list(csv.DictReader(f))


def max_difference(a, b):
  """The largest absolute difference between the final weights of two runs."""
  first, second = _weights(a), _weights(b)
  assert sorted(first) == sorted(second)
  return max(float(np.max(np.abs(first[k] - second[k]))) for k in first)


@pytest.mark.parametrize("single,mirrored", [("natural", "natural_mirrored"),
                                             ("pgd", "pgd_mirrored"),
                                             ("sam", "sam_sync_mirrored")])
def test_two_replicas_train_the_single_device_weights(runs, single, mirrored):
  difference = max_difference(runs[single], runs[mirrored])
  print(f"{mirrored}: max |w_mirrored - w_single| = {difference:.3g}")
  assert difference < TOLERANCE
  assert _weights(runs[single])["hidden_1/kernel"].std() > 0.01  # Trained, not trivial.
  for split in ("train", "valid", "test"):
    first, second = _rows(runs[single], split), _rows(runs[mirrored], split)
    assert [r["iteration"] for r in first] == [r["iteration"] for r in second] == \
        ["0", "15", "30"][-len(first):]
    for a, b in zip(first, second):
      for column in ("loss", "acc", "adv_acc", "nat_loss", "adv_loss", "lr"):
        if a[column] != "nan":
          assert abs(float(a[column]) - float(b[column])) < 1e-4, (split, column, a, b)
        else:
          assert b[column] == "nan"


def test_per_replica_sam_runs_and_differs_from_synchronised(runs):
  """Each replica perturbs with its own shard's gradient (google-research/sam)."""
  difference = max_difference(runs["sam_sync_mirrored"], runs["sam_per_replica_mirrored"])
  assert 1e-4 < difference < 0.1
  assert float(_rows(runs["sam_per_replica_mirrored"], "test")[-1]["acc"]) > 0.3


def test_mirrored_run_resumes_exactly(runs):
  assert runs["interrupted_at"] == 15
  assert max_difference(runs["resumed"], runs["natural_mirrored"]) == 0.0
  for split in ("train", "valid", "test"):
    assert _rows(runs["resumed"], split) == _rows(runs["natural_mirrored"], split)


def test_distribution_flags_name_the_folder_only_when_set(runs):
  hparams = json.load(open(os.path.join(runs["sam_sync_mirrored"], "hparams.json")))
  assert (hparams["distribution"], hparams["cpu_replicas"], hparams["sam_sync"]) == \
      ("mirrored", 2, True)
  assert runs["natural"] != runs["natural_mirrored"]


BAD_FLAGS = [
    (["--distribution=mirrored"], "--distribution=mirrored needs a GPU or --cpu_replicas"),
    ([*MIRRORED, "--batch_size=61"],
     "--batch_size=61 is not divisible by the 2 replicas of --distribution=mirrored"),
    (["--cpu_replicas=2"], "--cpu_replicas=2 needs --distribution=mirrored"),
    (["--sam_sync"], "--sam_sync needs --distribution=mirrored"),
    (["--sync_batch_norm"], "--sync_batch_norm needs --distribution=mirrored"),
    (["--distribution=mirrored", "--cpu_replicas=1"], "--cpu_replicas=1"),
    ([*MIRRORED, "--mixed_precision"], "--mixed_precision is not supported with"),
    ([*MIRRORED, "--measure=saturation"], "--measure=saturation is not supported with"),
    (["--devices=7"], "--devices=7: this machine has"),
    (["--devices=-1"], "--devices=-1: this machine has"),
    (["--distribution=several"], "--distribution"),
]


@pytest.mark.parametrize("args,message", BAD_FLAGS)
def test_bad_distribution_flags_fail_in_one_line(runs, args, message):
  status, stderr = runs["bad_flags"][tuple(args)]
  if args == ["--distribution=mirrored"] and os.path.exists("/proc/driver/nvidia"):
    pytest.skip("a GPU machine: --distribution=mirrored alone may be valid")
  one_line_error(status, stderr, message)


def test_readme_mirrored_example_runs_as_written(tmp_path):
  text = open(os.path.join(REPO, "README.md")).read()
  match = re.search(r"<!-- readme-test: mirrored -->\s*```bash\n(.*?)```", text, re.S)
  assert match, "README has no mirrored example"
  argv = shlex.split(match.group(1).strip())
  assert argv[:3] == ["python", "-m", "run_experiments"] and "--distribution=mirrored" in argv
  env = child_env()
  result = subprocess.run([sys.executable, *argv[1:], "--noprogress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  run_dir = tmp_path / result.stdout.strip().splitlines()[-1]
  assert (run_dir / "trial_0" / "prune_iter_0" / "metadata.json").exists()
