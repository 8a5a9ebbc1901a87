"""Fast Gradient Sign Method (Goodfellow et al. 2015), L-infinity."""

import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.common import attack_labels, check_budget, loss_gradient


def fgsm(model, x, y=None, *, eps, clip_min=0.0, clip_max=1.0):
  """One signed-gradient step of size `eps`, clipped to the data range.

  Graph code inside a `tf.function` (a compiled train step); called eagerly it
  compiles itself once per model and budget (see `attacks.compiled`). The model
  runs in inference mode.

  Args:
    model: callable mapping a batch to logits, shape [batch, classes].
    x: float batch of inputs, any shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: L-infinity budget (>= 0).
    clip_min: smallest valid input value.
    clip_max: largest valid input value.

  Returns:
    The adversarial batch, same shape and dtype as `x`.
  """
  check_budget(eps, clip_min, clip_max)
  return compiled.run(_fgsm, model, x, y, None,
                      dict(eps=eps, clip_min=clip_min, clip_max=clip_max), random=False)


def _fgsm(model, x, y, seed, *, eps, clip_min, clip_max):
  del seed  # FGSM is deterministic.
  y = attack_labels(model, x, y)
  grad = loss_gradient(model, x, y)
  x_adv = x + tf.cast(eps, x.dtype) * tf.sign(grad)
  return tf.stop_gradient(tf.clip_by_value(x_adv, clip_min, clip_max))
