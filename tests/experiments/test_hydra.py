"""HYDRA (`--experiment=hydra`, robust_sparse/nn/scores.py): the scores against NumPy, both
phases end to end on the digits, the run folder's lottery layout, bad input."""

import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.nn import scores as scores_lib
from tests.conftest import one_line_error, run_cli_batch

BASE = dict(dataset="sklearn_digits", model="dense-300-100", trials=1, batch_size=60,
            attack="fgsm", eps=0.1, adv_train=True, sharpness_examples=0, eval_every=1000,
            masking_checks=False, compile="graph")  # No XLA compile per level: small and fast.
SPARSITY = 0.9
HYDRA = dict(BASE, experiment="hydra", sparsity=SPARSITY, mask_epochs=1.0, score_lr=0.1,
             epochs=1.0, optimizer="sgd", learning_rate=0.01, momentum=0.9,
             weight_decay=1e-4)
LAYERS = ("hidden_1", "hidden_2", "output")


def numpy_scaled_init(w):
  fan_in = np.prod(w.shape[:-1])
  return np.sqrt(6.0 / fan_in) * w / np.abs(w).max()


def numpy_topk(scores, sparsity):
  """The 0/1 mask of the n - round(S n) largest |scores|."""
  flat = np.abs(scores).ravel()
  keep = flat.size - int(round(sparsity * flat.size))
  mask = np.zeros(flat.size, np.float32)
  mask[np.argsort(-flat, kind="stable")[:keep]] = 1
  return mask.reshape(scores.shape)


@pytest.fixture(scope="module")
def pretrained(digits, tmp_path_factory):
  """A finished, adversarially trained dense-300-100 run."""
  hp = Hparams(**{**BASE, "experiment": "train", "train_iters": 40})
  return Runner(hp, digits, str(tmp_path_factory.mktemp("pretrained")), progress=False).run()


@pytest.fixture(scope="module")
def hydra_run(digits, pretrained, tmp_path_factory):
  hp = Hparams(**HYDRA, pretrained_run=pretrained)
  return Runner(hp, digits, str(tmp_path_factory.mktemp("hydra")), progress=False).run()


def test_scaled_score_init_is_hydras_formula():
  rng = np.random.default_rng(0)
  for shape in [(7, 5), (3, 3, 4, 6)]:  # Dense: fan-in 7; Conv2D: 3 * 3 * 4.
    w = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores_lib.scaled_score_init(w)),
                               numpy_scaled_init(w), rtol=1e-6)


def test_topk_mask_keeps_the_largest_magnitudes():
  s = np.random.default_rng(1).normal(size=(40, 25)).astype(np.float32)
  for sparsity in (0.5, 0.9, 0.99):
    mask = keras.ops.convert_to_numpy(scores_lib.topk_mask(s, 1.0 - sparsity))
    np.testing.assert_array_equal(mask, numpy_topk(s, sparsity))


