"""Tests of the learning-rate schedules: closed forms, warm-up, XLA, errors."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.training import schedules
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.schedules import make_schedule

STEPS_PER_EPOCH = 10
EPOCHS = 10
TOTAL = STEPS_PER_EPOCH * EPOCHS


def build(name, base_lr=0.1, **kwargs):
  kwargs.setdefault("total_iterations", TOTAL)
  kwargs.setdefault("steps_per_epoch", STEPS_PER_EPOCH)
  return make_schedule(name, base_lr, **kwargs)


def values(schedule, iterations=range(TOTAL)):
  return np.array([float(schedule(i)) for i in iterations])


def cosine(base_lr, eta_min, elapsed, length):
  return eta_min + (base_lr - eta_min) * (1 + math.cos(math.pi * elapsed / length)) / 2


def ssam_cosine(epoch, base_lr, eta_min, warmup_epoch, warmup_init_lr, epochs):
  """The SSAM seed's CosineLRscheduler.get_lr (solver/lr_scheduler.py)."""
  if epoch < warmup_epoch:
    return warmup_init_lr + float(epoch) * (base_lr - warmup_init_lr) / warmup_epoch
  return cosine(base_lr, eta_min, epoch - warmup_epoch, epochs - warmup_epoch)


def test_output_is_a_float32_scalar():
  rate = build("cosine")(3)
  assert rate.dtype == tf.float32 and rate.shape == ()


def test_constant():
  np.testing.assert_array_equal(values(build("constant", 0.05)), np.float32(0.05))


@pytest.mark.parametrize("iteration,epoch", [(0, 0), (9, 0), (10, 1), (55, 5), (99, 9)])
def test_cosine_per_epoch(iteration, epoch):
  rate = build("cosine", 0.1, eta_min=0.001)(iteration)
  np.testing.assert_allclose(float(rate), cosine(0.1, 0.001, epoch, EPOCHS), rtol=1e-6)


@pytest.mark.parametrize("iteration", [0, 5, 55, 99])
def test_cosine_per_iteration(iteration):
  rate = build("cosine", 0.1, eta_min=0.001, per="iteration")(iteration)
  np.testing.assert_allclose(float(rate), cosine(0.1, 0.001, iteration / 10, EPOCHS),
                             rtol=1e-6)


def test_cosine_ends_at_eta_min_and_stays_there():
  schedule = build("cosine", 0.1, eta_min=0.001, per="iteration")
  np.testing.assert_allclose([float(schedule(TOTAL)), float(schedule(TOTAL + 50))], 0.001,
                             rtol=1e-6)


def test_multistep():
  schedule = build("multistep", 0.1, milestones=[3, 6], gamma=0.2)
  expected = {0: 0.1, 29: 0.1, 30: 0.02, 59: 0.02, 60: 0.004, 99: 0.004}
  for iteration, rate in expected.items():
    np.testing.assert_allclose(float(schedule(iteration)), rate, rtol=1e-6)


def test_multistep_per_iteration_with_fractional_milestone():
  schedule = build("multistep", 0.1, milestones=[2.5], gamma=0.5, per="iteration")
  np.testing.assert_allclose(values(schedule, [24, 25]), [0.1, 0.05], rtol=1e-6)


def test_multistep_without_milestones_is_constant():
  np.testing.assert_allclose(values(build("multistep", 0.1)), 0.1, rtol=1e-6)


def test_step():
  schedule = build("step", 0.1, lr_step_epochs=3, gamma=0.1)
  for iteration, rate in {0: 0.1, 29: 0.1, 30: 0.01, 60: 0.001, 99: 1e-4}.items():
    np.testing.assert_allclose(float(schedule(iteration)), rate, rtol=1e-6)


def test_step_per_iteration():
  schedule = build("step", 0.1, lr_step_epochs=2.5, gamma=0.5, per="iteration")
  np.testing.assert_allclose(values(schedule, [24, 25, 49, 50]), [0.1, 0.05, 0.05, 0.025],
                             rtol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    ("cosine", dict(eta_min=0.001)), ("multistep", dict(milestones=[3])),
    ("step", dict(lr_step_epochs=2)), ("cosine", dict(warmup_epochs=2, warmup_init_lr=0.01))])
def test_per_epoch_rate_is_constant_within_an_epoch(name, kwargs):
  rates = values(build(name, **kwargs)).reshape(EPOCHS, STEPS_PER_EPOCH)
  np.testing.assert_array_equal(rates, rates[:, :1].repeat(STEPS_PER_EPOCH, axis=1))
  assert len(np.unique(rates[:, 0])) > 1


def test_per_iteration_rate_changes_within_an_epoch():
  rates = values(build("cosine", per="iteration"))
  assert np.all(np.diff(rates) < 0)
  rates = values(build("constant", per="iteration", warmup_epochs=2, warmup_init_lr=0.0))
  assert np.all(np.diff(rates[:20]) > 0)
  np.testing.assert_allclose(rates[20:], 0.1, rtol=1e-6)


def test_warmup_per_epoch_matches_ssam_cosine():
  schedule = build("cosine", 0.1, eta_min=0.001, warmup_epochs=3, warmup_init_lr=0.01)
  rates = values(schedule, range(0, TOTAL, STEPS_PER_EPOCH))
  expected = [ssam_cosine(epoch, 0.1, 0.001, 3, 0.01, EPOCHS) for epoch in range(EPOCHS)]
  np.testing.assert_allclose(rates, expected, rtol=1e-6)
  # Starts at warmup_init_lr; the first epoch after warm-up is at base_lr.
  np.testing.assert_allclose(rates[[0, 1, 2, 3]], [0.01, 0.04, 0.07, 0.1], rtol=1e-6)


