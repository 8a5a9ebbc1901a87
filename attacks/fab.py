"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein 2020), L-infinity or L2.

"Minimally distorted adversarial examples with a fast adaptive boundary
attack" (ICML 2020), in the targeted form that AutoAttack's standard version
runs ("Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", 2020): for each of the 9 classes ranked
2nd to 10th by the clean logits, `steps` iterations that linearise the
decision boundary between the label and that target class at the current
point, project both the current point and the clean image onto the
linearised boundary (an exact Lp projection onto a hyperplane intersected
with the box [0, 1]^d), step to a convex combination of the two projections
(weight alpha <= alpha_max towards the clean image, overshoot eta), and, once
the point is adversarial, keep it if it is the closest so far and step back
towards the clean image (factor beta). An example counts as fooled by a
target when the closest adversarial found lies within `eps`.

The semantics are those of fra31/auto-attack's `FABAttack` (fab_base.py,
fab_projections.py) and torchattacks 3.5.1's `FAB(multi_targeted=True)`,
which copies it line for line, with two documented choices:
- AutoAttack's standard version runs 100 iterations (fra31's `n_iter`), which
  is the default here; torchattacks' own `AutoAttack` keeps its `FAB`'s
  default of 10 `steps`.
- The examples are attacked as a whole batch with masks instead of gathering
  the ones still robust (fixed shapes, so the loop compiles with XLA); an
  example already fooled by an earlier target keeps its first result, as in
  the reference, whose later targets skip it.
