"""The data set registry (`--dataset`) and the split into train / validation / test.

An entry is `loader(data_dir, resolution) -> Source`: the official train and
test splits, read from the official raw files under `data_dir` (or, where
tensorflow-datasets has the data set, from it when `data_dir` is None), plus
how to turn them into what the model sees at `resolution` (None: the data
set's default). `load_dataset` holds out the validation split and returns a
`Dataset`.

  name                        source under DIR                       model input
  digits, fashion             mnist/, fashion-mnist/ (IDX .gz)       28x28x1
  digits_rgb                  mnist/                                 RxRx3, R = 32
  cifar10                     cifar-10/cifar-10-batches-bin/         32x32x3
  cifar10_random_positioning  cifar-10/cifar-10-batches-bin/         RxRx3, R = 160
  cifar100                    cifar-100/cifar-100-binary/            32x32x3, 100 fine classes
  tiny_imagenet               tiny-imagenet-200/ (files, decoded)    64x64x3, 200 classes
  imagenet                    imagenet/{train,val}/<class>/ (files)  RxRx3, R = 224
  sklearn_digits              embedded in scikit-learn               8x8x1

`--resolution=R` resizes every data set to RxR (bilinear, `data.prepare`).
"""

import dataclasses
import glob
import gzip
import importlib.util
import os
import socket
from typing import Callable, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from robust_sparse.data import folders
from robust_sparse.data import prepare as prepare_lib
from robust_sparse.data.files import (DataError, read_cifar100_binary, read_cifar_batch,
                                      read_idx_split)
from robust_sparse.training import arrays
from robust_sparse.core.registry import Registry

DATASETS = Registry("dataset")

# Seed default: the first 10000 training images validate. The 8x8 digits have
# only 1797 images, so they get a smaller default.
DEFAULT_VALID_SIZE = 10000
DEFAULT_VALID_SIZES = {"sklearn_digits": 300}

# phd-lab's MNIST runs are at 32 px; its random-positioning runs at 160 px
# (at 32 px the image fills the canvas, and phd-lab's sampler fails there).
DIGITS_RGB_RESOLUTION = 32
RANDOM_POSITIONING_RESOLUTION = 160
IMAGENET_RESOLUTION = 224
TINY_IMAGENET_SIZE = 64


@dataclasses.dataclass
class Source:
  """What a `DATASETS` entry returns: the official train and test splits.

  Attributes:
    x_train, x_test: uint8 images [n, h, w, c], or 1-D arrays of file paths
      (str) when `decode` is set.
    y_train, y_test: int labels [n].
    num_classes: None: one more than the largest label.
    decode, decode_eval, prepare, image_shape, input_shape: as in `Dataset`.
  """
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: Optional[int] = None
  decode: Optional[Callable] = None
  decode_eval: Optional[Callable] = None
  prepare: Optional[Callable] = None
  image_shape: Optional[Tuple[int, ...]] = None
  input_shape: Optional[Tuple[int, ...]] = None


