"""Benchmark: two whole jobs, ours against the same work written in PyTorch, start-up included.

Each job is timed as the wall time of its own process, from launch to exit
(imports, data, compilation, training, evaluation, teardown), ours and the
PyTorch peer back to back in every round (`timing.interleaved_seconds`), so a
busy machine slows both alike; the ratio is the median of the rounds' ratios.

- adversarial: PGD-10 adversarial training of dense-300-100 on MNIST, 1000
  iterations of batch 60, Adam lr 0.0012, label smoothing 0.1, PGD eps 0.3,
  step 0.05, 10 steps from a random start, loss half clean, half adversarial;
  natural and PGD evaluation of the validation (first 10000 training images)
  and test sets before and after training. Peer: `benchmarks/peers/
  torch_adv_job.py` (eager PyTorch, `torchattacks.PGD`). Target: ratio <= 0.8.
- natural: the natural seed job, 5000 iterations, natural and FGSM (eps 0.3)
  evaluation of validation and test before and after. Peer: `benchmarks/peers/
  torch_natural_job.py` (eager PyTorch, FGSM in torch). Target: ratio <= 0.5.

torch and torchattacks are the peers' only, never the toolkit's requirements:
the benchmark installs what is missing into a folder of its own (`--peers_dir`,
`benchmarks/peers/install.py`), which only the peers' processes see.

  python -m benchmarks.bench_jobs --data_dir=DIR [--repeats=3] [--jobs=adversarial]

Where they cannot be installed (or with `--noinstall_peers`) it says so and
exits 0. `--baseline_dir=CHECKOUT`
also times our job from another checkout of this repository (before/after a
change), in the same rounds. The last line:
`jobs ours/pytorch wall time: adversarial R1 (target <= 0.8), natural R2 (target <= 0.5)`.

Each job's line also gives the median CPU time (user + system) of each side
and the machine's load. Run it on an otherwise idle machine: PyTorch's OpenMP
threads spin while they wait for each other, so when other processes hold
the cores the peers slow down many times more than TensorFlow's thread pool
(on this 2-core machine at load 3 to 7: PyTorch + torchattacks 180 s against
23 s idle), and the ratios flatter us; the benchmark warns when the load
exceeds the cores.

Where our adversarial job's time goes (2-core CPU, quiet, timers around the
engine's calls): TensorFlow + Keras import 1.8-1.9 s, data and model 0.4-0.6 s,
`Engine.warm_up` 1.7-1.9 s (tracing, then XLA compiling the training step in
1.1 s while the evaluation compiles in 0.7 s), four evaluations of 0.7 s,
1000 training steps 7.7-8.5 s. A PGD-10 step of batch 60 is as fast as the
same step written by hand in Keras and compiled by XLA (8.2-8.8 ms): the time
is the small matmuls, which run at 100-110 GFLOP/s on two threads (155 at
batch 600), and training keeps 1.6 of the 2 cores busy. The natural job:
import as above, set-up 0.4-0.7 s, warm-up 1.1-1.2 s, 5000 steps at 0.68-0.71
ms (3.4-3.6 s), evaluations 0.1 s each. Half of the PyTorch natural job
(11.2-15.9 s measured) is 5.6-8 s; our import and training compute alone
take 5.3 s.

Not a test: timings depend on the machine; only the ratios are meaningful.
"""

import csv
import dataclasses
import glob
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Tuple

from absl import app, flags

from benchmarks.peers import install
from benchmarks.timing import interleaved_seconds, round_ratios

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("data_dir", None, "folder with mnist/ (the official IDX .gz files)")
flags.DEFINE_list("jobs", ["adversarial", "natural"], "jobs to time: adversarial, natural")
flags.DEFINE_integer("repeats", 3, "timed rounds per job")
flags.DEFINE_integer("warmup", 1, "untimed rounds per job first (page cache, .pyc files)")
flags.DEFINE_string("baseline_dir", None, "another checkout of this repository whose "
                    "run_experiments is timed too (ours before a change)")
flags.DEFINE_string("peers_dir", install.DEFAULT_FOLDER, "folder the peers' torch and "
                    "torchattacks are installed into (never this environment)")
flags.DEFINE_bool("install_peers", True, "install missing peer packages into --peers_dir")
flags.mark_flag_as_required("data_dir")
FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Job:
  """One job: our command's flags, the peer module and the modules it needs."""
  name: str
  ours: Tuple[str, ...]
  peer: str
  peer_needs: Tuple[str, ...]
  target: float


COMMON = ("--dataset=digits", "--model=dense-300-100", "--experiment=train", "--trials=1",
          "--batch_size=60", "--optimizer=adam", "--learning_rate=0.0012",
          "--label_smoothing=0.1", "--eps=0.3", "--sharpness_examples=0", "--noprogress")
