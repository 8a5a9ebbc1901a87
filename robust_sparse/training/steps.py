"""The step library: training steps composed from small functions over tensors.

A training step is built in layers, each adding one idea (google-research/sam's
functional steps, in Keras 3 terms):

1. a per-example loss, `loss(x, y, logits) -> [N]`: `cross_entropy`, optionally
   wrapped by `distillation`;
2. a loss-and-gradients function, `LossGradFn(trainable, non_trainable, batch)
   -> (grads, new_non_trainable, aux)`, computed with `model.stateless_call` on
   tensors, so that a wrapper can evaluate the model at other weights (SAM's
   `w + e`) or throw a pass's batch-norm statistics away without touching the
   variables. `loss_and_gradients` is the base; `adversarial` wraps one (crafts
   `x_adv` once and trains on both halves in one pass; TRADES and MART are
   `adversarial_losses.paired` with their own inner maximisation); the
   sharpness wrappers (SAM, SSAM) wrap one too;
3. `make_train_step`, which applies the gradients through optimizer groups
   (each a set of variables with its own optimizer and learning-rate schedule),
   after clipping and, under mixed precision, dynamic loss scaling.

A `batch` is a dict: `x`, `y`, `weight` (per example; the objective is
`sum(weight * loss)`, so mixing losses is re-weighting examples) and `seed`
(a `[2]` stateless seed for the attack). Masks hold in every piece: masked
layers compute with `kernel * mask`, so a pruned weight contributes nothing and
gets a zero gradient, and the masked layers' kernel constraint re-zeroes it
after every optimizer update (weight decay, momentum). A step built with
`masks_hold=True` skips both masking passes (see `robust_sparse.nn.layers.
masks_hold`); a wrapper that uses gradient values across weights (a norm, as
SAM's perturbation does) must then mask them itself with
`layers.mask_gradients`.
"""

import contextlib
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from robust_sparse.core.streams import Stream
from robust_sparse.training import adversarial_losses, distribute
from robust_sparse.nn import layers as layers_lib
from robust_sparse.training.optimizers import AdamL2, TorchSGD

METRICS = ("loss", "acc", "adv_acc", "nat_loss", "adv_loss", "top5")


def stream_seed(seed, iteration, stream, index=0):
  """A stateless seed, a pure function of (run seed, iteration, stream, index).

  Streams: 0 training attack, 1 validation attack, 2 test attack, 3 augmentation,
  4 training-batch preparation, 5 / 6 validation / test-batch preparation, 7 the
  preparation of the sharpness set.
  """
  # Streams 0-3 keep the original encoding (seed * 4 + stream), so runs made
  # before streams 4-7 existed draw the same numbers; 4-7 use the negative
  # numbers, which no (seed >= 0, stream < 4) pair reaches.
  stream = tf.cast(stream, tf.int64)
  base = tf.cast(seed, tf.int64) * 4 + stream % 4
  first = tf.where(stream < 4, base, -base - 1)
  return tf.stack([first, tf.cast(iteration, tf.int64) * 100003 + tf.cast(index, tf.int64)])


# ---- per-example losses ------------------------------------------------------------
def as_targets(y, num_classes: int):
  """Labels as float targets [N, num_classes]: one-hot for int labels, soft ones as given.

  Soft labels come from label-mixing augmentations (MixUp, CutMix).
  """
  if y.dtype.is_integer:
    return tf.one_hot(y, num_classes)
  return tf.cast(y, tf.float32)


def hard_labels(y):
  """Int labels [N]: `y` itself, or the arg-max of soft labels (the dominant image)."""
  if y.dtype.is_integer:
    return tf.cast(y, tf.int32)
  return tf.argmax(y, -1, output_type=tf.int32)


