"""APGD with the cross-entropy loss (Croce & Hein 2020), L-infinity or L2.

"Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Algorithm 1: PGD with momentum (alpha = 0.75) whose
step size starts at 2 eps and halves, per example, at checkpoints w_j where
the loss has not been increasing often enough since the last checkpoint
(condition 1: at most rho of the steps increased it) or where the best loss
has not improved since the last checkpoint and the step was not halved there
(condition 2). A halving restarts the example from its best point. The
checkpoints are w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j +
max(p_j - p_{j-1} - 0.03, 0.06), in the integer form of the reference code.

The implementation follows the reference (fra31/auto-attack, as ported by
torchattacks) with one deliberate difference: the first window's count of
loss increases starts from the loss at the random start, where the reference
compares with an unwritten (zero) entry of its loss history.
"""

import numpy as np
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.common import (attack_labels, check_budget, check_norm, l2_normalize,
                            loss_logits_gradient, misclassified, per_example, project_l2,
                            stateless_normal, stateless_uniform)

# The weight of the new step against the previous one (the paper's alpha).
MOMENTUM = 0.75


def apgd_ce(model, x, y=None, *, eps, steps=100, clip_min=0.0, clip_max=1.0, seed=None,
            norm=np.inf, rho=0.75):
  """APGD-CE: `steps` iterations (one forward and backward pass each) of adaptive PGD.

  Keeps the best point per example: the last misclassified iterate if any
  (with given labels, the clean `x` itself when it is misclassified already),
  else the iterate of highest loss. Graph code inside a `tf.function`; called
  eagerly it compiles itself once per model and arguments (`attacks.compiled`).

  Args:
    model: callable mapping a batch to logits, shape [batch, classes].
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    steps: number of iterations (>= 0); the paper's evaluation uses 100.
    clip_min: smallest valid input value.
    clip_max: largest valid input value.
    seed: None for stateful randomness, or a shape-[2] integer tensor for a
      stateless (reproducible) random start.
    norm: np.inf (L-infinity) or 2 (L2).
    rho: the fraction of increasing steps below which the step size halves.

  Returns:
    The adversarial batch, same shape and dtype as `x`.

  Raises:
    ValueError: a negative budget or step count, a bad norm, or rho outside [0, 1].
  """
  check_budget(eps, clip_min, clip_max)
  if steps < 0 or int(steps) != steps:
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  static = dict(eps=eps, steps=int(steps), clip_min=clip_min, clip_max=clip_max,
                norm=check_norm(norm), rho=rho)
  return compiled.run(_apgd_ce, model, x, y, seed, static, random=True)


def checkpoint_schedule(steps):
  """(first window, window decrease, smallest window) in iterations, as the reference."""
  return max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)


def checkpoints(steps):
  """The iterations w_1 < w_2 < ... <= steps after which the step size may halve."""
  first_window, window_decrease, smallest_window = checkpoint_schedule(steps)
  points, window, total = [], first_window, first_window
  while total <= steps:
    points.append(total)
    window = max(window - window_decrease, smallest_window)
    total += window
  return points


def _random_start(x, eps, norm, seed):
  """A random point on the boundary region of the ball (the reference's start)."""
  if norm == np.inf:
    if seed is None:
      t = tf.random.uniform(tf.shape(x), -1.0, 1.0, dtype=x.dtype)
    else:
      t = stateless_uniform(tf.shape(x), seed, -1.0, 1.0, x.dtype)
    axes = tf.range(1, tf.rank(x))
    largest = tf.reduce_max(tf.abs(t), axis=axes, keepdims=True)
    return x + eps * t / tf.maximum(largest, tf.cast(1e-12, x.dtype))
  if seed is None:
    t = tf.random.normal(tf.shape(x), dtype=x.dtype)
  else:
    t = stateless_normal(tf.shape(x), seed, x.dtype)
  return x + eps * l2_normalize(t)


def _apgd_ce(model, x, y, seed, *, eps, steps, clip_min, clip_max, norm, rho):
  labels_given = y is not None
  y = attack_labels(model, x, y)
  state = search(model, x, y, seed, eps=eps, steps=steps, clip_min=clip_min,
                 clip_max=clip_max, norm=norm, rho=rho)
  x_adv = tf.where(per_example(state["fooled"], x), state["x_fooled"], state["x_best"])
  if labels_given:
    # A clean point that is misclassified already is its own worst case.
    x_adv = tf.where(per_example(misclassified(model(x, training=False), y), x), x, x_adv)
  return tf.stop_gradient(x_adv)


