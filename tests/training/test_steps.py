"""The step library: optimizer groups, masks in every piece, clipping, wrappers, callbacks."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import AttackConfig, make_attack
from robust_sparse.data import load_dataset
from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.models import build_model
from robust_sparse.training.engine import Engine, index_stream
from robust_sparse.core.hparams import Hparams
from robust_sparse.nn.layers import masked_layers
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.steps import (OptimizerGroup, cross_entropy, loss_and_gradients,
                                 make_train_step, partition, standard_loss_grad_fn)


def _model(seed=0):
  keras.utils.set_random_seed(seed)
  return build_model("lenet5", (8, 8, 1), 10)


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return (tf.constant(rng.random((n, 8, 8, 1)), tf.float32),
          tf.constant(rng.integers(0, 10, n), tf.int32))


def _is_kernel(variable):
  return variable.path.endswith("kernel")


def test_groups_update_their_own_variables_at_their_own_rates():
  model = _model()
  x, y = _batch()
  schedule = make_schedule("step", 1e-2, total_iterations=10, steps_per_epoch=1,
                           lr_step_epochs=1, gamma=0.5)
  groups = [OptimizerGroup("kernels", make_optimizer("sgd", 0.1), None, _is_kernel),
            OptimizerGroup("biases", make_optimizer("adam", 1.0), schedule,
                           lambda v: not _is_kernel(v))]
  fn = loss_and_gradients(model, cross_entropy(10))
  values = [[tf.convert_to_tensor(v) for v in vs]
            for vs in (model.trainable_variables, model.non_trainable_variables)]
  grads, _, _ = fn(*values, dict(x=x, y=y, weight=tf.fill([16], 1 / 16),
                                 seed=tf.constant([0, 0], tf.int64)))
  before = [v.numpy() for v in model.trainable_variables]
  step = make_train_step(model, fn, groups)
  stats = step(x, y, tf.constant(0, tf.int64), tf.constant(3, tf.int64))
  assert stats["lr/kernels"].numpy() == pytest.approx(0.1)
  assert stats["lr/biases"].numpy() == pytest.approx(1e-2 * 0.5 ** 3)
  for variable, old, grad in zip(model.trainable_variables, before, grads):
    moved = variable.numpy() - old
    if _is_kernel(variable):
      np.testing.assert_allclose(moved, -0.1 * grad.numpy(), atol=1e-6, err_msg=variable.path)
    else:
      # Keras Adam's first step: -lr * sqrt(1 - b2) g / (sqrt(1 - b2) |g| + eps).
      g, root = grad.numpy(), np.sqrt(1 - 0.999)
      expected = -1e-2 * 0.5 ** 3 * root * g / (root * np.abs(g) + 1e-7)
      np.testing.assert_allclose(moved, expected, atol=1e-6, err_msg=variable.path)


def test_a_variable_in_two_groups_is_an_error_and_ungrouped_ones_are_frozen():
  model = _model()
  with pytest.raises(ValueError, match="in optimizer groups"):
    partition([OptimizerGroup("a", make_optimizer("sgd", 0.1)),
               OptimizerGroup("b", make_optimizer("sgd", 0.1))], model.trainable_variables)
  frozen = [v.numpy() for v in model.trainable_variables]
  step = make_train_step(model, loss_and_gradients(model, cross_entropy(10)),
                         [OptimizerGroup("kernels", make_optimizer("sgd", 0.1), None,
                                         _is_kernel)])
  step(*_batch(), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
  for variable, old in zip(model.trainable_variables, frozen):
    assert np.array_equal(variable.numpy(), old) != _is_kernel(variable), variable.path


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_pruned_weights_stay_exactly_zero_with_momentum_and_decay(optimizer):
  model = _model()
  rng = np.random.default_rng(0)
  for layer in masked_layers(model):
    mask = (rng.random(layer.mask.shape) > 0.5).astype("float32")
    layer.mask.assign(mask)
  attack = make_attack(AttackConfig("fgsm", eps=0.1))
  fn = standard_loss_grad_fn(model, num_classes=10, attack=attack)
  groups = [OptimizerGroup("w", make_optimizer(optimizer, 0.05, momentum=0.9,
                                               weight_decay=0.1))]
  step = tf.function(make_train_step(model, fn, groups, grad_clip_norm=1.0), jit_compile=False)
  for i in range(5):
    step(*_batch(seed=i), tf.constant(0, tf.int64), tf.constant(i, tf.int64))
  for layer in masked_layers(model):
    pruned = layer.mask.numpy() == 0
    assert np.all(layer.kernel.numpy()[pruned] == 0), layer.name
    assert np.any(layer.kernel.numpy()[~pruned] != 0), layer.name


def _pruned_model(seed=0):
  model = _model(seed)
  rng = np.random.default_rng(seed)
  for layer in masked_layers(model):
    layer.mask.assign((rng.random(layer.mask.shape) > 0.5).astype("float32"))
    layer.kernel.assign(layer.kernel * layer.mask)
  return model


@pytest.mark.parametrize("optimizer,clip", [("adam", None), ("sgd", 0.01), ("lamb", None)])
def test_masks_hold_fast_path_trains_the_same_weights(optimizer, clip):
  # The engine's promise (kernels zero where masked) lets the step skip the
  # `kernel * mask` and `grad * mask` passes; the weights must not change.
  # Clipping and a non-element-wise optimizer (LAMB's trust ratio) need masked
  # gradients, which the step then computes.
  trained = []
  for hold in (False, True):
    model = _pruned_model()
    if optimizer == "lamb":
      opt = keras.optimizers.Lamb(0.01)
    else:
      opt = make_optimizer(optimizer, 0.01, momentum=0.9, weight_decay=0.01)
    fn = standard_loss_grad_fn(model, num_classes=10,
                               attack=make_attack(AttackConfig("fgsm", eps=0.1)))
    step = tf.function(make_train_step(model, fn, [OptimizerGroup("w", opt)],
                                       grad_clip_norm=clip, masks_hold=hold),
                       jit_compile=False)
    for i in range(5):
      step(*_batch(seed=i), tf.constant(0, tf.int64), tf.constant(i, tf.int64))
    trained.append([v.numpy() for v in model.trainable_variables])
  for exact, fast in zip(*trained):
    np.testing.assert_allclose(fast, exact, rtol=1e-6, atol=1e-7)


def test_engine_restores_the_mask_promise_before_training_and_evaluation():
  model = _pruned_model()
  layer = masked_layers(model)[0]
  dense = np.ones(layer.kernel.shape, np.float32)
  layer.kernel.assign(dense)   # breaks the promise: pruned weights nonzero
  masked_outputs = model(_batch()[0]).numpy()   # outside the engine: kernel * mask
  x, y = (t.numpy() for t in _batch(32))
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10),
                  [OptimizerGroup("w", make_optimizer("sgd", 0.0))], x_train=x, y_train=y,
                  batch_size=16, attack=make_attack(AttackConfig("fgsm", eps=0.1)))
  engine.evaluate(x, y)
  np.testing.assert_array_equal(layer.kernel.numpy(), dense * layer.mask.numpy())
  np.testing.assert_allclose(model(_batch()[0]).numpy(), masked_outputs, rtol=1e-6)
  layer.kernel.assign(dense)
  engine.train(iter(index_stream(32, 16, seed=0)), 1)
  np.testing.assert_array_equal(layer.kernel.numpy(), dense * layer.mask.numpy())


def test_global_norm_clipping_bounds_the_update():
  model = _model()
  before = [v.numpy() for v in model.trainable_variables]
  step = make_train_step(model, loss_and_gradients(model, cross_entropy(10)),
                         [OptimizerGroup("w", make_optimizer("sgd", 1.0))],
                         grad_clip_norm=1e-3)
  step(*_batch(), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
  moved = np.sqrt(sum(np.sum((v.numpy() - b) ** 2)
                      for v, b in zip(model.trainable_variables, before)))
  assert moved == pytest.approx(1e-3, rel=1e-3)


def test_adversarial_wrapper_reports_both_halves():
  model = _model()
  attack = make_attack(AttackConfig("pgd", eps=0.3, step_size=0.1, steps=3))
  step = make_train_step(model, standard_loss_grad_fn(model, num_classes=10, attack=attack,
                                                      adv_mix=1.0),
                         [OptimizerGroup("w", make_optimizer("sgd", 0.0))])
  stats = step(*_batch(), tf.constant(0, tf.int64), tf.constant(0, tf.int64))
  # With adv_mix=1 the objective is the adversarial loss alone, which PGD raised.
  assert stats["loss"].numpy() == pytest.approx(stats["adv_loss"].numpy(), rel=1e-5)
  assert stats["adv_loss"].numpy() > stats["nat_loss"].numpy()
  assert 0 <= stats["adv_acc"].numpy() <= 1


def test_runner_drives_keras_callbacks(tmp_path):
  digits = load_dataset("sklearn_digits", None, 300)
  seen = []

  class Record(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
      seen.append((epoch, sorted(logs)))

  hparams = Hparams(dataset="sklearn_digits", experiment="train", trials=1, train_iters=30,
                    eval_every=10, valid_size=300, batch_size=32)
  log = str(tmp_path / "log.csv")
  run_dir = Runner(hparams, digits, str(tmp_path), progress=False,
                   callbacks=[Record(), keras.callbacks.CSVLogger(log)]).run()
  assert [epoch for epoch, _ in seen] == [0, 1, 2]
  assert {"loss", "acc", "val_acc", "test_acc", "val_adv_acc"} <= set(seen[0][1])
  assert len(open(log).read().splitlines()) == 4
  assert os.path.exists(os.path.join(level_dir(run_dir, 0, 0), "metadata.json"))


def test_distillation_adds_temperature_scaled_kl():
  from robust_sparse.training.steps import distillation
  student, teacher = _model(0), _model(1)
  x, y = _batch()
  ce = cross_entropy(10)
  logits = student(x)
  # A teacher identical to the student adds nothing; another one adds T^2 KL >= 0.
  same = distillation(ce, student, 4.0)(x, y, logits)
  np.testing.assert_allclose(same.numpy(), ce(x, y, logits).numpy(), atol=1e-5)
  other = distillation(ce, teacher, 4.0)(x, y, logits)
  t = tf.nn.softmax(teacher(x) / 4.0).numpy()
  s = tf.nn.softmax(logits / 4.0).numpy()
  kl = np.sum(t * (np.log(t) - np.log(s)), axis=-1)
  np.testing.assert_allclose(other.numpy(), ce(x, y, logits).numpy() + 16.0 * kl, rtol=1e-4)


def test_distillation_from_a_finished_run_folder(tmp_path):
  digits = load_dataset("sklearn_digits", None, 300)
  common = dict(dataset="sklearn_digits", experiment="train", trials=1, train_iters=20,
                eval_every=20, valid_size=300, batch_size=32, sharpness_examples=0,
                compile="graph")  # The teacher MLP too: no XLA compile (lenet5 is a graph).
  teacher_dir = Runner(Hparams(**common), digits, str(tmp_path / "t"), progress=False).run()
  student = Hparams(**common, model="lenet5", teacher_dir=teacher_dir)
  run_dir = Runner(student, digits, str(tmp_path / "s"), progress=False).run()
  train = np.genfromtxt(os.path.join(level_dir(run_dir, 0, 0), "train.csv"), delimiter=",",
                        names=True)
  plain = Runner(Hparams(**common, model="lenet5"), digits, str(tmp_path / "p"),
                 progress=False).run()
  plain_train = np.genfromtxt(os.path.join(level_dir(plain, 0, 0), "train.csv"),
                              delimiter=",", names=True)
  # Same data and init: the KL term is the only difference, and it is positive.
  assert float(train["loss"]) > float(plain_train["loss"])
  with pytest.raises(ValueError, match="teacher_dir"):
    Runner(Hparams(**common, teacher_dir=str(tmp_path)), digits, str(tmp_path / "x"),
           progress=False).run()


def test_a_missing_saved_variable_is_an_error():
  from robust_sparse.experiments.runner import assign_weights, model_weights
  model = _model()
  weights = model_weights(model)
  weights.pop("conv_1/kernel")
  with pytest.raises(ValueError, match="conv_1/kernel"):
    assign_weights(model, weights)
