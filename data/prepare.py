"""Per-batch preparation of images for the model: resizing, grey to RGB, random positioning.

A data set's `prepare(images, seed) -> images` maps a float32 batch
[batch, height, width, channels] in [0, 1] and a shape-[2] int32/int64
stateless seed to the batch the model sees. The engine applies it to every
batch, training and evaluation, before augmentation, so that the stored data
keep their native size (a 32 px CIFAR set stays 32 px in memory at
`--resolution=224`). Like `data.augment`, every function here is vectorised
over the batch, compiles under XLA, and draws its random numbers as full-range
Philox int32s, which are the same eager and under XLA.

Resizing is PIL's bilinear resampling (a triangle filter whose support widens
when shrinking, so downsampling is antialiased), because the phd-lab seed
resizes PIL images with torchvision's `Resize`. Upsampling it equals
`tf.image.resize(method="bilinear", antialias=False)` (and torchvision's tensor
resize); downsampling it equals `antialias=True`, which has no XLA kernel, so it
is computed here as a gather of a few taps and a weighted sum (no matmul, so
TensorFloat-32 cannot round it on a GPU).
"""

from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

Prepare = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def _resize_taps(in_size: int, out_size: int):
  """Indices and weights [out_size, taps] of PIL's bilinear resampling along one axis."""
  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = filter_scale  # The bilinear (triangle) filter's support is 1, widened.
  taps = int(np.ceil(support)) * 2 + 1
  indices = np.zeros([out_size, taps], np.int32)
  weights = np.zeros([out_size, taps], np.float64)
  for out in range(out_size):
    center = (out + 0.5) * scale
    first = max(int(center - support + 0.5), 0)
    last = min(int(center + support + 0.5), in_size)
    source = np.arange(first, last)
    weight = np.maximum(0.0, 1.0 - np.abs((source - center + 0.5) / filter_scale))
    weight /= weight.sum()
    indices[out, :len(source)] = source
    # Unused taps read pixel `first` with weight zero.
    indices[out, len(source):] = first
    weights[out, :len(source)] = weight
  return indices, weights.astype(np.float32)


def _resize_axis(images, axis: int, out_size: int):
  in_size = images.shape[axis]
  if in_size == out_size:
    return images
  indices, weights = _resize_taps(in_size, out_size)
  taps = tf.gather(images, indices, axis=axis)  # The axis becomes [out_size, taps].
  shape = [1] * (len(taps.shape))
  shape[axis], shape[axis + 1] = weights.shape
  return tf.reduce_sum(taps * tf.reshape(weights, shape), axis=axis + 1)


def resize(images, height: int, width: Optional[int] = None):
  """PIL-style bilinear resize of a batch to [height, width] (width defaults to height).

  Args:
    images: float tensor [batch, h, w, channels] with static h and w.
    height, width: the output size.

  Returns:
    float tensor [batch, height, width, channels]; `images` itself when the size
    is already right, so the native size is an exact no-op.
  """
  width = height if width is None else width
  images = tf.convert_to_tensor(images)
  return _resize_axis(_resize_axis(images, 1, height), 2, width)


def grey_to_rgb(images):
  """Repeats the single channel of [batch, h, w, 1] three times, as phd-lab's MNIST."""
  return tf.repeat(images, 3, axis=-1)


def random_position(images, seed, canvas: int):
  """Pastes each image at a uniformly random place of a black canvas x canvas image.

  phd-lab's `RandomPositioning` (Cifar10SmallRandomPositioning): the top-left
  corner is uniform over all (canvas - h + 1) x (canvas - w + 1) places, drawn
  independently per image. [QUIRK] phd-lab draws with `np.random.randint(0,
  canvas - h)`, which never uses the last row or column of places and fails at
  canvas == h; here every place is used, and canvas == h returns the images.

  Args:
    images: float tensor [batch, h, w, channels], h and w static and <= canvas.
    seed: int32/int64 tensor of shape [2]; equal seeds give equal outputs.
    canvas: the side of the output, in pixels.

  Returns:
    float tensor [batch, canvas, canvas, channels]: zeros except for each image,
    copied exactly.
  """
  images = tf.convert_to_tensor(images)
  height, width = images.shape[1], images.shape[2]
  if height > canvas or width > canvas:
    raise ValueError(f"a {height}x{width} image does not fit on a {canvas}x{canvas} canvas")
  draws = tf.random.stateless_uniform([tf.shape(images)[0], 2], seed, minval=None,
                                      maxval=None, dtype=tf.int32, alg="philox")
  # Modulo of full-range draws: bias below 1e-6 for any canvas size used here.
  top = tf.math.floormod(draws[:, :1], canvas - height + 1)
  left = tf.math.floormod(draws[:, 1:], canvas - width + 1)
  # Canvas pixel (r, c) shows image pixel (r - top, c - left) where that exists.
  rows = tf.range(canvas)[tf.newaxis, :] - top
  columns = tf.range(canvas)[tf.newaxis, :] - left
  row_inside = (rows >= 0) & (rows < height)
  column_inside = (columns >= 0) & (columns < width)
  gathered = tf.gather(images, tf.clip_by_value(rows, 0, height - 1), axis=1, batch_dims=1)
  gathered = tf.gather(gathered, tf.clip_by_value(columns, 0, width - 1), axis=2,
                       batch_dims=1)
  inside = row_inside[:, :, tf.newaxis, tf.newaxis] & column_inside[:, tf.newaxis, :,
                                                                    tf.newaxis]
  return tf.where(inside, gathered, tf.zeros_like(gathered))


def check_resolution(resolution: Optional[int], minimum: int = 1):
  """Raises ValueError naming `--resolution` unless it is None or an int >= `minimum`."""
  if resolution is None:
    return
  if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
    raise ValueError(f"--resolution must be a positive integer, got {resolution!r}")
  if resolution < max(minimum, 1):
    what = "positive" if minimum <= 1 else f"at least {minimum}"
    raise ValueError(f"--resolution must be {what}, got {resolution}")


def make_prepare(image_shape: Sequence[int], resolution: Optional[int] = None, *,
                 rgb: bool = False,
                 canvas: Optional[int] = None) -> Tuple[Optional[Prepare], Tuple[int, ...]]:
  """The `prepare` function of a data set, and the image shape it produces.

  Args:
    image_shape: (h, w, channels) of a stored or decoded image.
    resolution: resize to resolution x resolution (bilinear, PIL-style); None
      or the native size: no resizing.
    rgb: repeat a single grey channel three times (after resizing: cheaper,
      and the same result).
    canvas: paste each image at a random place of a black canvas x canvas
      image (`random_position`); then `resolution` is not used.

  Returns:
    `(prepare, shape)`: `prepare(images, seed)` or None when it would change
    nothing, and the (H, W, C) of what it returns.
  """
  height, width, channels = (int(d) for d in image_shape)
  steps = []
  if canvas is not None:
    if canvas != height or canvas != width:
      steps.append(lambda x, seed: random_position(x, seed, canvas))
      height = width = canvas
  elif resolution is not None and (resolution, resolution) != (height, width):
    steps.append(lambda x, seed: resize(x, resolution))
    height = width = resolution
  if rgb and channels == 1:
    steps.append(lambda x, seed: grey_to_rgb(x))
    channels = 3
  if not steps:
    return None, (height, width, channels)

  def prepare(images, seed):
    images = tf.convert_to_tensor(images, tf.float32)
    for step in steps:
      images = step(images, seed)
    return images

  return prepare, (height, width, channels)
