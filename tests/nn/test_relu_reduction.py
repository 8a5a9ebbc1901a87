"""Tests of the ReLU-reduction library: counts, the masked ReLU, replacement, the penalty.

Expected values are written by hand from spec section 3 (AutoReP), on tensors
small enough to check on paper.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.models import build_model
from robust_sparse.models import registry as models_registry
from robust_sparse.nn import activations
from robust_sparse.nn import relu_masks as rr

# One image of 4 features (a dense site): alpha, gate and inputs used throughout.
ALPHA = np.array([0.5, -0.2, 0.0, 2.0], np.float32)
GATE = np.array([1.0, 0.0, 0.0, 1.0], np.float32)  # 1[alpha > 0]: 0 at alpha = 0.
X = np.array([[-1.0, 2.0, -3.0, 0.5],
              [1.0, -2.0, 0.0, -0.5]], np.float32)


def softplus(value):
  return math.log1p(math.exp(value))


def relu(x):
  return np.maximum(x, 0.0)


def site_layer(alpha=ALPHA, **kwargs):
  """A built MaskedReLU over 4 features with the given alpha."""
  layer = rr.MaskedReLU(**kwargs)
  layer.build((None, alpha.shape[-1]))
  layer.alpha.assign(alpha)
  return layer


def value_and_gradients(layer, x, upstream, training=False):
  """Output, dL/dalpha and dL/dx for L = sum(upstream * layer(x))."""
  x = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, training=training)
    loss = tf.reduce_sum(upstream * y)
  d_alpha, d_x = tape.gradient(loss, [layer.alpha, x])
  return y.numpy(), d_alpha.numpy(), d_x.numpy()


@pytest.fixture(scope="module")
def resnet18():
  keras.utils.set_random_seed(0)
  return build_model("resnet18", (32, 32, 3), 10)


def conv_bn(input_shape=(8, 8, 3)):
  keras.utils.set_random_seed(1)
  model = build_model("conv-bn", input_shape, 10)
  # Non-trivial batch-norm statistics, so that copying them is checked too.
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      rng = np.random.RandomState(len(layer.name))
      layer.moving_mean.assign(rng.randn(*layer.moving_mean.shape) * 0.1)
      layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
  return model


def images(shape, seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---- counts ----------------------------------------------------------------------


def test_resnet18_relu_count_is_557056(resnet18):
  counts = rr.relu_counts(resnet18)
  assert counts.total == 557_056
  # Stem 64x32x32, then 4 sites per stage at 64x32x32, 128x16x16, 256x8x8, 512x4x4.
  assert len(counts.per_site) == 17
  assert counts.per_site["stem_activation"] == 65_536
  assert counts.per_site["layer4_block2_activation2"] == 8_192


def test_conv_bn_relu_counts_by_hand():
  # conv 16@3x3 stride 1 keeps 8x8; conv 32@3x3 stride 2 halves it to 4x4.
  expected = {"conv_1_activation": 8 * 8 * 16, "conv_2_activation": 4 * 4 * 32}
  counts = rr.relu_counts(conv_bn())
  assert list(counts.per_site.items()) == list(expected.items())
  assert counts.total == 1536


def test_relu_counts_of_a_model_for_any_image_size_need_the_size():
  inputs = keras.Input((None, None, 3))
  x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
  x = activations.build("relu", name="act")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  flexible = keras.Model(inputs, keras.layers.Dense(2)(x))
  assert rr.relu_counts(flexible, input_shape=(8, 6, 3)) == ({"act": 4 * 3 * 4}, 48)
  with pytest.raises(ValueError, match="pass input_shape"):
    rr.relu_counts(flexible)


def test_site_constants_match_the_model_registry():
  assert (rr.AFTER_BN, rr.AFTER_RESIDUAL) == (models_registry.AFTER_BN,
                                              models_registry.AFTER_RESIDUAL)


# ---- the gate and its gradients ----------------------------------------------------


def test_gate_and_straight_through_gradient_by_hand():
  layer = site_layer(replacement="identity")
  upstream = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.0]], np.float32)
  y, d_alpha, d_x = value_and_gradients(layer, X, upstream)
  np.testing.assert_array_equal(layer.gate().numpy(), GATE)
  np.testing.assert_allclose(y, GATE * relu(X) + (1 - GATE) * X)
  # dL/dm = sum over the batch of upstream * (relu(x) - x) = upstream * relu(-x).
  # Rows: relu(-x) = [1, 0, 3, 0] and [0, 2, 0, 0.5], upstream 1 and (2, 1, 1, 1):
  # dL/dm = [1, 2, 3, 0.5]; dL/dalpha = softplus(alpha) * dL/dm, softplus(0) = log 2.
  expected = np.array([softplus(0.5) * 1.0, softplus(-0.2) * 2.0, math.log(2) * 3.0,
                       softplus(2.0) * 0.5], np.float32)
  np.testing.assert_allclose(d_alpha, expected, rtol=1e-6)
  # Open gate: relu's derivative (0 at x = 0); closed gate: 1.
  np.testing.assert_array_equal(d_x, [[0, 1, 1, 1], [2, 1, 1, 0]])


def test_identity_relu_grad_is_identity_forward_relu_derivative_backward():
  layer = site_layer(replacement="identity_relu_grad")
  upstream = np.ones_like(X)
  y, d_alpha, d_x = value_and_gradients(layer, X, upstream)
  np.testing.assert_allclose(y, GATE * relu(X) + (1 - GATE) * X)
  x = tf.constant(X)
  with tf.GradientTape() as tape:
    tape.watch(x)
    relu_out = tf.nn.relu(x)
  np.testing.assert_array_equal(d_x, tape.gradient(relu_out, x).numpy())
  np.testing.assert_array_equal(d_x, (X > 0).astype(np.float32))
  # The STE still sees relu(x) - x.
  np.testing.assert_allclose(d_alpha, np.array([1, 2, 3, 0.5]) * [softplus(a) for a in ALPHA],
                             rtol=1e-6)


X_ROW = np.array([[-1.0, 2.0, -3.0, 0.5]], np.float32)
CLOSED = np.full(4, -1.0, np.float32)  # Every gate closed: y = g(x).
POLYNOMIALS = [
    (dict(replacement="poly"), [-0.4, 1.4, -0.6, 0.275]),  # 0.1x^2 + 0.5x
    (dict(replacement="poly", scale_x2=0.2, scale_x=1.0), [-0.8, 2.8, -1.2, 0.55]),
    (dict(replacement="autopoly2", site="after_bn"), [-0.1, 2.0, 0.5, 0.5]),
    (dict(replacement="autopoly2", site="after_residual"),
     [-0.0758, 1.8484, 0.0554, 0.56815]),
    (dict(replacement="autopoly1", site="after_bn"), [-1.0, 2.0, -3.0, 0.5]),
    (dict(replacement="autopoly1", site="after_residual"), [-1.0, 2.0, -3.0, 0.5]),
    (dict(replacement="trainable_poly"), [-1.0, 2.0, -3.0, 0.5]),  # Initially x.
    (dict(replacement="trainable_poly1"), [-1.0, 2.0, -3.0, 0.5]),
]


@pytest.mark.parametrize("kwargs,expected", POLYNOMIALS,
                         ids=[str(sorted(k.items())) for k, _ in POLYNOMIALS])
def test_replacement_polynomial_values(kwargs, expected):
  layer = site_layer(CLOSED, **kwargs)
  np.testing.assert_allclose(layer(X_ROW).numpy(), [expected], rtol=1e-5, atol=1e-6)


def test_trainable_polynomial_is_channelwise_and_trained():
  layer = site_layer(CLOSED, replacement="trainable_poly", scale_x2=0.1)
  weights = {v.path.split("/")[-1]: v for v in layer.weights}
  weights["poly_w2"].assign([1.0, 2.0, 0.0, 0.0])
  weights["poly_w1"].assign([0.5, 0.5, 1.0, 2.0])
  weights["poly_w0"].assign([0.0, 0.1, 0.0, -1.0])
  # 0.1 * w2 * x^2 + w1 * x + w0 per channel.
  np.testing.assert_allclose(layer(X_ROW).numpy(), [[-0.4, 1.9, -3.0, 0.0]], rtol=1e-6)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(layer(X_ROW))
  grads = tape.gradient(loss, [weights["poly_w2"], weights["poly_w1"], weights["poly_w0"]])
  np.testing.assert_allclose(grads[0], 0.1 * X_ROW[0] ** 2, rtol=1e-6)
  np.testing.assert_allclose(grads[1], X_ROW[0])
  np.testing.assert_allclose(grads[2], np.ones(4))
  assert sorted(weights) == ["alpha", "hysteresis_mask", "poly_w0", "poly_w1", "poly_w2",
                             "training_calls"]


@pytest.mark.parametrize("kwargs", [dict(replacement="identity"),
                                    dict(replacement="identity_relu_grad"),
                                    dict(replacement="poly"),
                                    dict(replacement="autopoly1", site="after_bn"),
                                    dict(replacement="autopoly2", site="after_bn"),
                                    dict(replacement="autopoly2", site="after_residual")],
                         ids=lambda kwargs: "-".join(map(str, kwargs.values())))
def test_released_forward_differs_exactly_where_x_negative_and_gate_closed(kwargs):
  intended = site_layer(**kwargs)(X).numpy()
  released = site_layer(relu_forward="released", **kwargs)(X).numpy()
  differs = ~np.isclose(intended, released, rtol=0, atol=1e-7)
  np.testing.assert_array_equal(differs, (X < 0) & (GATE == 0))
  # Where they differ, the released layer evaluates g at relu(x) = 0.
  if kwargs["replacement"] in ("identity", "identity_relu_grad"):
    np.testing.assert_array_equal(released, relu(X))


# ---- hysteresis ------------------------------------------------------------------------


def test_hysteresis_transitions_by_hand():
  threshold = 0.1
  layer = site_layer(np.ones(4, np.float32), replacement="identity",
                     hysteresis_threshold=threshold)
  x = np.full((1, 4), -1.0, np.float32)  # Output -1 where the mask is 0, else 0.
  steps = [
      # alpha, then the mask after a training call.
      ([0.5, -0.05, -0.2, 0.05], [1, 1, 0, 1]),   # Open gates close below -t only.
      ([-0.05, -0.2, 0.05, 0.2], [1, 0, 0, 1]),   # Closed gates stay closed up to t.
      ([-0.2, 0.05, 0.2, -0.05], [0, 0, 1, 1]),   # ... and open above t.
  ]
  for alpha, mask in steps:
    layer.alpha.assign(alpha)
    before = layer.hysteresis_mask.numpy().copy()
    # An inference call uses the updated mask without storing it.
    np.testing.assert_array_equal(layer(x, training=False).numpy(), [np.subtract(mask, 1)])
    np.testing.assert_array_equal(layer.hysteresis_mask.numpy(), before)
    np.testing.assert_array_equal(layer(x, training=True).numpy(), [np.subtract(mask, 1)])
    np.testing.assert_array_equal(layer.hysteresis_mask.numpy(), mask)
    np.testing.assert_array_equal(layer.gate().numpy(), mask)
  # The backward pass is the STE with softplus(alpha), whatever the mask.
  _, d_alpha, _ = value_and_gradients(layer, x, np.ones_like(x), training=True)
  np.testing.assert_allclose(d_alpha, [softplus(a) for a in [-0.2, 0.05, 0.2, -0.05]],
                             rtol=1e-6)
  assert int(layer.training_calls.numpy()) == 4


def test_hysteresis_threshold_zero_is_the_plain_gate():
  state = tf.constant([1.0, 0.0, 1.0, 0.0])
  alpha = tf.constant([0.3, 0.3, -0.3, -0.3])
  np.testing.assert_array_equal(rr.hysteresis_update(state, alpha, 0.0).numpy(),
                                [1.0, 1.0, 0.0, 0.0])


# ---- mask dropout ----------------------------------------------------------------------


def dropout_decisions(layer, calls):
  """1 where a training call computed plain relu (all gates closed, x = -1)."""
  x = tf.fill([1, 4], -1.0)
  step = tf.function(lambda: layer(x, training=True))
  return np.array([float(step()[0, 0]) == 0.0 for _ in range(calls)])


def test_mask_dropout_frequency_and_determinism():
  def make(seed, name="site"):
    return site_layer(CLOSED, replacement="identity_relu_grad", mask_dropout=0.3, seed=seed,
                      name=name)

  first = dropout_decisions(make(7), 400)
  # Binomial(400, 0.3): mean 120, standard deviation 9.2.
  assert abs(first.sum() - 120) < 40
  np.testing.assert_array_equal(dropout_decisions(make(7), 400), first)
  assert (dropout_decisions(make(8), 400) != first).any()
  assert (dropout_decisions(make(7, name="other_site"), 400) != first).any()
  # Resuming from the saved call counter continues the same sequence.
  resumed = make(7)
  resumed.training_calls.assign(250)
  np.testing.assert_array_equal(dropout_decisions(resumed, 150), first[250:])
  # Never in inference.
  layer = make(7)
  assert not any(float(layer(tf.fill([1, 4], -1.0))[0, 0]) == 0.0 for _ in range(50))
  assert int(layer.training_calls.numpy()) == 0


@pytest.mark.parametrize("replacement", sorted(rr.REPLACEMENTS.names()))
def test_mask_dropout_only_where_autorep_has_it(replacement):
  """AutoReP's spgrad, poly and autopoly modules drop out to relu; ReLU_masked and the
  trainable polynomials have no mask dropout (p = 1: every training call would)."""
  site = "after_bn" if rr.REPLACEMENTS.get(replacement).needs_site else None
  layer = site_layer(CLOSED, replacement=replacement, mask_dropout=1.0, site=site)
  drops = replacement in ("identity_relu_grad", "poly", "autopoly1", "autopoly2")
  assert rr.has_mask_dropout(replacement) == drops
  assert dropout_decisions(layer, 3).all() == drops


# ---- validation and freezing -------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(replacement="cubic"), "unknown relu replacement 'cubic'; known: autopoly1"),
    (dict(relu_forward="buggy"), "relu_forward must be one of intended, released"),
    (dict(replacement="trainable_poly", relu_forward="released"), "came after its fix"),
    (dict(hysteresis_threshold=-0.1), "hysteresis_threshold must be >= 0"),
    (dict(mask_dropout=1.5), r"mask_dropout must be in \[0, 1\], got 1.5"),
    (dict(replacement="autopoly2"), "chooses its coefficients by site"),
])
def test_bad_arguments_are_value_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rr.MaskedReLU(**kwargs)


def test_frozen_alpha_is_not_trainable_and_can_be_switched():
  def trainable(layer):  # By identity: `in` would compare variables' values.
    return [id(v) for v in layer.trainable_weights]

  layer = site_layer(frozen=True)
  assert id(layer.alpha) not in trainable(layer)
  layer.frozen = False
  assert id(layer.alpha) in trainable(layer)
  assert site_layer(replacement="trainable_poly", frozen=True).trainable_weights != []


# ---- models -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(replacement="identity"),
                                    dict(replacement="autopoly2", relu_forward="released"),
                                    dict(replacement="trainable_poly", hysteresis_threshold=0.01,
                                         mask_dropout=0.5)],
                         ids=["identity", "autopoly2-released", "trainable_poly-relay"])
def test_replace_activations_keeps_weights_and_outputs(kwargs):
  model = conv_bn()
  masked = rr.replace_activations(model, **kwargs)
  sites = rr.masked_relus(masked)
  assert [layer.name for layer in sites] == ["conv_1_activation", "conv_2_activation"]
  assert all(layer.site == "after_bn" for layer in sites)
  assert masked.get_layer("conv_1_activation").alpha.path == "conv_1_activation/alpha"
  for layer in model.layers:
    if isinstance(layer, keras.layers.InputLayer) or layer.name.endswith("_activation"):
      continue
    copy = masked.get_layer(layer.name)
    assert copy is not layer
    assert [v.path for v in copy.weights] == [v.path for v in layer.weights]
    for original, copied in zip(layer.weights, copy.weights):
      assert copied is not original
      np.testing.assert_array_equal(copied.numpy(), original.numpy())
  # Every gate starts open: the same network.
  assert float(rr.relu_density(masked)) == 1.0
  x = images((4, 8, 8, 3))
  np.testing.assert_allclose(masked(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)


def test_replace_activations_on_resnet18(resnet18):
  masked = rr.replace_activations(resnet18, replacement="identity_relu_grad")
  sites = rr.masked_relus(masked)
  assert len(sites) == 17
  assert [layer.site for layer in sites[:3]] == ["after_bn", "after_bn", "after_residual"]
  assert rr.live_relu_counts(masked) == rr.relu_counts(resnet18)
  x = images((2, 32, 32, 3))
  np.testing.assert_allclose(masked(x).numpy(), resnet18(x).numpy(), rtol=1e-5, atol=1e-5)
  paths = [v.path for v in masked.variables]
  assert len(set(paths)) == len(paths)
  assert "layer1_block1_activation2/alpha" in paths


def test_replace_activations_refuses_non_relu_sites():
  model = build_model("conv-bn", (8, 8, 3), 10, activation="relu2")
  with pytest.raises(ValueError, match="masks ReLU sites.*conv_1_activation"):
    rr.replace_activations(model)


def test_density_live_counts_and_penalty_by_hand():
  masked = rr.replace_activations(conv_bn())
  first, second = rr.masked_relus(masked)
  # Close 256 of 1024 and all 512 gates: 768 / 1536 live.
  alpha = np.ones(first.alpha.shape, np.float32)
  alpha.reshape(-1)[:256] = -1.0
  first.alpha.assign(alpha)
  second.alpha.assign(-np.ones(second.alpha.shape, np.float32))
  live = rr.live_relu_counts(masked)
  assert dict(live.per_site) == {"conv_1_activation": 768, "conv_2_activation": 0}
  assert live.total == 768
  assert float(rr.relu_density(masked)) == 0.5
  assert float(first.density()) == 0.75
  with tf.GradientTape() as tape:
    penalty = rr.density_penalty(masked, target=0.3, lamda=10.0)
  np.testing.assert_allclose(float(penalty), 10.0 * 0.2, rtol=1e-6)
  grads = tape.gradient(penalty, [first.alpha, second.alpha])
  np.testing.assert_allclose(grads[0].numpy(), 10.0 / 1536 * tf.math.softplus(alpha).numpy(),
                             rtol=1e-5)
  with tf.GradientTape() as tape:
    below = rr.density_penalty(masked, target=0.6, lamda=10.0)
  assert float(below) == 0.0
  assert float(tf.reduce_sum(tape.gradient(below, first.alpha))) == 0.0


def test_stateless_step_updates_state_and_penalty_reaches_the_given_values():
  masked = rr.replace_activations(conv_bn(), hysteresis_threshold=0.1, mask_dropout=0.5)
  first = rr.masked_relus(masked)[0]
  first.alpha.assign(np.full(first.alpha.shape, -0.5, np.float32))
  trainable = [tf.convert_to_tensor(v) for v in masked.trainable_variables]
  non_trainable = [tf.convert_to_tensor(v) for v in masked.non_trainable_variables]
  with tf.GradientTape() as tape:
    tape.watch(trainable)
    _, new_non_trainable = masked.stateless_call(trainable, non_trainable,
                                                 images((2, 8, 8, 3)), training=True)
    penalty = rr.density_penalty(masked, 0.0, 1.0, trainable_values=trainable)
  is_alpha = rr.alpha_predicate(masked)
  grads = tape.gradient(penalty, trainable)
  for variable, grad in zip(masked.trainable_variables, grads):
    assert (grad is not None) == is_alpha(variable), variable.path
  new = {v.path: value for v, value in zip(masked.non_trainable_variables, new_non_trainable)}
  assert float(tf.reduce_max(new["conv_1_activation/hysteresis_mask"])) == 0.0
  assert int(new["conv_1_activation/training_calls"]) == 1
  assert int(first.training_calls.numpy()) == 0  # The variables are untouched.
  assert [v.path for v in masked.trainable_variables if is_alpha(v)] == [
      "conv_1_activation/alpha", "conv_2_activation/alpha"]


def test_keras_save_and_load_round_trip(tmp_path):
  masked = rr.replace_activations(conv_bn(), replacement="trainable_poly",
                                  hysteresis_threshold=0.01, mask_dropout=0.1, seed=3,
                                  frozen=True)
  first = rr.masked_relus(masked)[0]
  alpha = np.random.RandomState(0).uniform(-1, 1, first.alpha.shape).astype(np.float32)
  first.alpha.assign(alpha)
  x = images((3, 8, 8, 3))
  masked(x, training=True)  # Moves the hysteresis mask and the call counters.
  path = str(tmp_path / "masked.keras")
  masked.save(path)
  loaded = keras.models.load_model(path)
  np.testing.assert_array_equal(loaded(x).numpy(), masked(x).numpy())
  for original, copy in zip(masked.variables, loaded.variables):
    assert copy.path == original.path
    np.testing.assert_array_equal(copy.numpy(), original.numpy())
  site = rr.masked_relus(loaded)[0]
  assert (site.site, site.frozen, site.seed, site.mask_dropout) == ("after_bn", True, 3, 0.1)
  assert id(site.alpha) not in [id(v) for v in loaded.trainable_variables]


def test_target_density():
  assert rr.target_density(1000, relu_sparsity=0.9) == pytest.approx(0.1)
  assert rr.target_density(557_056, relu_count=51_200) == 51_200 / 557_056
  with pytest.raises(ValueError, match=r"relu_sparsity must be in \[0, 1\)"):
    rr.target_density(1000, relu_sparsity=1.0)
  with pytest.raises(ValueError, match=r"relu_count must be in \[1, 1000\]"):
    rr.target_density(1000, relu_count=2000)
  with pytest.raises(ValueError, match="exactly one"):
    rr.target_density(1000)
