"""Benchmark: the per-step cost of each seed protocol's training step, and its evaluation.

For docs/scaling.md. Each protocol's step is the one its `run_sh/` script runs
(the same flags through `run_experiments`' flag parsing, `Runner.build` and the
runner's engine), timed in a process of its own after compilation: seconds per
training step (median of `--repeats` chunks of `--steps` steps) and seconds
per evaluated image (natural plus the protocol's attack). The full protocol's
compute then follows from its step and image counts (`PROTOCOLS`).

Models too big for this CPU at the protocol's batch (ViT-B/16 at 224 px, batch
4096) run at a small batch (`cpu_batch`), and the per-step cost is scaled by
the batch ratio (compute is linear in the batch at these sizes).

  python -m benchmarks.bench_protocols --data_dir=DIR [--protocols=a,b] [--steps=5]

Prints one line per protocol, then a JSON line with everything, and last:
`protocol cpu costs: NAME S s/step ...`.

Not a test: timings depend on the machine.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Tuple

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
MEASURE_ONE = "--measure_one"  # Internal: a child process timing one protocol.


def _define_flags():
  # Not at import: the measuring child parses run_experiments' flags instead.
  flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/")
  flags.DEFINE_list("protocols", None, "protocols to time (default: all)")
  flags.DEFINE_integer("steps", 5, "training steps per timed chunk (x10 until a chunk "
                       "takes a second)")
  flags.DEFINE_integer("repeats", 3, "timed chunks")
  flags.DEFINE_integer("eval_images", 200, "images per timed evaluation")
  # The GPU columns are derived, from these assumptions unless --gpu_costs gives
  # measured step costs.
  flags.DEFINE_float("gpu_tflops", 50.0, "assumed sustained TFLOP/s of one GPU")
  flags.DEFINE_float("gpu_pass_ms", 0.05, "assumed least milliseconds per forward-pass "
                     "equivalent of a step on a GPU (launch-bound tiny models)")
  flags.DEFINE_float("mirrored_efficiency", 0.9, "assumed speed-up per GPU of one run "
                     "over several GPUs of a machine (--distribution=mirrored)")
  flags.DEFINE_integer("gpus_per_machine", 8, "GPUs one run can span (no multi-worker)")
  flags.DEFINE_string("gpu_costs", None, "JSON file {protocol: seconds per step} measured "
                      "on a GPU, replacing the assumed ones")
  flags.DEFINE_list("gpus", ["1", "8", "64"], "GPU counts of the derived wall times")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One seed protocol: its step's flags and how many steps and evaluated images it holds.

  `runs` × `steps_per_run` training steps at batch `batch`; `evals_per_run`
  evaluations of `eval_images` images each (natural + the protocol's attack).
  """
  name: str
  seed: str
  flags: Tuple[str, ...]
  batch: int
  runs: int
  steps_per_run: int
  evals_per_run: int
  eval_images: int
  cpu_batch: int = 0  # 0: the protocol's batch.
  cpu_eval_images: int = 0  # Images per timed evaluation; 0: --eval_images.
  script: str = ""
  # Forward-pass equivalents per example per step (forward 1, backward 2; an attack
  # step 2: forward and the input gradient; adversarial training on clean + adversarial
  # halves 6): the step's FLOPs are passes x the measured forward FLOPs.
  passes: float = 3.0
  # Independent chains of runs (runs of one chain, e.g. a trial's levels, go in order).
  chains: int = 1
  # Whether one run uses several GPUs well (--distribution=mirrored): not a tiny MLP.
  mirrored: bool = True


DENSE = ("--dataset=digits", "--model=dense-300-100", "--batch_size=60",
         "--sharpness_examples=0")
