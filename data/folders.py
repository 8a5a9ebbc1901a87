"""Image-folder data sets (Tiny ImageNet, ImageNet): file lists, checks, decoders, pipelines.

These data sets do not fit in memory, so a split is a 1-D numpy array of file
paths (str) and the data set's `decode(path) -> float32 [H, W, 3] in [0, 1]`
reads one image inside a tf.data pipeline. The engine builds the pipelines
with `decoded_index_batches` (training: the batches of `engine.index_stream`)
and `decoded_batches` (evaluation), so the images are decoded in parallel
while the accelerator trains.

Conventions are `keras.utils.image_dataset_from_directory`'s (and torchvision
`ImageFolder`'s): class index = position in the sorted class-folder names;
files with the extensions jpg, jpeg, png, bmp, gif (any case) are images,
others are ignored; decoding is by content (`tf.io.decode_image`), so a PNG
named .JPEG (there is one in ImageNet's training set) decodes.
"""

import concurrent.futures
import hashlib
import os
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from robust_sparse.data.files import DataError

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

# Leading bytes of each format decode_image reads.
_MAGIC_NUMBERS = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")

# The SSAM seed evaluates ImageNet at Resize(256) + CenterCrop(224).
EVAL_RESIZE_RATIO = 256 / 224

Decode = Callable[[tf.Tensor], tf.Tensor]


# ---- listing and checking ------------------------------------------------------------
def list_images(folder: str) -> List[str]:
  """Sorted names of the image files (by extension) directly inside `folder`.

  Raises:
    DataError: `folder` is missing.
  """
  if not os.path.isdir(folder):
    raise DataError(f"missing image folder {folder}")
  return sorted(entry.name for entry in os.scandir(folder)
                if entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file())


def class_folders(root: str) -> List[str]:
  """Sorted names of the sub-folders of `root`: the classes, index = position.

  Raises:
    DataError: `root` is missing or has no sub-folder.
  """
  if not os.path.isdir(root):
    raise DataError(f"missing image folder {root}")
  classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
  if not classes:
    raise DataError(f"{root} has no class folders")
  return classes


def _first_bad_file(paths: Sequence[str]) -> Optional[str]:
  """The message for the first missing or non-image file of `paths`, or None."""
  for path in paths:
    try:
      with open(path, "rb") as f:
        head = f.read(8)
    except FileNotFoundError:
      return f"missing image file {path}"
    except OSError as e:
      return f"unreadable image file {path}: {e.strerror or e}"
    if not head.startswith(_MAGIC_NUMBERS):
      return (f"corrupt image file {path}: not a JPEG, PNG, GIF or BMP file "
              f"(starts with {head[:4]!r})")
  return None


def check_image_files(paths: Sequence[str], workers: int = 16, chunk: int = 2048):
  """Checks that every file exists and starts with a JPEG/PNG/GIF/BMP magic number.

  Only the first 8 bytes of each file are read (in `workers` threads, since
  the time is spent waiting for the disk), so all of ImageNet takes seconds on
  a local disk. What is not caught: a file whose header is right but whose
  body is truncated or corrupt fails later, when it is decoded, with
  TensorFlow's decoding error (which does not name the file).

  Raises:
    DataError: one line naming the first missing or non-image file (in the
      order of `paths`).
  """
  chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    for message in pool.map(_first_bad_file, chunks):
      if message is not None:
        raise DataError(message)


def stable_order(names: Sequence[str]) -> np.ndarray:
  """A fixed pseudo-random permutation of `names`, by a hash of each name.

  Folder listings are sorted by class, and the validation hold-out is the
  first `valid_size` training examples (as for CIFAR), so training files are
  put in this order first: the hold-out is then a random sample of every
  class, the same on every machine and numpy version, and adding files does
  not move the others.
  """
  keys = [hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest() for name in names]
  return np.asarray(sorted(range(len(names)), key=keys.__getitem__), dtype=np.int64)


# ---- the official layouts --------------------------------------------------------------
def class_folder_split(root: str, classes: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
  """Paths and labels of `root/<class>/<image>` for the given class order.

  Raises:
    DataError: a class folder is missing or `root` holds no image at all.
  """
  paths, labels = [], []
  for label, name in enumerate(classes):
    folder = os.path.join(root, name)
    names = list_images(folder)
    paths += [os.path.join(folder, n) for n in names]
    labels += [label] * len(names)
  if not paths:
    raise DataError(f"no image files (jpg, jpeg, png, bmp, gif) in the class folders of "
                    f"{root}")
  return np.asarray(paths, dtype=str), np.asarray(labels, dtype=np.int64)


def tiny_imagenet_splits(root: str):
  """The official Tiny ImageNet layout under `root` (`tiny-imagenet-200/`).

  `wnids.txt` names the 200 classes; class index = position in the sorted
  wnids (what `ImageFolder` on `train/` gives, as in phd-lab); training images
  are `train/<wnid>/images/*`; the labelled validation images are
  `val/images/*`, labelled by `val/val_annotations.txt` (file, wnid, box,
  tab-separated).

  Returns:
    `(train_paths, train_labels, val_paths, val_labels, classes)`.

  Raises:
    DataError: a missing file or folder, or an annotation that is malformed or
      names an unknown class; the message names the file.
  """
  wnids_file = os.path.join(root, "wnids.txt")
  if not os.path.isfile(wnids_file):
    raise DataError(f"missing data file {wnids_file}")
  with open(wnids_file) as f:
    classes = sorted({line.strip() for line in f if line.strip()})
  if not classes:
    raise DataError(f"corrupt data file {wnids_file}: no class ids")
  train_root = os.path.join(root, "train")
  train_paths, train_labels = [], []
  for label, wnid in enumerate(classes):
    folder = os.path.join(train_root, wnid, "images")
    names = list_images(folder)
    train_paths += [os.path.join(folder, n) for n in names]
    train_labels += [label] * len(names)
  annotations = os.path.join(root, "val", "val_annotations.txt")
  if not os.path.isfile(annotations):
    raise DataError(f"missing data file {annotations}")
  index = {wnid: label for label, wnid in enumerate(classes)}
  val_paths, val_labels = [], []
  with open(annotations) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) < 2 or fields[1] not in index:
        raise DataError(f"corrupt data file {annotations}: line {number} is not "
                        "'file<TAB>wnid<TAB>box' with a wnid of wnids.txt")
      val_paths.append(os.path.join(root, "val", "images", fields[0]))
      val_labels.append(index[fields[1]])
  for split, paths in (("train", train_paths), ("val", val_paths)):
    if not paths:
      raise DataError(f"{os.path.join(root, split)} has no images")
  return (np.asarray(train_paths, dtype=str), np.asarray(train_labels, dtype=np.int64),
          np.asarray(val_paths, dtype=str), np.asarray(val_labels, dtype=np.int64), classes)


