"""Masked Keras layers: the kernel is multiplied by a 0/1 mask in every call.

`MaskedDense` and `MaskedConv2D` take exactly the constructor arguments of
`keras.layers.Dense` and `keras.layers.Conv2D`. The mask is a non-trainable
weight of the kernel's shape (as in tensorflow/model-optimization), so it is
saved with the model; because the layer computes with `kernel * mask`, a pruned
weight contributes nothing to the outputs and receives a zero gradient.
"""

import keras
from keras import ops


class _MaskedKernelMixin:
  """Adds the `mask` weight and masks the kernel the base layer computes with."""

  def _build_mask(self):
    self.mask = self.add_weight(
        name="mask", shape=tuple(self._kernel.shape), initializer="ones",
        trainable=False, dtype=self.variable_dtype)

  @property
  def kernel(self):
    kernel = super().kernel
    mask = getattr(self, "mask", None)
    if mask is None:  # Only while building.
      return kernel
    return ops.multiply(kernel, ops.cast(mask, kernel.dtype))

  @property
  def raw_kernel(self):
    """The stored kernel variable, not multiplied by the mask."""
    return self._kernel

  # The base layers save `self.kernel` (masked here) by position and leave out
  # the mask. We save the raw kernel, so that a reload restores every value, and
  # the mask under a key of its own. LoRA / quantized layers keep Keras' format.
  def save_own_variables(self, store):
    if not self.built:
      return
    if self.lora_enabled or getattr(self, "quantization_mode", None):
      super().save_own_variables(store)
    else:
      for i, variable in enumerate([self._kernel] + ([self.bias] if self.use_bias else [])):
        store[str(i)] = variable
    store["mask"] = self.mask

  def load_own_variables(self, store):
    super().load_own_variables(store)
    if self.built:
      self.mask.assign(store["mask"])


@keras.saving.register_keras_serializable(package="robust_sparse")
class MaskedDense(_MaskedKernelMixin, keras.layers.Dense):
  """`keras.layers.Dense` computing `activation(x @ (kernel * mask) + bias)`."""

  def build(self, input_shape):
    super().build(input_shape)
    self._build_mask()


@keras.saving.register_keras_serializable(package="robust_sparse")
class MaskedConv2D(_MaskedKernelMixin, keras.layers.Conv2D):
  """`keras.layers.Conv2D` convolving with `kernel * mask`."""

  def build(self, input_shape):
    super().build(input_shape)
    self._build_mask()


MASKED_LAYER_TYPES = (MaskedDense, MaskedConv2D)


def masked_layers(model):
  """The masked layers of `model`, in the order they compute."""
  return [layer for layer in model._flatten_layers(include_self=False)
          if isinstance(layer, MASKED_LAYER_TYPES)]
