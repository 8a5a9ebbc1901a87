"""Compiled TensorFlow ops of the toolkit, each with a pure-TensorFlow fallback.

  jsrelu(x)                 J-SquaredReLU by the compiled op (or the fallback)
  jsrelu_reference(x)       the pure-TensorFlow reference (tf.custom_gradient)
  active_implementation()   "custom_op" or "fallback"
  JSquaredReLU              Keras layer using `jsrelu`

Build by hand with `python -m robust_sparse.custom_ops.build`; see custom_ops/README.md.

The bottom layer: imports nothing else of the toolkit.
"""

import importlib

# Resolved on first access (PEP 562), so that `python -m robust_sparse.custom_ops.build`
# does not import the package's TensorFlow modules before its own.
_EXPORTS = {
    "CUSTOM_OP": "robust_sparse.custom_ops.jsrelu_op",
    "DISABLE_ENV_VAR": "robust_sparse.custom_ops.jsrelu_op",
    "FALLBACK": "robust_sparse.custom_ops.jsrelu_op",
    "active_implementation": "robust_sparse.custom_ops.jsrelu_op",
    "jsrelu": "robust_sparse.custom_ops.jsrelu_op",
    "jsrelu_reference": "robust_sparse.custom_ops.jsrelu_op",
    "load_error": "robust_sparse.custom_ops.jsrelu_op",
    "load_library": "robust_sparse.custom_ops.jsrelu_op",
    "JSquaredReLU": "robust_sparse.custom_ops.layers",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'custom_ops' has no attribute {name!r}")
  return getattr(importlib.import_module(_EXPORTS[name]), name)
