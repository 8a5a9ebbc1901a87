"""Benchmark: PGD-10 examples per second, ours called eagerly against cleverhans'.

Three networks, each attacked on the same MNIST test batches by every candidate:
  * toolkit: the toolkit's own masked dense-300-100 (`models.build_model`);
  * plain keras mlp: a `keras.Sequential` of `keras.layers.Dense` of the same
    shape (784-300-100-10, biases, ReLU) on flattened images, as a user writes it;
  * plain keras conv: a small `keras.Sequential` conv net (two 3x3 convolutions
    with max pooling, then a dense layer).
The candidates:
  * ours eager: `attacks.pgd(model, x, ...)` called as a notebook calls it (it
    compiles itself on the first call, see `attacks.compiled`);
  * ours in tf.function (toolkit only, for reference): `attacks.pgd` compiled
    as the trainer compiles it (tf.function, XLA where it pays off);
  * cleverhans eager: `projected_gradient_descent` called as its users call it;
  * cleverhans tf.function: the same function wrapped in `tf.function`.
All candidates are timed round-robin in one process (`benchmarks.timing`), so
each ratio compares runs made under the same machine load.

Targets: on the toolkit's network (issue 9) ours eager / cleverhans eager >= 2
and / cleverhans in tf.function >= 1; on the plain Keras networks (issue 27)
ours eager >= cleverhans eager, ideally >= cleverhans in tf.function. The last
line prints the toolkit's two ratios, then the plain networks'. Measured on 2
quiet cores (cleverhans eager, cleverhans in tf.function): plain Keras MLP 0.99,
0.49 when PGD's random start used TensorFlow's default algorithm, which XLA's
CPU backend drew 35x slower for 2-D inputs (attacks.common.RANDOM_ALGORITHM),
3.05, 1.55 since; the conv net 0.19, 0.13 compiled with XLA, 1.43, 1.00 as a
plain graph (robust_sparse.training.compilation); the toolkit's network 3.06, 1.53.

  python -m benchmarks.bench_pgd --data_dir=DIR [--batch_size=256]

Not a test: timings depend on the machine; only the ratios are meaningful.
"""

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from cleverhans.tf2.attacks.projected_gradient_descent import (  # noqa: E402
    projected_gradient_descent)

from robust_sparse.attacks import pgd  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.training.compilation import supports_xla, xla_pays_off  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ (else tensorflow-datasets)")
flags.DEFINE_integer("batch_size", 256, "examples per attack call")
flags.DEFINE_integer("batches", 8, "batches per timed repeat")
flags.DEFINE_integer("repeats", 9, "timed repeats per candidate")
FLAGS = flags.FLAGS
EPS, STEP, STEPS = 0.3, 0.05, 10


def plain_mlp(input_dim, num_classes):
  """784-300-100-10 of `keras.layers.Dense`, as a user writes it."""
  return keras.Sequential([keras.Input((input_dim,)),
                           keras.layers.Dense(300, activation="relu"),
                           keras.layers.Dense(100, activation="relu"),
                           keras.layers.Dense(num_classes)])


def plain_convnet(input_shape, num_classes):
  """A small `keras.layers.Conv2D` network with max pooling."""
  return keras.Sequential([keras.Input(input_shape),
                           keras.layers.Conv2D(16, 3, activation="relu"),
                           keras.layers.MaxPooling2D(),
                           keras.layers.Conv2D(32, 3, activation="relu"),
                           keras.layers.MaxPooling2D(),
                           keras.layers.Flatten(),
                           keras.layers.Dense(num_classes)])


def candidates(name, model, batches, with_compiled=False):
  """{label: zero-argument callable attacking every batch} for one network."""

  def ours_eager(x):
    return pgd(model, x, eps=EPS, step_size=STEP, steps=STEPS)

  def theirs(x):
    return projected_gradient_descent(model, x, EPS, STEP, STEPS, np.inf, clip_min=0.0,
                                      clip_max=1.0, rand_init=True, sanity_checks=False)

  functions = {"ours eager": ours_eager}
  if with_compiled:
    functions["ours in tf.function"] = tf.function(
        lambda x: pgd(model, x, eps=EPS, step_size=STEP, steps=STEPS, seed=tf.constant([0, 0])),
        jit_compile=supports_xla(model) and xla_pays_off(model))
  functions["cleverhans eager"] = theirs
  functions["cleverhans tf.function"] = tf.function(theirs)
  return {f"{name}: {label}": (lambda fn=fn: [fn(x).numpy() for x in batches])
          for label, fn in functions.items()}


def ratios(seconds, name):
  """(cleverhans eager, cleverhans tf.function) time over ours eager for one network."""
  ours = seconds[f"{name}: ours eager"]
  return (seconds[f"{name}: cleverhans eager"] / ours,
          seconds[f"{name}: cleverhans tf.function"] / ours)


def main(_):
  data = load_dataset("digits", FLAGS.data_dir)
  images = [data.x_test[i * FLAGS.batch_size:(i + 1) * FLAGS.batch_size]
            for i in range(FLAGS.batches)]
  batches = [tf.constant(x) for x in images]
  flat_batches = [tf.constant(x.reshape(len(x), -1)) for x in images]
  keras.utils.set_random_seed(0)
  runs = {}
  runs.update(candidates("toolkit", build_model("dense-300-100", data.input_shape,
                                                data.num_classes), batches,
                         with_compiled=True))
  runs.update(candidates("plain keras mlp",
                         plain_mlp(int(np.prod(data.input_shape)), data.num_classes),
                         flat_batches))
  runs.update(candidates("plain keras conv", plain_convnet(data.input_shape, data.num_classes),
                         batches))
  seconds = median_seconds(runs, warmup=1, repeats=FLAGS.repeats)
  examples = FLAGS.batch_size * FLAGS.batches
  for name, s in seconds.items():
    print(f"{name:>40}: {examples / s:9.0f} examples/s")
  plain = {name: ratios(seconds, name) for name in ("plain keras mlp", "plain keras conv")}
  for name, (eager, compiled) in plain.items():
    print(f"{name}: pgd eager / cleverhans eager {eager:.2f}, / cleverhans tf.function "
          f"{compiled:.2f}")
  eager, compiled = ratios(seconds, "toolkit")
  print(f"pgd eager / cleverhans eager: {eager:.2f}, / cleverhans tf.function: {compiled:.2f} "
        "(targets >= 2 and >= 1); plain keras mlp: "
        f"{plain['plain keras mlp'][0]:.2f}, {plain['plain keras mlp'][1]:.2f}, conv: "
        f"{plain['plain keras conv'][0]:.2f}, {plain['plain keras conv'][1]:.2f} "
        "(targets >= 1 and >= 1)")


if __name__ == "__main__":
  app.run(main)
