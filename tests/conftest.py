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


def run_module(module, *args, timeout=600):
  """Runs `python -m module args` in the repository root; returns the CompletedProcess."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