@dataclasses.dataclass
class Dataset:
  """A data set split into train / validation / test, as the engine consumes it.

  The images of a split are stored in one of two ways:
  - in memory (`decode` is None): float32 [n, h, w, c] in [0, 1], read-only
    (`robust_sparse.training.arrays`: the engine's tensors share them; copy one to
    change it);
  - as files (`decode` is set), for data sets too big for memory: a 1-D numpy
    array of file paths (str). `decode(path)` maps a tf.string scalar to a
    float32 [h, w, c] image in [0, 1] of fixed shape `image_shape`, for
    `tf.data.Dataset.map(num_parallel_calls=AUTOTUNE)` (`data.folders.
    decoded_batches` and `decoded_index_batches` build those pipelines).
    Validation and test paths use `decode_eval` (e.g. ImageNet's centre crop).

  Every batch, training and evaluation, goes through `prepare(images, seed)`
  when it is set (float32 [B, h, w, c] and a shape-[2] int64 stateless seed ->
  float32 [B, H, W, C] = `input_shape`), before any training augmentation:
  resizing to `--resolution`, grey to RGB, random positioning. It is
  vectorised and XLA-compatible, so the engine calls it inside its compiled
  step; equal seeds give equal batches.

  Attributes:
    name: the registry name.
    x_train, x_valid, x_test: images or paths, as above. `x_valid` is empty
      ([0, h, w, c] float32 or [0] str) with `valid_size=0`.
    y_train, y_valid, y_test: int64 labels [n].
    num_classes: the number of classes.
    decode: path -> image for training files; None for in-memory data.
    decode_eval: path -> image for validation and test files (defaults to
      `decode`).
    prepare: the per-batch preparation, or None (the images are what the
      model sees).
    image_shape: (h, w, c) of a stored or decoded image: what `prepare`
      receives (default: the in-memory images' shape).
    input_shape: (H, W, C) of what the model sees: `prepare`'s output
      (default: computed from `prepare`, or `image_shape` without it).
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_valid: np.ndarray
  y_valid: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  decode: Optional[Callable] = None
  decode_eval: Optional[Callable] = None
  prepare: Optional[Callable] = None
  image_shape: Optional[Tuple[int, ...]] = None
  input_shape: Optional[Tuple[int, ...]] = None

  def __post_init__(self):
    if self.decode is None:
      if self.image_shape is None:
        self.image_shape = tuple(self.x_train.shape[1:])
    else:
      if self.decode_eval is None:
        self.decode_eval = self.decode
      if self.image_shape is None:
        raise ValueError(f"data set {self.name}: a data set of file paths needs image_shape "
                         "(the shape decode returns)")
    self.image_shape = tuple(int(d) for d in self.image_shape)
    if self.input_shape is None:
      if self.prepare is None:
        self.input_shape = self.image_shape
      else:
        probe = self.prepare(tf.zeros((1,) + self.image_shape), tf.zeros([2], tf.int64))
        self.input_shape = tuple(probe.shape[1:])
    self.input_shape = tuple(int(d) for d in self.input_shape)

  @property
  def from_files(self) -> bool:
    """True when the splits are file paths, decoded by `decode` / `decode_eval`."""
    return self.decode is not None


# ---- in-memory data sets --------------------------------------------------------------
# Where tensorflow-datasets downloads from (its GCS mirror); reachable or not in seconds.
DOWNLOAD_CHECK = ("storage.googleapis.com", 443)
DOWNLOAD_CHECK_TIMEOUT = 3.0
DATA_DIR_ENV = "ROBUST_SPARSE_DATA_DIR"


def default_data_dir() -> Optional[str]:
  """`$ROBUST_SPARSE_DATA_DIR` when set (and not empty): the default of `--data_dir`."""
  return os.environ.get(DATA_DIR_ENV) or None


def _network_reachable(address=DOWNLOAD_CHECK, timeout=DOWNLOAD_CHECK_TIMEOUT) -> bool:
  try:
    socket.create_connection(address, timeout=timeout).close()
  except OSError:
    return False
  return True


def _from_tfds(name):
  import tensorflow_datasets as tfds  # Optional and heavy: only for TFDS data sets.
  # Offline, tensorflow-datasets retries its downloads for minutes: say at once instead.
  if not tfds.builder(name).is_prepared() and not _network_reachable():
    raise DataError(f"{name}: no local copy in tensorflow-datasets and no network to download "
                    f"it; give --data_dir=DIR (or set {DATA_DIR_ENV}), the folder with the "
                    "official raw files")
  train, test = tfds.as_numpy(tfds.load(name, split=["train", "test"], batch_size=-1,
                                        as_supervised=True))
  return train[0], train[1].astype(np.int64), test[0], test[1].astype(np.int64)


def _in_memory(read, num_classes=None, *, rgb=False, default_resolution=None):
  """An entry from `read(data_dir) -> (x_train, y_train, x_test, y_test)` (uint8 images).

  `--resolution` (else `default_resolution`, else the native size) resizes;
  `rgb` repeats a grey channel three times.
  """

  def load(data_dir, resolution):
    x_train, y_train, x_test, y_test = read(data_dir)
    if resolution is None:
      resolution = default_resolution
    prepare, shape = prepare_lib.make_prepare(x_train.shape[1:], resolution, rgb=rgb)
    return Source(x_train, y_train, x_test, y_test, num_classes=num_classes,
                  prepare=prepare, input_shape=shape)

  return load


def _idx_reader(folder_name, tfds_name):
  def read(data_dir):
    if data_dir is None:
      return _from_tfds(tfds_name)
    folder = os.path.join(data_dir, folder_name)
    if not os.path.isdir(folder):
      raise DataError(f"--data_dir={data_dir} has no {folder_name}/ folder with the "
                      "four IDX .gz files")
    return (*read_idx_split(folder, "train"), *read_idx_split(folder, "t10k"))
  return read


def _read_cifar10(data_dir):
  if data_dir is None:
    return _from_tfds("cifar10")
  folder = os.path.join(data_dir, "cifar-10", "cifar-10-batches-bin")
  train_files = sorted(glob.glob(os.path.join(folder, "data_batch_*.bin")))
  test_file = os.path.join(folder, "test_batch.bin")
  if not train_files or not os.path.isfile(test_file):
    raise DataError(f"--data_dir={data_dir} has no cifar-10/cifar-10-batches-bin/ folder "
                    "with data_batch_*.bin and test_batch.bin")
  if len(train_files) < 5:
    logging.warning("CIFAR-10: only %d of the 5 training batches are in %s",
                    len(train_files), folder)
  train = [read_cifar_batch(f) for f in train_files]
  x_test, y_test = read_cifar_batch(test_file)
  return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
          x_test, y_test)


def _read_cifar100(data_dir):
  """CIFAR-100 with its fine labels (100 classes), as the SSAM and AutoReP seeds use."""
  if data_dir is None:
    return _from_tfds("cifar100")  # Its supervised label is the fine one.
  folder = os.path.join(data_dir, "cifar-100", "cifar-100-binary")
  if not os.path.isdir(folder):
    raise DataError(f"--data_dir={data_dir} has no cifar-100/cifar-100-binary/ folder "
                    "with train.bin and test.bin")
  x_train, y_train, _ = read_cifar100_binary(os.path.join(folder, "train.bin"))
  x_test, y_test, _ = read_cifar100_binary(os.path.join(folder, "test.bin"))
  return x_train, y_train, x_test, y_test


def _sklearn_digits_file() -> str:
  """scikit-learn's `digits.csv.gz`, found without importing scikit-learn (which takes a
  second and a half: scipy and its own modules)."""
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise DataError("--dataset=sklearn_digits needs scikit-learn: pip install scikit-learn")
  return os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def _read_sklearn_digits(data_dir):
  """scikit-learn's embedded 8x8 digits (no download): last 360 images test.

  Read as `sklearn.datasets.load_digits` reads them: 1797 rows of 64 pixels (0..16)
  and the label, comma-separated (tests/data check the two agree).
  """
  del data_dir
  with gzip.open(_sklearn_digits_file(), "rt") as f:
    table = np.loadtxt(f, delimiter=",")
  # Pixel values are 0..16; scale to bytes so every reader returns uint8.
  images = np.round(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = table[:, -1].astype(np.int64)
  return images[:-360], labels[:-360], images[-360:], labels[-360:]


DATASETS.register("digits")(_in_memory(_idx_reader("mnist", "mnist"), 10))
DATASETS.register("fashion")(_in_memory(_idx_reader("fashion-mnist", "fashion_mnist"), 10))
# phd-lab's MNIST: grey repeated to 3 channels, resized (its runs use 32 px).
DATASETS.register("digits_rgb")(_in_memory(_idx_reader("mnist", "mnist"), 10, rgb=True,
                                           default_resolution=DIGITS_RGB_RESOLUTION))
DATASETS.register("cifar10")(_in_memory(_read_cifar10, 10))
DATASETS.register("cifar100")(_in_memory(_read_cifar100, 100))
DATASETS.register("sklearn_digits")(_in_memory(_read_sklearn_digits, 10))


@DATASETS.register("cifar10_random_positioning")
def _cifar10_random_positioning(data_dir, resolution):
  """phd-lab's Cifar10SmallRandomPositioning: each 32 px image at a random place.

  The canvas is `--resolution` (default 160, phd-lab's non-trivial setting;
  at 32 it is plain CIFAR-10), black, and the place is drawn anew for every
  batch, at training and at test time, as phd-lab does. Its training flip is
  the augmentation's job (`--augment=flip`), applied after the positioning.
  """
  prepare_lib.check_resolution(resolution, minimum=32)
  if resolution is None:
    resolution = RANDOM_POSITIONING_RESOLUTION
  x_train, y_train, x_test, y_test = _read_cifar10(data_dir)
  prepare, shape = prepare_lib.make_prepare(x_train.shape[1:], canvas=resolution)
  return Source(x_train, y_train, x_test, y_test, num_classes=10, prepare=prepare,
                input_shape=shape)


# ---- data sets of image files ---------------------------------------------------------
def _folder_root(data_dir, name, folder):
  if data_dir is None:
    raise DataError(f"{name} is read from image files: give --data_dir, the folder "
                    f"holding {folder}/")
  root = os.path.join(data_dir, folder)
  if not os.path.isdir(root):
    raise DataError(f"--data_dir={data_dir} has no {folder}/ folder")
  return root


def _shuffled_and_checked(root, train_paths, train_labels, test_paths):
  """Training files in `folders.stable_order`, after checking every file's header."""
  order = folders.stable_order([os.path.relpath(p, root) for p in train_paths])
  train_paths, train_labels = train_paths[order], train_labels[order]
  folders.check_image_files(list(train_paths) + list(test_paths))
  return train_paths, train_labels


