"""Data sets of issue 8: CIFAR-100, image folders, resolution, random positioning, RGB digits.

The official file formats are written by the tests themselves (small CIFAR-100
binaries, Tiny ImageNet and ImageNet folder trees of real JPEG/PNG files, IDX
files), so only the last test needs the real data.
"""

import gzip
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.data import (DataError, Dataset, decoded_batches, decoded_index_batches,
                                load_dataset)
from robust_sparse.data import folders
from robust_sparse.data import prepare as prepare_lib
from robust_sparse.data import registry
from robust_sparse.data.files import read_cifar100_binary

SEED = tf.constant([3, 7], tf.int64)


# ---- writers of the official formats ---------------------------------------------------
def _write_cifar100(path, images, fine, coarse):
  records = np.concatenate([coarse[:, None], fine[:, None],
                            images.transpose(0, 3, 1, 2).reshape(len(images), -1)], axis=1)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  records.astype(np.uint8).tofile(path)


def _cifar100_tree(root, train=7, test=3):
  rng = np.random.default_rng(0)
  splits = {}
  for name, count in (("train", train), ("test", test)):
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, count)
    coarse = (fine + 7) % 20  # Distinct from the fine labels.
    _write_cifar100(os.path.join(root, "cifar-100", "cifar-100-binary", f"{name}.bin"),
                    images, fine, coarse)
    splits[name] = images, fine, coarse
  return splits


def _write_image(path, image, fmt=None):
  """Writes uint8 [h, w, c] as a real JPEG or PNG file (by extension unless `fmt`)."""
  fmt = fmt or ("png" if path.lower().endswith(".png") else "jpeg")
  encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image, quality=100)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(encoded.numpy())


def _constant(shape, value):
  return np.full(shape, value, np.uint8)


WNIDS = ["n09", "n01", "n05"]  # Sorted: n01 (0), n05 (1), n09 (2).


