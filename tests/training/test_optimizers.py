"""Tests of the optimizer registry against NumPy versions of the torch.optim formulas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.training import optimizers
from robust_sparse.training.optimizers import make_optimizer

# A learning rate that changes at every step, as a schedule would.
LEARNING_RATES = [0.1, 0.05, 0.2, 0.01, 0.1, 0.3]

# A quadratic loss sum(curvature * w**2) / 2 + offset . w, so that the
# gradient depends on the weights and weight decay interacts with it.
CURVATURE = np.array([0.5, 2.0, 1.0, 0.1], np.float32)
OFFSET = np.array([0.3, -1.0, 0.0, 2.0], np.float32)
W0 = np.array([1.0, -2.0, 0.5, 3.0], np.float32)

# Keras computes Adam's bias corrections 1 - beta**t in float32, which cancels
# to a few 1e-5 relative; with steps of about the learning rate (0.1 here) the
# weights drift from a float64 reference by some 1e-6.
ADAM_ATOL = 1e-5


def gradient(w):
  return CURVATURE * w + OFFSET


def torch_sgd(learning_rates, momentum=0.0, nesterov=False, weight_decay=0.0):
  """torch.optim.SGD (dampening 0) in float64; returns the weights after each step."""
  w, buffer, trajectory = W0.astype(np.float64), None, []
  for lr in learning_rates:
    g = gradient(w) + weight_decay * w
    if momentum:
      buffer = g.copy() if buffer is None else momentum * buffer + g
      g = g + momentum * buffer if nesterov else buffer
    w = w - lr * g
    trajectory.append(w)
  return trajectory


def torch_adam(learning_rates, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0,
               decoupled=False, epsilon_hat=False):
  """torch.optim.Adam (decoupled=False) or AdamW (decoupled=True) in float64.

  epsilon_hat=True puts epsilon where Keras does (before the bias correction).
  """
  w, m, v, trajectory = W0.astype(np.float64), 0.0, 0.0, []
  for t, lr in enumerate(learning_rates, start=1):
    g = gradient(w)
    if decoupled:
      w = w * (1 - lr * weight_decay)
    else:
      g = g + weight_decay * w
    m = beta_1 * m + (1 - beta_1) * g
    v = beta_2 * v + (1 - beta_2) * g * g
    correction_1, correction_2 = 1 - beta_1**t, 1 - beta_2**t
    if epsilon_hat:
      w = w - lr * np.sqrt(correction_2) / correction_1 * m / (np.sqrt(v) + epsilon)
    else:
      w = w - lr / correction_1 * m / (np.sqrt(v) / np.sqrt(correction_2) + epsilon)
    trajectory.append(w)
  return trajectory


def config_of(optimizer):
  """The optimizer's config without its name, which Keras makes unique per instance."""
  config = optimizer.get_config()
  del config["name"]
  return config


def keras_trajectory(optimizer, learning_rates):
  """Runs `optimizer` eagerly on the quadratic, assigning each step's rate first."""
  variable = keras.Variable(W0)
  optimizer.build([variable])
  trajectory = []
  for lr in learning_rates:
    optimizer.learning_rate.assign(lr)
    optimizer.apply([gradient(variable.numpy())], [variable])
    trajectory.append(variable.numpy())
  return trajectory


@pytest.mark.parametrize("momentum,nesterov,weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, True, 0.0),
    (0.9, False, 0.05), (0.5, True, 0.05)])
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
  optimizer = make_optimizer("sgd", 0.1, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay)
  got = keras_trajectory(optimizer, LEARNING_RATES)
  want = torch_sgd(LEARNING_RATES, momentum, nesterov, weight_decay)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_keras_sgd_differs_when_the_rate_changes():
  # Why "sgd" is not keras.optimizers.SGD: its buffer holds lr * gradient.
  want = torch_sgd(LEARNING_RATES, momentum=0.9)
  got = keras_trajectory(keras.optimizers.SGD(0.1, momentum=0.9), LEARNING_RATES)
  assert not np.allclose(got[-1], want[-1], rtol=1e-3)
  constant = [0.1] * 4
  got = keras_trajectory(keras.optimizers.SGD(0.1, momentum=0.9), constant)
  np.testing.assert_allclose(got, torch_sgd(constant, momentum=0.9), rtol=1e-5)


def test_adam_without_weight_decay_is_keras_adam_bit_for_bit():
  optimizer = make_optimizer("adam", 1e-3)
  assert type(optimizer) is keras.optimizers.Adam
  reference = keras.optimizers.Adam(1e-3)
  assert config_of(optimizer) == config_of(reference)
  assert optimizer.epsilon == 1e-7
  rates = [1e-3] * 5
  np.testing.assert_array_equal(keras_trajectory(optimizer, rates),
                                keras_trajectory(reference, rates))


def test_adam_overrides_reach_keras_adam():
  optimizer = make_optimizer("adam", 2e-4, beta_1=0.5, beta_2=0.99, epsilon=1e-8)
  reference = keras.optimizers.Adam(2e-4, beta_1=0.5, beta_2=0.99, epsilon=1e-8)
  assert config_of(optimizer) == config_of(reference)


