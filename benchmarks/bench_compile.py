"""Benchmark: the engine's three ways to compile, per model, and what `--compile=auto` picks.

For each model, the same network (same initial weights) trains on the same
batches of the runner's index stream with the engine compiled each way
(`robust_sparse/training/compilation.py`): "xla_loop" (a chunk of steps is one XLA
computation), "xla_step" (an XLA call per step) and "graph" (a `tf.function`
per step, TensorFlow's own kernels). Printed per model and mode: the first
call's seconds (tracing and compilation, with `--warm_steps` steps) and the
steps/s after it (round-robin medians, `benchmarks/timing.py`). The rows are
the evidence for `compilation.choose`'s rules (where they measured a tie,
auto times the tied modes itself: "auto (timed)"); the last line says how auto's
choice compares with the fastest mode of each model (compilation that takes
minutes is a defect of that mode on this machine, and shows in the first
call's seconds):

  python -m benchmarks.bench_compile --data_dir=DIR [--models=...] [--kind=natural|pgd]

Last line: `compile auto/fastest steps/s: min X.XX (model), median Y.YY`
(target >= 0.95: auto is never much slower than the best choice). Not a
test: only ratios within a run count.
"""

import statistics
import sys
import time

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from robust_sparse.attacks import AttackConfig, make_attack  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import DataError, load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.training import compilation  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/ (required)")
flags.DEFINE_list("models", ["dense-300-100", "conv-bn", "vit_tiny", "resnet18"],
                  "models to measure (dense-300-100 on MNIST, the others on CIFAR-10)")
flags.DEFINE_enum("kind", "natural", ["natural", "pgd"], "natural or PGD-10 adversarial "
                  "training")
flags.DEFINE_list("modes", ["xla_loop", "xla_step", "graph"], "the modes to measure (a "
                  "mode left out is not timed; auto's pick must be among them)")
flags.DEFINE_integer("batch_size", 32, "CIFAR-10 batch size (dense-300-100: 60)")
flags.DEFINE_integer("steps", 5, "timed steps per repeat (dense-300-100: 100x)")
flags.DEFINE_integer("warm_steps", 1, "steps of the first (compiling) call")
flags.DEFINE_integer("repeats", 3, "timed repeats per mode")
FLAGS = flags.FLAGS

MODES = ("xla_loop", "xla_step", "graph")


def _engine(model_name, dataset, batch_size, mode, weights):
  keras.utils.set_random_seed(0)
  model = build_model(model_name, dataset.input_shape, dataset.num_classes)
  model.set_weights(weights)
  adversarial = FLAGS.kind == "pgd"
  eps = 0.3 if dataset.input_shape[-1] == 1 else 8 / 255
  attack = make_attack(AttackConfig("pgd", eps=eps, step_size=eps / 4, steps=10))
  optimizer = (make_optimizer("adam", 1.2e-3) if model_name == "dense-300-100" else
               make_optimizer("sgd", 0.01, momentum=0.9, weight_decay=5e-4))
  loss_grad = standard_loss_grad_fn(model, num_classes=dataset.num_classes,
                                    attack=attack if adversarial else None)
  return Engine(model, loss_grad, [OptimizerGroup("weights", optimizer)],
                x_train=dataset.x_train, y_train=dataset.y_train, batch_size=batch_size,
                attack=attack, adv_train=adversarial, compile=mode)


def measure(model_name, dataset, batch_size, steps):
  """{mode: (first-call seconds or None, steps/s or None)} and auto's mode."""
  keras.utils.set_random_seed(0)
  weights = build_model(model_name, dataset.input_shape, dataset.num_classes).get_weights()
  engines, streams, results = {}, {}, {}
  auto_engine = _engine(model_name, dataset, batch_size, "auto", weights)
  timed = bool(auto_engine.compile_candidates)  # Auto times its candidates on this machine.
  auto = auto_engine.settle_compile()
  for mode in FLAGS.modes:
    engine = _engine(model_name, dataset, batch_size, mode, weights)
    stream = iter(index_stream(len(dataset.x_train), batch_size, seed=0))
    start = time.perf_counter()
    engine.train(stream, FLAGS.warm_steps)
    results[mode] = [time.perf_counter() - start, None]
    engines[mode], streams[mode] = engine, stream
  seconds = median_seconds({mode: (lambda m=mode: engines[m].train(streams[m], steps))
                            for mode in engines}, warmup=0, repeats=FLAGS.repeats)
  for mode, s in seconds.items():
    results[mode][1] = steps / s
  for mode in FLAGS.modes:
    first, rate = results[mode]
    print(f"{model_name:>16} {mode:>9}: first call {first:7.1f} s, {rate:9.2f} steps/s"
            f"{('  <- auto (timed)' if timed else '  <- auto') if mode == auto else ''}",
          flush=True)
  return results, auto


def main(argv):
  del argv
  if not FLAGS.data_dir:
    print("error: --data_dir is required (a folder with mnist/ and cifar-10/)", file=sys.stderr)
    return 2
  try:
    mnist = load_dataset("digits", FLAGS.data_dir) if "dense-300-100" in FLAGS.models else None
    cifar = load_dataset("cifar10", FLAGS.data_dir, valid_size=1000)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  unknown = sorted(set(FLAGS.modes) - set(MODES))
  if unknown:
    print(f"error: --modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})",
          file=sys.stderr)
    return 2
  print(f"{FLAGS.kind} training, device: "
        f"{'GPU' if compilation.on_gpu() else 'CPU only'}", flush=True)
  ratios = {}
  for name in FLAGS.models:
    if name == "dense-300-100":
      results, auto = measure(name, mnist, 60, FLAGS.steps * 100)
    else:
      results, auto = measure(name, cifar, FLAGS.batch_size, FLAGS.steps)
    rates = {mode: rate for mode, (_, rate) in results.items() if rate is not None}
    ratios[name] = rates.get(auto, 0.0) / max(rates.values())
  worst = min(ratios, key=ratios.get)
  print(f"compile auto/fastest steps/s: min {ratios[worst]:.2f} ({worst}), "
        f"median {statistics.median(ratios.values()):.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
