"""Activation statistics: hand-made values, direct counts and GradientTape references."""

import csv
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.measure import activation_stats as st
from robust_sparse.nn import activations
from robust_sparse.nn.layers import MaskedDense

X = tf.constant([-2.0, 0.0, 1e-7, 0.5, 3.0])


def test_relu_sparsity_concentration_and_derivative_by_hand():
  relu = activations.build("relu")
  # Outputs [0, 0, 1e-7, 0.5, 3]: three within |a| <= 1e-6; x <= 0 twice.
  assert float(st.activation_sparsity(relu, X)) == pytest.approx(3 / 5)
  assert float(st.pre_activation_concentration(relu, X)) == pytest.approx(2 / 5)
  # tf.nn.relu's derivative: 0 at x <= 0, 1 above.
  assert float(st.mean_squared_derivative(relu, X)) == pytest.approx(3 / 5)
  # jsrelu: f' = (x + 1) 1[x >= 0] = [0, 1, 1, 1.5, 4].
  assert float(st.mean_squared_derivative("jsrelu", X)) == pytest.approx(
      (0 + 1 + (1 + 1e-7) ** 2 + 2.25 + 16) / 5)


def test_shifted_habitat_and_activations_without_one():
  shift = activations.build("shift(inner=relu,sx=1,sy=0.5)")
  x = tf.constant([-2.0, 0.0, 1.0, 1.5, 3.0])  # y = [0.5, 0.5, 0.5, 1, 2.5]
  assert float(st.activation_sparsity(shift, x)) == pytest.approx(3 / 5)
  assert float(st.pre_activation_concentration(shift, x)) == pytest.approx(3 / 5)
  assert np.isnan(float(st.activation_sparsity("weird_leaky_relu", x)))


def _two_activation_model():
  inputs = keras.Input((6,), name="input")
  h = MaskedDense(8, name="key1")(inputs)
  h = activations.build("relu", name="key1_activation")(h)
  h = MaskedDense(5, name="key2")(h)
  h = activations.build("jsrelu", name="key2_activation")(h)
  return keras.Model(inputs, MaskedDense(3, name="output")(h))


def _data(count=12, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(count, 6)).astype(np.float32),
          rng.integers(0, 3, size=count).astype(np.int32))


def test_gradient_measurements_equal_a_direct_gradient_tape_computation():
  keras.utils.set_random_seed(1)
  model = _two_activation_model()
  mask = np.ones((6, 8), np.float32)
  mask[0] = 0.0  # A pruned row: W_key is the masked kernel.
  model.get_layer("key1").mask.assign(mask)
  x, y = _data()
  thresholds = (1e-9, 1e-6, 1e-3, 3e-2)
  tap = st.ActivationTap(model)
  assert tap.names == ["key1_activation", "key2_activation"]
  stats = tap.statistics(thresholds=thresholds)
  tap.measure(stats, x, y)
  results = stats.results()

  key1, key2, output = (model.get_layer(n) for n in ("key1", "key2", "output"))
  with tf.GradientTape() as tape:
    pre1 = key1(x)
    post1 = tf.nn.relu(pre1)
    pre2 = key2(post1)
    post2 = tf.where(pre2 >= 0, pre2 + pre2 ** 2 / 2, 0.0)
    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, output(post2)))
  g1, g2 = tape.gradient(loss, [post1, post2])
  derivatives = [tf.cast(pre1 > 0, tf.float32), tf.where(pre2 >= 0, pre2 + 1, 0.0)]
  for name, g, derivative in zip(tap.names, [g1, g2], derivatives):
    eta = np.abs((g * derivative).numpy())
    for p in thresholds:
      key = f"effective_gradient_sparsity/{p:g}/{name}"
      assert results[key] == pytest.approx(np.mean(eta < p), abs=1e-12), key
    assert results[f"spectral_increase/M/{name}"] == pytest.approx(
        np.mean(np.sum(g.numpy() ** 2, -1)), rel=1e-5)
  # Some entries are zero, some are not: the fractions test something.
  assert 0 < results["effective_gradient_sparsity/0.03/key1_activation"] < 1
  kernel = key1.kernel.numpy() * mask
  assert results["spectral_increase/kkT/key1_activation"] == pytest.approx(
      np.sum(kernel ** 2), rel=1e-6)
  assert results["spectral_increase/kkT/key1_activation"] < np.sum(key1.kernel.numpy() ** 2)
  np.testing.assert_allclose(results["mean_squared_derivative/key2_activation"],
                             np.mean(derivatives[1].numpy() ** 2), rtol=1e-5)
  assert results["activation_sparsity/average"] == pytest.approx(
      (results["activation_sparsity/key1_activation"]
       + results["activation_sparsity/key2_activation"]) / 2)


