"""The compiled training loop and evaluation that the runner drives.

`Engine` runs k training steps per call inside one `tf.function` (a
`tf.while_loop` around the step of `robust_sparse.training.steps`; `compile` says
whether the whole loop is one XLA computation, each step one XLA call, or a
plain graph, chosen by `robust_sparse.training.compilation` unless named), drawing batch indices from a `tf.data`
stream whose order is a pure function of the seed and the iteration. Attack and
augmentation randomness are stateless functions of (seed, iteration) too, so
restoring every variable at iteration `i` (`state()`) and continuing gives the
same numbers as never stopping. A non-finite loss stops the loop at once.

Under a `robust_sparse.training.distribute.Distribution` (`--distribution=mirrored`)
the same loop runs k steps per call, each step `strategy.run` on the
replicas' shards of the global batch (see `steps.make_train_step`), and
evaluation sums the replicas' sums. The engine must then be made, with the
model, in the distribution's scope.

Compilation is a large part of a short job, so the functions are traced
without AutoGraph (the loops are explicit `tf.while_loop`s, and
`Dataset.reduce` over evaluation files),
which more than halves their tracing; code that needs AutoGraph (Python
control flow on tensors, e.g. in a user's own loss) is retraced with it
(`_Traced`). Each function is traced once per engine: chunks of any length
and evaluation sets of any size reuse it.
"""

import math
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
import keras
from absl import logging

from robust_sparse.core.streams import PREPARE_OFFSET, Stream
from robust_sparse.training import adversarial_losses
from robust_sparse.training import arrays
from robust_sparse.training import compilation
from robust_sparse.training import distribute
from robust_sparse.nn import layers as layers_lib
from robust_sparse.training.sharpness import sam as sharpness_lib
from robust_sparse.training import steps as steps_lib
from robust_sparse.training.steps import METRICS, OptimizerGroup

# Re-exported: the engine's XLA rules live in `robust_sparse.training.compilation`.
supports_xla = compilation.supports_xla
xla_pays_off = compilation.xla_pays_off


# The sums of one evaluation batch, by name (then one robust count per evaluation
# attack, `adv_acc_<name>`): `steps.evaluation_sums`' keys.
EVAL_SUMS = steps_lib.EVAL_SUMS


# The most steps one call of the XLA training loop runs (`Engine.loop_in_xla`):
# its batches' indices are an input of this fixed shape, so chunks of any
# length share one compiled loop.
XLA_CHUNK = 512

# `Engine.time_compile_modes`: the first round's steps per mode, the rounds, and the
# time the later rounds aim at (per mode).
TIMED_STEPS = 2
TIMED_ROUNDS = 3
TIMED_ROUND_SECONDS = 0.25


def _autotune(enabled: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.autotune.enabled = enabled
  return options


def batches_per_epoch(num_examples: int, batch_size: int) -> Tuple[int, int]:
  """(batches of one epoch, size of its last batch): ceil(n / B) and n - (ceil(n / B) - 1) B.

  PyTorch's `DataLoader(shuffle=True, drop_last=False)`, and Keras' `fit`:
  every example once per epoch, the last batch smaller unless B divides n.
  """
  batches = max(1, -(-num_examples // batch_size))
  return batches, num_examples - (batches - 1) * batch_size


def epoch_permutation(num_examples: int, seed, epoch) -> tf.Tensor:
  """The order of epoch `epoch`: a permutation of range(n) seeded by (seed, epoch) (int32)."""
  return tf.random.experimental.stateless_shuffle(
      tf.range(num_examples, dtype=tf.int32),
      seed=tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)]))


def index_stream(num_examples: int, batch_size: int, seed: int, start_iteration: int = 0,
                 *, whole_epochs: bool = False):
  """Batches of training indices from batch `start_iteration` on; a pure function of the seed.

  Epoch e is `epoch_permutation(n, seed, e)`. Batch `i` always holds the same
  indices however the stream was started.

  Args:
    num_examples, batch_size: n and B.
    seed: the data seed.
    start_iteration: the first batch to yield.
    whole_epochs: True: the training order (`Engine.batches`): epoch e is
      batches i in [e ceil(n/B), (e + 1) ceil(n/B)), its permutation cut in
      order, the last batch of the n - (ceil(n/B) - 1) B left (smaller unless
      B divides n), so every example is seen once per epoch, as PyTorch's
      DataLoader (drop_last=False) and Keras' `fit` do; the batch dimension
      is then unknown. False: the epochs are concatenated and cut into full
      batches of static shape [B] (an epoch boundary may fall inside a batch),
      for timing loops that want one batch shape.

  Computed where the step asks for the next batch, without prefetching or
  tf.data's autotuning: a batch of indices costs microseconds, and an
  autotuned iterator's destructor waited up to 2 s (in about half of the runs
  measured, at the end of every level) for tf.data's model thread.
  """
  permutation = tf.autograph.experimental.do_not_convert(  # AutoGraph's start-up is 0.7 s.
      lambda epoch: epoch_permutation(num_examples, seed, epoch))
  if whole_epochs:
    per_epoch, _ = batches_per_epoch(num_examples, batch_size)
    first_epoch, offset = divmod(start_iteration, per_epoch)
    return (tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
            .flat_map(lambda epoch: tf.data.Dataset.from_tensor_slices(permutation(epoch))
                      .batch(batch_size))
            .skip(offset).with_options(_autotune(False)))
  start = start_iteration * batch_size
  first_epoch, offset = divmod(start, num_examples)
  return (tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max)
          .map(permutation).unbatch().skip(offset)
          .batch(batch_size, drop_remainder=True).with_options(_autotune(False)))