@DATASETS.register("tiny_imagenet")
def _tiny_imagenet(data_dir, resolution):
  """Tiny ImageNet (`tiny-imagenet-200/`): 200 classes of 64x64 images, read as files.

  It has no labelled test set, so the test split is the official validation
  set (`val/`, 50 images per class), as in phd-lab; the validation split is
  held out of `train/`.
  """
  root = _folder_root(data_dir, "tiny_imagenet", "tiny-imagenet-200")
  train_paths, train_labels, test_paths, test_labels, classes = (
      folders.tiny_imagenet_splits(root))
  train_paths, train_labels = _shuffled_and_checked(root, train_paths, train_labels,
                                                    test_paths)
  image_shape = (TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE, 3)
  prepare, shape = prepare_lib.make_prepare(image_shape, resolution)
  return Source(train_paths, train_labels, test_paths, test_labels, num_classes=len(classes),
                decode=folders.decode_fixed_size(TINY_IMAGENET_SIZE, TINY_IMAGENET_SIZE),
                prepare=prepare, image_shape=image_shape, input_shape=shape)


@DATASETS.register("imagenet")
def _imagenet(data_dir, resolution):
  """ImageNet in the class-folder layout `imagenet/{train,val}/<class>/<image>`.

  Images are resized when decoded, to R = `--resolution` (default 224):
  training images whole to RxR (`folders.decode_resized`; a random-resized
  crop is left to the augmentation), validation and test images as SSAM
  evaluates, shorter side to int(R * 256 / 224) then the central RxR
  (`folders.decode_center_crop`). The official validation set is the test
  split; the validation split is held out of `train/`.
  """
  root = _folder_root(data_dir, "imagenet", "imagenet")
  train_root, val_root = os.path.join(root, "train"), os.path.join(root, "val")
  classes = folders.class_folders(train_root)
  val_classes = folders.class_folders(val_root)
  if val_classes != classes:
    different = sorted(set(classes).symmetric_difference(val_classes))
    raise DataError(f"{val_root} and {train_root} have different class folders, e.g. "
                    f"{different[0]}")
  train_paths, train_labels = folders.class_folder_split(train_root, classes)
  test_paths, test_labels = folders.class_folder_split(val_root, classes)
  train_paths, train_labels = _shuffled_and_checked(root, train_paths, train_labels,
                                                    test_paths)
  if resolution is None:
    resolution = IMAGENET_RESOLUTION
  image_shape = (resolution, resolution, 3)
  return Source(train_paths, train_labels, test_paths, test_labels, num_classes=len(classes),
                decode=folders.decode_resized(resolution),
                decode_eval=folders.decode_center_crop(resolution),
                image_shape=image_shape, input_shape=image_shape)


