"""Benchmark: training throughput of the masked dense-300-100 against plain Keras Dense.

Both networks train with the same compiled `Trainer` on the same data, so the
ratio isolates the cost of the masks. Target: ratio >= 0.97.

What the masks cost (read in the XLA HLO of one training step): the forward
pass computes `kernel * mask` (one elementwise pass per kernel, which the dot
then reads instead of the kernel), the backward pass multiplies the kernel
gradient by the mask (XLA fuses it into Adam's moment updates, one extra read
of the mask in each), and the kernel constraint `* mask` fuses into Adam's
final update (one more read). No casts remain. At batch 60 these passes over
the 784x300 kernel are memory-bound and not small next to the matmuls, so on
a small CPU the ratio sits near 0.9; the constraint alone costs about 1%.

  python -m benchmarks.bench_training --data_dir=DIR [--steps=2000] [--adv_train]

Not a test: timings depend on the machine; only the ratio is meaningful.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from attacks import AttackConfig, make_attack  # noqa: E402
from benchmarks.timing import median_seconds  # noqa: E402
from data import load_dataset  # noqa: E402
from models import build_model  # noqa: E402
from robust_sparse.training import Trainer, index_stream  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with mnist/ (else tensorflow-datasets)")
flags.DEFINE_integer("steps", 2000, "training iterations per timed repeat")
flags.DEFINE_integer("repeats", 5, "timed repeats per network")
flags.DEFINE_bool("adv_train", False, "time FGSM adversarial training instead")
FLAGS = flags.FLAGS


def plain_dense_300_100(input_shape, num_classes):
  inputs = keras.Input(input_shape)
  x = keras.layers.Flatten()(inputs)
  x = keras.layers.Dense(300, use_bias=False, activation="relu")(x)
  x = keras.layers.Dense(100, use_bias=False, activation="relu")(x)
  return keras.Model(inputs, keras.layers.Dense(num_classes, use_bias=False)(x))


def main(_):
  data = load_dataset("digits", FLAGS.data_dir)
  attack = make_attack(AttackConfig("fgsm"))
  runs = {}
  for name, model in (
      ("masked", build_model("dense-300-100", data.input_shape, data.num_classes)),
      ("plain", plain_dense_300_100(data.input_shape, data.num_classes))):
    trainer = Trainer(model, attack, data.x_train, data.y_train,
                      num_classes=data.num_classes, learning_rate=1.2e-3, batch_size=60,
                      adv_train=FLAGS.adv_train, label_smoothing=0.1)
    iterator = iter(index_stream(len(data.x_train), 60, seed=0))
    runs[name] = lambda trainer=trainer, iterator=iterator: trainer.train(iterator,
                                                                          FLAGS.steps)
  seconds = median_seconds(runs, warmup=1, repeats=FLAGS.repeats)
  for name, s in seconds.items():
    print(f"{name:>7}: {FLAGS.steps / s:9.0f} iterations/s")
  print(f"masked / plain throughput ratio: {seconds['plain'] / seconds['masked']:.3f} "
        "(target >= 0.97)")


if __name__ == "__main__":
  app.run(main)