@pytest.mark.parametrize("beta_1", [0.9, 0.5])
def test_adam_weight_decay_is_coupled_as_torch(beta_1):
  optimizer = make_optimizer("adam", 0.1, weight_decay=0.1, beta_1=beta_1)
  assert isinstance(optimizer, optimizers.AdamL2)
  got = keras_trajectory(optimizer, LEARNING_RATES)
  want = torch_adam(LEARNING_RATES, beta_1=beta_1, weight_decay=0.1, epsilon_hat=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=ADAM_ATOL)
  # Against torch's epsilon placement: equal up to epsilon's size.
  want = torch_adam(LEARNING_RATES, beta_1=beta_1, weight_decay=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_adamw_is_keras_adamw_and_decays_as_torch():
  optimizer = make_optimizer("adamw", 0.1, weight_decay=0.2)
  assert type(optimizer) is keras.optimizers.AdamW
  got = keras_trajectory(optimizer, LEARNING_RATES)
  want = torch_adam(LEARNING_RATES, weight_decay=0.2, decoupled=True, epsilon_hat=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=ADAM_ATOL)
  want = torch_adam(LEARNING_RATES, weight_decay=0.2, decoupled=True)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  # The decay is really decoupled: the coupled formula gives other numbers.
  coupled = torch_adam(LEARNING_RATES, weight_decay=0.2, epsilon_hat=True)
  assert not np.allclose(got[-1], coupled[-1], rtol=1e-3)


def test_excluded_variables_get_no_weight_decay():
  optimizer = make_optimizer("sgd", 0.1, weight_decay=0.5)
  optimizer.exclude_from_weight_decay(var_names=["bias"])
  kernel, bias = keras.Variable([1.0], name="kernel"), keras.Variable([1.0], name="bias")
  optimizer.apply([np.zeros(1, np.float32)] * 2, [kernel, bias])
  np.testing.assert_allclose(kernel.numpy(), [0.95])
  np.testing.assert_allclose(bias.numpy(), [1.0])


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=0.05)),
    ("adam", dict(weight_decay=0.0)),
    ("adam", dict(weight_decay=0.1)),
    ("adamw", dict(weight_decay=0.2))])
def test_learning_rate_assigned_inside_xla_takes_effect(name, kwargs):
  optimizer = make_optimizer(name, 0.5, **kwargs)
  assert isinstance(optimizer.learning_rate, keras.Variable)
  variable = keras.Variable(W0)
  optimizer.build([variable])

  @tf.function(jit_compile=True)
  def step(lr):
    optimizer.learning_rate.assign(lr)
    optimizer.apply([tf.constant(CURVATURE) * variable.value + OFFSET], [variable])

  compiled = []
  for lr in LEARNING_RATES:
    step(tf.constant(lr, tf.float32))
    compiled.append(variable.numpy())
  np.testing.assert_allclose(optimizer.learning_rate.numpy(), LEARNING_RATES[-1])
  eager = keras_trajectory(make_optimizer(name, 0.5, **kwargs), LEARNING_RATES)
  np.testing.assert_allclose(compiled, eager, rtol=1e-6, atol=1e-7)
  if name == "sgd":
    np.testing.assert_allclose(compiled, torch_sgd(LEARNING_RATES, 0.9, True, 0.05),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    ("sgd", dict(momentum=0.9, nesterov=True, weight_decay=5e-4)),
    ("sgd", dict()),
    ("adam", dict(weight_decay=1e-3, beta_1=0.5)),
    ("adam", dict()),
    ("adamw", dict(weight_decay=1e-2, epsilon=1e-8))])
def test_config_round_trip(name, kwargs):
  optimizer = make_optimizer(name, 0.02, **kwargs)
  config = optimizer.get_config()
  clone = type(optimizer).from_config(dict(config))
  assert clone.get_config() == config
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
  assert type(restored) is type(optimizer)
  assert restored.get_config() == config


@pytest.mark.parametrize("kwargs,message", [
    (dict(name="rmsprop"), "--optimizer: unknown optimizer 'rmsprop'; known: adam, adamw, sgd"),
    (dict(momentum=-0.1), "--momentum must be >= 0, got -0.1"),
    (dict(weight_decay=-1e-4), "--weight_decay must be >= 0, got -0.0001"),
    (dict(nesterov=True), "--nesterov needs --momentum > 0"),
    (dict(learning_rate=-1.0), "--learning_rate must be >= 0"),
    (dict(name="adam", beta_1=1.0), "--beta_1 must be in [0, 1)"),
    (dict(name="adam", beta_2=-0.1), "--beta_2 must be in [0, 1)"),
    (dict(name="adamw", epsilon=-1.0), "--epsilon must be >= 0")])
def test_errors_name_the_flag(kwargs, message):
  arguments = dict(name="sgd", learning_rate=0.1)
  arguments.update(kwargs)
  with pytest.raises(ValueError) as error:
    make_optimizer(arguments.pop("name"), arguments.pop("learning_rate"), **arguments)
  assert message in str(error.value)


def test_adam_ignores_sgd_only_flags():
  # As the SSAM seed's build_base_optimizer, which drops them for Adam.
  optimizer = make_optimizer("adam", 1e-3, momentum=0.9, nesterov=True)
  assert config_of(optimizer) == config_of(keras.optimizers.Adam(1e-3))


def test_registry_names():
  assert optimizers.OPTIMIZERS.names() == ["adam", "adamw", "sgd"]
