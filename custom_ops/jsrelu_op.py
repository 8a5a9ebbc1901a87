"""J-SquaredReLU: the compiled op, its pure-TensorFlow reference and the switch.

    f(x)  = x + x^2/2  for x >= 0, else 0      (= ((x+1)^2 - 1)/2 * 1[x >= 0])
    f'(x) = x + 1      for x >= 0, else 0      (1 at x = 0: the paper's choice)

`jsrelu(x)` runs the compiled op (`jsrelu_op.cc`), building it on first use if
the library is missing or older than its source. When the op cannot be had (no
compiler, a compile error, `ROBUST_SPARSE_DISABLE_CUSTOM_OPS=1`), or a GPU is
visible (the op has a CPU kernel only: each call would copy the activations to
the host and back), it runs the pure-TensorFlow reference instead, which gives
bit-identical numbers and, unlike the op, compiles with XLA (`supports_xla()`:
the layers then let the trainer jit-compile the step). The log says once which
of the two is in use and why.

Half-precision inputs are computed in float32 and rounded once, by both
implementations, so that they agree exactly.
"""

import os
import threading
from typing import Optional

from absl import logging
import tensorflow as tf

from robust_sparse.custom_ops import build as build_lib

# Set to 1 (or true/yes) to force the pure-TensorFlow fallback.
DISABLE_ENV_VAR = "ROBUST_SPARSE_DISABLE_CUSTOM_OPS"
CUSTOM_OP = "custom_op"
FALLBACK = "fallback"
IMPLEMENTATIONS = (CUSTOM_OP, FALLBACK)

_HALF_TYPES = (tf.float16, tf.bfloat16)
_lock = threading.Lock()
_library = None  # The loaded op module, once loaded.
_load_error: Optional[str] = None  # Why loading failed, once it has.
_logged = set()  # (implementation, reason) pairs already logged.


def _disabled_by_env() -> bool:
  value = os.environ.get(DISABLE_ENV_VAR, "").strip().lower()
  return value not in ("", "0", "false", "no")


def _log_once(implementation: str, reason: str) -> None:
  key = (implementation, reason)
  if key in _logged:
    return
  _logged.add(key)
  if implementation == CUSTOM_OP:
    logging.info("J-SquaredReLU: using the compiled custom op (%s)", reason)
  else:
    logging.warning(
        "J-SquaredReLU: using the pure-TensorFlow fallback (same numbers, "
        "slower) because %s", reason)


def _register_gradients() -> None:
  """Registers the gradients of both ops (second order included, for HVPs)."""

  @tf.RegisterGradient("JSquaredReLU")
  def _jsquared_relu_grad(op, grad):
    return _library.j_squared_re_lu_grad(grad, op.inputs[0])

  @tf.RegisterGradient("JSquaredReLUGrad")
  def _jsquared_relu_grad_grad(op, grad):
    upstream, features = op.inputs
    # d/d(upstream) = f'(x) * grad; d/dx = upstream * f''(x) * grad, f'' = 1.
    return (_library.j_squared_re_lu_grad(grad, features),
            tf.where(features >= 0, grad * upstream, tf.zeros_like(grad)))


def load_library():
  """Loads the compiled op, building it first if needed.

  Tried once per process; later calls return the cached outcome.

  Returns:
    The op module (with `j_squared_re_lu` and `j_squared_re_lu_grad`), or None
    if it cannot be built or loaded; `load_error()` then says why.
  """
  global _library, _load_error
  with _lock:
    if _library is not None or _load_error is not None:
      return _library
    try:
      path = build_lib.ensure_built()
      try:
        library = tf.load_op_library(str(path))
      except tf.errors.NotFoundError:
        # Typically a library built against another TensorFlow version (its
        # timestamps look fresh): rebuild once against this one.
        path = build_lib.build(force=True)
        library = tf.load_op_library(str(path))
    except Exception as error:  # pylint: disable=broad-except
      # Any failure leaves the fallback, which is always correct.
      _load_error = f"{type(error).__name__}: {error}"
      return None
    _library = library
    _register_gradients()
    return _library


def load_error() -> Optional[str]:
  """Why the compiled op could not be loaded (None if it loaded or untried)."""
  return _load_error


def gpu_visible() -> bool:
  """Whether TensorFlow sees a GPU (where the op, CPU-only, would copy to the host)."""
  return bool(tf.config.list_physical_devices("GPU"))


def active_implementation() -> str:
  """Returns which implementation `jsrelu` uses now: CUSTOM_OP or FALLBACK.

  Loads (and if needed builds) the library, and logs the choice once. With a
  visible GPU it is always FALLBACK: the op has a CPU kernel only, so every
  call would copy the activations to the host and back, while the
  pure-TensorFlow implementation stays on the device and compiles with XLA.
  """
  if _disabled_by_env():
    _log_once(FALLBACK, f"${DISABLE_ENV_VAR} is set")
    return FALLBACK
  if gpu_visible():
    _log_once(FALLBACK, "a GPU is visible and the compiled op has a CPU kernel only; the "
              "pure-TensorFlow implementation stays on the GPU and is compiled with XLA")
    return FALLBACK
  if load_library() is None:
    # One line: the compiler output is for `python -m robust_sparse.custom_ops.build`.
    first_line = _load_error.splitlines()[0]
    _log_once(FALLBACK, f"the custom op is unavailable ({first_line}); run "
              "`python -m robust_sparse.custom_ops.build` to see the full compiler output")
    return FALLBACK
  _log_once(CUSTOM_OP, str(build_lib.LIBRARY_PATH))
  return CUSTOM_OP


@tf.custom_gradient
def _reference_full_precision(x):
  positive = x >= 0
  # Same operation order as the C++ kernel (x + (x*x)*0.5), hence same rounding.
  y = tf.where(positive, x + x * x * 0.5, tf.zeros_like(x))

  def grad(upstream):
    return tf.where(positive, upstream * (x + 1), tf.zeros_like(x))

  return y, grad


def supports_xla() -> bool:
  """Whether layers calling `jsrelu` can be compiled with XLA (the fallback can, the op not)."""
  return active_implementation() == FALLBACK


def jsrelu_reference(x) -> tf.Tensor:
  """J-SquaredReLU in plain TensorFlow ops, with the paper's custom gradient.

  Args:
    x: a float tensor (float16, bfloat16, float32 or float64), any shape.

  Returns:
    A tensor like `x`.
  """
  x = tf.convert_to_tensor(x)
  if x.dtype in _HALF_TYPES:
    return tf.cast(_reference_full_precision(tf.cast(x, tf.float32)), x.dtype)
  return _reference_full_precision(x)


def jsrelu(x, implementation: Optional[str] = None) -> tf.Tensor:
  """J-SquaredReLU, by the compiled op when available (see the module doc).

  Args:
    x: a float tensor (float16, bfloat16, float32 or float64), any shape.
    implementation: None picks automatically (`active_implementation()`);
      CUSTOM_OP insists on the compiled op; FALLBACK forces the reference.

  Returns:
    A tensor like `x`.

  Raises:
    ValueError: for an unknown `implementation`.
    RuntimeError: if CUSTOM_OP is asked for and cannot be built or loaded.
  """
  if implementation is None:
    implementation = active_implementation()
  elif implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or "
                     f"None, got {implementation!r}")
  if implementation == FALLBACK:
    return jsrelu_reference(x)
  library = load_library()
  if library is None:
    raise RuntimeError(
        f"the J-SquaredReLU custom op is unavailable: {_load_error}. Install "
        "g++ and run `python -m robust_sparse.custom_ops.build` to see why")
  return library.j_squared_re_lu(x)
