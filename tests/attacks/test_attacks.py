"""Attack properties on tiny closed-form models (cleverhans-style seeded tests)."""

import gc
import weakref

import numpy as np
import keras
import pytest
import tensorflow as tf

from robust_sparse.attacks import AttackConfig, apgd_ce, common, compiled, fgsm, make_attack, pgd
from benchmarks.fidelity import attacks as fidelity_attacks
from robust_sparse.training import compilation

EPS = 0.1


def _linear_model(w):
  """Two-class logistic model: logits [0, w.x], so CE(y=0) grows along +w."""
  w = np.asarray(w, np.float32)
  layer = keras.layers.Dense(2, use_bias=False)
  layer.build((None, w.size))
  layer.set_weights([np.stack([np.zeros_like(w), w], axis=1)])
  return keras.Sequential([keras.Input((w.size,)), layer])


def _small_classifier():
  keras.utils.set_random_seed(3)
  model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="tanh"),
                            keras.layers.Dense(3)])
  rng = np.random.default_rng(3)
  x = rng.random((64, 10)).astype(np.float32)
  return model, x


@pytest.fixture
def batch():
  return np.random.default_rng(0).random((32, 10)).astype(np.float32)


def test_eps_zero_returns_x(batch):
  model, _ = _small_classifier()
  np.testing.assert_array_equal(fgsm(model, batch, eps=0.0).numpy(), batch)
  np.testing.assert_array_equal(
      pgd(model, batch, eps=0.0, step_size=0.05, steps=5, seed=tf.constant([1, 2])).numpy(),
      batch)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_linf_bound_and_clip_range(attack, batch):
  model, _ = _small_classifier()
  fn = make_attack(AttackConfig(attack, eps=0.3, step_size=0.1, steps=7, clip_min=0.2,
                                clip_max=0.9))
  x = np.clip(batch, 0.2, 0.9)
  x_adv = fn(model, x, None, tf.constant([0, 1])).numpy()
  assert np.all(np.abs(x_adv - x) <= 0.3 + 1e-6)
  assert x_adv.min() >= 0.2 and x_adv.max() <= 0.9
  assert np.any(x_adv != x)


def test_fgsm_on_linear_model_is_x_plus_eps_sign_w():
  w = np.array([0.5, -1.0, 2.0, -0.25, 1.5], np.float32)
  model = _linear_model(w)
  x = np.full((4, 5), 0.5, np.float32)
  y = np.zeros(4, np.int64)
  np.testing.assert_allclose(fgsm(model, x, y, eps=EPS).numpy(), x + EPS * np.sign(w),
                             rtol=1e-6)


def test_pgd_at_least_as_strong_as_fgsm():
  model, x = _small_classifier()
  y = tf.argmax(model(x), -1)

  def loss(x_adv):
    return keras.losses.sparse_categorical_crossentropy(y, model(x_adv), from_logits=True)

  fgsm_loss = loss(fgsm(model, x, eps=EPS)).numpy().mean()
  pgd_loss = loss(pgd(model, x, eps=EPS, step_size=EPS / 4, steps=20,
                      seed=tf.constant([4, 5]))).numpy().mean()
  assert pgd_loss >= fgsm_loss - 1e-6


def test_pgd_stateless_seed_is_reproducible(batch):
  model, _ = _small_classifier()
  kwargs = dict(eps=EPS, step_size=0.02, steps=3)
  a = pgd(model, batch, seed=tf.constant([7, 8]), **kwargs).numpy()
  b = pgd(model, batch, seed=tf.constant([7, 8]), **kwargs).numpy()
  c = pgd(model, batch, seed=tf.constant([7, 9]), **kwargs).numpy()
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


def test_agrees_with_cleverhans():
  model, x = _small_classifier()
  ours = make_attack(AttackConfig("fgsm", eps=EPS))(model, x)
  theirs = make_attack(AttackConfig("fgsm", eps=EPS, impl="cleverhans"))(model, x)
  np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-6)
  # Without the random start PGD is deterministic, so the two must agree too.
  config = dict(eps=EPS, step_size=0.02, steps=10, random_start=False)
  ours = make_attack(AttackConfig("pgd", **config))(model, x)
  theirs = make_attack(AttackConfig("pgd", impl="cleverhans", **config))(model, x)
  np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5)


