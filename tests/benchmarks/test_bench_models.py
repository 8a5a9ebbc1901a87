"""bench_models: the PyTorch counterparts equal the zoo's models in trainable parameters,
and the benchmark runs end to end on a tiny setting, its last line in the named format.

torch lives in the peers' folder (`benchmarks/peers/install.py`), never in this
environment: the tests install it there when it is missing and fail, not skip,
when they cannot.
"""

import json
import re
import subprocess
import sys

import pytest

from benchmarks.bench_models import SETTINGS
from benchmarks.peers import install
from tests.conftest import REPO, run_module

SHAPES = {"digits": (28, 28, 1), "cifar10": (32, 32, 3)}
COUNT_TORCH = """
import json, sys
from benchmarks.peers import torch_models
shapes = json.loads(sys.argv[1])
print(json.dumps({name: torch_models.trainable_count(torch_models.build(name, shape, 10))
                  for name, shape in shapes.items()}))
"""


@pytest.fixture(scope="module")
def peers_env():
  env = install.ensure(["torch"])
  assert env is not None, "torch is not in the peers' folder and could not be installed there"
  return env


def test_pytorch_counterparts_have_the_zoo_models_trainable_parameters(peers_env):
  from robust_sparse.models import build_model  # pylint: disable=import-outside-toplevel
  from robust_sparse.models.check_zoo import (  # pylint: disable=import-outside-toplevel
      trainable_count)
  shapes = {name: SHAPES[setting.dataset] for name, setting in SETTINGS.items()}
  result = subprocess.run([sys.executable, "-c", COUNT_TORCH, json.dumps(shapes)], cwd=REPO,
                          env=peers_env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  torch_counts = json.loads(result.stdout)
  keras_counts = {name: trainable_count(build_model(name, shape, 10))
                  for name, shape in shapes.items()}
  assert torch_counts == keras_counts
  assert len(keras_counts) == 7


ROW = re.compile(r"^(\S+) +(engine|fit|pytorch) +(natural|pgd10|sam) +([\d.]+) +([\d.]+) +"
                 r"([\d.]+) +([\d.]+)  (.+)$")


def test_the_benchmark_runs_end_to_end_and_prints_its_last_line(data_dir, peers_env):
  del peers_env  # Installed; the benchmark finds it in the same folder.
  result = run_module("benchmarks.bench_models", f"--data_dir={data_dir}",
                      "--models=dense-300-100,conv-bn", "--steps=1", "--dense_steps=5",
                      "--repeats=1", "--examples=256", "--fit=nojit",
                      "--torch_kinds=natural,sam", timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"models engine/pytorch steps/s: min \d+\.\d\d \((dense-300-100|conv-bn)"
                      r"\), median \d+\.\d\d", lines[-1]), lines[-1]
  rows = [ROW.match(line) for line in lines if ROW.match(line)]
  # Per model: 3 engine kinds, fit, 2 PyTorch kinds under 2 OpenMP wait policies.
  assert len(rows) == 16, result.stdout
  for row in rows:
    assert float(row.group(4)) > 0 and float(row.group(5)) > 0, row.group(0)
  modes = [(r.group(1), r.group(2), r.group(3), r.group(8)) for r in rows]
  assert {mode for model, front_end, kind, mode in modes
          if front_end == "engine"} <= {"graph", "xla_step", "xla_loop"}
  # The faster PyTorch natural row of each model, the ratio's reference.
  assert sorted(model for model, front_end, kind, mode in modes
                if mode.endswith("*")) == ["conv-bn", "dense-300-100"]
  assert all(front_end == "pytorch" and kind == "natural"
             for _, front_end, kind, mode in modes if mode.endswith("*"))
