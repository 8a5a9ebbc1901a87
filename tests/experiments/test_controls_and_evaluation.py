"""Lottery-ticket controls (random_reinit, random_prune) and evaluation subsets."""

import os

import numpy as np
import pandas as pd
import pytest

from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from tests.conftest import one_line_error, run_cli_batch

# About what the experiments keep and evaluate, not compilation: graphs, no XLA compile
# per level (tests/training/test_engine.py tests the compile modes).
BASE = dict(dataset="sklearn_digits", model="dense-300-100", trials=1, prune_iters=2,
            train_iters=30, eval_every=30, attack="fgsm", eps=0.1, sharpness_examples=0,
            compile="graph")


@pytest.fixture(scope="module")
def ticket(digits, tmp_path_factory):
  hp = Hparams(**BASE, experiment="reinit_orig")
  return Runner(hp, digits, str(tmp_path_factory.mktemp("ticket")), progress=False).run()


def _level(run_dir, level):
  directory = level_dir(run_dir, 0, level)
  names = sorted(n[:-4] for n in os.listdir(os.path.join(directory, "masks")))
  masks = {n: np.load(os.path.join(directory, "masks", f"{n}.npy")) for n in names}
  return masks, files.load_arrays(os.path.join(directory, "weights_init.npz"))


def test_random_reinit_and_random_prune_keep_what_they_should_of_the_ticket(
    digits, ticket, tmp_path):
  reinit = Runner(Hparams(**BASE, experiment="random_reinit", ticket_run=ticket), digits,
                  str(tmp_path), progress=False).run()
  prune = Runner(Hparams(**BASE, experiment="random_prune", ticket_run=ticket), digits,
                 str(tmp_path), progress=False).run()
  ticket_init = _level(ticket, 0)[1]
  for level in (1, 2):
    ticket_masks, _ = _level(ticket, level)
    reinit_masks, reinit_init = _level(reinit, level)
    prune_masks, prune_init = _level(prune, level)
    for name, mask in ticket_masks.items():
      np.testing.assert_array_equal(reinit_masks[name], mask)  # The ticket's masks ...
      assert prune_masks[name].sum() == mask.sum()  # ... or only their counts,
      assert not np.array_equal(prune_masks[name], mask)  # chosen at random.
    kernel = "hidden_1/kernel"
    assert not np.allclose(reinit_init[kernel], ticket_init[kernel])  # A fresh init ...
    # ... or the ticket's own (pruned where the random mask is 0).
    np.testing.assert_array_equal(prune_init[kernel],
                                  ticket_init[kernel] * prune_masks["hidden_1"])
  levels = [files.read_json(os.path.join(level_dir(prune, 0, l), "metadata.json"))
            for l in range(3)]
  ticket_levels = [files.read_json(os.path.join(level_dir(ticket, 0, l), "metadata.json"))
                   for l in range(3)]
  assert ([m["weights_remaining"] for m in levels]
          == [m["weights_remaining"] for m in ticket_levels])


def test_controls_refuse_a_missing_or_different_ticket(ticket, tmp_path):
  common = ["--dataset=sklearn_digits", "--trials=1", "--prune_iters=2", "--train_iters=2",
            f"--base_dir={tmp_path}"]
  cases = [
      (["--experiment=random_reinit"], "random_reinit needs --ticket_run=DIR"),
      (["--experiment=random_prune", f"--ticket_run={tmp_path}/none"], "not a readable run"),
      (["--experiment=random_prune", f"--ticket_run={ticket}", "--model=lenet5"],
       "--model=dense-300-100, not --model=lenet5"),
      (["--experiment=random_reinit", f"--ticket_run={ticket}", "--prune_iters=5"],
       "--prune_iters=5 need more"),
      (["--eval_attacks=fgsm,foo"], "--eval_attacks 'foo': unknown attack"),
      (["--eval_attacks=pgd(restarts=0)"], "--eval_attacks 'pgd(restarts=0)'"),
      (["--attack_labels=gold"], "--attack_labels"),
  ]
  outcomes = run_cli_batch([common + args for args, _ in cases])
  for args, message in cases:
    one_line_error(*outcomes[tuple(common + args)], message)


