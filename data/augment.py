"""Stateless, composable training-time data augmentation (`--augment`).

`--augment` is a comma-separated list of the names below, applied in order:
`build("crop,flip,cutout", num_classes=10, fill=mean)` returns one function.
Every augmentation, and the composition, has the contract

  fn(images, labels, seed) -> (images, labels)

on a float32 batch [batch, height, width, channels] of [0, 1] pixels (the
model normalises in its first layer, so augmentation sees pixels, as the
seeds' transforms do before `Normalize`), labels either int [batch] or soft
float [batch, num_classes], and a shape-[2] int32/int64 stateless seed. The
same seed gives the same batch, so a resumed run that derives its per-step
seed from (run seed, iteration) sees the same images as an uninterrupted one;
batch order comes from the trainer's stateless index stream, so each image is
a pure function of (seed, epoch, example index). Image-only augmentations
return `labels` unchanged; the label-mixing ones return soft labels.

  none         nothing (`build` returns None).
  crop         PyTorch's RandomCrop(size, padding=4): zero padding (black, as
               torchvision pads before normalising), then a random crop of
               the input's size; independently per image.
  flip         RandomHorizontalFlip(0.5), per image.
  cutout       the SSAM seed's Cutout(size=16, p=0.5): with probability 1/2 per
               image, the square [cy - 8, cy + 8) x [cx - 8, cx + 8) around a
               uniformly random pixel (cy, cx) of the image, clipped at the
               borders, is set to `fill`. The seed cuts out after normalising,
               with zeros, so `fill` is the normalisation mean in pixel space.
  randaugment  Keras' RandAugment(num_ops=2, factor=0.5) (Keras' defaults; its
               magnitudes are Keras' own, not torchvision's magnitude-9
               scale), on [0, 1] values, with one choice of operations per
               image as in the RandAugment paper (Keras chooses one per batch).
  mixup        Keras' MixUp with alpha 0.2 (the ViT seed's torchvision recipe,
               `--mixup-alpha 0.2`): image k becomes l_k x_k + (1 - l_k) x_p(k)
               with l_k ~ Beta(0.2, 0.2) per image and p a random permutation,
               and its label the same mixture of one-hot labels (Keras'
               semantics; torchvision and timm draw one l per batch and pair
               each image with its neighbour in the batch).
  cutmix       Keras' CutMix with alpha 1 (the seed's `--cutmix-alpha 1.0`, also
               timm's): a box of sides floor(H sqrt(1 - l)) x floor(W sqrt(1 - l)),
               l ~ Beta(1, 1) per image, placed uniformly inside the image (as
               Keras does; torchvision centres it at a uniform pixel and clips
               it), is pasted from image p(k); the label weights are the exact
               pixel fractions. The seed's recipe picks one of MixUp and CutMix
               per batch; a list applies each one it names.
  crop_flip    an alias of `crop,flip`, the name earlier runs used; it gives the
               images of `crop,flip`, not those of the old single-draw crop_flip.

The composition gives the augmentation at position i of the list the seed
`derive_seed(seed, i)`. Its random numbers are full-range Philox int32
draws, turned into integers and floats by integer arithmetic: in TF 2.21
those draws are the same eager and under XLA and for int32 and int64 seeds,
whereas TF's float draws differ under XLA and its Beta sampler
(`stateless_gamma`) has no XLA kernel. So crop, flip, cutout and cutmix give
bit-identical batches eager and XLA-compiled, and mixup's mixing weights
agree to float rounding (they go through `log`). randaugment uses Keras'
draws (seeded from `seed`, so still a pure function of it) and Keras'
geometric ops, which have no XLA kernel: a composed function's
`supports_jit` attribute is False when it contains randaugment, and the
caller must then compile the step without XLA.
"""

import functools
from typing import Callable, List, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from robust_sparse.core.registry import Registry

AugmentFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]

# Maps a name to a factory `factory(*, num_classes, fill) -> AugmentFn`: Keras
# layers must be created once, outside the traced step, and some
# augmentations need the class count or the fill colour.
AUGMENTATIONS = Registry("augmentation")
# Names that stand for a list; expanded before seeds are assigned to positions,
# so that an alias gives exactly the images of the list it stands for.
ALIASES = {"crop_flip": "crop,flip"}

