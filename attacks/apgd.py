"""APGD (Croce & Hein 2020), L-infinity or L2: APGD-CE, and the search APGD-T shares.

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
torchattacks) with one deliberate difference by default: the first window's
count of loss increases starts from the loss at the random start (the
paper's Algorithm 1, `first_window="paper"`), where the reference compares
with an unwritten (zero) entry of its loss history (`first_window="fra31"`,
to reproduce fra31's and torchattacks' numbers).

`search` takes the loss as an argument (cross-entropy by default), so
APGD-T (`apgd_t`: targeted, with the DLR loss of `attacks/dlr.py`) runs the
same iterations, step-size schedule and checkpoints.
"""

import numpy as np
import tensorflow as tf
# To tell whether a trace is XLA-compiled (`gathers_subsets`); TensorFlow has no public call.
from tensorflow.python.framework import ops
from tensorflow.python.ops import control_flow_util

from robust_sparse.attacks import compiled
from robust_sparse.attacks.dlr import dlr_loss_targeted, ranked_classes
from robust_sparse.attacks.common import (attack_labels, check_budget, check_norm, l2_normalize,
                            misclassified, per_example, project_l2, stateless_normal,
                            stateless_uniform)

# The weight of the new step against the previous one (the paper's alpha).
MOMENTUM = 0.75
# What the first window's first loss increase is counted against: the random start's loss
# (the paper's Algorithm 1, the default) or zero (fra31/auto-attack's and torchattacks' code,
# which read an unwritten entry of their loss history).
FIRST_WINDOWS = ("paper", "fra31")