def test_compiles_inside_tf_function(batch):
  model, _ = _small_classifier()
  attack = make_attack(AttackConfig("pgd", eps=EPS, step_size=0.03, steps=4,
                                    random_start=False))
  compiled = tf.function(lambda x, s: attack(model, x, None, s), jit_compile=True)
  eager = attack(model, batch, None, tf.constant([1, 1]))
  np.testing.assert_allclose(compiled(batch, tf.constant([1, 1])).numpy(), eager.numpy(),
                             atol=1e-5)
  random = make_attack(AttackConfig("pgd", eps=EPS, step_size=0.03, steps=4))
  compiled = tf.function(lambda x, s: random(model, x, None, s), jit_compile=True)
  np.testing.assert_array_equal(compiled(batch, tf.constant([1, 1])).numpy(),
                                compiled(batch, tf.constant([1, 1])).numpy())


def test_bad_budgets_raise():
  with pytest.raises(ValueError, match="unknown attack"):
    AttackConfig("cw")
  with pytest.raises(ValueError, match="eps"):
    AttackConfig("fgsm", eps=-1.0)
  with pytest.raises(ValueError, match="restarts"):
    AttackConfig("pgd", restarts=0)
  with pytest.raises(ValueError, match="random start"):
    AttackConfig("pgd", restarts=2, random_start=False)
  with pytest.raises(ValueError, match="norm"):
    AttackConfig("pgd", norm=1)
  with pytest.raises(ValueError, match="L-infinity only"):
    AttackConfig("fgsm", norm=2)
  with pytest.raises(ValueError, match="cleverhans"):
    AttackConfig("pgd", restarts=3, impl="cleverhans")
  with pytest.raises(ValueError, match="restarts"):
    pgd(None, np.zeros((1, 2), np.float32), eps=0.1, step_size=0.1, steps=1, restarts=0)


def _per_example_loss_and_wrong(model, x, y):
  logits = model(x)
  loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True).numpy()
  return loss, np.argmax(logits, -1) != y


def test_restarts_never_weaker_than_one_restart():
  model, x = _small_classifier()
  y = np.argmax(model(x), -1)
  kwargs = dict(eps=0.2, step_size=0.05, steps=3, seed=tf.constant([3, 4]))
  one = pgd(model, x, **kwargs)
  many = pgd(model, x, restarts=4, **kwargs)
  loss_one, wrong_one = _per_example_loss_and_wrong(model, one, y)
  loss_many, wrong_many = _per_example_loss_and_wrong(model, many, y)
  # Per example: a misclassified result, or at least the first restart's loss.
  assert np.all(wrong_many | (loss_many >= loss_one - 1e-5))
  assert np.all(wrong_many >= wrong_one)
  assert loss_many.sum() > loss_one.sum()
  assert np.all(np.abs(many - x) <= 0.2 + 1e-6)


@pytest.mark.parametrize("random_start", [True, False])
def test_l2_pgd_stays_in_its_ball_and_range(random_start):
  model, x = _small_classifier()
  x = np.clip(x, 0.2, 0.9)
  eps = 0.5
  x_adv = pgd(model, x, eps=eps, step_size=0.2, steps=6, norm=2, clip_min=0.2, clip_max=0.9,
              random_start=random_start, seed=tf.constant([5, 6])).numpy()
  norms = np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1)
  assert np.all(norms <= eps * (1 + 1e-5))
  assert np.all(norms > 0.25 * eps)
  assert x_adv.min() >= 0.2 and x_adv.max() <= 0.9
  y = np.argmax(model(x), -1)
  loss_clean, _ = _per_example_loss_and_wrong(model, x, y)
  loss_adv, _ = _per_example_loss_and_wrong(model, x_adv, y)
  assert loss_adv.mean() > loss_clean.mean()


def test_l2_pgd_on_linear_model_moves_along_w():
  """Without clipping, L2 PGD on a linear model ends at x + eps * w / |w|."""
  w = np.array([0.5, -1.0, 2.0, -0.25, 1.5], np.float32)
  x = np.full((3, 5), 0.5, np.float32)
  x_adv = pgd(_linear_model(w), x, np.zeros(3, np.int64), eps=0.2, step_size=0.05, steps=8,
              norm=2, random_start=False).numpy()
  np.testing.assert_allclose(x_adv, x + 0.2 * w / np.linalg.norm(w), atol=1e-5)


def test_eager_calls_compile_once_per_model_and_arguments(batch):
  model, _ = _small_classifier()
  kwargs = dict(eps=EPS, step_size=0.03, steps=4, random_start=False)
  first = pgd(model, batch, **kwargs)
  pgd(model, batch[::-1].copy(), **kwargs)  # Another batch of the same shape.
  pgd(model, batch[:7], **kwargs)  # Another batch size: the batch dimension is free.
  functions = compiled.cached_functions(model)
  assert len(functions) == 1
  assert next(iter(functions.values())).experimental_get_tracing_count() == 1
  # Inside a user's tf.function the attack is plain graph code: no new cache entry.
  in_function = tf.function(lambda x: pgd(model, x, **kwargs), jit_compile=True)
  np.testing.assert_allclose(in_function(batch).numpy(), first.numpy(), atol=1e-5)
  assert len(compiled.cached_functions(model)) == 1
  pgd(model, batch, **dict(kwargs, eps=2 * EPS))
  fgsm(model, batch, eps=EPS)
  assert len(compiled.cached_functions(model)) == 3