CROP_PADDING = 4
CUTOUT_SIZE = 16
CUTOUT_PROBABILITY = 0.5
MIXUP_ALPHA = 0.2
CUTMIX_ALPHA = 1.0
RANDAUGMENT_NUM_OPS = 2
RANDAUGMENT_FACTOR = 0.5
# Candidates per Beta draw of Johnk's rejection sampler: the chance that all are
# rejected is (1 - acceptance)^32, about 2e-42 for alpha 0.2 and 1e-13 for 0.8.
_BETA_CANDIDATES = 32


# ---- random numbers ----------------------------------------------------------------
def _bits(shape, seed):
  """Full-range int32 Philox draws: the same eager, under XLA, for int32/int64 seeds."""
  return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None, dtype=tf.int32,
                                     alg="philox")


def derive_seed(seed, index: int):
  """The seed of the `index`-th consumer of `seed` (an int32 tensor of shape [2]).

  Row `index` of one draw of shape [index + 1, 2]: a Philox draw's element n
  depends only on (seed, n), so this is also row `index` of any larger draw,
  and the augmentation at a position gets the same seed whatever follows it.
  """
  return _bits([index + 1, 2], seed)[index]


def _below(bits, bound):
  """Integers uniform in [0, bound) from int32 bits (modulo bias below bound / 2^32)."""
  return tf.math.floormod(bits, bound)


def _coin(bits, probability: float):
  """True with `probability`, from int32 bits (exactly, for multiples of 2^-32)."""
  threshold = round(probability * 2 ** 32) - 2 ** 31
  return tf.cast(bits, tf.int64) < threshold


def _unit(bits):
  """Floats uniform in (0, 1) from int32 bits: the top 24 bits, centred on their cell."""
  top = tf.bitwise.right_shift(tf.bitcast(bits, tf.uint32), 8)
  return (tf.cast(top, tf.float32) + 0.5) * 2.0 ** -24


def _beta(bits, alpha: float):
  """Beta(alpha, alpha) samples from int32 bits [n, 2 * _BETA_CANDIDATES].

  Johnk's method, in logs so that small alphas do not underflow: with u, v
  uniform, x = u^(1/alpha), y = v^(1/alpha), the first candidate with
  x + y <= 1 gives x / (x + y). The mean 1/2 stands in if none is accepted.
  """
  if alpha == 1.0:  # Beta(1, 1) is uniform; exact, with no logarithms.
    return _unit(bits[:, 0])
  log_x = tf.math.log(_unit(bits[:, :_BETA_CANDIDATES])) / alpha
  log_y = tf.math.log(_unit(bits[:, _BETA_CANDIDATES:])) / alpha
  log_sum = tf.maximum(log_x, log_y) + tf.math.log1p(tf.exp(-tf.abs(log_x - log_y)))
  accepted = log_sum <= 0.0
  first = tf.argmax(tf.cast(accepted, tf.int32), axis=1, output_type=tf.int32)
  sample = tf.gather(tf.sigmoid(log_x - log_y), first, axis=1, batch_dims=1)
  return tf.where(tf.reduce_any(accepted, axis=1), sample, 0.5)


def _permutation(bits):
  """A random permutation of range(n) from int32 bits [n] (ties keep index order)."""
  return tf.argsort(bits, stable=True)


# ---- image-only augmentations ---------------------------------------------------------
def crop(images, labels, seed, padding: int = CROP_PADDING):
  """PyTorch's RandomCrop(size, padding): zero-pad, then crop the input's size, per image.

  Image k of the output is image k shifted by (dy, dx), each uniform in
  [-padding, padding], with zeros where the shift uncovers pixels: two
  batched gathers (rows, then columns) from the padded batch.

  Args:
    images: float tensor [batch, height, width, channels].
    labels: passed through.
    seed: int32/int64 tensor of shape [2].
    padding: the largest shift, in pixels (RandomCrop's `padding`).

  Returns:
    (images of the same shape and dtype, labels).
  """
  images = tf.convert_to_tensor(images)
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  # Top-left corner of each crop in the padded image, in [0, 2 * padding].
  corners = _below(_bits([batch, 2], seed), 2 * padding + 1)
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
  rows = corners[:, :1] + tf.range(height)[tf.newaxis, :]
  columns = corners[:, 1:] + tf.range(width)[tf.newaxis, :]
  cropped_rows = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped_rows, columns, axis=2, batch_dims=1), labels


