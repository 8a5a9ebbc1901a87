"""Model options as flags, and fine-tuning a vanilla ViT into the sparsified one."""

import os

import numpy as np
import pandas as pd
import pytest

from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.models import build_model
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from tests.conftest import run_cli_batch, one_line_error

TINY = dict(model="vit", vit_preset="mnist", patch_size=4, depth=1, heads=2, width=16,
            mlp_width=32)
BASE = dict(dataset="sklearn_digits", train_examples=240, trials=1, batch_size=60, attack="none",
            sharpness_examples=0, optimizer="adamw", learning_rate=3e-3, **TINY)


@pytest.fixture(scope="module")
def vanilla(digits, tmp_path_factory):
  """A finished vanilla ViT run to fine-tune from."""
  hp = Hparams(**BASE, experiment="train", train_iters=40, eval_every=40)
  return Runner(hp, digits, str(tmp_path_factory.mktemp("vanilla")), progress=False).run()


def test_model_options_reach_the_builder():
  model = build_model("vit", (8, 8, 1), 10, vit_variant="sparsified", patch_size=2, depth=2,
                      heads=1, width=8, mlp_width=12, zeroth_bias_clipping=float("inf"))
  assert model.name == "vit"
  assert model.get_layer("block1_ln2").mode == "from_scratch"  # Sparsified.
  assert model.get_layer("patch_embedding").kernel.shape == (2, 2, 1, 8)
  assert model.get_layer("block2_mlp_key").kernel.shape == (8, 12)
  assert model.get_layer("block1_mlp_zeroth_bias").clipping is None  # inf: unclipped.
  assert "block3_ln1" not in [layer.name for layer in model.layers]
  narrow = build_model("residual_mlp", (8, 8, 1), 10, width=16, layer_norm_affine=False)
  assert narrow.get_layer("initial").kernel.shape == (64, 16)
  assert not narrow.get_layer("block1_ln").scale
  with pytest.raises(ValueError, match="--width does not apply to model 'lenet5'"):
    build_model("lenet5", (28, 28, 1), 10, width=3)
  with pytest.raises(ValueError, match="--vit_preset does not apply to model 'vit_tiny'"):
    build_model("vit_tiny", (32, 32, 3), 10, vit_preset="b16")


def test_finetune_loads_the_vanilla_weights_and_moves_to_the_sparsified_model(
    digits, vanilla, tmp_path):
  steps_per_epoch = 4  # 240 training images / 60.
  hp = Hparams(**BASE, experiment="sparsify_finetune", pretrained_run=vanilla,
               train_iters=12, eval_every=4, activation_mixing_epochs=2.0,
               layernorm_uplifting_epochs=2.0, lora_rank=2)
  runner = Runner(hp, digits, str(tmp_path), progress=False)
  run_dir = runner.run()
  directory = level_dir(run_dir, 0, 0)
  source = files.load_arrays(os.path.join(level_dir(vanilla, 0, 0), "weights_final.npz"))
  start = files.load_arrays(os.path.join(directory, "weights_init.npz"))
  final = files.load_arrays(os.path.join(directory, "weights_final.npz"))
  for path, value in source.items():  # The fine-tuning starts at the vanilla weights.
    np.testing.assert_array_equal(start[path], value)
  assert not np.any(start["block1_mlp_zeroth_bias/bias"])
  # LoRA: the encoder blocks' kernels are frozen, their LoRA factors and the rest train.
  for name in ("block1_mlp_key", "block1_attention_query"):
    np.testing.assert_array_equal(final[f"{name}/kernel"], source[f"{name}/kernel"])
    assert not np.array_equal(final[f"{name}/lora_kernel_b"], start[f"{name}/lora_kernel_b"])
  assert not np.array_equal(final["output/kernel"], source["output/kernel"])
  assert np.any(final["block1_mlp_zeroth_bias/bias"])
  # Restricted LayerNorm in fine-tuning mode: beta frozen, |gamma| >= min(step / U, 1).
  np.testing.assert_array_equal(final["block1_ln2/beta"], source["block1_ln2/beta"])
  assert np.all(np.abs(final["block1_ln2/gamma"]) >= 1.0)
  rows = pd.read_csv(os.path.join(directory, "train.csv"))
  # k = clip(step / (2 epochs), 0, 1) after 4, 8, 12 steps.
  np.testing.assert_allclose(rows["portion_of_jsrelu"], [4 / 8, 1.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(rows["restricted_layer_norm_scaling_factors"].iloc[-1],
                             np.abs(final["block1_ln2/gamma"]).mean(), rtol=1e-5)
  np.testing.assert_allclose(rows["zeroth_biases"].iloc[-1],
                             np.abs(final["block1_mlp_zeroth_bias/bias"]).mean(), rtol=1e-5)
  assert runner.num_train // steps_per_epoch == hp.batch_size


def test_bad_model_options_and_finetune_settings_are_one_line_errors(vanilla, tmp_path):
  common = ["--dataset=sklearn_digits", "--trials=1", "--train_iters=2", "--attack=none",
            f"--base_dir={tmp_path}"]
  cases = [
      (["--model=vit", "--vit_preset=huge"], "--vit_preset"),
      (["--model=vit", "--patch_size=3"], "not divisible by the patch size 3"),
      (["--model=vit", "--experiment=sparsify_finetune", f"--pretrained_run={vanilla}",
        "--lora_rank=0"], "--lora_rank"),
      (["--model=vit", "--zeroth_bias_clipping=-1"], "--zeroth_bias_clipping"),
      (["--model=lenet5", "--width=3"], "--width does not apply"),
      (["--model=vit", "--lora_rank=4"], "--lora_rank=4 is for --experiment=sparsify_finetune"),
      (["--model=vit", "--experiment=sparsify_finetune"], "needs --pretrained_run"),
      (["--model=lenet5", "--experiment=sparsify_finetune", f"--pretrained_run={vanilla}"],
       "fine-tunes a ViT"),
      (["--model=vit", "--vit_preset=mnist", "--patch_size=4", "--width=32", "--depth=1",
        "--heads=2", "--mlp_width=32", "--experiment=sparsify_finetune",
        f"--pretrained_run={vanilla}"], "has shape"),
  ]
  outcomes = run_cli_batch([common + args for args, _ in cases])
  for args, message in cases:
    one_line_error(*outcomes[tuple(common + args)], message)
