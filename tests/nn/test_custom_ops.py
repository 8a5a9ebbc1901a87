"""Tests of the compiled J-SquaredReLU op against its pure-TensorFlow reference.

The op must build here: when the compiler is missing these tests fail with the
build error instead of skipping, so a silently slow fallback cannot pass CI.
"""

import logging
import os
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse import custom_ops
from robust_sparse.custom_ops import build as build_lib
from robust_sparse.custom_ops import jsrelu_op

DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)
# Zero exactly, both sides of it, moderate and large magnitudes.
POINTS = np.array([-1e3, -7.5, -1.0, -1e-3, -0.0, 0.0, 1e-3, 0.25, 1.0, 3.0,
                   7.5, 1e3])


@pytest.fixture(scope="module", autouse=True)
def compiled_op():
  library = custom_ops.load_library()
  if library is None:
    pytest.fail("the J-SquaredReLU op did not build or load: "
                f"{custom_ops.load_error()}")
  return library


def _points(dtype, random_count=1000):
  rng = np.random.default_rng(0)
  values = np.concatenate([POINTS, rng.standard_normal(random_count) * 4])
  return tf.cast(values, dtype)


def _forward_and_grad(function, x, upstream):
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = function(x)
  return y, tape.gradient(y, x, output_gradients=upstream)


def _as_float64(tensor):
  return tf.cast(tensor, tf.float64).numpy()


def _op(x):
  return custom_ops.jsrelu(x, implementation=custom_ops.CUSTOM_OP)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_op_equals_reference_bit_for_bit(dtype, graph):
  # Both compute half types in float32 and round once, in the same order.
  x = _points(dtype)
  upstream = tf.cast(np.random.default_rng(1).standard_normal(x.shape[0]),
                     dtype)
  op, reference = _op, custom_ops.jsrelu_reference
  if graph:
    op, reference = tf.function(op), tf.function(reference)
  y, dx = _forward_and_grad(op, x, upstream)
  y_ref, dx_ref = _forward_and_grad(reference, x, upstream)
  assert y.dtype == dtype and dx.dtype == dtype
  np.testing.assert_array_equal(_as_float64(y), _as_float64(y_ref))
  np.testing.assert_array_equal(_as_float64(dx), _as_float64(dx_ref))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_op_matches_formula(dtype):
  x = _points(dtype)
  y, dx = _forward_and_grad(_op, x, tf.ones_like(x))
  values = _as_float64(x)
  positive = values >= 0
  expected_y = np.where(positive, values + values**2 / 2, 0.0)
  expected_dx = np.where(positive, values + 1, 0.0)
  tolerance = {tf.float16: 1e-3, tf.bfloat16: 8e-3}.get(dtype, 1e-6)
  if dtype == tf.float16:
    # float16 overflows at 1e3 (5e5 > 65504): inf is the right answer there.
    expected_y = _as_float64(tf.cast(expected_y, dtype))
  np.testing.assert_allclose(_as_float64(y), expected_y, rtol=tolerance)
  np.testing.assert_allclose(_as_float64(dx), expected_dx, rtol=tolerance)
  at_zero = np.flatnonzero(values == 0)
  assert at_zero.size == 2  # -0.0 and 0.0
  np.testing.assert_array_equal(_as_float64(y)[at_zero], 0.0)
  np.testing.assert_array_equal(_as_float64(dx)[at_zero], 1.0)  # paper: 1


