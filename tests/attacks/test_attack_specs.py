"""Evaluation-attack specs (`--eval_attacks`): parsing, defaults, column names, errors."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.attacks import AttackConfig, parse_attack_spec, parse_attack_specs
from robust_sparse.attacks.spec import resolve_attack_spec, split_attack_specs

DEFAULTS = AttackConfig("fgsm", eps=0.3, step_size=0.05, steps=10)


@pytest.mark.parametrize("spec, column", [
    ("fgsm", "fgsm"),
    ("pgd", "pgd"),
    ("pgd(steps=50,restarts=5)", "pgd_steps50_restarts5"),
    ("pgd(restarts=5, steps=50)", "pgd_steps50_restarts5"),  # One order for the columns.
    ("pgd(norm=2,eps=1.5)", "pgd_norm2_eps1.5"),
    ("pgd(eps=1.5,norm=2)", "pgd_norm2_eps1.5"),
    (" pgd ( norm = inf ) ", "pgd_norminf"),
    ("pgd(random_start=0,step_size=.01)", "pgd_step_size0.01_random_start0"),
    ("apgd_ce", "apgd_ce"),
    ("apgd_ce(steps=100,eps=0.03)", "apgd_ce_eps0.03_steps100"),
    ("fgsm()", "fgsm"),
])
def test_canonical_column_names(spec, column):
  name, _ = resolve_attack_spec(spec, DEFAULTS)
  assert name == column
  assert re.fullmatch(r"[A-Za-z0-9_.+-]+", name)


def test_unspecified_parameters_take_the_defaults():
  defaults = AttackConfig("pgd", eps=0.1, step_size=0.02, steps=7, clip_min=-1.0,
                          clip_max=1.0, impl="cleverhans")
  _, config = resolve_attack_spec("pgd(steps=50,restarts=5)", defaults)
  assert config == AttackConfig("pgd", eps=0.1, step_size=0.02, steps=50, restarts=5,
                                clip_min=-1.0, clip_max=1.0)
  _, config = resolve_attack_spec("pgd(norm=2,eps=1.5)", defaults)
  assert (config.norm, config.eps, config.steps, config.restarts) == (2, 1.5, 7, 1)
  _, config = resolve_attack_spec("apgd_ce", defaults)
  assert (config.name, config.steps, config.eps, config.impl) == ("apgd_ce", 100, 0.1,
                                                                  "native")
  _, config = resolve_attack_spec("apgd_ce(steps=20,eps=0.03)", defaults)
  assert (config.steps, config.eps) == (20, 0.03)
  _, config = resolve_attack_spec("fgsm", AttackConfig("pgd", restarts=3))
  assert (config.name, config.restarts) == ("fgsm", 1)


@pytest.mark.parametrize("spec, message", [
    ("cw", "unknown attack 'cw'; known: apgd_ce, apgd_t, autoattack, fab_t, fgsm, pgd, square"),
    ("none", "unknown attack 'none'"),
    ("pgd(foo=1)", "pgd has no parameter 'foo'; known: norm, eps"),
    ("fgsm(steps=3)", "fgsm has no parameter 'steps'"),
    ("pgd(steps=1.5)", "pgd.steps must be an integer >= 0, got '1.5'"),
    ("pgd(restarts=0)", "pgd.restarts must be an integer >= 1"),
    ("pgd(eps=-0.1)", "pgd.eps must be a number >= 0"),
    ("pgd(norm=1)", "pgd.norm must be 2 or inf"),
    ("pgd(random_start=2)", "pgd.random_start must be 0 or 1"),
    ("pgd(restarts=2,random_start=0)", "needs pgd with a random start"),
    ("pgd(steps=", "expected a value for 'steps'"),
    ("pgd(steps=5", "expected ',' or ')'"),
    ("pgd(steps=5,steps=6)", "parameter 'steps' given twice"),
    ("pgd steps", "expected end of spec"),
    ("pgd(eps=1/2)", "unexpected character '/'"),
    ("", "non-empty string"),
])
def test_bad_specs_raise_one_line_naming_the_flag(spec, message):
  with pytest.raises(ValueError) as error:
    parse_attack_spec(spec, DEFAULTS)
  text = str(error.value)
  assert text.startswith("--eval_attacks")
  assert "\n" not in text
  assert message in text


def test_a_list_of_specs():
  assert split_attack_specs("fgsm, pgd(steps=50,restarts=5),apgd_ce") == [
      "fgsm", "pgd(steps=50,restarts=5)", "apgd_ce"]
  columns = [name for name, _ in parse_attack_specs("fgsm,pgd(norm=2,eps=1.5)", DEFAULTS)]
  assert columns == ["fgsm", "pgd_norm2_eps1.5"]
  with pytest.raises(ValueError, match="--eval_attacks: 'pgd.restarts=5,steps=50.' and "
                                       "'pgd.steps=50,restarts=5.' are the same attack"):
    parse_attack_specs(["pgd(steps=50,restarts=5)", "pgd(restarts=5,steps=50)"], DEFAULTS)
  with pytest.raises(ValueError, match="--eval_attacks: unbalanced"):
    split_attack_specs("pgd(steps=5")


def test_parsed_attacks_run():
  keras.utils.set_random_seed(1)
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
  x = np.random.default_rng(1).random((8, 6)).astype(np.float32)
  y = np.argmax(model(x), -1)
  for spec in ["fgsm(eps=0.1)", "pgd(steps=2,restarts=2,eps=0.1)", "pgd(norm=2,eps=0.5,steps=2)",
               "apgd_ce(steps=3,eps=0.1)"]:
    _, attack = parse_attack_spec(spec, DEFAULTS)
    x_adv = attack(model, x, y, tf.constant([0, 1])).numpy()
    assert x_adv.shape == x.shape and np.any(x_adv != x)
