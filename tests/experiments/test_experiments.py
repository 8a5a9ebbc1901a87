"""Each experiment starts its pruned levels from the weights it promises."""

import os

import numpy as np

from robust_sparse.experiments.registry import EXPERIMENTS
from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams

TINY = dict(dataset="sklearn_digits", train_iters=6, eval_every=3, prune_iters=2, trials=1,
            batch_size=32, valid_size=300, attack="fgsm", pgd_steps=2,
            # About the weights each level starts from, not sharpness or compilation.
            sharpness_examples=0, compile="graph")


def _run(tmp_path, digits, **overrides):
  hparams = Hparams(**{**TINY, **overrides})
  run_dir = Runner(hparams, digits, str(tmp_path), progress=False).run()
  return run_dir, lambda level, name: files.load_arrays(
      os.path.join(level_dir(run_dir, 0, level), name))


def _assert_masked_equal(actual, expected, masks_dir):
  for path, value in actual.items():
    layer = path.split("/")[0]
    mask_file = os.path.join(masks_dir, "masks", f"{layer}.npy")
    if path.endswith("/mask"):
      value_expected = np.load(mask_file)  # Each level trains with its own mask.
    elif path.endswith("kernel") and os.path.exists(mask_file):
      value_expected = expected[path] * np.load(mask_file)
    else:
      value_expected = expected[path]
    np.testing.assert_array_equal(value, value_expected, err_msg=path)


def test_reinit_orig_resets_to_the_random_init(tmp_path, digits):
  run_dir, load = _run(tmp_path, digits, experiment="reinit_orig")
  for level in (1, 2):
    _assert_masked_equal(load(level, "weights_init.npz"), load(0, "weights_init.npz"),
                         level_dir(run_dir, 0, level))


def test_reinit_orig_trained_dense_reproduces_the_seed(tmp_path, digits):
  run_dir, load = _run(tmp_path, digits, experiment="reinit_orig", rewind_to="trained_dense")
  _assert_masked_equal(load(2, "weights_init.npz"), load(0, "weights_final.npz"),
                       level_dir(run_dir, 0, 2))


def test_reinit_none_continues_from_the_previous_level(tmp_path, digits):
  run_dir, load = _run(tmp_path, digits, experiment="reinit_none")
  for level in (1, 2):
    _assert_masked_equal(load(level, "weights_init.npz"), load(level - 1, "weights_final.npz"),
                         level_dir(run_dir, 0, level))


def test_reinit_rand_draws_fresh_weights(tmp_path, digits):
  run_dir, load = _run(tmp_path, digits, experiment="reinit_rand")
  first, second = load(0, "weights_init.npz"), load(1, "weights_init.npz")
  kernel = "hidden_1/kernel"
  mask = np.load(os.path.join(level_dir(run_dir, 0, 1), "masks", "hidden_1.npy"))
  assert not np.allclose(first[kernel] * mask, second[kernel])
  # Same distribution: Glorot uniform bound for a 64 -> 300 kernel.
  bound = np.sqrt(6 / (64 + 300))
  assert np.abs(second[kernel]).max() <= bound


def test_rewind_starts_from_the_rewind_point(tmp_path, digits):
  run_dir, load = _run(tmp_path, digits, experiment="rewind", rewind_iteration=2)
  rewind = load(0, "weights_rewind.npz")
  assert not np.array_equal(rewind["hidden_1/kernel"], load(0, "weights_init.npz")["hidden_1/kernel"])
  _assert_masked_equal(load(1, "weights_init.npz"), rewind, level_dir(run_dir, 0, 1))
  test = np.genfromtxt(os.path.join(level_dir(run_dir, 0, 1), "test.csv"), delimiter=",",
                       names=True)
  np.testing.assert_array_equal(test["iteration"], [2, 3, 6])


def test_no_pruning_trains_one_level(tmp_path, digits):
  run_dir, _ = _run(tmp_path, digits, experiment="no_pruning")
  assert os.path.exists(os.path.join(level_dir(run_dir, 0, 0), "metadata.json"))
  assert not os.path.exists(level_dir(run_dir, 0, 1))


def test_train_and_no_pruning_are_one_experiment():
  assert EXPERIMENTS.get("train") is EXPERIMENTS.get("no_pruning")


def test_only_rewind_asks_the_loop_for_a_snapshot():
  """The loop saves what an experiment's `snapshots` name, never by experiment name."""
  hp = Hparams(**{**TINY, "experiment": "rewind", "rewind_iteration": 4})
  assert EXPERIMENTS.get("rewind")(hp).snapshots(0) == {4: "weights_rewind.npz"}
  assert EXPERIMENTS.get("rewind")(hp).snapshots(1) == {}
  for name in ("reinit_orig", "reinit_none", "train"):
    assert EXPERIMENTS.get(name)(hp).snapshots(0) == {}