def test_streaming_path_of_large_tensors_is_exact():
  # Outputs >= 16 MiB take the non-temporal store path, with an unaligned
  # start when the tensor is a slice.
  x = tf.random.stateless_normal([(16 << 20) // 4 + 5], seed=[1, 2])[1:]
  upstream = tf.random.stateless_normal(x.shape, seed=[3, 4])
  y, dx = _forward_and_grad(_op, x, upstream)
  y_ref, dx_ref = _forward_and_grad(custom_ops.jsrelu_reference, x, upstream)
  np.testing.assert_array_equal(y.numpy(), y_ref.numpy())
  np.testing.assert_array_equal(dx.numpy(), dx_ref.numpy())


def test_numeric_gradient_away_from_zero():
  x = tf.constant([-2.0, -0.7, -0.1, 0.1, 0.6, 1.9, 4.0], tf.float64)
  theoretical, numerical = tf.test.compute_gradient(_op, [x], delta=1e-6)
  np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)


def test_second_derivative_matches_reference():
  x = tf.constant([-1.5, -0.2, 0.0, 0.3, 2.0], tf.float64)
  upstream = tf.constant([0.5, -1.0, 2.0, 3.0, -0.25], tf.float64)

  def hessian_vector(function):
    with tf.GradientTape() as outer:
      outer.watch([x, upstream])
      with tf.GradientTape() as inner:
        inner.watch(x)
        y = function(x)
      dx = inner.gradient(y, x, output_gradients=upstream)
    return outer.gradient(dx, [x, upstream])

  for ours, theirs in zip(hessian_vector(_op),
                          hessian_vector(custom_ops.jsrelu_reference)):
    np.testing.assert_array_equal(ours.numpy(), theirs.numpy())


def _reset_logged(monkeypatch):
  monkeypatch.setattr(jsrelu_op, "_logged", set())


def test_env_var_forces_the_fallback_and_logs_once(monkeypatch, caplog):
  _reset_logged(monkeypatch)
  monkeypatch.setenv(custom_ops.DISABLE_ENV_VAR, "1")
  x = _points(tf.float32)
  with caplog.at_level(logging.WARNING):
    assert custom_ops.active_implementation() == custom_ops.FALLBACK
    y, dx = _forward_and_grad(custom_ops.jsrelu, x, tf.ones_like(x))
    assert custom_ops.active_implementation() == custom_ops.FALLBACK
  messages = [r.getMessage() for r in caplog.records if "fallback" in
              r.getMessage()]
  assert len(messages) == 1, messages
  assert custom_ops.DISABLE_ENV_VAR in messages[0]
  y_op, dx_op = _forward_and_grad(_op, x, tf.ones_like(x))
  np.testing.assert_array_equal(y.numpy(), y_op.numpy())
  np.testing.assert_array_equal(dx.numpy(), dx_op.numpy())
  monkeypatch.setenv(custom_ops.DISABLE_ENV_VAR, "0")
  assert custom_ops.active_implementation() == custom_ops.CUSTOM_OP


def test_a_visible_gpu_takes_the_xla_compilable_fallback_and_says_so(monkeypatch, caplog):
  """On a GPU the CPU-only op would copy every activation to the host and back."""
  _reset_logged(monkeypatch)
  monkeypatch.delenv(custom_ops.DISABLE_ENV_VAR, raising=False)
  assert custom_ops.active_implementation() == custom_ops.CUSTOM_OP  # This CPU machine.
  assert not custom_ops.JSquaredReLU().supports_jit
  monkeypatch.setattr(jsrelu_op, "gpu_visible", lambda: True)
  with caplog.at_level(logging.WARNING):
    assert custom_ops.active_implementation() == custom_ops.FALLBACK
  assert any("a GPU is visible" in r.getMessage() and "XLA" in r.getMessage()
             for r in caplog.records)
  layer = custom_ops.JSquaredReLU()
  assert layer.supports_jit
  from robust_sparse.nn import activations  # pylint: disable=import-outside-toplevel
  assert activations.build("mixed(steps=10)").supports_jit
  x = _points(tf.float32)
  compiled = tf.function(layer, jit_compile=True)  # XLA accepts the fallback.
  np.testing.assert_array_equal(compiled(x).numpy(), _op(x).numpy())


def test_failed_build_falls_back_and_says_why(monkeypatch, caplog):
  _reset_logged(monkeypatch)
  monkeypatch.delenv(custom_ops.DISABLE_ENV_VAR, raising=False)

  def no_compiler():
    raise build_lib.BuildError("C++ compiler 'g++' not found")

  # A fresh process whose build fails: nothing loaded, nothing failed yet.
  monkeypatch.setattr(jsrelu_op, "_library", None)
  monkeypatch.setattr(jsrelu_op, "_load_error", None)
  monkeypatch.setattr(build_lib, "ensure_built", no_compiler)
  with caplog.at_level(logging.WARNING):
    assert custom_ops.active_implementation() == custom_ops.FALLBACK
  assert "not found" in custom_ops.load_error()
  assert any("not found" in r.getMessage() for r in caplog.records)
  x = _points(tf.float64)
  np.testing.assert_array_equal(custom_ops.jsrelu(x).numpy(),
                                custom_ops.jsrelu_reference(x).numpy())
  with pytest.raises(RuntimeError, match="robust_sparse.custom_ops.build"):
    custom_ops.jsrelu(x, implementation=custom_ops.CUSTOM_OP)
  with pytest.raises(ValueError, match="implementation"):
    custom_ops.jsrelu(x, implementation="cuda")


def test_needs_build_follows_timestamps(tmp_path):
  library = tmp_path / "lib.so"
  assert build_lib.needs_build(library)
  library.write_bytes(b"")
  newest_source = max(path.stat().st_mtime for path in build_lib.SOURCES)
  os.utime(library, (newest_source - 10, newest_source - 10))
  assert build_lib.needs_build(library)
  now = time.time() + 10
  os.utime(library, (now, now))
  assert not build_lib.needs_build(library)


def test_missing_compiler_is_a_clear_build_error(monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler-xyz")
  with pytest.raises(build_lib.BuildError, match="python -m robust_sparse.custom_ops.build"):
    build_lib.compiler()


def _tiny_model():
  inputs = keras.Input((3,))
  hidden = keras.layers.Dense(4, name="dense")(inputs)
  outputs = custom_ops.JSquaredReLU(name="activation_0")(hidden)
  return keras.Model(inputs, outputs)


def test_layer_survives_keras_save_and_reload(tmp_path):
  keras.utils.set_random_seed(0)
  model = _tiny_model()
  x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
  path = str(tmp_path / "model.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  assert isinstance(reloaded.get_layer("activation_0"), custom_ops.JSquaredReLU)
  np.testing.assert_array_equal(model(x).numpy(), reloaded(x).numpy())


def test_layer_turns_xla_off_for_training():
  keras.utils.set_random_seed(0)
  model = _tiny_model()
  assert model.get_layer("activation_0").supports_jit is False
  model.compile(optimizer="sgd", loss="mse", jit_compile="auto")
  assert model.jit_compile is False
  x = np.ones((4, 3), np.float32)
  history = model.fit(x, np.ones((4, 4), np.float32), epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])
