"""Shared test helpers: the repository root, the real-data folder and the CLI runner."""

import atexit
import json
import os
import re
import subprocess
import sys
import tempfile
import threading

import pytest

from robust_sparse.core import startup  # Pure Python: imports no TensorFlow.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU backend at LLVM -O0 in the tests and the processes they start: the suite
# compiles hundreds of small XLA functions and runs each a few steps, so compiling is most
# of their time (tests/attacks and the fidelity checks: 103 s at the default -O3, 69 s at
# -O0; the whole suite 19 min -> under 13). -O0 computes the same operations but rounds
# some differently (a 30-step dense-300-100 run ends within 2e-4 of -O3's weights, where
# -O3 and TensorFlow's graph kernels agree within 2e-7: ReLU units flip). A test that
# compares runs at a tighter tolerance than that runs its process at the users' level
# (`DEFAULT_XLA_ENV`). A user's own XLA_FLAGS win.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
DEFAULT_XLA_ENV = {"XLA_FLAGS": ""}  # XLA's own default level (what users run).
# TensorFlow's start-up lines that robust_sparse/core/startup.py filters: the same lines
# in any process, any time.
NOISE_RE = re.compile(r"absl::InitializeLog|port\.cc:\d+\] oneDNN|cudart_stub\.cc|"
                      r"cuda_platform\.cc:\d+\] failed call to cuInit")


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


def child_env():
  """A child process's environment: this one's, TensorFlow's C++ logs quiet, the checkout
  importable."""
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)


def user_env():
  """A user's terminal: `child_env` without the variables that quiet or unquiet
  TensorFlow's start-up, so a test sees what robust_sparse/core/startup.py leaves."""
  return {k: v for k, v in child_env().items()
          if k not in ("TF_CPP_MIN_LOG_LEVEL", startup.VERBOSE_ENV)}


def run_module(module, *args, timeout=600):
  """Runs `python -m module args` in the repository root; returns the CompletedProcess."""
  env = child_env()
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


class _CliServer:
  """This pytest worker's one `python -m tests.cli_batch --serve` process, started on
  first use and ended with the worker (its stderr in a temporary file)."""

  def __init__(self):
    self.process, self.stderr, self.lock = None, None, threading.Lock()
    atexit.register(self.close)

  def run(self, cases, timeout):
    with self.lock:
      if self.process is None or self.process.poll() is not None:
        env = child_env()
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.cli_batch", "--serve"], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
      timer = threading.Timer(timeout, self.process.kill)
      timer.start()
      try:
        self.process.stdin.write(json.dumps(cases) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
      finally:
        timer.cancel()
      if not line:
        self.process.wait()
        self.stderr.seek(0)
        raise AssertionError(f"tests.cli_batch ended (status {self.process.returncode}):\n"
                             + self.stderr.read()[-3000:])
      return json.loads(line)

  def close(self):
    if self.process is not None and self.process.poll() is None:
      self.process.stdin.close()
      try:
        self.process.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self.process.kill()


_CLI_SERVER = _CliServer()


def run_cli_batch(cases, timeout=900, fresh=False):
  """{tuple(argv): (status, stderr)} of `run_experiments` for each argv.

  See `tests/cli_batch.py`: the same parsing and `main` as the command line, in
  this worker's one shared process (TensorFlow imported once per worker), or with
  `fresh` in a new process of its own (cases that need TensorFlow not yet started).
  """
  cases = [list(c) for c in cases]
  outcomes = run_cli_cases(cases, timeout, fresh)
  return {tuple(case): (status, stderr) for case, (status, stderr, _) in zip(cases, outcomes)}


def run_cli_cases(cases, timeout=900, fresh=False, env=None):
  """[(status, stderr, stdout)] of each case, in order: an argv list, or a dict
  {"argv": [...], "interrupt_after": k} for a run stopped after its k-th evaluation
  as a killed one stops (`tests/cli_batch.py`). `fresh` as in `run_cli_batch`; `env`:
  variables to set in the fresh process (e.g. `DEFAULT_XLA_ENV`)."""
  if env is not None and not fresh:
    raise ValueError("env needs a fresh process")
  if fresh:
    env = dict(child_env(), **(env or {}))
    result = subprocess.run([sys.executable, "-m", "tests.cli_batch"], cwd=REPO, env=env,
                            input=json.dumps(cases), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [tuple(outcome) for outcome in json.loads(result.stdout)]
  return [tuple(outcome) for outcome in _CLI_SERVER.run(cases, timeout)]


def run_cli(*argv, timeout=900):
  """`python -m run_experiments argv` in this worker's shared process (`run_cli_batch`):
  an object with `returncode`, `stdout` and `stderr`, as `run_module` returns. For
  runs whose result a test compares or checks; a process of its own (`run_module`)
  where the test is about the process (killed, resumed across processes, its start)."""
  [(status, stderr, stdout)] = _CLI_SERVER.run([list(argv)], timeout)
  return subprocess.CompletedProcess(["run_experiments", *argv], status, stdout, stderr)


def one_line_error(status, stderr, message):
  """Asserts a non-zero status and exactly one error line, naming `message`."""
  assert status != 0
  assert "Traceback" not in stderr, stderr[-2000:]
  errors = [line for line in stderr.splitlines()
            if line.startswith(("error:", "FATAL Flags parsing error"))]
  assert len(errors) == 1 and message in errors[0], stderr[-1000:]