def cross_entropy(num_classes: int, label_smoothing: float = 0.0):
  """Softmax cross-entropy per example, with optional label smoothing (float32).

  `y` is int labels [N] or soft labels [N, num_classes].
  """

  def loss(x, y, logits):
    del x
    labels = as_targets(y, num_classes)
    if label_smoothing:
      labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    return tf.nn.softmax_cross_entropy_with_logits(labels=labels,
                                                   logits=tf.cast(logits, tf.float32))

  return loss


def distillation(loss, teacher: keras.Model, temperature: float):
  """Wraps `loss` with knowledge distillation from `teacher` (AutoReP's `--distil`).

  `loss + T^2 * KL(softmax(t/T) || softmax(s/T))`, the teacher evaluated in
  inference mode on the same inputs (both halves under adversarial training).
  """

  def wrapped(x, y, logits):
    teacher_logits = tf.stop_gradient(tf.cast(teacher(x, training=False), tf.float32))
    t = tf.nn.log_softmax(teacher_logits / temperature)
    s = tf.nn.log_softmax(tf.cast(logits, tf.float32) / temperature)
    kl = tf.reduce_sum(tf.exp(t) * (t - s), axis=-1)
    return loss(x, y, logits) + temperature ** 2 * kl

  return wrapped


# ---- loss scaling --------------------------------------------------------------------
class LossScale:
  """Dynamic loss scaling for float16 compute (as Keras' LossScaleOptimizer).

  The objective is multiplied by `scale` before differentiation and the
  gradients divided by it, so small float16 gradients do not underflow. A step
  whose gradients are not finite is skipped and halves the scale; after
  `growth_interval` finite steps in a row the scale doubles.
  """

  def __init__(self, initial_scale: float = 2.0 ** 15, growth_interval: int = 2000):
    self.scale = tf.Variable(initial_scale, dtype=tf.float32, trainable=False,
                             name="loss_scale")
    self.good_steps = tf.Variable(0, dtype=tf.int64, trainable=False,
                                  name="loss_scale_good_steps")
    self.growth_interval = growth_interval

  @property
  def variables(self):
    return [self.scale, self.good_steps]

  def update(self, finite):
    grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
    self.scale.assign(tf.where(finite, tf.where(grow, self.scale * 2.0, self.scale),
                               self.scale / 2.0))
    self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)),
                                    self.good_steps + 1, tf.zeros_like(self.good_steps)))


# ---- loss-and-gradients functions ---------------------------------------------------
def _reorder(source, target):
  """Positions in `source` of `target`'s variables (the same objects, another order)."""
  where = {id(v): i for i, v in enumerate(source)}
  return [where[id(v)] for v in target]


