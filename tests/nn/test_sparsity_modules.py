"""Zeroth bias, restricted LayerNorm and the DB-MLP: values, clipping after updates, saving."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.nn import sparsity_modules as sm
from robust_sparse.nn.layers import MaskedDense


def _apply(variable, gradient, learning_rate=1.0):
  """One SGD update through a Keras optimizer (which applies the constraints)."""
  optimizer = keras.optimizers.SGD(learning_rate)
  optimizer.apply([tf.constant(gradient, tf.float32)], [variable])


# ---- ZerothBias -------------------------------------------------------------------------
def test_zeroth_bias_is_zero_initialised_per_token_and_sliced_for_shorter_inputs():
  layer = sm.ZerothBias(clipping=None)
  x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
  np.testing.assert_array_equal(layer(x).numpy(), x)
  assert tuple(layer.bias.shape) == (3, 4)
  values = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
  layer.bias.assign(values)
  np.testing.assert_allclose(layer(x).numpy(), x + values)
  short = np.ones((2, 2, 4), np.float32)  # Two tokens: b[:2].
  np.testing.assert_allclose(layer(short).numpy(), short + values[:2])


def test_zeroth_bias_is_clipped_to_c_after_every_optimizer_update():
  layer = sm.ZerothBias(clipping=0.1)
  layer(np.zeros((1, 2, 3), np.float32))
  _apply(layer.bias, [[-1.0, 0.05, 1.0], [0.2, -0.2, 0.0]])  # b <- -gradient, then clipped.
  np.testing.assert_allclose(layer.bias.numpy(), [[0.1, -0.05, -0.1], [-0.1, 0.1, 0.0]],
                             rtol=1e-6)
  layer.bias.assign([[3.0, -3.0, 0.01], [0.0, 0.0, 0.0]])
  layer.clip()  # The explicit call, for loops without a Keras optimizer.
  np.testing.assert_allclose(layer.bias.numpy(), [[0.1, -0.1, 0.01], [0.0, 0.0, 0.0]],
                             rtol=1e-6)


def test_zeroth_bias_bound_is_c_times_abs_gamma_broadcast_over_tokens():
  layer_norm = keras.layers.LayerNormalization(name="ln")
  layer_norm.build((None, 2, 3))
  layer_norm.gamma.assign([0.5, -2.0, 0.0])
  layer = sm.ZerothBias(clipping=0.1, layer_norm=layer_norm)
  layer(np.zeros((1, 2, 3), np.float32))
  _apply(layer.bias, [[-1.0, -1.0, -1.0], [1.0, 0.1, 1.0]])
  np.testing.assert_allclose(layer.bias.numpy(), [[0.05, 0.2, 0.0], [-0.05, -0.1, 0.0]],
                             rtol=1e-6)
  assert layer.get_config()["layer_norm"] == "ln"


def test_unclipped_zeroth_bias_has_no_constraint():
  layer = sm.ZerothBias(clipping=None)
  layer(np.zeros((1, 2, 3), np.float32))
  assert layer.bias.constraint is None
  _apply(layer.bias, np.full((2, 3), -5.0))
  np.testing.assert_allclose(layer.bias.numpy(), np.full((2, 3), 5.0))


@pytest.mark.parametrize("clipping", [-0.1, "0.1", True])
def test_bad_clipping_is_a_one_line_error_naming_the_flag(clipping):
  with pytest.raises(ValueError, match="zeroth_bias_clipping must be a number >= 0"):
    sm.ZerothBias(clipping=clipping)
  inputs = keras.Input((2, 3))
  with pytest.raises(ValueError, match="zeroth_bias_clipping"):
    sm.doubly_biased_mlp(inputs, hidden_units=4, activation="relu", name="mlp",
                         clipping=clipping)


# ---- RestrictedLayerNorm ----------------------------------------------------------------
def test_restricted_layer_norm_from_scratch_has_no_beta_and_keeps_gamma_at_least_one():
  layer = sm.RestrictedLayerNorm(name="ln2")
  x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  outputs = layer(x).numpy()
  assert layer.beta is None and [v.name for v in layer.trainable_variables] == ["gamma"]
  normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(outputs, normalized, rtol=1e-4, atol=1e-5)
  # gamma = 1 - gradient: [1.5, 0.7, -2, 1] before the restriction.
  _apply(layer.gamma, [-0.5, 0.3, 3.0, 0.0])
  np.testing.assert_allclose(layer.gamma.numpy(), [1.5, 1.0, 1.0, 1.0])
  layer.gamma.assign([0.2, 3.0, -1.0, 1.0])
  layer.restrict()
  np.testing.assert_allclose(layer.gamma.numpy(), [1.0, 3.0, 1.0, 1.0])


def test_restricted_layer_norm_fine_tuning_freezes_beta_and_uplifts_keeping_the_sign():
  layer = sm.RestrictedLayerNorm(mode="fine_tuning", uplift_steps=4)
  layer.build((None, 5))
  assert not layer.beta.trainable
  assert [v.name for v in layer.trainable_variables] == ["gamma"]
  layer.gamma.assign([0.1, -0.1, 0.0, 2.0, -0.9])
  zero = np.zeros(5, np.float32)
  expected = {  # |gamma| <- max(|gamma|, min(s / 4, 1)); 0 counts as +.
      1: [0.25, -0.25, 0.25, 2.0, -0.9],
      2: [0.5, -0.5, 0.5, 2.0, -0.9],
      3: [0.75, -0.75, 0.75, 2.0, -0.9],
      4: [1.0, -1.0, 1.0, 2.0, -1.0],
      5: [1.0, -1.0, 1.0, 2.0, -1.0],
  }
  for step, values in expected.items():
    _apply(layer.gamma, zero)  # A zero gradient: only the restriction moves gamma.
    assert int(layer.uplift_step.numpy()) == step
    np.testing.assert_allclose(layer.gamma.numpy(), values, rtol=1e-6)
  # A trained value above the floor is kept; restrict() is one more update.
  layer.gamma.assign([0.1, -0.5, 1.5, 0.0, 0.0])
  layer.restrict()
  assert int(layer.uplift_step.numpy()) == 6
  np.testing.assert_allclose(layer.gamma.numpy(), [1.0, -1.0, 1.5, 1.0, 1.0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="scratch"), "mode must be one of from_scratch, fine_tuning"),
    (dict(mode="fine_tuning"), "uplift_steps must be an integer >= 1"),
    (dict(mode="fine_tuning", uplift_steps=0), "uplift_steps must be an integer >= 1"),
    (dict(uplift_steps=10), "uplift_steps is for mode 'fine_tuning'"),
    (dict(center=True), "has no beta; received center=True"),
    (dict(scale=False), "needs scale=True"),
])
def test_restricted_layer_norm_refuses_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sm.RestrictedLayerNorm(**kwargs)


# ---- DB-MLP -------------------------------------------------------------------------------
X = np.array([[[1.0, -1.0], [2.0, 0.0]]], np.float32)
B = np.array([[0.5, 0.5], [-1.0, 1.0]], np.float32)


def _block(position):
  inputs = keras.Input((2, 2), name="input")
  outputs = sm.doubly_biased_mlp(inputs, hidden_units=2, activation="relu", name="mlp",
                                 position=position, clipping=None, site="after_dense")
  model = keras.Model(inputs, outputs)
  model.get_layer("mlp_key").set_weights([np.array([[1, -1], [1, 1]], np.float32),
                                          np.array([0, 0.5], np.float32),
                                          np.ones((2, 2), np.float32)])
  model.get_layer("mlp_value").set_weights([np.array([[1, 2], [0, 1]], np.float32),
                                            np.array([0.1, -0.1], np.float32),
                                            np.ones((2, 2), np.float32)])
  model.get_layer("mlp_zeroth_bias").bias.assign(B)
  return model


@pytest.mark.parametrize("position, expected", [
    # x + b = [[1.5, -0.5], [1, 1]]; key: [1, -1.5] -> relu [1, 0], [2, 0.5];
    # value: [1.1, 1.9], [2.1, 4.4].
    ("input", [[1.1, 1.9], [2.1, 4.4]]),
    # key(x): [0, -1.5] -> [0, 0], [2, -1.5] -> [2, 0]; value: [0.1, -0.1],
    # [2.1, 3.9]; + b.
    ("output", [[0.6, 0.4], [1.1, 4.9]]),
])
def test_db_mlp_positions_hand_computed(position, expected):
  model = _block(position)
  np.testing.assert_allclose(model(X).numpy()[0], expected, rtol=1e-6)
  names = [layer.name for layer in model.layers]
  order = (["mlp_zeroth_bias", "mlp_key", "mlp_activation", "mlp_value"] if position == "input"
           else ["mlp_key", "mlp_activation", "mlp_value", "mlp_zeroth_bias"])
  assert names == ["input"] + order
  assert isinstance(model.get_layer("mlp_key"), MaskedDense)
  assert model.get_layer("mlp_activation").site == "after_dense"


def test_db_mlp_without_zeroth_bias_is_the_vanilla_mlp_with_the_same_names():
  inputs = keras.Input((2, 2), name="input")
  model = keras.Model(inputs, sm.doubly_biased_mlp(inputs, hidden_units=3, activation="jsrelu",
                                                   name="mlp", zeroth_bias=False))
  names = [layer.name for layer in model.layers]
  assert names == ["input", "mlp_key", "mlp_activation", "mlp_value"]
  # Fresh initializers per layer: equal shapes, different draws; biases ~ N(0, 1e-6).
  key, value = model.get_layer("mlp_key"), model.get_layer("mlp_value")
  assert not np.allclose(key.kernel.numpy(), value.kernel.numpy().T)
  assert 0 < np.abs(key.bias.numpy()).max() < 1e-4
  with pytest.raises(ValueError, match="zeroth_bias_position must be one of input, output"):
    sm.doubly_biased_mlp(inputs, hidden_units=3, activation="relu", name="m", position="mid")


def _restricted_block():
  inputs = keras.Input((2, 3), name="input")
  layer_norm = sm.RestrictedLayerNorm(name="ln2")
  y = sm.doubly_biased_mlp(layer_norm(inputs), hidden_units=4, activation="jsrelu",
                           name="mlp", clipping=0.1, layer_norm=layer_norm)
  y = keras.layers.Flatten(name="flatten")(y)
  return keras.Model(inputs, MaskedDense(2, name="output")(y))


def test_fit_restricts_after_every_step_and_a_reloaded_model_still_does(tmp_path):
  keras.utils.set_random_seed(0)
  model = _restricted_block()
  layer_norm, bias = model.get_layer("ln2"), model.get_layer("mlp_zeroth_bias")
  x = np.random.default_rng(0).normal(size=(8, 2, 3)).astype(np.float32)
  y = np.arange(8) % 2
  model.compile(optimizer=keras.optimizers.SGD(50.0),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(x, y, batch_size=4, epochs=1, verbose=0)
  gamma = layer_norm.gamma.numpy()
  assert np.all(gamma >= 1.0) and np.any(gamma == 1.0)  # Large steps: clamped at 1.
  b = bias.bias.numpy()
  bound = 0.1 * np.abs(gamma)
  assert np.all(np.abs(b) <= bound + 1e-7)
  assert np.any(np.isclose(np.abs(b), bound))  # The large steps hit the bound.
  # Logged values.
  np.testing.assert_allclose(sm.mean_abs_zeroth_bias(model).numpy(), np.abs(b).mean(),
                             rtol=1e-6)
  np.testing.assert_allclose(sm.mean_abs_layer_norm_scale(model).numpy(), gamma.mean(),
                             rtol=1e-6)
  assert set(sm.mean_abs_zeroth_bias(model, per_layer=True)) == {"mlp_zeroth_bias"}

  path = os.path.join(tmp_path, "block.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  np.testing.assert_array_equal(reloaded(x).numpy(), model(x).numpy())
  reloaded_bias = reloaded.get_layer("mlp_zeroth_bias")
  assert reloaded_bias.layer_norm is reloaded.get_layer("ln2")  # Found again by name.
  reloaded.get_layer("ln2").gamma.assign(np.full(3, 2.0))
  reloaded_bias.bias.assign(np.full((2, 3), 5.0))
  sm.apply_restrictions(reloaded)
  np.testing.assert_allclose(reloaded_bias.bias.numpy(), np.full((2, 3), 0.2), rtol=1e-6)


def test_a_named_layer_norm_that_is_not_upstream_is_an_error():
  layer = sm.ZerothBias(clipping=0.1, layer_norm="ln_elsewhere", name="zb")
  layer(np.zeros((1, 2, 3), np.float32))
  with pytest.raises(ValueError, match="layer_norm 'ln_elsewhere' is not upstream"):
    layer.clip()