def _tiny_imagenet_tree(root):
  """A 3-class Tiny ImageNet; image k of class c has the constant value 40c + 10k."""
  base = os.path.join(root, "tiny-imagenet-200")
  os.makedirs(base)
  with open(os.path.join(base, "wnids.txt"), "w") as f:
    f.write("\n".join(WNIDS) + "\n")
  expected = {}
  for wnid in WNIDS:
    label = sorted(WNIDS).index(wnid)
    for k in range(3):
      path = os.path.join(base, "train", wnid, "images", f"{wnid}_{k}.JPEG")
      channels = 1 if (wnid, k) == ("n05", 1) else 3  # Official data has grey JPEGs.
      _write_image(path, _constant((64, 64, channels), 40 * label + 10 * k))
      expected[path] = label
    with open(os.path.join(base, "train", wnid, f"{wnid}_boxes.txt"), "w") as f:
      f.write(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
  lines = []
  for k, wnid in enumerate(["n05", "n09", "n01", "n05"]):
    _write_image(os.path.join(base, "val", "images", f"val_{k}.JPEG"),
                 _constant((64, 64, 3), 200 + k))
    lines.append(f"val_{k}.JPEG\t{wnid}\t1\t2\t30\t40")
  with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return base, expected


def _imagenet_tree(root, classes=("cat", "ant", "dog")):
  """train/ and val/ class folders with JPEG, PNG (one grey, one upper-case extension)."""
  base = os.path.join(root, "imagenet")
  rng = np.random.default_rng(1)
  for split in ("train", "val"):
    for c, name in enumerate(classes):
      folder = os.path.join(base, split, name)
      _write_image(os.path.join(folder, "a.jpg"), rng.integers(0, 256, (20, 30, 3),
                                                                 dtype=np.uint8))
      _write_image(os.path.join(folder, "b.PNG"), rng.integers(0, 256, (40, 24, 1),
                                                                 dtype=np.uint8))
      if split == "train":
        _write_image(os.path.join(folder, "c.JPEG"), _constant((33, 33, 3), 10 * c))
        with open(os.path.join(folder, "notes.txt"), "w") as f:
          f.write("not an image, ignored by extension\n")
  return base


# ---- Dataset contract ----------------------------------------------------------------
def test_dataset_keeps_its_positional_fields():
  x = np.zeros([4, 5, 6, 1], np.float32)
  y = np.zeros([4], np.int64)
  dataset = Dataset("toy", x, y, x[:0], y[:0], x, y, 2)
  assert dataset.input_shape == (5, 6, 1) == dataset.image_shape
  assert dataset.decode is None and dataset.prepare is None and not dataset.from_files


def test_dataset_computes_input_shape_from_prepare():
  x = np.zeros([4, 8, 8, 1], np.float32)
  y = np.zeros([4], np.int64)
  prepare, _ = prepare_lib.make_prepare((8, 8, 1), 12, rgb=True)
  dataset = Dataset("toy", x, y, x, y, x, y, 2, prepare=prepare)
  assert dataset.input_shape == (12, 12, 3)


# ---- CIFAR-100 -------------------------------------------------------------------------
def test_cifar100_reads_fine_labels_and_exact_pixels(tmp_path):
  splits = _cifar100_tree(str(tmp_path))
  dataset = load_dataset("cifar100", str(tmp_path), valid_size=2)
  images, fine, coarse = splits["train"]
  assert not np.array_equal(fine, coarse)
  np.testing.assert_array_equal(dataset.y_valid, fine[:2])
  np.testing.assert_array_equal(dataset.y_train, fine[2:])
  np.testing.assert_array_equal(dataset.x_train, images[2:].astype(np.float32) / 255)
  np.testing.assert_array_equal(dataset.x_test, splits["test"][0].astype(np.float32) / 255)
  np.testing.assert_array_equal(dataset.y_test, splits["test"][1])
  assert dataset.num_classes == 100 and dataset.input_shape == (32, 32, 3)
  _, _, read_coarse = read_cifar100_binary(
      os.path.join(tmp_path, "cifar-100", "cifar-100-binary", "test.bin"))
  np.testing.assert_array_equal(read_coarse, splits["test"][2])


def test_cifar100_truncated_record_names_the_file(tmp_path):
  _cifar100_tree(str(tmp_path))
  path = os.path.join(tmp_path, "cifar-100", "cifar-100-binary", "train.bin")
  raw = np.fromfile(path, np.uint8)
  raw[:-100].tofile(path)
  with pytest.raises(DataError, match="train.bin") as error:
    load_dataset("cifar100", str(tmp_path), valid_size=1)
  assert "\n" not in str(error.value)


def test_cifar100_missing_file_and_bad_label_name_the_file(tmp_path):
  splits = _cifar100_tree(str(tmp_path))
  folder = os.path.join(tmp_path, "cifar-100", "cifar-100-binary")
  os.remove(os.path.join(folder, "test.bin"))
  with pytest.raises(DataError, match="missing data file .*test.bin"):
    load_dataset("cifar100", str(tmp_path), valid_size=1)
  images, fine, coarse = splits["test"]
  _write_cifar100(os.path.join(folder, "test.bin"), images, fine + 100, coarse)
  with pytest.raises(DataError, match="test.bin"):
    load_dataset("cifar100", str(tmp_path), valid_size=1)


def test_valid_size_zero_gives_empty_validation_split(tmp_path):
  _cifar100_tree(str(tmp_path))
  dataset = load_dataset("cifar100", str(tmp_path), valid_size=0)
  assert dataset.x_valid.shape == (0, 32, 32, 3) and dataset.x_valid.dtype == np.float32
  assert dataset.y_valid.shape == (0,) and len(dataset.x_train) == 7
  with pytest.raises(ValueError, match="valid_size"):
    load_dataset("cifar100", str(tmp_path), valid_size=7)
  with pytest.raises(ValueError, match="valid_size"):
    load_dataset("cifar100", str(tmp_path), valid_size=-1)


# ---- Tiny ImageNet -----------------------------------------------------------------------
def test_tiny_imagenet_reads_the_official_layout(tmp_path):
  base, expected = _tiny_imagenet_tree(str(tmp_path))
  dataset = load_dataset("tiny_imagenet", str(tmp_path), valid_size=2)
  assert dataset.from_files and dataset.num_classes == 3
  assert dataset.x_train.ndim == 1 and dataset.x_train.dtype.kind == "U"
  paths = list(dataset.x_valid) + list(dataset.x_train)
  labels = list(dataset.y_valid) + list(dataset.y_train)
  assert sorted(paths) == sorted(expected)
  assert all(expected[p] == label for p, label in zip(paths, labels))
  # The hold-out is not simply the first class folder.
  assert paths != sorted(paths)
  # The test split is the official val/, labelled by the annotations, in their order.
  assert [os.path.basename(p) for p in dataset.x_test] == [f"val_{k}.JPEG" for k in range(4)]
  np.testing.assert_array_equal(dataset.y_test, [1, 2, 0, 1])
  assert dataset.input_shape == dataset.image_shape == (64, 64, 3)
  assert dataset.prepare is None

  images = np.concatenate(list(decoded_batches(dataset.x_train, dataset.decode, 4)))
  assert images.shape == (7, 64, 64, 3) and images.dtype == np.float32
  for path, image in zip(dataset.x_train, images):
    label = expected[path]
    k = int(path[-6])
    np.testing.assert_allclose(image, (40 * label + 10 * k) / 255, atol=2 / 255)
  grey = os.path.join(base, "train", "n05", "images", "n05_1.JPEG")
  image = dataset.decode(tf.constant(grey)).numpy()
  assert image.shape == (64, 64, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 1])
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_tiny_imagenet_resolution_and_no_validation(tmp_path):
  _tiny_imagenet_tree(str(tmp_path))
  dataset = load_dataset("tiny_imagenet", str(tmp_path), valid_size=0, resolution=32)
  assert dataset.x_valid.shape == (0,) and dataset.x_valid.dtype.kind == "U"
  assert dataset.image_shape == (64, 64, 3) and dataset.input_shape == (32, 32, 3)
  batch = next(iter(decoded_batches(dataset.x_test, dataset.decode_eval, 4)))
  assert dataset.prepare(batch, SEED).shape == (4, 32, 32, 3)