def loss_and_gradients(model: keras.Model, loss, loss_scale: Optional[LossScale] = None,
                       taps: Optional[keras.Model] = None,
                       tap_gradients: Optional[Sequence[int]] = None):
  """The base `LossGradFn`: one forward pass on `batch["x"]` at the given weights.

  The objective is `sum(batch["weight"] * loss) + sum(model losses)` (e.g. the
  L1 penalty). `aux` holds `logits`, `per_example` losses and `objective`
  (without the regularisation).

  Args:
    taps: a weight-sharing model whose outputs are `[logits] + taps` (e.g.
      `robust_sparse.measure.saturation.tap_model(model)`): the pass runs through it,
      and `aux["taps"]` holds the tapped outputs, so measurements need no
      second forward pass.
    tap_gradients: indices into the taps (`outputs[1:]`) whose gradients of
      the objective (the total the weights' gradients are of, loss scale
      divided out) go to `aux["tap_gradients"]`, in this order, taken from
      the same tape (no second pass). Default: the tap model's
      `gradient_taps` attribute, so a measurement can ask for them without
      changing how the step is composed; none without it.

  Raises:
    ValueError: `tap_gradients` without a tap model, or a tap the objective
      does not depend on (at trace time).
  """
  if tap_gradients is None:
    tap_gradients = getattr(taps, "gradient_taps", None)
  tap_gradients = tuple(int(i) for i in tap_gradients or ())
  if tap_gradients and taps is None:
    raise ValueError(f"tap_gradients={tap_gradients} needs a tap model (taps=)")
  if taps is not None:
    trainable_order = _reorder(model.trainable_variables, taps.trainable_variables)
    non_trainable_order = _reorder(model.non_trainable_variables,
                                   taps.non_trainable_variables)
    back = _reorder(taps.non_trainable_variables, model.non_trainable_variables)

  def forward(trainable, non_trainable, x):
    if taps is None:
      logits, new, losses = model.stateless_call(trainable, non_trainable, x, training=True,
                                                 return_losses=True)
      return logits, new, losses, None
    outputs, new, losses = taps.stateless_call(
        [trainable[i] for i in trainable_order], [non_trainable[i] for i in non_trainable_order],
        x, training=True, return_losses=True)
    return outputs[0], [new[i] for i in back], losses, list(outputs[1:])

  def fn(trainable, non_trainable, batch):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      logits, new_non_trainable, losses, tapped = forward(trainable, non_trainable, batch["x"])
      per_example = loss(batch["x"], batch["y"], logits)
      objective = tf.reduce_sum(batch["weight"] * per_example)
      total = objective + distribute.replica_share(
          tf.add_n([tf.constant(0.0)] + [tf.cast(l, tf.float32) for l in losses]))
      if loss_scale is not None:
        total = total * loss_scale.scale
    if tap_gradients:
      grads, at_taps = tape.gradient(total, (trainable, [tapped[i] for i in tap_gradients]))
      unconnected = [i for i, g in zip(tap_gradients, at_taps) if g is None]
      if unconnected:
        raise ValueError(f"taps {unconnected} of {taps.name!r} do not reach the objective, "
                         "so they have no gradient")
    else:
      grads, at_taps = tape.gradient(total, trainable), []
    if loss_scale is not None:
      grads = [None if g is None else g / tf.cast(loss_scale.scale, g.dtype) for g in grads]
      at_taps = [g / tf.cast(loss_scale.scale, g.dtype) for g in at_taps]
    aux = dict(logits=logits, per_example=per_example, objective=objective)
    if tapped is not None:
      aux["taps"] = [tf.stop_gradient(t) for t in tapped]
    if tap_gradients:
      aux["tap_gradients"] = [tf.stop_gradient(g) for g in at_taps]
    return grads, new_non_trainable, aux

  return fn


def adversarial(inner, model: keras.Model, attack: Callable, mix: float):
  """Adversarial training: `(1 - mix) * loss(x) + mix * loss(x_adv)`.

  `x_adv = attack(model, x, y, seed)` (hard labels) is crafted once, at the current
  weights, with the model in inference mode; then `inner` runs one pass over
  `[x; x_adv]` (faster, and stateful layers see one training step, not two).
  Wrapping a sharpness wrapper keeps both of its passes on the same `x_adv`.
  """

  def fn(trainable, non_trainable, batch):
    x_adv = tf.stop_gradient(attack(model, batch["x"], hard_labels(batch["y"]),
                                    batch["seed"]))
    doubled = dict(batch, x=tf.concat([batch["x"], x_adv], 0),
                   y=tf.concat([batch["y"], batch["y"]], 0),
                   weight=tf.concat([(1.0 - mix) * batch["weight"],
                                     mix * batch["weight"]], 0))
    grads, new_non_trainable, aux = inner(trainable, non_trainable, doubled)
    nat_logits, adv_logits = tf.split(aux["logits"], 2)
    nat_losses, adv_losses = tf.split(aux["per_example"], 2)
    aux = dict(aux, logits=nat_logits, adv_logits=adv_logits,
               per_example=nat_losses, adv_per_example=adv_losses)
    return grads, new_non_trainable, aux

  return fn