def flip(images, labels, seed):
  """RandomHorizontalFlip(0.5): each image mirrored left-right with probability 1/2.

  Args:
    images: float tensor [batch, height, width, channels].
    labels: passed through.
    seed: int32/int64 tensor of shape [2].

  Returns:
    (images of the same shape and dtype, labels).
  """
  images = tf.convert_to_tensor(images)
  mirror = _coin(_bits(tf.shape(images)[:1], seed), 0.5)
  return tf.where(mirror[:, None, None, None], tf.reverse(images, [2]), images), labels


def _fill_value(fill: Sequence[float], images):
  """`fill` as a tensor that broadcasts over the channels of `images`.

  Raises:
    ValueError: `fill` has neither one value, nor equal values, nor one per channel.
  """
  values = tuple(float(v) for v in fill)
  if len(set(values)) == 1:  # One colour (e.g. black) fits any number of channels.
    values = values[:1]
  channels = images.shape[-1]
  if len(values) != 1 and channels is not None and len(values) != channels:
    raise ValueError(f"cutout fill {tuple(fill)} has {len(values)} values for images "
                     f"with {channels} channels")
  return tf.constant(values, images.dtype)


def cutout(images, labels, seed, fill: Sequence[float] = (0.0,), size: int = CUTOUT_SIZE,
           probability: float = CUTOUT_PROBABILITY):
  """The SSAM seed's Cutout: a square hole filled with `fill`, per image, sometimes.

  With `probability`, independently per image, the pixels (r, c) with
  cy - size // 2 <= r < cy + size // 2 (and likewise c around cx) are set to
  `fill`, where (cy, cx) is a uniformly random pixel of the image; the square
  is clipped at the borders (as `np.clip` does in the seed). Mask arithmetic
  over the whole batch, no loop over images.

  Args:
    images: float tensor [batch, height, width, channels].
    labels: passed through.
    seed: int32/int64 tensor of shape [2].
    fill: the hole's colour: one value, or one per channel.
    size: the side of the square (the seed's `size`; an odd size gives side size - 1,
      as there).
    probability: the chance that an image gets a hole (the seed's `p`).

  Returns:
    (images of the same shape and dtype, labels).

  Raises:
    ValueError: if `fill` does not match the number of channels.
  """
  images = tf.convert_to_tensor(images)
  fill_value = _fill_value(fill, images)
  shape = tf.shape(images)
  batch, height, width = shape[0], shape[1], shape[2]
  draws = _bits([batch, 3], seed)
  apply = _coin(draws[:, 0], probability)
  centre_row = _below(draws[:, 1], height)[:, None]
  centre_column = _below(draws[:, 2], width)[:, None]
  half = size // 2
  rows = tf.range(height)[None, :]
  columns = tf.range(width)[None, :]
  # Comparing with the image's own indices clips the square at the borders.
  in_rows = (rows >= centre_row - half) & (rows < centre_row + half) & apply[:, None]
  in_columns = (columns >= centre_column - half) & (columns < centre_column + half)
  hole = in_rows[:, :, None, None] & in_columns[:, None, :, None]
  return tf.where(hole, fill_value, images), labels


# ---- Keras layers, seeded from the step's seed -----------------------------------------
class _SeedSequence(keras.random.SeedGenerator):
  """A stateless Keras `SeedGenerator`: call k of `next()` returns `derive_seed(seed, k)`.

  Keras' preprocessing layers draw from a `SeedGenerator`, whose state is a
  variable that every draw advances; giving them one of these instead makes
  their randomness a pure function of `seed`, with no variable to assign
  (which XLA, `tf.distribute` and concurrent steps would all have to respect).
  It is created per call, inside the traced function, so it holds no state
  across calls; `SeedGenerator.__init__` is skipped because it creates the
  variable.
  """

  def __init__(self, seed):  # pylint: disable=super-init-not-called
    self.seed = seed
    self.count = 0

  def next(self, ordered=True):
    del ordered
    self.count += 1
    return derive_seed(self.seed, self.count - 1)


