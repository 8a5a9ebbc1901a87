"""Attacks that compile themselves when called eagerly (from a notebook or a script).

Inside a `tf.function` (a compiled train step, a user's own function) an attack
is plain graph code. Called eagerly it would run op by op, several times slower
than the same code compiled, so `run` traces it once into a `tf.function` and
caches that per model and static arguments (the budget, the number of steps,
which of `y` and `seed` are given, the shape of one example). The batch
dimension is left unknown in the input signature, so new batches never
retrace. The cache holds models weakly: a function is dropped with its model,
and the function itself reaches the model only through a weak reference.

Any built Keras model (Sequential, functional, subclassed) is compiled, with
XLA where its layers allow it and XLA makes it faster on this machine
(`robust_sparse.training.compilation`: not for convolutions or pooling on a CPU, where
the engine does not use it either); a model not built yet runs its first call
uncompiled, which builds it. A plain callable (a lambda around a model) is
compiled as a plain graph, since it may hide layers without XLA kernels.
"""

import weakref
from typing import Any, Callable, Dict, Optional

import numpy as np
import tensorflow as tf

from robust_sparse.training import compilation

# model -> {key: tf.function}; see `run`.
_CACHE: "weakref.WeakKeyDictionary[Any, Dict[tuple, Any]]" = weakref.WeakKeyDictionary()


def run(graph_fn: Callable, model, x, y, seed, static: Dict[str, Any], random: bool):
  """Runs `graph_fn(model, x, y, seed, **static)`, compiled and cached when called eagerly.

  Args:
    graph_fn: the attack as graph code; `y` and `seed` may be None.
    model: the attacked callable (usually a Keras model).
    x: the clean batch.
    y: labels or None.
    seed: a shape-[2] stateless seed or None.
    static: the Python arguments that shape the graph (eps, steps, ...).
    random: whether the attack draws random numbers. Eagerly, `seed=None` then
      draws a fresh stateless seed from the global generator, so repeated calls
      differ (as stateful randomness would) while one function serves them all.

  Returns:
    The adversarial batch.
  """
  if tf.inside_function():
    return graph_fn(model, tf.convert_to_tensor(x), y, seed, **static)
  x = tf.convert_to_tensor(x)
  if y is not None:
    y = tf.convert_to_tensor(y)
  if random and seed is None:
    seed = tf.random.uniform([2], maxval=np.iinfo(np.int32).max, dtype=tf.int32)
  elif not random:
    seed = None
  if seed is not None:
    seed = tf.convert_to_tensor(seed)
  function = _cached_function(graph_fn, model, x, y, seed, static)
  if function is None:
    return graph_fn(model, x, y, seed, **static)
  return function(*[t for t in (x, y, seed) if t is not None])


def cached_functions(model) -> Dict[tuple, Any]:
  """The compiled attacks cached for `model` (for tests and introspection)."""
  try:
    return dict(_CACHE.get(model, {}))
  except TypeError:
    return {}


def _python_value(value):
  """A hashable Python value for a static argument, or None if it has none."""
  if isinstance(value, tf.Tensor):
    if value.shape.rank != 0:
      return None
    value = value.numpy()
  if isinstance(value, np.generic):
    value = value.item()
  try:
    hash(value)
  except TypeError:
    return None
  return value


def _cached_function(graph_fn, model, x, y, seed, static) -> Optional[Any]:
  """The cached `tf.function` for this call, built on first use; None: run uncompiled."""
  values = {}
  for name, value in static.items():
    value = _python_value(value)
    if value is None:
      return None
    values[name] = value
  if not _ready(model):
    return None
  signature = [tf.TensorSpec([None, *x.shape[1:]], x.dtype)]
  if y is not None:
    signature.append(tf.TensorSpec([None, *y.shape[1:]], y.dtype))
  if seed is not None:
    signature.append(tf.TensorSpec(seed.shape, seed.dtype))
  key = (graph_fn, tuple(sorted(values.items())), tuple(signature), y is not None)
  try:
    functions = _CACHE.setdefault(model, {})
  except TypeError:  # Not weakly referenceable (or not hashable): no cache.
    return None
  if key not in functions:
    functions[key] = _compile(graph_fn, weakref.ref(model), values, signature,
                              has_y=y is not None, has_seed=seed is not None,
                              jit=_use_xla(model))
  return functions[key]


def _compile(graph_fn, model_ref, static, signature, has_y, has_seed, jit):
  def attack(*args):
    args = list(args)
    x = args.pop(0)
    y = args.pop(0) if has_y else None
    seed = args.pop(0) if has_seed else None
    return graph_fn(model_ref(), x, y, seed, **static)

  return tf.function(attack, input_signature=signature, jit_compile=jit)


def _ready(model) -> bool:
  """False for a Keras model that is not built yet: tracing would create its variables."""
  return getattr(model, "built", True)


def _use_xla(model) -> bool:
  """XLA for a Keras model whose layers all have XLA kernels and run faster in it.

  A plain callable (a lambda around a model) may hide layers without XLA
  kernels, so it is not jit-compiled.
  """
  if not hasattr(model, "_flatten_layers"):
    return False
  return compilation.supports_xla(model) and compilation.xla_pays_off(model)
