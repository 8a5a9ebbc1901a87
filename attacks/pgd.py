"""Projected Gradient Descent (Madry et al. 2018), L-infinity."""

import tensorflow as tf

from attacks.common import attack_labels, check_budget, loss_gradient


def pgd(model, x, y=None, *, eps, step_size, steps, random_start=True,
        clip_min=0.0, clip_max=1.0, seed=None):
  """`steps` signed-gradient steps, each projected onto the eps-ball and data range.

  The labels (given, or the model's predictions at the clean `x`) stay fixed
  over the steps, as in cleverhans. The loop is a `tf.while_loop`, so the graph
  stays small for any number of steps.

  Args:
    model: callable mapping a batch to logits, shape [batch, classes].
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: L-infinity budget (>= 0).
    step_size: size of each signed-gradient step.
    steps: number of steps (>= 0).
    random_start: start from a uniform point of the eps-ball (clipped).
    clip_min: smallest valid input value.
    clip_max: largest valid input value.
    seed: None for stateful randomness, or a shape-[2] integer tensor for
      stateless (reproducible, resumable) randomness. The same seed gives the
      same start within one compile mode; XLA draws other numbers than eager.

  Returns:
    The adversarial batch, same shape and dtype as `x`.
  """
  check_budget(eps, clip_min, clip_max)
  if steps < 0:
    raise ValueError(f"steps must be >= 0, got {steps}")
  if step_size < 0:
    raise ValueError(f"step_size must be >= 0, got {step_size}")
  x = tf.convert_to_tensor(x)
  y = attack_labels(model, x, y)
  eps = tf.cast(eps, x.dtype)
  if random_start:
    if seed is None:
      noise = tf.random.uniform(tf.shape(x), -eps, eps, dtype=x.dtype)
    else:
      noise = tf.random.stateless_uniform(
          tf.shape(x), seed=seed, minval=-eps, maxval=eps, dtype=x.dtype)
    x_adv = tf.clip_by_value(x + noise, clip_min, clip_max)
  else:
    x_adv = x
  lower = tf.maximum(x - eps, clip_min)
  upper = tf.minimum(x + eps, clip_max)

  def step(i, x_adv):
    x_adv = x_adv + tf.cast(step_size, x.dtype) * tf.sign(loss_gradient(model, x_adv, y))
    return i + 1, tf.clip_by_value(x_adv, lower, upper)

  _, x_adv = tf.while_loop(lambda i, _: i < steps, step, (tf.constant(0), x_adv))
  return tf.stop_gradient(x_adv)
