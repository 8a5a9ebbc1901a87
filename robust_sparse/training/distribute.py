"""Data-parallel training on several devices: `tf.distribute.MirroredStrategy` for the engine.

Everything the engine, the step library and SAM need to run under a
`MirroredStrategy` is here, so that `--distribution=default` builds no
strategy and adds no op:

- `check_options` / `configure_devices` / `make_distribution`: the flags'
  checks, the `--cpu_replicas=N` logical CPU devices (for testing without
  GPUs; they must exist before TensorFlow starts its devices), and the
  strategy over them or over the visible GPUs (`--devices`).
- `Distribution.run_sharded`: runs a function on every replica, each on its
  even shard of a global batch (replica r takes rows [r*s, (r+1)*s), s =
  ceil(n / replicas)). The engine gathers, prepares and augments the global
  batch before sharding it, so every replica sees the examples a single-device
  run sees.
- The reductions: the step weights every example by 1 / GLOBAL batch, so the
  sum of the replicas' gradients (`all_reduce_sum`, done once in the step,
  before clipping) is the single-device mean gradient; the optimizers take
  it as it is (`take_reduced_gradients`); changed non-trainable values
  (batch-norm statistics) are averaged (`all_reduce_mean`), as Keras 2 did;
  regularisation added by every replica counts 1 / replicas each
  (`replica_share`); metrics are sums over the replicas (`Distribution.sum`).
- `per_example_draw`: per-example random numbers (an attack's random start)
  drawn for the global batch and sliced, so a replica draws what the
  single-device run draws for its examples.
- `synchronize_batch_norm`: `--sync_batch_norm` (Keras' `synchronized=True`:
  batch statistics over the global batch).

Variables (model, masks, optimizers, the engine's) are created in
`Distribution.scope()`; checkpoints read a mirrored variable's value and
assign to all its copies, as for any variable.
"""

import contextlib
import threading
from typing import Callable, List, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

DISTRIBUTIONS = ("default", "mirrored")


