"""Benchmark: the cost of saturation tracking (`--measure=saturation`) in training.

The tracked step runs through the weight-sharing tap model and adds each conv
and dense layer's outputs to float64 covariance sums (the natural examples of
the batch); the plain step is the same engine without a measurement. Both
train vgg16 (phd-lab's, 32 px) on CIFAR-10 with SGD in the compiled loop,
interleaved and repeated (median), so the ratio is meaningful on a busy
machine; a second ratio measures the test-set evaluation with and without
the taps. The epoch-end eigendecompositions (once per evaluation period,
on C x C matrices) are timed separately.

  python -m benchmarks.bench_saturation --data_dir=DIR [--downsampling=N]

Last line: `saturation/plain step time: vgg16 X.XX, eval Y.YY` (issue 12's
limit: 1.15). Not a test: only the ratios are meaningful.
"""

import sys
import time

from robust_sparse.core import startup  # noqa: E402

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from robust_sparse.data import DataError, load_dataset  # noqa: E402
from robust_sparse.models import build_model  # noqa: E402
from robust_sparse.measure import saturation  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn  # noqa: E402

flags.DEFINE_string("data_dir", None, "folder with cifar-10/ (required)")
flags.DEFINE_string("model", "vgg16", "model")
flags.DEFINE_integer("repeats", 3, "timed repeats")
flags.DEFINE_integer("steps", 10, "training steps per repeat")
flags.DEFINE_integer("batch_size", 128, "batch size")
flags.DEFINE_integer("downsampling", None, "--saturation_downsampling (None: no resize)")
FLAGS = flags.FLAGS


def _engine(model, dataset, measurement=None):
  loss_grad = standard_loss_grad_fn(
      model, num_classes=dataset.num_classes,
      taps=measurement.tap_model if measurement is not None else None)
  return Engine(model, loss_grad, [OptimizerGroup("weights", make_optimizer(
      "sgd", 0.01, momentum=0.9))], x_train=dataset.x_train, y_train=dataset.y_train,
                batch_size=FLAGS.batch_size, attack=None, measurement=measurement)


def main(argv):
  del argv
  if not FLAGS.data_dir:
    print("error: --data_dir is required (a folder with cifar-10/)", file=sys.stderr)
    return 2
  try:
    cifar = load_dataset("cifar10", FLAGS.data_dir, valid_size=0)
  except (DataError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  keras.utils.set_random_seed(0)
  plain_model = build_model(FLAGS.model, cifar.input_shape, cifar.num_classes)
  tracked_model = build_model(FLAGS.model, cifar.input_shape, cifar.num_classes)
  tracked_model.set_weights(plain_model.get_weights())
  tracker = saturation.SaturationTracker.for_model(tracked_model,
                                                   downsampling=FLAGS.downsampling)
  tracker.tap_model = saturation.tap_model(tracked_model)
  engines = {"plain": _engine(plain_model, cifar),
             "saturation": _engine(tracked_model, cifar, tracker)}
  streams = {name: iter(index_stream(len(cifar.x_train), FLAGS.batch_size, seed=0))
             for name in engines}
  train = median_seconds({name: (lambda n=name: engines[n].train(streams[n], FLAGS.steps))
                          for name in engines}, warmup=1, repeats=FLAGS.repeats)
  ratio = train["saturation"] / train["plain"]
  print(f"{FLAGS.model} training, batch {FLAGS.batch_size}: plain "
        f"{train['plain'] / FLAGS.steps:.3f} s/step, saturation "
        f"{train['saturation'] / FLAGS.steps:.3f} s/step, ratio {ratio:.3f}")
  x, y = cifar.x_test, cifar.y_test
  evaluation = median_seconds({name: (lambda n=name: engines[n].evaluate(x, y, 2))
                               for name in engines}, warmup=1, repeats=FLAGS.repeats)
  eval_ratio = evaluation["saturation"] / evaluation["plain"]
  print(f"test-set evaluation ({len(x)} images): ratio {eval_ratio:.3f}")
  began = time.perf_counter()
  tracker.results()
  print(f"epoch-end eigendecompositions ({len(tracker.layer_names)} layers x 2 splits): "
        f"{time.perf_counter() - began:.2f} s per evaluation period")
  print(f"saturation/plain step time: {FLAGS.model} {ratio:.2f}, eval {eval_ratio:.2f}")
  return 0


if __name__ == "__main__":
  app.run(main)
