"""APGD-T, the DLR losses and the AutoAttack sequence: the ball, the loss, the worst case."""

import importlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.apgd import apgd_ce, apgd_t, checkpoints, search
from robust_sparse.attacks.autoattack import autoattack, autoattack_report
from robust_sparse.attacks.dlr import dlr_loss, dlr_loss_targeted, ranked_classes
from robust_sparse.attacks.spec import parse_attack_specs, resolve_attack_spec
from robust_sparse.attacks.registry import AttackConfig

SEED = tf.constant([3, 4], tf.int32)
# The module itself: `robust_sparse.attacks.autoattack` as an attribute is the exported function.
autoattack_lib = importlib.import_module("robust_sparse.attacks.autoattack")


@pytest.fixture(scope="module")
def mlp():
  """A tiny random MLP behind a plain function: compiled as a plain graph, not XLA (which
  takes seconds per attack to compile; the XLA path is tested with fake components)."""
  keras.utils.set_random_seed(0)
  network = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])

  def model(v, training=False):
    return network(v, training=training)

  x = np.random.default_rng(0).random((12, 6, 6, 1)).astype(np.float32)
  return model, x, np.argmax(model(x), -1)


def test_dlr_losses_match_numpy_on_random_logits():
  rng = np.random.default_rng(1)
  z = rng.normal(0, 3, (50, 10)).astype(np.float32)
  y = rng.integers(0, 10, 50)
  y[:10] = np.argmax(z[:10], 1)  # Some labels are the top class, some are not.
  t = (y + rng.integers(1, 10, 50)) % 10
  s = -np.sort(-z.astype(np.float64), 1)
  rows = np.arange(50)
  z_y = z[rows, y].astype(np.float64)
  other = np.where(np.argmax(z, 1) == y, s[:, 1], s[:, 0])
  np.testing.assert_allclose(dlr_loss(z, y), -(z_y - other) / (s[:, 0] - s[:, 2] + 1e-12),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dlr_loss_targeted(z, y, t),
                             -(z_y - z[rows, t]) / (s[:, 0] - 0.5 * (s[:, 2] + s[:, 3]) + 1e-12),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(ranked_classes(z, 3), np.argsort(-z, 1)[:, 1:4])
  with pytest.raises(ValueError, match="at least 4 classes"):
    dlr_loss_targeted(z[:, :3], y % 3, t % 3)


@pytest.mark.parametrize("norm, eps", [(np.inf, 0.05), (2, 0.3)])
def test_apgd_t_stays_in_the_ball_and_the_data_range(mlp, norm, eps):
  model, x, y = mlp
  kwargs = dict(eps=eps, steps=5, n_target_classes=3, seed=SEED, norm=norm)
  x_adv = apgd_t(model, x, y, **kwargs).numpy()
  inside = tf.function(lambda x, y: apgd_t(model, x, y, **kwargs),
                       jit_compile=compiled._use_xla(model))(x, y).numpy()
  np.testing.assert_array_equal(x_adv, inside)  # Eager (compiled itself) == in a tf.function.
  delta = (x_adv - x).reshape(len(x), -1)
  size = np.abs(delta).max(1) if norm == np.inf else np.sqrt((delta ** 2).sum(1))
  assert size.max() <= eps * (1 + 1e-5)
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
  assert size.max() > eps / 2  # It moved.
  with pytest.raises(ValueError, match="n_target_classes"):
    apgd_t(model, x, y, eps=0.1, n_target_classes=0)


def test_targeted_attack_increases_the_target_margin(mlp):
  """One target (the runner-up class): z_t - z_y grows from the clean image for every example."""
  model, x, y = mlp
  target = np.argsort(-model(x).numpy(), 1)[:, 1]
  x_adv = apgd_t(model, x, y, eps=0.03, steps=10, n_target_classes=1, seed=SEED).numpy()

  def margin(images):
    z = model(images).numpy()
    return z[np.arange(len(z)), target] - z[np.arange(len(z)), y]

  assert np.all(margin(x_adv) > margin(x) + 1e-4)


def test_autoattack_worst_case_is_the_or_of_its_components(mlp):
  model, x, y = mlp
  y = y.copy()
  y[:2] = (y[:2] + 1) % 10  # Two clean images misclassified already.
  kwargs = dict(eps=0.04, steps=4, n_target_classes=2, seed=SEED,
                components=("apgd_ce", "apgd_t"))
  x_adv, broken = autoattack_report(model, x, y, **kwargs)
  broken = broken.numpy()
  inside = tf.function(lambda x, y: autoattack(model, x, y, **kwargs),
                       jit_compile=compiled._use_xla(model))(x, y)
  np.testing.assert_array_equal(x_adv.numpy(), inside.numpy())
  clean = np.argmax(model(x), -1) == y
  robust = np.argmax(model(x_adv), -1) == y
  assert broken.shape == (2, len(x))
  assert not np.any(broken[0] & broken[1])  # APGD-T saw only what APGD-CE left robust.
  assert not np.any(broken[:, ~clean])
  np.testing.assert_array_equal(robust, clean & ~broken.any(0))
  unbroken = ~broken.any(0)
  np.testing.assert_array_equal(x_adv.numpy()[unbroken], x[unbroken])  # As the reference.
  assert broken.any()


def _fake_components(monkeypatch, seen, record):
  """apgd_ce breaks the examples of even id, apgd_t those of id divisible by 3.

  An example is [id, label one-hot x 4]; the model's logits are the one-hot
  part, so an attack "breaks" an example by rolling its one-hot. With
  `record` (not under XLA, which has no py_function) apgd_t records the ids
  it is given.
  """
  def breaker(divisor, record):
    def attack(model, x, y, seed=None, **kwargs):
      del model, y, seed, kwargs
      if record:
        x = tf.numpy_function(lambda v: seen.append(v[:, 0].copy()) or v, [x], tf.float32,
                              stateful=True)
      hit = tf.equal(tf.math.floormod(x[:, 0], divisor), 0)
      rolled = tf.concat([x[:, :1], tf.roll(x[:, 1:], 1, axis=1)], axis=1)
      return tf.where(hit[:, None], rolled, x)
    return attack

  fakes = {"apgd_ce": breaker(2, False), "apgd_t": breaker(3, record)}
  monkeypatch.setattr(autoattack_lib, "_function", lambda component: fakes.get(component.name))


@pytest.mark.parametrize("jit", [False, True])
def test_each_component_attacks_only_the_examples_still_robust(monkeypatch, jit):
  seen = []
  _fake_components(monkeypatch, seen, record=not jit)
  ids = np.arange(12, dtype=np.float32)
  labels = np.arange(12) % 4
  x = np.concatenate([ids[:, None], np.eye(4, dtype=np.float32)[labels]], axis=1)
  y = labels.copy()
  y[7] = (y[7] + 1) % 4  # Id 7 is misclassified already.

  def model(v, training=False):
    del training
    return v[:, 1:]

  run = tf.function(lambda x, y: autoattack_report(model, x, y, eps=0.1, components=(
      "apgd_ce", "apgd_t")), jit_compile=jit)
  x_adv, broken = run(x, y)
  broken = broken.numpy()
  np.testing.assert_array_equal(np.flatnonzero(broken[0]), [0, 2, 4, 6, 8, 10])
  np.testing.assert_array_equal(np.flatnonzero(broken[1]), [3, 9])
  if not jit:  # Outside XLA apgd_t ran on the odd ids left, id 7 (misclassified) excluded.
    np.testing.assert_array_equal(np.concatenate(seen), [1, 3, 5, 9, 11])
  robust = np.argmax(model(x_adv).numpy(), -1) == y
  np.testing.assert_array_equal(np.flatnonzero(robust), [1, 5, 11])


@pytest.mark.parametrize("first_window, halvings_skipped", [("paper", 0), ("fra31", 1)])
def test_first_window_counts_from_the_start_or_from_zero(first_window, halvings_skipped):
  """A constant model (loss log 3 everywhere) with rho 0: every checkpoint halves the step,
  except the first one under fra31's rule, whose first step counts log 3 > 0 as an increase."""
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, kernel_initializer="zeros")])
  x = tf.constant(np.random.default_rng(0).random((4, 6)), tf.float32)
  y = tf.zeros(4, tf.int64)
  state = tf.function(lambda x: search(model, x, y, SEED, eps=0.1, steps=20, clip_min=0.0,
                                       clip_max=1.0, norm=np.inf, rho=0.0,
                                       first_window=first_window))(x)
  halvings = len(checkpoints(20)) - halvings_skipped
  np.testing.assert_allclose(state["step_size"].numpy(), 0.2 / 2 ** halvings, rtol=1e-6)
  with pytest.raises(ValueError, match="first_window must be one of paper, fra31"):
    apgd_ce(model, x, y, eps=0.1, first_window="zero")