class _SeededRandAugment(keras.layers.RandAugment):
  """Keras' RandAugment, drawing from the seed it is given, choosing operations per image.

  Keras' RandAugment ignores the `seed` of `get_random_transformation` and
  uses its own generator for itself and its sub-layers (all of which honour
  the seed they are passed), and draws one list of operations for the whole
  batch; the RandAugment paper, torchvision and timm choose per image. Keras already computes every
  operation for the batch and selects with `where`, so an index per image
  [num_ops, batch, 1, 1, 1] selects per image at no extra cost.
  """

  def get_random_transformation(self, data, training=True, seed=None):
    if seed is None:
      return super().get_random_transformation(data, training=training)
    # A plain attribute: Keras tracks SeedGenerators set on a layer.
    object.__setattr__(self, "_call_seed", seed)
    try:
      transformation = super().get_random_transformation(data, training=training)
    finally:
      object.__setattr__(self, "_call_seed", None)
    if transformation is not None:
      images = data["images"] if isinstance(data, dict) else data
      draws = _bits([self.num_ops, tf.shape(images)[0]], seed.next())
      choices = _below(draws, len(self._AUGMENT_LAYERS))
      transformation["layer_idxes"] = choices[:, :, None, None, None]
    return transformation

  def _get_seed_generator(self, backend=None):
    seed = getattr(self, "_call_seed", None)
    return seed if seed is not None else super()._get_seed_generator(backend)


def _randaugment():
  layer = _SeededRandAugment(value_range=(0.0, 1.0), num_ops=RANDAUGMENT_NUM_OPS,
                             factor=RANDAUGMENT_FACTOR, dtype="float32")

  def randaugment(images, labels, seed):
    images = tf.convert_to_tensor(images)
    transformation = layer.get_random_transformation(images, training=True,
                                                     seed=_SeedSequence(seed))
    return layer.transform_images(images, transformation, training=True), labels

  # ImageProjectiveTransformV3 (rotation, shear, translation) has no XLA kernel.
  randaugment.supports_jit = False
  return randaugment


def _targets(labels, num_classes: int):
  """Float32 targets [batch, num_classes]: one-hot for int labels, soft ones as given."""
  labels = tf.convert_to_tensor(labels)
  if labels.dtype.is_integer:
    return tf.one_hot(labels, num_classes, dtype=tf.float32)
  return tf.cast(labels, tf.float32)


def _mixup(num_classes: int, alpha: float = MIXUP_ALPHA):
  layer = keras.layers.MixUp(alpha=alpha, dtype="float32")

  def mixup(images, labels, seed):
    """Keras' MixUp, with the weights and partners drawn here (see the module docstring)."""
    images = tf.convert_to_tensor(images)
    batch = tf.shape(images)[0]
    draws = _bits([batch, 1 + 2 * _BETA_CANDIDATES], seed)
    # The transformation as Keras' MixUp.get_random_transformation returns it.
    transformation = {"mix_weight": _beta(draws[:, 1:], alpha),
                      "permutation_order": _permutation(draws[:, 0])}
    return (layer.transform_images(images, transformation, training=True),
            layer.transform_labels(_targets(labels, num_classes), transformation,
                                   training=True))

  return mixup