def penalized(inner, penalty: Callable, name: str = "penalty"):
  """Adds `penalty(trainable) -> scalar` to `inner`'s objective.

  The penalty depends on the weights only (not on the batch), e.g. AutoReP's
  ReLU-density penalty on the mask logits, so its gradient is taken
  separately and added to `inner`'s. `aux[name]` holds its value.
  """

  def fn(trainable, non_trainable, batch):
    grads, new_non_trainable, aux = inner(trainable, non_trainable, batch)
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      value = tf.cast(penalty(trainable), tf.float32)
      # Each replica adds its share: the all-reduce sums the replicas' gradients.
      share = distribute.replica_share(value)
    extra = tape.gradient(share, trainable)
    grads = [e if g is None else (g if e is None else g + tf.cast(e, g.dtype))
             for g, e in zip(grads, extra)]
    return grads, new_non_trainable, dict(aux, **{name: value})

  return fn


# ---- the update ------------------------------------------------------------------------
@dataclasses.dataclass
class OptimizerGroup:
  """Variables selected by `predicate`, updated by `optimizer` at `schedule(iteration)`.

  Attributes:
    name: names the group in logs (`lr_<name>`) and checkpoints.
    optimizer: a Keras optimizer whose `learning_rate` is a variable.
    schedule: `iteration -> learning rate`, or None to keep the optimizer's rate.
    predicate: `variable -> bool`; every trainable variable must belong to
      exactly one group, or to none (then it is frozen).
    loss_grad_fn: this group's own objective. When any group has one, the
      step updates the groups one after another (alternating optimisation),
      each from its own forward and backward pass at the values the groups
      before it left (AutoReP: an Adam step on the ReLU-mask logits with the
      density penalty, then a second pass and an SGD step on the weights).
      None: the step's `loss_grad_fn`.
  """
  name: str
  optimizer: keras.optimizers.Optimizer
  schedule: Optional[Callable] = None
  predicate: Callable = lambda variable: True
  loss_grad_fn: Optional[Callable] = None


def partition(groups: Sequence[OptimizerGroup], variables) -> List[List[int]]:
  """Indices of `variables` per group, checking that no variable is in two groups.

  Raises:
    ValueError: a variable selected by two groups.
  """
  owners = {}
  indices = []
  for group in groups:
    mine = []
    for i, variable in enumerate(variables):
      if group.predicate(variable):
        if i in owners:
          raise ValueError(f"variable {variable.path} is in optimizer groups "
                           f"{owners[i]!r} and {group.name!r}")
        owners[i] = group.name
        mine.append(i)
    indices.append(mine)
  return indices


def build_groups(groups: Sequence[OptimizerGroup], variables):
  """Builds each group's optimizer on its variables (creates the slots)."""
  for group, mine in zip(groups, partition(groups, variables)):
    group.optimizer.build([variables[i] for i in mine])


def learning_rates(groups: Sequence[OptimizerGroup], iteration) -> Dict[str, tf.Tensor]:
  """Each group's learning rate at `iteration` (its schedule, else its optimizer's)."""
  rates = {}
  for group in groups:
    if group.schedule is not None:
      rates[group.name] = tf.cast(group.schedule(iteration), tf.float32)
    else:
      rates[group.name] = tf.cast(tf.convert_to_tensor(group.optimizer.learning_rate),
                                  tf.float32)
  return rates


def global_norm_clip(grads, clip_norm: Optional[float]):
  if not clip_norm:
    return grads
  clipped, _ = tf.clip_by_global_norm(grads, clip_norm)
  return clipped


def _correct(logits, y):
  return tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), hard_labels(y)),
                 tf.float32)


def _top5(logits, y):
  return tf.cast(tf.math.in_top_k(hard_labels(y), tf.cast(logits, tf.float32), 5),
                 tf.float32)


