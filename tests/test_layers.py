"""MaskedDense / MaskedConv2D: drop-in config, `.keras` round trip, pruned weights inert."""

import numpy as np
import keras
import pytest
import tensorflow as tf

from robust_sparse.layers import MaskedConv2D, MaskedDense, masked_layers


def _model():
  inputs = keras.Input((6, 6, 2))
  x = MaskedConv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
  x = keras.layers.Flatten()(x)
  x = MaskedDense(5, use_bias=False, name="dense")(x)
  return keras.Model(inputs, x)


@pytest.mark.parametrize("layer_class,base,kwargs", [
    (MaskedDense, keras.layers.Dense, dict(units=4, use_bias=False, activation="tanh")),
    (MaskedConv2D, keras.layers.Conv2D, dict(filters=3, kernel_size=2, strides=2)),
])
def test_same_config_as_keras_layer(layer_class, base, kwargs):
  masked, plain = layer_class(**kwargs), base(**kwargs)
  assert masked.get_config() == plain.get_config() | {"name": masked.name}
  clone = layer_class.from_config(masked.get_config())
  assert clone.get_config() == masked.get_config()


def test_mask_is_non_trainable_weight_of_kernel_shape():
  model = _model()
  for layer in masked_layers(model):
    assert layer.mask.shape == layer.raw_kernel.shape
    assert not layer.mask.trainable
    assert any(v is layer.mask for v in layer.non_trainable_weights)


def test_keras_round_trip_keeps_masks_and_outputs(tmp_path):
  model = _model()
  rng = np.random.default_rng(0)
  for layer in masked_layers(model):
    layer.mask.assign((rng.random(layer.mask.shape) > 0.5).astype("float32"))
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  x = rng.random((4, 6, 6, 2)).astype("float32")
  np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())
  for a, b in zip(masked_layers(model), masked_layers(loaded)):
    assert type(a) is type(b)
    np.testing.assert_array_equal(a.mask.numpy(), b.mask.numpy())
    np.testing.assert_array_equal(a.raw_kernel.numpy(), b.raw_kernel.numpy())


def test_pruned_weights_change_nothing_and_get_no_gradient():
  model = _model()
  x = np.random.default_rng(1).random((4, 6, 6, 2)).astype("float32")
  for layer in masked_layers(model):
    mask = np.ones(layer.mask.shape, np.float32)
    mask.reshape(-1)[::3] = 0.0
    layer.mask.assign(mask)
  before = model(x).numpy()
  for layer in masked_layers(model):
    # Change only the pruned weights: outputs must not move.
    layer.raw_kernel.assign(layer.raw_kernel + 100.0 * (1.0 - layer.mask))
  np.testing.assert_array_equal(before, model(x).numpy())
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(x) ** 2)
  kernels = [layer.raw_kernel for layer in masked_layers(model)]
  for layer, grad in zip(masked_layers(model), tape.gradient(loss, kernels)):
    pruned = layer.mask.numpy() == 0
    assert np.all(grad.numpy()[pruned] == 0.0)
    assert np.any(grad.numpy()[~pruned] != 0.0)


def test_all_ones_mask_equals_plain_dense():
  x = np.random.default_rng(2).random((3, 7)).astype("float32")
  masked, plain = MaskedDense(4, name="a"), keras.layers.Dense(4, name="b")
  masked.build((None, 7)); plain.build((None, 7))
  plain.set_weights([masked.raw_kernel.numpy(), masked.bias.numpy()])
  np.testing.assert_allclose(masked(x).numpy(), plain(x).numpy(), rtol=1e-6)
