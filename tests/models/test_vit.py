"""ViT (vanilla / sparsified) and the MNIST residual MLP: counts, names, errors, training."""

import keras
import numpy as np
import pytest

from robust_sparse.custom_ops.layers import JSquaredReLU
from robust_sparse.models import AFTER_DENSE, MODELS, build_model
from robust_sparse.models.check_zoo import check_model, trainable_count
from robust_sparse.models.vit import PRESETS, residual_mlp, vit
from robust_sparse.nn import sparsity_modules as sm
from robust_sparse.nn.activations import MixedActivation, ReLU
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense

CIFAR = (32, 32, 3)


def _vit_count(patch, channels, tokens, width, depth, mlp, classes, *, class_token=True,
               sparsified=False):
  """Trainable weights of the ViT, from its definition (torchvision's layout)."""
  count = patch * patch * channels * width + width  # Patch embedding conv.
  count += width * class_token + (tokens + class_token) * width  # Class token, positions.
  block = 2 * width  # ln_1.
  block += 4 * (width * width + width)  # Query, key, value, output projections.
  block += width if sparsified else 2 * width  # ln_2 (no beta when restricted).
  block += width * mlp + mlp + mlp * width + width  # Key and value layers.
  block += (tokens + class_token) * width if sparsified else 0  # Zeroth bias [T, d].
  return count + depth * block + 2 * width + width * classes + classes


def _images(shape, batch=2, seed=0):
  return np.random.default_rng(seed).uniform(size=(batch, *shape)).astype(np.float32)


def test_vit_b16_has_torchvisions_parameter_count():
  # torchvision.models.vit_b_16(): 86,567,656 weights at 224 px, 1000 classes.
  assert trainable_count(vit((224, 224, 3), 1000, preset="b16")) == 86_567_656


@pytest.fixture(scope="module")
def tiny_models():
  keras.utils.set_random_seed(0)
  return {variant: build_model(f"vit_tiny{suffix}", CIFAR, 10)
          for variant, suffix in [("vanilla", ""), ("sparsified", "_sparsified")]}


@pytest.mark.parametrize("variant", ["vanilla", "sparsified"])
def test_tiny_vit_shapes_counts_and_names(tiny_models, variant):
  model = tiny_models[variant]
  sizes = PRESETS["tiny"]
  tokens = (32 // sizes["patch_size"]) ** 2
  assert trainable_count(model) == _vit_count(
      sizes["patch_size"], 3, tokens, sizes["width"], sizes["depth"], sizes["mlp_width"], 10,
      sparsified=variant == "sparsified")
  logits = model(_images(CIFAR), training=False).numpy()
  assert logits.shape == (2, 10) and np.all(logits == 0)  # torchvision's zero head.
  assert model.get_layer("position_embedding").output.shape[1:] == (tokens + 1, sizes["width"])
  assert model.get_layer("block1_mlp_key").output.shape[1:] == (tokens + 1, sizes["mlp_width"])
  again = build_model(model.name, CIFAR, 10)
  assert [layer.name for layer in again.layers] == [layer.name for layer in model.layers]
  paths = [v.path for v in model.variables]
  assert [v.path for v in again.variables] == paths and len(set(paths)) == len(paths)
  assert all(isinstance(layer, (MaskedConv2D, MaskedDense)) for layer in model.layers
             if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)))
  activations = [layer for layer in model.layers if layer.name.endswith("_activation")]
  assert len(activations) == sizes["depth"]
  assert all(layer.site == AFTER_DENSE and isinstance(layer.input._keras_history.operation,
                                                      MaskedDense) for layer in activations)
  ln2 = model.get_layer("block1_ln2")
  if variant == "vanilla":
    assert all(isinstance(layer, ReLU) for layer in activations)
    assert type(ln2) is keras.layers.LayerNormalization and ln2.epsilon == 1e-6
    assert not any(isinstance(layer, sm.ZerothBias) for layer in model.layers)
  else:
    assert all(isinstance(layer, JSquaredReLU) for layer in activations)
    assert isinstance(ln2, sm.RestrictedLayerNorm) and ln2.beta is None
    bias = model.get_layer("block1_mlp_zeroth_bias")
    assert bias.layer_norm is ln2 and bias.clipping == 0.1
    assert tuple(bias.bias.shape) == (tokens + 1, sizes["width"])
    # Position "input": the zeroth bias sits between ln_2 and the key layer.
    assert model.get_layer("block1_mlp_key").input._keras_history.operation is bias
    assert bias.input._keras_history.operation is ln2


def test_vit_initialisation_follows_torchvision(tiny_models):
  model = tiny_models["vanilla"]
  width = PRESETS["tiny"]["width"]
  embedding = model.get_layer("position_embedding").embedding.numpy()
  np.testing.assert_allclose(embedding.std(), 0.02, rtol=0.05)
  assert not np.any(model.get_layer("class_token").token.numpy())
  query = model.get_layer("block1_attention_query").kernel.numpy()
  bound = np.sqrt(6 / (4 * width))
  assert np.abs(query).max() <= bound and np.abs(query).max() > 0.95 * bound
  key = model.get_layer("block1_mlp_key").kernel.numpy()  # xavier_uniform.
  assert np.abs(key).max() <= np.sqrt(6 / (width + PRESETS["tiny"]["mlp_width"]))
  assert 0 < np.abs(model.get_layer("block1_mlp_key").bias.numpy()).max() < 1e-4