def test_tiny_imagenet_bad_files_name_the_file(tmp_path):
  base, _ = _tiny_imagenet_tree(str(tmp_path))
  val = os.path.join(base, "val")
  os.remove(os.path.join(val, "images", "val_2.JPEG"))
  with pytest.raises(DataError, match="missing image file .*val_2.JPEG"):
    load_dataset("tiny_imagenet", str(tmp_path), valid_size=1)
  with open(os.path.join(val, "images", "val_2.JPEG"), "w") as f:
    f.write("<html>404 not found</html>")
  with pytest.raises(DataError, match="corrupt image file .*val_2.JPEG") as error:
    load_dataset("tiny_imagenet", str(tmp_path), valid_size=1)
  assert "\n" not in str(error.value)
  with open(os.path.join(val, "val_annotations.txt"), "a") as f:
    f.write("val_9.JPEG\tn99\t0\t0\t1\t1\n")
  with pytest.raises(DataError, match="val_annotations.txt: line 5"):
    load_dataset("tiny_imagenet", str(tmp_path), valid_size=1)
  with pytest.raises(DataError, match="--data_dir"):
    load_dataset("tiny_imagenet", None)


def test_decode_names_a_file_of_the_wrong_size(tmp_path):
  path = os.path.join(tmp_path, "big.JPEG")
  _write_image(path, _constant((70, 64, 3), 9))
  with pytest.raises(tf.errors.InvalidArgumentError, match="big.JPEG"):
    list(decoded_batches(np.array([path]), folders.decode_fixed_size(64, 64), 1))


# ---- ImageNet folders --------------------------------------------------------------------
def test_imagenet_class_folders_and_decodes(tmp_path):
  base = _imagenet_tree(str(tmp_path))
  dataset = load_dataset("imagenet", str(tmp_path), valid_size=1, resolution=14)
  assert dataset.num_classes == 3 and dataset.input_shape == (14, 14, 3)
  paths = list(dataset.x_valid) + list(dataset.x_train)
  labels = list(dataset.y_valid) + list(dataset.y_train)
  assert len(paths) == 9 and not any(p.endswith(".txt") for p in paths)
  classes = ["ant", "cat", "dog"]
  assert all(classes[label] == os.path.basename(os.path.dirname(p))
             for p, label in zip(paths, labels))
  assert len(dataset.x_test) == 6
  assert all(classes[label] == os.path.basename(os.path.dirname(p))
             for p, label in zip(dataset.x_test, dataset.y_test))
  for decode in (dataset.decode, dataset.decode_eval):
    images = np.concatenate(list(decoded_batches(dataset.x_test, decode, 4)))
    assert images.shape == (6, 14, 14, 3)
    assert images.min() >= 0 and images.max() <= 1
  # A constant image stays constant through the whole-image resize.
  constant = os.path.join(base, "train", "dog", "c.JPEG")
  np.testing.assert_allclose(dataset.decode(tf.constant(constant)).numpy(), 20 / 255,
                             atol=1 / 255)