def check_options(*, distribution: str, cpu_replicas: int, num_gpus: int, batch_size: int,
                  sync_batch_norm: bool = False, sam_sync: bool = False,
                  measure: Sequence[str] = (), mixed_precision: bool = False) -> int:
  """Checks the distribution flags; returns the number of replicas (1: default).

  Raises:
    ValueError: one line naming the flag.
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"--distribution must be one of {', '.join(DISTRIBUTIONS)}, got "
                     f"{distribution!r}")
  if distribution == "default":
    for flag, value in (("cpu_replicas", cpu_replicas), ("sync_batch_norm", sync_batch_norm),
                        ("sam_sync", sam_sync)):
      if value:
        given = f"--{flag}" if value is True else f"--{flag}={value}"
        raise ValueError(f"{given} needs --distribution=mirrored")
    return 1
  if cpu_replicas == 1:
    raise ValueError("--cpu_replicas=1: give 0 (the GPUs) or N >= 2 logical CPU devices")
  replicas = cpu_replicas or num_gpus
  if replicas == 0:
    raise ValueError("--distribution=mirrored needs a GPU or --cpu_replicas=N (N >= 2 "
                     "logical CPU devices); this machine has no GPU")
  if batch_size % replicas:
    raise ValueError(f"--batch_size={batch_size} is not divisible by the {replicas} "
                     "replicas of --distribution=mirrored")
  if measure:
    raise ValueError(f"--measure={','.join(measure)} is not supported with "
                     "--distribution=mirrored")
  if mixed_precision:
    # Its skipped steps put the optimizer update in a tf.cond, where
    # MirroredStrategy's cross-replica calls are not allowed.
    raise ValueError("--mixed_precision is not supported with --distribution=mirrored")
  return replicas


def visible_gpus() -> int:
  return len(tf.config.get_visible_devices("GPU"))


def configure_devices(cpu_replicas: int):
  """Splits the host CPU into `cpu_replicas` logical devices (0: nothing to do).

  Call it before TensorFlow starts its devices (its first op); later, it only
  checks that the devices are there.

  Raises:
    ValueError: TensorFlow has started with fewer logical CPU devices.
  """
  if cpu_replicas < 2:
    return
  cpus = tf.config.list_physical_devices("CPU")
  configured = tf.config.get_logical_device_configuration(cpus[0])
  if configured is not None and len(configured) >= cpu_replicas:
    return
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas)
  except RuntimeError:
    raise ValueError(f"--cpu_replicas={cpu_replicas}: TensorFlow has already started its "
                     f"devices ({len(tf.config.list_logical_devices('CPU'))} CPU); set it "
                     "before anything runs (a fresh process)") from None


_SHARD = threading.local()  # The replica's shard while its function is traced.


class _Shard:
  """Rows [start, start + n) of a global batch of `size` examples."""

  def __init__(self, start, size):
    self.start = start
    self.size = size


def current_shard() -> Optional[_Shard]:
  return getattr(_SHARD, "value", None)


@contextlib.contextmanager
def _shard_scope(shard):
  previous = current_shard()
  _SHARD.value = shard
  try:
    yield
  finally:
    _SHARD.value = previous


def per_example_draw(draw: Callable, shape, seed):
  """`draw(shape, seed)`, random values whose first axis is the batch.

  On a replica's shard, draws for the global batch and returns the shard's
  rows, so the replica's examples get the numbers a single-device run draws
  for them; elsewhere exactly `draw(shape, seed)`.
  """
  shard = current_shard()
  if shard is None:
    return draw(shape, seed)
  shape = tf.convert_to_tensor(shape)
  full = draw(tf.concat([tf.reshape(tf.cast(shard.size, shape.dtype), [1]), shape[1:]], 0),
              seed)
  return full[shard.start:shard.start + shape[0]]


def replicas() -> int:
  """Replicas kept in sync where this is traced: 1 outside a replica of a strategy."""
  context = tf.distribute.get_replica_context()
  return 1 if context is None else context.num_replicas_in_sync


def replica_share(value):
  """`value` / replicas inside a replica of several (a regulariser each replica adds in
  full, summed by the all-reduce), else `value` itself."""
  count = replicas()
  return value if count == 1 else value / count


def _all_reduce(op, tensors: List[Optional[tf.Tensor]]):
  count = replicas()
  present = [i for i, t in enumerate(tensors) if t is not None]
  if count == 1 or not present:
    return list(tensors)
  reduced = tf.distribute.get_replica_context().all_reduce(op, [tensors[i] for i in present])
  out = list(tensors)
  for i, value in zip(present, reduced):
    out[i] = value
  return out


def all_reduce_sum(tensors):
  """Sums over the replicas (None entries stay None); the tensors themselves on one."""
  return _all_reduce(tf.distribute.ReduceOp.SUM, tensors)


def all_reduce_mean(tensors):
  """Means over the replicas (None entries stay None); the tensors themselves on one."""
  return _all_reduce(tf.distribute.ReduceOp.MEAN, tensors)


def take_reduced_gradients(optimizer):
  """Makes `optimizer.apply` use the gradients it is given as the replicas' sum.

  Keras' TensorFlow optimizers all-reduce inside `apply`
  (`_all_reduce_sum_gradients`); the step reduces once, before clipping, the
  loss-scale check and SAM, so a second sum would count every gradient
  `replicas` times. (Keras 2 had `experimental_aggregate_gradients=False`.)

  Raises:
    ValueError: an optimizer without that method (another Keras), which would
      silently double the gradients.
  """
  if not hasattr(optimizer, "_all_reduce_sum_gradients"):
    raise ValueError(f"{type(optimizer).__name__} has no _all_reduce_sum_gradients: this "
                     "Keras aggregates gradients differently; --distribution=mirrored would "
                     "apply them twice")
  optimizer._all_reduce_sum_gradients = list  # pylint: disable=protected-access


def compile_on_replica(fn: Callable, jit_compile: bool) -> Callable:
  """`fn`, to call on a replica, XLA-compiled there when `jit_compile`.

  MirroredStrategy cannot put its cross-replica calls (an all-reduce) inside
  a nested function: such an `fn` (SAM with `--sam_sync`) runs uncompiled.
  A new function per call: each replica's trace captures its own variables.
  """
  if not jit_compile:
    return fn

  def call(*args):
    try:
      return tf.function(fn, jit_compile=True, autograph=False)(*args)
    except RuntimeError as e:
      if "merge_call" not in str(e):
        raise
      logging.info("%s calls across replicas: not XLA-compiled per replica",
                   getattr(fn, "__name__", fn))
      return fn(*args)

  return call


def synchronize_batch_norm(model: keras.Model) -> int:
  """Sets `synchronized=True` on every BatchNormalization of `model` (read at call time:
  the batch statistics of training passes become those of the global batch); returns
  how many."""
  count = 0
  for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.synchronized = True
      count += 1
  return count


class Distribution:
  """A `tf.distribute` strategy and the engine's uses of it.

  Args:
    strategy: e.g. a `tf.distribute.MirroredStrategy`.
  """

  def __init__(self, strategy: tf.distribute.Strategy):
    self.strategy = strategy
    self.num_replicas = strategy.num_replicas_in_sync

  def scope(self):
    """Variables created inside are mirrored on every replica."""
    return self.strategy.scope()

  def run_sharded(self, fn: Callable, sharded: Sequence, *broadcast):
    """`fn(*shards, *broadcast)` on every replica; returns the per-replica results.

    Args:
      fn: traced once per replica, in replica context.
      sharded: tensors whose first axis is the global batch; replica r gets
        rows [r*s, (r+1)*s), s = ceil(n / replicas) (the last ones may get
        fewer, or none).
      broadcast: values every replica gets whole.
    """
    replicas = self.num_replicas

    def on_replica(*args):
      tensors, rest = args[:len(sharded)], args[len(sharded):]
      size = tf.shape(tensors[0])[0]
      per_replica = (size + replicas - 1) // replicas
      index = tf.distribute.get_replica_context().replica_id_in_sync_group
      start = tf.minimum(tf.cast(index, tf.int32) * per_replica, size)
      end = tf.minimum(start + per_replica, size)
      with _shard_scope(_Shard(start, size)):
        return fn(*[t[start:end] for t in tensors], *rest)

    return self.strategy.run(on_replica, args=(*sharded, *broadcast))

  def sum(self, per_replica):
    """The sum over the replicas of per-replica values (a nest)."""
    return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

  def first(self, per_replica):
    """Replica 0's values (of values every replica computes alike, e.g. learning rates)."""
    return tf.nest.map_structure(lambda v: self.strategy.experimental_local_results(v)[0],
                                 per_replica)


def make_distribution(distribution: str, cpu_replicas: int = 0) -> Optional[Distribution]:
  """The `Distribution` of the flags; None for "default" (no strategy at all).

  "mirrored": a `MirroredStrategy` over `cpu_replicas` logical CPU devices
  (made here if TensorFlow has not started yet) or else over the visible GPUs.

  Raises:
    ValueError: the devices are missing (see `configure_devices`).
  """
  if distribution == "default":
    return None
  if cpu_replicas:
    configure_devices(cpu_replicas)
    devices = [f"/cpu:{i}" for i in range(cpu_replicas)]
  else:
    devices = [device.name for device in tf.config.list_logical_devices("GPU")]
    if not devices:
      raise ValueError("--distribution=mirrored needs a GPU or --cpu_replicas=N")
  # tf.distribute logs every reduction it plans at INFO, twice (TensorFlow's
  # logger and absl's); one line of ours says what runs.
  tf.get_logger().setLevel("WARNING")
  strategy = tf.distribute.MirroredStrategy(devices)
  logging.info("MirroredStrategy over %d replicas: %s", len(devices), ", ".join(devices))
  return Distribution(strategy)
