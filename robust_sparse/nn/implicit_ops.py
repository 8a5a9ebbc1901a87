"""Implicit sparse perturbation's ops (SSAM, spec 4.4): dense outputs, masked input gradients.

`implicit_dense` and `implicit_conv2d` compute a layer's output with the dense
kernel but back-propagate the input gradient through `kernel * mask`, leaving
the kernel's own gradient dense: the seed's SAMConv ascent pass. The masked
layers call them under `robust_sparse.nn.layers.implicit_backprop`; SSAM
(`robust_sparse.training.sharpness.ssam`) builds the masks.
"""

import tensorflow as tf

# Why not a custom-gradient identity on the kernel: the forward pass must use
# the dense kernel, and an op's input gradient is computed from the kernel it
# was given, so no function of the kernel alone can mask the input gradient
# while keeping the output exact. The gradient of the whole linear op is
# replaced instead.
def implicit_dense(x, kernel, mask):
  """`x @ kernel` whose input gradient flows through `kernel * mask` (spec 4.4).

  The output and the kernel gradient are those of `x @ kernel`; the gradient
  w.r.t. `x` is `dy @ (kernel * mask)^T`. The mask gets no gradient.

  Args:
    x: inputs `[..., in]`.
    kernel: `[in, out]` (a variable or tensor).
    mask: 0/1 of the kernel's shape.

  Returns:
    `[..., out]`.
  """
  x = tf.convert_to_tensor(x)
  # A tensor, not the variable: the read is differentiable, so the variable
  # still gets the gradient through it (a variable inside a custom gradient
  # would need the `variables` protocol).
  kernel = tf.convert_to_tensor(kernel)
  mask = tf.cast(tf.convert_to_tensor(mask), kernel.dtype)

  @tf.custom_gradient
  def dense(x, kernel, mask):

    def grad(dy):
      dx = tf.matmul(dy, kernel * mask, transpose_b=True)
      fan_in, units = kernel.shape
      dk = tf.matmul(tf.reshape(x, [-1, fan_in]), tf.reshape(dy, [-1, units]),
                     transpose_a=True)
      return dx, dk, None

    return tf.matmul(x, kernel), grad

  return dense(x, kernel, mask)


def implicit_conv2d(x, kernel, mask, strides=1, padding="VALID", dilations=1):
  """`tf.nn.conv2d(x, kernel)` whose input gradient flows through `kernel * mask`.

  The seed's SAMConv ascent pass (spec 4.4): the output and the kernel
  gradient are the dense convolution's (computed by the same ops as
  `tf.nn.conv2d`'s own gradient), the input gradient is the transposed
  convolution with the masked kernel. NHWC.

  Args:
    x: `[batch, height, width, in]`.
    kernel: `[kh, kw, in, out]`.
    mask: 0/1 of the kernel's shape.
    strides, dilations: an int or a list, as `tf.nn.conv2d`.
    padding: "VALID" or "SAME" (any case, as Keras' `padding`).

  Returns:
    `[batch, out_height, out_width, out]`.
  """
  x = tf.convert_to_tensor(x)
  kernel = tf.convert_to_tensor(kernel)
  mask = tf.cast(tf.convert_to_tensor(mask), kernel.dtype)
  padding = padding.upper()

  def four(value):
    value = [value] * 2 if isinstance(value, int) else list(value)
    return [1] + value + [1] if len(value) == 2 else value

  strides, dilations = four(strides), four(dilations)

  @tf.custom_gradient
  def conv(x, kernel, mask):

    def grad(dy):
      dx = tf.raw_ops.Conv2DBackpropInput(
          input_sizes=tf.shape(x), filter=kernel * mask, out_backprop=dy, strides=strides,
          padding=padding, dilations=dilations)
      dk = tf.raw_ops.Conv2DBackpropFilter(
          input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=strides,
          padding=padding, dilations=dilations)
      return dx, dk, None

    return tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations), grad

  return conv(x, kernel, mask)
