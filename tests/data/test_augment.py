"""Stateless composable augmentation: exact crop/flip/cutout semantics, mixing, XLA, errors."""

import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.data import augment as augment_lib
from robust_sparse.data.augment import CROP_PADDING, CUTOUT_SIZE, build, derive_seed, validate

SEED = tf.constant([3, 7], tf.int64)
KNOWN = "crop, crop_flip, cutmix, cutout, flip, mixup, none, randaugment"


def _coded_images(batch, height, width, channels=2):
  """Pixel (r, c) of every channel holds 1 + r * width + c, plus 1000 * channel."""
  codes = 1 + np.arange(height * width, dtype=np.float32).reshape(height, width)
  image = np.stack([codes + 1000 * k for k in range(channels)], axis=-1)
  return np.broadcast_to(image, (batch, height, width, channels)).copy()


def _torchvision_random_crop(image, top, left, padding=CROP_PADDING):
  """torchvision's RandomCrop(size, padding) given its draw (top, left in [0, 2 * padding]).

  `F.pad(img, padding, fill=0)`, then `img[top:top + h, left:left + w]` of the padded image.
  """
  height, width = image.shape[:2]
  padded = np.pad(image, [(padding, padding), (padding, padding), (0, 0)])
  return padded[top:top + height, left:left + width]


def _apply(spec, images, labels=None, seed=SEED, num_classes=10, **kwargs):
  if labels is None:
    labels = np.zeros(len(images), np.int32)
  out_images, out_labels = build(spec, num_classes=num_classes, **kwargs)(
      tf.constant(images), tf.constant(labels), seed)
  return out_images.numpy(), out_labels.numpy()


# ---- the spec ----------------------------------------------------------------------
def test_validate_names_the_flag_the_bad_name_and_the_known_ones_on_one_line():
  for spec in ["crop,twirl", "crop,,flip", "Crop"]:
    with pytest.raises(ValueError) as error:
      validate(spec)
    message = str(error.value)
    assert "\n" not in message and message.startswith("--augment: unknown augmentation")
    assert message.endswith(f"known: {KNOWN}")
  with pytest.raises(ValueError, match="'twirl'"):
    build("crop,twirl", num_classes=10)
  for spec in ["none", "", "crop_flip", " crop , flip,cutout ", "mixup,cutmix,randaugment"]:
    validate(spec)


def test_none_is_no_function_and_aliases_expand():
  assert build("none", num_classes=10) is None and build("", num_classes=10) is None
  assert build("none,crop", num_classes=10).names == ("crop",)
  assert build("crop_flip,cutout", num_classes=10).names == ("crop", "flip", "cutout")
  assert augment_lib.known_names() == KNOWN.split(", ")