"""

import math

import numpy as np
import tensorflow as tf

from robust_sparse.attacks import compiled
from robust_sparse.attacks.common import (attack_labels, check_budget, check_norm,
                                          stateless_normal, stateless_uniform)

# The reference's "no adversarial found yet" distance.
_FAR = 1e10


def fab_t(model, x, y=None, *, eps, norm=np.inf, steps=100, n_target_classes=9, n_restarts=1,
          alpha_max=0.1, eta=1.05, beta=0.9, clip_min=0.0, clip_max=1.0, seed=None):
  """Targeted FAB: the closest adversarial towards each of the top other classes, within eps.

  Graph code inside a `tf.function`; called eagerly it compiles itself once
  per model and arguments (`attacks.compiled`). With `n_restarts=1` (the
  standard AutoAttack setting) the attack is deterministic: every run starts
  at the clean image. Restart r > 0 of a target starts at
  x + eps / 2 * t / |t|_p (t uniform in [-1, 1]^d for L-infinity, Gaussian for
  L2, drawn from `stateless_fold_in(seed, target * n_restarts + r)`),
  clipped to the data range, as the reference's `use_rand_start` does.

  Per example (in order of the targets, then restarts): the first target and
  restart whose closest adversarial lies within `eps` gives the result;
  examples never fooled within `eps`, and clean examples already
  misclassified, are returned unchanged (the clean `x`).

  Args:
    model: callable mapping a batch to logits, shape [batch, classes].
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    norm: np.inf (or "inf", "linf", "Linf": L-infinity) or 2 (or "l2", "L2").
    steps: iterations per target and restart (>= 0; the reference's n_iter, 100).
    n_target_classes: how many targets, the classes ranked 2nd, 3rd, ... by
      the clean logits (1 to classes - 1; AutoAttack's standard uses 9).
    n_restarts: runs per target (>= 1); all but the first from a random start.
    alpha_max: largest weight of the clean image's projection in a step.
    eta: overshoot of the projections (>= 1).
    beta: backward step towards the clean image after an adversarial point.
    clip_min: smallest valid input value.
    clip_max: largest valid input value. The reference's box is [0, 1]; other
      ranges are mapped to it (and eps scaled with them) and back.
    seed: None for stateful randomness, or a shape-[2] integer tensor for
      stateless (reproducible) random starts; unused when n_restarts is 1.

  Returns:
    The adversarial batch, same shape and dtype as `x`.

  Raises:
    ValueError: a negative budget or step count, a bad norm, n_restarts < 1,
      n_target_classes < 1, alpha_max outside [0, 1], eta < 1 or beta outside (0, 1].
  """
  check_budget(eps, clip_min, clip_max)
  if steps < 0 or int(steps) != steps:
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if n_restarts < 1 or int(n_restarts) != n_restarts:
    raise ValueError(f"n_restarts must be an integer >= 1, got {n_restarts}")
  if n_target_classes < 1 or int(n_target_classes) != n_target_classes:
    raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes}")
  if not 0.0 <= alpha_max <= 1.0:
    raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max}")
  if eta < 1.0:
    raise ValueError(f"eta must be >= 1, got {eta}")
  if not 0.0 < beta <= 1.0:
    raise ValueError(f"beta must be in (0, 1], got {beta}")
  static = dict(eps=eps, norm=lp_norm(norm), steps=int(steps),
                n_target_classes=int(n_target_classes), n_restarts=int(n_restarts),
                alpha_max=alpha_max, eta=eta, beta=beta, clip_min=clip_min, clip_max=clip_max)
  return compiled.run(_fab_t, model, x, y, seed, static, random=n_restarts > 1)


def lp_norm(norm):
  """np.inf or 2 from `norm`: np.inf, 2, or torchattacks' and AutoAttack's names "Linf", "L2".

  Raises:
    ValueError: any other norm.
  """
  if isinstance(norm, str) and norm.lower() in ("linf", "l2"):
    norm = {"linf": np.inf, "l2": 2}[norm.lower()]
  return check_norm(norm)


def unit_box(model, x, eps, clip_min, clip_max):
  """(model, x, eps) in coordinates where the data range is [0, 1], and the way back.

  The reference's projections assume the box [0, 1]; an affine change of
  variables keeps Lp balls balls (radius eps / (clip_max - clip_min)).
  """
  if clip_min == 0.0 and clip_max == 1.0:
    return model, x, eps, lambda u: u
  scale = clip_max - clip_min

  def unit_model(u, training=False):
    return model(clip_min + scale * u, training=training)

  return unit_model, (x - clip_min) / scale, eps / scale, lambda u: clip_min + scale * u


def _flat_norm(v, norm):
  """Per-row Lp norm of `v` [batch, d]."""
  if norm == np.inf:
    return tf.reduce_max(tf.abs(v), axis=1)
  return tf.sqrt(tf.reduce_sum(tf.square(v), axis=1))


def _logits(model, x):
  return tf.cast(model(x, training=False), tf.float32)


def _fab_t(model, x, y, seed, *, eps, norm, steps, n_target_classes, n_restarts, alpha_max,
           eta, beta, clip_min, clip_max):
  dtype = x.dtype
  y = tf.cast(attack_labels(model, x, y), tf.int32)
  model, x_unit, eps, back = unit_box(model, tf.cast(x, tf.float32), eps, clip_min, clip_max)
  shape = tf.shape(x_unit)
  dim = int(np.prod(x_unit.shape[1:]))
  x0 = tf.reshape(x_unit, [-1, dim])

  logits = _logits(model, x_unit)
  classes = logits.shape[-1]
  if classes is not None and n_target_classes > classes - 1:
    raise ValueError(f"n_target_classes must be at most classes - 1 = {classes - 1}, got "
                     f"{n_target_classes}")
  classes = tf.shape(logits)[-1]
  # The reference's output.sort(dim=-1)[1][:, -k]: the class ranked k-th.
  ranking = tf.argsort(logits, axis=-1)
  robust = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
  runs = n_target_classes * n_restarts

  def attack(j, x_adv, robust):
    rank = j // n_restarts + 2
    restart = j % n_restarts
    target = tf.gather(ranking, classes - rank, axis=1)
    if n_restarts == 1:
      start = x0
    else:
      start = tf.cond(restart > 0, lambda: _random_start(x0, eps, norm, seed, j),
                      lambda: x0)
    found = single_run(model, x0, shape, y, target, start, norm=norm, steps=steps,
                       alpha_max=alpha_max, eta=eta, beta=beta)
    wrong = tf.not_equal(
        tf.argmax(_logits(model, tf.reshape(found, shape)), axis=-1, output_type=tf.int32), y)
    fooled = robust & wrong & ~(_flat_norm(x0 - found, norm) > eps)
    return (j + 1, tf.where(fooled[:, None], found, x_adv), robust & ~fooled)

  _, x_adv, _ = tf.while_loop(lambda j, _, robust: (j < runs) & tf.reduce_any(robust), attack,
                              (tf.constant(0), x0, robust))
  return tf.stop_gradient(tf.cast(back(tf.reshape(x_adv, shape)), dtype))


def _random_start(x0, eps, norm, seed, run):
  """The reference's random start: x + eps / 2 * t / |t|_p, clipped to [0, 1]."""
  dtype = x0.dtype
  if seed is None:
    t = (tf.random.uniform(tf.shape(x0), -1.0, 1.0, dtype=dtype) if norm == np.inf
         else tf.random.normal(tf.shape(x0), dtype=dtype))
  else:
    run_seed = tf.random.experimental.stateless_fold_in(seed, run)
    t = (stateless_uniform(tf.shape(x0), run_seed, -1.0, 1.0, dtype) if norm == np.inf
         else stateless_normal(tf.shape(x0), run_seed, dtype))
  t = t / _flat_norm(t, norm)[:, None]
  return tf.clip_by_value(x0 + tf.cast(eps, dtype) * t * 0.5, 0.0, 1.0)


def single_run(model, x0, shape, y, target, start, *, norm, steps, alpha_max, eta, beta):
  """One targeted FAB run (the reference's `attack_single_run`) on flat images in [0, 1].

  Args:
    model: the model, in [0, 1] coordinates.
    x0: the clean images, flat [batch, d].
    shape: the model's input shape (the batch's, a tensor).
    y: the labels [batch] (int32).
    target: the target class per example [batch] (int32).
    start: the starting points, flat [batch, d].

  Returns:
    The closest adversarial point found per example (flat), else the clean image.
  """
  batch = tf.shape(x0)[0]
  rows = tf.range(batch)
  project = _projection_linf if norm == np.inf else _projection_l2
  pairs_y = tf.stack([rows, y], axis=1)
  pairs_target = tf.stack([rows, target], axis=1)

  def step(i, x1, adv, distance):
    with tf.GradientTape() as tape:
      tape.watch(x1)
      logits = _logits(model, tf.reshape(x1, shape))
      # The linearised boundary: logit_target - logit_y = 0.
      difference = tf.gather_nd(logits, pairs_target) - tf.gather_nd(logits, pairs_y)
      total = tf.reduce_sum(difference)
    w = tape.gradient(total, x1)
    b = -difference + tf.reduce_sum(w * x1, axis=1)
    both = project(tf.concat([x1, x0], 0), tf.concat([w, w], 0), tf.concat([b, b], 0))
    d1, d2 = both[:batch], both[batch:]
    size = tf.maximum(_flat_norm(both, norm), 1e-8)
    a1, a2 = size[:batch], size[batch:]
    alpha = tf.minimum(tf.maximum(a1 / (a1 + a2), 0.0), alpha_max)[:, None]
    x1 = tf.clip_by_value((x1 + eta * d1) * (1.0 - alpha) + (x0 + d2 * eta) * alpha, 0.0, 1.0)

    predicted = tf.argmax(_logits(model, tf.reshape(x1, shape)), axis=-1, output_type=tf.int32)
    adversarial = tf.not_equal(predicted, y)
    t = _flat_norm(x1 - x0, norm)
    closer = adversarial & (t < distance)
    adv = tf.where(closer[:, None], x1, adv)
    distance = tf.where(closer, t, distance)
    x1 = tf.where(adversarial[:, None], x0 + (x1 - x0) * beta, x1)
    return i + 1, x1, adv, distance

  _, _, adv, distance = tf.while_loop(
      lambda i, *_: i < steps, step,
      (tf.constant(0), start, x0, tf.fill([batch], tf.constant(_FAR, tf.float32))))
  return tf.where((distance < _FAR)[:, None], adv, x0)


def _binary_search(condition, dim, rows):
  """The reference's bisection: the last index of [0, dim - 1] where `condition` holds.

  `condition(index [rows] int32) -> bool [rows]`; ceil(log2(dim)) halvings.
  """
  iterations = math.ceil(math.log2(dim)) if dim > 1 else 0

  def halve(k, lower, upper):
    middle = tf.floor((lower + upper) / 2.0)
    holds = condition(tf.cast(middle, tf.int32))
    return k + 1, tf.where(holds, middle, lower), tf.where(holds, upper, middle)

  _, lower, _ = tf.while_loop(
      lambda k, *_: k < iterations, halve,
      (tf.constant(0), tf.zeros([rows], tf.float32), tf.fill([rows], float(dim - 1))))
  return tf.cast(lower, tf.int32)


def _take(values, index):
  """values[r, index[r]] for each row r."""
  return tf.gather(values, index[:, None], axis=1, batch_dims=1)[:, 0]


# Plain tensor code: AutoGraph has nothing to convert (and fails to parse the L2 one).
@tf.autograph.experimental.do_not_convert
def _projection_linf(t, w, b):
  """The smallest L-infinity step d with w.(t + d) = b and t + d in [0, 1]^d, per row.

  fra31's `projection_linf` (fab_projections.py), row by row on [rows, d]
  without its boolean row selections: every row runs the bisection, and the
  reference's three cases are chosen per row with `tf.where`.
  """
  rows, dim = tf.shape(t)[0], t.shape[1]
  sign = tf.where(tf.reduce_sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
  w = w * sign[:, None]
  b = b * sign
  a = tf.cast(w < 0, t.dtype)
  nonzero = tf.cast(tf.not_equal(w, 0.0), t.dtype)
  d = (a - t) * nonzero
  p = a - t * (2.0 * a - 1.0)
  order = tf.argsort(p, axis=1)
  b = b - tf.reduce_sum(w * t, axis=1)
  b0 = tf.reduce_sum(w * d, axis=1)
  descending = tf.reverse(order, axis=[1])
  ws = tf.gather(w, descending, batch_dims=1)
  bs2 = -ws * tf.gather(d, descending, batch_dims=1)
  s = tf.cumsum(tf.abs(ws), axis=1)
  sb = tf.cumsum(bs2, axis=1) + b0[:, None]
  p_descending = tf.gather(p, descending, batch_dims=1)

  b2 = sb[:, -1] - s[:, -1] * p_descending[:, -1]
  whole = b - b2 > 0
  partial = (b - b0 > 0) & ~whole
  lower = _binary_search(lambda k: b - (_take(sb, k) - _take(s, k) * _take(p_descending, k)) > 0,
                         dim, rows)

  lambda_whole = tf.maximum((b - sb[:, -1]) / (-s[:, -1]), 0.0)[:, None]
  d_whole = (2.0 * a - 1.0) * lambda_whole
  lambda_partial = tf.maximum((b - _take(sb, lower)) / (-_take(s, lower)), 0.0)[:, None]
  d_partial = tf.minimum(lambda_partial, d) * a + tf.maximum(-lambda_partial, d) * (1.0 - a)
  d = tf.where(whole[:, None], d_whole, tf.where(partial[:, None], d_partial, d))
  return d * nonzero


# Plain tensor code: AutoGraph has nothing to convert (and fails to parse the L2 one).
@tf.autograph.experimental.do_not_convert
def _projection_l2(t, w, b):
  """The smallest L2 step d with w.(t + d) = b and t + d in [0, 1]^d, per row.

  fra31's `projection_l2` (fab_projections.py), row by row as `_projection_linf`.
  """
  rows, dim = tf.shape(t)[0], t.shape[1]
  big = tf.constant(1e12, t.dtype)
  c = tf.reduce_sum(w * t, axis=1) - b
  flip = c < 0
  w = tf.where(flip[:, None], -w, w)
  c = tf.where(flip, -c, c)
  usable = tf.abs(w) >= 1e-8
  r = tf.clip_by_value(tf.maximum(t / w, (t - 1.0) / w), -big, big)
  r = tf.where(usable, r, big)
  r = tf.where(tf.equal(r, -big), big, r)
  order = tf.argsort(r, axis=1)
  rs = tf.gather(r, order, batch_dims=1)
  rs2 = tf.concat([rs[:, 1:], tf.zeros_like(rs[:, :1])], axis=1)
  rs = tf.where(tf.equal(rs, big), 0.0, rs)
  rs2 = tf.where(tf.equal(rs2, big), 0.0, rs2)

  w3s = tf.gather(tf.square(w), order, batch_dims=1)
  w5 = tf.reduce_sum(w3s, axis=1, keepdims=True)
  ws = w5 - tf.cumsum(w3s, axis=1)
  d = -(r * w) * tf.cast(tf.abs(w) > 1e-8, t.dtype)
  s = tf.concat([-w5 * rs[:, :1], tf.cumsum((-rs2 + rs) * ws, axis=1) - w5 * rs[:, :1]], axis=1)

  inside = s[:, 0] + c < 0
  beyond = tf.reduce_sum(d * w, axis=1) + c > 0
  between = ~(inside | beyond)
  lower = _binary_search(lambda k: _take(s, k) + c > 0, dim, rows)

  d_inside = -(c / w5[:, 0])[:, None] * w
  ws_lower = _take(ws, lower)
  alpha = (_take(s, lower) + c) / ws_lower + _take(rs, lower)
  alpha = tf.where(tf.equal(ws_lower, 0.0), 0.0, alpha)[:, None]
  kept = tf.cast(alpha > r, t.dtype)
  d_between = d * kept - alpha * w * (1.0 - kept)
  d = tf.where(inside[:, None], d_inside, tf.where(between[:, None], d_between, d))
  return d * tf.cast(tf.abs(w) > 1e-8, t.dtype)