def test_eval_examples_subsets_intermediate_evaluations_but_not_the_last(digits, tmp_path):
  hp = Hparams(**dict(BASE, prune_iters=0), experiment="train", eval_examples=50)
  run_dir = Runner(hp, digits, str(tmp_path), progress=False).run()
  directory = level_dir(run_dir, 0, 0)
  full = {"valid": 300, "test": len(digits.y_test)}
  for split in ("valid", "test"):
    frame = pd.read_csv(os.path.join(directory, f"{split}.csv"))
    assert frame["examples"].tolist() == [50, full[split]]


def test_attack_labels_reach_the_attack_and_eval_attacks_add_robust_columns(digits, tmp_path):
  """--attack_labels=true attacks y; predicted drops it; extra attacks get their columns."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from robust_sparse.attacks import (  # pylint: disable=import-outside-toplevel
      AttackConfig, make_attack)
  seen = []

  def model(x, training=False):
    del training
    return tf.stack([x[:, 0], -x[:, 0]], -1)

  for labels, expected in (("true", True), ("predicted", False)):
    attack = make_attack(AttackConfig(name="fgsm", eps=0.1, labels=labels))
    x = tf.constant([[0.5], [0.2]])
    y = tf.constant([1, 1])  # The model predicts 0 for both.
    x_adv = attack(model, x, y)
    # FGSM raises the loss of its label: of the true 1 by raising x (logit 0 - logit 1 =
    # 2x), of the predicted 0 by lowering x.
    seen.append((labels, bool(tf.reduce_all(x_adv > x))))
  assert seen == [("true", True), ("predicted", False)]

  hp = Hparams(**dict(BASE, prune_iters=0), experiment="train", attack_labels="true",
               eval_attacks="fgsm,pgd(steps=5,restarts=2),apgd_ce(steps=10)")
  run_dir = Runner(hp, digits, str(tmp_path), progress=False).run()
  frame = pd.read_csv(os.path.join(level_dir(run_dir, 0, 0), "test.csv"))
  last = frame.iloc[-1]
  names = ["adv_acc_fgsm", "adv_acc_pgd_steps5_restarts2", "adv_acc_apgd_ce_steps10"]
  assert all(name in frame.columns for name in names)
  # Robust counts never exceed clean accuracy; with true labels the eval fgsm column equals
  # the run's own FGSM accuracy on the clean-correct examples, so at most adv_acc.
  for name in names:
    assert 0.0 <= last[name] <= last["acc"] + 1e-9
  assert last["adv_acc_fgsm"] <= last["adv_acc"] + 1e-9
  assert last["adv_acc_pgd_steps5_restarts2"] <= last["adv_acc_fgsm"] + 0.02
  from robust_sparse.analysis import load, report  # pylint: disable=import-outside-toplevel
  runs = load.load_study(str(tmp_path)).runs
  note = report._attack_labels_note(runs)  # pylint: disable=protected-access
  assert "true labels" in note[0]


def test_with_true_labels_a_misclassified_clean_example_never_counts_as_robust():
  """A 'defence' that fixes misclassified inputs: the true-label count must not credit it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from robust_sparse.attacks import (  # pylint: disable=import-outside-toplevel
      AttackConfig, make_attack)
  from robust_sparse.training.steps import (  # pylint: disable=import-outside-toplevel
      evaluation_sums)

  class Flip(tf.Module):  # Predicts 0 for x < 0.5, 1 otherwise.
    def __call__(self, x, training=False):
      del training
      return tf.stack([0.5 - x[:, 0], x[:, 0] - 0.5], -1) * 10

  def moves_to_the_truth(model, x, y=None, seed=None):  # An "attack" that helps.
    del model, seed
    return tf.where(tf.equal(y, 1)[:, None], tf.ones_like(x), tf.zeros_like(x))

  x = tf.constant([[0.2], [0.8], [0.1]])
  y = tf.constant([1, 1, 0])  # The first is misclassified.
  seed = tf.constant([0, 0], tf.int64)
  for labels, expected in (("true", 2.0), ("predicted", 3.0)):
    moves_to_the_truth.labels = labels
    sums = evaluation_sums(Flip(), moves_to_the_truth, x, y, seed)
    assert float(sums["adv_acc"]) == expected
  real = make_attack(AttackConfig(name="pgd", eps=0.5, step_size=0.1, steps=5, labels="true"))
  assert real.labels == "true"
  assert float(evaluation_sums(Flip(), real, x, y, seed)["adv_acc"]) <= 2.0
