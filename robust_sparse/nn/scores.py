"""Importance scores on the masked layers: learning which weights to keep (HYDRA).

HYDRA (Sehwag et al., NeurIPS 2020; inspire-group/hydra, after allenai's
hidden-networks) gives every weight of a prunable layer a score `s`. The layer
computes with `w * m * topk(|s|)`, where `topk` keeps the `keep_fraction`
largest scores of the layer by magnitude (1) and drops the others (0), and `m`
is the layer's own pruning mask (all ones on a dense network). The top-k has no
gradient; HYDRA passes the gradient of its output straight through to `|s|`:

    dL/ds = dL/dw_eff * w * m * sign(s)        (w_eff = w * m * topk(|s|))

(`GetSubnet.backward` returns its upstream gradient unchanged; the `abs`
before it contributes `sign(s)`). With the weights frozen and the scores
trained by SGD on the robust loss, the top-k is the sub-network HYDRA keeps.

`ScoredDense` / `ScoredConv2D` are `MaskedDense` / `MaskedConv2D` with one more
trainable weight, `scores`, of the kernel's shape; `with_scores(model,
keep_fraction)` copies a model with every masked layer scored. The masked
layers themselves are unchanged (no scores, no cost). Everything is tensors
inside the layer's `call`, so the scored layers compile and run under the
step library's `stateless_call` like the masked ones.
"""

import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from robust_sparse.nn import layers as layers_lib


def kept_count(size: int, keep_fraction: float) -> int:
  """How many of `size` weights a top-`keep_fraction` mask keeps.

  HYDRA's `GetSubnet` drops the int((1 - k) * size) lowest scores and keeps
  the rest, so a fraction in (0, 1] keeps at least one weight.
  """
  return size - int((1.0 - keep_fraction) * size)


def fan_in(shape) -> int:
  """The fan-in of a Keras kernel (inputs first, outputs last): Dense (in, out) -> in,
  Conv2D (kh, kw, in, out) -> kh * kw * in (PyTorch's `fan_in` of the same weight)."""
  return int(np.prod(shape[:-1]))


def scaled_score_init(kernel):
  """HYDRA's `--scaled-score-init`: s = sqrt(6 / fan_in) * w / max|w|.

  Scores proportional to the weights, on the scale of a Kaiming-uniform
  initialisation; the first top-k is therefore magnitude pruning.

  Args:
    kernel: a kernel array or tensor (Keras layout).

  Returns:
    A float tensor of the kernel's shape (zeros for an all-zero kernel).
  """
  kernel = ops.convert_to_tensor(kernel)
  largest = ops.max(ops.abs(kernel))
  scale = math.sqrt(6.0 / fan_in(tuple(kernel.shape)))
  return ops.where(largest > 0, scale * kernel / ops.maximum(largest, 1e-30),
                   ops.zeros_like(kernel))


def topk_mask(scores, keep_fraction: float):
  """0/1 mask of `scores`' shape keeping the `kept_count` largest |scores| (ties: the
  first in row-major order)."""
  scores = tf.convert_to_tensor(scores)
  flat = tf.reshape(tf.abs(scores), [-1])
  size = int(flat.shape[0])
  _, indices = tf.math.top_k(flat, k=kept_count(size, keep_fraction), sorted=False)
  kept = tf.scatter_nd(indices[:, None], tf.ones_like(indices, scores.dtype), [size])
  return tf.reshape(kept, tf.shape(scores))


@tf.custom_gradient
def _straight_through(magnitudes, mask):
  """`mask`, whose gradient passes to `magnitudes` unchanged (HYDRA's `GetSubnet`)."""

  def grad(upstream):
    return upstream, None

  return tf.identity(mask), grad


def score_mask(scores, keep_fraction: float):
  """The top-k mask of `|scores|` with HYDRA's straight-through gradient to `scores`."""
  scores = tf.convert_to_tensor(scores)
  return _straight_through(tf.abs(scores), tf.stop_gradient(topk_mask(scores, keep_fraction)))


