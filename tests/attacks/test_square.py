"""Square Attack: the ball and data range, success on an undefended model, its monotone search."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.square import p_schedule, square, square_margins, square_sizes
from robust_sparse.data import load_dataset

QUERIES = 100
BUDGETS = {np.inf: 0.3, 2: 2.0}


@pytest.fixture(scope="module")
def trained():
  """A small undefended MLP on scikit-learn's 8x8 digits, and 24 test images.

  The attack gets the model behind a plain callable, which `attacks.compiled`
  traces as a plain graph: XLA (its choice for a Keras model of dense layers)
  takes 5-10 s per configuration to compile on 2 cores, a plain graph 1-2 s.
  The fidelity checks (benchmarks/fidelity/fab_square.py) run the XLA path.
  """
  data = load_dataset("sklearn_digits")
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input(data.input_shape), keras.layers.Flatten(),
                            keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
  model.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(data.x_train, data.y_train, epochs=10, batch_size=64, verbose=0)

  def plain(images, training=False):
    return model(images, training=training)

  return plain, data.x_test[:24].astype(np.float32), data.y_test[:24].astype(np.int64)


def _predict(model, x):
  return np.argmax(model(tf.constant(x)).numpy(), -1)


def test_p_schedule_follows_the_official_code():
  # Halvings after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of 10000 queries.
  assert [p_schedule(i, 10000, 0.8) for i in (0, 10, 11, 50, 51, 8000, 8001)] == [
      0.8, 0.8, 0.4, 0.4, 0.2, 0.8 / 256, 0.8 / 512]
  assert p_schedule(2, 100, 0.8) == 0.8 / 4  # Rescaled: query 2 of 100 is 200 of 10000.
  # round(sqrt(p h w)): 28 x 28 at p 0.8 -> 25; L2's sizes are odd and at least 3.
  assert square_sizes(1, 0.8, 28, 28, np.inf) == [25]
  assert set(square_sizes(5000, 0.8, 28, 28, 2)) <= {3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25}
  assert min(square_sizes(5000, 0.8, 28, 28, np.inf)) == 1


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_in_the_ball_and_range_and_fooled_examples_misclassified(trained, norm):
  model, x, y = trained
  eps = BUDGETS[norm]
  x_adv = square(model, x, y, eps=eps, norm=norm, n_queries=QUERIES,
                 seed=tf.constant([1, 2])).numpy()
  delta = (x_adv - x).reshape(len(x), -1)
  size = np.abs(delta).max(axis=1) if norm == np.inf else np.linalg.norm(delta, axis=1)
  assert np.all(size <= eps * (1 + 1e-5))
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  changed = size > 0
  clean_right = _predict(model, x) == y
  # Only correctly classified images are attacked; an image changes only where it is fooled.
  assert not np.any(changed & ~clean_right)
  assert np.all(_predict(model, x_adv[changed]) != y[changed])
  assert changed.sum() >= clean_right.sum() // 3  # An undefended model falls often.
  np.testing.assert_array_equal(x_adv[~changed], x[~changed])


@pytest.mark.parametrize("norm", [np.inf, 2])
def test_best_margin_never_increases_and_matches_the_attack(trained, norm):
  """The loss (the margin) of the best point never rises from one query to the next."""
  model, x, y = trained
  eps = BUDGETS[norm]
  seed = tf.constant([1, 2])
  margins = square_margins(model, x, y, eps=eps, norm=norm, n_queries=QUERIES,
                           seed=seed).numpy()
  assert margins.shape == (QUERIES + 1, len(x))
  assert np.all(np.diff(margins, axis=0) <= 0.0)
  assert np.any(np.diff(margins, axis=0) < 0.0)  # The search does move.
  # The attack with the same seed returns the images whose final margin is <= 0.
  x_adv = square(model, x, y, eps=eps, norm=norm, n_queries=QUERIES, seed=seed).numpy()
  changed = np.abs(x_adv - x).reshape(len(x), -1).max(axis=1) > 0
  clean_right = _predict(model, x) == y
  np.testing.assert_array_equal(changed, clean_right & (margins[-1] <= 0.0))


def test_eager_equals_inside_a_tf_function(trained):
  model, x, y = trained
  seed = tf.constant([3, 4])
  attack = dict(eps=BUDGETS[np.inf], norm="linf", n_queries=QUERIES)
  eager = square(model, x, y, seed=seed, **attack).numpy()
  # The eager call compiled a plain graph for the plain callable (XLA, which it
  # picks for a Keras model of dense layers, draws other random numbers).
  assert not compiled._use_xla(model)
  inside = tf.function(lambda x, y: square(model, x, y, seed=seed, **attack))(x, y).numpy()
  np.testing.assert_allclose(inside, eager, atol=1e-6)
  other_seed = square(model, x, y, seed=tf.constant([5, 6]), **attack).numpy()
  assert not np.array_equal(other_seed, eager)


def test_bad_arguments_raise():
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
  with pytest.raises(ValueError, match="images"):
    square(model, np.zeros((2, 6), np.float32), eps=0.1)
  images = np.zeros((2, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="p_init"):
    square(model, images, eps=0.1, p_init=1.5)
  with pytest.raises(ValueError, match="n_queries"):
    square(model, images, eps=0.1, n_queries=-1)
  with pytest.raises(ValueError, match="norm"):
    square(model, images, eps=0.1, norm=1)
  with pytest.raises(ValueError, match="5 x 5"):
    square(model, np.zeros((2, 4, 4, 1), np.float32), eps=0.1, norm=2)