def apgd_ce(model, x, y=None, *, eps, steps=100, clip_min=0.0, clip_max=1.0, seed=None,
            norm=np.inf, rho=0.75, first_window="paper"):
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
    first_window: "paper" (the first window counts loss increases from the
      random start's loss) or "fra31" (from zero, as fra31's and torchattacks' code).

  Returns:
    The adversarial batch, same shape and dtype as `x`.

  Raises:
    ValueError: a negative budget or step count, a bad norm, rho outside [0, 1],
      or an unknown first_window.
  """
  static = check_arguments(eps=eps, steps=steps, clip_min=clip_min, clip_max=clip_max,
                           norm=norm, rho=rho, first_window=first_window)
  return compiled.run(_apgd_ce, model, x, y, seed, static, random=True)


def apgd_t(model, x, y=None, *, eps, steps=100, n_target_classes=9, clip_min=0.0,
           clip_max=1.0, seed=None, norm=np.inf, rho=0.75, first_window="paper"):
  """APGD-T: APGD with the targeted DLR loss, once per target class (AutoAttack's second).

  For k = 1 .. `n_target_classes` the target of each example is the class of
  its (k + 1)-th largest clean logit; a run of `steps` APGD iterations
  (`search`, from a fresh random start) increases the targeted DLR loss
  -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) on the examples that no
  earlier target has fooled, as the reference's `perturb` does (outside
  XLA on those examples only, see `gathers_subsets`). Graph code
  inside a `tf.function`; called eagerly it compiles itself once per model and
  arguments (`attacks.compiled`). The loop over targets stops early once every
  example is fooled.

  Each run draws its start for the whole batch from
  `stateless_fold_in(seed, k)` (k = 0, 1, ...) and keeps the rows of the
  examples it attacks, so an example's start does not depend on which others
  are still robust.

  Args:
    model: callable mapping a batch to logits, shape [batch, classes], classes >= 4.
    x: float batch of inputs, shape [batch, ...].
    y: integer class labels, shape [batch]; None uses the model's predictions.
    eps: budget (>= 0), the radius of the ball in the `norm`.
    steps: APGD iterations per target class (the standard AutoAttack: 100).
    n_target_classes: how many targets (the standard: 9); at most classes - 1 are used.
    clip_min: smallest valid input value.
    clip_max: largest valid input value.
    seed: None for stateful randomness, or a shape-[2] integer tensor.
    norm: np.inf (L-infinity) or 2 (L2).
    rho: the fraction of increasing steps below which the step size halves.
    first_window: "paper" or "fra31", as for `apgd_ce`.

  Returns:
    The adversarial batch: the last misclassified iterate of the first target
    that fooled an example; for an example no target fooled, the highest-loss
    point of the last target's run; with given labels, a clean example that is
    misclassified already is returned as it is.

  Raises:
    ValueError: a bad budget, step count, norm, rho or first_window,
      n_target_classes < 1, or a model with fewer than 4 classes.
  """
  static = check_arguments(eps=eps, steps=steps, clip_min=clip_min, clip_max=clip_max,
                           norm=norm, rho=rho, first_window=first_window)
  if n_target_classes < 1 or int(n_target_classes) != n_target_classes:
    raise ValueError(f"n_target_classes must be an integer >= 1, got {n_target_classes}")
  static["n_target_classes"] = int(n_target_classes)
  return compiled.run(_apgd_t, model, x, y, seed, static, random=True)


def _apgd_t(model, x, y, seed, *, eps, steps, n_target_classes, clip_min, clip_max, norm, rho,
            first_window):
  y = attack_labels(model, x, y)
  logits = tf.cast(model(x, training=False), tf.float32)
  classes = logits.shape[-1]
  if classes is None or classes < 4:
    raise ValueError(f"apgd_t needs a model with at least 4 classes (the targeted DLR loss), "
                     f"got {classes}")
  count = min(n_target_classes, classes - 1)
  targets = ranked_classes(logits, count)
  robust = ~misclassified(logits, y)
  eps_t = tf.cast(eps, x.dtype)
  budget = dict(eps=eps, steps=steps, clip_min=clip_min, clip_max=clip_max, norm=norm, rho=rho,
                first_window=first_window)

  gather = gathers_subsets()

  def one_target(k, x_adv, robust):
    run_seed = None if seed is None else tf.random.experimental.stateless_fold_in(seed, k)
    start = random_start(x, eps_t, norm, run_seed)
    target = targets[:, k]
    if not gather:  # Under XLA: the whole batch, the results kept where still robust.
      state = search(model, x, y, None, start=start,
                     loss=lambda logits, labels: dlr_loss_targeted(logits, labels, target),
                     **budget)
      fooled = state["fooled"] & robust
      result = tf.where(per_example(fooled, x), state["x_fooled"], state["x_best"])
      return k + 1, tf.where(per_example(robust, x), result, x_adv), robust & ~fooled
    index = tf.where(robust)[:, 0]
    x_run, y_run, target = tf.gather(x, index), tf.gather(y, index), tf.gather(target, index)
    state = search(model, x_run, y_run, None, start=tf.gather(start, index),
                   loss=lambda logits, labels: dlr_loss_targeted(logits, labels, target),
                   **budget)
    fooled = state["fooled"]
    result = tf.where(per_example(fooled, x_run), state["x_fooled"], state["x_best"])
    rows = index[:, None]
    return (k + 1, tf.tensor_scatter_nd_update(x_adv, rows, result),
            tf.tensor_scatter_nd_update(robust, rows, ~fooled))

  _, x_adv, _ = tf.while_loop(lambda k, _, robust: (k < count) & tf.reduce_any(robust),
                              one_target, (tf.constant(0), x, robust))
  return tf.stop_gradient(x_adv)


def gathers_subsets() -> bool:
  """Whether attacks traced here run on the gathered still-robust examples only.

  Outside XLA a gathered subset costs only its own examples. XLA pads a
  dynamic batch to its bound, so there the subset saves nothing, and some
  attacks' gradients (FAB's) scatter into shapes XLA must know: under XLA the
  whole batch runs and the results are kept where the examples were still
  robust. Both give the same verdicts; only the random draws of a component
  that draws for the batch it is given can differ.
  """
  return not control_flow_util.GraphOrParentsInXlaContext(ops.get_default_graph())


def check_arguments(*, eps, steps, clip_min, clip_max, norm, rho, first_window="paper"):
  """The static arguments of an APGD attack, checked; a `ValueError` for a bad one."""
  check_budget(eps, clip_min, clip_max)
  if steps < 0 or int(steps) != steps:
    raise ValueError(f"steps must be an integer >= 0, got {steps}")
  if not 0.0 <= rho <= 1.0:
    raise ValueError(f"rho must be in [0, 1], got {rho}")
  check_first_window(first_window)
  return dict(eps=eps, steps=int(steps), clip_min=clip_min, clip_max=clip_max,
              norm=check_norm(norm), rho=rho, first_window=first_window)


def check_first_window(first_window):
  """`first_window` if one of `FIRST_WINDOWS`, else a `ValueError` listing them."""
  if first_window not in FIRST_WINDOWS:
    raise ValueError(f"first_window must be one of {', '.join(FIRST_WINDOWS)}, got "
                     f"{first_window!r}")
  return first_window


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


def random_start(x, eps, norm, seed):
  """A random point on the boundary region of the ball (the reference's start), unclipped."""
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


def _apgd_ce(model, x, y, seed, *, eps, steps, clip_min, clip_max, norm, rho, first_window):
  labels_given = y is not None
  y = attack_labels(model, x, y)
  state = search(model, x, y, seed, eps=eps, steps=steps, clip_min=clip_min,
                 clip_max=clip_max, norm=norm, rho=rho, first_window=first_window)
  x_adv = tf.where(per_example(state["fooled"], x), state["x_fooled"], state["x_best"])
  if labels_given:
    # A clean point that is misclassified already is its own worst case.
    x_adv = tf.where(per_example(misclassified(model(x, training=False), y), x), x, x_adv)
  return tf.stop_gradient(x_adv)


def cross_entropy(logits, y):
  """Per-example cross-entropy [batch] of float32 logits: APGD-CE's loss."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32),
                                                        logits=logits)


def _loss_logits_gradient(model, x, y, loss_fn):
  """(per-example loss [batch], float32 logits, gradient of the summed loss w.r.t. `x`)."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = tf.cast(model(x, training=False), tf.float32)
    loss = loss_fn(logits, y)
    total = tf.reduce_sum(loss)
  return loss, logits, tape.gradient(total, x)


def search(model, x, y, seed, *, eps, steps, clip_min, clip_max, norm, rho, loss=None,
           start=None, first_window="paper"):
  """The APGD iterations as graph code; returns the final state (a dict of tensors).

  Among others: "x_best" and "loss_best" (the highest-loss iterate), "fooled"
  and "x_fooled" (the last misclassified iterate), "step_size" [batch].

  Args:
    loss: `loss(logits, y) -> [batch]`, the per-example loss the search
      increases (float32 logits); None: the cross-entropy (APGD-CE).
    start: the unclipped starting point; None draws it from `seed`
      (`random_start`).
    first_window: "paper": the first step's loss counts as an increase when
      it exceeds the start's loss; "fra31": when it exceeds zero.
  """
  loss_fn = cross_entropy if loss is None else loss
  dtype = x.dtype
  eps_t = tf.cast(eps, dtype)
  first_length, window_decrease, smallest_window = checkpoint_schedule(steps)

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

  if start is None:
    start = random_start(x, eps_t, norm, seed)
  x_start = tf.clip_by_value(start, clip_min, clip_max)
  loss, logits, grad = _loss_logits_gradient(model, x_start, y, loss_fn)
  batch = tf.shape(x)[:1]
  state = dict(
      x_adv=x_start, x_previous=x_start, grad=grad,
      step_size=tf.fill(batch, 2.0 * tf.cast(eps, tf.float32)),
      x_best=x_start, grad_best=grad, loss_best=loss,
      x_fooled=x_start, fooled=misclassified(logits, y),
      loss_previous=loss if check_first_window(first_window) == "paper" else tf.zeros_like(loss),
      increases=tf.zeros(batch, tf.int32),
      since_check=tf.constant(0), window=tf.constant(first_length),
      loss_best_last_check=loss, reduced_last_check=tf.ones(batch, tf.bool))

  def iteration(i, s):
    alpha = tf.where(i > 0, tf.cast(MOMENTUM, dtype), tf.cast(1.0, dtype))
    x_adv = s["x_adv"]
    momentum = x_adv - s["x_previous"]
    step = per_example(tf.cast(s["step_size"], dtype), x)
    z = project(x_adv + step * direction(s["grad"]))
    x_new = project(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * momentum)

    loss, logits, grad = _loss_logits_gradient(model, x_new, y, loss_fn)
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
