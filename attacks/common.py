"""Pieces shared by the L-infinity attacks: labels to attack and the input gradient."""

import tensorflow as tf


def attack_labels(model, x, y):
  """Labels the attack moves away from.

  With `y=None` the model's own predictions at the clean input are used, as
  cleverhans does (and the seed relied on): this avoids label leaking.
  """
  if y is None:
    return tf.argmax(model(x, training=False), axis=-1)
  return y


def loss_gradient(model, x, y):
  """Gradient of the summed cross-entropy of `model(x)` with respect to `x`.

  The loss is summed, not averaged, so that small per-example gradients do not
  underflow to zero before the sign is taken.
  """
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = model(x, training=False)
    loss = tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(y, tf.int32), logits=tf.cast(logits, tf.float32)))
  return tape.gradient(loss, x)


def check_budget(eps, clip_min, clip_max):
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if clip_min >= clip_max:
    raise ValueError(
        f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}")
