"""HYDRA's two levels in the analysis: the score phase is its own series, never a dense level.

A HYDRA run (`--experiment=hydra`) has prune_iter_0, the score phase (masks learned on the
frozen pretrained weights), and prune_iter_1, robust fine-tuning, both at the run's
sparsity. The analysis must not draw them as one method's two levels (a vertical segment,
or one robustness curve averaging both), nor read the score phase as the dense network.
"""

import json
import os

import numpy as np
from matplotlib import pyplot as plt

from robust_sparse.analysis import figures, load, metrics, robustness_curves
from robust_sparse.core.run_folder import EPS_SWEEP_FILE
from tests import analysis_fixtures as fixtures

SWEEP = {"eps_sweep": [0.0, 0.1], "eps_sweep_attack": "autoattack"}
# Robust accuracy at eps 0.1 per experiment and level (the fixture's clean accuracy aside).
ROBUST = {("reinit_orig", 0): 0.7, ("reinit_orig", 1): 0.6, ("hydra", 0): 0.2,
          ("hydra", 1): 0.5}


def _sweep(run_dir, experiment, trials, levels):
  for trial in range(trials):
    for level in range(levels):
      path = os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}", EPS_SWEEP_FILE)
      with open(path, "w") as f:
        json.dump({"attack": "autoattack", "examples": 200, "eps": [0.0, 0.1],
                   "accuracy": [0.9, ROBUST[(experiment, level)] + 0.01 * trial]}, f)


def _hydra_run(base, ticket_percent):
  """A HYDRA run: written as a 2-level run, then named hydra, both levels at one sparsity."""
  run_dir = fixtures.write_run(base, experiment="reinit_orig", attack="pgd", adv_train=True,
                               trials=2, prune_iters=1, epochs=2, mask_epochs=2,
                               sparsity=0.95, **SWEEP)
  path = os.path.join(run_dir, "hparams.json")
  with open(path) as f:
    hparams = json.load(f)
  hparams["experiment"] = "hydra"
  with open(path, "w") as f:
    json.dump(hparams, f)
  for trial in range(2):
    for level in range(2):
      meta_path = os.path.join(run_dir, f"trial_{trial}", f"prune_iter_{level}", "metadata.json")
      with open(meta_path) as f:
        metadata = json.load(f)
      metadata["percent_weights_remaining"] = ticket_percent
      with open(meta_path, "w") as f:
        json.dump(metadata, f)
  _sweep(run_dir, "hydra", 2, 2)
  return run_dir


def _study(tmp_path):
  base = str(tmp_path)
  ticket = fixtures.write_run(base, experiment="reinit_orig", attack="pgd", adv_train=True,
                              trials=2, prune_iters=1, **SWEEP)
  _sweep(ticket, "reinit_orig", 2, 2)
  hydra = _hydra_run(base, fixtures.percent_weights_remaining(1))
  return load.load_study(base), ticket, hydra


def test_the_score_phase_is_its_own_series(tmp_path):
  study, ticket, hydra = _study(tmp_path)
  rows = study.evaluations.drop_duplicates(["run_dir", "prune_iteration"])
  named = {(r.run_dir, r.prune_iteration): r.experiment for r in rows.itertuples()}
  assert named[(hydra, 0)] == "hydra_score" and named[(hydra, 1)] == "hydra"
  assert named[(ticket, 0)] == named[(ticket, 1)] == "reinit_orig"
  assert set(study.runs["experiment"]) == {"reinit_orig", "hydra"}  # The runs stay hydra.
  assert load.level_experiment("hydra", 0) == "hydra_score"
  assert load.level_experiment("reinit_orig", 0) == "reinit_orig"
  assert "score phase" in figures.experiment_label("hydra_score")
  assert "HYDRA" in figures.experiment_label("hydra")


def test_hydra_has_no_dense_level(tmp_path):
  study, ticket, hydra = _study(tmp_path)
  summary = metrics.best_sparsity_summary(study.evaluations).set_index("run_dir")
  assert summary.loc[hydra, "experiment"] == "hydra"
  assert np.isnan(summary.loc[hydra, "dense_test_acc"])
  assert not np.isnan(summary.loc[ticket, "dense_test_acc"])


def test_robustness_curves_keep_the_score_phase_apart(tmp_path):
  study, _, hydra = _study(tmp_path)
  frame = robustness_curves.collect(study)
  methods = frame[frame["run_dir"] == hydra].groupby("prune_iteration")["method"].unique()
  score, finetuned = methods[0][0], methods[1][0]
  assert "score phase" in score and "score phase" not in finetuned and "HYDRA" in finetuned
  table = robustness_curves.summary(frame)
  at_eps = {row["method"]: row["acc_eps=0.1"] for row in table.to_dict("records")}
  # Each phase's own mean over trials (0.5 and 0.51; 0.2 and 0.21), not both averaged.
  assert np.isclose(at_eps[finetuned], 0.505) and np.isclose(at_eps[score], 0.205)
  figure = robustness_curves.plot_areas(frame)
  legend = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
  assert score in legend and finetuned in legend
  plt.close(figure)
  figure = robustness_curves.plot_curves(frame)
  titles = [axis.get_title() for axis in figure.axes if axis.get_visible()]
  assert sum(score in t for t in titles) == 1 and sum(finetuned in t for t in titles) == 1
  plt.close(figure)


def test_accuracy_figure_names_both_hydra_series(tmp_path):
  study, _, _ = _study(tmp_path)
  final = metrics.final_evaluations(study.evaluations)
  figure = figures.plot_accuracy_vs_sparsity(final, "end of training")
  labels = [t.get_text() for legend in figure.legends for t in legend.get_texts()]
  assert figures.experiment_label("hydra") in labels
  assert figures.experiment_label("hydra_score") in labels
  # One column of panels: the four names in two rows, inside the figure.
  figure.canvas.draw()
  box = figure.legends[0].get_window_extent()
  assert box.x0 >= 0 and box.x1 <= figure.bbox.x1
  plt.close(figure)


def test_curve_labels_name_the_loss_once_and_the_attack_on_its_own_line(tmp_path):
  run = {"experiment": "hydra", "attack": "pgd", "adv_train": True, "adv_loss": "trades"}
  assert robustness_curves.method_label({**run, "setting": "adv_loss=trades"}, 1) == (
      "HYDRA (scores + fine-tuning) / pgd / adversarial [adv_loss=trades]")
  assert robustness_curves.method_label(run, 0) == (
      "HYDRA score phase (no fine-tuning) / pgd / adversarial (trades)")
  study, _, _ = _study(tmp_path)
  figure = robustness_curves.plot_curves(robustness_curves.collect(study))
  assert all(axis.get_xlabel() == "eps (200 test images)\nautoattack"
             for axis in figure.axes if axis.get_visible())
  plt.close(figure)
