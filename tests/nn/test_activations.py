"""Tests of the activation registry: formulas, derivatives, specs, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse import custom_ops
from robust_sparse.nn import activations


def relu(x):
  return np.maximum(x, 0.0)


def relu_grad(x):  # relu(grad_at_zero=1), spec 2.1's CustomizedReLU: 1 at 0.
  return (x >= 0).astype(float)


def relu_grad_tf(x):  # tf.nn.relu, torch.relu and the registry's ReLU pieces: 0 at 0.
  return (x > 0).astype(float)


def relu2(x):
  return relu(x) ** 2


def relu2_grad(x):
  return 2 * x * (x >= 0)


def jsrelu(x):
  return np.where(x >= 0, x + x**2 / 2, 0.0)


def jsrelu_grad(x):
  return np.where(x >= 0, x + 1, 0.0)


def shift(inner, inner_grad, sx=0.0, sy=0.0, ax=1.0, ay=1.0):
  return (lambda x: ay * inner(ax * (x - sx)) + sy,
          lambda x: ay * ax * inner_grad(ax * (x - sx)))


def sshaped(inner, inner_grad, h):
  return (lambda x: inner(x - h) - inner(-x - h),
          lambda x: inner_grad(x - h) + inner_grad(-x - h))


# spec -> (f, f'), written from spec 2.1.
FORMULAS = {
    "relu": (relu, relu_grad_tf),
    "relu(grad_at_zero=1)": (relu, relu_grad),
    "relu2": (relu2, relu2_grad),
    "jsrelu": (jsrelu, jsrelu_grad),
    "srelu(h=0.5)": (lambda x: relu(x - 0.5) - relu(-x - 0.5),
                     lambda x: relu_grad_tf(x - 0.5) + relu_grad_tf(-x - 0.5)),
    "symmetric_relu(h=1)": (lambda x: relu(np.abs(x) - 1),
                            lambda x: np.sign(x) * relu_grad_tf(np.abs(x) - 1)),
    "dense_relu(h=1)": (lambda x: relu(1 - np.abs(x)),
                        lambda x: -np.sign(x) * relu_grad_tf(1 - np.abs(x))),
    "weird_leaky_relu(positive_slope=2,negative_slope=0.01)": (
        lambda x: np.where(x > 0, 2 * x, 0.01 * x),
        lambda x: np.where(x > 0, 2.0, 0.01)),
    "shift(inner=jsrelu,sx=0.3,sy=-0.2,ax=2,ay=0.5)": shift(
        jsrelu, jsrelu_grad, 0.3, -0.2, 2.0, 0.5),
    "sshaped(inner=relu2,h=1.5)": sshaped(relu2, relu2_grad, 1.5),
    # The seed's weird_relu2.
    "shift(inner=sshaped(inner=relu2,h=1.5),sx=1.6,sy=1.6)": shift(
        *sshaped(relu2, relu2_grad, 1.5), 1.6, 1.6),
    "mixed(steps=4)": (relu, relu_grad_tf),  # At step 0 it is exactly `relu`.
}
# Points away from every kink above (0, ±0.5, ±1, ±1.5, 0.3, 0.1, 1.6, 3.1).
POINTS = np.array([-3.7, -2.3, -1.3, -0.8, -0.45, -0.2, 0.05, 0.2, 0.45, 0.8,
                   1.3, 1.75, 2.3, 3.7])


def _value_and_grad(layer, x, **call_kwargs):
  x = tf.constant(x, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = layer(x, **call_kwargs)
  return y.numpy(), tape.gradient(y, x).numpy()


def test_every_registered_activation_is_covered():
  covered = {spec.split("(")[0] for spec in FORMULAS}
  assert covered == set(activations.names())


@pytest.mark.parametrize("spec", sorted(FORMULAS))
def test_formula_and_derivative(spec):
  formula, derivative = FORMULAS[spec]
  y, dy = _value_and_grad(activations.build(spec), POINTS)
  x = POINTS.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(y, formula(x), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dy, derivative(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec, x, expected", [
    ("relu", 0.0, 0.0),
    ("relu(grad_at_zero=1)", 0.0, 1.0),
    ("relu2", 0.0, 0.0),
    ("jsrelu", 0.0, 1.0),
    ("jsrelu", -0.0, 1.0),
    # sshaped' = inner'(x-h) + inner'(-x-h): at x = h, jsrelu'(0) + 0.
    ("sshaped(inner=jsrelu,h=0.5)", 0.5, 1.0),
    ("sshaped(inner=jsrelu,h=0.5)", -0.5, 1.0),
    # shift' = ay*ax*inner'(ax*(x-sx)): at the kink x = sx, 3*2*jsrelu'(0).
    ("shift(inner=jsrelu,sx=1,ax=2,ay=3)", 1.0, 6.0),
    # Every ReLU piece is tf.nn.relu (the seed's torch.relu): 0 at its kink.
    ("srelu(h=0.5)", 0.5, 0.0),
    ("srelu(h=0.5)", -0.5, 0.0),
    ("symmetric_relu(h=1)", 1.0, 0.0),
    ("symmetric_relu(h=1)", -1.0, 0.0),
    ("dense_relu(h=1)", 1.0, 0.0),
    ("dense_relu(h=1)", -1.0, 0.0),
    ("sshaped(inner=relu,h=0.5)", 0.5, 0.0),
    ("weird_leaky_relu", 0.0, 0.001),
    # mixed at k = 0 is `relu` (0 at 0), or relu(grad_at_zero=1) if asked.
    ("mixed(steps=4)", 0.0, 0.0),
    ("mixed(steps=4,grad_at_zero=1)", 0.0, 1.0),
])
def test_derivative_conventions_at_kinks(spec, x, expected):
  _, dy = _value_and_grad(activations.build(spec), [x])
  assert dy[0] == expected


def test_mixed_moves_from_relu_to_jsrelu_and_counts_steps():
  layer = activations.build("mixed(steps=4)")
  x = POINTS.astype(np.float32)
  portions = []
  for _ in range(6):
    portions.append(float(layer.portion_of_jsrelu))
    k = portions[-1]
    y, dy = _value_and_grad(layer, x, training=True)
    np.testing.assert_allclose(y, (1 - k) * relu(x) + k * jsrelu(x),
                               rtol=1e-6)
    np.testing.assert_allclose(dy, (1 - k) * relu_grad(x) + k * jsrelu_grad(x),
                               rtol=1e-6)
  assert portions == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
  layer(x, training=False)
  layer(x)
  assert int(layer.step.numpy()) == 6  # Inference calls do not count.


def _model(spec):
  inputs = keras.Input((3,))
  hidden = keras.layers.Dense(5, name="dense")(inputs)
  outputs = activations.build(spec, name="activation_0")(hidden)
  return keras.Model(inputs, outputs)


# A nested inner layer with a weight must be restored too.
SAVED_SPECS = sorted(FORMULAS) + ["sshaped(inner=mixed(steps=4),h=0.5)"]


@pytest.mark.parametrize("spec", SAVED_SPECS)
def test_survives_keras_save_and_reload(spec, tmp_path):
  keras.utils.set_random_seed(0)
  model = _model(spec)
  x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32) * 2
  if "mixed" in spec:
    model(x, training=True)  # Move the step so that restoring it matters.
  path = str(tmp_path / "model.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  before, after = model.get_layer("activation_0"), reloaded.get_layer(
      "activation_0")
  assert type(after) is type(before)
  assert after.get_config() == before.get_config()
  np.testing.assert_array_equal(model(x).numpy(), reloaded(x).numpy())
  steps = [w for w in after.non_trainable_weights if "step" in w.path]
  assert len(steps) == ("mixed" in spec)
  for step in steps:
    assert int(step.numpy()) == 1


def test_xla_support_follows_the_compiled_op():
  assert activations.build("relu").supports_jit
  assert activations.build("shift(inner=relu2)").supports_jit
  for spec in ("jsrelu", "mixed", "shift(inner=jsrelu)",
               "shift(inner=sshaped(inner=jsrelu))"):
    assert not activations.build(spec).supports_jit, spec
  assert isinstance(activations.build("jsrelu"), custom_ops.JSquaredReLU)


def test_build_returns_fresh_named_layers():
  first = activations.build("srelu(h=0.25)", name="activation_1")
  second = activations.build("srelu(h=0.25)", name="activation_1")
  assert first is not second
  assert first.name == "activation_1"
  assert first.get_config()["h"] == 0.25


def test_defaults_and_canonical_inner_specs():
  assert activations.build("srelu").get_config()["h"] == 0.5
  layer = activations.build(" shift( inner = sshaped(inner=relu2, h=1.5) ,"
                            "sx=1.6, sy=1.6 ) ")
  assert layer.get_config()["inner"] == "sshaped(inner=relu2,h=1.5)"


def test_habitats():
  assert activations.build("relu").habitat["x"] == ((-1e32, 0.0),)
  assert activations.build("jsrelu").habitat["y"] == ((-1e-6, 1e-6),)
  assert activations.build("srelu(h=0.5)").habitat["x"] == ((-0.5, 0.5),)
  # SShaped widens the x-habitat to [-h, h]; Shift moves it by sx, y by sy.
  weird_relu2 = activations.build(
      "shift(inner=sshaped(inner=relu2,h=1.5),sx=1.6,sy=1.6)")
  (low, high), = weird_relu2.habitat["x"]
  assert (low, high) == pytest.approx((0.1, 3.1))
  (low, high), = weird_relu2.habitat["y"]
  assert (low, high) == pytest.approx((1.6 - 1e-6, 1.6 + 1e-6))
  assert activations.build("weird_leaky_relu").habitat is None


@pytest.mark.parametrize("spec, message", [
    ("", "non-empty"),
    ("nope", "unknown activation 'nope'; known: dense_relu"),
    ("srelu(q=1)", "srelu has no parameter 'q'; known: h"),
    ("relu2(h=1)", "relu2 has no parameter 'h'; known: none"),
    ("srelu(h=abc)", "srelu.h must be a number"),
    ("srelu(h=-1)", "h must be >= 0"),
    ("srelu(h=1", "expected ',' or ')'"),
    ("srelu(h=1)x", "expected end of spec"),
    ("srelu(h=1,h=2)", "given twice"),
    ("srelu(h=1;)", "unexpected character ';'"),
    ("shift(inner=2)", "shift.inner must be an activation spec"),
    ("shift(inner=nope)", "unknown activation 'nope'"),
    ("mixed(steps=2.5)", "mixed.steps must be an integer"),
    ("mixed(steps=0)", "steps must be a positive integer"),
    ("relu(grad_at_zero=0.5)", "grad_at_zero must be 0 or 1"),
    ("mixed(grad_at_zero=2)", "grad_at_zero must be 0 or 1"),
])
def test_bad_specs_raise_one_line_value_errors(spec, message):
  with pytest.raises(ValueError, match=None) as raised:
    activations.validate(spec)
  text = str(raised.value)
  assert message in text
  assert "\n" not in text


def test_nested_stateful_activations_have_unique_variable_paths():
  from robust_sparse.models import build_model
  model = build_model("lenet5", (8, 8, 1), 10,
                      activation="shift(inner=sshaped(inner=mixed(steps=10),h=1),sx=1)")
  paths = [v.path for v in model.variables]
  assert len(paths) == len(set(paths))
  assert sum("step" in p for p in paths) == 4  # One counter per activation site.


def _set_portion(layer, step):
  layer.step.assign(step)
  return float(layer.portion_of_jsrelu)


@pytest.mark.parametrize("grad_at_zero", [0, 1])
def test_mixed_is_exactly_its_parts_at_both_ends(grad_at_zero):
  x = np.concatenate([POINTS, [0.0, -0.0]]).astype(np.float32)
  mixed = activations.build(f"mixed(steps=4,grad_at_zero={grad_at_zero})")
  relu_layer = activations.build(f"relu(grad_at_zero={grad_at_zero})")
  jsrelu_layer = activations.build("jsrelu")
  for step, reference in ((0, relu_layer), (4, jsrelu_layer)):
    _set_portion(mixed, step)
    y, dy = _value_and_grad(mixed, x)
    y_ref, dy_ref = _value_and_grad(reference, x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dy, dy_ref)
  # In between, the derivative at 0 is (1 - k) * grad_at_zero + k.
  k = _set_portion(mixed, 1)
  _, dy = _value_and_grad(mixed, [0.0])
  assert dy[0] == pytest.approx((1 - k) * grad_at_zero + k)


def test_sshaped_over_mixed_steps_once_and_stays_odd():
  layer = activations.build("sshaped(inner=mixed(steps=4),h=0.5)")
  x = POINTS.astype(np.float32)
  for step in range(5):
    assert int(layer.inner.step.numpy()) == step
    k = float(layer.inner.portion_of_jsrelu)

    def inner(t):
      return (1 - k) * relu(t) + k * jsrelu(t)

    def inner_grad(t):
      return (1 - k) * relu_grad_tf(t) + k * jsrelu_grad(t)

    formula, derivative = sshaped(inner, inner_grad, 0.5)
    y_negated, _ = _value_and_grad(layer, -x)  # Inference: no step.
    y, dy = _value_and_grad(layer, x, training=True)
    # Both halves use the same k (two inner calls used k and k + 1/steps).
    np.testing.assert_allclose(y, formula(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dy, derivative(x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(y_negated, -y, rtol=1e-6, atol=1e-7)
  assert int(layer.inner.step.numpy()) == 5


def test_sshaped_over_mixed_in_a_model_counts_one_step_per_training_call():
  model = _model("shift(inner=sshaped(inner=mixed(steps=10),h=0.5),sx=0.1)")
  step = model.get_layer("activation_0").inner.inner.step
  x = np.ones((4, 3), np.float32)
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(x, training=True))
  tape.gradient(loss, model.trainable_variables)
  assert int(step.numpy()) == 1
  model(x)
  assert int(step.numpy()) == 1


def test_nested_variables_live_under_the_outer_layer():
  nested = activations.build("sshaped(inner=mixed(steps=4))", name="act")
  twice = activations.build("shift(inner=sshaped(inner=mixed(steps=4)))",
                            name="act2")
  assert [v.path for v in nested.variables] == ["act/inner/step"]
  assert [v.path for v in twice.variables] == ["act2/inner/inner/step"]
  # A top-level layer whose name is the old sibling name does not collide.
  inputs = keras.Input((3,))
  hidden = activations.build("mixed(steps=4)", name="act_inner")(inputs)
  outputs = activations.build("sshaped(inner=mixed(steps=4))", name="act")(hidden)
  paths = [v.path for v in keras.Model(inputs, outputs).variables]
  assert sorted(paths) == ["act/inner/step", "act_inner/step"]