JOBS = {
    "adversarial": Job(
        "adversarial", COMMON + ("--train_iters=1000", "--eval_every=1000", "--attack=pgd",
                                 "--pgd_steps=10", "--pgd_step_size=0.05", "--adv_train",
                                 "--adv_mix=0.5"),
        "benchmarks.peers.torch_adv_job", ("torch", "torchattacks"), 0.8),
    "natural": Job(
        "natural", COMMON + ("--train_iters=5000", "--eval_every=5000", "--attack=fgsm"),
        "benchmarks.peers.torch_natural_job", ("torch",), 0.5),
}


def _run(command, cwd, cpu, env=None):
  """Runs `command`; appends its CPU seconds to `cpu`; returns its stdout, or ends the
  benchmark with its stderr."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if result.returncode != 0:
    sys.exit(f"error: {' '.join(command)} failed ({result.returncode}):\n"
             f"{result.stderr[-3000:]}")
  cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
  return result.stdout


def _ours(job, checkout, finals, cpu):
  """Runs our job from `checkout` in a fresh run folder; records its final test row."""

  def run():
    base = tempfile.mkdtemp(prefix="bench_jobs_")
    try:
      _run([sys.executable, "-m", "run_experiments", f"--data_dir={FLAGS.data_dir}",
            f"--base_dir={base}", *job.ours], checkout, cpu)
      [path] = glob.glob(os.path.join(base, "**", "trial_0", "prune_iter_0", "test.csv"),
                         recursive=True)
      with open(path) as f:
        last = list(csv.DictReader(f))[-1]
      finals.append((float(last["acc"]), float(last["adv_acc"])))
    finally:
      shutil.rmtree(base, ignore_errors=True)

  return run


def _peer(job, finals, cpu, env):

  def run():
    out = _run([sys.executable, "-m", job.peer, f"--data_dir={FLAGS.data_dir}"], REPO, cpu, env)
    match = re.search(r"after test: .*?\bacc ([\d.]+) .*?adv_acc ([\d.]+)", out)
    finals.append((float(match.group(1)), float(match.group(2))))

  return run


def time_job(job, env):
  """Times one job; prints its line; returns the median ratio ours / PyTorch."""
  names = ["ours", "pytorch"] + (["baseline"] if FLAGS.baseline_dir else [])
  finals = {name: [] for name in names}
  cpu = {name: [] for name in names}
  candidates = {"ours": _ours(job, REPO, finals["ours"], cpu["ours"]),
                "pytorch": _peer(job, finals["pytorch"], cpu["pytorch"], env)}
  if FLAGS.baseline_dir:
    candidates["baseline"] = _ours(job, FLAGS.baseline_dir, finals["baseline"],
                                   cpu["baseline"])
  load_before = os.getloadavg()[0]
  times = interleaved_seconds(candidates, warmup=FLAGS.warmup, repeats=FLAGS.repeats)
  load_after = os.getloadavg()[0]
  ratios, ratio = round_ratios(times, "ours", "pytorch")
  median = {name: statistics.median(t) for name, t in times.items()}
  work = {name: statistics.median(c[FLAGS.warmup:]) for name, c in cpu.items()}
  (acc, adv), (peer_acc, peer_adv) = finals["ours"][-1], finals["pytorch"][-1]
  print(f"{job.name}: ours {median['ours']:.2f} s (cpu {work['ours']:.1f} s), pytorch "
        f"{median['pytorch']:.2f} s (cpu {work['pytorch']:.1f} s), ratio {ratio:.2f} (rounds "
        f"{' '.join(f'{r:.2f}' for r in ratios)}); final test acc {acc:.4f} / {peer_acc:.4f}, "
        f"adv_acc {adv:.4f} / {peer_adv:.4f}; load {load_before:.1f} -> {load_after:.1f}",
        flush=True)
  if max(load_before, load_after) > os.cpu_count():
    print(f"warning: load above the {os.cpu_count()} cores: the ratio flatters us (see the "
          "module docstring)", flush=True)
  if FLAGS.baseline_dir:
    base_ratios, base_ratio = round_ratios(times, "ours", "baseline")
    print(f"{job.name}: baseline {median['baseline']:.2f} s (cpu {work['baseline']:.1f} s), "
          f"ours/baseline {base_ratio:.2f} (rounds {' '.join(f'{r:.2f}' for r in base_ratios)})",
          flush=True)
  return ratio


def main(argv):
  del argv
  unknown = [name for name in FLAGS.jobs if name not in JOBS]
  if unknown:
    print(f"error: unknown --jobs {', '.join(unknown)}; known: {', '.join(JOBS)}",
          file=sys.stderr)
    return 1
  env = install.ensure([module for name in FLAGS.jobs for module in JOBS[name].peer_needs],
                       FLAGS.peers_dir, FLAGS.install_peers)
  if env is None:
    return 0
  results = {name: time_job(JOBS[name], env) for name in FLAGS.jobs}
  print("jobs ours/pytorch wall time: " + ", ".join(
      f"{name} {ratio:.2f} (target <= {JOBS[name].target})" for name, ratio in results.items()))
  return 0


if __name__ == "__main__":
  app.run(main)
