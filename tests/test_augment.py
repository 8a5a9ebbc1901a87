"""Stateless augmentation: determinism, exact crop/flip semantics, XLA."""

import numpy as np
import pytest
import tensorflow as tf

from data.augment import AUGMENTATIONS, CROP_PADDING, augment

SEED = tf.constant([3, 7], tf.int64)


def _coded_images(batch, height, width, channels=2):
  """Pixel (r, c) of every channel holds 1 + r * width + c, plus 1000 * channel."""
  codes = 1 + np.arange(height * width, dtype=np.float32).reshape(height, width)
  image = np.stack([codes + 1000 * k for k in range(channels)], axis=-1)
  return np.broadcast_to(image, (batch, height, width, channels)).copy()


def _shift_flip(image, dy, dx, flip):
  """Numpy reference: crop at offset (dy, dx) from the zero-padded image, then mirror."""
  height, width = image.shape[:2]
  padded = np.pad(image, [(CROP_PADDING, CROP_PADDING), (CROP_PADDING, CROP_PADDING), (0, 0)])
  top, left = CROP_PADDING + dy, CROP_PADDING + dx
  crop = padded[top:top + height, left:left + width]
  return crop[:, ::-1] if flip else crop


def _decode(output, width):
  """(dy, dx, flip) of one crop_flip output of a coded image, from its centre pixels."""
  row, col = output.shape[0] // 2, output.shape[1] // 2
  source_row, source_col = divmod(int(output[row, col, 0]) - 1, width)
  flip = int(output[row, col + 1, 0]) == int(output[row, col, 0]) - 1
  # Mirrored, output column j reads crop column (width - 1 - j).
  return source_row - row, source_col - (width - 1 - col if flip else col), flip


def test_registry_names_and_unknown_name():
  assert AUGMENTATIONS.names() == ["crop_flip", "none"]
  with pytest.raises(ValueError, match="known: crop_flip, none"):
    augment("cutout", tf.zeros([1, 4, 4, 1]), SEED)


def test_none_returns_the_input():
  images = tf.random.uniform([4, 8, 8, 3])
  assert augment("none", images, SEED) is images


@pytest.mark.parametrize("shape", [(128, 32, 32, 3), (5, 28, 20, 1)])
def test_crop_flip_keeps_shape_and_dtype(shape):
  output = augment("crop_flip", tf.random.uniform(shape), SEED)
  assert output.shape == shape and output.dtype == tf.float32


def test_same_seed_same_output_different_seed_different():
  images = tf.random.uniform([16, 32, 32, 3])
  first = augment("crop_flip", images, SEED).numpy()
  np.testing.assert_array_equal(augment("crop_flip", images, SEED), first)
  # The seed's dtype does not matter, only its values.
  np.testing.assert_array_equal(augment("crop_flip", images, tf.constant([3, 7], tf.int32)),
                                first)
  assert not np.array_equal(augment("crop_flip", images, tf.constant([3, 8], tf.int64)), first)


def test_every_output_is_a_zero_filled_shift_and_maybe_a_mirror_of_its_input():
  images = _coded_images(512, 12, 12)
  outputs = augment("crop_flip", tf.constant(images), SEED).numpy()
  draws = []
  for image, output in zip(images, outputs):
    dy, dx, flip = _decode(output, 12)
    assert max(abs(dy), abs(dx)) <= CROP_PADDING
    np.testing.assert_array_equal(output, _shift_flip(image, dy, dx, flip))
    draws.append((dy, dx, flip))
  dys, dxs, flips = zip(*draws)
  # Each image draws its own shift and flip, and every shift occurs.
  assert set(dys) == set(dxs) == set(range(-CROP_PADDING, CROP_PADDING + 1))
  assert 0.4 < np.mean(flips) < 0.6


def test_real_looking_images_match_one_candidate_exactly():
  images = np.random.default_rng(0).uniform(0.1, 1, size=(4, 32, 32, 3)).astype(np.float32)
  outputs = augment("crop_flip", tf.constant(images), SEED).numpy()
  for image, output in zip(images, outputs):
    matches = [(dy, dx, flip) for dy in range(-4, 5) for dx in range(-4, 5)
               for flip in (False, True)
               if np.array_equal(output, _shift_flip(image, dy, dx, flip))]
    assert len(matches) == 1


def test_works_jit_compiled_and_matches_eager():
  images = tf.random.uniform([8, 32, 32, 3])
  compiled = tf.function(lambda x, seed: augment("crop_flip", x, seed), jit_compile=True)
  np.testing.assert_array_equal(compiled(images, SEED), augment("crop_flip", images, SEED))
  none = tf.function(lambda x, seed: augment("none", x, seed), jit_compile=True)
  np.testing.assert_array_equal(none(images, SEED), images)