# Optimizers whose update of a weight reads only that weight's own gradient and
# slots, so an update that the mask constraint then wipes changes nothing else.
ELEMENTWISE_OPTIMIZERS = (
    TorchSGD, AdamL2, keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW,
    keras.optimizers.Adamax, keras.optimizers.Nadam, keras.optimizers.RMSprop,
    keras.optimizers.Adagrad, keras.optimizers.Adadelta, keras.optimizers.Lion,
    keras.optimizers.Ftrl)


def is_elementwise(optimizer) -> bool:
  """True when `optimizer` updates each weight from its own gradient alone."""
  return (type(optimizer) in ELEMENTWISE_OPTIMIZERS and optimizer.clipnorm is None
          and optimizer.global_clipnorm is None)


def make_train_step(model: keras.Model, loss_grad_fn, groups: Sequence[OptimizerGroup], *,
                    grad_clip_norm: Optional[float] = None,
                    loss_scale: Optional[LossScale] = None,
                    augment: Optional[Callable] = None,
                    prepare: Optional[Callable] = None, top5: bool = False,
                    masks_hold: bool = False, on_taps: Optional[Callable] = None,
                    distribution: Optional[distribute.Distribution] = None,
                    replica_jit_compile: bool = False):
  """One training step: `step(x, y, seed, iteration) -> {metric: scalar}`.

  Applies the data set's `prepare(x, seed) -> x` (resizing, random
  positioning; `Stream.TRAIN_PREPARE`), then `augment(x, y, seed) -> (x, y)`
  (`Stream.AUGMENT`; `y` may come back as soft labels [N, classes], e.g. from MixUp), calls
  `loss_grad_fn` on the model's current values (attack seed: `Stream.TRAIN_ATTACK`),
  writes the new non-trainable values (batch-norm statistics) back, clips,
  and applies each group's gradients at its scheduled learning rate. When a
  group has its own `loss_grad_fn`, the groups are updated in order, each
  after its own pass (see `OptimizerGroup`). Metrics are `METRICS`: `loss` is the training
  objective without regularisation, `acc`/`nat_loss` on the natural half,
  `adv_acc`/`adv_loss` on the adversarial half (NaN without one), `top5` (NaN
  unless `top5`).

  `masks_hold=True` is the caller's promise that every masked kernel is zero
  where its mask is when the step starts (the engine calls
  `layers.enforce_masks` before each chunk; the constraint keeps it after each
  update). The step then traces the model inside `layers.masks_hold()`, and
  masks the kernel gradients only where their values reach other weights:
  global-norm clipping, the loss-scale finiteness check, or an optimizer that
  is not element-wise. The weights are the same as without the promise.

  `on_taps(outputs)` receives the tapped layer outputs of the natural
  examples of the batch when the loss-and-gradients function returns
  `aux["taps"]` (see `loss_and_gradients`), followed by the gradients at the
  taps when it also returns `aux["tap_gradients"]` (natural examples too).

  With a `distribution` (`robust_sparse.training.distribute`; the variables and
  optimizers created in its scope), `x`, `y` are the global batch: it is
  prepared and augmented whole, then each replica runs the rest on its even
  shard, weighting its examples by 1 / global batch; the gradients are summed
  over the replicas once, before clipping (so the update is the
  single-device one), changed non-trainable values (batch-norm statistics)
  averaged, and the metrics summed. The batch size must be divisible by the
  replicas. `replica_jit_compile`: each replica's pass (attack, forward and
  backward) is XLA-compiled (see `distribute.compile_on_replica`).
  """
  trainable = model.trainable_variables
  non_trainable = model.non_trainable_variables
  indices = partition(groups, trainable)
  build_groups(groups, trainable)
  if distribution is not None:
    for group in groups:
      distribute.take_reduced_gradients(group.optimizer)
  mask_grads = masks_hold and (grad_clip_norm is not None or loss_scale is not None or
                               not all(is_elementwise(g.optimizer) for g in groups))

  sequential = any(group.loss_grad_fn is not None for group in groups)

  def gradients(fn, batch):
    """One pass at the variables' current values; writes the new non-trainable values."""
    with layers_lib.masks_hold() if masks_hold else contextlib.nullcontext():
      current = [tf.convert_to_tensor(v.value) for v in non_trainable]
      values = [tf.convert_to_tensor(v.value) for v in trainable]
      if distribution is None:
        grads, new_non_trainable, aux = fn(values, current, batch)
      else:
        grads, new_non_trainable, aux = _replica_pass(fn, replica_jit_compile)(
            values, current, batch)
    if distribution is not None:
      grads = distribute.all_reduce_sum(grads)
      new_non_trainable = _mean_of_changed(current, new_non_trainable)
    if mask_grads:
      grads = layers_lib.mask_gradients(model, trainable, grads)
    for variable, value in zip(non_trainable, new_non_trainable):
      if value is not None:
        variable.assign(value)
    return global_norm_clip(grads, grad_clip_norm), aux

  def update(chosen, grads, rates):
    """Applies `grads` to the variables of the groups `chosen` (indices)."""

    def apply():
      for g in chosen:
        group, mine = groups[g], indices[g]
        if group.schedule is not None:
          group.optimizer.learning_rate.assign(rates[group.name])
        pairs = [(grads[i], trainable[i]) for i in mine if grads[i] is not None]
        if pairs:
          group.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
      return tf.constant(True)

    if loss_scale is None:
      apply()
    else:
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                              for g in grads if g is not None])
      tf.cond(finite, apply, lambda: tf.constant(False))
      loss_scale.update(finite)

  def step(x, y, seed, iteration):
    if prepare is not None:
      x = prepare(x, stream_seed(seed, iteration, Stream.TRAIN_PREPARE))
    if augment is not None:
      x, y = augment(x, y, stream_seed(seed, iteration, Stream.AUGMENT))
    if distribution is None:
      batch_size = tf.shape(y)[0]
      return replica_step(x, y, seed, iteration,
                          tf.fill([batch_size], 1.0 / tf.cast(batch_size, tf.float32)))
    global_size = tf.shape(y)[0]

    def on_replica(x, y, seed, iteration):
      weight = tf.fill([tf.shape(y)[0]], 1.0 / tf.cast(global_size, tf.float32))
      return replica_step(x, y, seed, iteration, weight)

    stats = distribution.run_sharded(on_replica, (x, y), tf.convert_to_tensor(seed),
                                     tf.convert_to_tensor(iteration))
    rates = distribution.first({k: v for k, v in stats.items() if k.startswith("lr/")})
    sums = distribution.sum({k: v for k, v in stats.items() if not k.startswith("lr/")})
    return dict(sums, **rates)

  def replica_step(x, y, seed, iteration, weight):
    """The step on (a replica's shard of) the prepared batch; `weight` per example."""
    batch_size = tf.shape(y)[0]
    batch = dict(x=x, y=y, weight=weight, seed=stream_seed(seed, iteration, Stream.TRAIN_ATTACK))
    rates = learning_rates(groups, iteration)
    if sequential:
      # Metrics come from the last pass (the weights' objective, as AutoReP logs).
      for g, group in enumerate(groups):
        grads, aux = gradients(group.loss_grad_fn or loss_grad_fn, batch)
        update([g], grads, rates)
    else:
      grads, aux = gradients(loss_grad_fn, batch)
      update(range(len(groups)), grads, rates)
    if on_taps is not None and "taps" in aux:
      # The natural half: adversarial training passes [x; x_adv] at once.
      on_taps([t[:batch_size] for t in aux["taps"]]
              + [g[:batch_size] for g in aux.get("tap_gradients", ())])

    nan = tf.constant(np.nan, tf.float32)
    if distribution is None:
      mean = tf.reduce_mean
    else:  # This shard's part of the global mean; the replicas' parts are summed.
      mean = lambda values: tf.reduce_sum(values * weight)
    nat_loss = mean(aux["per_example"])
    stats = dict(loss=aux["objective"], acc=mean(_correct(aux["logits"], y)),
                 adv_acc=nan, nat_loss=nat_loss, adv_loss=nan, top5=nan)
    if "adv_logits" in aux:
      stats["adv_acc"] = mean(_correct(aux["adv_logits"], y))
      stats["adv_loss"] = mean(aux["adv_per_example"])
    if top5:
      stats["top5"] = mean(_top5(aux["logits"], y))
    for name, rate in rates.items():
      stats[f"lr/{name}"] = rate
    return stats

  return step