def test_specs_take_the_standard_budgets_and_reject_bad_ones():
  defaults = AttackConfig("pgd", eps=0.1, steps=7)
  column, config = resolve_attack_spec("apgd_t", defaults)
  assert (column, config.steps, config.n_target_classes) == ("apgd_t", 100, 9)
  column, config = resolve_attack_spec("autoattack(norm=2,eps=0.5)", defaults)
  assert (column, config.norm, config.eps, config.steps, config.n_queries) == (
      "autoattack_norm2_eps0.5", 2, 0.5, 100, 5000)
  _, config = resolve_attack_spec("square(n_queries=100)", defaults)
  assert config.n_queries == 100
  assert defaults.first_window == "paper"
  column, config = resolve_attack_spec("autoattack(first_window=fra31)", defaults)
  assert (column, config.first_window) == ("autoattack_first_windowfra31", "fra31")
  names = [c for c, _ in parse_attack_specs("apgd_t,fab_t,square,autoattack", defaults)]
  assert names == ["apgd_t", "fab_t", "square", "autoattack"]
  for spec, message in [("square(steps=3)", "square has no parameter 'steps'"),
                        ("apgd_t(n_target_classes=0)", "must be an integer >= 1"),
                        ("autoattack(norm=1)", "norm must be 2 or inf"),
                        ("apgd_ce(first_window=zero)", "must be one of paper, fra31")]:
    with pytest.raises(ValueError, match=r"^--eval_attacks .*" + message) as error:
      resolve_attack_spec(spec, defaults)
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="unknown AutoAttack component"):
    autoattack_lib.check_components(("apgd_ce", "cw"))
