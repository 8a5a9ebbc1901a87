"""TRADES and MART (`robust_sparse/training/adversarial_losses.py`): the losses against
NumPy on fixed logits, the inner maximisations' properties, and both front-ends training
with them. The PyTorch comparison of whole steps is `benchmarks/fidelity/trades_mart.py`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import AttackConfig, make_attack
from robust_sparse.models import build_model
from robust_sparse.training import adversarial_losses as al
from robust_sparse.training.engine import Engine, index_stream
from robust_sparse.training.keras_model import RobustModel
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.steps import (OptimizerGroup, cross_entropy, loss_and_gradients,
                                          standard_loss_grad_fn)

N, CLASSES, FEATURES = 6, 4, 5
BUDGET = al.Budget(eps=0.1, step_size=0.03, steps=5)


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _logits(seed=0):
  rng = np.random.default_rng(seed)
  return (2.0 * rng.normal(size=(N, CLASSES))).astype(np.float32), \
      (2.0 * rng.normal(size=(N, CLASSES))).astype(np.float32), rng.integers(0, CLASSES, N)


def _rows(objective, nat, adv, y):
  x = tf.zeros([2 * N, 1])
  return objective(x, tf.constant(np.concatenate([y, y]), tf.int32),
                   tf.constant(np.concatenate([nat, adv]))).numpy()


def _mlp(seed=0):
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((FEATURES,))
  hidden = keras.layers.Dense(8, activation="relu")(inputs)
  return keras.Model(inputs, keras.layers.Dense(CLASSES)(hidden))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return dict(x=tf.constant(rng.random((N, FEATURES)), tf.float32),
              y=tf.constant(rng.integers(0, CLASSES, N), tf.int32),
              weight=tf.fill([N], 1.0 / N), seed=tf.constant([3, 4], tf.int64))


def test_trades_objective_equals_numpy():
  nat, adv, y = _logits()
  rows = _rows(al.trades_objective(cross_entropy(CLASSES), 2.5), nat, adv, y)
  p, q = _softmax(nat.astype(np.float64)), _softmax(adv.astype(np.float64))
  ce = -np.log(p[np.arange(N), y])
  kl = (p * (np.log(p) - np.log(q))).sum(1)
  np.testing.assert_allclose(rows, np.concatenate([ce, 2.5 * kl]), rtol=1e-5, atol=1e-6)
  # With each example's weight 1/N on both rows: mean CE + beta * batchmean KL.
  np.testing.assert_allclose(rows.sum() / N, ce.mean() + 2.5 * kl.mean(), rtol=1e-5)


def test_mart_objective_equals_numpy():
  nat, adv, y = _logits(1)
  rows = _rows(al.mart_objective(cross_entropy(CLASSES), 3.0), nat, adv, y)
  p, q = _softmax(nat.astype(np.float64)), _softmax(adv.astype(np.float64))
  ce_adv = -np.log(q[np.arange(N), y])
  # The code's rule: the top class of p(x'), or the second where the top is y.
  order = np.argsort(q, 1)
  wrong = np.where(order[:, -1] == y, order[:, -2], order[:, -1])
  boosted = ce_adv - np.log(1.0001 - q[np.arange(N), wrong] + 1e-12)
  kl = (p * (np.log(p) - np.log(q + 1e-12))).sum(1)
  weighted = 3.0 * kl * (1.0000001 - p[np.arange(N), y])
  np.testing.assert_allclose(rows, np.concatenate([weighted, boosted]), rtol=1e-5, atol=1e-6)


def test_mart_weights_by_natural_confidence():
  """An example classified confidently (p_y(x) ~ 1) contributes no KL, however large;
  an uncertain one its KL times 1 - p_y(x)."""
  nat = np.array([[20.0, 0, 0, 0], [0, 0, 0, 0]], np.float32)
  adv = np.array([[0, 20.0, 0, 0], [0, 20.0, 0, 0]], np.float32)
  y = np.array([0, 0])
  x = tf.zeros([4, 1])
  rows = al.mart_objective(cross_entropy(CLASSES), 1.0)(
      x, tf.constant([0, 0, 0, 0]), tf.constant(np.concatenate([nat, adv]))).numpy()
  p, q = _softmax(nat.astype(np.float64)), _softmax(adv.astype(np.float64))
  kl = (p * (np.log(p) - np.log(q + 1e-12))).sum(1)
  assert kl[0] > 19 and rows[0] < 1e-6 * kl[0]
  np.testing.assert_allclose(rows[1], kl[1] * (1.0000001 - 0.25), rtol=1e-5)
  del y


def test_trades_with_zero_beta_is_natural_training():
  """beta = 0: the TRADES step's objective and gradients are the natural cross-entropy's
  (the KL rows weigh nothing; the model has no batch statistics to share)."""
  model = _mlp()
  batch = _batch()
  attack = make_attack(AttackConfig("pgd", eps=0.1, step_size=0.03, steps=2))
  trades = standard_loss_grad_fn(model, num_classes=CLASSES, attack=attack, adv_loss="trades",
                                 trades_beta=0.0, budget=BUDGET)
  natural = loss_and_gradients(model, cross_entropy(CLASSES))
  values = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  grads, _, aux = trades(values, [], batch)
  expected, _, natural_aux = natural(values, [], batch)
  np.testing.assert_allclose(aux["objective"].numpy(), natural_aux["objective"].numpy(),
                             rtol=1e-6)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)
  assert aux["adv_logits"].shape == (N, CLASSES)


@pytest.mark.parametrize("kind", ["trades", "mart"])
def test_inner_maximisation_raises_its_loss_within_the_ball_and_range(kind):
  model = _mlp(1)
  batch = _batch(1)
  x, y = batch["x"], batch["y"]
  noise = al.start_noise(x, batch["seed"])
  assert np.abs(noise.numpy()).max() < 0.01 and np.abs(noise.numpy()).max() > 0
  natural = model(x)

  def loss(x_adv):
    logits = model(x_adv)
    if kind == "trades":
      return al.kl_divergence(natural, logits).numpy().sum()
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits).numpy().sum()

  if kind == "trades":
    x_adv = al.trades_perturbation(model, x, batch["seed"], BUDGET)
  else:
    x_adv = al.mart_perturbation(model, x, y, batch["seed"], BUDGET)
  start = tf.clip_by_value(x + noise, 0.0, 1.0)
  assert loss(x_adv) > 10 * loss(start) if kind == "trades" else loss(x_adv) > loss(start)
  delta = (x_adv - x).numpy()
  assert np.abs(delta).max() <= BUDGET.eps + 1e-6
  assert np.abs(delta).max() > BUDGET.eps / 2
  assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0
  # The same seed, the same start and result.
  again = (al.trades_perturbation(model, x, batch["seed"], BUDGET) if kind == "trades"
           else al.mart_perturbation(model, x, y, batch["seed"], BUDGET))
  np.testing.assert_array_equal(again.numpy(), x_adv.numpy())


def test_zero_steps_clip_the_start_to_the_data_range():
  x = tf.constant([[0.0, 1.0, 0.5]])
  model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
  x_adv = al.trades_perturbation(model, x, tf.constant([0, 1], tf.int64),
                                 al.Budget(eps=0.1, step_size=0.01, steps=0),
                                 noise=tf.constant([[-0.001, 0.001, 0.001]]))
  np.testing.assert_allclose(x_adv.numpy(), [[0.0, 1.0, 0.501]], atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(adv_loss="trade"), "unknown --adv_loss='trade'"),
    (dict(adv_loss="trades", trades_beta=-1.0), "--trades_beta must be >= 0"),
    (dict(adv_loss="mart", mart_beta=-0.5), "--mart_beta must be >= 0"),
    (dict(adv_loss="trades", attack=None), "needs --adv_train"),
    (dict(adv_loss="mart", budget=None), "needs its inner maximisation's budget"),
    (dict(adv_loss="mart", budget=AttackConfig("pgd", norm=2)), "L-infinity"),
])
def test_bad_objectives_fail_in_one_line(kwargs, message):
  model = _mlp()
  options = dict(attack=make_attack(AttackConfig("fgsm", eps=0.1)), budget=BUDGET)
  options.update(kwargs)
  with pytest.raises(ValueError, match=message) as error:
    standard_loss_grad_fn(model, num_classes=CLASSES, **options)
  assert "\n" not in str(error.value)


def test_the_run_attack_config_is_a_budget():
  config = AttackConfig("fgsm", eps=0.2, step_size=0.05, steps=7)
  assert al.as_budget(config) == al.Budget(eps=0.2, step_size=0.05, steps=7)


def test_engine_trains_with_mart_compiled_by_xla(digits):
  adv_loss = "mart"
  attack = make_attack(AttackConfig("pgd", eps=0.2, step_size=0.05, steps=2))
  config = AttackConfig("pgd", eps=0.2, step_size=0.05, steps=2)
  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10, attack=attack,
                                               adv_loss=adv_loss, budget=config),
                  [OptimizerGroup("weights", make_optimizer("sgd", 0.05, momentum=0.9))],
                  x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                  attack=attack, adv_train=True, adv_loss=adv_loss, eval_batch_size=128)
  assert engine.compile_mode == "xla_step"
  engine.reset(0)
  stream = iter(index_stream(len(digits.x_train), 32, 3))
  first = engine.train(stream, 2)
  last = engine.train(stream, 20)
  for stats in (first, last):
    assert all(np.isfinite(stats[m]) for m in ("loss", "acc", "adv_acc", "nat_loss",
                                               "adv_loss")), stats
  assert last["loss"] < first["loss"]
  assert engine.adv_loss == adv_loss
  with pytest.raises(ValueError, match="--trades_beta"):
    Engine(model, None, [], x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
           attack=attack, adv_loss="trades", trades_beta=-1.0)


def test_keras_fit_trains_with_trades(digits):
  network = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  robust = RobustModel(network, attack=make_attack(AttackConfig("fgsm", eps=0.1)),
                       adv_loss="trades", trades_beta=1.0,
                       budget=al.Budget(eps=0.1, step_size=0.05, steps=2), seed=0)
  robust.compile(optimizer=make_optimizer("sgd", 0.05, momentum=0.9))
  history = robust.fit(digits.x_train[:256], digits.y_train[:256], batch_size=32, epochs=2,
                       verbose=0)
  losses = history.history["loss"]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert np.isfinite(history.history["adv_acc"][-1])


def test_sam_wraps_the_objective():
  """SAM inside the paired wrapper (MART): its second pass, at w + e, on the same x'."""
  from robust_sparse.training.sharpness.sam import sharpness_aware
  model = _mlp(2)
  batch = _batch(2)
  fn = standard_loss_grad_fn(
      model, num_classes=CLASSES, attack=make_attack(AttackConfig("fgsm", eps=0.1)),
      adv_loss="mart", budget=BUDGET,
      sharpness=lambda inner: sharpness_aware(inner, model, rho=0.05))
  values = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  grads, _, aux = fn(values, [], batch)
  assert aux["sharp_objective"].numpy() > aux["objective"].numpy()
  assert all(np.all(np.isfinite(g.numpy())) for g in grads)
