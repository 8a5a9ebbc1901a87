"""The zoo's batch norm (`TorchBatchNorm`): PyTorch's BatchNorm1d/2d on TensorFlow's kernels.

Training against NumPy re-derivations of PyTorch's formulas (output, unbiased
running variance) and against Keras' own layer (gradients); synchronized batch
norm on 2 logical CPU replicas (another process: the devices must exist before
TensorFlow starts) against one device on the global batch.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.models import build_model
from robust_sparse.models.registry import TorchBatchNorm
from tests.conftest import REPO

CIFAR = (32, 32, 3)


def _torch_batch_norm_train(x, gamma, beta, eps):
  """PyTorch's BatchNorm2d forward in training: output, batch mean, unbiased variance."""
  mean = x.mean(axis=(0, 1, 2))
  variance = x.var(axis=(0, 1, 2))
  n = x.size // x.shape[-1]
  out = (x - mean) / np.sqrt(variance + eps) * gamma + beta
  return out, mean, variance * n / (n - 1)


@pytest.mark.parametrize("shape", [(8, 5, 5, 4), (3, 7, 6, 16)])
def test_torch_batch_norm_trains_like_pytorch(shape):
  rng = np.random.default_rng(len(shape) + shape[0])
  x = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
  gamma, beta = (rng.normal(size=shape[-1]).astype(np.float32) for _ in range(2))
  layer = TorchBatchNorm(momentum=0.9, epsilon=1e-5)
  layer.build(shape)
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  moving_mean, moving_variance = (rng.uniform(0.5, 1.5, size=shape[-1]).astype(np.float32)
                                  for _ in range(2))
  layer.moving_mean.assign(moving_mean)
  layer.moving_variance.assign(moving_variance)
  weights = rng.normal(size=shape).astype(np.float32)
  inputs = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    out = layer(inputs, training=True)
    loss = tf.reduce_sum(out * weights)
  grad_x, grad_gamma = tape.gradient(loss, [inputs, layer.gamma])
  expected, mean, variance = _torch_batch_norm_train(x.astype(np.float64), gamma, beta, 1e-5)
  np.testing.assert_allclose(out.numpy(), expected, atol=2e-5)
  np.testing.assert_allclose(layer.moving_mean.numpy(), 0.9 * moving_mean + 0.1 * mean,
                             rtol=1e-5)
  np.testing.assert_allclose(layer.moving_variance.numpy(),
                             0.9 * moving_variance + 0.1 * variance, rtol=1e-5)
  # The gradients of Keras' own (unfused) layer, with the same weights.
  reference = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)
  reference.build(shape)
  reference.gamma.assign(gamma)
  reference.beta.assign(beta)
  with tf.GradientTape() as tape:
    tape.watch(inputs)
    loss = tf.reduce_sum(reference(inputs, training=True) * weights)
  ref_x, ref_gamma = tape.gradient(loss, [inputs, reference.gamma])
  np.testing.assert_allclose(grad_x.numpy(), ref_x.numpy(), atol=1e-4)
  np.testing.assert_allclose(grad_gamma.numpy(), ref_gamma.numpy(), rtol=1e-4, atol=1e-3)
  # Inference uses the running statistics.
  inferred = layer(inputs, training=False).numpy()
  np.testing.assert_allclose(
      inferred, (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + 1e-5)
      * gamma + beta, atol=2e-5)


def test_torch_batch_norm_after_a_dense_layer_is_pytorch_batch_norm_1d():
  x = np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32)
  gamma = np.array([0.5, 1.0, 2.0], np.float32)
  layer = TorchBatchNorm(momentum=0.0, epsilon=1e-5)
  layer.build(x.shape)
  layer.gamma.assign(gamma)
  out = layer(x, training=True).numpy()
  np.testing.assert_allclose(out, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * gamma,
                             atol=1e-5)
  np.testing.assert_allclose(layer.moving_variance.numpy(), x.var(axis=0, ddof=1), rtol=1e-5)
  # Synchronized batch norm (--sync_batch_norm) outside a distribution: the same.
  synchronized = TorchBatchNorm(momentum=0.0, epsilon=1e-5, synchronized=True)
  synchronized(x.reshape(6, 1, 1, 3), training=True)
  np.testing.assert_allclose(synchronized.moving_variance.numpy(), x.var(axis=0, ddof=1),
                             rtol=1e-5)
  assert isinstance(build_model("conv-bn", CIFAR, 10).get_layer("conv_1_bn"), TorchBatchNorm)


SYNCHRONIZED = """
from robust_sparse.core import startup
startup.import_tensorflow()
from robust_sparse.training import distribute
distribute.configure_devices(2)
import numpy as np, tensorflow as tf
from robust_sparse.models.registry import TorchBatchNorm
x = np.random.default_rng(3).normal(1.0, 2.0, size=(8, 3, 3, 4)).astype(np.float32)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
  layer = TorchBatchNorm(momentum=0.0, epsilon=1e-5, synchronized=True)
  layer.build(x.shape)
shards = strategy.experimental_distribute_values_from_function(
    lambda context: x[4 * context.replica_id_in_sync_group:][:4])
outputs = strategy.run(tf.function(lambda shard: layer(shard, training=True)), args=(shards,))
outputs = np.concatenate([t.numpy() for t in strategy.experimental_local_results(outputs)])
mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
np.testing.assert_allclose(outputs, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(layer.moving_variance.numpy(), x.var((0, 1, 2), ddof=1), rtol=1e-5)
print("ok")
"""


def test_synchronized_batch_norm_uses_the_global_batch_on_two_replicas():
  result = subprocess.run([sys.executable, "-c", SYNCHRONIZED], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
