"""APGD-CE: the ball, the checkpoint schedule, the step-size halving, and its strength."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import AttackConfig, apgd_ce, make_attack, pgd
from robust_sparse.attacks.apgd import checkpoints, search
from robust_sparse.data import load_dataset

EPS = 0.1


@pytest.fixture(scope="module")
def trained():
  """A small MLP trained for a second on scikit-learn's 8x8 digits, and its test set."""
  data = load_dataset("sklearn_digits")
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                            keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(data.x_train, data.y_train, epochs=15, batch_size=64, verbose=0)
  return model, data.x_test, data.y_test.astype(np.int64)


def _accuracy(model, x, y):
  return np.mean(np.argmax(model(x), -1) == y)


def test_checkpoints_follow_the_paper():
  # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times N = 100.
  assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
  assert checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9, 10]
  assert checkpoints(0) == []


def test_step_size_halves_at_each_checkpoint_without_progress():
  """A constant model never increases its loss, so every checkpoint halves the step."""
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, kernel_initializer="zeros")])
  x = tf.constant(np.random.default_rng(0).random((4, 6)), tf.float32)
  y = tf.zeros(4, tf.int64)
  state = tf.function(lambda x: search(model, x, y, tf.constant([0, 1]), eps=EPS, steps=20,
                                       clip_min=0.0, clip_max=1.0, norm=np.inf, rho=0.75))(x)
  halvings = len(checkpoints(20))
  np.testing.assert_allclose(state["step_size"].numpy(), 2 * EPS / 2 ** halvings, rtol=1e-6)


def test_linf_on_linear_model_reaches_the_corner():
  """The highest-loss point of a linear model's L-infinity ball is x + eps * sign(w)."""
  w = np.array([0.5, -1.0, 2.0, -0.25, 1.5], np.float32)
  layer = keras.layers.Dense(2, use_bias=False)
  layer.build((None, w.size))
  layer.set_weights([np.stack([np.zeros_like(w), w], axis=1)])
  model = keras.Sequential([keras.Input((w.size,)), layer])
  # Logits [0, w.x]: the loss of label 1 grows along -w, and the ball is too small
  # to flip the label, so the answer is the highest-loss point.
  x = np.full((4, 5), 0.5, np.float32)
  y = np.ones(4, np.int64)
  x_adv = apgd_ce(model, x, y, eps=EPS, steps=10, seed=tf.constant([2, 3])).numpy()
  np.testing.assert_allclose(x_adv, x - EPS * np.sign(w), atol=1e-6)


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_stays_in_the_ball_and_data_range(trained, norm):
  model, x, y = trained
  eps = EPS if norm == np.inf else 1.0
  x_adv = apgd_ce(model, x, y, eps=eps, steps=10, norm=norm, clip_min=0.0, clip_max=1.0,
                  seed=tf.constant([0, 1])).numpy()
  delta = (x_adv - x).reshape(len(x), -1)
  size = np.abs(delta).max(axis=1) if norm == np.inf else np.linalg.norm(delta, axis=1)
  assert np.all(size <= eps * (1 + 1e-5))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert _accuracy(model, x_adv, y) < _accuracy(model, x, y) - 0.2


def test_at_least_as_strong_as_pgd_with_the_same_steps(trained):
  model, x, y = trained
  seed = tf.constant([0, 1])
  with_pgd = pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, seed=seed)
  with_apgd = apgd_ce(model, x, y, eps=EPS, steps=10, seed=seed)
  assert _accuracy(model, with_apgd, y) <= _accuracy(model, with_pgd, y)


def test_misclassified_clean_examples_stay_misclassified(trained):
  model, x, y = trained
  wrong = np.argmax(model(x), -1) != y
  assert wrong.any()
  x_adv = apgd_ce(model, x, y, eps=EPS, steps=10, seed=tf.constant([0, 1])).numpy()
  np.testing.assert_array_equal(x_adv[wrong], x[wrong])


def test_eps_zero_returns_x(trained):
  model, x, _ = trained
  np.testing.assert_array_equal(apgd_ce(model, x, eps=0.0, steps=5).numpy(), x)


def test_registry_entry_composes_in_a_compiled_step(trained):
  model, x, y = trained
  attack = make_attack(AttackConfig("apgd_ce", eps=EPS, steps=10))
  seed = tf.constant([4, 5])
  inside = tf.function(lambda x, y: attack(model, x, y, seed), jit_compile=True)(x, y)
  eager = attack(model, x, y, seed)
  np.testing.assert_allclose(inside.numpy(), eager.numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="cleverhans"):
    AttackConfig("apgd_ce", impl="cleverhans")
