"""MaskedDense / MaskedConv2D: Keras drop-ins whose pruned weights are inert.

Covers: the same config as Keras' layers; `kernel` is the variable itself
(assignable, differentiable); pruned weights change no output and get exactly
zero gradient (regularisers included); the mask holds through optimizer updates
with momentum and decoupled weight decay, composed with the user's constraint;
sparse inputs; LoRA; the refusal to quantize and `strip_masks`; `.keras` and
weights-file round trips in the stored format.
"""

import numpy as np
import keras
import pytest
import tensorflow as tf

from robust_sparse.nn.layers import MaskedConv2D, MaskedDense, masked_layers, strip_masks

QUANTIZATION_MODES = ["int8", "float8", "int4"]


def _model():
  inputs = keras.Input((6, 6, 2))
  x = MaskedConv2D(3, 3, padding="same", activation="relu", name="conv")(inputs)
  x = keras.layers.Flatten()(x)
  x = MaskedDense(5, use_bias=False, name="dense")(x)
  return keras.Model(inputs, x)


def _prune_every_third(layer):
  """Prunes every third weight; returns the mask as a numpy array."""
  mask = np.ones(layer.mask.shape, np.float32)
  mask.reshape(-1)[::3] = 0.0
  layer.mask.assign(mask)
  return mask


def _dense(units=4, input_dim=6, **kwargs):
  layer = MaskedDense(units, **kwargs)
  layer.build((None, input_dim))
  return layer


def _built_conv(**kwargs):
  layer = MaskedConv2D(3, 2, **kwargs)
  layer.build((None, 5, 5, 2))
  return layer


