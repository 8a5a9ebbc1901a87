"""Tests of augmented flatness (spec 2.3) against hand-computed NumPy values."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.models.vit import residual_mlp, vit
from robust_sparse.nn import activations
from robust_sparse.measure import flatness
from robust_sparse.nn.layers import MaskedDense

CLASSES = 3


def _mlp(tokens=None, activation="relu2"):
  """key -> activation -> value; with tokens, then mean over tokens -> head."""
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,) if tokens is None else (tokens, 4))
  h = MaskedDense(6, bias_initializer="random_normal", name="mlp_key")(inputs)
  a = activations.build(activation, name="mlp_activation")(h)
  if tokens is None:  # The two-layer MLP: the value layer gives the logits.
    return keras.Model(inputs, MaskedDense(CLASSES, name="mlp_value")(a))
  v = MaskedDense(5, name="mlp_value")(a)
  pooled = keras.layers.GlobalAveragePooling1D(name="pool")(v)
  return keras.Model(inputs, keras.layers.Dense(CLASSES, name="output")(pooled))


def _data(tokens=None, n=8):
  rng = np.random.default_rng(1)
  shape = (n, 4) if tokens is None else (n, tokens, 4)
  return rng.standard_normal(shape).astype(np.float32), np.arange(n) % CLASSES


def _expected(model, x, y, squared):
  """Spec 2.3 by explicit per-example backpropagation in float64 NumPy."""
  w1, b1 = (model.get_layer("mlp_key").masked_kernel.numpy().astype(np.float64),
            model.get_layer("mlp_key").bias.numpy())
  w2, b2 = (model.get_layer("mlp_value").masked_kernel.numpy().astype(np.float64),
            model.get_layer("mlp_value").bias.numpy())
  head = [layer for layer in model.layers if layer.name == "output"]
  key, value, l0, active, l2, a2, l2_term = [], [], [], [], [], [], []
  for example, label in zip(x.astype(np.float64), y):
    tokens = example.reshape(-1, w1.shape[0])  # [T, d]
    z_key = tokens @ w1 + b1
    a = np.maximum(z_key, 0) ** 2 if squared else np.maximum(z_key, 0)
    z_value = a @ w2 + b2
    if head:
      w3, b3 = (v.numpy().astype(np.float64) for v in (head[0].kernel, head[0].bias))
      logits = z_value.mean(0) @ w3 + b3
    else:
      logits = z_value[0]
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    d_logits = probabilities - np.eye(CLASSES)[label]
    if head:
      d_value = np.tile(w3 @ d_logits / len(tokens), (len(tokens), 1))
    else:
      d_value = d_logits[None]
    d_a = d_value @ w2.T
    d_key = d_a * (2 * np.maximum(z_key, 0) if squared else (z_key > 0))
    x2 = (tokens ** 2).sum(-1)
    key.append(((d_key ** 2).sum(-1) * x2).sum())
    value.append(((d_value ** 2).sum(-1) * (a ** 2).sum(-1)).sum())
    l0.append(d_a ** 2 * (a > 0) * x2[:, None])
    active.append(a > 0)
    l2.append((d_value ** 2).sum(-1))
    a2.append((a ** 2).sum(-1))
    l2_term.append((a ** 2).sum(-1) * (d_value ** 2).sum(-1))
  l0, active = np.concatenate(l0), np.concatenate(active)
  return {"key": np.mean(key), "L0_sum": l0.mean(), "L0_weight": active.mean(),
          "L0_preview": l0.sum() / active.sum(), "value": np.mean(value),
          "L2": np.concatenate(l2).mean(), "a2": np.concatenate(a2).mean(),
          "L2_term": np.concatenate(l2_term).mean()}


# The toolkit's earlier measurement (`--flatness_data=test`): inference mode,
# G of each sample's own loss, plain cross-entropy.
PER_SAMPLE = dict(training=False, loss_reduction="sum")


@pytest.mark.parametrize("tokens", [None, 3])
def test_equals_hand_computed_values(tokens):
  model = _mlp(tokens)
  x, y = _data(tokens)
  before = [w.copy() for w in model.get_weights()]
  # Two batches: each term is the mean of its per-batch values (the seed's logging).
  results = flatness.augmented_flatness(model, [(x[:4], y[:4]), (x[4:], y[4:])], **PER_SAMPLE)
  halves = [_expected(model, x[:4], y[:4], True), _expected(model, x[4:], y[4:], True)]
  assert list(results) == ["mlp", flatness.AVERAGE, flatness.SUMMARY]
  assert list(results["mlp"]) == list(flatness.TERMS)
  for term in flatness.TERMS:
    value = np.mean([half[term] for half in halves])
    assert results["mlp"][term] == pytest.approx(value, rel=1e-5), term
  whole = _expected(model, x, y, squared=True)  # Equal halves: the pooled mean, but L0_preview.
  assert results["mlp"]["key"] == pytest.approx(whole["key"], rel=1e-5)
  assert results[flatness.AVERAGE] == results["mlp"]
  assert results[flatness.SUMMARY]["batches"] == 2
  assert results[flatness.SUMMARY]["samples"] == len(x)
  for old, new in zip(before, model.get_weights()):  # A pure measurement.
    np.testing.assert_array_equal(old, new)


def test_correct_samples_only_divides_by_the_accuracy_and_max_iterations():
  model = _mlp(3)
  x, _ = _data(3, n=12)
  predicted = np.argmax(model(x).numpy(), -1)
  y = np.where(np.arange(12) % 3 == 0, predicted, (predicted + 1) % CLASSES)
  batches = [(x[:6], y[:6]), (x[6:], y[6:])]
  results = flatness.augmented_flatness(model, batches, correct_samples_only=True,
                                        max_iterations=1, **PER_SAMPLE)
  correct = np.flatnonzero(y[:6] == predicted[:6])  # The second batch is not measured.
  expected = _expected(model, x[correct], y[correct], squared=True)
  every = _expected(model, x[:6], y[:6], squared=True)
  # Means over the batch with zeros for the others, divided by the accuracy:
  # the gradient terms are means over the correct samples (L0_* over entries).
  for term in ("key", "value"):
    assert results["mlp"][term] == pytest.approx(expected[term], rel=1e-5), term
  share = len(correct) / 6
  for term in ("L0_sum", "L2", "L2_term"):
    assert results["mlp"][term] == pytest.approx(expected[term], rel=1e-5), term
  for term in ("L0_weight", "a2"):  # No gradient: over every sample, not divided.
    assert results["mlp"][term] == pytest.approx(every[term], rel=1e-5), term
  assert results["mlp"]["L0_preview"] == pytest.approx(
      expected["L0_sum"] / every["L0_weight"], rel=1e-5)
  assert results[flatness.SUMMARY] == {"batches": 1.0, "examples": 6.0,
                                       "samples": float(len(correct)),
                                       "accuracy": pytest.approx(share)}
  undivided = flatness.augmented_flatness(model, batches, correct_samples_only=True,
                                          max_iterations=1, divide_by_accuracy=False,
                                          **PER_SAMPLE)
  assert undivided["mlp"]["key"] == pytest.approx(expected["key"] * share, rel=1e-5)


def test_seed_protocol_defaults_mean_loss_smoothing_and_loss_scale():
  model = _mlp(3)
  x, y = _data(3)
  summed = flatness.augmented_flatness(model, [(x, y)], loss_reduction="sum")["mlp"]
  mean = flatness.augmented_flatness(model, [(x, y)])["mlp"]  # Default: the batch mean.
  scaled = flatness.augmented_flatness(model, [(x, y)], loss_scale=4.0)["mlp"]
  for term in flatness.TERMS:
    gradient = term not in ("L0_weight", "a2")
    scale = 1.0 / len(x) ** 2 if gradient else 1.0
    assert mean[term] == pytest.approx(summed[term] * scale, rel=1e-5), term
    assert scaled[term] == pytest.approx(mean[term] * (16.0 if gradient else 1.0),
                                         rel=1e-5), term
  # Soft labels count as their argmax (the seed's), smoothing changes the loss.
  soft = np.eye(CLASSES, dtype=np.float32)[y] * 0.6 + 0.4 / CLASSES
  assert flatness.augmented_flatness(model, [(x, soft)])["mlp"] == pytest.approx(mean)
  smoothed = flatness.augmented_flatness(model, [(x, y)], label_smoothing=0.11)["mlp"]
  assert smoothed["key"] != pytest.approx(mean["key"])


def test_training_mode_uses_batch_statistics_and_restores_state():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  h = keras.layers.BatchNormalization(name="norm")(inputs)
  h = MaskedDense(6, name="mlp_key")(h)
  a = activations.build("relu", name="mlp_activation")(h)
  model = keras.Model(inputs, MaskedDense(CLASSES, name="mlp_value")(a))
  x, y = _data()
  x = x * 3 + 1  # Far from the initial moving statistics (0, 1).
  before = [w.copy() for w in model.get_weights()]
  trained = flatness.augmented_flatness(model, [(x, y)])["mlp"]
  inference = flatness.augmented_flatness(model, [(x, y)], training=False)["mlp"]
  assert trained["a2"] != pytest.approx(inference["a2"], rel=1e-3)
  for old, new in zip(before, model.get_weights()):  # Moving statistics put back.
    np.testing.assert_array_equal(old, new)


def test_stateful_activation_is_not_advanced_and_keras_losses_fit():
  model = _mlp(activation="mixed(steps=4)")  # At step 0: exactly relu.
  x, y = _data()
  loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
  results = flatness.augmented_flatness(model, tf.data.Dataset.from_tensor_slices(
      (x, y)).batch(8), loss_fn=loss, loss_reduction="sum")
  expected = _expected(model, x, y, squared=False)
  for term, value in expected.items():
    assert results["mlp"][term] == pytest.approx(value, rel=1e-5), term
  assert int(model.get_layer("mlp_activation").step.numpy()) == 0


def test_finds_the_blocks_of_the_vit_and_the_residual_mlp():
  model = vit((8, 8, 1), 4, preset="mnist", depth=2, width=8, heads=2, mlp_width=16)
  blocks = flatness.mlp_blocks(model)
  assert [(b.name, b.key.name, b.activation.name, b.value.name) for b in blocks] == [
      (f"block{i}_mlp", f"block{i}_mlp_key", f"block{i}_mlp_activation",
       f"block{i}_mlp_value") for i in (1, 2)]
  rng = np.random.default_rng(0)
  head = model.get_layer("output").raw_kernel  # Zero-initialised: no gradient at all.
  head.assign(rng.standard_normal(head.shape).astype(np.float32))
  x = rng.random((4, 8, 8, 1)).astype(np.float32)
  results = flatness.augmented_flatness(model, [(x, np.arange(4))])
  tokens, hidden = 5, 16  # 4 patches and the class token; the MLP width.
  for block in ("block1_mlp", "block2_mlp"):
    terms = results[block]
    assert all(math.isfinite(value) and value > 0 for value in terms.values())
    # ReLU: (dL/dA)^2 1[A > 0] = (dL/dZ_key)^2, so key = T * H * L0_sum.
    assert terms["key"] == pytest.approx(tokens * hidden * terms["L0_sum"], rel=1e-4)
    assert terms["value"] == pytest.approx(tokens * terms["L2_term"], rel=1e-4)

  mlp = residual_mlp((4, 4), 3, width=8, depth=2)
  blocks = flatness.mlp_blocks(mlp)
  assert [(b.name, b.key.name, b.value) for b in blocks] == [
      ("block1", "block1_dense", None), ("block2", "block2_dense", None)]
  results = flatness.augmented_flatness(mlp, [(x[:, :4, :4, 0], np.arange(4) % 3)])
  assert list(results["block1"]) == list(flatness.KEY_TERMS)
  assert list(results[flatness.AVERAGE]) == list(flatness.KEY_TERMS)


def test_csv_round_trip_and_log_figure(tmp_path):
  results = {"block1": {"key": 2.0, "value": 3.0, "L0_preview": 0.5, "L2": 0.1},
             flatness.AVERAGE: {"key": 2.0, "value": 3.0, "L0_preview": 0.5, "L2": 0.1},
             flatness.SUMMARY: {"batches": 1.0, "accuracy": 0.75}}
  paths = {}
  for epoch in (20, 10):
    scaled = {block: {term: value * epoch for term, value in terms.items()}
              for block, terms in results.items()}
    paths[epoch] = flatness.write_csv(scaled, tmp_path / f"epoch_{epoch}" / "flatness.csv")
    assert flatness.read_csv(paths[epoch]) == scaled
  with open(paths[10]) as handle:
    assert handle.readline().strip() == "block,term,value"
  figure = flatness.plot_augmented_flatness(paths, tmp_path / "flatness.png",
                                            blocks=("block1", flatness.AVERAGE))
  (axes,) = figure.axes
  assert axes.get_yscale() == "log"
  assert len(axes.lines) == 2 * len(flatness.FIGURE_TERMS)
  np.testing.assert_array_equal(axes.lines[0].get_xdata(), [10, 20])
  assert (tmp_path / "flatness.png").stat().st_size > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_iterations=0), "max_iterations must be a positive integer"),
    (dict(max_iterations=1.5), "max_iterations must be a positive integer"),
    (dict(loss_reduction="max"), "loss_reduction must be one of sum, mean"),
    (dict(label_smoothing=1.5), "label_smoothing must be a number in [0.0, 1.0]"),
    (dict(loss_scale=0.0), "loss_scale must be positive"),
    (dict(loss_fn=lambda y, logits: tf.reduce_mean(logits)), "per-example losses"),
    (dict(blocks={"b": ("mlp_activation", "mlp_activation", None)}), "dense layer"),
])
def test_bad_arguments_raise_one_line_value_errors(kwargs, message):
  x, y = _data()
  with pytest.raises(ValueError) as raised:
    flatness.augmented_flatness(_mlp(), [(x, y)], **kwargs)
  assert message in str(raised.value)
  assert "\n" not in str(raised.value)


def test_models_without_blocks_or_batches_are_refused(tmp_path):
  inputs = keras.Input((4,))
  plain = keras.Model(inputs, keras.layers.Dense(3)(inputs))
  with pytest.raises(ValueError, match="has no MLP block"):
    flatness.augmented_flatness(plain, [])
  with pytest.raises(ValueError, match="no batches"):
    flatness.augmented_flatness(_mlp(), [])
  (tmp_path / "other.csv").write_text("a,b\n")
  with pytest.raises(ValueError, match="not an augmented-flatness CSV"):
    flatness.read_csv(tmp_path / "other.csv")
