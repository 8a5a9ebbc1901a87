"""Linear probes: PyTorch's adaptive pooling, .npy latents from a tap model, cached probes."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.measure import probes
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense


def _torch_adaptive_avg_pool(x, size):
  """PyTorch's definition: output (i, j) averages rows floor(i*H/d)..ceil((i+1)*H/d)."""
  height, width = x.shape[1:3]
  out = np.zeros((x.shape[0], size, size, x.shape[3]))
  for i in range(size):
    for j in range(size):
      rows = slice(i * height // size, -(-(i + 1) * height // size))
      cols = slice(j * width // size, -(-(j + 1) * width // size))
      out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
  return out


@pytest.mark.parametrize("in_size,size", [(6, 4), (5, 3), (4, 4), (7, 2), (6, 1), (2, 4)])
def test_adaptive_pooling_matches_pytorchs_windows(in_size, size):
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size, 3)).astype(np.float32)
  pooled = probes.adaptive_avg_pool2d(tf.constant(x), size, allow_upsampling=size > in_size)
  np.testing.assert_allclose(pooled.numpy(), _torch_adaptive_avg_pool(x, size), rtol=1e-5,
                             atol=1e-6)
  # 5 -> 3 overlaps: windows [0, 2), [1, 4), [3, 5).
  np.testing.assert_allclose(probes.pooling_matrix(5, 3) * [[2], [3], [2]],
                             [[1, 1, 0, 0, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])


def test_pooling_larger_than_the_map_is_refused():
  with pytest.raises(ValueError, match="size"):
    probes.adaptive_avg_pool2d(tf.zeros((1, 4, 4, 2)), 5)


def _data(n, seed):
  """Class c brightens channel c, so the input is linearly separable."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  x = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
  x[np.arange(n), :, :, y] += 2.0
  return x, y


def _model():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4, 4, 3))
  x = MaskedConv2D(3, 1, use_bias=False, name="conv",
                   kernel_initializer=lambda shape, dtype=None: tf.eye(3, batch_shape=[1, 1],
                                                                      dtype=dtype))(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  x = keras.layers.Dropout(0.5, name="dropout")(x)
  x = MaskedDense(4, name="dense")(x)
  blind = MaskedDense(3, kernel_initializer="zeros", name="blind")(x)  # Constant output.
  return keras.Model(inputs, blind)


def test_latents_and_probes_in_the_seeds_format(tmp_path):
  model = _model()
  before = [v.numpy().copy() for v in model.variables]
  folder = str(tmp_path / "latent_datasets" / "2x2")
  x_train, y_train = _data(150, 0)
  x_eval, y_eval = _data(90, 1)
  paths = probes.extract_latents(model, (x_train, y_train), folder, split="train", pool=2,
                                 batch_size=64)
  probes.extract_latents(model, (x_eval, y_eval), folder, split="eval", pool=2, batch_size=64)
  assert sorted(os.listdir(folder)) == sorted(
      ["latents.json"] + [f"{s}-{n}.npy" for s in ("train", "eval")
                          for n in ("conv", "dense", "blind", "labels")])
  np.testing.assert_array_equal(np.load(paths["labels"]), y_train)
  # Eval runs in inference mode: the identity conv, pooled, flattened (C, d, d).
  expected = _torch_adaptive_avg_pool(x_eval, 2).transpose(0, 3, 1, 2).reshape(90, -1)
  np.testing.assert_allclose(np.load(os.path.join(folder, "eval-conv.npy")), expected,
                             rtol=1e-5, atol=1e-6)
  # Train runs in training mode (dropout active), leaving every variable as it was.
  train_dense = np.load(paths["dense"])
  inference_dense = keras.Model(model.input, model.get_layer("dense").output)(x_train).numpy()
  assert not np.allclose(train_dense, inference_dense, atol=1e-3)
  for value, variable in zip(before, model.variables):
    np.testing.assert_array_equal(value, variable.numpy())

  csv = str(tmp_path / probes.probe_csv_name(2))
  frame = probes.train_probes(folder, output_csv=csv, n_jobs=2)
  assert list(frame["name"]) == ["train-conv", "train-dense", "train-blind"]
  accuracy = dict(zip(frame["name"], frame["eval_acc"]))
  assert accuracy["train-conv"] > 0.9
  # A constant feature leaves the training majority class.
  assert accuracy["train-blind"] == np.mean(y_eval == np.bincount(y_train).argmax())
  with open(csv) as f:
    lines = f.read().splitlines()
  assert lines[0] == ";name;train_acc;eval_acc"
  assert lines[1].startswith("0;train-conv;")

  # A re-run takes finished layers from their cached result.
  result_path = os.path.join(folder, "probes", "conv.json")
  with open(result_path) as f:
    cached = json.load(f)
  with open(result_path, "w") as f:
    json.dump(dict(cached, eval_acc=0.125), f)
  assert probes.train_probes(folder)["eval_acc"][0] == 0.125
  assert probes.train_probes(folder, overwrite=True)["eval_acc"][0] == cached["eval_acc"]


def test_pool_larger_than_every_map_is_refused(tmp_path):
  model = _model()
  data = _data(8, 0)
  with pytest.raises(ValueError, match="pool"):
    probes.extract_latents(model, data, str(tmp_path), split="train", pool=5)
  with pytest.raises(ValueError, match="pool"):
    probes.extract_latents(model, data, str(tmp_path), split="train", pool=0)
  with pytest.raises(ValueError, match="both"):
    probes.train_probes(str(tmp_path))


def test_pixelwise_probes_one_per_position(tmp_path):
  model = _model()
  folder = str(tmp_path)
  for split, seed in (("train", 0), ("eval", 1)):
    x, y = _data(60, seed)
    # An iterable of batches, as a tf.data pipeline with augmentation gives.
    batches = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 60, 25)]
    probes.extract_latents(model, batches, folder, split=split, pool=None, num_examples=60,
                           layers=["conv", "blind"])
  assert np.load(os.path.join(folder, "eval-conv.npy")).shape == (60, 4, 4, 3)
  frame = probes.train_pixelwise_probes(folder, output_csv=str(tmp_path / "pixelwise.csv"),
                                        max_iter=20)
  names = list(frame["name"])
  assert names[:2] == ["train-conv-(0,0)", "train-conv-(0,1)"]
  assert len(names) == 16 + 1 and names[-1] == "train-blind"
  assert (frame["eval_acc"][:16] > 0.7).all()
  pooled = str(tmp_path / "pooled")
  probes.extract_latents(model, _data(8, 0), pooled, split="train", pool=2)
  probes.extract_latents(model, _data(8, 1), pooled, split="eval", pool=2)
  with pytest.raises(ValueError, match="pool=None"):
    probes.train_pixelwise_probes(pooled)


def test_training_latents_come_from_the_augmented_loader_at_the_training_batch(tmp_path):
  import types
  from robust_sparse.experiments.phd_lab import probe_training_batches
  from robust_sparse.core.hparams import Hparams
  x_train, y_train = _data(150, 0)
  dataset = types.SimpleNamespace(x_train=x_train, y_train=y_train, num_classes=3)
  hp = Hparams(augment="flip", batch_size=64, seed=3)
  batches, count, source = probe_training_batches(hp, dataset)
  batches = list(batches)
  assert count == 150 and source == {"augment": "flip", "batch_size": 64, "seed": 3}
  assert [len(y) for _, y in batches] == [64, 64, 22]  # phd-lab's loader: a smaller last one.
  labels = np.concatenate([y.numpy() for _, y in batches])
  assert sorted(labels) == sorted(y_train) and not np.array_equal(labels, y_train)  # Shuffled.
  images = np.concatenate([x.numpy() for x, _ in batches])
  order = np.random.default_rng([3, 4]).permutation(150)
  flipped = np.all(images == x_train[order][:, :, ::-1], axis=(1, 2, 3))
  assert 0 < flipped.sum() < 150  # Some images flipped, each either as it was or mirrored.
  assert np.all(flipped | np.all(images == x_train[order], axis=(1, 2, 3)))

  # Train-mode batch norm sees batches of 64: the latents differ from batches of 150.
  model = _model()
  folder = str(tmp_path / "latents")
  paths = probes.extract_latents(model, iter(batches), folder, split="train", pool=2,
                                 num_examples=count, source=source)
  np.testing.assert_array_equal(np.load(paths["labels"]), labels)
  loader = np.load(paths["dense"])
  whole = probes.extract_latents(model, (images, labels), str(tmp_path / "whole"),
                                 split="train", pool=2, batch_size=150)
  assert not np.allclose(loader, np.load(whole["dense"]), atol=1e-4)
  # Another source (the old un-augmented, in-order extraction) is extracted again.
  old, count, source = probe_training_batches(
      Hparams(augment="flip", batch_size=64, seed=3, probe_augment=False), dataset)
  assert source == {"augment": None} and count == 150
  paths = probes.extract_latents(model, old, folder, split="train", pool=2, source=source)
  np.testing.assert_array_equal(np.load(paths["labels"]), y_train)