def _inputs(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype("float32")


# ---- drop-in: config and attributes ------------------------------------------------
@pytest.mark.parametrize("layer_class,base,kwargs", [
    (MaskedDense, keras.layers.Dense, dict(units=4, use_bias=False, activation="tanh")),
    (MaskedDense, keras.layers.Dense, dict(units=4, kernel_constraint="non_neg",
                                           kernel_regularizer="l1")),
    (MaskedDense, keras.layers.Dense, dict(units=4, lora_rank=2, lora_alpha=3)),
    (MaskedConv2D, keras.layers.Conv2D, dict(filters=3, kernel_size=2, strides=2)),
    (MaskedConv2D, keras.layers.Conv2D, dict(filters=3, kernel_size=2,
                                             kernel_constraint="max_norm")),
])
def test_same_config_as_keras_layer(layer_class, base, kwargs):
  masked, plain = layer_class(**kwargs), base(**kwargs)
  assert masked.get_config() == plain.get_config() | {"name": masked.name}
  clone = layer_class.from_config(masked.get_config())
  assert clone.get_config() == masked.get_config()


def test_config_reports_the_users_constraint_only_after_build():
  layer = _dense(kernel_constraint="non_neg")
  assert layer.get_config()["kernel_constraint"] == keras.constraints.serialize(
      keras.constraints.NonNeg())
  # ... although the variable's constraint also applies the mask.
  assert layer.kernel.constraint is not None
  assert not isinstance(layer.kernel.constraint, keras.constraints.NonNeg)


def test_mask_is_non_trainable_weight_of_kernel_shape():
  model = _model()
  for layer in masked_layers(model):
    assert layer.mask.shape == layer.raw_kernel.shape
    assert layer.mask.name == "mask"
    assert not layer.mask.trainable
    assert any(v is layer.mask for v in layer.non_trainable_weights)
    np.testing.assert_array_equal(layer.mask.numpy(), 1.0)


@pytest.mark.parametrize("make_layer", [lambda: _dense(), lambda: _built_conv()],
                         ids=["dense", "conv"])
def test_kernel_is_the_trainable_variable(make_layer):
  layer = make_layer()
  assert isinstance(layer.kernel, keras.Variable)
  assert layer.kernel is layer.raw_kernel
  assert any(v is layer.kernel for v in layer.trainable_weights)


def test_kernel_assign_is_what_the_layer_computes_with():
  layer = _dense(use_bias=False)
  mask = _prune_every_third(layer)
  new_kernel = _inputs((6, 4), seed=1)
  layer.kernel.assign(new_kernel)
  np.testing.assert_array_equal(layer.kernel.numpy(), new_kernel)
  x = _inputs((3, 6))
  np.testing.assert_allclose(layer(x).numpy(), x @ (new_kernel * mask), rtol=1e-5, atol=1e-6)


def test_all_ones_mask_equals_plain_dense():
  x = _inputs((3, 7), seed=2)
  masked, plain = MaskedDense(4, name="a"), keras.layers.Dense(4, name="b")
  masked.build((None, 7)); plain.build((None, 7))
  plain.set_weights([masked.raw_kernel.numpy(), masked.bias.numpy()])
  np.testing.assert_allclose(masked(x).numpy(), plain(x).numpy(), rtol=1e-6)


def test_conv_equals_plain_conv_with_masked_kernel():
  masked = _built_conv(activation="relu")
  plain = keras.layers.Conv2D(3, 2, activation="relu")
  plain.build((None, 5, 5, 2))
  mask = _prune_every_third(masked)
  masked.bias.assign([0.1, -0.2, 0.3])
  plain.set_weights([masked.kernel.numpy() * mask, masked.bias.numpy()])
  x = _inputs((2, 5, 5, 2))
  np.testing.assert_allclose(masked(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-6)


# ---- pruned weights are inert ---------------------------------------------------------
def test_pruned_weights_change_nothing_and_get_no_gradient():
  model = _model()
  x = _inputs((4, 6, 6, 2), seed=1)
  for layer in masked_layers(model):
    _prune_every_third(layer)
  before = model(x).numpy()
  for layer in masked_layers(model):
    # Change only the pruned weights: outputs must not move.
    layer.raw_kernel.assign(layer.raw_kernel + 100.0 * (1.0 - layer.mask))
  np.testing.assert_array_equal(before, model(x).numpy())
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(x) ** 2)
  kernels = [layer.kernel for layer in masked_layers(model)]
  for layer, grad in zip(masked_layers(model), tape.gradient(loss, kernels)):
    assert grad is not None
    pruned = layer.mask.numpy() == 0
    assert np.all(grad.numpy()[pruned] == 0.0)
    assert np.any(grad.numpy()[~pruned] != 0.0)


def test_gradient_is_the_masked_gradient_of_the_plain_computation():
  layer = _dense(use_bias=False)
  mask = _prune_every_third(layer)
  x = tf.constant(_inputs((3, 6)))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(tf.sin(layer(x)))
  grad = tape.gradient(loss, layer.kernel)
  effective = tf.constant(layer.kernel.numpy() * mask)
  with tf.GradientTape() as tape:
    tape.watch(effective)
    loss = tf.reduce_sum(tf.sin(x @ effective))
  expected = tape.gradient(loss, effective).numpy() * mask
  np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make_layer,input_shape", [
    (lambda: MaskedDense(4, kernel_regularizer=keras.regularizers.L1(0.1)), (3, 6)),
    (lambda: MaskedConv2D(3, 2, kernel_regularizer=keras.regularizers.L2(0.1)), (2, 5, 5, 2)),
], ids=["dense-l1", "conv-l2"])
def test_regularizer_sees_the_masked_kernel(make_layer, input_shape):
  layer = make_layer()
  layer.build((None,) + input_shape[1:])
  mask = _prune_every_third(layer)
  x = _inputs(input_shape)
  with tf.GradientTape() as tape:
    y = layer(x)
    loss = tf.reduce_sum(y) + tf.add_n(layer.losses)
  grad = tape.gradient(loss, layer.kernel).numpy()
  assert np.all(grad[mask == 0] == 0.0)
  expected = layer.kernel_regularizer(layer.kernel.numpy() * mask)
  np.testing.assert_allclose(float(tf.add_n(layer.losses)), float(expected), rtol=1e-6)