def test_straight_through_gradient_equals_the_numpy_derivation():
  """y = x @ (w * m * topk(|s|)), L = sum(c * y): dL/ds = (x^T c) * w * m * sign(s)."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, 9)).astype(np.float32)
  c = rng.normal(size=(6, 4)).astype(np.float32)
  w = rng.normal(size=(9, 4)).astype(np.float32)
  s = rng.normal(size=(9, 4)).astype(np.float32)
  m = (rng.random((9, 4)) > 0.2).astype(np.float32)
  layer = scores_lib.ScoredDense(4, use_bias=False, keep_fraction=0.5)
  layer.build((None, 9))
  layer.raw_kernel.assign(w)
  layer.mask.assign(m)
  layer.scores.assign(s)
  with tf.GradientTape() as tape:
    y = layer(x, training=True)
    loss = tf.reduce_sum(c * y)
  grad_s, grad_w = tape.gradient(loss, [layer.scores, layer.raw_kernel])
  top = numpy_topk(s, 0.5)
  np.testing.assert_allclose(y.numpy(), x @ (w * m * top), rtol=1e-5, atol=1e-5)
  upstream = x.T @ c  # dL / dw_eff.
  np.testing.assert_allclose(grad_s.numpy(), upstream * w * m * np.sign(s), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(grad_w.numpy(), upstream * m * top, rtol=1e-5, atol=1e-6)


def test_scored_conv_computes_with_the_top_k_of_its_kernel():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  layer = scores_lib.ScoredConv2D(5, 3, padding="same", keep_fraction=0.2)
  plain = keras.layers.Conv2D(5, 3, padding="same")
  layer.build(x.shape)
  plain.build(x.shape)
  s = rng.normal(size=layer.scores.shape).astype(np.float32)
  layer.scores.assign(s)
  kernel, bias = layer.raw_kernel.numpy(), rng.normal(size=5).astype(np.float32)
  layer.bias.assign(bias)
  plain.set_weights([kernel * numpy_topk(s, 0.8), bias])
  np.testing.assert_allclose(layer(x).numpy(), plain(x).numpy(), rtol=1e-5, atol=1e-5)


def test_score_phase_starts_from_scaled_pretrained_weights_and_freezes_them(
    hydra_run, pretrained):
  base = files.load_arrays(os.path.join(level_dir(pretrained, 0, 0), "weights_final.npz"))
  score = level_dir(hydra_run, 0, 0)
  init = files.load_arrays(os.path.join(score, "weights_init.npz"))
  final = files.load_arrays(os.path.join(score, "weights_final.npz"))
  for name in LAYERS:
    kernel = base[f"{name}/kernel"]
    np.testing.assert_allclose(init[f"{name}/scores"], numpy_scaled_init(kernel), rtol=1e-6)
    np.testing.assert_array_equal(init[f"{name}/kernel"], kernel)
    np.testing.assert_array_equal(final[f"{name}/kernel"], kernel)  # Frozen.
    assert not np.allclose(final[f"{name}/scores"], init[f"{name}/scores"])  # Trained.


def test_masks_are_the_final_top_k_per_layer_and_fine_tuning_keeps_them(hydra_run):
  score, finetune = level_dir(hydra_run, 0, 0), level_dir(hydra_run, 0, 1)
  final_scores = files.load_arrays(os.path.join(score, "weights_final.npz"))
  start = files.load_arrays(os.path.join(finetune, "weights_init.npz"))
  end = files.load_arrays(os.path.join(finetune, "weights_final.npz"))
  for name in LAYERS:
    expected = numpy_topk(final_scores[f"{name}/scores"], SPARSITY)
    for level in (score, finetune):
      np.testing.assert_array_equal(np.load(os.path.join(level, "masks", f"{name}.npy")),
                                    expected)
    np.testing.assert_array_equal(end[f"{name}/mask"], expected)
    assert not np.any(end[f"{name}/kernel"][expected == 0])  # Pruned weights stay at 0.
    kept = expected == 1
    assert not np.allclose(end[f"{name}/kernel"][kept], start[f"{name}/kernel"][kept])
    np.testing.assert_array_equal(start[f"{name}/kernel"][kept],
                                  final_scores[f"{name}/kernel"][kept])
  assert not any(path.endswith("/scores") for path in end)


def test_run_folder_has_the_lottery_layout(hydra_run):
  for level, phase in ((0, "score"), (1, "finetune")):
    directory = level_dir(hydra_run, 0, level)
    meta = files.read_json(os.path.join(directory, "metadata.json"))
    assert meta["completed"] and meta["hydra_phase"] == phase
    assert meta["percent_weights_remaining"] == pytest.approx(100 * (1 - SPARSITY), abs=0.01)
    sizes = {"hidden_1": 64 * 300, "hidden_2": 300 * 100, "output": 100 * 10}
    assert meta["layer_weights_remaining"] == {
        name: size - int(round(SPARSITY * size)) for name, size in sizes.items()}
    for name in ("train.csv", "valid.csv", "test.csv", "weights_init.npz",
                 "weights_final.npz"):
      assert os.path.exists(os.path.join(directory, name)), name
    for name in LAYERS:
      for sub in ("masks", "init_kernels", "post_kernels"):
        assert os.path.exists(os.path.join(directory, sub, f"{name}.npy"))
  # Fine-tuning's first evaluation is the score phase's final network.
  last = open(os.path.join(level_dir(hydra_run, 0, 0), "test.csv")).read().splitlines()[-1]
  first = open(os.path.join(level_dir(hydra_run, 0, 1), "test.csv")).read().splitlines()[1]
  assert first.split(",")[2:4] == last.split(",")[2:4]


def test_bad_hydra_input_fails_in_one_line(pretrained, tmp_path):
  unfinished = tmp_path / "unfinished"
  unfinished.mkdir()
  shutil.copy(os.path.join(pretrained, "hparams.json"), unfinished / "hparams.json")
  others = {}
  for field, value in (("model", "dense-100"), ("dataset", "mnist")):
    other = tmp_path / field
    shutil.copytree(pretrained, other)
    values = json.loads((other / "hparams.json").read_text())
    values[field] = value
    (other / "hparams.json").write_text(json.dumps(values))
    others[field] = str(other)
  common = ("--dataset=sklearn_digits", "--model=dense-300-100", "--experiment=hydra",
            "--noprogress", f"--base_dir={tmp_path / 'runs'}")
  cases = {
      common + ("--sparsity=0.9",): "--pretrained_run",
      common + ("--sparsity=0.9", f"--pretrained_run={tmp_path / 'missing'}"):
          "--pretrained_run",
      common + ("--sparsity=0.9", f"--pretrained_run={unfinished}"): "not finished",
      common + ("--sparsity=0.9", f"--pretrained_run={others['model']}"): "--model",
      common + ("--sparsity=0.9", f"--pretrained_run={others['dataset']}"): "--dataset",
      common + ("--sparsity=0", f"--pretrained_run={pretrained}"): "--sparsity",
      common + ("--sparsity=1", f"--pretrained_run={pretrained}"): "--sparsity",
      common + ("--sparsity=1.5", f"--pretrained_run={pretrained}"): "--sparsity",
  }
  outcomes = run_cli_batch(list(cases))
  for case, message in cases.items():
    one_line_error(*outcomes[case], message)