# ---- splitting ---------------------------------------------------------------------------
def default_valid_size(name: str) -> int:
  return DEFAULT_VALID_SIZES.get(name, DEFAULT_VALID_SIZE)


def load_dataset(name: str, data_dir: Optional[str] = None, valid_size: Optional[int] = None,
                 resolution: Optional[int] = None) -> Dataset:
  """Loads `name` and holds out the first `valid_size` training images for validation.

  Args:
    name: a name in `DATASETS`.
    data_dir: the folder with the official raw files; None: `$ROBUST_SPARSE_DATA_DIR`
      when set, else tensorflow-datasets (for the data sets it has; offline
      without a local copy: a `DataError` within seconds).
    valid_size: the number of held-out training images (None: the data set's
      default, `default_valid_size`); 0: no validation split.
    resolution: the side, in pixels, of the images the model sees; None: the
      data set's own size.

  Returns:
    A `Dataset`.

  Raises:
    ValueError: unknown name, a `valid_size` out of range, or a resolution that
      is not positive (or too small for the data set), naming `--resolution`.
    DataError: missing or corrupt files, naming the file.
  """
  loader = DATASETS.get(name)
  prepare_lib.check_resolution(resolution)
  if data_dir is None:
    data_dir = default_data_dir()
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DataError(f"--data_dir={data_dir} is not a folder")
  source = loader(data_dir, resolution)
  if valid_size is None:
    valid_size = default_valid_size(name)
  num_train = len(source.x_train)
  if not 0 <= valid_size < num_train:
    raise ValueError(f"valid_size must be between 0 and {num_train - 1} for {name}, "
                     f"got {valid_size}")

  def stored(images):
    if source.decode is not None:
      return images
    # Read-only: the training engine's tensors share it instead of copying.
    return arrays.frozen_quotient(images, 255)

  y_train = np.asarray(source.y_train, dtype=np.int64)
  y_test = np.asarray(source.y_test, dtype=np.int64)
  num_classes = source.num_classes
  if num_classes is None:
    num_classes = int(max(y_train.max(), y_test.max())) + 1
  return Dataset(name=name,
                 x_train=stored(source.x_train[valid_size:]), y_train=y_train[valid_size:],
                 x_valid=stored(source.x_train[:valid_size]), y_valid=y_train[:valid_size],
                 x_test=stored(source.x_test), y_test=y_test, num_classes=num_classes,
                 decode=source.decode, decode_eval=source.decode_eval, prepare=source.prepare,
                 image_shape=source.image_shape, input_shape=source.input_shape)