def test_center_crop_decode_follows_torchvision(tmp_path):
  # Resize(int(14 * 256 / 224) = 16) leaves a 16x35 image as it is; CenterCrop(14)
  # then starts at row round(1.0) = 1 and column round(10.5) = 10 (Python rounds
  # halves to even).
  image = np.random.default_rng(2).integers(0, 256, (16, 35, 3), dtype=np.uint8)
  path = os.path.join(tmp_path, "wide.png")
  _write_image(path, image)
  decoded = folders.decode_center_crop(14)(tf.constant(path)).numpy()
  np.testing.assert_allclose(decoded, image[1:15, 10:24] / 255, atol=1e-6)
  # A 40x24 (h x w) image: shorter side 24 -> 16, longer int(16 * 40 / 24) = 26.
  tall = os.path.join(tmp_path, "tall.png")
  _write_image(tall, _constant((40, 24, 1), 77))
  decoded = folders.decode_center_crop(14)(tf.constant(tall)).numpy()
  assert decoded.shape == (14, 14, 3)
  np.testing.assert_allclose(decoded, 77 / 255, atol=1e-6)


def test_imagenet_bad_trees_name_the_problem(tmp_path):
  base = _imagenet_tree(str(tmp_path))
  os.makedirs(os.path.join(base, "val", "emu"))
  with pytest.raises(DataError, match="different class folders, e.g. emu"):
    load_dataset("imagenet", str(tmp_path), valid_size=1)
  os.rmdir(os.path.join(base, "val", "emu"))
  bad = os.path.join(base, "train", "cat", "z.jpg")
  with open(bad, "wb") as f:
    f.write(b"")
  with pytest.raises(DataError, match="corrupt image file .*z.jpg"):
    load_dataset("imagenet", str(tmp_path), valid_size=1)
  with pytest.raises(DataError, match="no imagenet/ folder"):
    load_dataset("imagenet", os.path.join(tmp_path, "imagenet", "train"))


def test_decoded_index_batches_follow_the_indices(tmp_path):
  paths = []
  for k in range(4):
    paths.append(os.path.join(tmp_path, f"{k}.png"))
    _write_image(paths[-1], _constant((5, 5, 3), 50 * k))
  index_batches = tf.data.Dataset.from_tensor_slices(np.array([[2, 0], [3, 3]], np.int32))
  batches = list(decoded_index_batches(index_batches, np.array(paths),
                                       folders.decode_fixed_size(5, 5)))
  assert len(batches) == 2
  for indices, images in batches:
    assert images.shape == (2, 5, 5, 3)
    np.testing.assert_allclose(images[:, 0, 0, 0] * 255, 50 * indices.numpy(), atol=1e-4)


# ---- resolution ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [48, 20])
def test_resize_is_pil_bilinear(size):
  images = tf.random.stateless_uniform([2, 32, 32, 3], [1, 2])
  resized = prepare_lib.resize(images, size)
  assert resized.shape == (2, size, size, 3)
  reference = tf.image.resize(images, [size, size], "bilinear", antialias=True)
  np.testing.assert_allclose(resized, reference, atol=1e-5)
  if size > 32:  # Upsampling: plain bilinear, as torchvision's tensor resize.
    plain = tf.image.resize(images, [size, size], "bilinear", antialias=False)
    np.testing.assert_allclose(resized, plain, atol=1e-5)
  compiled = tf.function(lambda x: prepare_lib.resize(x, size), jit_compile=True)
  np.testing.assert_allclose(compiled(images), resized, atol=1e-6)
  constant = prepare_lib.resize(tf.fill([1, 32, 32, 3], 0.37), size)
  np.testing.assert_allclose(constant, 0.37, atol=1e-6)


def test_native_resolution_is_an_exact_no_op(tmp_path):
  _cifar100_tree(str(tmp_path))
  assert load_dataset("cifar100", str(tmp_path), 1, resolution=32).prepare is None
  images = tf.random.stateless_uniform([2, 32, 32, 3], [1, 2])
  assert prepare_lib.resize(images, 32) is images
  dataset = load_dataset("cifar100", str(tmp_path), 1, resolution=40)
  assert dataset.input_shape == (40, 40, 3)
  assert dataset.prepare(dataset.x_test, SEED).shape == (3, 40, 40, 3)


@pytest.mark.parametrize("name,resolution", [("cifar100", 0), ("cifar100", -32),
                                             ("tiny_imagenet", 0),
                                             ("cifar10_random_positioning", 31)])
def test_bad_resolution_is_a_value_error_naming_the_flag(tmp_path, name, resolution):
  _cifar100_tree(str(tmp_path))
  with pytest.raises(ValueError, match="--resolution"):
    load_dataset(name, str(tmp_path), 1, resolution=resolution)


# ---- random positioning ----------------------------------------------------------------
def _offsets(canvas_batch, images):
  """The (top, left) where each image sits intact on its otherwise black canvas."""
  offsets = []
  height, width = images.shape[1:3]
  for canvas, image in zip(canvas_batch, images):
    rows, columns = np.nonzero(canvas.max(axis=-1))
    top, left = rows.min(), columns.min()
    np.testing.assert_array_equal(canvas[top:top + height, left:left + width], image)
    rest = canvas.copy()
    rest[top:top + height, left:left + width] = 0
    assert not rest.any()
    offsets.append((top, left))
  return offsets


