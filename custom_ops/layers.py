"""Keras layer wrapping the J-SquaredReLU op (`custom_ops.jsrelu`)."""

import keras

from robust_sparse.custom_ops.jsrelu_op import jsrelu, supports_xla


@keras.saving.register_keras_serializable(package="robust_sparse")
class JSquaredReLU(keras.layers.Layer):
  """J-SquaredReLU activation: x + x^2/2 for x >= 0, else 0; f'(x) = x + 1.

  Runs the compiled op when available on the CPU, else the identical
  pure-TensorFlow fallback (on a GPU always; see `custom_ops.jsrelu_op`). The
  compiled op has no XLA kernel, so with it `supports_jit` is False (Keras'
  `jit_compile="auto"` and the toolkit's trainer then train without XLA);
  with the fallback it is True. Decided when the layer is built.

  Input shape: any. Output shape: same as the input.
  """

  # Where the activation is zero (spec 2.1): x-region and |y| tolerance.
  habitat = {"x": ((-1e32, 0.0),), "y": ((-1e-6, 1e-6),)}

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.supports_jit = supports_xla()

  def call(self, inputs):
    return jsrelu(inputs)

  def compute_output_shape(self, input_shape):
    return input_shape
