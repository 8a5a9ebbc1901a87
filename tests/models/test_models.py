"""Model registry: deterministic names, output shapes, and the BN models' architecture."""

import os
import time

import keras
import numpy as np
import pytest

from robust_sparse.data.files import read_cifar_batch
from robust_sparse.models import MODELS, build_model
from robust_sparse.models.registry import AFTER_BN, AFTER_RESIDUAL, conv
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense, masked_layers

CIFAR = (32, 32, 3)
MNIST = (28, 28, 1)
# The cheap models, built here at both shapes. The zoo (ResNets, wide ResNets,
# VGGs) is built once per model in tests/models/test_model_zoo.py; building it again
# at two shapes would cost minutes.
SMALL = ["conv-2", "conv-4", "conv-6", "conv-bn", "dense-300-100", "lenet5"]


def _trainable_count(model):
  return sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def _activation_layers(model):
  return [layer for layer in model.layers if layer.name.endswith(("_activation", "_activation1",
                                                                  "_activation2"))]


def _producer(layer):
  """The layer whose output `layer` takes (functional models, single input)."""
  return layer.input._keras_history.operation


@pytest.fixture(scope="module")
def resnet18():
  return build_model("resnet18", CIFAR, 10)


def test_the_small_models_are_registered():
  assert set(SMALL) <= set(MODELS.names())


@pytest.mark.parametrize("name", SMALL + ["resnet18"])
def test_building_twice_gives_identical_layer_names_and_variable_paths(name):
  first, second = (build_model(name, CIFAR, 10) for _ in range(2))
  assert [layer.name for layer in second.layers] == [layer.name for layer in first.layers]
  paths = [v.path for v in second.variables]
  assert paths == [v.path for v in first.variables]
  assert len(set(paths)) == len(paths), "variable paths must be unique within a model"


@pytest.mark.parametrize("name", ["lenet5", "conv-bn"])
def test_activation_weights_have_deterministic_paths(name):
  # `mixed` keeps a step counter per activation layer.
  first, second = (build_model(name, CIFAR, 10, activation="mixed") for _ in range(2))
  paths = [v.path for v in second.variables]
  assert paths == [v.path for v in first.variables]
  assert len(set(paths)) == len(paths)
  assert "conv_1_activation/step" in paths


def test_the_saved_runs_variable_paths_are_unchanged():
  assert [v.path for v in build_model("dense-300-100", MNIST, 10).variables] == [
      "hidden_1/kernel", "hidden_1/mask", "hidden_2/kernel", "hidden_2/mask",
      "output/kernel", "output/mask"]
  assert [v.path for v in build_model("lenet5", MNIST, 10).trainable_variables] == [
      "conv_1/kernel", "conv_1/bias", "conv_2/kernel", "conv_2/bias", "dense_1/kernel",
      "dense_1/bias", "dense_2/kernel", "dense_2/bias", "output/kernel", "output/bias"]


@pytest.mark.parametrize("name, shape", [(name, shape) for name in SMALL
                                         for shape in (MNIST, CIFAR)] + [("resnet18", CIFAR)])
def test_every_small_model_outputs_logits(name, shape, resnet18):
  model = resnet18 if name == "resnet18" else build_model(name, shape, 10)
  images = np.random.default_rng(0).uniform(size=(2, *shape)).astype(np.float32)
  logits = model(images, training=False).numpy()
  assert logits.shape == (2, 10)
  assert np.all(np.isfinite(logits))


def test_resnet18_has_the_well_known_parameter_count(resnet18):
  assert _trainable_count(resnet18) == 11_173_962
  masks = sum(int(np.prod(layer.mask.shape)) for layer in masked_layers(resnet18))
  kernels = sum(int(np.prod(layer.raw_kernel.shape)) for layer in masked_layers(resnet18))
  assert masks == kernels  # One non-trainable mask entry per conv/dense weight.
  assert all(isinstance(layer, MaskedConv2D) and not layer.use_bias
             for layer in resnet18.layers if isinstance(layer, keras.layers.Conv2D))
  assert [layer.name for layer in resnet18.layers if isinstance(layer, MaskedDense)] == ["output"]


def test_resnet18_stage_shapes_and_shortcuts(resnet18):
  shapes = {layer.name: tuple(layer.output.shape[1:]) for layer in resnet18.layers}
  assert shapes["stem_activation"] == (32, 32, 64)
  for stage, expected in enumerate([(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512)]):
    assert shapes[f"layer{stage + 1}_block2_activation2"] == expected
  assert sorted(name for name in shapes if name.endswith("shortcut_conv")) == [
      "layer2_block1_shortcut_conv", "layer3_block1_shortcut_conv",
      "layer4_block1_shortcut_conv"]
  assert shapes["pool"] == (512,)
  for layer in resnet18.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      assert (layer.momentum, layer.epsilon) == (0.9, 1e-5), layer.name