def test_warmup_per_iteration():
  schedule = build("cosine", 0.1, warmup_epochs=2, warmup_init_lr=0.02, per="iteration")
  expected = {0: 0.02, 5: 0.02 + 0.25 * 0.08, 19: 0.02 + 0.95 * 0.08, 20: 0.1,
              60: cosine(0.1, 0.0, 4, 8)}
  for iteration, rate in expected.items():
    np.testing.assert_allclose(float(schedule(iteration)), rate, rtol=1e-6)


def test_warmup_keeps_milestones_counted_from_the_start():
  schedule = build("multistep", 0.1, milestones=[5], gamma=0.1, warmup_epochs=2)
  np.testing.assert_allclose(values(schedule, [0, 10, 20, 49, 50]),
                             [0.0, 0.05, 0.1, 0.1, 0.01], rtol=1e-6)


@pytest.mark.parametrize("per", schedules.SCHEDULE_PER)
@pytest.mark.parametrize("name,kwargs", [
    ("constant", dict(warmup_epochs=1.5, warmup_init_lr=0.003)),
    ("cosine", dict(eta_min=1e-5)),
    ("cosine", dict(eta_min=1e-5, warmup_epochs=2, warmup_init_lr=0.001)),
    ("multistep", dict(milestones=[2, 4.5, 7], gamma=0.2, warmup_epochs=1)),
    ("step", dict(lr_step_epochs=3, gamma=0.3))])
def test_python_int_and_xla_tensor_agree(per, name, kwargs):
  schedule = build(name, 0.05, per=per, **kwargs)
  compiled = tf.function(schedule, jit_compile=True)
  iterations = list(range(TOTAL))
  eager = values(schedule, iterations)
  in_xla = np.array([compiled(tf.constant(i, tf.int64)).numpy() for i in iterations])
  np.testing.assert_array_equal(eager, in_xla)


def test_registry_and_per_names():
  assert schedules.SCHEDULES.names() == ["constant", "cosine", "multistep", "step"]
  assert schedules.SCHEDULE_PER == ("epoch", "iteration")


@pytest.mark.parametrize("name,kwargs,message", [
    ("linear", {}, "--lr_schedule: unknown lr_schedule 'linear'; known: constant, cosine, "
     "multistep, step"),
    ("multistep", dict(milestones=[30, 10]), "--milestones must be strictly increasing, got 30,10"),
    ("multistep", dict(milestones=[3, 3]), "--milestones must be strictly increasing"),
    ("multistep", dict(milestones=[-1, 3]), "--milestones must be >= 0, got -1,3"),
    ("multistep", dict(gamma=0.0), "--gamma must be > 0, got 0.0"),
    ("step", {}, "--lr_schedule=step needs --lr_step_epochs"),
    ("step", dict(lr_step_epochs=0), "--lr_step_epochs must be > 0, got 0"),
    ("cosine", dict(eta_min=-1e-3), "--eta_min must be >= 0"),
    ("cosine", dict(warmup_epochs=10), "--warmup_epochs must be shorter than training (10 epochs)"),
    ("cosine", dict(warmup_epochs=12), "--warmup_epochs must be shorter than training"),
    ("cosine", dict(warmup_epochs=-1), "--warmup_epochs must be >= 0"),
    ("cosine", dict(warmup_epochs=1, warmup_init_lr=-0.1), "--warmup_init_lr must be >= 0"),
    ("cosine", dict(per="batch"), "--schedule_per must be one of epoch, iteration, got 'batch'"),
    ("cosine", dict(steps_per_epoch=0), "steps_per_epoch must be >= 1"),
    ("cosine", dict(total_iterations=0), "total_iterations must be >= 1")])
def test_errors_name_the_flag(name, kwargs, message):
  with pytest.raises(ValueError) as error:
    build(name, **kwargs)
  assert message in str(error.value)


def test_drives_an_optimizer_inside_xla():
  # The engine's pattern: the rate for the step about to be taken, from the
  # optimizer's iteration counter, assigned in the same compiled step.
  schedule = build("cosine", 0.1, per="iteration", warmup_epochs=1, warmup_init_lr=0.01)
  optimizer = make_optimizer("sgd", 0.1, momentum=0.9)
  variable = keras.Variable(np.zeros(2, np.float32))
  optimizer.build([variable])

  @tf.function(jit_compile=True)
  def step():
    optimizer.learning_rate.assign(schedule(optimizer.iterations))
    optimizer.apply([tf.ones(2)], [variable])

  rates = []
  for _ in range(15):
    step()
    rates.append(optimizer.learning_rate.numpy())
  np.testing.assert_array_equal(rates, values(schedule, range(15)))
  # SGD with momentum 0.9 on a constant gradient 1: the buffer of step t is
  # sum(0.9**k for k <= t), and each step moves by its own rate times it.
  buffers = np.array([sum(0.9**k for k in range(t + 1)) for t in range(15)])
  np.testing.assert_allclose(variable.numpy(), -np.sum(np.array(rates) * buffers), rtol=1e-5)