def _cutmix(num_classes: int, alpha: float = CUTMIX_ALPHA):
  layer = keras.layers.CutMix(dtype="float32")

  def cutmix(images, labels, seed):
    """Keras' CutMix, with the boxes and partners drawn here (see the module docstring)."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    draws = _bits([batch, 3 + 2 * _BETA_CANDIDATES], seed)
    side = tf.sqrt(1.0 - _beta(draws[:, 3:], alpha))
    box_height = tf.cast(tf.cast(height, tf.float32) * side, tf.int32)
    box_width = tf.cast(tf.cast(width, tf.float32) * side, tf.int32)
    top = _below(draws[:, 1], height - box_height + 1)[:, None]
    left = _below(draws[:, 2], width - box_width + 1)[:, None]
    rows = tf.range(height)[None, :]
    columns = tf.range(width)[None, :]
    in_rows = (rows >= top) & (rows < top + box_height[:, None])
    in_columns = (columns >= left) & (columns < left + box_width[:, None])
    box = in_rows[:, :, None, None] & in_columns[:, None, :, None]
    # The transformation as Keras' CutMix.get_random_transformation returns it,
    # with the label weight the exact fraction of pixels each image keeps.
    kept = 1.0 - tf.cast(box_height * box_width, tf.float32) / tf.cast(height * width,
                                                                         tf.float32)
    transformation = {"permutation_order": _permutation(draws[:, 0]),
                      "batch_masks": tf.broadcast_to(box, tf.shape(images)),
                      "mix_weight": kept}
    return (layer.transform_images(images, transformation, training=True),
            layer.transform_labels(_targets(labels, num_classes), transformation,
                                   training=True))

  return cutmix


# ---- the registry ------------------------------------------------------------------
def _no_augmentation(images, labels, seed):
  """Returns `images` and `labels` unchanged (`seed` is ignored)."""
  del seed
  return images, labels


def _needs_nothing(fn):
  """A registry factory for an augmentation that needs no configuration."""
  return lambda *, num_classes, fill: fn


AUGMENTATIONS.register("none")(_needs_nothing(_no_augmentation))
AUGMENTATIONS.register("crop")(_needs_nothing(crop))
AUGMENTATIONS.register("flip")(_needs_nothing(flip))
AUGMENTATIONS.register("cutout")(
    lambda *, num_classes, fill: functools.partial(cutout, fill=tuple(fill)))
AUGMENTATIONS.register("randaugment")(lambda *, num_classes, fill: _randaugment())
AUGMENTATIONS.register("mixup")(lambda *, num_classes, fill: _mixup(num_classes))
AUGMENTATIONS.register("cutmix")(lambda *, num_classes, fill: _cutmix(num_classes))


def known_names() -> List[str]:
  """Every name `--augment` accepts, aliases included."""
  return sorted(AUGMENTATIONS.names() + list(ALIASES))


def parse(spec: str) -> List[str]:
  """The registered names of `spec`, in order: aliases expanded, "none" dropped.

  Raises:
    ValueError: an unknown name; one line naming `--augment`, the name and
      the known names.
  """
  if not spec.strip():
    return []
  names = []
  for name in (item.strip() for item in spec.split(",")):
    if name in ALIASES:
      names += parse(ALIASES[name])
    elif name in AUGMENTATIONS:
      if name != "none":
        names.append(name)
    else:
      raise ValueError(f"--augment: unknown augmentation {name!r} in {spec!r}; known: "
                       f"{', '.join(known_names())}")
  return names


def validate(spec: str) -> None:
  """Raises the `ValueError` of `parse` if `spec` names an unknown augmentation."""
  parse(spec)


def build(spec: str, *, num_classes: int,
          fill: Sequence[float] = (0.0, 0.0, 0.0)) -> Optional[AugmentFn]:
  """The augmentations of `spec` composed in order, or None for "none" or "".

  The augmentation at position i of the (alias-expanded) list gets the seed
  `derive_seed(seed, i)`. Call `build` outside any `tf.function`: it creates
  the Keras layers (and their unused seed variables) once; the function it
  returns may then be traced any number of times.

  Args:
    spec: comma-separated names of `known_names()`, e.g. "crop,flip,cutout".
    num_classes: the number of classes, for the soft labels of mixup/cutmix.
    fill: cutout's colour in [0, 1] pixels: one value or one per channel (the
      normalisation mean, which the seed's zero fill becomes after normalising).

  Returns:
    `augment(images, labels, seed) -> (images, labels)`, with attributes
    `names` (the list applied) and `supports_jit` (False when a part has no
    XLA kernel; compile the step without XLA then), or None.

  Raises:
    ValueError: an unknown name (see `parse`).
  """
  names = parse(spec)
  if not names:
    return None
  parts = [AUGMENTATIONS.get(name)(num_classes=num_classes, fill=fill) for name in names]

  def augment(images, labels, seed):
    seeds = _bits([len(parts), 2], seed)  # Row i is derive_seed(seed, i).
    for position, part in enumerate(parts):
      images, labels = part(images, labels, seeds[position])
    return images, labels

  augment.names = tuple(names)
  augment.supports_jit = all(getattr(part, "supports_jit", True) for part in parts)
  return augment