# ---- the mask survives optimizer updates -------------------------------------------------
def _fit_after_pruning(optimizer, **layer_kwargs):
  """Trains, prunes without zeroing the kernel, trains again.

  Returns:
    (layer, mask, the kernel before the second fit).
  """
  layer = MaskedDense(4, **layer_kwargs)
  model = keras.Sequential([keras.Input((6,)), layer])
  model.compile(optimizer=optimizer, loss="mse")
  x, y = _inputs((32, 6)), _inputs((32, 4), seed=1)
  # The first fit builds momentum at every weight, so the second one would
  # move pruned weights but for the constraint.
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  mask = _prune_every_third(layer)
  # Non-zero (and non-negative) everywhere, pruned weights included.
  layer.kernel.assign(np.abs(layer.kernel.numpy()) + 0.1)
  before = layer.kernel.numpy()
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  return layer, mask, before


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    lambda: keras.optimizers.AdamW(0.05, weight_decay=0.1),
], ids=["sgd-momentum", "adamw"])
def test_pruned_weights_are_exact_zeros_after_fit(optimizer):
  layer, mask, before = _fit_after_pruning(optimizer())
  after = layer.kernel.numpy()
  assert np.all(after[mask == 0] == 0.0)
  assert np.all(after[mask == 1] != before[mask == 1])


def test_users_constraint_composes_with_the_mask():
  layer, mask, _ = _fit_after_pruning(keras.optimizers.SGD(0.5, momentum=0.9),
                                      kernel_constraint="non_neg")
  after = layer.kernel.numpy()
  assert np.all(after >= 0.0)
  assert np.all(after[mask == 0] == 0.0)
  assert np.any(after[mask == 1] > 0.0)


class _AddOne(keras.constraints.Constraint):
  """A constraint that would revive pruned weights if it ran after the mask."""

  def __call__(self, w):
    return w + 1.0


def test_mask_applies_after_the_users_constraint():
  layer = _dense(kernel_constraint=_AddOne())
  mask = _prune_every_third(layer)
  w = _inputs((6, 4))
  np.testing.assert_array_equal(layer.kernel.constraint(w).numpy(), (w + 1.0) * mask)