def test_crop_flip_is_exactly_crop_then_flip():
  images = np.random.default_rng(0).uniform(size=(32, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(_apply("crop_flip", images)[0], _apply("crop,flip", images)[0])


def test_composition_runs_in_order_with_one_seed_per_position():
  images = tf.random.stateless_uniform([16, 32, 32, 3], [0, 1])
  labels = tf.zeros([16], tf.int32)
  first, second = derive_seed(SEED, 0), derive_seed(SEED, 1)
  by_hand = augment_lib.cutout(*augment_lib.crop(images, labels, first), second, fill=(0.5,))
  composed = build("crop,cutout", num_classes=10, fill=(0.5,))(images, labels, SEED)
  np.testing.assert_array_equal(composed[0], by_hand[0])
  reversed_order = build("cutout,crop", num_classes=10, fill=(0.5,))(images, labels, SEED)
  by_hand = augment_lib.crop(*augment_lib.cutout(images, labels, first, fill=(0.5,)), second)
  np.testing.assert_array_equal(reversed_order[0], by_hand[0])
  assert not np.array_equal(composed[0], reversed_order[0])
  # A position's seed does not depend on what follows it.
  np.testing.assert_array_equal(build("crop", num_classes=10)(images, labels, SEED)[0],
                                augment_lib.crop(images, labels, first)[0])


# ---- crop and flip -------------------------------------------------------------------
def test_crop_is_torchvision_random_crop_with_zero_fill_for_every_draw():
  images = _coded_images(512, 12, 12)
  outputs, _ = _apply("crop", images)
  corners = []
  for image, output in zip(images, outputs):
    # The centre pixel stays inside the image for every shift: it names the corner.
    source_row, source_col = divmod(int(output[6, 6, 0]) - 1, 12)
    top, left = source_row - 6 + CROP_PADDING, source_col - 6 + CROP_PADDING
    np.testing.assert_array_equal(output, _torchvision_random_crop(image, top, left))
    corners.append((top, left))
  tops, lefts = zip(*corners)
  # Each image draws its own corner, and every corner row and column occurs.
  assert set(tops) == set(lefts) == set(range(2 * CROP_PADDING + 1))


def test_crop_of_real_looking_images_matches_exactly_one_corner():
  images = np.random.default_rng(0).uniform(0.1, 1, size=(4, 32, 32, 3)).astype(np.float32)
  for image, output in zip(images, _apply("crop", images)[0]):
    matches = [(top, left) for top in range(9) for left in range(9)
               if np.array_equal(output, _torchvision_random_crop(image, top, left))]
    assert len(matches) == 1


def test_flip_mirrors_about_half_of_the_images():
  images = _coded_images(1000, 4, 6)
  outputs, labels = _apply("flip", images)
  flipped = [np.array_equal(o, i[:, ::-1]) for i, o in zip(images, outputs)]
  kept = [np.array_equal(o, i) for i, o in zip(images, outputs)]
  assert all(f != k for f, k in zip(flipped, kept))
  assert 0.45 < np.mean(flipped) < 0.55
  np.testing.assert_array_equal(labels, 0)


# ---- cutout ----------------------------------------------------------------------------
def test_cutout_is_a_clipped_square_of_fill_around_a_uniform_centre_half_the_time():
  fill = (0.25, 0.5, 0.75)
  images = np.ones((2000, 32, 32, 3), np.float32)
  outputs, _ = _apply("cutout", images, fill=fill)
  hole = np.all(outputs == np.array(fill, np.float32), axis=-1)
  np.testing.assert_array_equal(outputs[~hole], 1.0)  # Nothing else changes.
  in_rows, in_cols = hole.any(axis=2), hole.any(axis=1)
  holed = in_rows.any(axis=1)
  assert 0.45 < holed.mean() < 0.55
  half = CUTOUT_SIZE // 2
  centres = set()
  for rows, cols, mask in zip(in_rows[holed], in_cols[holed], hole[holed]):
    np.testing.assert_array_equal(mask, np.outer(rows, cols))  # A rectangle.
    for extent in (rows, cols):
      first, last = np.flatnonzero(extent)[[0, -1]]
      # [max(c - half, 0), min(c + half, 32)) for the centre c it implies.
      centre = first + half if first > 0 else last + 1 - half
      assert 0 <= centre < 32 and extent.sum() == min(centre + half, 32) - max(centre - half, 0)
      centres.add(centre)
  assert centres == set(range(32))  # Every centre occurs, border ones clipped.


def test_cutout_fill_must_fit_the_channels():
  gray = np.ones((64, 8, 8, 1), np.float32)
  # One colour for every channel fits any number of channels (black on MNIST).
  assert set(np.unique(_apply("cutout", gray, fill=(0.0, 0.0, 0.0))[0])) == {0.0, 1.0}
  with pytest.raises(ValueError, match="3 values for images with 1 channels"):
    _apply("cutout", gray, fill=(0.1, 0.2, 0.3))


# ---- mixing ----------------------------------------------------------------------------
def test_mixup_mixes_images_and_labels_alike_with_beta_weights():
  batch = 2048
  # Image k is the constant k / batch and the only one of class k, so each soft
  # label row is exactly the mixture of images its output must be.
  images = np.broadcast_to((np.arange(batch, dtype=np.float32) / batch)[:, None, None, None],
                           (batch, 2, 2, 1)).copy()
  outputs, soft = _apply("mixup", images, np.arange(batch), num_classes=batch)
  assert soft.shape == (batch, batch) and soft.dtype == np.float32
  np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(outputs[:, 0, 0, 0], soft @ images[:, 0, 0, 0], atol=1e-6)
  assert np.count_nonzero(soft, axis=1).max() == 2
  own = np.diag(soft)
  weights = own[own < 1]  # Without the images mixed with themselves.
  # Beta(0.2, 0.2): mean 1/2, variance 1 / (4 (2 alpha + 1)) = 0.1786.
  assert abs(weights.mean() - 0.5) < 0.03 and abs(weights.var() - 0.1786) < 0.02


def test_cutmix_pastes_a_box_of_the_partner_and_labels_its_area():
  batch = 64
  images = np.broadcast_to(np.arange(1, batch + 1, dtype=np.float32)[:, None, None, None],
                           (batch, 32, 32, 1)).copy()
  outputs, soft = _apply("cutmix", images, np.arange(batch), num_classes=batch)
  np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
  mixed = 0
  for k in range(batch):
    pasted = outputs[k, :, :, 0] != k + 1
    partners = np.unique(outputs[k][pasted])
    if partners.size == 0:  # An empty box, or pasted from itself.
      assert soft[k, k] == 1.0
      continue
    mixed += 1
    assert partners.size == 1
    partner = int(partners[0]) - 1
    rows, cols = pasted.any(axis=1), pasted.any(axis=0)
    np.testing.assert_array_equal(pasted, np.outer(rows, cols))
    assert soft[k, partner] == pasted.mean() and soft[k, k] == 1 - pasted.mean()
  assert mixed > batch * 3 // 4


def test_mixing_takes_soft_labels_too():
  soft = np.full((8, 4), 0.25, np.float32)
  for spec in ["mixup", "cutmix", "mixup,cutmix"]:
    _, labels = _apply(spec, np.zeros((8, 8, 8, 3), np.float32), soft, num_classes=4)
    np.testing.assert_allclose(labels, 0.25, rtol=1e-6)


# ---- randomness --------------------------------------------------------------------------
FULL = "crop,flip,cutout,mixup,cutmix"


def test_same_seed_same_batch_different_seed_different():
  images = np.random.default_rng(1).uniform(size=(16, 32, 32, 3)).astype(np.float32)
  labels = np.arange(16) % 10
  first = _apply(FULL, images, labels)
  second = _apply(FULL, images, labels)  # Rebuilt: nothing carries over between builds.
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)
  # The seed's dtype does not matter, only its values.
  for a, b in zip(first, _apply(FULL, images, labels, seed=tf.constant([3, 7], tf.int32))):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0], _apply(FULL, images, labels,
                                             seed=tf.constant([3, 8], tf.int64))[0])


