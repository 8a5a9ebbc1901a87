"""Projected Gradient Descent (Madry et al. 2018), L-infinity or L2, with random restarts."""

import numpy as np
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.common import (attack_labels, check_budget, check_norm, l2_normalize,
                            loss_gradient, misclassified, per_example, per_example_loss,
                            project_l2, random_l2_ball, stateless_uniform)


def pgd(model, x, y=None, *, eps, step_size, steps, random_start=True,
        clip_min=0.0, clip_max=1.0, seed=None, restarts=1, norm=np.inf):
  """`steps` gradient steps, each projected onto the eps-ball and data range.

  L-infinity steps follow the gradient's sign, L2 steps its direction (the
  gradient divided by its L2 norm, per example). The labels (given, or the
  model's predictions at the clean `x`) stay fixed over the steps, as in
  cleverhans. The loops are `tf.while_loop`s, so the graph stays small for any
  number of steps and restarts. Graph code inside a `tf.function`; called
  eagerly it compiles itself once per model and arguments (`attacks.compiled`).

  With `restarts` > 1 the attack runs again from other random starts and keeps,
  per example, the worst case: a misclassified result (the label changed) over
  a correctly classified one, else the one with the highest loss. The first
  restart uses `seed` itself, so more restarts are never weaker than one.

  Args:
    model: callable mapping a batch to logits, shape [batch, classes].
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    step_size: length of each step (in the `norm`).
    steps: number of steps (>= 0).
    random_start: start from a uniform point of the eps-ball (clipped).
    clip_min: smallest valid input value.
    clip_max: largest valid input value.
    seed: None for stateful randomness, or a shape-[2] integer tensor for
      stateless (reproducible, resumable) randomness. The same seed gives the
      same start within one compile mode; XLA draws other numbers than eager
      graphs.
    restarts: number of random starts (>= 1; > 1 needs `random_start`).
    norm: np.inf (L-infinity) or 2 (L2).

  Returns:
    The adversarial batch, same shape and dtype as `x`.

  Raises:
    ValueError: a negative budget, step size or step count, restarts < 1 (or
      > 1 without a random start), or a norm other than np.inf and 2.
  """
  check_budget(eps, clip_min, clip_max)
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if step_size < 0:
    raise ValueError(f"step_size must be >= 0, got {step_size}")
  if restarts < 1 or int(restarts) != restarts:
    raise ValueError(f"restarts must be an integer >= 1, got {restarts}")
  if restarts > 1 and not random_start:
    raise ValueError(f"restarts={restarts} needs random_start=True: without a random "
                     "start every restart finds the same point")
  static = dict(eps=eps, step_size=step_size, steps=steps, random_start=bool(random_start),
                clip_min=clip_min, clip_max=clip_max, restarts=int(restarts),
                norm=check_norm(norm))
  return compiled.run(_pgd, model, x, y, seed, static, random=bool(random_start))


def _pgd(model, x, y, seed, *, eps, step_size, steps, random_start, clip_min, clip_max,
         restarts, norm):
  y = attack_labels(model, x, y)
  budget = dict(eps=eps, step_size=step_size, steps=steps, random_start=random_start,
                clip_min=clip_min, clip_max=clip_max, norm=norm)
  x_adv = _one_start(model, x, y, seed, **budget)
  if restarts == 1:
    return tf.stop_gradient(x_adv)

  loss, logits = per_example_loss(model, x_adv, y)

  def restart(r, best, best_loss, best_wrong):
    restart_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, r)
    candidate = _one_start(model, x, y, restart_seed, **budget)
    loss, logits = per_example_loss(model, candidate, y)
    wrong = misclassified(logits, y)
    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
    return (r + 1, tf.where(per_example(better, x), candidate, best),
            tf.where(better, loss, best_loss), best_wrong | wrong)

  _, x_adv, _, _ = tf.while_loop(lambda r, *_: r < restarts, restart,
                                 (tf.constant(1), x_adv, loss, misclassified(logits, y)))
  return tf.stop_gradient(x_adv)


def _one_start(model, x, y, seed, *, eps, step_size, steps, random_start, clip_min, clip_max,
               norm):
  """One PGD run from one (random or clean) start."""
  eps = tf.cast(eps, x.dtype)
  step_size = tf.cast(step_size, x.dtype)
  if norm == np.inf:
    if random_start:
      if seed is None:
        noise = tf.random.uniform(tf.shape(x), -eps, eps, dtype=x.dtype)
      else:
        noise = stateless_uniform(tf.shape(x), seed, -eps, eps, x.dtype)
      x_adv = tf.clip_by_value(x + noise, clip_min, clip_max)
    else:
      x_adv = x
    lower = tf.maximum(x - eps, clip_min)
    upper = tf.minimum(x + eps, clip_max)

    def step(i, x_adv):
      x_adv = x_adv + step_size * tf.sign(loss_gradient(model, x_adv, y))
      return i + 1, tf.clip_by_value(x_adv, lower, upper)
  else:
    if random_start:
      x_adv = tf.clip_by_value(x + random_l2_ball(tf.shape(x), eps, x.dtype, seed),
                               clip_min, clip_max)
    else:
      x_adv = x

    def step(i, x_adv):
      x_adv = x_adv + step_size * l2_normalize(loss_gradient(model, x_adv, y))
      # Clipping to the data range after the projection only moves coordinates
      # towards x (which is in range), so the result stays in the ball.
      return i + 1, tf.clip_by_value(x + project_l2(x_adv - x, eps), clip_min, clip_max)

  _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), x_adv))
  return x_adv