def _replica_pass(fn, jit_compile: bool):
  """The `LossGradFn` `fn` for a replica, compiled there when `jit_compile`; new
  non-trainable values the pass did not change come back as the given tensors."""
  changed = []

  def changed_only(trainable, non_trainable, batch):
    grads, new, aux = fn(trainable, non_trainable, batch)
    changed[:] = [n is not c for n, c in zip(new, non_trainable)]
    return grads, [n for n, c in zip(new, changed) if c], aux

  def call(trainable, non_trainable, batch):
    grads, new, aux = distribute.compile_on_replica(changed_only, jit_compile)(
        trainable, non_trainable, batch)
    new = iter(new)
    return grads, [next(new) if c else v for c, v in zip(changed, non_trainable)], aux

  return call


def _mean_of_changed(current, new):
  """Replica means of the float values in `new` that a pass changed (batch-norm
  statistics), so the replicas keep one value; None where unchanged (masks)."""
  changed = [i for i, (c, n) in enumerate(zip(current, new))
             if n is not c and n.dtype.is_floating]
  out = [None if n is c else n for c, n in zip(current, new)]
  for i, value in zip(changed, distribute.all_reduce_mean([new[i] for i in changed])):
    out[i] = value
  return out


# The sums of one evaluation batch, by name (`evaluation_sums`' keys before the
# evaluation attacks' `adv_acc_<name>`).
EVAL_SUMS = ("nat_loss", "acc", "adv_acc", "adv_loss", "top5")