class _ScoredKernelMixin:
  """What `ScoredDense` and `ScoredConv2D` add to the masked layers: the scores."""

  def __init__(self, *args, keep_fraction: float = 1.0, **kwargs):
    if not 0.0 < keep_fraction <= 1.0:
      raise ValueError(f"keep_fraction must be in (0, 1], received: {keep_fraction}")
    if kwargs.get("lora_rank"):
      raise ValueError(f"{type(self).__name__} takes no LoRA (received lora_rank="
                       f"{kwargs['lora_rank']}): the scores select the kernel's weights")
    super().__init__(*args, **kwargs)
    self.keep_fraction = float(keep_fraction)

  def build(self, input_shape):
    super().build(input_shape)
    self.scores = self.add_weight(name="scores", shape=tuple(self._kernel.shape),
                                  initializer="zeros", trainable=True,
                                  dtype=self.variable_dtype)
    self.scores.assign(scaled_score_init(self._kernel))

  def enable_lora(self, *args, **kwargs):
    raise ValueError(f"{type(self).__name__} '{self.name}' takes no LoRA: the scores select "
                     "the kernel's weights")

  def score_mask(self):
    """The current 0/1 top-k mask of the scores (without the layer's own mask)."""
    return topk_mask(self.scores, self.keep_fraction)

  @property
  def masked_kernel(self):
    """`kernel * mask * topk(|scores|)`, with the straight-through gradient to the scores.

    Also inside `masks_hold()`: the promise covers the mask, not the scores.
    """
    kernel = ops.multiply(self._kernel, ops.cast(self.mask, self._kernel.dtype))
    return ops.multiply(kernel, ops.cast(score_mask(self.scores, self.keep_fraction),
                                         kernel.dtype))

  def _call_kernel(self, training):
    return self.masked_kernel

  def get_config(self):
    return {**super().get_config(), "keep_fraction": self.keep_fraction}


@keras.saving.register_keras_serializable(package="robust_sparse")
class ScoredDense(_ScoredKernelMixin, layers_lib.MaskedDense):
  """`MaskedDense` computing with `kernel * mask * topk(|scores|)` (see the module docstring).

  Args:
    keep_fraction: the fraction of the kernel's weights the top-k keeps, in (0, 1].
    *args, **kwargs: `keras.layers.Dense`'s arguments (no LoRA).

  Input shape: `(batch_size, ..., input_dim)`, dense (not a `tf.SparseTensor`).
  Output shape: `(batch_size, ..., units)`.
  """

  def call(self, inputs, training=None):
    if isinstance(inputs, tf.SparseTensor):
      raise ValueError(f"ScoredDense '{self.name}' takes dense inputs, received a "
                       "tf.SparseTensor")
    return super().call(inputs, training=training)


@keras.saving.register_keras_serializable(package="robust_sparse")
class ScoredConv2D(_ScoredKernelMixin, layers_lib.MaskedConv2D):
  """`MaskedConv2D` convolving with `kernel * mask * topk(|scores|)` (see the module docstring).

  Args:
    keep_fraction: the fraction of the kernel's weights the top-k keeps, in (0, 1].
    *args, **kwargs: `keras.layers.Conv2D`'s arguments (no LoRA).
  """


SCORED_LAYER_TYPES = (ScoredDense, ScoredConv2D)


def scored_layers(model):
  """The scored layers of `model`, in the order they compute."""
  return [layer for layer in layers_lib.masked_layers(model)
          if isinstance(layer, SCORED_LAYER_TYPES)]


def is_score(variable, model) -> bool:
  """Whether `variable` is the `scores` weight of one of `model`'s scored layers."""
  return any(variable is layer.scores for layer in scored_layers(model))


def with_scores(model, keep_fraction: float):
  """A copy of `model` whose every masked layer is scored, weights copied.

  Each `MaskedDense` / `MaskedConv2D` becomes a `ScoredDense` / `ScoredConv2D`
  with the same config, kernel, bias and mask, and scores initialised by
  `scaled_score_init` from its kernel; every other layer is cloned with its
  weights. Variable paths are the original's, plus "<layer>/scores".

  Args:
    model: a Sequential or functional model with masked layers (LoRA off).
    keep_fraction: each scored layer's top-k fraction, in (0, 1].

  Returns:
    The new model; `model` is left unchanged.

  Raises:
    ValueError: no masked layer, a LoRA layer, a bad fraction, or a subclassed model.
  """
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction must be in (0, 1], received: {keep_fraction}")
  if not layers_lib.masked_layers(model):
    raise ValueError(f"model {model.name!r} has no masked layers to score")

  def clone(layer):
    config = layer.get_config()
    if isinstance(layer, layers_lib.MASKED_LAYER_TYPES):
      if layer.lora_enabled:
        raise ValueError(f"with_scores: layer {layer.name!r} has LoRA enabled")
      config.pop("lora_rank", None)
      config.pop("lora_alpha", None)
      config.pop("keep_fraction", None)
      kind = ScoredDense if isinstance(layer, layers_lib.MaskedDense) else ScoredConv2D
      return kind.from_config({**config, "keep_fraction": keep_fraction})
    return layer.__class__.from_config(config)

  scored, pairs = layers_lib.clone_layer_pairs(model, clone, "with_scores")
  for old, new in pairs:
    if isinstance(old, layers_lib.MASKED_LAYER_TYPES):
      new.raw_kernel.assign(old.raw_kernel)
      new.mask.assign(old.mask)
      if old.use_bias:
        new.bias.assign(old.bias)
      new.scores.assign(scaled_score_init(new.raw_kernel))
    else:
      new.set_weights(old.get_weights())
  return scored
