"""The Difference of Logits Ratio losses of APGD-DLR and APGD-T (Croce & Hein 2020, eq. 5 and 6).

With z the logits, pi the classes sorted by decreasing logit and y the label:

  DLR(z, y)          = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)
  targeted DLR(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)

Both are invariant to shifting and (positively) scaling the logits, so a
saturated softmax does not hide the gradient. The denominators carry the
reference code's 1e-12. The targeted loss needs at least four classes, the
untargeted one three.

Logits are picked by one-hot products, not `tf.sort` or `tf.gather`, whose
gradients scatter into a shape XLA cannot see when the batch is the
still-robust subset of a batch (APGD-T inside a jit-compiled attack).
"""

import tensorflow as tf

# The reference code's guard against a zero denominator (all top logits equal).
_GUARD = 1e-12


def _pick(logits, classes):
  """logits[i, classes[i]] per example, differentiable in `logits`."""
  one_hot = tf.one_hot(tf.cast(classes, tf.int32), tf.shape(logits)[-1], dtype=logits.dtype)
  return tf.reduce_sum(logits * one_hot, axis=-1)


def _sorted_logits(logits, count):
  """The `count` largest logits per example, largest first: [batch, count]."""
  classes = logits.shape[-1]
  if classes is not None and classes < count:
    raise ValueError(f"the DLR loss needs at least {count} classes, got {classes}")
  order = tf.stop_gradient(tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True))
  return tf.stack([_pick(logits, order[:, i]) for i in range(count)], axis=1)


def dlr_loss(logits, y):
  """Untargeted DLR per example [batch] of float logits [batch, classes] and labels [batch]."""
  logits = tf.convert_to_tensor(logits)
  top = _sorted_logits(logits, 3)
  y = tf.cast(y, tf.int32)
  z_y = _pick(logits, y)
  other = tf.where(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y),
                   top[:, 1], top[:, 0])
  return -(z_y - other) / (top[:, 0] - top[:, 2] + _GUARD)


def dlr_loss_targeted(logits, y, target):
  """Targeted DLR per example [batch]: large when the `target` logit beats the label's."""
  logits = tf.convert_to_tensor(logits)
  top = _sorted_logits(logits, 4)
  z_y, z_t = _pick(logits, y), _pick(logits, target)
  return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _GUARD)


def ranked_classes(logits, count):
  """The classes of the 2nd, 3rd, ... (count + 1)-th largest logit: [batch, count] int32.

  APGD-T's targets (the reference takes them from the clean logits).
  """
  order = tf.argsort(logits, axis=-1, direction="DESCENDING", stable=True)
  return tf.cast(order[:, 1:count + 1], tf.int32)
