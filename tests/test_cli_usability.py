"""What a new user meets on the command line: data folder defaults, offline start, Ctrl-C,
--helpshort, and the run_sh scripts' arguments in any order."""

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from robust_sparse.data import DataError, load_dataset
from robust_sparse.data import registry
from tests.conftest import REPO, child_env

ENV = child_env()


# ---- --data_dir: $ROBUST_SPARSE_DATA_DIR ------------------------------------------------------
def test_data_dir_defaults_to_the_environment(data_dir, monkeypatch):
  monkeypatch.setenv(registry.DATA_DIR_ENV, data_dir)
  from_env = load_dataset("digits", None, 100)
  explicit = load_dataset("digits", data_dir, 100)
  assert (from_env.x_test == explicit.x_test).all() and len(from_env.y_train) == 59900
  # The command line records it in hparams.json (never in the run folder's hash).
  from absl import flags  # pylint: disable=import-outside-toplevel
  from robust_sparse import run_experiments  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["run_experiments", "--dataset=digits"])
    assert run_experiments.hparams_from_flags().data_dir == data_dir
    monkeypatch.delenv(registry.DATA_DIR_ENV)
    assert run_experiments.hparams_from_flags().data_dir is None
  finally:
    flags.FLAGS.unparse_flags()


def test_offline_without_data_fails_in_seconds_naming_data_dir(tmp_path, monkeypatch):
  monkeypatch.delenv(registry.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))  # No local copy.
  monkeypatch.setattr(registry, "DOWNLOAD_CHECK", ("127.0.0.1", 9))  # Nothing listens.
  began = time.time()
  with pytest.raises(DataError) as error:
    load_dataset("fashion")
  assert time.time() - began < 20
  text = str(error.value)
  assert "\n" not in text and "no network" in text and "--data_dir" in text


# ---- Ctrl-C and --helpshort -----------------------------------------------------------------
def test_ctrl_c_prints_one_line_saying_how_to_resume(tmp_path):
  process = subprocess.Popen(
      [sys.executable, "-m", "run_experiments", "--dataset=sklearn_digits", "--trials=1",
       "--experiment=train", "--train_iters=1000000", "--eval_every=200", "--attack=none",
       "--sharpness_examples=0", "--noprogress", f"--base_dir={tmp_path}"],
      cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 240
    # Interrupt once the first evaluation is logged: training is under way.
    while not list(tmp_path.rglob("test.csv")) and time.time() < deadline:
      time.sleep(0.5)
    assert process.poll() is None, process.communicate()[1][-2000:]
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  assert process.returncode == 130, stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  last = [line for line in stderr.splitlines() if line.strip()][-1]
  run_dir = os.path.dirname(os.path.dirname(os.path.dirname(
      str(next(tmp_path.rglob("test.csv"))))))
  assert last == (f"interrupted: run the same command again to resume {run_dir} from its "
                  "last checkpoint")


def test_helpshort_lists_the_main_flags_of_every_experiment():
  result = subprocess.run([sys.executable, "-m", "run_experiments", "--helpshort"], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300)
  shown = result.stdout  # absl's help flags exit with status 1.
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  for flag in ("dataset", "data_dir", "model", "experiment", "attack", "[no]adv_train",
               "trials", "train_iters", "epochs", "prune_iters", "optimizer", "rho",
               "ticket_run", "rewind_iteration", "pretrained_run", "relu_count", "measure",
               "base_dir", "config"):
    assert f"--{flag}:" in shown, flag
  assert "--sam_bn_stats" not in shown  # The rest: --helpfull.


# ---- run_sh: arguments in any order ---------------------------------------------------------
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
echo "output/run_$RANDOM"
"""


def _run_script(tmp_path, name, *args, env_data_dir=None):
  """(status, stderr, the python command lines the script ran), with a fake python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  fake = bin_dir / "python"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  calls = tmp_path / f"calls_{len(list(tmp_path.glob('calls_*')))}.txt"
  env = {k: v for k, v in ENV.items() if k != registry.DATA_DIR_ENV}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", CALLS=str(calls))
  if env_data_dir:
    env[registry.DATA_DIR_ENV] = env_data_dir
  result = subprocess.run(["bash", os.path.join(REPO, "run_sh", name), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
  lines = calls.read_text().splitlines() if calls.exists() else []
  return result.returncode, result.stderr, lines


def test_run_sh_scripts_take_their_flags_in_any_order(tmp_path):
  status, stderr, after = _run_script(tmp_path, "ssam_protocol.sh", "DATA", "--reduced")
  assert status == 0, stderr
  status, stderr, before = _run_script(tmp_path, "ssam_protocol.sh", "--reduced", "DATA")
  assert status == 0, stderr
  assert before == after and len(after) == 8
  assert all("--data_dir=DATA" in line and "--model=conv-bn" in line for line in after[:-1])
  assert all("--dataset=cifar100" in line for line in after[:-1])
  status, _, middle = _run_script(tmp_path, "ssam_protocol.sh", "DATA", "--reduced", "cifar10")
  assert status == 0 and all("--dataset=cifar10 " in line for line in middle[:-1])


def test_run_sh_data_dir_from_the_environment_and_bad_arguments(tmp_path):
  status, stderr, lines = _run_script(tmp_path, "cifar10_resnet18_sgd.sh", "--reduced",
                                      env_data_dir="/data/here")
  assert status == 0, stderr
  assert "--data_dir=/data/here" in lines[0] and "--epochs=2" in lines[0]
  for args, message in ((("--reduced",), "give DATA_DIR"),
                        (("DATA", "--fast"), "unknown option --fast"),
                        (("DATA", "BASE", "extra"), "too many arguments")):
    status, stderr, lines = _run_script(tmp_path, "cifar10_resnet18_sgd.sh", *args)
    assert status == 2 and lines == []
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
  status, stderr, _ = _run_script(tmp_path, "seed_protocol.sh", "DATA", "--reduced")
  assert status == 2 and "unknown option --reduced" in stderr  # It has no reduced form.
