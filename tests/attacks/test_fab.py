"""FAB-T: the closest boundary point of a linear model, the ball, success on an undefended model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.fab import fab_t
from robust_sparse.data import load_dataset

BUDGETS = {np.inf: 0.15, 2: 1.5}


def _plain(model):
  """The model behind a plain callable, which `attacks.compiled` traces as a plain graph.

  XLA (its choice for a Keras model of dense layers) takes 5-10 s per
  configuration to compile on 2 cores, a plain graph about 1 s; the fidelity
  checks (benchmarks/fidelity/fab_square.py) run the XLA path.
  """
  def plain(images, training=False):
    return model(images, training=training)
  return plain


@pytest.fixture(scope="module")
def trained():
  """A small undefended MLP on scikit-learn's 8x8 digits, and 24 test images."""
  data = load_dataset("sklearn_digits")
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                            keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(data.x_train, data.y_train, epochs=10, batch_size=64, verbose=0)
  return _plain(model), data.x_test[:24].astype(np.float32), data.y_test[:24].astype(np.int64)


def _predict(model, x):
  return np.argmax(model(tf.constant(x)).numpy(), -1)


def _sizes(x_adv, x, norm):
  delta = (x_adv - x).reshape(len(x), -1)
  return np.abs(delta).max(axis=1) if norm == np.inf else np.linalg.norm(delta, axis=1)


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_finds_the_closest_boundary_point_of_a_linear_model(norm):
  """For logits x W + c the boundary is a hyperplane, at |margin| / |w_1 - w_0|_q (q dual to p)."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(6, 2)).astype(np.float32)
  bias = np.array([0.0, -0.4], np.float32)
  layer = keras.layers.Dense(2)
  layer.build((None, 6))
  layer.set_weights([kernel, bias])
  model = keras.Sequential([keras.Input((6,)), layer])
  x = np.full((3, 6), 0.5, np.float32) + rng.uniform(-0.05, 0.05, (3, 6)).astype(np.float32)
  logits = x @ kernel + bias
  assert np.all(logits[:, 0] > logits[:, 1])  # Class 0; the only target is class 1.
  normal = kernel[:, 1] - kernel[:, 0]
  dual = np.abs(normal).sum() if norm == np.inf else np.linalg.norm(normal)
  closest = (logits[:, 0] - logits[:, 1]) / dual
  direction = np.sign(normal) if norm == np.inf else normal / np.linalg.norm(normal)
  corner = x + closest[:, None] * direction
  assert corner.min() > 0.0 and corner.max() < 1.0  # The box [0, 1] does not bind.
  x_adv = fab_t(_plain(model), x, eps=1.0, norm=norm, steps=20, n_target_classes=1).numpy()
  found = _sizes(x_adv, x, norm)
  assert np.all(_predict(model, x_adv) == 1)
  assert np.all(found >= closest * (1 - 1e-4))
  assert np.all(found <= closest * 1.02)
  # A budget below the closest boundary point leaves every image as it was.
  small = fab_t(_plain(model), x, eps=0.9 * closest.min(), norm=norm, steps=20,
                n_target_classes=1).numpy()
  np.testing.assert_array_equal(small, x)


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_in_the_ball_and_range_and_fooled_examples_misclassified(trained, norm):
  model, x, y = trained
  eps = BUDGETS[norm]
  x_adv = fab_t(model, x, y, eps=eps, norm=norm, steps=10).numpy()
  size = _sizes(x_adv, x, norm)
  assert np.all(size <= eps * (1 + 1e-5))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  changed = size > 0
  clean_right = _predict(model, x) == y
  assert not np.any(changed & ~clean_right)  # Misclassified images stay as they are.
  assert np.all(_predict(model, x_adv[changed]) != y[changed])
  assert changed.sum() >= clean_right.sum() // 2  # An undefended model falls often.
  np.testing.assert_array_equal(x_adv[~changed], x[~changed])


def test_eager_equals_inside_a_tf_function_with_random_restarts(trained):
  model, x, y = trained
  seed = tf.constant([3, 4])
  attack = dict(eps=BUDGETS[np.inf], norm="linf", steps=5, n_target_classes=2, n_restarts=2)
  eager = fab_t(model, x, y, seed=seed, **attack).numpy()
  assert not compiled._use_xla(model)  # Both sides a plain graph: the same random starts.
  inside = tf.function(lambda x, y: fab_t(model, x, y, seed=seed, **attack))(x, y).numpy()
  np.testing.assert_allclose(inside, eager, atol=1e-6)


def test_bad_arguments_raise(trained):
  model, x, _ = trained
  for bad, match in ((dict(steps=-1), "steps"), (dict(n_restarts=0), "n_restarts"),
                     (dict(n_target_classes=0), "n_target_classes"),
                     (dict(alpha_max=2.0), "alpha_max"), (dict(eta=0.5), "eta"),
                     (dict(beta=0.0), "beta"), (dict(norm=1), "norm"), (dict(eps=-1.0), "eps")):
    with pytest.raises(ValueError, match=match):
      fab_t(model, x, **{"eps": 0.1, **bad})
  with pytest.raises(ValueError, match="classes - 1"):
    fab_t(model, x, eps=0.1, n_target_classes=10)
