"""TRADES and MART: adversarial training objectives with their own inner maximisation.

`--adv_loss` picks the adversarial training objective (`ADV_LOSSES`):

- `pgd_ce` (Madry et al. 2018; the toolkit's default): cross-entropy on
  `--attack`'s examples mixed with the natural loss by `--adv_mix`
  (`steps.adversarial`).
- `trades` (Zhang et al. 2019, yaodongyu/TRADES `trades_loss`):
  `CE(f(x), y) + beta * KL(p(x) || p(x'))`, the KL summed over the classes
  and averaged over the batch, where `x'` maximises that KL: L-infinity PGD
  from `x + 0.001 N(0, 1)`, the model in inference mode, its step ascending
  `sign(grad_x' sum_i KL(p(x_i) || p(x'_i)))` with `p(x)` fixed, each step
  projected onto the eps-ball, then the data range. The outer loss
  differentiates through both distributions of the KL.
- `mart` (Wang et al. 2020, YisenWang/MART `mart_loss`): `x'` from the same
  PGD on the cross-entropy of the true labels; the loss is the boosted
  cross-entropy on `x'`, `CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x'))`,
  plus `beta * mean_i KL(p(x_i) || p(x'_i)) (1.0000001 - p_y(x_i))`. The
  constants (1.0001, 1.0000001 and the `1e-12` inside the logarithms) are the
  released code's.

Both run their own PGD from the budget (`Budget`: `--eps`,
`--pgd_step_size`, `--pgd_steps`, the data range), whatever `--attack` is
(it stays the evaluation attack); `--attack_labels` and `--adv_mix` do not
apply (TRADES attacks no label, MART the true ones; each paper weighs its
terms by `beta` only).

The toolkit's own composition, as for `pgd_ce`: `x'` is crafted once at the
current weights, then one training pass runs over `[x; x']` (a batch-norm
layer sees both halves together, as under `pgd_ce`; the papers' code passes
`x` and `x'` separately), and the objective is written per row of that pass
(`trades_objective`, `mart_objective`), so SAM and the other wrappers of
`robust_sparse.training.steps` wrap it unchanged. The "cross-entropy" of each
paper is the step's own per-example loss (`base`: with label smoothing and
distillation when asked).
"""

import dataclasses
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from robust_sparse.training import distribute

ADV_LOSSES = ("pgd_ce", "trades", "mart")
# Both papers' code starts the inner maximisation at x + START_SCALE * N(0, 1).
START_SCALE = 0.001
# MART's released constants: the margin term's 1.0001 and the logarithms' guard,
# the weight's 1.0000001.
MART_MARGIN = 1.0001
MART_LOG_GUARD = 1e-12
MART_WEIGHT_OFFSET = 1.0000001
# Philox, as `attacks.common.RANDOM_ALGORITHM` (fast under XLA on CPU).
_RANDOM_ALGORITHM = "philox"


@dataclasses.dataclass(frozen=True)
class Budget:
  """The inner maximisation's L-infinity PGD: radius, step length, steps, data range."""
  eps: float
  step_size: float
  steps: int
  clip_min: float = 0.0
  clip_max: float = 1.0


def check(adv_loss: str, trades_beta: float = 6.0, mart_beta: float = 6.0) -> str:
  """Returns `adv_loss` when it and the weights are valid.

  Raises:
    ValueError: an unknown objective or a negative weight (one line, naming the flag).
  """
  if adv_loss not in ADV_LOSSES:
    raise ValueError(f"unknown --adv_loss={adv_loss!r}; known: {', '.join(ADV_LOSSES)}")
  if trades_beta < 0:
    raise ValueError(f"--trades_beta must be >= 0, got {trades_beta}")
  if mart_beta < 0:
    raise ValueError(f"--mart_beta must be >= 0, got {mart_beta}")
  return adv_loss


def as_budget(budget) -> Budget:
  """A `Budget` from any object with `eps`, `step_size`, `steps` (and optionally
  `clip_min`, `clip_max`, `norm`), e.g. the run's `attacks.AttackConfig`.

  Raises:
    ValueError: a negative radius, step or step count, or a norm other than L-infinity.
  """
  norm = getattr(budget, "norm", np.inf)
  if norm != np.inf:
    raise ValueError(f"TRADES and MART train against L-infinity PGD; got norm={norm}")
  result = Budget(eps=float(budget.eps), step_size=float(budget.step_size),
                  steps=int(budget.steps), clip_min=float(getattr(budget, "clip_min", 0.0)),
                  clip_max=float(getattr(budget, "clip_max", 1.0)))
  if result.eps < 0 or result.step_size < 0 or result.steps < 0:
    raise ValueError(f"--eps, --pgd_step_size and --pgd_steps must be >= 0, got {result.eps}, "
                     f"{result.step_size}, {result.steps}")
  return result


def _int_labels(y):
  """Int labels [N]: `y`, or the arg-max of soft labels (MixUp's dominant image)."""
  if y.dtype.is_integer:
    return tf.cast(y, tf.int32)
  return tf.argmax(y, -1, output_type=tf.int32)


