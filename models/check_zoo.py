"""Checks every registered model end to end: prune, train under the engine, save and reload.

  python -m robust_sparse.models.check_zoo [--models=resnet18,wideresnet16x4] [--steps=5]

For each model (every `MODELS.names()` entry by default; any
`wideresnet{depth}x{k}` can be named), at 32x32 pixels and, for the
ImageNet-stem ResNets, also at 64 and 224: build it, prune 20 % of the
weights of every masked layer by magnitude, train `--steps` steps under the
engine (batch 2, SGD with momentum and weight decay, on random images),
check that every pruned weight is still exactly zero and that training moved
the others, and check that a `.keras` save and reload gives the same
variables and identical logits. One line per model with its trainable
parameter count and seconds, then `model zoo: N models ok`; a failing model
prints why, and the command exits non-zero.

`check_model` is the same check for one built model; tests/models/test_model_zoo.py
runs it on miniatures of every family.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from robust_sparse.attacks import AttackConfig, make_attack  # noqa: E402
from robust_sparse.models import MODELS, build_model  # noqa: E402
from robust_sparse.nn import pruning  # noqa: E402
from robust_sparse.training.engine import Engine, index_stream  # noqa: E402
from robust_sparse.nn.layers import masked_layers  # noqa: E402
from robust_sparse.training.optimizers import make_optimizer  # noqa: E402
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn  # noqa: E402

# The ImageNet-stem ResNets are also checked at these sides (the others at 32).
IMAGENET_SIZES = (32, 64, 224)


class ZooCheckError(Exception):
  """A model failed one of `check_model`'s checks; the message says which."""


def trainable_count(model):
  """The number of trainable weights (masks and BN statistics excluded)."""
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def prune_each_layer(model, fraction):
  """Masks the `fraction` smallest-magnitude weights of every masked layer.

  Returns:
    layer name -> the new 0/1 mask, as assigned.
  """
  layers = masked_layers(model)
  kernels = {layer.name: layer.raw_kernel.numpy() for layer in layers}
  masks = {layer.name: layer.mask.numpy() for layer in layers}
  new_masks = pruning.prune(kernels, masks, {name: fraction for name in kernels})
  for layer in layers:
    layer.mask.assign(new_masks[layer.name])
  return new_masks


def train_under_engine(model, steps, *, batch_size=2, seed=0):
  """`steps` SGD steps of `model` under the engine on random [0, 1] images.

  Returns:
    The engine's mean training metrics.
  """
  num_classes = int(model.output.shape[-1])
  rng = np.random.default_rng(seed)
  examples = batch_size * 4
  x = rng.uniform(size=(examples, *model.input.shape[1:])).astype(np.float32)
  y = rng.integers(0, num_classes, size=examples).astype(np.int32)
  optimizer = make_optimizer("sgd", 0.01, momentum=0.9, weight_decay=5e-4)
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=num_classes),
                  [OptimizerGroup("weights", optimizer)], x_train=x, y_train=y,
                  batch_size=batch_size, attack=make_attack(AttackConfig("fgsm", eps=0.03)))
  engine.reset(seed)
  return engine.train(iter(index_stream(examples, batch_size, seed)), steps)


