"""The whole-job benchmark: without the PyTorch peers it says so and exits 0."""

import glob
import os
import re
import subprocess
import sys

from tests.conftest import REPO

HIDE_PEERS = """
import importlib.machinery, importlib.util, sys
from absl import app
real = importlib.util.find_spec
def find_spec(name, *a):
  if name in {missing}:
    return None
  if name in {present}:  # Found, whether or not this machine has it (never imported here).
    return importlib.machinery.ModuleSpec(name, None)
  return real(name, *a)
importlib.util.find_spec = find_spec
from benchmarks import bench_jobs
sys.argv = ["bench_jobs", "--data_dir=/nonexistent", "--jobs={jobs}", "--noinstall_peers",
            "--peers_dir=/nonexistent/peers"]
app.run(bench_jobs.main)
"""


def _bench(missing, jobs, present=()):
  code = HIDE_PEERS.format(missing=missing, jobs=jobs, present=present)
  return subprocess.run([sys.executable, "-c", code],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_without_torch_the_benchmark_says_so_and_exits_0():
  result = _bench(("torch", "torchattacks"), "adversarial,natural")
  assert result.returncode == 0, result.stderr
  assert "need torch and torchattacks, not installed" in result.stdout
  assert "never into requirements.txt or this environment" in result.stdout
  assert "pip install --no-deps --target /nonexistent/peers torchattacks==3.5.1" in result.stdout


def test_the_benchmark_and_its_peers_never_import_tensorflow():
  """Each side's start-up is its own: the timing process and the peers stay light."""
  code = ("import sys, benchmarks.bench_jobs; "
          "print(sorted(m for m in ('tensorflow', 'keras', 'torch') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"
  for path in glob.glob(os.path.join(REPO, "benchmarks", "peers", "*.py")):
    source = open(path).read()
    assert not re.search(r"^\s*(import|from) (tensorflow|keras)\b", source, re.M), path


def test_only_the_jobs_asked_for_need_their_peer():
  result = _bench(("torchattacks",), "adversarial", present=("torch",))
  assert result.returncode == 0 and "need torchattacks," in result.stdout, result.stdout


def test_unknown_job_is_a_one_line_error():
  result = _bench((), "adversarial,bogus")
  assert result.returncode == 1
  assert result.stderr.strip() == "error: unknown --jobs bogus; known: adversarial, natural"