def test_xla_compiled_equals_eager():
  exact = build("crop,flip,cutout,cutmix", num_classes=10, fill=(0.4, 0.5, 0.6))
  mixup = build("mixup", num_classes=10)
  assert exact.supports_jit and mixup.supports_jit and build(FULL, num_classes=10).supports_jit

  def both(x, y, seed):  # One compilation for both.
    return exact(x, y, seed), mixup(x, y, seed)

  compiled = tf.function(both, jit_compile=True)
  images = tf.random.stateless_uniform([16, 32, 32, 3], [0, 2])
  labels = tf.range(16) % 10
  # A step seed as the trainer makes them, far beyond int32.
  for seed in [SEED, tf.constant([2 ** 40 + 3, 2 ** 35 + 7], tf.int64)]:
    (exact_xla, mixup_xla), (exact_eager, mixup_eager) = compiled(images, labels, seed), both(
        images, labels, seed)
    for a, b in zip(exact_xla, exact_eager):
      np.testing.assert_array_equal(a, b)
    # Mixup's weights go through `log`, whose last bit may differ.
    for a, b in zip(mixup_xla, mixup_eager):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_randaugment_is_a_pure_function_of_the_seed_without_xla():
  images = tf.random.stateless_uniform([6, 32, 32, 3], [0, 3])
  labels = tf.range(6)
  first = build("randaugment", num_classes=10)
  assert not first.supports_jit
  first, second = tf.function(first), tf.function(build("randaugment", num_classes=10))
  out, out_labels = first(images, labels, SEED)
  assert out.shape == images.shape and out.dtype == tf.float32
  assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1
  np.testing.assert_array_equal(out_labels, labels)
  np.testing.assert_array_equal(second(images, labels, SEED)[0], out)
  assert not np.array_equal(first(images, labels, tf.constant([3, 8], tf.int64))[0], out)


def test_randaugment_chooses_its_operations_per_image():
  layer = augment_lib._SeededRandAugment(value_range=(0.0, 1.0))
  images = tf.zeros([64, 8, 8, 3])
  choices = layer.get_random_transformation(
      images, seed=augment_lib._SeedSequence(SEED))["layer_idxes"]
  assert choices.shape == (2, 64, 1, 1, 1)
  assert len(np.unique(choices[0])) == len(layer._AUGMENT_LAYERS)