def search(model, x, y, seed, *, eps, steps, clip_min, clip_max, norm, rho):
  """The APGD iterations as graph code; returns the final state (a dict of tensors).

  Among others: "x_best" and "loss_best" (the highest-loss iterate), "fooled"
  and "x_fooled" (the last misclassified iterate), "step_size" [batch].
  """
  dtype = x.dtype
  eps_t = tf.cast(eps, dtype)
  first_window, window_decrease, smallest_window = checkpoint_schedule(steps)

  if norm == np.inf:
    lower = tf.maximum(x - eps_t, clip_min)
    upper = tf.minimum(x + eps_t, clip_max)

    def project(z):
      return tf.clip_by_value(z, lower, upper)

    def direction(grad):
      return tf.sign(grad)
  else:
    def project(z):
      return tf.clip_by_value(x + project_l2(z - x, eps_t), clip_min, clip_max)

    def direction(grad):
      return l2_normalize(grad)

  x_start = tf.clip_by_value(_random_start(x, eps_t, norm, seed), clip_min, clip_max)
  loss, logits, grad = loss_logits_gradient(model, x_start, y)
  batch = tf.shape(x)[:1]
  state = dict(
      x_adv=x_start, x_previous=x_start, grad=grad,
      step_size=tf.fill(batch, 2.0 * tf.cast(eps, tf.float32)),
      x_best=x_start, grad_best=grad, loss_best=loss,
      x_fooled=x_start, fooled=misclassified(logits, y),
      loss_previous=loss, increases=tf.zeros(batch, tf.int32),
      since_check=tf.constant(0), window=tf.constant(first_window),
      loss_best_last_check=loss, reduced_last_check=tf.ones(batch, tf.bool))

  def iteration(i, s):
    alpha = tf.where(i > 0, tf.cast(MOMENTUM, dtype), tf.cast(1.0, dtype))
    x_adv = s["x_adv"]
    momentum = x_adv - s["x_previous"]
    step = per_example(tf.cast(s["step_size"], dtype), x)
    z = project(x_adv + step * direction(s["grad"]))
    x_new = project(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * momentum)

    loss, logits, grad = loss_logits_gradient(model, x_new, y)
    wrong = misclassified(logits, y)
    x_fooled = tf.where(per_example(wrong, x), x_new, s["x_fooled"])
    improved = loss > s["loss_best"]
    x_best = tf.where(per_example(improved, x), x_new, s["x_best"])
    grad_best = tf.where(per_example(improved, x), grad, s["grad_best"])
    loss_best = tf.where(improved, loss, s["loss_best"])
    increases = s["increases"] + tf.cast(loss > s["loss_previous"], tf.int32)

    since_check = s["since_check"] + 1
    window = s["window"]
    at_check = tf.equal(since_check, window)
    oscillating = (tf.cast(increases, tf.float32)
                   <= tf.cast(window, tf.float32) * tf.cast(rho, tf.float32))
    stalled = ~s["reduced_last_check"] & (s["loss_best_last_check"] >= loss_best)
    reduce = at_check & (oscillating | stalled)
    restart = per_example(reduce, x)
    return i + 1, dict(
        x_adv=tf.where(restart, x_best, x_new), x_previous=x_adv,
        grad=tf.where(restart, grad_best, grad),
        step_size=tf.where(reduce, s["step_size"] / 2.0, s["step_size"]),
        x_best=x_best, grad_best=grad_best, loss_best=loss_best,
        x_fooled=x_fooled, fooled=s["fooled"] | wrong,
        loss_previous=loss,
        increases=tf.where(at_check, tf.zeros_like(increases), increases),
        since_check=tf.where(at_check, 0, since_check),
        window=tf.where(at_check, tf.maximum(window - window_decrease, smallest_window),
                        window),
        loss_best_last_check=tf.where(at_check, loss_best, s["loss_best_last_check"]),
        reduced_last_check=tf.where(at_check, reduce, s["reduced_last_check"]))

  _, state = tf.while_loop(lambda i, _: i < steps, iteration, (tf.constant(0), state))
  return state
