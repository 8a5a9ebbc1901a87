"""Stateless training-time data augmentation (`AUGMENTATIONS`).

An augmentation is a pure function `(images, seed) -> images` of a float32
batch [batch, height, width, channels] and a shape-[2] int32/int64 seed: the
same seed gives the same batch, so a resumed run that derives its per-step
seed from (run seed, step) repeats the uninterrupted one exactly. Each is
vectorised over the batch (no Python or tf.map_fn loop over images) and runs
inside a jit-compiled tf.function.

  none       the images unchanged.
  crop_flip  PyTorch's RandomCrop(size, padding=4) with zero fill, then
             RandomHorizontalFlip(0.5), independently per image (the CIFAR
             recipe of the SSAM and AutoReP seeds). The seeds pad before
             normalising, so apply it to [0, 1] images, before any
             normalisation, for the padding to be black as there.

The random numbers are one draw of full-range Philox int32s: in TF 2.21 that
draw is the same eager and under XLA and for int32 and int64 seeds, whereas
float draws differ under XLA and `stateless_split` depends on the seed's
dtype; either would make the batch depend on how the step is compiled.
"""

import tensorflow as tf

from robust_sparse.registry import Registry

AUGMENTATIONS = Registry("augmentation")

CROP_PADDING = 4


@AUGMENTATIONS.register("none")
def no_augmentation(images, seed):
  """Returns `images` unchanged (`seed` is ignored)."""
  del seed
  return images


@AUGMENTATIONS.register("crop_flip")
def crop_flip(images, seed, padding=CROP_PADDING):
  """Random zero-padded crop then random horizontal flip, per image.

  Image k of the output is image k of the input shifted by (dy, dx), each
  uniform in [-padding, padding], with zeros where the shift uncovers pixels,
  then mirrored left-right with probability 1/2. Implemented as two batched
  gathers (rows, then mirrored-or-not columns) from the padded batch.

  Args:
    images: float tensor [batch, height, width, channels].
    seed: int32/int64 tensor of shape [2].
    padding: the largest shift, in pixels (RandomCrop's `padding`).

  Returns:
    A tensor of the shape and dtype of `images`.
  """
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  draws = tf.random.stateless_uniform([batch, 3], seed, minval=None, maxval=None,
                                      dtype=tf.int32, alg="philox")
  # Top-left corner of each crop in the padded image, in [0, 2 * padding]
  # (the modulo bias is below 1e-8, as in the bounded stateless draws).
  corners = tf.math.floormod(draws[:, :2], 2 * padding + 1)
  flip = draws[:, 2] < 0  # The sign bit: exactly 1/2.
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
  rows = corners[:, :1] + tf.range(height)[tf.newaxis, :]
  # Flipping after cropping reads the crop's columns right to left.
  columns = tf.range(width)[tf.newaxis, :]
  columns = corners[:, 1:] + tf.where(flip[:, tf.newaxis], width - 1 - columns, columns)
  cropped_rows = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped_rows, columns, axis=2, batch_dims=1)


def augment(name, images, seed):
  """Applies the registered augmentation `name` to `images` with `seed`.

  Args:
    name: a name in `AUGMENTATIONS` ("none", "crop_flip").
    images: float32 tensor [batch, height, width, channels].
    seed: int32/int64 tensor of shape [2]; equal seeds give equal outputs.

  Returns:
    The augmented batch, same shape and dtype as `images`.

  Raises:
    ValueError: if `name` is not registered; the message lists the known ones.
  """
  return AUGMENTATIONS.get(name)(images, seed)
