"""The protocol-cost benchmark: each protocol's flags are valid, and one protocol times."""

import dataclasses
import json
import subprocess
import sys

import pytest

from benchmarks import bench_protocols
from tests.conftest import REPO


def test_every_protocol_parses_to_hyper_parameters():
  """The flags of every protocol are ones run_experiments accepts (a typo would only show
  on a GPU machine, hours into the benchmark)."""
  code = ("import sys, run_experiments\n"
          "from benchmarks.bench_protocols import PROTOCOLS\n"
          "for p in PROTOCOLS.values():\n"
          "  run_experiments.FLAGS.unparse_flags()\n"
          "  run_experiments.FLAGS(['x', *p.flags, '--experiment=train', '--data_dir=/d'])\n"
          "  hp = run_experiments.hparams_from_flags()\n"
          "  print(p.name, hp.model, hp.batch_size)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.split("\n")
  assert len([line for line in lines if line]) == len(bench_protocols.PROTOCOLS)
  assert "lth_pgd_adv dense-300-100 60" in lines


def test_one_protocol_times_and_the_cost_scales(data_dir):
  result = subprocess.run([sys.executable, "-m", "benchmarks.bench_protocols",
                           f"--data_dir={data_dir}", "--protocols=lth_natural", "--steps=3",
                           "--repeats=1", "--eval_images=50"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1].startswith("protocol cpu costs: lth_natural ")
  [row] = json.loads(lines[-2])
  assert 0 < row["step_seconds"] < 1 and 0 < row["eval_image_seconds"] < 0.1
  protocol = bench_protocols.PROTOCOLS["lth_natural"]
  assert row["cpu_train_hours"] == pytest.approx(
      protocol.runs * protocol.steps_per_run * row["step_seconds"] / 3600)


def test_unknown_protocol_is_a_one_line_error():
  result = subprocess.run([sys.executable, "-m", "benchmarks.bench_protocols",
                           "--data_dir=/nonexistent", "--protocols=lth_natural,bogus"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().startswith("error: unknown --protocols bogus; known: ")


def test_derived_gpu_wall_time_follows_chains_and_spans():
  p = bench_protocols.Protocol("p", "s", (), batch=1024, runs=2, steps_per_run=3600,
                               evals_per_run=0, eval_images=0, chains=2)
  wall = bench_protocols.gpu_wall_hours
  assert wall(p, 1.0, 1) == pytest.approx(2.0)  # Two one-hour runs, one after the other.
  assert wall(p, 1.0, 2) == pytest.approx(1.0)  # Side by side.
  assert wall(p, 1.0, 8) == pytest.approx(1.0 / (4 * 0.9))  # Each on 4 GPUs.
  assert wall(p, 1.0, 64) == pytest.approx(1.0 / (8 * 0.9))  # At most one machine's 8.
  small_batch = dataclasses.replace(p, batch=128)  # Replicas of at least 32 examples.
  assert wall(small_batch, 1.0, 64) == pytest.approx(1.0 / (4 * 0.9))
  tiny = dataclasses.replace(p, mirrored=False, runs=6, chains=3)
  assert wall(tiny, 1.0, 64) == pytest.approx(2.0)  # A chain's two runs in order.
  assert wall(tiny, 1.0, 2) == pytest.approx(3.0)  # Six runs queued on two GPUs.