def test_vit_options_position_output_mixed_activation_and_mean_token():
  model = vit((8, 8, 1), 10, preset="mnist", variant="sparsified", depth=1, width=8, heads=2,
              mlp_width=16, zeroth_bias_position="output", zeroth_bias_clipping=None,
              activation="mixed(steps=10)", class_token=False,
              layer_norm_mode="fine_tuning", uplift_steps=5)
  bias = model.get_layer("block1_mlp_zeroth_bias")
  assert bias.input._keras_history.operation is model.get_layer("block1_mlp_value")
  assert bias.clipping is None and tuple(bias.bias.shape) == (4, 8)
  assert isinstance(model.get_layer("block1_mlp_activation"), MixedActivation)
  ln2 = model.get_layer("block1_ln2")
  assert ln2.mode == "fine_tuning" and not ln2.beta.trainable
  assert "pool" in [layer.name for layer in model.layers]
  assert model(_images((8, 8, 1)), training=False).shape == (2, 10)
  # The registry's sparsified entry keeps any activation other than the default.
  mixed = build_model("vit_mnist_sparsified", (8, 8, 1), 10, activation="mixed(steps=3)")
  assert isinstance(mixed.get_layer("block1_mlp_activation"), MixedActivation)


@pytest.mark.parametrize("call, message", [
    (lambda: build_model("vit_tiny", (30, 30, 3), 10),
     "model 'vit_tiny': the image size 30x30 is not divisible by the patch size 4"),
    (lambda: build_model("vit_b16", (8, 8, 3), 10),
     "model 'vit_b16' needs inputs of at least 16x16 pixels"),
    (lambda: vit(CIFAR, 10, preset="small"), "unknown ViT preset 'small' (--vit_preset); "
     "known: b16, tiny, mnist"),
    (lambda: vit(CIFAR, 10, variant="sparse"), "unknown ViT variant 'sparse'"),
    (lambda: vit(CIFAR, 10, heads=3), "3 heads do not divide the width 128"),
    (lambda: vit(CIFAR, 10, depth=0), "depth must be a positive integer"),
    (lambda: vit(CIFAR, 10, variant="sparsified", zeroth_bias_clipping=-1),
     "zeroth_bias_clipping must be a number >= 0"),
    (lambda: vit(CIFAR, 10, variant="sparsified", layer_norm_mode="fine_tuning"),
     "uplift_steps must be an integer >= 1"),
    (lambda: build_model("vit_tiny", CIFAR, 10, dropout=0.1), "has no dropout option"),
    (lambda: residual_mlp((28, 28, 1), 10, width=0), "width must be a positive integer"),
])
def test_bad_vit_arguments_are_one_line_errors(call, message):
  with pytest.raises(ValueError) as error:
    call()
  assert message in str(error.value) and "\n" not in str(error.value)


def test_residual_mlp_counts_names_and_width():
  assert {"residual_mlp", "vit_b16", "vit_tiny_sparsified", "vit_mnist"} <= set(MODELS.names())
  model = build_model("residual_mlp", (32, 32, 1), 10)
  d = 128
  assert trainable_count(model) == 1024 * d + d + 4 * (2 * d + d * d + d) + d * 10 + 10
  names = [layer.name for layer in model.layers]
  assert names[:3] == ["input", "flatten", "initial"] and names[-1] == "output"
  assert names[3:7] == ["block1_ln", "block1_dense", "block1_activation", "block1_add"]
  narrow = residual_mlp((28, 28, 1), 10, width=16, affine=False)
  assert narrow.name == "residual_mlp16" and trainable_count(narrow) == (
      784 * 16 + 16 + 4 * (16 * 16 + 16) + 16 * 10 + 10)  # No LayerNorm weights.


def test_sparsified_vit_trains_with_fit_and_keeps_its_restrictions():
  keras.utils.set_random_seed(0)
  model = vit((8, 8, 1), 4, preset="mnist", variant="sparsified", depth=1, width=8, heads=2,
              mlp_width=16)
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(16, 8, 8, 1)).astype(np.float32)
  y = rng.integers(0, 4, size=16)
  model.compile(optimizer=keras.optimizers.Adam(0.05),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  before = model.get_layer("block1_mlp_key").kernel.numpy()
  model.fit(x, y, batch_size=8, epochs=2, verbose=0)
  assert not np.allclose(model.get_layer("block1_mlp_key").kernel.numpy(), before)
  gamma = model.get_layer("block1_ln2").gamma.numpy()
  bias = model.get_layer("block1_mlp_zeroth_bias").bias.numpy()
  assert np.all(gamma >= 1.0)
  assert np.abs(bias).max() > 0 and np.all(np.abs(bias) <= 0.1 * np.abs(gamma) + 1e-7)


def test_sparsified_vit_prunes_trains_under_the_engine_and_round_trips(tmp_path):
  keras.utils.set_random_seed(0)
  model = vit((8, 8, 1), 4, preset="mnist", variant="sparsified", depth=1, width=8, heads=2,
              mlp_width=16, zeroth_bias_clipping=0.01)
  # Prunes 20 % of every masked layer, trains under the toolkit's engine, checks
  # pruned weights stay zero, saves, reloads and compares variables and logits.
  check_model(model, steps=3, batch_size=2, directory=str(tmp_path))
  gamma = model.get_layer("block1_ln2").gamma.numpy()
  bias = model.get_layer("block1_mlp_zeroth_bias").bias.numpy()
  assert np.all(gamma >= 1.0) and np.all(np.abs(bias) <= 0.01 * np.abs(gamma) + 1e-7)