# robust-sparse-networks: 2 data sets x 3 experiments x 2 attacks x 5 trials x 21 levels of
# 50000 iterations, evaluation (valid 10000 + test 10000) every 500: per training mode.
LTH_RUNS = 2 * 3 * 2 * 5 * 21
CIFAR = ("--dataset=cifar10", "--batch_size=128", "--valid_size=0", "--sharpness_examples=0")
CIFAR_STEPS = 200 * (50000 // 128)
PROTOCOLS = {p.name: p for p in (
    Protocol("lth_natural", "robust-sparse-networks", DENSE + ("--attack=fgsm",), 60,
             LTH_RUNS, 50000, 101, 20000, script="seed_protocol.sh (natural half)",
             chains=LTH_RUNS // 21, mirrored=False),
    Protocol("lth_fgsm_adv", "robust-sparse-networks", DENSE + ("--attack=fgsm", "--adv_train"),
             60, LTH_RUNS // 2, 50000, 101, 20000, script="seed_protocol.sh (FGSM training)",
             passes=1 + 2 + 6, chains=LTH_RUNS // 42, mirrored=False),
    Protocol("lth_pgd_adv", "robust-sparse-networks", DENSE + ("--attack=pgd", "--adv_train"),
             60, LTH_RUNS // 2, 50000, 101, 20000, script="seed_protocol.sh (PGD training)",
             passes=1 + 2 * 10 + 6, chains=LTH_RUNS // 42, mirrored=False),
    Protocol("ssam_sgd", "SSAM", CIFAR + ("--model=resnet18", "--optimizer=sgd",
                                          "--augment=crop,flip,cutout", "--attack=none"),
             128, 1, CIFAR_STEPS, 200, 10000, script="ssam_protocol.sh (SGD run)"),
    Protocol("ssam_sam", "SSAM", CIFAR + ("--model=resnet18", "--optimizer=ssamf-sgd",
                                          "--rho=0.2", "--pattern=unstructured",
                                          "--sparsity=0.5", "--augment=crop,flip,cutout",
                                          "--attack=none"),
             128, 6, CIFAR_STEPS, 200, 10000, script="ssam_protocol.sh (6 SAM/SSAM runs)",
             passes=6, chains=6),
    Protocol("autorep_baseline", "AutoReP", CIFAR + (
        "--model=resnet18_maxpool", "--optimizer=sgd", "--augment=crop,flip", "--attack=pgd",
        "--eps=0.0078431", "--pgd_steps=10", "--pgd_step_size=0.0019608"),
             128, 27, CIFAR_STEPS, 200, 10000,
             script="relu_protocol.sh (baseline + 26 relu_prune runs, each costed as a "
             "training step)", chains=26),
    Protocol("phdlab_saturation", "phd-lab", CIFAR + (
        "--model=resnet18", "--optimizer=sgd", "--augment=crop,flip", "--attack=none",
        "--measure=saturation"), 128, 1, 30 * (50000 // 128), 30, 10000,
             script="one phd-lab configuration, 30 epochs with saturation"),
    Protocol("vit_b16_sparsified", "activation sparsity", (
        "--dataset=cifar10", "--model=vit_b16_sparsified", "--resolution=224", "--valid_size=0",
        "--optimizer=adamw", "--augment=crop,flip", "--attack=fgsm", "--eps=0.0039216",
        "--sharpness_examples=0", "--batch_size=4"), 4096, 2, 300 * (1281167 // 4096), 300,
             50000, cpu_batch=4,
             script="activation_sparsity.sh (vanilla + sparsified ViT-B/16, 300 ImageNet "
             "epochs)", chains=2, cpu_eval_images=8),
)}


def _forward_flops(model, input_shape) -> float:
  """Floating-point operations of one example's forward pass (TensorFlow's profiler)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel,no-name-in-module
  from tensorflow.python.framework import convert_to_constants

  function = tf.function(lambda x: model(x, training=False)).get_concrete_function(
      tf.TensorSpec((1,) + tuple(input_shape), tf.float32))
  frozen = convert_to_constants.convert_variables_to_constants_v2(function)
  options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
  options["output"] = "none"
  return float(tf.compat.v1.profiler.profile(graph=frozen.graph, options=options)
               .total_float_ops)


def measure_one(name, data_dir, steps, repeats, eval_images):
  """Times protocol `name` in this process; prints a JSON line."""
  from robust_sparse.core import startup  # pylint: disable=import-outside-toplevel
  startup.import_tensorflow()
  import numpy as np  # pylint: disable=import-outside-toplevel
  from robust_sparse import run_experiments  # pylint: disable=import-outside-toplevel
  from robust_sparse.data import load_dataset  # pylint: disable=import-outside-toplevel
  from robust_sparse.experiments.runner import Runner  # pylint: disable=import-outside-toplevel

  protocol = PROTOCOLS[name]
  argv = ["run_experiments", *protocol.flags, f"--data_dir={data_dir}",
          "--experiment=train", "--trials=1", "--noprogress",
          f"--train_examples={max(2000, protocol.cpu_batch or protocol.batch) * 4}"]
  if protocol.cpu_batch:
    argv = [a for a in argv if not a.startswith("--batch_size")]
    argv.append(f"--batch_size={protocol.cpu_batch}")
  run_experiments.FLAGS(argv)
  hparams = run_experiments.hparams_from_flags()
  dataset = load_dataset(hparams.dataset, hparams.data_dir, hparams.valid_size,
                         resolution=hparams.resolution)
  runner = Runner(hparams, dataset, "/tmp/bench_protocols_unused", progress=False)
  model = runner.build(0, 0)
  engine = runner._make_engine(model, 0)  # pylint: disable=protected-access
  engine.reset(0)
  stream = engine.batches(0)
  began = time.perf_counter()
  engine.train(stream, 1)
  compile_seconds = time.perf_counter() - began
  # Chunks of at least a second: a fast step's cost is the loop's, not one call's.
  while True:
    began = time.perf_counter()
    engine.train(stream, steps)
    if time.perf_counter() - began >= 1.0 or steps >= 5000:
      break
    steps *= 10
  chunks = []
  for _ in range(repeats):
    began = time.perf_counter()
    engine.train(stream, steps)
    chunks.append((time.perf_counter() - began) / steps)
  x, y = dataset.x_test[:eval_images], dataset.y_test[:eval_images]
  engine.evaluate(x, y)  # Compiles.
  began = time.perf_counter()
  engine.evaluate(x, y)
  per_image = (time.perf_counter() - began) / len(x)
  step = float(np.median(chunks))
  forward_flops = _forward_flops(model, dataset.input_shape)
  if protocol.cpu_batch:
    step *= protocol.batch / protocol.cpu_batch
  print(json.dumps({"name": name, "step_seconds": step, "eval_image_seconds": per_image,
                    "compile_seconds": compile_seconds, "forward_flops": forward_flops,
                    "steps_per_chunk": steps, "measured_batch":
                    protocol.cpu_batch or protocol.batch}), flush=True)


def gpu_wall_hours(protocol, gpu_step_seconds, gpus, efficiency=0.9, per_machine=8,
                   min_replica_batch=32):
  """The protocol's training wall time on `gpus` GPUs, in hours.

  Chains of runs go in parallel, a chain's runs in order; a run spans up to
  `per_machine` GPUs (`--distribution=mirrored`, speed-up `efficiency` per
  GPU, each replica at least `min_replica_batch` examples of the batch) when
  `protocol.mirrored` and there are GPUs to spare, else one.
  Evaluation is left out (it parallelises the same way).
  """
  run_hours = protocol.steps_per_run * gpu_step_seconds / 3600
  chain_runs = -(-protocol.runs // protocol.chains)
  if gpus >= protocol.chains:
    span = (max(1, min(gpus // protocol.chains, per_machine,
                       protocol.batch // min_replica_batch)) if protocol.mirrored else 1)
    speed = 1.0 if span == 1 else span * efficiency
    return chain_runs * run_hours / speed
  # Fewer GPUs than chains: the runs queue, one per GPU.
  return -(-protocol.runs // gpus) * run_hours


def derived_table(results, gpu_costs, gpu_counts):
  """Markdown: measured CPU costs and the derived GPU wall times."""
  lines = ["| protocol | seed | runs x steps | batch | fwd GFLOP/example | CPU s/step | "
           "CPU GFLOP/s | CPU hours | GPU s/step | " +
           " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in gpu_counts) + " |",
           "|" + "---|" * (9 + len(gpu_counts))]
  for r in results:
    p = PROTOCOLS[r["name"]]
    flops_step = r["forward_flops"] * p.passes * p.batch
    measured = r["name"] in gpu_costs
    gpu_step = (gpu_costs[r["name"]] if measured else
                max(flops_step / (FLAGS.gpu_tflops * 1e12), p.passes * FLAGS.gpu_pass_ms / 1e3))
    walls = [gpu_wall_hours(p, gpu_step, n, FLAGS.mirrored_efficiency, FLAGS.gpus_per_machine)
             for n in gpu_counts]
    lines.append(
        f"| {p.name} | {p.seed} | {p.runs} x {p.steps_per_run} | {p.batch} | "
        f"{r['forward_flops'] / 1e9:.4g} | {r['step_seconds']:.4g} | "
        f"{flops_step / r['step_seconds'] / 1e9:.0f} | {r['cpu_train_hours']:,.0f} | "
        f"{gpu_step:.3g}{'' if measured else ' (assumed)'} | " +
        " | ".join(_hours(w) for w in walls) + " |")
  return "\n".join(lines)


def _hours(hours):
  if hours * 60 < 1:
    return "< 1 min"
  return f"{hours * 60:.0f} min" if hours < 1 else (
      f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} d")


def main(argv):
  del argv
  if not FLAGS.data_dir:
    print("error: --data_dir is required", file=sys.stderr)
    return 1
  names = FLAGS.protocols or list(PROTOCOLS)
  unknown = [n for n in names if n not in PROTOCOLS]
  if unknown:
    print(f"error: unknown --protocols {', '.join(unknown)}; known: {', '.join(PROTOCOLS)}",
          file=sys.stderr)
    return 1
  results = []
  for name in names:
    p = PROTOCOLS[name]
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_protocols", MEASURE_ONE,
                          name, FLAGS.data_dir, str(FLAGS.steps), str(FLAGS.repeats),
                          str(p.cpu_eval_images or FLAGS.eval_images)],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
      print(f"{name}: failed: {out.stderr.strip().splitlines()[-1:]}", flush=True)
      continue
    r = json.loads(out.stdout.strip().splitlines()[-1])
    train_hours = p.runs * p.steps_per_run * r["step_seconds"] / 3600
    eval_hours = p.runs * p.evals_per_run * p.eval_images * r["eval_image_seconds"] / 3600
    r.update(seed=p.seed, batch=p.batch, runs=p.runs, steps_per_run=p.steps_per_run,
             cpu_train_hours=train_hours, cpu_eval_hours=eval_hours, script=p.script)
    results.append(r)
    print(f"{name} ({p.seed}): {r['step_seconds']:.4f} s/step at batch {p.batch} "
          f"(measured at {r['measured_batch']}), {r['eval_image_seconds'] * 1e3:.3f} ms per "
          f"evaluated image, compile {r['compile_seconds']:.1f} s; full protocol on this CPU: "
          f"{p.runs} runs x {p.steps_per_run} steps = {train_hours:,.0f} h training + "
          f"{eval_hours:,.0f} h evaluation", flush=True)
  gpu_costs = {}
  if FLAGS.gpu_costs:
    with open(FLAGS.gpu_costs) as f:
      gpu_costs = json.load(f)
  print(derived_table(results, gpu_costs, [int(n) for n in FLAGS.gpus]))
  print(json.dumps(results))
  print("protocol cpu costs: " + ", ".join(
      f"{r['name']} {r['step_seconds']:.4f} s/step" for r in results))
  return 0


if __name__ == "__main__":
  if sys.argv[1:2] == [MEASURE_ONE]:
    _name, _data_dir, _steps, _repeats, _images = sys.argv[2:]
    measure_one(_name, _data_dir, int(_steps), int(_repeats), int(_images))
  else:
    _define_flags()
    app.run(main)