def test_resnet18_activation_sites(resnet18):
  layers = _activation_layers(resnet18)
  # kuangliu's ResNet-18 applies its ReLUs to 557,056 elements of a 32x32 image.
  assert sum(int(np.prod(layer.output.shape[1:])) for layer in layers) == 557_056
  sites = [layer.site for layer in layers]
  assert sites.count(AFTER_BN) == 9 and sites.count(AFTER_RESIDUAL) == 8
  for layer in layers + _activation_layers(build_model("conv-bn", CIFAR, 10)):
    producer = _producer(layer)
    expected = {AFTER_BN: keras.layers.BatchNormalization,
                AFTER_RESIDUAL: keras.layers.Add}[layer.site]
    assert isinstance(producer, expected), (layer.name, producer.name)


def test_resnet18_uses_pytorch_default_initialisation(resnet18):
  def layer(name):
    return resnet18.get_layer(name)

  for name, fan_in in [("stem_conv", 27), ("layer1_block1_conv1", 576),
                       ("layer4_block2_conv2", 4608), ("layer2_block1_shortcut_conv", 64),
                       ("output", 512)]:
    kernel = layer(name).raw_kernel.numpy()
    bound = 1 / np.sqrt(fan_in)
    # float32 draws may round up to the float32 nearest the bound.
    assert np.abs(kernel).max() <= np.nextafter(np.float32(bound), np.float32(1))
    # U(-b, b) has standard deviation b/sqrt(3).
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.1, err_msg=name)
  bias = layer("output").bias.numpy()
  assert np.abs(bias).max() <= 1 / np.sqrt(512) and np.abs(bias).max() > 0
  # Each layer draws its own values, even when the kernel shapes are equal.
  assert not np.array_equal(layer("layer1_block1_conv1").raw_kernel.numpy(),
                            layer("layer1_block1_conv2").raw_kernel.numpy())


def test_strided_conv_pads_like_pytorch():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
  inputs = keras.Input((6, 6, 2))
  model = keras.Model(inputs, conv(inputs, 3, 3, strides=2, name="strided"))
  kernel = model.get_layer("strided").raw_kernel.numpy()
  # PyTorch Conv2d(3, stride=2, padding=1): one zero row/column on every side.
  padded = np.pad(images[0], [(1, 1), (1, 1), (0, 0)])
  expected = np.array([[np.einsum("abc,abco->o", padded[2 * i:2 * i + 3, 2 * j:2 * j + 3], kernel)
                        for j in range(3)] for i in range(3)])
  np.testing.assert_allclose(model(images)[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_l1_reg_regularises_every_conv_and_dense_kernel():
  model = build_model("conv-bn", CIFAR, 10, l1_reg=1e-4)
  assert len(model.losses) == 3
  assert not build_model("conv-bn", CIFAR, 10).losses


def test_conv_bn_is_small_and_survives_save_and_reload(tmp_path):
  model = build_model("conv-bn", CIFAR, 10)
  assert 1000 < _trainable_count(model) < 10000
  images = np.random.default_rng(0).uniform(size=(4, *CIFAR)).astype(np.float32)
  model(images, training=True)  # Moves the BN statistics away from their init.
  path = os.path.join(tmp_path, "conv_bn.keras")
  model.save(path)
  reloaded = keras.models.load_model(path)
  np.testing.assert_allclose(reloaded(images).numpy(), model(images).numpy(), rtol=1e-6,
                             atol=1e-6)


def test_conv_bn_trains_on_2000_cifar_images_in_seconds(data_dir):
  images, labels = read_cifar_batch(
      os.path.join(data_dir, "cifar-10", "cifar-10-batches-bin", "data_batch_1.bin"))
  images = images[:2000].astype(np.float32) / 255
  labels = labels[:2000]
  keras.utils.set_random_seed(0)
  model = build_model("conv-bn", CIFAR, 10)
  model.compile(keras.optimizers.Adam(1e-2),
                # Graph, as the engine runs conv nets on a CPU (XLA's CPU convolutions
                # compile slowly and run on Eigen: robust_sparse/training/compilation.py).
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=False)
  start = time.perf_counter()
  history = model.fit(images, labels, batch_size=100, epochs=2, verbose=0)
  seconds = time.perf_counter() - start
  losses = history.history["loss"]
  assert losses[1] < losses[0] < np.log(10) + 0.5
  # About 2 s an epoch plus 5 s of compilation on 2 busy cores; the bound is
  # loose so that only a model grown far too big for quick studies fails.
  assert seconds < 120
  assert np.all(np.isfinite(model(images[:8], training=False).numpy()))