class EpochBatches:
  """The training batches of `Engine.batches`: whole epochs, the last batch smaller.

  The order of `index_stream(..., whole_epochs=True)`, split so that every
  compiled function sees static shapes: `full` iterates over the full
  batches of every epoch (shape [B], what the compiled loops take), and
  `last(epoch)` gives an epoch's smaller last batch, which `Engine.train`
  runs through a step traced for its own shape (a genuinely smaller batch:
  padding it would change batch-norm statistics). `position` is the iteration
  of the next batch; `full_ahead()` says how many full batches come before the
  next last batch (all of them, None, when B divides n and no batch is smaller).
  """

  def __init__(self, full, last: Callable, *, position: int, per_epoch: int,
               smaller_last: bool):
    self.full = full
    self.last = last
    self.position = position
    self.per_epoch = per_epoch
    self.smaller_last = smaller_last

  def full_ahead(self) -> Optional[int]:
    if not self.smaller_last:
      return None
    return self.per_epoch - 1 - self.position % self.per_epoch


class _Traced:
  """A `tf.function` of `fn` traced without AutoGraph, or with it where `fn` needs it.

  Without AutoGraph, Python control flow on a tensor fails while tracing
  (`OperatorNotAllowedInGraphError`), before anything runs; the call is then
  traced again, and from then on, with AutoGraph.
  """

  def __init__(self, fn, **options):
    self._fn = fn
    self._options = options
    self.function = tf.function(fn, autograph=False, **options)
    self.autograph = False

  def __call__(self, *args):
    if self.autograph:
      return self.function(*args)
    try:
      return self.function(*args)
    except tf.errors.OperatorNotAllowedInGraphError as e:
      logging.info("tracing %s with AutoGraph: %s", getattr(self._fn, "__name__", self._fn), e)
      self.function = tf.function(self._fn, **self._options)
      self.autograph = True
      return self.function(*args)


class Diverged(Exception):
  """The training loss became NaN or infinite at `iteration`."""

  def __init__(self, iteration):
    super().__init__(f"non-finite loss at iteration {iteration}")
    self.iteration = iteration


