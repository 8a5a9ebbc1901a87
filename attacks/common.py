"""Pieces shared by the attacks: labels to attack, losses, gradients and Lp geometry."""

import numpy as np
import tensorflow as tf

from robust_sparse.training.distribute import per_example_draw

NORMS = (np.inf, 2)
# Keeps a zero gradient or a zero perturbation from dividing by zero.
_TINY = 1e-12
# The algorithm of every stateless draw. TensorFlow's default ("auto_select")
# is Philox too, in plain graphs and in XLA, so naming it changes no number;
# but XLA's CPU backend compiles the default's seed scrambling (a chain of
# scalar multiplies and xors) into the per-value loop and runs it once per
# value: on 2 CPU cores a uniform [256, 784] draw took 130 ms against 3.7 ms
# named (a normal draw, of any shape, 130-160 ms against 4-6), more than a whole
# PGD-10 attack of a 784-300-100-10 MLP on those 256 examples.
RANDOM_ALGORITHM = "philox"


def stateless_uniform(shape, seed, minval, maxval, dtype):
  """Uniform values in [minval, maxval) from a shape-[2] seed; the first axis is the batch.

  `tf.random.stateless_uniform` with `RANDOM_ALGORITHM`, drawn for the global
  batch on a replica's shard (`robust_sparse.training.distribute.per_example_draw`).
  """
  return per_example_draw(
      lambda shape, seed: tf.random.stateless_uniform(shape, seed=seed, minval=minval,
                                                      maxval=maxval, dtype=dtype,
                                                      alg=RANDOM_ALGORITHM), shape, seed)


def stateless_normal(shape, seed, dtype):
  """Standard normal values from a shape-[2] seed, as `stateless_uniform` draws."""
  return per_example_draw(
      lambda shape, seed: tf.random.stateless_normal(shape, seed=seed, dtype=dtype,
                                                     alg=RANDOM_ALGORITHM), shape, seed)


def attack_labels(model, x, y):
  """Labels the attack moves away from.

  With `y=None` the model's own predictions at the clean input are used, as
  cleverhans does (and the seed relied on): this avoids label leaking.
  """
  if y is None:
    return tf.argmax(model(x, training=False), axis=-1)
  return y


def per_example_loss(model, x, y):
  """Returns (cross-entropy per example [batch], float32 logits [batch, classes])."""
  logits = tf.cast(model(x, training=False), tf.float32)
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                        logits=logits)
  return loss, logits


def loss_gradient(model, x, y):
  """Gradient of the summed cross-entropy of `model(x)` with respect to `x`.

  The loss is summed, not averaged, so that small per-example gradients do not
  underflow to zero before the sign is taken.
  """
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss, _ = per_example_loss(model, x, y)
    loss = tf.reduce_sum(loss)
  return tape.gradient(loss, x)


def loss_logits_gradient(model, x, y):
  """Returns (per-example loss [batch], logits, gradient of the summed loss w.r.t. `x`)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    loss, logits = per_example_loss(model, x, y)
    total = tf.reduce_sum(loss)
  return loss, logits, tape.gradient(total, x)


def misclassified(logits, y):
  """Boolean [batch]: the prediction is not `y`."""
  return tf.not_equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))


def per_example(values, x):
  """Reshapes per-example `values` [batch] to broadcast against `x` [batch, ...]."""
  shape = tf.concat([tf.shape(values), tf.ones([tf.rank(x) - 1], tf.int32)], axis=0)
  return tf.reshape(values, shape)


def l2_norm(v):
  """Per-example L2 norm of `v` [batch, ...], shaped [batch, 1, ...] to broadcast."""
  axes = tf.range(1, tf.rank(v))
  return tf.sqrt(tf.reduce_sum(tf.square(v), axis=axes, keepdims=True))


def l2_normalize(v):
  """`v` divided by its per-example L2 norm (0 stays 0)."""
  return v / tf.maximum(l2_norm(v), tf.cast(_TINY, v.dtype))


def project_l2(delta, eps):
  """Scales each example of `delta` into the L2 ball of radius `eps`."""
  norm = l2_norm(delta)
  return delta * tf.minimum(tf.ones_like(norm), eps / tf.maximum(norm, tf.cast(_TINY,
                                                                                delta.dtype)))


def random_l2_ball(shape, eps, dtype, seed=None):
  """Points drawn uniformly from the L2 ball of radius `eps` (per example).

  A Gaussian direction scaled by radius eps * u^(1/d), d the dimension of one
  example, as cleverhans' `random_lp_vector` does.
  """
  if seed is None:
    direction = tf.random.normal(shape, dtype=dtype)
    u = tf.random.uniform(shape[:1], dtype=dtype)
  else:
    seeds = tf.random.experimental.stateless_split(seed, 2)
    direction = stateless_normal(shape, seeds[0], dtype)
    u = stateless_uniform(shape[:1], seeds[1], 0.0, 1.0, dtype)
  dim = tf.cast(tf.reduce_prod(shape[1:]), dtype)
  radius = eps * tf.pow(u, 1.0 / dim)
  return l2_normalize(direction) * per_example(radius, direction)


def check_budget(eps, clip_min, clip_max):
  if eps < 0:
    raise ValueError(f"eps must be >= 0, got {eps}")
  if clip_min >= clip_max:
    raise ValueError(
        f"clip_min must be < clip_max, got clip_min={clip_min}, clip_max={clip_max}")


def check_norm(norm):
  """Returns `norm` as np.inf or 2; a `ValueError` for anything else."""
  if norm in ("inf", "linf"):
    return np.inf
  try:
    if float(norm) in NORMS:
      return np.inf if float(norm) == np.inf else 2
  except (TypeError, ValueError):
    pass
  raise ValueError(f"norm must be np.inf or 2, got {norm!r}")
