"""Benchmark: the cost of a SAM step against a plain SGD step, and of an SSAM-F refresh.

SAM takes two forward-backward passes per step, so its step time is about
twice SGD's; the ratio shows how close the engine's wrapper (the second pass
on `w + e` tensors, masks held) comes to that floor. Both run the same model,
batches and compiled engine loop (XLA where the layers allow).

Also measured: the SSAM-F mask refresh (Fisher information over
`--num_samples` single-example gradients, then the top-k mask) as a fraction
of the time of one epoch of SSAM-F training on the full training set.

  python -m benchmarks.bench_sam --data_dir=DIR [--repeats=3]

Last line: `sam/sgd step time: resnet18 X.XX, dense-300-100 Y.YY` (limit 2.0,
target <= 2.05). Not a test: only the ratios are meaningful.
"""

import math
import sys

from robust_sparse.core import startup  # noqa: E402

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import DataError, load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.sharpness.sam import sharpness_aware  # noqa: E402
from robust_sparse.training.sharpness.sparse_perturbation import FisherMasks  # noqa: E402
from robust_sparse.training.steps import (OptimizerGroup, cross_entropy,  # noqa: E402
                                 standard_loss_grad_fn)

flags.DEFINE_string("data_dir", None, "folder with mnist/ and cifar-10/ (required)")
flags.DEFINE_integer("repeats", 3, "timed repeats per optimizer")
flags.DEFINE_integer("dense_steps", 500, "dense-300-100 steps per repeat (batch 60)")
flags.DEFINE_integer("resnet_steps", 10, "resnet18 steps per repeat")
flags.DEFINE_integer("resnet_batch", 32, "resnet18 batch size (small: CPU)")
flags.DEFINE_integer("num_samples", 128, "SSAM-F Fisher samples")
FLAGS = flags.FLAGS


def _engine(model, dataset, batch_size, sharpness=None):
  loss_grad = standard_loss_grad_fn(model, num_classes=dataset.num_classes,
                                    sharpness=sharpness)
  return Engine(model, loss_grad, [OptimizerGroup("weights", make_optimizer(
      "sgd", 0.01, momentum=0.9))], x_train=dataset.x_train, y_train=dataset.y_train,
                batch_size=batch_size, attack=None)


def sam_over_sgd(model_name, dataset, steps, batch_size):
  """(SAM step time / SGD step time, SAM seconds per step) for one model."""
  keras.utils.set_random_seed(0)
  sgd_model = build_model(model_name, dataset.input_shape, dataset.num_classes)
  sam_model = build_model(model_name, dataset.input_shape, dataset.num_classes)
  sam_model.set_weights(sgd_model.get_weights())
  engines = {
      "sgd": _engine(sgd_model, dataset, batch_size),
      "sam": _engine(sam_model, dataset, batch_size,
                     lambda inner: sharpness_aware(inner, sam_model, rho=0.05)),
  }
  streams = {name: iter(index_stream(len(dataset.x_train), batch_size, seed=0))
             for name in engines}
  times = median_seconds({name: (lambda n=name: engines[n].train(streams[n], steps))
                          for name in engines}, warmup=1, repeats=FLAGS.repeats)
  return times["sam"] / times["sgd"], times["sam"] / steps


def refresh_fraction(dataset, batch_size, sam_seconds_per_step):
  """SSAM-F refresh time over the time of one SSAM epoch (resnet18, CIFAR-10)."""
  model = build_model("resnet18", dataset.input_shape, dataset.num_classes)
  masks = FisherMasks(model, cross_entropy(dataset.num_classes), augment=None,
                      num_samples=FLAGS.num_samples, sparsity=0.5, pattern="unstructured",
                      update_freq=1)
  x, y = dataset.x_train[:FLAGS.num_samples], dataset.y_train[:FLAGS.num_samples]
  seconds = median_seconds({"refresh": lambda: masks.refresh(0, 0, lambda *_: (x, y))},
                           warmup=1, repeats=max(1, FLAGS.repeats - 1))["refresh"]
  epoch = math.ceil(50000 / batch_size) * sam_seconds_per_step
  return seconds, seconds / epoch


def main(argv):
  del argv
  if not FLAGS.data_dir:
    print("error: --data_dir is required (a folder with mnist/ and cifar-10/)",
          file=sys.stderr)
    return 2
  try:
    mnist = load_dataset("digits", FLAGS.data_dir)
    cifar = load_dataset("cifar10", FLAGS.data_dir, valid_size=1000)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  dense, _ = sam_over_sgd("dense-300-100", mnist, FLAGS.dense_steps, 60)
  print(f"dense-300-100: sam/sgd step time {dense:.2f}")
  resnet, sam_step = sam_over_sgd("resnet18", cifar, FLAGS.resnet_steps, FLAGS.resnet_batch)
  print(f"resnet18 (batch {FLAGS.resnet_batch}): sam/sgd step time {resnet:.2f}")
  seconds, fraction = refresh_fraction(cifar, FLAGS.resnet_batch, sam_step)
  print(f"ssamf refresh at --num_samples={FLAGS.num_samples}: {seconds:.1f} s = "
        f"{100 * fraction:.2f} % of a resnet18 SSAM epoch on CIFAR-10 "
        f"(batch {FLAGS.resnet_batch})")
  print(f"sam/sgd step time: resnet18 {resnet:.2f}, dense-300-100 {dense:.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