def evaluation_sums(model: keras.Model, attack: Callable, x, y, seed, top5: bool = False,
                    taps: Optional[keras.Model] = None, on_taps: Optional[Callable] = None,
                    eval_attacks: Optional[Dict[str, Callable]] = None) -> Dict[str, tf.Tensor]:
  """Sums over one evaluation batch, by name: `EVAL_SUMS` (natural loss, correct,
  adversarially correct, adversarial loss, top-5 correct), then `adv_acc_<name>`,
  the robust count of each attack of `eval_attacks` ({name: attack}, in order).

  Evaluation losses use plain labels; the attack runs at `seed` (and is given
  the labels; see `attacks.make_attack`); with an attack of the true labels
  (`attack.labels == "true"`) a misclassified clean example never counts as
  adversarially correct. Without an attack (None) the
  adversarial sums are NaN. With a tap model (see `loss_and_gradients`), the
  natural pass runs through it and `on_taps` receives the tapped outputs. An
  example is robust to an attack of `eval_attacks` when both it and the
  attack's example are classified correctly (robust accuracy as RobustBench
  counts it); attack k runs at seed + k + 1.
  """
  if taps is None:
    logits = model(x, training=False)
  else:
    outputs = taps(x, training=False)
    logits = outputs[0]
    on_taps(list(outputs[1:]))
  logits = tf.cast(logits, tf.float32)
  num_classes = tf.shape(logits)[-1]
  labels = tf.one_hot(y, num_classes)
  nat = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
  sums = dict(nat_loss=tf.reduce_sum(nat), acc=tf.reduce_sum(_correct(logits, y)))
  if attack is None:
    sums["adv_acc"] = sums["adv_loss"] = tf.constant(np.nan, tf.float32)
  else:
    x_adv = attack(model, x, y, seed)
    adv_logits = tf.cast(model(x_adv, training=False), tf.float32)
    adv = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=adv_logits)
    adv_correct = _correct(adv_logits, y)
    if getattr(attack, "labels", "predicted") == "true":  # Robust accuracy: clean correct too.
      adv_correct *= _correct(logits, y)
    sums["adv_acc"], sums["adv_loss"] = tf.reduce_sum(adv_correct), tf.reduce_sum(adv)
  sums["top5"] = tf.reduce_sum(_top5(logits, y)) if top5 else tf.constant(0.0)
  correct = _correct(logits, y)
  for k, (name, extra) in enumerate((eval_attacks or {}).items()):
    x_k = extra(model, x, y, seed + k + 1)
    robust = correct * _correct(tf.cast(model(x_k, training=False), tf.float32), y)
    sums[f"adv_acc_{name}"] = tf.reduce_sum(robust)
  return sums