# ---- decoding ----------------------------------------------------------------------
def _read_rgb(path):
  """uint8 [h, w, 3] of the image file `path`, by content (grey and CMYK become RGB)."""
  return tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False,
                            dtype=tf.uint8)


def _to_unit_range(image):
  return tf.cast(image, tf.float32) / 255.0


def decode_fixed_size(height: int, width: int) -> Decode:
  """`decode(path)` for images stored at one size (Tiny ImageNet's 64x64).

  An image of another size is an error naming the file, at decode time.
  """

  def decode(path):
    image = _read_rgb(path)
    check = tf.debugging.Assert(
        tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width])),
        [f"image is not {height}x{width}:", path, tf.shape(image)])
    with tf.control_dependencies([check]):
      image = tf.ensure_shape(image, [height, width, 3])
    return _to_unit_range(image)

  return decode


def decode_resized(resolution: int) -> Decode:
  """`decode(path)` resizing the whole image to resolution x resolution (training).

  The aspect ratio is not kept, so no part of the image is lost before the
  training augmentation (e.g. a random-resized crop, left to `data.augment`)
  chooses what to show. [QUIRK] phd-lab's ImageNet trains on Resize(R) +
  CenterCrop(R) (`decode_center_crop(R, ratio=1)`); SSAM trains on
  RandomResizedCrop(224) of the full image. Resampling is bilinear with
  antialiasing, as PIL's (both seeds resize PIL images).
  """

  def decode(path):
    image = tf.image.resize(_to_unit_range(_read_rgb(path)), [resolution, resolution],
                            method="bilinear", antialias=True)
    return tf.clip_by_value(image, 0.0, 1.0)

  return decode


def decode_center_crop(resolution: int, ratio: float = EVAL_RESIZE_RATIO) -> Decode:
  """`decode(path)`: shorter side to int(ratio * resolution), then a centre crop.

  torchvision's Resize(int(ratio * R)) + CenterCrop(R), with its rounding (the
  longer side is truncated, the crop offset rounded half to even); the
  default ratio gives SSAM's Resize(256) + CenterCrop(224) at R = 224.
  Resampling is bilinear with antialiasing, as PIL's.
  """
  short = int(ratio * resolution)

  def decode(path):
    image = _to_unit_range(_read_rgb(path))
    shape = tf.cast(tf.shape(image)[:2], tf.float64)
    height, width = shape[0], shape[1]
    # torchvision: long = int(short * long / short_in), in double precision.
    short_side = tf.constant(short, tf.float64)
    new_height = tf.where(height <= width, short_side, tf.floor(short_side * height / width))
    new_width = tf.where(height <= width, tf.floor(short_side * width / height), short_side)
    image = tf.image.resize(image, tf.cast(tf.stack([new_height, new_width]), tf.int32),
                            method="bilinear", antialias=True)
    top = tf.cast(tf.round((new_height - resolution) / 2), tf.int32)
    left = tf.cast(tf.round((new_width - resolution) / 2), tf.int32)
    image = image[top:top + resolution, left:left + resolution]
    return tf.clip_by_value(tf.ensure_shape(image, [resolution, resolution, 3]), 0.0, 1.0)

  return decode


# ---- pipelines ---------------------------------------------------------------------
def decoded_batches(paths: np.ndarray, decode: Decode, batch_size: int) -> tf.data.Dataset:
  """Batches of decoded images [b, H, W, C] of `paths`, in order (for evaluation)."""
  return (tf.data.Dataset.from_tensor_slices(paths)
          .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def decoded_index_batches(index_batches: tf.data.Dataset, paths: np.ndarray,
                          decode: Decode) -> tf.data.Dataset:
  """`(indices, images)` for each batch of `index_batches` (training).

  Args:
    index_batches: full batches of int indices into `paths`, with a static
      batch size (`engine.index_stream`).
    paths: the split's file paths.
    decode: the data set's `decode`.

  Returns:
    A tf.data.Dataset of `(indices [B], images [B, H, W, C])`; the engine
    gathers the labels with `indices`, as it does for in-memory data.
  """
  batch_size = index_batches.element_spec.shape[0]
  if batch_size is None:
    raise ValueError("index_batches needs a static batch size (batch with drop_remainder)")
  table = tf.constant(paths)
  return (index_batches.unbatch()
          .map(lambda i: (i, decode(tf.gather(table, i))),
               num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
