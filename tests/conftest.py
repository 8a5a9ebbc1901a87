"""Shared test helpers: the repository root, the real-data folder and the CLI runner."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir():
  """The folder with the official MNIST / Fashion-MNIST / CIFAR-10 files.

  Taken from $ROBUST_SPARSE_DATA_DIR, else the workspace's shared copy. Tests
  that need real data fail (not skip) when it is absent.
  """
  candidates = [os.environ.get("ROBUST_SPARSE_DATA_DIR"),
                os.path.join(REPO, "..", "shared", "data"), "/work/shared/data"]
  for candidate in candidates:
    if candidate and os.path.isdir(os.path.join(candidate, "mnist")):
      return os.path.abspath(candidate)
  pytest.fail("real data not found: set ROBUST_SPARSE_DATA_DIR to a folder holding mnist/")


@pytest.fixture(scope="session")
def digits():
  """sklearn's embedded 8x8 digits with 300 validation images (needs no data folder)."""
  from robust_sparse.data import load_dataset  # pylint: disable=import-outside-toplevel
  return load_dataset("sklearn_digits", None, 300)


def run_module(module, *args, timeout=600):
  """Runs `python -m module args` in the repository root; returns the CompletedProcess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def run_cli_batch(cases, timeout=900):
  """{tuple(argv): (status, stderr)} of `run_experiments` for each argv, in one process.

  See `tests/cli_batch.py`: the same parsing and `main` as the command line,
  TensorFlow imported once.
  """
  import json
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-m", "tests.cli_batch"], cwd=REPO, env=env,
                          input=json.dumps([list(c) for c in cases]), capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return {tuple(case): tuple(outcome)
          for case, outcome in zip(cases, json.loads(result.stdout))}


def one_line_error(status, stderr, message):
  """Asserts a non-zero status and exactly one error line, naming `message`."""
  assert status != 0
  assert "Traceback" not in stderr, stderr[-2000:]
  errors = [line for line in stderr.splitlines()
            if line.startswith(("error:", "FATAL Flags parsing error"))]
  assert len(errors) == 1 and message in errors[0], stderr[-1000:]