def standard_loss_grad_fn(model: keras.Model, *, num_classes: int,
                          label_smoothing: float = 0.0, attack: Optional[Callable] = None,
                          adv_mix: float = 0.5, adv_loss: str = "pgd_ce",
                          trades_beta: float = 6.0, mart_beta: float = 6.0, budget=None,
                          teacher: Optional[keras.Model] = None,
                          distill_temperature: float = 4.0,
                          loss_scale: Optional[LossScale] = None,
                          sharpness: Optional[Callable] = None,
                          taps: Optional[keras.Model] = None):
  """The toolkit's usual composition: cross-entropy [+ distillation] [+ sharpness]
  [+ adversarial].

  Args:
    attack: `attack(model, x, y, seed)`; adversarial training when given.
    adv_mix: `pgd_ce`'s weight of the adversarial loss.
    adv_loss: the adversarial objective (`adversarial_losses.ADV_LOSSES`):
      "pgd_ce" trains on `attack`'s examples (`adversarial`); "trades" and
      "mart" craft their own with their paper's inner maximisation from
      `budget` (`attack` then only says that training is adversarial).
    trades_beta, mart_beta: the KL terms' weights of TRADES and MART.
    budget: TRADES' and MART's L-infinity PGD: an `adversarial_losses.Budget`
      or any object with `eps`, `step_size`, `steps` (and `clip_min`,
      `clip_max`), e.g. the run's `AttackConfig`.
    teacher: a model to distil from, evaluated in inference mode.
    sharpness: `LossGradFn -> LossGradFn`, e.g. a partial of
      `robust_sparse.training.sharpness.sam.sharpness_aware`; inside the adversarial
      wrapper, so both of its passes see the same adversarial batch.
    taps: a tap model for measurements (see `loss_and_gradients`).

  Raises:
    ValueError: an unknown `adv_loss` or a negative beta; "trades" or "mart"
      without an attack (adversarial training) or without a budget.
  """
  adversarial_losses.check(adv_loss, trades_beta, mart_beta)
  loss = cross_entropy(num_classes, label_smoothing)
  if teacher is not None:
    loss = distillation(loss, teacher, distill_temperature)
  if adv_loss != "pgd_ce":
    if attack is None:
      raise ValueError(f"--adv_loss={adv_loss} is an adversarial training objective: it "
                       "needs --adv_train (an attack)")
    if budget is None:
      raise ValueError(f"--adv_loss={adv_loss} needs its inner maximisation's budget "
                       "(budget=: eps, step_size, steps)")
    return adversarial_losses.loss_grad_fn(
        lambda objective: loss_and_gradients(model, objective, loss_scale, taps=taps),
        model, loss, adv_loss, budget, trades_beta=trades_beta, mart_beta=mart_beta,
        wrap=sharpness)
  fn = loss_and_gradients(model, loss, loss_scale, taps=taps)
  if sharpness is not None:
    fn = sharpness(fn)
  if attack is not None:
    fn = adversarial(fn, model, attack, adv_mix)
  return fn