def test_accumulator_pools_batches_in_a_compiled_function_and_resets():
  relu = activations.build("relu", name="act")
  stats = st.ActivationStatistics([relu], measure=["activation_sparsity"], max_samples=3)
  first = tf.constant([[-1.0, 2.0], [0.0, 0.0], [3.0, -4.0], [5.0, 5.0]])  # Row 4 ignored.
  second = tf.constant([[1.0, 1.0]])
  update = tf.function(lambda x: stats.update([x]))
  update(first)
  update(second)
  results = stats.results()
  # Zeros: 4 of the first 6 entries, 0 of 2 more.
  assert results["activation_sparsity/act"] == pytest.approx(4 / 8)
  assert results["activation_sparsity/average"] == pytest.approx(4 / 8)
  assert set(results) == {f"{m}/{n}" for m in ("activation_sparsity",
                                               "pre_activation_concentration",
                                               "mean_squared_derivative")
                          for n in ("act", "average")}
  assert len(stats.variables()) == 10 and not any(v.trainable for v in stats.variables())
  stats.reset()
  assert np.isnan(stats.results()["activation_sparsity/act"])


def test_callback_sparsity_equals_a_direct_count_on_the_same_batch(tmp_path):
  keras.utils.set_random_seed(0)
  model = _two_activation_model()
  model.compile(optimizer=keras.optimizers.Adam(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  x, y = _data(16)
  callback = st.ActivationSparsityCallback((x[:8], y[:8]), log_every=3,
                                           measure=["activation_sparsity"])
  log = os.path.join(tmp_path, "log.csv")
  history = model.fit(x, y, batch_size=4, epochs=2, verbose=0,
                      callbacks=[callback, keras.callbacks.CSVLogger(log)])
  # Measured after batches 3 and 6 and at both epoch ends (steps 4 and 8).
  assert [step for step, _ in callback.history] == [3, 4, 6, 8]
  # The last measurement used the final weights: count directly.
  for name in ("key1_activation", "key2_activation"):
    outputs = keras.Model(model.input, model.get_layer(name).output)(x[:8]).numpy()
    direct = np.mean(np.abs(outputs) <= 1e-6)
    key = f"train/activation_sparsity/{name}"
    assert history.history[key][-1] == pytest.approx(direct, abs=1e-12)
    assert 0 < direct < 1
  with open(log) as handle:
    rows = list(csv.DictReader(handle))
  assert float(rows[-1]["train/activation_sparsity/average"]) == pytest.approx(
      history.history["train/activation_sparsity/average"][-1])


def test_bad_inputs_are_one_line_errors():
  relu = activations.build("relu")
  with pytest.raises(ValueError, match="unknown measurement 'sparsity' .*known: "
                     "activation_sparsity, effective_gradient_sparsity, spectral_increase"):
    st.ActivationStatistics([relu], measure=["sparsity"])
  with pytest.raises(ValueError, match="one name per activation"):
    st.ActivationStatistics([relu], names=["a", "b"])
  with pytest.raises(ValueError, match="need one output gradient per activation"):
    st.ActivationStatistics([relu]).update([tf.zeros((2, 3))])
  with pytest.raises(ValueError, match="log_every must be a positive integer"):
    st.ActivationSparsityCallback(_data(), log_every=0)

  class Subclassed(keras.Model):
    def call(self, inputs):
      return inputs

  with pytest.raises(ValueError, match="needs a functional model"):
    st.ActivationTap(Subclassed())
  plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match="has no activation layers"):
    st.ActivationTap(plain)
  tap = st.ActivationTap(_two_activation_model())
  with pytest.raises(ValueError, match="need labels y"):
    tap.measure(tap.statistics(), _data()[0])