class Engine:
  """Trains `model` with a composed step, and evaluates it.

  Training images are in memory (float32 [n, H, W, C], gathered inside the
  compiled step), or file paths (a 1-D string array) that `decode` reads in a
  parallel `tf.data` map, for data sets too big for memory. Either way batch
  `i` holds the same examples (`batches`).

  Args:
    model: a built Keras model (logits out).
    loss_grad_fn: a `LossGradFn` of `robust_sparse.training.steps` (e.g.
      `standard_loss_grad_fn`).
    groups: the optimizer groups.
    x_train, y_train: the training data (float32 images or file paths, int labels).
    batch_size: training batch size.
    attack: `attack(model, x, y, seed)` used for evaluation.
    adv_train, adv_mix: to report the evaluation `loss` as the training
      objective (the mixed loss with adversarial training); with `adv_train`,
      "auto" compiles a call per step, not a loop (`compilation.choose`).
    adv_loss, trades_beta, mart_beta: the adversarial objective that
      `loss_grad_fn` trains (`steps.standard_loss_grad_fn`'s keywords of the
      same names), checked here and kept as attributes; the evaluation `loss`
      stays the `adv_mix` mix of the natural and the evaluation attack's
      cross-entropy for every objective.
    augment: `augment(x, y, seed) -> (x, y)` applied to training batches, or None.
    prepare: the data set's `prepare(x, seed) -> x` (resizing, random
      positioning), applied to every training and evaluation batch, or None.
    decode: `decode(path) -> image` when the x arrays hold file paths.
    decode_eval: the decoding of evaluation files (e.g. ImageNet's resize and
      centre crop); default `decode`.
    grad_clip_norm, loss_scale: see `make_train_step`.
    top5: also report top-5 accuracy.
    compile: how training and evaluation compile, one of
      `compilation.MODES`: "xla_loop" (a chunk of steps is one XLA loop),
      "xla_step" (an XLA call per step), "graph" (a plain `tf.function` per
      step), or "auto" (`compilation.choose`: the fastest by measured rules).
      The choice is `compile_mode`.
    jit_compile: the older switch: True is "xla_loop" where it applies (else
      "xla_step"), False is "graph"; None leaves `compile` to decide.
    extra_state: more variables the step reads (e.g. SSAM's perturbation
      masks), checkpointed with the rest under `engine/<name>`.
    measurement: layer measurements fed without a second forward pass (e.g.
      `saturation.SaturationTracker`): an object with `tap_model` (the
      weight-sharing model the loss-and-gradients function runs through,
      built with `taps=` of `steps.loss_and_gradients`), `update(outputs,
      split)` and `variables` (checkpointed under `engine/measure/<i>`).
      Training batches feed "train" (natural examples); evaluation batches of
      the test set (`Stream.TEST_ATTACK`) feed "eval".
    eval_attacks: [(name, attack)] evaluated beside `attack`: `evaluate`
      reports `adv_acc_<name>`, the fraction of examples classified correctly
      both clean and under that attack.
    distribution: data-parallel training and evaluation on its replicas
      (`batch_size` divisible by them; `jit_compile` then compiles each
      replica's pass); None: one device.

  Raises:
    ValueError: a distribution with a batch size it does not divide, or with
      a measurement.
  """

  def __init__(self, model: keras.Model, loss_grad_fn, groups: Sequence[OptimizerGroup], *,
               x_train: np.ndarray, y_train: np.ndarray, batch_size: int, attack: Callable,
               adv_train: bool = False, adv_mix: float = 0.5, adv_loss: str = "pgd_ce",
               trades_beta: float = 6.0, mart_beta: float = 6.0,
               augment: Optional[Callable] = None, prepare: Optional[Callable] = None,
               decode: Optional[Callable] = None, decode_eval: Optional[Callable] = None,
               grad_clip_norm: Optional[float] = None,
               loss_scale: Optional[steps_lib.LossScale] = None, top5: bool = False,
               compile: str = "auto",  # pylint: disable=redefined-builtin
               jit_compile: Optional[bool] = None, eval_batch_size: int = 1000,
               extra_state: Optional[Dict[str, tf.Variable]] = None,
               measurement=None, eval_attacks: Sequence[Tuple[str, Callable]] = (),
               distribution: Optional[distribute.Distribution] = None):
    if distribution is not None:
      if batch_size % distribution.num_replicas:
        raise ValueError(f"--batch_size={batch_size} is not divisible by the "
                         f"{distribution.num_replicas} replicas")
      if measurement is not None:
        raise ValueError("measurements are not supported with a distribution")
    self.distribution = distribution
    self.model = model
    self.eval_attacks = list(eval_attacks)
    self.groups = list(groups)
    self.attack = attack
    self.batch_size = batch_size
    self.adv_train = adv_train
    self.adv_mix = adv_mix
    self.adv_loss = adversarial_losses.check(adv_loss, trades_beta, mart_beta)
    self.trades_beta, self.mart_beta = trades_beta, mart_beta
    self.top5 = top5
    self.loss_scale = loss_scale
    self.eval_batch_size = eval_batch_size
    self.extra_state = dict(extra_state or {})
    self.measurement = measurement
    if measurement is not None:
      for i, variable in enumerate(measurement.variables):
        self.extra_state[f"measure/{i}"] = variable
    self.augment = augment
    # Variables, not constants, so that one compiled engine serves many runs.
    self.seed = tf.Variable(0, dtype=tf.int64, trainable=False, name="seed")
    self.iteration = tf.Variable(0, dtype=tf.int64, trainable=False, name="iteration")
    self.decode = decode
    self.decode_eval = decode_eval or decode
    self.prepare = prepare
    self.num_train = len(x_train)
    self.x_train = arrays.as_tensor(x_train)  # The data set's memory where it can.
    self.y_train = tf.constant(y_train, dtype=tf.int32)
    if jit_compile is not None and compile == "auto":
      compile = (("xla_loop" if decode is None and not adv_train else "xla_step")
                 if jit_compile else "graph")
    replicas = 1 if distribution is None else distribution.num_replicas
    mode = compilation.choose(model, compile, augment=augment, in_memory=decode is None,
                              adv_train=adv_train, batch_size=batch_size // replicas)
    if distribution is not None and mode == "xla_loop":
      mode = "xla_step"  # Each replica's pass is compiled, not the loop (below).
    self.compile_mode = mode
    # "auto"'s modes to time on this machine before the first step (`settle_compile`).
    self.compile_candidates = (() if distribution is not None
                               else compilation.timed_candidates(model, compile, mode))
    # Evaluation chooses on its own batch size (and its attacks' loops).
    self.eval_jit_compile = compilation.evaluation_uses_xla(
        model, compile, mode, max(1, eval_batch_size // replicas))
    jit_compile = mode != "graph"
    self._step = steps_lib.make_train_step(
        model, loss_grad_fn, self.groups, grad_clip_norm=grad_clip_norm,
        loss_scale=loss_scale, augment=augment, prepare=prepare, top5=top5,
        masks_hold=True,
        on_taps=(lambda outputs: measurement.update(outputs, "train")) if measurement else None,
        distribution=distribution, replica_jit_compile=jit_compile)
    self._fresh = [np.asarray(v.numpy()) for v in self._resettable()]
    self.jit_compile = jit_compile
    if distribution is not None:
      # XLA compiles each replica's pass (above), not the step: MirroredStrategy's
      # cross-replica calls cannot be compiled on CPU.
      jit_compile = False
    # "xla_loop": the steps of a chunk run in one XLA loop over their batches'
    # indices, gathered first (`_train_loop_fn`); a call per step cost a
    # quarter of natural training (dense-300-100, batch 60, 2-core CPU: 0.97
    # against 0.74 ms per step). Else each step is one call from a TensorFlow
    # loop, XLA-compiled for "xla_step".
    self.loop_in_xla = mode == "xla_loop"
    self._train_step = _Traced(self._train_step_fn, jit_compile=jit_compile)
    self._train_loop = _Traced(self._train_loop_fn, jit_compile=True)
    self._train_chunk = _Traced(self._train_chunk_fn)
    self._traced_modes = {mode: (self._train_step, self._train_chunk)}
    self._eval_batch = _Traced(self._eval_batch_fn,
                               jit_compile=self.eval_jit_compile and distribution is None)
    self._eval_dataset = _Traced(self._eval_dataset_fn)  # Files, decoded by tf.data.
    self._eval_tensors = {}  # In-memory sets: (image shape, dtype) -> traced function.
    self._enforce_masks = _Traced(lambda: layers_lib.enforce_masks(model))
    self._sharpness = None
    self._warmed_up = False

  # ---- state ------------------------------------------------------------------
  def _resettable(self):
    variables = [v for group in self.groups for v in group.optimizer.variables]
    if self.loss_scale is not None:
      variables += self.loss_scale.variables
    return variables

  def reset(self, seed: int, iteration: int = 0):
    """Starts a new run with the same compiled functions: fresh optimizer state."""
    for variable, value in zip(self._resettable(), self._fresh):
      variable.assign(value)
    self.seed.assign(seed)
    self.iteration.assign(iteration)

  def state(self) -> Dict[str, tf.Variable]:
    """Every variable a resumed run needs, by a stable name.

    Model variables (trainable or not: batch-norm statistics, masks, counters)
    by path, each group's optimizer variables (slots, iteration, learning rate)
    by group and position, the loss scale, and the engine's iteration and seed.
    """
    state = {f"model/{v.path}": v for v in self.model.variables}
    if len(state) != len(self.model.variables):
      raise ValueError("model variables have duplicate paths; name every layer")
    for group in self.groups:
      for i, v in enumerate(group.optimizer.variables):
        state[f"optimizer/{group.name}/{i}"] = v
    if self.loss_scale is not None:
      for v in self.loss_scale.variables:
        state[f"engine/{v.name.split(':')[0]}"] = v
    for name, v in self.extra_state.items():
      state[f"engine/{name}"] = v
    state["engine/iteration"] = self.iteration
    state["engine/seed"] = self.seed
    return state

  def get_state(self) -> Dict[str, np.ndarray]:
    return {name: np.asarray(v.numpy()) for name, v in self.state().items()}

  def set_state(self, values: Dict[str, np.ndarray]):
    """Restores `get_state()` output.

    Raises:
      ValueError: a variable missing from `values` (never a silent fresh value),
        or an extra or misshapen one.
    """
    state = self.state()
    missing = sorted(set(state) - set(values))
    extra = sorted(set(values) - set(state))
    if missing or extra:
      raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, "
                       f"unexpected {extra[:5]}")
    for name, variable in state.items():
      if tuple(values[name].shape) != tuple(variable.shape):
        raise ValueError(f"checkpoint {name} has shape {values[name].shape}, expected "
                         f"{tuple(variable.shape)}")
      variable.assign(values[name])

  def learning_rates(self, iteration: Optional[int] = None) -> Dict[str, float]:
    """Each group's learning rate at `iteration` (default: the last step taken)."""
    if iteration is None:
      iteration = max(int(self.iteration.numpy()) - 1, 0)
    rates = steps_lib.learning_rates(self.groups, tf.constant(iteration, tf.int64))
    return {name: float(rate.numpy()) for name, rate in rates.items()}

  # ---- compile mode ----------------------------------------------------------------
  def _use_mode(self, mode: str):
    """Trains as `mode` ("xla_step" or "graph": a call per step) from now on; each
    mode's traced functions are kept, so switching back compiles nothing again."""
    if mode not in self._traced_modes:
      self._traced_modes[mode] = (_Traced(self._train_step_fn, jit_compile=mode != "graph"),
                                  _Traced(self._train_chunk_fn))
    self._train_step, self._train_chunk = self._traced_modes[mode]
    self.compile_mode, self.jit_compile = mode, mode != "graph"

  def time_compile_modes(self) -> Dict[str, float]:
    """{mode: training steps/s} of each of `compile_candidates`, on this engine's own
    training batches; every change is then undone (`get_state` / `set_state`).

    Each mode first runs a step untimed (its trace and compile), then rounds of
    steps alternate between the modes; a mode's time is its best round's time
    per step. The first round has `TIMED_STEPS` steps, the others as many as
    take about `TIMED_ROUND_SECONDS`. {} where nothing is timed.
    """
    candidates, initial = self.compile_candidates, self.compile_mode
    if not candidates:
      return {}
    state = self.get_state()
    batches = self.batches(seed=0)
    seconds = {mode: math.inf for mode in candidates}
    self.compile_candidates = ()  # So that `train` below does not settle.
    try:
      for mode in candidates:
        self._use_mode(mode)
        self.train(batches, 1)
      steps = TIMED_STEPS
      for _ in range(TIMED_ROUNDS):
        for mode in candidates:
          self._use_mode(mode)
          begin = time.perf_counter()
          self.train(batches, steps)
          seconds[mode] = min(seconds[mode], (time.perf_counter() - begin) / steps)
        steps = int(np.clip(TIMED_ROUND_SECONDS / min(seconds.values()), TIMED_STEPS, 64))
    except Diverged:
      pass  # Training proper will say so; the modes timed so far decide.
    finally:
      self.compile_candidates = candidates
      self._use_mode(initial)
      self.set_state(state)
    return {mode: 1.0 / s for mode, s in seconds.items() if math.isfinite(s)}

  def fastest_compile_mode(self) -> Tuple[str, Dict[str, float]]:
    """(the faster of `compile_candidates`, `time_compile_modes()`), logged; the rules'
    `compile_mode` where nothing was timed. Settles nothing."""
    timing = self.time_compile_modes()
    mode = max(timing, key=timing.get) if timing else self.compile_mode
    if timing:
      logging.info("--compile=auto timed training steps/s: %s; training as %s",
                   ", ".join(f"{m} {v:.3g}" for m, v in timing.items()), mode)
    return mode, timing

  def settle_compile(self, mode: Optional[str] = None) -> str:
    """Settles "auto"'s timed choice (`compilation.timed_candidates`) and returns
    `compile_mode`.

    Args:
      mode: the mode to train as (one of `compile_candidates`: a choice
        recorded earlier, say by the run being resumed); None: the faster of
        `time_compile_modes` (`fastest_compile_mode`). Ignored once settled or
        where nothing is timed (`compile_candidates` empty): the rules' choice
        stands.

    Raises:
      ValueError: `mode` is not a candidate.
    """
    candidates = self.compile_candidates
    if not candidates:
      return self.compile_mode
    if mode is None:
      mode, _ = self.fastest_compile_mode()
    elif mode not in candidates:
      raise ValueError(f"compile mode {mode!r} is not one of {', '.join(candidates)}")
    self.compile_candidates = ()
    self._use_mode(mode)
    return mode

  # ---- training --------------------------------------------------------------------
  def batches(self, seed: int, start_iteration: int = 0, *,
              drop_last: bool = False) -> EpochBatches:
    """The training batches from `start_iteration` on, for `train`: whole epochs.

    Every epoch visits each training example exactly once, in the order of
    `index_stream(..., whole_epochs=True)`: ceil(n / B) batches, the last of
    the n - (ceil(n / B) - 1) B examples left (PyTorch's DataLoader with
    drop_last=False, Keras' `fit`). With `drop_last`, an epoch is its
    permutation's floor(n / B) full batches and the rest of it is not seen
    (PyTorch's drop_last=True). In-memory data: batches of indices (the
    step gathers the images). File paths: decoded (images, labels) batches,
    read in parallel, in order.
    """
    n, size = self.num_train, self.batch_size
    per_epoch, last_size = batches_per_epoch(n, size)
    full_per_epoch = n // size  # per_epoch - 1 when the last batch is smaller.
    if drop_last:
      if full_per_epoch < 1:
        raise ValueError(f"drop_last with {n} training examples < batch size {size}")
      per_epoch, last_size = full_per_epoch, size
    epoch, within = divmod(start_iteration, per_epoch)
    # The full batches only: starting at an epoch's last batch, the next full one is the
    # next epoch's first.
    permutation = tf.autograph.experimental.do_not_convert(
        lambda e: tf.reshape(epoch_permutation(n, seed, e)[:full_per_epoch * size],
                             [full_per_epoch, size]))
    stream = (tf.data.Dataset.range(epoch, np.iinfo(np.int64).max).map(permutation)
              .unbatch().skip(min(within, full_per_epoch)).with_options(_autotune(False)))

    def last(e):
      indices = epoch_permutation(n, seed, e)[full_per_epoch * size:]
      if self.decode is None:
        return indices
      return next(iter(self._decoded(tf.data.Dataset.from_tensor_slices(indices), last_size)))

    if self.decode is not None:
      stream = self._decoded(stream.unbatch(), size).with_options(
          _autotune(True))  # Decoding files is worth tuning.
    return EpochBatches(iter(stream), last, position=start_iteration, per_epoch=per_epoch,
                        smaller_last=last_size < size)

  def _decoded(self, indices: tf.data.Dataset, size: int) -> tf.data.Dataset:
    """(images, labels) batches of `size` for a stream of single indices, decoded in parallel."""
    paths, labels, decode = self.x_train, self.y_train, self.decode
    return (indices.map(lambda i: (decode(tf.gather(paths, i)), tf.gather(labels, i)),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .batch(size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

  def stored_examples(self, indices, *, for_evaluation: bool = False):
    """Training examples `indices` as stored: images gathered, or files decoded
    in parallel (with `decode_eval` when `for_evaluation`); not prepared.

    Returns:
      (images, labels) tensors.
    """
    indices = tf.constant(np.asarray(indices), tf.int32)
    x = tf.gather(self.x_train, indices)
    if self.decode is not None:
      decode = self.decode_eval if for_evaluation else self.decode
      x = tf.stack(list(tf.data.Dataset.from_tensor_slices(x).map(
          decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)))
    return x, tf.gather(self.y_train, indices)

  def examples(self, indices, *, augment_iteration: Optional[int] = None):
    """Training examples `indices` as the step sees them: prepared, then augmented
    with the seed of `augment_iteration` (None: not augmented).

    Returns:
      (images, labels) tensors.
    """
    x, y = self.stored_examples(indices)
    if augment_iteration is None:
      if self.prepare is not None:
        x = self.prepare(x, steps_lib.stream_seed(self.seed, 0, Stream.FIXED_SET_PREPARE))
      return x, y
    if self.prepare is not None:
      x = self.prepare(x, steps_lib.stream_seed(self.seed, augment_iteration,
                                                Stream.TRAIN_PREPARE))
    if self.augment is not None:
      x, y = self.augment(x, y, steps_lib.stream_seed(self.seed, augment_iteration,
                                                      Stream.AUGMENT))
    return x, y

  def _train_step_fn(self, element):
    if self.decode is None:
      x = tf.gather(self.x_train, element)
      y = tf.gather(self.y_train, element)
    else:
      x, y = element
    stats = self._step(x, y, self.seed, self.iteration)
    self.iteration.assign_add(1)
    return tf.stack([tf.cast(stats[m], tf.float32) for m in METRICS])

  def _train_chunk_fn(self, iterator, steps):
    """Up to `steps` steps; stops after the first non-finite loss.

    Returns:
      (metric sums of the finite steps, steps run (the non-finite one
      included), whether every loss was finite).
    """
    if self.loop_in_xla:
      return self._train_loop(self._chunk_indices(iterator, steps), steps)
    return self._steps_loop(lambda done: self._train_step(next(iterator)), steps)

  def _chunk_indices(self, iterator, steps):
    """The next `steps` (<= XLA_CHUNK) index batches, zero-padded to [XLA_CHUNK, batch]."""
    count = tf.cast(steps, tf.int32)
    batches = tf.TensorArray(tf.int32, size=count, element_shape=[self.batch_size])
    _, batches = tf.while_loop(lambda i, _: i < count,
                               lambda i, batches: (i + 1, batches.write(i, next(iterator))),
                               (tf.constant(0), batches))
    indices = tf.pad(batches.stack(), [[0, XLA_CHUNK - count], [0, 0]])
    return tf.ensure_shape(indices, [XLA_CHUNK, self.batch_size])

  def _train_loop_fn(self, indices, steps):
    """`_steps_loop` over the index batches `indices`, compiled as one XLA loop."""
    return self._steps_loop(lambda done: self._train_step_fn(indices[done]), steps)

  @staticmethod
  def _steps_loop(step, steps):
    def body(done, sums, finite):
      values = step(done)
      finite = tf.math.is_finite(values[0])
      return done + 1, tf.where(finite, sums + values, sums), finite

    done, sums, finite = tf.while_loop(
        lambda done, sums, finite: tf.logical_and(finite, done < steps), body,
        (tf.constant(0, tf.int64), tf.zeros([len(METRICS)]), tf.constant(True)))
    return sums, done, finite

  def train(self, iterator, steps: int) -> Dict[str, float]:
    """Runs `steps` iterations from `iterator`; returns the mean training metrics.

    Args:
      iterator: `batches()` (whole epochs: the full batches run in the
        compiled loop, an epoch's smaller last batch through the step traced
        for its shape), or any iterator of batches of one static shape (each
        runs in the compiled loop).
      steps: iterations to run.

    Raises:
      Diverged: the loss became NaN or infinite; training stopped at that step.
    """
    if self.compile_candidates:  # "auto" times its modes before the first step.
      self.settle_compile()
    # The promise the step is traced under (`layers.masks_hold`): kernels zero
    # where masked, whatever was assigned since the last chunk.
    self._enforce_masks()
    total, done = np.zeros(len(METRICS)), 0
    while done < steps:
      source, limit = iterator, steps - done
      if isinstance(iterator, EpochBatches):
        source, ahead = iterator.full, iterator.full_ahead()
        if ahead == 0:  # The epoch's last, smaller batch.
          epoch = iterator.position // iterator.per_epoch
          values = self._train_step(iterator.last(epoch)).numpy()
          if not np.isfinite(values[0]):
            raise Diverged(int(self.iteration.numpy()) - 1)
          iterator.position += 1
          total, done = total + values, done + 1
          continue
        if ahead is not None:
          limit = min(limit, ahead)
      chunk = min(limit, XLA_CHUNK) if self.loop_in_xla else limit
      sums, ran, finite = self._train_chunk(source, tf.constant(chunk, tf.int64))
      if isinstance(iterator, EpochBatches):
        iterator.position += int(ran)
      if not bool(finite):
        raise Diverged(int(self.iteration.numpy()) - 1)
      total, done = total + sums.numpy(), done + int(ran)
    return {name: float(v) / done for name, v in zip(METRICS, total)}

  def warm_up(self, x, y, stream: int = Stream.VALID_ATTACK):
    """Compiles training and evaluation at once, in two threads; changes nothing.

    The first `train` and `evaluate` calls trace and compile their functions
    one after the other (XLA, dense-300-100 on a 2-core CPU: 0.5-0.6 s to
    compile each); here they compile at the same time. Evaluation runs on the
    first batch of (x, y) (call with the set evaluated first, so that the
    batch shape is the one compiled) and its sums are dropped. Training runs
    zero steps where a chunk is one XLA loop; else one step, whose every
    change is then undone (`get_state` / `set_state`: what resuming restores
    exactly). Returns once both are compiled; does nothing a second time, with
    a distribution or a measurement, or for data read from files.
    """
    self.settle_compile()  # Before tracing training: "auto" may time its modes first.
    if (self._warmed_up or self.distribution is not None or self.measurement is not None
        or self.decode is not None or len(x) == 0):
      return
    self._warmed_up = True
    x = arrays.as_tensor(x[:self.eval_batch_size])
    evaluate = self._eval_tensors_for(x)
    failed = []

    def evaluation():
      try:
        evaluate(x, np.asarray(y[:self.eval_batch_size], np.int32),
                 tf.constant(int(stream), tf.int64))
      except Exception as e:  # pylint: disable=broad-except; raised below, in this thread.
        failed.append(e)

    thread = threading.Thread(target=evaluation, name="warm_up_evaluation")
    thread.start()
    try:
      if self.loop_in_xla:  # `train` would run no chunk for zero steps.
        self._train_chunk(self.batches(seed=0).full, tf.constant(0, tf.int64))
      else:
        state = self.get_state()
        try:
          self.train(self.batches(seed=0), 1)
        except Diverged:
          pass  # Training proper will say so.
        finally:
          self.set_state(state)
    finally:
      thread.join()
    if failed:
      raise failed[0]

  # ---- evaluation -----------------------------------------------------------------
  def _sharpness_fn(self, x, y, rho, batch_size):
    if self.prepare is not None:
      x = self.prepare(x, steps_lib.stream_seed(self.seed, 0, Stream.FIXED_SET_PREPARE))
    with layers_lib.masks_hold():
      return sharpness_lib.measure_sharpness(self.model, x, y, rho=rho, batch_size=batch_size)

  def sharpness(self, x, y, *, rho: float, batch_size: int) -> Dict[str, float]:
    """`sharpness.measure_sharpness` on the fixed set (x, y) (decoded images, int labels)."""
    if self._sharpness is None:
      # Not XLA: its compile of this loop (a gradient and three passes per
      # batch) took minutes for resnet18 on CPU, where TensorFlow's own
      # kernels need 6.6 s for 256 images.
      self._sharpness = tf.function(self._sharpness_fn, reduce_retracing=True)
    self._enforce_masks()
    values = self._sharpness(tf.convert_to_tensor(x), tf.cast(y, tf.int32),
                             tf.constant(rho, tf.float32), int(batch_size))
    return {name: float(value.numpy()) for name, value in values.items()}

  def _eval_sum_names(self):
    return EVAL_SUMS + tuple(f"adv_acc_{name}" for name, _ in self.eval_attacks)

  def _eval_zeros(self):
    return {name: tf.zeros([]) for name in self._eval_sum_names()}

  def _eval_batch_fn(self, x, y, index, stream):
    """{sum name: its sum over the batch} (`EVAL_SUMS`, then `adv_acc_<name>`)."""
    if self.prepare is not None:
      x = self.prepare(x, steps_lib.stream_seed(self.seed, self.iteration,
                                                stream + PREPARE_OFFSET, index))
    taps, on_taps = None, None
    if self.measurement is not None:
      taps = self.measurement.tap_model

      def on_taps(outputs):
        def feed():
          self.measurement.update(outputs, "eval")
          return tf.constant(True)
        tf.cond(tf.equal(stream, int(Stream.TEST_ATTACK)), feed, lambda: tf.constant(False))

    seed = steps_lib.stream_seed(self.seed, self.iteration, stream, index)

    def sums(x, y, seed):
      with layers_lib.masks_hold():
        return steps_lib.evaluation_sums(
            self.model, self.attack, x, y, seed, self.top5, taps=taps, on_taps=on_taps,
            eval_attacks=dict(self.eval_attacks))

    if self.distribution is None:
      return sums(x, y, seed)
    return self.distribution.sum(self.distribution.run_sharded(
        distribute.compile_on_replica(sums, self.eval_jit_compile), (x, y), seed))

  def _eval_tensors_fn(self, x, y, stream):
    """Sums over batches of in-memory (x, y), sliced in a `tf.while_loop`.

    Faster than a `tf.data` pipeline over the same arrays (on a 2-core CPU,
    PGD-10 evaluation of 10000 MNIST images: 0.7 s against 0.75-1.3 s, whose
    prefetching thread competes with the compute).
    """
    size = self.eval_batch_size
    batches = (tf.shape(x, out_type=tf.int64)[0] + size - 1) // size

    def body(index, sums):
      rows = slice(index * size, (index + 1) * size)
      return index + 1, _add(sums, self._eval_batch(x[rows], y[rows], index, stream))

    return tf.while_loop(lambda index, _: index < batches, body,
                         (tf.constant(0, tf.int64), self._eval_zeros()))[1]

  def _eval_tensors_for(self, x):
    """The traced `_eval_tensors_fn` for evaluation sets shaped as `x` (any length)."""
    key = (tuple(x.shape[1:]), x.dtype.name)
    if key not in self._eval_tensors:
      self._eval_tensors[key] = _Traced(self._eval_tensors_fn, input_signature=(
          tf.TensorSpec((None,) + key[0], x.dtype), tf.TensorSpec((None,), tf.int32),
          tf.TensorSpec((), tf.int64)))
    return self._eval_tensors[key]

  def _eval_dataset_fn(self, dataset, stream):

    def add(sums, element):
      index, (x, y) = element
      return _add(sums, self._eval_batch(x, y, index, stream))

    return dataset.enumerate().reduce(self._eval_zeros(), add)

  def evaluate(self, x: np.ndarray, y: np.ndarray,
               stream: int = Stream.VALID_ATTACK) -> Dict[str, float]:
    """Natural and adversarial loss and accuracy on all of (x, y).

    Args:
      x, y: the evaluation set.
      stream: the attack randomness of the set (`Stream.VALID_ATTACK` or `TEST_ATTACK`).
    """
    if len(x) == 0:  # No validation split (--valid_size=0).
      return {m: float("nan") for m in ("loss",) + self._eval_sum_names()}
    self._enforce_masks()
    stream = tf.constant(int(stream), tf.int64)
    if self.decode_eval is None:
      x = arrays.as_tensor(x)
      sums = self._eval_tensors_for(x)(x, np.asarray(y, np.int32), stream)
    else:
      decode = self.decode_eval
      dataset = (tf.data.Dataset.from_tensor_slices((x, tf.cast(y, tf.int32)))
                 .map(lambda path, label: (decode(path), label),
                      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
                 .batch(self.eval_batch_size).prefetch(tf.data.AUTOTUNE))
      sums = self._eval_dataset(dataset, stream)
    # Means in float32, as the sums are.
    means = {name: total.numpy() / np.float32(len(x)) for name, total in sums.items()}
    loss = ((1 - self.adv_mix) * means["nat_loss"] + self.adv_mix * means["adv_loss"]
            if self.adv_train else means["nat_loss"])
    if not self.top5:
      means["top5"] = np.nan
    return {"loss": float(loss), **{name: float(value) for name, value in means.items()}}


def _add(sums: Dict[str, tf.Tensor], more: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
  return {name: sums[name] + more[name] for name in sums}
