"""Benchmark: the engine's compiled loop against Keras' own `model.fit`.

For each model, the same network (same initial weights) trains on the same
batches (the runner's index stream over MNIST or CIFAR-10) with the same
optimizer, through `robust_sparse.training.engine.Engine.train` (k steps per call,
compiled as `--compile=auto` chooses) and through
`model.fit(steps_per_execution=50)` with XLA on and off: Keras' fastest
configuration is whichever of the two is faster for the model. The ratio is
engine steps/s over the faster fit's steps/s; target >= 1.0.

  python -m benchmarks.bench_engine --data_dir=DIR [--repeats=3]

Not a test: timings depend on the machine; only the ratio is meaningful.
"""

import sys

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from robust_sparse.attacks import AttackConfig, make_attack  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import DataError, load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/ (else tensorflow-"
                    "datasets)")
flags.DEFINE_integer("repeats", 3, "timed repeats per front-end")
flags.DEFINE_integer("dense_steps", 1000, "dense-300-100 steps per repeat (batch 60)")
flags.DEFINE_integer("resnet_steps", 50, "resnet18 steps per repeat")
flags.DEFINE_integer("resnet_batch", 8, "resnet18 batch size (small: CPU)")
FLAGS = flags.FLAGS
STEPS_PER_EXECUTION = 50


def ratio(model_name, dataset, steps, batch_size, optimizer):
  """Engine steps/s divided by the faster `fit`'s (XLA on or off) steps/s for one model."""
  keras.utils.set_random_seed(0)
  engine_model = build_model(model_name, dataset.input_shape, dataset.num_classes)
  fit_models = {}
  for jit in (True, False):
    fit_models[jit] = build_model(model_name, dataset.input_shape, dataset.num_classes)
    fit_models[jit].set_weights(engine_model.get_weights())
  attack = make_attack(AttackConfig("fgsm"))
  engine = Engine(engine_model,
                  standard_loss_grad_fn(engine_model, num_classes=dataset.num_classes),
                  [OptimizerGroup("weights", make_optimizer(optimizer, 1e-3))],
                  x_train=dataset.x_train, y_train=dataset.y_train, batch_size=batch_size,
                  attack=attack)
  engine_batches = iter(index_stream(len(dataset.x_train), batch_size, seed=0))

  x, y = tf.constant(dataset.x_train), tf.constant(dataset.y_train, tf.int32)
  fit_batches = index_stream(len(dataset.x_train), batch_size, seed=0).map(
      lambda i: (tf.gather(x, i), tf.gather(y, i)), num_parallel_calls=tf.data.AUTOTUNE)
  fit_iterator = fit_batches.prefetch(tf.data.AUTOTUNE).repeat()
  runs = {"engine": lambda: engine.train(engine_batches, steps)}
  for jit, fit_model in fit_models.items():
    fit_model.compile(optimizer=make_optimizer(optimizer, 1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit, steps_per_execution=min(STEPS_PER_EXECUTION, steps))
    runs[f"fit_{'xla' if jit else 'nojit'}"] = (
        lambda m=fit_model: m.fit(fit_iterator, steps_per_epoch=steps, epochs=1, verbose=0,
                                  shuffle=False))
  seconds = median_seconds(runs, warmup=1, repeats=FLAGS.repeats)
  for name, s in seconds.items():
    mode = f" ({engine.compile_mode})" if name == "engine" else ""
    print(f"{model_name:>14} {name:>9}: {steps / s:8.2f} steps/s{mode}", flush=True)
  return min(seconds["fit_xla"], seconds["fit_nojit"]) / seconds["engine"]


def main(_):
  try:
    mnist = load_dataset("digits", FLAGS.data_dir)
    cifar = load_dataset("cifar10", FLAGS.data_dir, 500)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dense = ratio("dense-300-100", mnist, FLAGS.dense_steps, 60, "adam")
  resnet = ratio("resnet18", cifar, FLAGS.resnet_steps, FLAGS.resnet_batch, "sgd")
  print(f"engine vs keras fit steps/s: dense-300-100 {dense:.2f}, resnet18 {resnet:.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