# ---- sparse inputs ---------------------------------------------------------------------------
def test_sparse_inputs_match_dense_and_keep_a_sparse_gradient():
  layer = _dense(units=5, input_dim=10)
  mask = _prune_every_third(layer)
  dense_x = _inputs((8, 10))
  dense_x[np.abs(dense_x) < 1.0] = 0.0
  sparse_x = tf.sparse.from_dense(dense_x)
  expected = dense_x @ (layer.kernel.numpy() * mask) + layer.bias.numpy()

  @tf.function
  def graph_call(x):
    with tf.GradientTape() as tape:
      y = layer(x)
    return y, tape.gradient(y, layer.kernel)

  def eager_call(x):
    with tf.GradientTape() as tape:
      y = layer(x)
    return y, tape.gradient(y, layer.kernel)

  for call in (eager_call, graph_call):
    outputs, grad = call(sparse_x)
    np.testing.assert_allclose(outputs.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(grad, tf.IndexedSlices)
    grad = tf.convert_to_tensor(grad).numpy()
    assert np.all(grad[mask == 0] == 0.0)
    # d sum(y) / dK[i, j] = sum over the batch of x[:, i], where active.
    np.testing.assert_allclose(grad, np.broadcast_to(dense_x.sum(0)[:, None], grad.shape) * mask,
                               rtol=1e-5, atol=1e-6)


# ---- LoRA ------------------------------------------------------------------------------------
def _effective(layer):
  """(kernel + alpha / rank * A @ B) * mask, in numpy."""
  delta = layer.lora_alpha / layer.lora_rank * (
      layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy())
  return (layer.raw_kernel.numpy() + delta) * layer.mask.numpy()


@pytest.mark.parametrize("how", ["constructor", "enable_lora"])
def test_lora_builds_trains_and_stays_masked(how, tmp_path):
  if how == "constructor":
    layer = _dense(units=5, lora_rank=2, lora_alpha=3)
  else:
    layer = _dense(units=5)
    layer.enable_lora(2, lora_alpha=3)
  assert layer.lora_enabled and layer.lora_rank == 2 and layer.lora_alpha == 3
  assert len(layer.trainable_weights) == 3  # lora_kernel_a, lora_kernel_b, bias
  assert len(layer.non_trainable_weights) == 2  # kernel, mask
  mask = _prune_every_third(layer)
  model = keras.Sequential([keras.Input((6,)), layer])
  model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
  b_before = layer.lora_kernel_b.numpy()
  x, y = _inputs((32, 6)), _inputs((32, 5), seed=1)
  model.fit(x, y, batch_size=8, epochs=2, verbose=0)
  assert np.any(layer.lora_kernel_b.numpy() != b_before)
  # The delta is non-zero everywhere, yet pruned positions stay exact zeros.
  delta = layer.lora_kernel_a.numpy() @ layer.lora_kernel_b.numpy()
  assert np.all(delta[mask == 0] != 0.0)
  effective = layer.kernel.numpy()
  assert np.all(effective[mask == 0] == 0.0)
  np.testing.assert_allclose(effective, _effective(layer), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model(x).numpy(), x @ effective + layer.bias.numpy(),
                             rtol=1e-5, atol=1e-5)

  path = str(tmp_path / "lora.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  assert loaded.layers[0].lora_enabled
  np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())
  np.testing.assert_array_equal(loaded.layers[0].mask.numpy(), mask)


def test_conv_lora_is_masked():
  layer = _built_conv(lora_rank=2)
  assert layer.lora_enabled
  mask = _prune_every_third(layer)
  layer.lora_kernel_b.assign(_inputs(layer.lora_kernel_b.shape))
  assert np.all(layer.kernel.numpy()[mask == 0] == 0.0)
  np.testing.assert_allclose(layer.kernel.numpy(), _effective(layer), rtol=1e-5, atol=1e-6)


def test_lora_with_kernel_constraint_is_refused_as_in_keras():
  layer = _dense(kernel_constraint="max_norm")
  with pytest.raises(ValueError, match="incompatible with kernel constraints"):
    layer.enable_lora(2)


# ---- quantization is refused; strip_masks is the way ---------------------------------
@pytest.mark.parametrize("mode", QUANTIZATION_MODES)
@pytest.mark.parametrize("make_layer", [lambda: _dense(), lambda: _built_conv()],
                         ids=["dense", "conv"])
def test_quantize_is_refused_with_a_way_out(make_layer, mode):
  layer = make_layer()
  with pytest.raises(NotImplementedError, match="strip_masks") as raised:
    layer.quantize(mode)
  # Keras' own message for a layer without quantization, then the way out.
  assert str(raised.value).startswith(
      f"Layer {type(layer).__name__} does not have a `quantize` method implemented.")
  assert layer.quantization_mode is None


@pytest.mark.parametrize("policy", ["int8_from_float32", "float8_from_float32"])
def test_quantized_dtype_policy_is_refused(policy):
  with pytest.raises(ValueError, match=policy):
    MaskedDense(4, dtype=policy)
  layer = _dense()
  with pytest.raises(ValueError, match="strip_masks"):
    layer.dtype_policy = policy
  assert layer.dtype_policy.name == "float32"


def test_quantized_entry_of_a_policy_map_is_refused_at_build():
  policy_map = keras.dtype_policies.DTypePolicyMap(default_policy="float32")
  policy_map["quantized"] = keras.dtype_policies.get("int8_from_float32")
  MaskedDense(4, dtype=policy_map, name="plain").build((None, 3))
  layer = MaskedDense(4, dtype=policy_map, name="quantized")
  with pytest.raises(ValueError, match="int8_from_float32"):
    layer.build((None, 3))


def test_model_quantize_skips_masked_layers_and_leaves_no_half_quantized_layer():
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="plain"),
                            MaskedDense(3, name="masked")])
  masked = model.get_layer("masked")
  masked.mask.assign((np.arange(15).reshape(5, 3) % 2).astype(np.float32))
  x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
  before = model(x).numpy()
  with pytest.warns(UserWarning, match="does not have a `quantize` method"):
    model.quantize("int8")  # One call, no exception.
  assert model.get_layer("plain").quantization_mode == "int8"
  assert masked.quantization_mode is None and masked.dtype_policy.name == "float32"
  assert masked.mask.dtype == "float32" and masked.kernel.dtype == "float32"
  np.testing.assert_allclose(model(x).numpy(), before, atol=0.1)  # int8 rounding only.
  assert np.all(masked.masked_kernel.numpy()[masked.mask.numpy() == 0] == 0)
  model.predict(x, verbose=0)


