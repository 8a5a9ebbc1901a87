"""--eps_sweep: robust accuracy against epsilon, per level, and its analysis."""

import os

import keras
import numpy as np
import pandas as pd
import pytest

from robust_sparse.analysis import load, report, robustness_curves
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from robust_sparse.experiments import eps_sweep
from robust_sparse.experiments.runner import Runner, level_dir

TINY = dict(dataset="sklearn_digits", train_iters=40, eval_every=20, prune_iters=1, trials=2,
            batch_size=32, valid_size=300, attack="pgd", eps=0.1, pgd_step_size=0.03,
            pgd_steps=3, adv_train=True, sharpness_examples=0, compile="graph",
            masking_checks=False, eps_sweep=(0.0, 0.05, 0.2), eps_sweep_examples=200)


def test_area_is_the_mean_accuracy_over_the_swept_range():
  eps, accuracy = [0.0, 0.1, 0.3], [0.9, 0.7, 0.1]
  expected = (0.1 * (0.9 + 0.7) / 2 + 0.2 * (0.7 + 0.1) / 2) / 0.3
  assert robustness_curves.area(eps, accuracy) == pytest.approx(expected)
  assert robustness_curves.area([0.1], [0.4]) == pytest.approx(0.4)


def _linear_binary_model(seed):
  rng = np.random.default_rng(seed)
  model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(2)])
  model.layers[0].set_weights([rng.normal(size=(6, 2)).astype(np.float32),
                               rng.normal(size=2).astype(np.float32) * 0.1])
  return model


def test_pgd_sweep_of_a_linear_model_equals_its_exact_robust_accuracy():
  """Two classes, inputs in [0.3, 0.7] and eps <= 0.2 (the box never binds): an example is
  robust at eps exactly when its margin exceeds eps ||w_y - w_other||_1."""
  model = _linear_binary_model(0)
  rng = np.random.default_rng(1)
  x = rng.uniform(0.3, 0.7, size=(400, 6)).astype(np.float32)
  kernel, bias = model.layers[0].get_weights()
  logits = x @ kernel + bias
  y = rng.integers(0, 2, size=400)
  other = 1 - y
  margin = logits[np.arange(400), y] - logits[np.arange(400), other]
  l1 = np.abs(kernel[:, 0] - kernel[:, 1]).sum()
  hp = Hparams(attack="pgd", eps=0.1, pgd_step_size=0.025, pgd_steps=20,
               eps_sweep=(0.0, 0.02, 0.05, 0.1, 0.2), eps_sweep_attack="pgd(steps=20)")
  results = eps_sweep.sweep(model, x, y, hp, trial=0)
  assert results["eps"] == [0.0, 0.02, 0.05, 0.1, 0.2]
  expected = [float((margin > eps * l1).mean()) for eps in results["eps"]]
  assert expected[0] > expected[-1] + 0.2  # The budgets matter here.
  np.testing.assert_allclose(results["accuracy"], expected, atol=1.5 / 400)


@pytest.mark.parametrize("values, message", [
    (dict(eps_sweep=(0.1, 0.05)), "--eps_sweep lists each budget once, in increasing order"),
    (dict(eps_sweep=(0.1, 0.1)), "--eps_sweep lists each budget once"),
    (dict(eps_sweep=(-0.1, 0.1)), "--eps_sweep takes budgets >= 0"),
    (dict(eps_sweep=(0.1,), eps_sweep_attack="pgd(eps=0.3)"), "--eps_sweep_attack"),
    (dict(eps_sweep=(0.1,), eps_sweep_attack="cw"), "--eps_sweep_attack"),
])
def test_bad_sweeps_raise_one_line_naming_the_flag(values, message):
  with pytest.raises(ValueError) as error:
    eps_sweep.check_options(Hparams(**values))
  assert message in str(error.value) and "\n" not in str(error.value)


def test_step_size_scales_with_the_budget():
  hp = Hparams(attack="pgd", eps=0.1, pgd_step_size=0.02, pgd_steps=10, eps_sweep=(0.0, 0.3))
  (zero, none), (eps, config) = eps_sweep.configs(hp)
  assert (zero, none) == (0.0, None)
  assert eps == 0.3 and config.eps == 0.3 and config.step_size == pytest.approx(0.06)
  assert config.labels == "true" and config.steps == 10


def test_runner_writes_each_levels_sweep_and_the_analysis_draws_it(tmp_path, digits):
  run_dir = Runner(Hparams(**TINY), digits, str(tmp_path), progress=False).run()
  for trial in (0, 1):
    for level in (0, 1):
      stored = files.read_json(os.path.join(level_dir(run_dir, trial, level),
                                            eps_sweep.RESULTS_FILE))
      assert stored["eps"] == [0.0, 0.05, 0.2] and stored["examples"] == 200
      assert stored["accuracy"][0] >= stored["accuracy"][-1]
  study = load.load_study(str(tmp_path))
  frame = robustness_curves.collect(study)
  assert len(frame) == 2 * 2 * 3
  table = robustness_curves.summary(frame)
  assert list(table["prune_iteration"]) == [0, 1] and set(table["trials"]) == {2}
  out = tmp_path / "analysis"
  path = report.write_analysis(study, str(out), source=str(tmp_path))
  text = open(path).read()
  assert robustness_curves.HEADING in text
  for name in ("robustness_curves.png", "robustness_area.png"):
    assert (out / "figures" / name).exists()
  written = pd.read_csv(out / "tables" / "robustness_curves.csv")
  np.testing.assert_allclose(written["area_mean"], table["area_mean"], rtol=1e-5)
