"""Benchmark: the CIFAR-10 training-data pipeline, images/s, ours against Keras' layers.

Three candidates deliver augmented batches of 128 CIFAR-10 training images
(float32 [0, 1] pixels in memory, as the engine holds them), indices from the
runner's stateless index stream (`robust_sparse.training.engine.index_stream`):
  * ours: what the trainer runs. A loop inside one `tf.function` pulls index
    batches and calls a compiled function (XLA when it compiles) that gathers
    the images and applies `data.augment.build("crop,flip,cutout")`, cutout
    filled with the `cifar_ssam` mean;
  * keras, per image: Keras' documented tf.data use, a parallel `map` of
    ZeroPadding2D(4) + RandomCrop(32, 32) + RandomFlip("horizontal") +
    RandomErasing (a 16 x 16 square with probability 1/2, Keras' cutout) over
    single images, then `batch` and `prefetch`: the same augmentation as ours;
  * keras, per batch: the same layers called on each gathered batch in a
    compiled `tf.function`. Faster, but Keras' RandomCrop then shifts the whole
    batch by one offset, a weaker augmentation than ours.
The ratio is ours over the faster Keras candidate. Target: ours >= 10000
images/s on 2 CPU cores, so that a GPU is never starved.

  python -m benchmarks.bench_data --data_dir=DIR [--batches=40] [--repeats=5]

Not a test: timings depend on the machine; the ratio is the comparable number.
"""

import os
import sys

from robust_sparse.core import startup  # noqa: E402

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import augment as augment_lib  # noqa: E402
from robust_sparse.data.files import DataError, read_cifar_batch  # noqa: E402
from robust_sparse.training.engine import index_stream  # noqa: E402
from robust_sparse.training.steps import stream_seed  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder holding cifar-10/cifar-10-batches-bin/ "
                    "(the official binary version); required")
flags.DEFINE_integer("batch_size", 128, "images per batch")
flags.DEFINE_integer("batches", 40, "batches per timed repeat")
flags.DEFINE_integer("repeats", 5, "timed repeats per candidate")
FLAGS = flags.FLAGS
SPEC = "crop,flip,cutout"
# The SSAM seed's CIFAR mean (`--normalize=cifar_ssam`) in [0, 1] pixels: the
# colour its zero cutout fill becomes once normalisation moves into the model.
CIFAR_SSAM_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
SEED = 0


def load_cifar10_train(data_dir):
  """The 50000 CIFAR-10 training images as float32 [0, 1] pixels, and their labels."""
  folder = os.path.join(data_dir, "cifar-10", "cifar-10-batches-bin")
  parts = [read_cifar_batch(os.path.join(folder, f"data_batch_{i}.bin")) for i in range(1, 6)]
  images = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
  return images, np.concatenate([p[1] for p in parts]).astype(np.int32)


def ours(images, labels, batch_size, steps):
  """The trainer's pipeline: index stream, then gather + augment compiled together."""
  augment = augment_lib.build(SPEC, num_classes=10, fill=CIFAR_SSAM_MEAN)

  def batch(indices, iteration):
    return augment(tf.gather(images, indices), tf.gather(labels, indices),
                   stream_seed(SEED, iteration, 3))

  batch = tf.function(batch, jit_compile=augment.supports_jit)
  iteration = tf.Variable(0, dtype=tf.int64)

  @tf.function
  def chunk(iterator):
    # A checksum of every pixel, so that no part of the work can be pruned.
    checksum = tf.constant(0.0)
    for _ in tf.range(steps):
      x, _ = batch(next(iterator), iteration)
      iteration.assign_add(1)
      checksum += tf.reduce_sum(x)
    return checksum

  iterator = iter(index_stream(len(images), batch_size, SEED))
  return lambda: chunk(iterator).numpy()


def _keras_layers():
  """Keras' equivalent of crop,flip,cutout (RandomErasing as the cutout)."""
  return keras.Sequential([
      keras.layers.ZeroPadding2D(4),
      keras.layers.RandomCrop(32, 32, seed=SEED),
      keras.layers.RandomFlip("horizontal", seed=SEED),
      # factor: the erasing probability; scale: each side's squared fraction,
      # so 0.25 gives a 16 x 16 square on 32 x 32 images.
      keras.layers.RandomErasing(factor=(0.5, 0.5), scale=(0.25, 0.25),
                                 fill_value=float(np.mean(CIFAR_SSAM_MEAN)),
                                 value_range=(0, 1), seed=SEED),
  ])


def keras_per_image(images, labels, batch_size, steps):
  """Keras' layers in a parallel tf.data map over single images, then batched."""
  layers = _keras_layers()

  def example(index):
    # A batch of one: ZeroPadding2D takes batches only.
    image = layers(tf.gather(images, index)[tf.newaxis], training=True)[0]
    return image, tf.gather(labels, index)

  dataset = (index_stream(len(images), batch_size, SEED).unbatch()
             .map(example, num_parallel_calls=tf.data.AUTOTUNE)
             .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  iterator = iter(dataset)
  return lambda: [next(iterator)[0] for _ in range(steps)][-1].numpy()


def keras_per_batch(images, labels, batch_size, steps):
  """Keras' layers called on each gathered batch in a compiled tf.function."""
  layers = _keras_layers()

  @tf.function
  def chunk(iterator):
    checksum = tf.constant(0.0)
    for _ in tf.range(steps):
      indices = next(iterator)
      x = layers(tf.gather(images, indices), training=True)
      checksum += tf.reduce_sum(x) + tf.cast(tf.reduce_sum(tf.gather(labels, indices)),
                                            tf.float32)
    return checksum

  iterator = iter(index_stream(len(images), batch_size, SEED))
  return lambda: chunk(iterator).numpy()


def main(_):
  if not FLAGS.data_dir:
    sys.exit("bench_data: --data_dir is required (the folder holding "
             "cifar-10/cifar-10-batches-bin/)")
  try:
    x, y = load_cifar10_train(FLAGS.data_dir)
  except DataError as e:
    sys.exit(f"bench_data: {e}")
  images, labels = tf.constant(x), tf.constant(y)
  steps = FLAGS.batches
  candidates = {"ours": ours(images, labels, FLAGS.batch_size, steps),
                "keras, per image (tf.data map)": keras_per_image(images, labels,
                                                                  FLAGS.batch_size, steps),
                "keras, per batch (tf.function)": keras_per_batch(images, labels,
                                                                  FLAGS.batch_size, steps)}
  seconds = median_seconds(candidates, warmup=2, repeats=FLAGS.repeats)
  per_second = {name: FLAGS.batch_size * steps / s for name, s in seconds.items()}
  for name, rate in per_second.items():
    print(f"{name:>31}: {rate:9.0f} images/s")
  keras_best = max(rate for name, rate in per_second.items() if name != "ours")
  print(f"ratio ours/keras: {per_second['ours'] / keras_best:.2f}")
  print(f"cifar10 crop+flip+cutout pipeline: {per_second['ours']:.0f} images/s")


if __name__ == "__main__":
  app.run(main)