def test_random_positioning_pastes_each_image_intact():
  # Strictly positive pixels, so the image's extent is visible on the black canvas.
  images = tf.random.stateless_uniform([16, 32, 32, 3], [4, 5], minval=0.01, maxval=1.0)
  prepare, shape = prepare_lib.make_prepare((32, 32, 3), canvas=48)
  assert shape == (48, 48, 3)
  first = prepare(images, SEED).numpy()
  offsets = _offsets(first, images.numpy())
  assert all(0 <= top <= 16 and 0 <= left <= 16 for top, left in offsets)
  assert len(set(offsets)) > 8  # They vary across images.
  np.testing.assert_array_equal(prepare(images, SEED), first)
  other = _offsets(prepare(images, tf.constant([3, 8], tf.int64)).numpy(), images.numpy())
  assert other != offsets
  compiled = tf.function(prepare, jit_compile=True)
  np.testing.assert_array_equal(compiled(images, SEED), first)
  # At canvas 32 it is the identity: the seed's data set at its native size.
  assert prepare_lib.make_prepare((32, 32, 3), canvas=32)[0] is None


def test_random_positioning_reaches_every_place():
  images = tf.ones([400, 32, 32, 1])
  canvas = prepare_lib.random_position(images, SEED, 34).numpy()
  offsets = {(int(np.argmax(c[:, :, 0].any(1))), int(np.argmax(c[:, :, 0].any(0))))
             for c in canvas}
  assert offsets == {(top, left) for top in range(3) for left in range(3)}


# ---- RGB digits ----------------------------------------------------------------------
def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_digits_rgb_repeats_the_grey_channel_at_the_resolution(tmp_path):
  folder = os.path.join(tmp_path, "mnist")
  os.makedirs(folder)
  rng = np.random.default_rng(3)
  for prefix, count in (("train", 12), ("t10k", 4)):
    _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
               rng.integers(0, 256, (count, 28, 28)))
    _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
               rng.integers(0, 10, count))
  dataset = load_dataset("digits_rgb", str(tmp_path), valid_size=2)
  assert dataset.image_shape == (28, 28, 1) and dataset.input_shape == (32, 32, 3)
  batch = dataset.prepare(dataset.x_test, SEED).numpy()
  assert batch.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(batch[..., 0], batch[..., 1])
  np.testing.assert_array_equal(batch[..., 0], batch[..., 2])
  native = load_dataset("digits_rgb", str(tmp_path), valid_size=2, resolution=28)
  batch = native.prepare(native.x_test, SEED).numpy()
  np.testing.assert_array_equal(batch, np.repeat(native.x_test, 3, axis=-1))


# ---- real data -------------------------------------------------------------------------
def test_cifar10_random_positioning_on_the_real_data(data_dir):
  dataset = load_dataset("cifar10_random_positioning", data_dir, valid_size=0, resolution=64)
  assert dataset.input_shape == (64, 64, 3) and dataset.num_classes == 10
  assert len(dataset.x_train) == 50000 and dataset.x_valid.shape == (0, 32, 32, 3)
  images = dataset.x_test[:8]
  canvas = dataset.prepare(images, SEED).numpy()
  assert canvas.shape == (8, 64, 64, 3)
  # The real images contain black pixels, so check each at its drawn place by brute force.
  for image, placed in zip(images, canvas):
    assert any(np.array_equal(placed[t:t + 32, l:l + 32], image) and
               placed.sum() == pytest.approx(image.sum(), rel=1e-5)
               for t in range(33) for l in range(33))
  default = load_dataset("cifar10_random_positioning", data_dir, valid_size=0)
  assert default.input_shape == (160, 160, 3)


def test_sklearn_digits_are_scikit_learns_without_importing_it(monkeypatch):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  # Read with scikit-learn's modules unloaded: the reader never imports them.
  for module in [name for name in sys.modules if name.split(".")[0] == "sklearn"]:
    monkeypatch.delitem(sys.modules, module)
  x_train, y_train, x_test, y_test = registry._read_sklearn_digits(None)
  assert "sklearn" not in sys.modules
  images = np.concatenate([x_train, x_test])[..., 0]
  assert images.dtype == np.uint8 and len(x_test) == 360
  np.testing.assert_array_equal(images, np.round(digits.images * (255.0 / 16.0)))
  np.testing.assert_array_equal(np.concatenate([y_train, y_test]), digits.target)
