"""Hyper-parameters: the run folder's hash, and the flags generated from the dataclasses."""

import dataclasses

import pytest
from absl import flags

from robust_sparse.core import hparams as hparams_lib
from robust_sparse.core.hparams import Hparams

# Literal hashes: a change here moves every existing run folder. Update them
# only on purpose, and say so in the commit.
PINNED = [
    ({}, "d001442e0e"),
    (dict(attack="pgd", adv_train=True, prune_iters=3), "f2f4da855d"),
    (dict(dataset="cifar10", model="conv-bn", experiment="train", optimizer="sgd",
          momentum=0.9, lr_schedule="cosine", epochs=200.0), "47436ff071"),
    (dict(lr_schedule="multistep", milestones=(100, 150)), "13b8996cae"),
]


@pytest.mark.parametrize("fields,digest", PINNED)
def test_pinned_hashes(fields, digest):
  assert Hparams(**fields).digest() == digest


def test_hash_covers_only_fields_off_their_default():
  assert set(Hparams().hashed_fields()) == set(hparams_lib.REQUIRED)
  assert Hparams(trials=3, data_dir="/x").digest() == Hparams().digest()
  assert Hparams(weight_decay=5e-4).digest() != Hparams().digest()
  assert Hparams(epochs=200).digest() == Hparams(epochs=200.0).digest()


def test_a_new_field_with_a_default_moves_no_folder():
  extended = dataclasses.make_dataclass(
      "Extended", [("new_option", float, dataclasses.field(default=0.5))],
      bases=(Hparams,), frozen=True)
  for fields, digest in PINNED:
    assert extended(**fields).digest() == digest
  assert extended(new_option=0.7).digest() != Hparams().digest()


def test_from_dict_fills_missing_fields_and_rejects_unknown_ones():
  old = {"dataset": "digits", "train_iters": 100, "milestones": [1, 2]}
  assert Hparams.from_dict(old) == Hparams(train_iters=100, milestones=(1.0, 2.0))
  assert Hparams.from_dict(Hparams(momentum=0.9).to_dict()) == Hparams(momentum=0.9)
  with pytest.raises(ValueError, match="no_such_field"):
    Hparams.from_dict({"no_such_field": 1})


def test_every_field_generates_a_flag_with_the_seed_names_and_defaults():
  values = flags.FlagValues()
  hparams_lib.define_flags(flags, values)
  values(["prog", "-lr=0.1", "-l1=0.01", "--milestones=100,150", "--epochs=3",
          "--optimizer=sgd"])
  for field in dataclasses.fields(Hparams):
    assert values[field.name].help, field.name
  hp = hparams_lib.from_flags(values)
  assert (hp.learning_rate, hp.l1_reg, hp.milestones, hp.epochs) == (0.1, 0.01, (100.0, 150.0),
                                                                     3.0)
  defaults = flags.FlagValues()
  hparams_lib.define_flags(flags, defaults)
  defaults(["prog"])
  seed = hparams_lib.from_flags(defaults, valid_size=10000)
  assert seed == Hparams()
  assert (seed.train_iters, seed.prune_iters, seed.eval_interval(50000), seed.batch_size,
          seed.learning_rate, seed.optimizer) == (50000, 20, 500, 60, 0.0012, "adam")


def test_length_and_evaluation_in_epochs():
  hp = Hparams(epochs=2.5, batch_size=100)
  assert hp.steps_per_epoch(1050) == 11
  assert hp.total_iterations(1050) == 28  # round(2.5 * 11)
  assert hp.eval_interval(1050) == 11
  assert Hparams(epochs=2, eval_every=5).eval_interval(1050) == 5


def _parsed(*argv):
  values = flags.FlagValues()
  hparams_lib.define_flags(flags, values)
  values(["prog", *argv])
  return values


def test_unset_flags_take_the_seeds_defaults_and_set_flags_win():
  ssam = hparams_lib.from_flags(_parsed("--optimizer=ssamf-sgd"), valid_size=0)
  assert (ssam.learning_rate, ssam.momentum, ssam.weight_decay, ssam.rho, ssam.sparsity,
          ssam.num_samples, ssam.update_freq, ssam.batch_size, ssam.lr_schedule) == (
              0.05, 0.9, 1e-3, 0.2, 0.5, 128, 1, 128, "cosine")
  mine = hparams_lib.from_flags(_parsed("--optimizer=ssamf-sgd", "--rho=0.1", "-lr=0.2"),
                                valid_size=0)
  assert (mine.rho, mine.learning_rate, mine.sparsity) == (0.1, 0.2, 0.5)
  # The lottery-ticket defaults stay for everything else, and the run records what it used.
  plain = hparams_lib.from_flags(_parsed("--optimizer=sam-sgd"), valid_size=0)
  assert (plain.learning_rate, plain.rho, plain.batch_size) == (
      hparams_lib.Hparams().learning_rate, 0.05, 60)
  assert ssam.to_dict()["rho"] == 0.2 and ssam.digest() != plain.digest()


def test_fallbacks_fill_only_what_neither_the_user_nor_a_seed_set():
  hp = hparams_lib.from_flags(_parsed("--dataset=digits"), fallbacks={"valid_size": 123})
  assert hp.valid_size == 123
  hp = hparams_lib.from_flags(_parsed("--valid_size=7"), fallbacks={"valid_size": 123})
  assert hp.valid_size == 7


def test_relu_prune_takes_autorep_values_but_not_over_a_given_length():
  hp = Hparams.with_seed_defaults(experiment="relu_prune")
  assert (hp.mask_epochs, hp.relu_replacement, hp.eta_min, hp.epochs, hp.batch_size) == (
      100.0, "identity_relu_grad", 1e-5, 100.0, 128)
  short = hparams_lib.from_flags(_parsed("--experiment=relu_prune", "--train_iters=7"),
                                 valid_size=0)
  assert short.epochs is None and short.train_iters == 7 and short.mask_epochs == 100.0
  assert Hparams(experiment="relu_prune").mask_epochs == Hparams().mask_epochs
