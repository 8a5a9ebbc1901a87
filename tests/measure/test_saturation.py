"""Layer saturation: delve's rule, float64 streaming covariances, taps and the fit callback.

Activations are built with an exactly known covariance spectrum, so the
designed intrinsic dimensionality is known, and every measurement is compared
with a float64 NumPy computation of the formula on the same layer outputs.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.measure import saturation
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense

# d = 16: c = .533, .800, .933, .9998, ... -> at delta .99 three ratios are below, so
# delve's k = 3 (the intended rule adds one: .99 - .933 > .02); at delta .95 k = 3 (both).
DENSE_SPECTRUM = [4.0, 2.0, 1.0, 0.5] + [1e-4] * 12
# d = 6: c = .667, .889, .99993, ... -> delve's k = 2 at delta .99 (intended: 3).
CONV_SPECTRUM = [3.0, 1.0, 0.5, 1e-4, 1e-4, 1e-4]


def _with_spectrum(n, spectrum, seed=0, mean=0.5):
  """n rows whose biased covariance has exactly the eigenvalues `spectrum`."""
  rng = np.random.default_rng(seed)
  d = len(spectrum)
  z = rng.normal(size=(n, d))
  z -= z.mean(axis=0)
  u, _, _ = np.linalg.svd(z, full_matrices=False)  # Centred, orthonormal columns.
  rotation, _ = np.linalg.qr(rng.normal(size=(d, d)))
  return (u * math.sqrt(n)) * np.sqrt(spectrum) @ rotation.T + mean


def _reference(rows, delta, rule="delve"):
  """(saturation, k) of rows by delve's formula (or its docstring's), np.cov in float64."""
  covariance = np.cov(np.asarray(rows, np.float64), rowvar=False, bias=True)
  eigenvalues = np.clip(np.sort(np.linalg.eigvalsh(covariance))[::-1], 0.0, None)
  ratios = np.cumsum(eigenvalues) / eigenvalues.sum()
  k = int(np.sum(ratios < delta))
  if rule == "intended":
    if k == 0:
      k = 1
    elif delta - ratios[k - 1] > 0.02:
      k += 1
  return k / len(eigenvalues), k


def _identity_dense(width):
  inputs = keras.Input((width,))
  outputs = MaskedDense(width, kernel_initializer="identity", bias_initializer="zeros",
                        name="dense")(inputs)
  return keras.Model(inputs, outputs)


def _identity_conv(channels):
  inputs = keras.Input((8, 8, channels))
  x = MaskedConv2D(channels, 1, use_bias=False, name="conv",
                   kernel_initializer=lambda shape, dtype=None: tf.eye(channels, batch_shape=[1, 1],
                                                                      dtype=dtype))(inputs)
  return keras.Model(inputs, x)


def _feed(model, tracker, batches, split="train"):
  """Feeds batches through the tap model inside one compiled function, as the engine does."""
  taps = saturation.tap_model(model, tracker.layer_names)

  @tf.function
  def step(x):
    outputs = taps(x, training=split == "train")
    tracker.update(outputs[1:], split)
    return outputs[0]

  return [step(tf.constant(b, tf.float32)).numpy() for b in batches]


# ---- the rule -----------------------------------------------------------------------
# Each case as delve 0.1.50's compute_intrinsic_dimensionality returns it (its k = 0 -> 1
# and +1 slices act on the already filtered eigenvectors), and as its docstring intends.
@pytest.mark.parametrize("eigenvalues,delta,delve,intended", [
    ([0.5, 0.3, 0.15, 0.05], 0.99, 3, 4),  # c_3 = .95: .04 short of delta.
    ([0.5, 0.3, 0.18, 0.02], 0.99, 3, 3),  # c_3 = .98: only .01 short.
    ([100.0, 1e-3, 1e-3], 0.99, 0, 1),  # No ratio below delta.
    ([1.0, -0.5, 1.0], 0.99, 1, 2),  # Clamped to [1, 1, 0] and sorted: c = .5, 1, 1.
    ([0.0, 0.0, 0.0], 0.99, 0, 1),  # No variance at all (a dead layer).
    ([1.0, 1.0, 1.0, 1.0], 1.0, 3, 4),  # c_4 = 1 is not below 1; intended: capped at d.
    # A 10-unit output layer with c_1 = .843, c_2 = .993: saturation .1 (intended .2).
    ([0.843, 0.15] + [0.007 / 8] * 8, 0.99, 1, 2),
])
def test_intrinsic_dimensionality_follows_delve(eigenvalues, delta, delve, intended):
  assert saturation.intrinsic_dimensionality(eigenvalues, delta) == delve
  assert saturation.saturation(eigenvalues, delta) == delve / len(eigenvalues)
  assert saturation.intrinsic_dimensionality(eigenvalues, delta, "intended") == intended
  assert saturation.saturation(eigenvalues, delta, rule="intended") == (
      intended / len(eigenvalues))


def test_unknown_rule_is_refused():
  with pytest.raises(ValueError, match="rule"):
    saturation.intrinsic_dimensionality([1.0, 2.0], 0.99, "docstring")
  with pytest.raises(ValueError, match="rule"):
    saturation.SaturationTracker(["a"], [2], rule="docstring")
  with pytest.raises(ValueError, match="rule"):
    saturation.SaturationCallback(rule="docstring")


@pytest.mark.parametrize("batch", [16, 50, 64, 100])
def test_a_constant_layer_has_no_variance_whatever_the_batch_size(batch):
  # A conv on MNIST's black corner under downsampling 1 outputs its bias for every image;
  # the float64 cancellation in sum(xx^T)/n - mu mu^T must not become directions.
  rng = np.random.default_rng(batch)
  bias = rng.normal(scale=3.0, size=16).astype(np.float32)
  model = _identity_dense(16)
  rows = np.tile(bias, (400, 1))
  for rule, expected in (("delve", 0), ("intended", 1)):
    tracker = saturation.SaturationTracker.for_model(model, rule=rule)
    _feed(model, tracker, [rows[i:i + batch] for i in range(0, 400, batch)])
    sum_outer, sum_x, count = tracker.accumulators["train"][0].sums()
    covariance = saturation.covariance_from_sums(sum_outer, sum_x, count)
    results = tracker.results()
    assert results["train-intrinsic-dimensionality_dense"] == expected, (rule, covariance)
    assert results["train-saturation_dense"] == expected / 16
  # Real variance far below the mean is still variance.
  rows = rows + rng.normal(scale=1e-3, size=rows.shape).astype(np.float32)
  tracker = saturation.SaturationTracker.for_model(model)
  _feed(model, tracker, [rows])
  assert tracker.results()["train-intrinsic-dimensionality_dense"] == _reference(
      rows, 0.99)[1] > 10


def test_a_dead_layer_saturates_at_zero():
  model = _identity_dense(16)
  tracker = saturation.SaturationTracker.for_model(model)
  _feed(model, tracker, [np.zeros((32, 16))])
  assert tracker.results()["train-saturation_dense"] == 0.0


@pytest.mark.parametrize("delta", [0, 1.01, -0.5, float("nan"), "many"])
def test_delta_outside_the_unit_interval_is_refused(delta):
  with pytest.raises(ValueError, match="delta"):
    saturation.intrinsic_dimensionality([1.0, 2.0], delta)
  with pytest.raises(ValueError, match="delta"):
    saturation.SaturationTracker(["a"], [2], delta=delta)
  with pytest.raises(ValueError, match="delta"):
    saturation.SaturationCallback(delta=delta)


# ---- streaming accumulation in a compiled step -----------------------------------------
@pytest.mark.parametrize("delta,rule,designed", [
    (0.99, "delve", 3), (0.95, "delve", 3), (0.99, "intended", 4), (0.95, "intended", 3)])
def test_dense_saturation_equals_numpy_on_a_known_spectrum(delta, rule, designed):
  rows = _with_spectrum(300, DENSE_SPECTRUM, mean=2.0)
  model = _identity_dense(16)
  tracker = saturation.SaturationTracker.for_model(model, delta=delta, rule=rule)
  outputs = _feed(model, tracker, [rows[:100], rows[100:250], rows[250:]])
  results = tracker.results()
  expected_saturation, expected_k = _reference(np.concatenate(outputs), delta, rule)
  assert expected_k == designed
  assert results["train-intrinsic-dimensionality_dense"] == expected_k
  assert results["train-saturation_dense"] == expected_saturation == designed / 16
  assert math.isnan(results["eval-saturation_dense"])
  # The streamed covariance is the float64 one of the outputs.
  sum_outer, sum_x, count = tracker.accumulators["train"][0].sums()
  np.testing.assert_allclose(saturation.covariance_from_sums(sum_outer, sum_x, count),
                             np.cov(np.concatenate(outputs).astype(np.float64), rowvar=False,
                                    bias=True), rtol=1e-9, atol=1e-12)


# Rows of the 8x8 map that PyTorch's nearest interpolation keeps (floor(i * 8 / d)).
KEPT = {None: list(range(8)), 16: list(range(8)), 1: [0], 2: [0, 4], 3: [0, 2, 5]}


@pytest.mark.parametrize("downsampling", [None, 1, 2, 3, 16])
def test_conv_saturation_uses_the_nearest_pixels_channelwise(downsampling):
  kept, batch = KEPT[downsampling], 12
  rng = np.random.default_rng(1)
  # Every other pixel is isotropic noise (k = 6), so using it would change k.
  maps = rng.normal(scale=3.0, size=(batch, 8, 8, 6))
  maps[:, np.ix_(kept, kept)[0], np.ix_(kept, kept)[1], :] = _with_spectrum(
      batch * len(kept) ** 2, CONV_SPECTRUM).reshape(batch, len(kept), len(kept), 6)
  model = _identity_conv(6)
  tracker = saturation.SaturationTracker.for_model(model, downsampling=downsampling)
  outputs = np.concatenate(_feed(model, tracker, [maps[:5], maps[5:]]))
  selected = outputs[:, kept][:, :, kept].reshape(-1, 6)
  expected_saturation, expected_k = _reference(selected, 0.99)
  assert expected_k == 2
  results = tracker.results()
  assert results["train-intrinsic-dimensionality_conv"] == expected_k
  assert results["train-saturation_conv"] == expected_saturation == 2 / 6


def test_train_and_eval_accumulate_separately_and_reset():
  model = _identity_dense(16)
  tracker = saturation.SaturationTracker.for_model(model)
  designed = _with_spectrum(200, DENSE_SPECTRUM)
  isotropic = np.random.default_rng(2).normal(size=(200, 16))
  _feed(model, tracker, [designed], "train")
  eval_outputs = _feed(model, tracker, [isotropic[:64], isotropic[64:]], "eval")

  # A boolean tensor selects the split inside the graph too.
  taps = saturation.tap_model(model)
  twin = saturation.SaturationTracker.for_model(model)
  tf.function(lambda x, training: twin.update(taps(x)[1:], training))(
      tf.constant(isotropic, tf.float32), tf.constant(False))

  results = tracker.results()
  assert list(results) == tracker.columns() == [
      "train-saturation_dense", "train-intrinsic-dimensionality_dense",
      "eval-saturation_dense", "eval-intrinsic-dimensionality_dense"]
  assert results["train-intrinsic-dimensionality_dense"] == 3
  assert results["eval-intrinsic-dimensionality_dense"] == _reference(
      np.concatenate(eval_outputs), 0.99)[1] > 3
  assert twin.results()["eval-saturation_dense"] == results["eval-saturation_dense"]
  assert math.isnan(twin.results()["train-saturation_dense"])
  tracker.reset()
  assert all(math.isnan(v) for v in tracker.results().values())


# ---- taps --------------------------------------------------------------------------------
def _small_model():
  inputs = keras.Input((6, 6, 3))
  x = MaskedConv2D(4, 3, padding="same", name="conv")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU(name="relu")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  x = keras.layers.Dense(5, name="hidden")(x)
  outputs = MaskedDense(3, name="out")(x)
  return keras.Model(inputs, outputs)


def test_tap_model_shares_weights_and_taps_raw_layer_outputs():
  model = _small_model()
  taps = saturation.tap_model(model)
  assert [layer.name for layer in saturation.tapped_layers(model)] == ["conv", "hidden", "out"]
  assert {id(v) for v in taps.variables} == {id(v) for v in model.variables}
  x = np.random.default_rng(0).normal(size=(4, 6, 6, 3)).astype(np.float32)
  logits, conv, hidden, out = [t.numpy() for t in taps(x)]
  np.testing.assert_allclose(logits, model(x).numpy(), rtol=1e-6)
  np.testing.assert_allclose(out, logits, rtol=1e-6)
  raw = keras.Model(model.input, model.get_layer("conv").output)(x).numpy()
  normalised = keras.Model(model.input, model.get_layer("bn").output)(x).numpy()
  np.testing.assert_allclose(conv, raw, rtol=1e-6)
  assert not np.allclose(conv, normalised)  # Before batch norm.
  assert hidden.shape == (4, 5)
  with pytest.raises(ValueError, match="unknown_layer"):
    saturation.tap_model(model, ["conv", "unknown_layer"])


def test_models_whose_layers_cannot_be_tapped_are_refused():
  class Subclassed(keras.Model):
    def __init__(self):
      super().__init__()
      self.dense = keras.layers.Dense(2)

    def call(self, x):
      return self.dense(x)

  model = Subclassed()
  model(np.zeros((1, 3), np.float32))
  with pytest.raises(ValueError, match="subclassed"):
    saturation.tap_model(model)
  with pytest.raises(ValueError, match="subclassed"):
    saturation.SaturationCallback().wrap(model)
  sequential = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
  assert [t.shape[-1] for t in saturation.tap_model(sequential).outputs] == [2, 2]


# ---- the callback in a user's fit --------------------------------------------------------
def test_callback_in_fit_equals_numpy_on_the_same_batches():
  keras.utils.set_random_seed(0)
  model = _small_model()
  callback = saturation.SaturationCallback(downsampling=2)
  wrapped = callback.wrap(model)
  assert len(wrapped.trainable_variables) == len(model.trainable_variables)
  # Learning rate 0: the weights the epoch saw are the weights after it.
  wrapped.compile(optimizer=keras.optimizers.SGD(0.0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  rng = np.random.default_rng(3)
  x = rng.normal(size=(48, 6, 6, 3)).astype(np.float32)
  y = rng.integers(0, 3, 48)
  x_val = rng.normal(size=(20, 6, 6, 3)).astype(np.float32)
  history = wrapped.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        validation_data=(x_val, np.zeros(20)), callbacks=[callback])
  logs = {name: values[-1] for name, values in history.history.items()}

  taps = saturation.tap_model(model)
  train = [taps(x[i:i + 16], training=True) for i in range(0, 48, 16)]
  evaluation = taps(x_val, training=False)
  for index, name in enumerate(["conv", "hidden", "out"]):
    for split, outputs in (("train", [t[index + 1].numpy() for t in train]),
                           ("eval", [evaluation[index + 1].numpy()])):
      rows = np.concatenate(outputs)
      if rows.ndim == 4:  # 6x6 -> 2x2 keeps rows and columns 0 and 3.
        rows = rows[:, [0, 3]][:, :, [0, 3]].reshape(-1, rows.shape[-1])
      expected_saturation, expected_k = _reference(rows, 0.99)
      assert logs[f"{split}-saturation_{name}"] == expected_saturation, (split, name)
      assert logs[f"{split}-intrinsic-dimensionality_{name}"] == expected_k, (split, name)

  with pytest.raises(ValueError, match="wrap"):
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((48, 3)), epochs=1, verbose=0, callbacks=[callback])


def test_seed_csv_rows_by_epoch(tmp_path):
  path = str(tmp_path / saturation.phd_lab_csv_name("VGG16", "Cifar10", 32, 64, 30))
  assert path.endswith("VGG16-Cifar10-r32-bs64-e30.csv")
  row = {"training_accuracy": 50.0, "test_loss": 0.02, "train-saturation_conv": 0.25}
  saturation.write_phd_lab_csv(path, 0, row)
  saturation.write_phd_lab_csv(path, 1, dict(row, training_accuracy=60.0))
  saturation.write_phd_lab_csv(path, 1, dict(row, training_accuracy=70.0))  # Resumed.
  with open(path) as f:
    assert f.read().splitlines() == [";training_accuracy;test_loss;train-saturation_conv",
                                     "0;50.0;0.02;0.25", "1;70.0;0.02;0.25"]
  with pytest.raises(ValueError, match="epoch"):
    saturation.write_phd_lab_csv(path, 3, row)