def test_strip_masks_then_quantize():
  inputs = keras.Input((8,))
  hidden = MaskedDense(16, activation="relu", name="hidden")(inputs)
  outputs = MaskedDense(4, lora_rank=2, name="out")(
      keras.layers.BatchNormalization(name="bn")(hidden))
  model = keras.Model(inputs, outputs)
  for layer in masked_layers(model):
    _prune_every_third(layer)
  out = model.get_layer("out")
  out.lora_kernel_b.assign(_inputs(out.lora_kernel_b.shape))
  x = _inputs((16, 8))

  stripped = strip_masks(model)
  assert not masked_layers(stripped)
  assert [type(layer) for layer in stripped.layers[1:]] == [
      keras.layers.Dense, keras.layers.BatchNormalization, keras.layers.Dense]
  assert not stripped.get_layer("out").lora_enabled
  np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)

  stripped.quantize("int8")
  for name in ("hidden", "out"):
    quantized, mask = stripped.get_layer(name), model.get_layer(name).mask.numpy()
    assert quantized.quantization_mode == "int8"
    assert np.all(quantized._kernel.numpy()[mask == 0] == 0)
  scale = np.abs(model(x).numpy()).max()
  np.testing.assert_allclose(stripped(x).numpy(), model(x).numpy(), atol=0.05 * scale)


# ---- saving ---------------------------------------------------------------------------------
def test_keras_round_trip_keeps_masks_and_outputs(tmp_path):
  model = _model()
  rng = np.random.default_rng(0)
  for layer in masked_layers(model):
    layer.mask.assign((rng.random(layer.mask.shape) > 0.5).astype("float32"))
    # Pruned values that are not zero must come back too.
    layer.kernel.assign(layer.kernel + 1.0)
  model.get_layer("conv").bias.assign([0.5, -0.25, 2.0])
  path = str(tmp_path / "model.keras")
  model.save(path)
  loaded = keras.models.load_model(path)
  x = rng.random((4, 6, 6, 2)).astype("float32")
  np.testing.assert_array_equal(model(x).numpy(), loaded(x).numpy())
  for a, b in zip(masked_layers(model), masked_layers(loaded)):
    assert type(a) is type(b)
    assert len(a.weights) == len(b.weights)
    for va, vb in zip(a.weights, b.weights):
      assert va.name == vb.name
      np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_weights_file_round_trip(tmp_path):
  model, other = _model(), _model()
  for layer in masked_layers(model):
    _prune_every_third(layer)
  path = str(tmp_path / "model.weights.h5")
  model.save_weights(path)
  other.load_weights(path)
  for va, vb in zip(model.weights, other.weights):
    np.testing.assert_array_equal(va.numpy(), vb.numpy())


def test_stored_format_is_keras_entries_plus_mask():
  # Earlier versions wrote {"0": raw kernel, "1": bias, "mask": mask}; files
  # they saved load only while this stays the format.
  layer = _dense()
  mask = _prune_every_third(layer)
  store = {}
  layer.save_own_variables(store)
  assert sorted(store) == ["0", "1", "mask"]
  np.testing.assert_array_equal(np.asarray(store["0"]), layer.kernel.numpy())
  np.testing.assert_array_equal(np.asarray(store["mask"]), mask)

  legacy = {"0": _inputs((6, 4)), "1": _inputs((4,), seed=1), "mask": 1.0 - mask}
  fresh = _dense()
  fresh.load_own_variables(legacy)
  np.testing.assert_array_equal(fresh.kernel.numpy(), legacy["0"])
  np.testing.assert_array_equal(fresh.bias.numpy(), legacy["1"])
  np.testing.assert_array_equal(fresh.mask.numpy(), legacy["mask"])


# ---- dtype policies ----------------------------------------------------------------------------
def test_mixed_precision_computes_in_float16_with_a_float32_mask():
  layer = _dense(dtype="mixed_float16", use_bias=False)
  mask = _prune_every_third(layer)
  assert layer.mask.dtype == "float32"
  x = _inputs((3, 6))
  y = layer(x)
  assert y.dtype == tf.float16
  np.testing.assert_allclose(y.numpy(), x @ (layer.kernel.numpy() * mask), rtol=1e-2, atol=1e-2)


def test_masked_layers_lists_nested_models_in_call_order():
  inner = keras.Sequential([keras.Input((4,)), MaskedDense(3, name="a"),
                            MaskedDense(2, name="b")])
  outer = keras.Sequential([keras.Input((5,)), MaskedDense(4, name="first"), inner,
                            keras.layers.ReLU(), MaskedDense(1, name="output")])
  assert [layer.name for layer in masked_layers(outer)] == [
      "first", "a", "b", "output"]