def check_model(model, *, steps=5, batch_size=2, fraction=0.2, directory=None, seed=0):
  """Prunes, trains under the engine and round-trips `model` through a `.keras` file.

  Args:
    model: a built model from the registry (or a family function).
    steps: training steps.
    batch_size: training batch size.
    fraction: fraction of every masked layer's weights to prune.
    directory: where the `.keras` file goes; None: a temporary folder.
    seed: seeds the data, the engine and the optimizer's run.

  Raises:
    ZooCheckError: a pruned weight came back, nothing trained, the loss is
      not finite, or the reloaded model differs.
  """
  masks = prune_each_layer(model, fraction)
  before = {layer.name: layer.raw_kernel.numpy() for layer in masked_layers(model)}
  metrics = train_under_engine(model, steps, batch_size=batch_size, seed=seed)
  if not np.isfinite(metrics["loss"]):
    raise ZooCheckError(f"{model.name}: non-finite training loss {metrics['loss']}")
  moved = False
  for layer in masked_layers(model):
    mask, kernel = layer.mask.numpy(), layer.raw_kernel.numpy()
    if not np.array_equal(mask, masks[layer.name]):
      raise ZooCheckError(f"{model.name}: training changed the mask of {layer.name}")
    revived = np.count_nonzero(kernel[mask == 0])
    if revived:
      raise ZooCheckError(f"{model.name}: {revived} pruned weights of {layer.name} are "
                          "nonzero after training")
    moved = moved or not np.array_equal(kernel, before[layer.name])
  if not moved:
    raise ZooCheckError(f"{model.name}: training did not change any kernel")
  with tempfile.TemporaryDirectory(dir=directory) as folder:
    path = os.path.join(folder, f"{model.name}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
  _check_same_model(model, reloaded, seed)


def _check_same_model(model, reloaded, seed):
  paths = [v.path for v in model.variables]
  if [v.path for v in reloaded.variables] != paths:
    raise ZooCheckError(f"{model.name}: the reloaded model's variable paths differ")
  for original, copy in zip(model.variables, reloaded.variables):
    if not np.array_equal(original.numpy(), copy.numpy()):
      raise ZooCheckError(f"{model.name}: reloaded {original.path} differs")
  x = np.random.default_rng(seed + 1).uniform(
      size=(2, *model.input.shape[1:])).astype(np.float32)
  expected, got = model(x, training=False).numpy(), reloaded(x, training=False).numpy()
  if not np.array_equal(expected, got):
    raise ZooCheckError(f"{model.name}: reloaded logits differ by up to "
                        f"{np.abs(expected - got).max():.3g}")


def sizes(name):
  """The image sides `name` is checked at."""
  return IMAGENET_SIZES if name.endswith(("_imagenet", "_imagenet_noskip")) else (32,)


def check_registered(name, *, steps, batch_size=2):
  """Checks model `name` at each of its sizes; returns (trainable params at 32 px, seconds)."""
  start = time.perf_counter()
  params = None
  for side in sizes(name):
    keras.utils.set_random_seed(0)
    model = build_model(name, (side, side, 3), 10)
    if params is None:
      params = trainable_count(model)
    check_model(model, steps=steps, batch_size=batch_size)
  return params, time.perf_counter() - start


def _define_flags():
  # Only when run as a program: importing the module (the tests do) defines none.
  flags.DEFINE_list("models", None, "models to check (default: every registered one)")
  flags.DEFINE_integer("steps", 5, "training steps per model and size", lower_bound=1)


def main(argv):
  del argv
  # Each model gets a fresh engine, which TensorFlow reports as retracing.
  tf.get_logger().setLevel("ERROR")
  FLAGS = flags.FLAGS
  names = FLAGS.models or MODELS.names()
  for name in names:
    try:
      MODELS.get(name)  # An unknown name fails before any work.
    except ValueError as e:
      print(f"model zoo: {e}", file=sys.stderr)
      sys.exit(2)
  failed = []
  for name in names:
    try:
      params, seconds = check_registered(name, steps=FLAGS.steps)
    except (ZooCheckError, ValueError) as e:
      failed.append(name)
      print(f"{name:26s} FAILED: {e}", flush=True)
      continue
    side_text = "/".join(str(side) for side in sizes(name))
    print(f"{name:26s} {params:>12,d} params  {side_text:>9s} px  {seconds:6.1f} s  ok",
          flush=True)
  if failed:
    print(f"model zoo: {len(failed)} of {len(names)} models failed: {', '.join(failed)}")
    sys.exit(1)
  print(f"model zoo: {len(names)} models ok")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
