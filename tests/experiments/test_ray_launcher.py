"""`--launcher=ray`: trials as Ray tasks write the sequential run's folders and numbers."""

import filecmp
import glob
import json
import os
import signal
import threading
import time

import pytest

from robust_sparse.data import load_dataset
from robust_sparse.experiments import launch
from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.core import claims
from robust_sparse.core.hparams import Hparams
from tests.conftest import NOISE_RE, one_line_error, run_cli_batch

# Two trials on Ray's two CPUs (one of them killed); not about compilation: "graph"
# spares each Ray worker an XLA compile.
HP = dict(dataset="sklearn_digits", valid_size=300, experiment="reinit_orig", trials=2,
          prune_iters=1, train_iters=120, eval_every=40, eps=0.1, sharpness_examples=0,
          compile="graph")


def _kill_one_worker_mid_level(run_dir, killed, stop):
  """Kills (-9) the Ray worker training trial 1's level 1 once it has checkpointed."""
  directory = level_dir(run_dir, 1, 1)
  while not stop.is_set() and not killed:
    info = claims.read_claim(directory)
    if info and os.path.exists(os.path.join(directory, "checkpoint.npz")):
      try:  # The checkpoint is written before the CSVs.
        with open(os.path.join(directory, "train.csv")) as f:
          rows = len(f.read().splitlines())
      except FileNotFoundError:
        rows = 0
      if rows >= 2:  # At least one evaluation after the start.
        os.kill(int(info["pid"]), signal.SIGKILL)
        killed.append(int(info["pid"]))
        return
    time.sleep(0.05)


def test_ray_trials_equal_the_sequential_run_and_a_killed_worker_is_retried(tmp_path, capfd,
                                                                          monkeypatch):
  # Workers started as a user's are (TensorFlow's start-up lines not hidden): what they
  # print reaches this driver (log_to_driver), without those lines.
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
  try:
    launch.start(None, num_cpus=2)
  except ValueError as error:
    pytest.skip(f"Ray cannot start here: {error}")
  digits = load_dataset("sklearn_digits", None, 300)
  hp = Hparams(**HP)
  sequential = Runner(hp, digits, str(tmp_path / "sequential"), progress=False).run()
  parallel_dir = hp.run_dir(str(tmp_path / "ray"))
  killed, stop = [], threading.Event()
  killer = threading.Thread(target=_kill_one_worker_mid_level,
                            args=(parallel_dir, killed, stop))
  killer.start()
  try:
    [folder] = launch.run_trials([(hp, str(tmp_path / "ray"))], max_retries=2)
  finally:
    stop.set()
    killer.join()
  assert folder == parallel_dir
  assert killed, "the worker of trial 1, level 1 was never seen training"
  for trial in range(HP["trials"]):
    for level in range(2):
      ours, theirs = level_dir(parallel_dir, trial, level), level_dir(sequential, trial, level)
      for name in ("train.csv", "valid.csv", "test.csv", "weights_final.npz"):
        assert filecmp.cmp(os.path.join(ours, name), os.path.join(theirs, name),
                           shallow=False), (trial, level, name)
  # The killed level was finished by another worker, from its checkpoint.
  meta = json.load(open(os.path.join(level_dir(parallel_dir, 1, 1), "metadata.json")))
  assert meta["completed"] and meta["worker"]["pid"] != killed[0]
  assert not glob.glob(os.path.join(parallel_dir, "**", claims.CLAIM_FILE), recursive=True)
  launch.import_ray().shutdown()
  printed = capfd.readouterr()
  assert not NOISE_RE.search(printed.out + printed.err), printed.err[-3000:]


def test_bad_launcher_settings_are_one_line_errors(tmp_path):
  common = ["--dataset=sklearn_digits", "--trials=1", "--train_iters=2",
            f"--base_dir={tmp_path}"]
  cases = [
      # Nothing listens on this machine's port 9: refused at once. (A TEST-NET address
      # can look reachable behind a sandbox's proxy, and then Ray retries for 20 s.)
      (["--launcher=ray", "--ray_address=127.0.0.1:9"], "--ray_address=127.0.0.1:9"),
      (["--launcher=slurm"], "--launcher"),
      (["--gpus_per_trial=-1", "--launcher=ray"], "--gpus_per_trial"),
  ]
  outcomes = run_cli_batch([common + args for args, _ in cases])
  for args, message in cases:
    one_line_error(*outcomes[tuple(common + args)], message)