def start_noise(x, seed):
  """`START_SCALE * N(0, 1)` of `x`'s shape from a `[2]` stateless seed."""
  draw = lambda shape, seed: tf.random.stateless_normal(  # noqa: E731
      shape, seed=seed, dtype=x.dtype, alg=_RANDOM_ALGORITHM)
  return START_SCALE * distribute.per_example_draw(draw, tf.shape(x), seed)


def _logits(model, x):
  return tf.cast(model(x, training=False), tf.float32)


def kl_divergence(p_logits, q_logits):
  """KL(softmax(p) || softmax(q)) per example [N], summed over the classes."""
  log_p = tf.nn.log_softmax(p_logits)
  return tf.reduce_sum(tf.exp(log_p) * (log_p - tf.nn.log_softmax(q_logits)), -1)


def _ascend(x, x_adv, gradient: Callable, budget: Budget):
  """L-infinity PGD from `x_adv`: `steps` signed steps of `gradient(x_adv)`, each
  projected onto the eps-ball around `x`, then clipped to the data range (the
  papers' order); the result clipped once more (for zero steps)."""
  eps = tf.cast(budget.eps, x.dtype)
  step_size = tf.cast(budget.step_size, x.dtype)

  def step(i, x_adv):
    x_adv = x_adv + step_size * tf.sign(gradient(x_adv))
    x_adv = tf.minimum(tf.maximum(x_adv, x - eps), x + eps)
    return i + 1, tf.clip_by_value(x_adv, budget.clip_min, budget.clip_max)

  _, x_adv = tf.while_loop(lambda i, _: i < budget.steps, step, (tf.constant(0), x_adv))
  return tf.stop_gradient(tf.clip_by_value(x_adv, budget.clip_min, budget.clip_max))


def trades_perturbation(model, x, seed, budget: Budget, noise=None):
  """TRADES' inner maximisation: `x'` maximising `sum_i KL(p(x_i) || p(x'_i))`.

  Args:
    model: logits of a batch; called in inference mode.
    x: the natural batch [N, ...].
    seed: a `[2]` stateless seed of the start (`start_noise`).
    budget: the PGD's `Budget`.
    noise: the start's offset from `x` (default `start_noise(x, seed)`), for
      comparisons that inject the same start into another implementation.

  Returns:
    `x'`, shaped as `x`, within `budget.eps` of it (L-infinity) and the data range.
  """
  if noise is None:
    noise = start_noise(x, seed)
  natural = tf.stop_gradient(tf.nn.softmax(_logits(model, x)))

  def gradient(x_adv):
    with tf.GradientTape() as tape:
      tape.watch(x_adv)
      # The cross-entropy against p(x): the KL less p(x)'s entropy, a constant
      # here, and its logits' gradient (softmax - p) is the exact difference.
      kl = tf.nn.softmax_cross_entropy_with_logits(labels=natural,
                                                   logits=_logits(model, x_adv))
      total = tf.reduce_sum(kl)
    return tape.gradient(total, x_adv)

  return _ascend(x, x + noise, gradient, budget)


def mart_perturbation(model, x, y, seed, budget: Budget, noise=None):
  """MART's inner maximisation: PGD on the cross-entropy of the true labels `y`
  from `x + noise` (arguments as `trades_perturbation`)."""
  if noise is None:
    noise = start_noise(x, seed)
  labels = _int_labels(y)

  def gradient(x_adv):
    with tf.GradientTape() as tape:
      tape.watch(x_adv)
      # Summed, not averaged, so small gradients keep their sign (as `attacks.pgd`).
      total = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels=labels, logits=_logits(model, x_adv)))
    return tape.gradient(total, x_adv)

  return _ascend(x, x + noise, gradient, budget)


def _halves(x, y, logits):
  half = lambda t: tf.split(t, 2)  # noqa: E731
  (x_nat, x_adv), (y_nat, _), (nat, adv) = half(x), half(y), half(tf.cast(logits, tf.float32))
  return x_nat, x_adv, y_nat, nat, adv


def trades_objective(base: Callable, beta: float):
  """TRADES' loss per row of a `[x; x']` pass: `base` on the natural half,
  `beta * KL(p(x) || p(x'))` on the adversarial half, so that the step's
  `sum(weight * rows)` with each example's weight on both of its rows is
  `mean CE(f(x), y) + beta * mean KL` (the paper's batchmean).

  Args:
    base: the per-example loss `(x, y, logits) -> [N]` (the step's cross-entropy).
    beta: the KL's weight (`--trades_beta`).

  Returns:
    `loss(x, y, logits) -> [2N]` for the doubled batch.
  """

  def loss(x, y, logits):
    x_nat, _, y_nat, nat, adv = _halves(x, y, logits)
    return tf.concat([base(x_nat, y_nat, nat), beta * kl_divergence(nat, adv)], 0)

  return loss