def test_eager_call_equals_call_inside_tf_function(batch):
  model, _ = _small_classifier()
  seed = tf.constant([1, 2])
  kwargs = dict(eps=EPS, step_size=0.03, steps=3, seed=seed)
  eager = pgd(model, batch, **kwargs).numpy()
  inside = tf.function(lambda x: pgd(model, x, **kwargs), jit_compile=True)(batch).numpy()
  np.testing.assert_allclose(eager, inside, atol=1e-5)
  # Without a seed, eager calls draw fresh random starts, as stateful randomness would.
  a = pgd(model, batch, eps=EPS, step_size=0.03, steps=3).numpy()
  b = pgd(model, batch, eps=EPS, step_size=0.03, steps=3).numpy()
  assert np.any(a != b)


def test_compiled_cache_does_not_keep_models_alive(batch):
  model, _ = _small_classifier()
  fgsm(model, batch, eps=EPS)
  reference = weakref.ref(model)
  assert compiled.cached_functions(model)
  del model
  gc.collect()
  assert reference() is None


# ---- eager calls on any Keras model, plain callables, random draws ------------------------
class SubclassedMLP(keras.Model):
  def __init__(self):
    super().__init__()
    self.hidden = keras.layers.Dense(16, activation="relu")
    self.out = keras.layers.Dense(3)

  def call(self, x, training=False):
    return self.out(self.hidden(x))


def _sequential():
  return keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu"),
                           keras.layers.Dense(3)])


def _deferred_sequential():
  model = keras.Sequential([keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
  model(np.zeros((1, 10), np.float32))  # Built by a first call, as users' models are.
  return model


def _functional():
  inputs = keras.Input((10,))
  hidden = keras.layers.Dense(16, activation="relu")(inputs)
  return keras.Model(inputs, keras.layers.Dense(3)(hidden))


def _subclassed():
  model = SubclassedMLP()
  model(np.zeros((1, 10), np.float32))
  return model


PLAIN_KERAS_MODELS = {"sequential": _sequential, "deferred-sequential": _deferred_sequential,
                      "functional": _functional, "subclassed": _subclassed}
EAGER_ATTACKS = {
    "fgsm": lambda model, x, seed: fgsm(model, x, eps=EPS),
    "pgd": lambda model, x, seed: pgd(model, x, eps=EPS, step_size=0.03, steps=4, seed=seed),
    "pgd-l2": lambda model, x, seed: pgd(model, x, eps=0.5, step_size=0.1, steps=4, norm=2,
                                         seed=seed),
    "apgd": lambda model, x, seed: apgd_ce(model, x, eps=EPS, steps=5, seed=seed),
}


# Every kind of model with two attacks, every attack on two kinds (each case compiles an
# attack twice: the full 4 x 4 grid took 80 s of the suite).
EAGER_CASES = [(kind, sorted(EAGER_ATTACKS)[(i + shift) % len(EAGER_ATTACKS)])
               for i, kind in enumerate(sorted(PLAIN_KERAS_MODELS)) for shift in (0, 1)]


@pytest.mark.parametrize("kind,attack", EAGER_CASES)
def test_eager_calls_on_plain_keras_models_are_compiled_once(kind, attack, batch):
  keras.utils.set_random_seed(11)
  model = PLAIN_KERAS_MODELS[kind]()
  run = EAGER_ATTACKS[attack]
  seed = tf.constant([3, 4])
  first = run(model, batch, seed).numpy()
  functions = compiled.cached_functions(model)
  assert len(functions) == 1
  function = next(iter(functions.values()))
  assert function.experimental_get_tracing_count() == 1
  other = run(model, batch[::-1].copy(), seed).numpy()  # Another batch: no new trace.
  assert function.experimental_get_tracing_count() == 1
  assert len(compiled.cached_functions(model)) == 1
  assert np.any(first != batch) and np.any(other != first)
  # The same attack inside a user's own function, compiled as the cache compiles it
  # (XLA for these dense networks on a CPU: stateless draws differ between XLA and
  # plain graphs).
  inside = tf.function(lambda x: run(model, x, seed), jit_compile=compiled._use_xla(model))
  np.testing.assert_allclose(inside(batch).numpy(), first, atol=1e-5)


def _convnet():
  keras.utils.set_random_seed(12)
  return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                           keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                           keras.layers.Dense(3)])


