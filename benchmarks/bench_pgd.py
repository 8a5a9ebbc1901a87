"""Benchmark: PGD-10 examples per second, ours called eagerly against cleverhans'.

The candidates attack the same dense-300-100 on the same MNIST batches:
  * ours eager: `attacks.pgd(model, x, ...)` called as a notebook calls it (it
    compiles itself on the first call, see `attacks.compiled`);
  * ours in tf.function: `attacks.pgd` compiled as the trainer compiles it
    (tf.function, XLA), for reference;
  * cleverhans eager: `projected_gradient_descent` called as its users call it;
  * cleverhans in tf.function: the same function wrapped in `tf.function`.
Targets (issue 9): ours eager / cleverhans eager >= 2, ours eager / cleverhans
in tf.function >= 1. The last line prints both ratios.

  python -m benchmarks.bench_pgd --data_dir=DIR [--batch_size=256]

Not a test: timings depend on the machine; only the ratios are meaningful.
"""

from robust_sparse import startup

startup.import_tensorflow()  # Quietly: robust_sparse/startup.py.

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402
from cleverhans.tf2.attacks.projected_gradient_descent import (  # noqa: E402
    projected_gradient_descent)

from attacks import pgd  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from data import load_dataset  # noqa: E402
from models import build_model  # noqa: E402
from robust_sparse.engine import supports_xla  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ (else tensorflow-datasets)")
flags.DEFINE_integer("batch_size", 256, "examples per attack call")
flags.DEFINE_integer("batches", 8, "batches per timed repeat")
flags.DEFINE_integer("repeats", 9, "timed repeats per candidate")
FLAGS = flags.FLAGS
EPS, STEP, STEPS = 0.3, 0.05, 10


def main(_):
  data = load_dataset("digits", FLAGS.data_dir)
  model = build_model("dense-300-100", data.input_shape, data.num_classes)
  batches = [tf.constant(data.x_test[i * FLAGS.batch_size:(i + 1) * FLAGS.batch_size])
             for i in range(FLAGS.batches)]

  def ours_eager(x):
    return pgd(model, x, eps=EPS, step_size=STEP, steps=STEPS)

  ours_compiled = tf.function(
      lambda x: pgd(model, x, eps=EPS, step_size=STEP, steps=STEPS, seed=tf.constant([0, 0])),
      jit_compile=supports_xla(model))

  def theirs(x):
    return projected_gradient_descent(model, x, EPS, STEP, STEPS, np.inf, clip_min=0.0,
                                      clip_max=1.0, rand_init=True, sanity_checks=False)

  theirs_compiled = tf.function(theirs)

  def over_batches(fn):
    return lambda: [fn(x).numpy() for x in batches]

  seconds = median_seconds({"ours eager": over_batches(ours_eager),
                            "ours in tf.function": over_batches(ours_compiled),
                            "cleverhans eager": over_batches(theirs),
                            "cleverhans tf.function": over_batches(theirs_compiled)},
                           warmup=1, repeats=FLAGS.repeats)
  examples = FLAGS.batch_size * FLAGS.batches
  for name, s in seconds.items():
    print(f"{name:>24}: {examples / s:9.0f} examples/s")
  print(f"pgd eager / cleverhans eager: "
        f"{seconds['cleverhans eager'] / seconds['ours eager']:.2f}, "
        f"/ cleverhans tf.function: "
        f"{seconds['cleverhans tf.function'] / seconds['ours eager']:.2f} "
        "(targets >= 2 and >= 1)")


if __name__ == "__main__":
  app.run(main)