def mart_objective(base: Callable, beta: float):
  """MART's loss per row of a `[x; x']` pass: `beta * KL(p(x) || p(x')) (1.0000001
  - p_y(x))` on the natural half, the boosted cross-entropy `base(x', y) -
  log(1.0001 - max_{k != y} p_k(x'))` on the adversarial half (the sums as
  `trades_objective`'s). `y` as int labels or soft ones (then the margin and
  the weight use their arg-max)."""

  def loss(x, y, logits):
    _, x_adv, y_nat, nat, adv = _halves(x, y, logits)
    labels = _int_labels(y_nat)
    classes = tf.shape(adv)[-1]
    adv_probs = tf.nn.softmax(adv)
    true = tf.equal(tf.range(classes)[None, :], labels[:, None])
    # The most probable wrong class (the code's second-largest-unless-not-y rule).
    wrong = tf.argmax(tf.where(true, tf.constant(-np.inf, adv.dtype), adv), -1,
                      output_type=tf.int32)
    margin = -tf.math.log(MART_MARGIN - tf.gather(adv_probs, wrong, batch_dims=1)
                          + MART_LOG_GUARD)
    nat_probs = tf.nn.softmax(nat)
    kl = tf.reduce_sum(nat_probs * (tf.nn.log_softmax(nat)
                                    - tf.math.log(adv_probs + MART_LOG_GUARD)), -1)
    weight = MART_WEIGHT_OFFSET - tf.gather(nat_probs, labels, batch_dims=1)
    return tf.concat([beta * kl * weight, base(x_adv, y_nat, adv) + margin], 0)

  return loss


def objective(adv_loss: str, base: Callable, *, trades_beta: float = 6.0,
              mart_beta: float = 6.0) -> Callable:
  """The per-row loss of `adv_loss` ("trades" or "mart") over `base`."""
  if adv_loss == "trades":
    return trades_objective(base, trades_beta)
  if adv_loss == "mart":
    return mart_objective(base, mart_beta)
  raise ValueError(f"--adv_loss={adv_loss!r} has no paired objective (trades, mart)")


def perturbation(adv_loss: str, budget: Budget) -> Callable:
  """`perturb(model, x, y, seed) -> x'`: the inner maximisation of `adv_loss`."""
  if adv_loss == "trades":
    return lambda model, x, y, seed: trades_perturbation(model, x, seed, budget)
  if adv_loss == "mart":
    return lambda model, x, y, seed: mart_perturbation(model, x, y, seed, budget)
  raise ValueError(f"--adv_loss={adv_loss!r} has no inner maximisation of its own")


def paired(inner, model, perturb: Callable, metric_loss: Callable):
  """Wraps the `LossGradFn` `inner` (whose loss is a paired objective) into the
  adversarial step: crafts `x' = perturb(model, x, y, seed)` at the current
  weights, then runs `inner` once over `[x; x']` with each example's weight on
  both of its rows.

  `aux` as `steps.adversarial`'s: `logits` / `adv_logits` of each half, and
  `per_example` / `adv_per_example` the `metric_loss` (the step's
  cross-entropy) of each half, so the logged `nat_loss` and `adv_loss` mean
  what they mean under `pgd_ce`; `objective` is the paper's loss.
  """

  def fn(trainable, non_trainable, batch):
    x_adv = tf.stop_gradient(perturb(model, batch["x"], batch["y"], batch["seed"]))
    doubled = dict(batch, x=tf.concat([batch["x"], x_adv], 0),
                   y=tf.concat([batch["y"], batch["y"]], 0),
                   weight=tf.concat([batch["weight"], batch["weight"]], 0))
    grads, new_non_trainable, aux = inner(trainable, non_trainable, doubled)
    nat_logits, adv_logits = tf.split(aux["logits"], 2)
    aux = dict(aux, logits=nat_logits, adv_logits=adv_logits,
               per_example=tf.stop_gradient(metric_loss(batch["x"], batch["y"], nat_logits)),
               adv_per_example=tf.stop_gradient(metric_loss(x_adv, batch["y"], adv_logits)))
    return grads, new_non_trainable, aux

  return fn


def loss_grad_fn(inner_of: Callable, model, base: Callable, adv_loss: str, budget,
                 *, trades_beta: float = 6.0, mart_beta: float = 6.0,
                 wrap: Optional[Callable] = None):
  """The TRADES or MART `LossGradFn`: `paired(wrap(inner_of(objective)))`.

  Args:
    inner_of: `loss -> LossGradFn` (e.g. a partial of `steps.loss_and_gradients`).
    model: the model trained.
    base: the step's per-example cross-entropy `(x, y, logits) -> [N]`.
    adv_loss: "trades" or "mart".
    budget: the inner PGD's budget (`as_budget` takes an `AttackConfig` too).
    trades_beta, mart_beta: the KL terms' weights.
    wrap: `LossGradFn -> LossGradFn` inside the adversarial wrapper (a
      sharpness wrapper), or None.
  """
  check(adv_loss, trades_beta, mart_beta)
  budget = as_budget(budget)
  fn = inner_of(objective(adv_loss, base, trades_beta=trades_beta, mart_beta=mart_beta))
  if wrap is not None:
    fn = wrap(fn)
  return paired(fn, model, perturbation(adv_loss, budget), base)