def test_conv_nets_are_compiled_as_the_engine_compiles_them():
  """On a CPU, a conv net's attack is a plain graph (robust_sparse.training.compilation), a dense one XLA."""
  model = _convnet()
  x = np.random.default_rng(13).random((16, 8, 8, 1)).astype(np.float32)
  seed = tf.constant([5, 6])
  expected = compilation.supports_xla(model) and compilation.xla_pays_off(model)
  assert compiled._use_xla(model) == expected
  assert compiled._use_xla(_sequential())
  eager = pgd(model, x, eps=EPS, step_size=0.03, steps=3, seed=seed).numpy()
  # Bit for bit the function a user compiles the same way (XLA draws other numbers).
  inside = tf.function(lambda x: pgd(model, x, eps=EPS, step_size=0.03, steps=3, seed=seed),
                       jit_compile=expected)
  np.testing.assert_array_equal(inside(x).numpy(), eager)
  assert next(iter(compiled.cached_functions(model).values())).experimental_get_tracing_count() == 1


def test_plain_callables_still_work(batch):
  model, _ = _small_classifier()
  call = lambda x, training=False: model(x, training=training)  # noqa: E731
  kwargs = dict(eps=EPS, step_size=0.03, steps=4, random_start=False)
  np.testing.assert_allclose(pgd(call, batch, **kwargs).numpy(),
                             pgd(model, batch, **kwargs).numpy(), atol=1e-5)
  np.testing.assert_allclose(fgsm(call, batch, eps=EPS).numpy(),
                             fgsm(model, batch, eps=EPS).numpy(), atol=1e-5)
  assert not compiled._use_xla(call)  # It may hide layers without XLA kernels.


@pytest.mark.parametrize("jit", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("shape", [(64, 30), (8, 6, 5, 1), (300,)])
def test_stateless_draws_are_tensorflows_default_draws(shape, jit):
  """Naming the algorithm (attacks.common.RANDOM_ALGORITHM) changes no number."""
  seed = tf.constant([17, 4])

  def ours(seed):
    return (common.stateless_uniform(shape, seed, -0.3, 0.3, tf.float32),
            common.stateless_normal(shape, seed, tf.float32))

  def default(seed):
    return (tf.random.stateless_uniform(shape, seed, -0.3, 0.3),
            tf.random.stateless_normal(shape, seed))

  for a, b in zip(tf.function(ours, jit_compile=jit)(seed),
                  tf.function(default, jit_compile=jit)(seed)):
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_fidelity_references_see_a_wrong_attack():
  """The NumPy references of benchmarks/fidelity/attacks.py can disagree: with the
  wrong labels, without the projection, or with the restarts' starts swapped."""
  model = fidelity_attacks._small_mlp(5)  # pylint: disable=protected-access
  x = np.random.default_rng(5).random((16, 8, 8, 1)).astype(np.float32)
  weights = fidelity_attacks._weights(model)  # pylint: disable=protected-access
  predicted = np.argmax(model(x).numpy(), -1)
  other = (predicted + 1) % 10
  inputs = dict(weights, x=x, eps=np.asarray(EPS))
  np.testing.assert_allclose(fidelity_attacks.np_fgsm(inputs)["x_adv"],
                             fgsm(model, x, eps=EPS).numpy(), atol=1e-6)
  assert np.abs(fidelity_attacks.np_fgsm(dict(inputs, y=other))["x_adv"]
                - fgsm(model, x, eps=EPS).numpy()).max() > EPS
  budget = dict(eps=EPS, step_size=EPS / 2, steps=4, norm=np.inf)
  seed = tf.constant([3, 4])
  starts = fidelity_attacks.pgd_starts(model, x, None, seed, eps=EPS, step_size=EPS / 2,
                                       restarts=2, norm=np.inf)
  ours = pgd(model, x, seed=seed, restarts=2, **budget).numpy()
  reference = dict(weights, x=x, starts=starts,
                   **{k: np.asarray(v, np.float64) for k, v in budget.items()})
  np.testing.assert_allclose(fidelity_attacks.np_pgd(reference)["x_adv"], ours, atol=1e-6)
  # Unprojected steps leave the ball.
  unprojected = fidelity_attacks.np_pgd(dict(reference, eps=np.asarray(10.0)))["x_adv"]
  assert np.abs(unprojected - x).max() > EPS + 1e-3
  # One start alone is not the worst case over both on every example.
  first_only = fidelity_attacks.np_pgd(dict(reference, starts=starts[:1]))["x_adv"]
  assert np.abs(first_only - ours).max() > 1e-3
