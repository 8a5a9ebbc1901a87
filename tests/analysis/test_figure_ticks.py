"""Every figure the analysis draws can be read: each axis of a drawn panel has tick labels.

The studies are synthetic (`tests/analysis_fixtures.py`) in the layouts that used to
lose them: only adversarially trained runs (the quick start's), only naturally
trained runs, a study without the ticket, and runs without pruning levels. Every
figure `report.write_analysis` saves is checked as `figures.save` checks it, once
saving has drawn it.
"""

import pytest
from matplotlib import pyplot as plt

from robust_sparse.analysis import figures
from robust_sparse.analysis import load
from robust_sparse.analysis import metrics
from robust_sparse.analysis import report
from tests import analysis_fixtures as fixtures

DEFAULTS = {"weight_decay": 0.0, "optimizer": "adam", "prune_iters": 20,
            "train_iters": 50000, "eval_every": None, "learning_rate": 0.0012}


def _drawn_figures(base_dir, out_dir, monkeypatch):
  """{file stem: tick-label problems} of every figure the analysis saves."""
  checked, saving = {}, []
  save, missing_tick_labels = figures.save, figures.missing_tick_labels

  def recording_save(figure, folder, stem, formats):
    saving.append(stem)
    return save(figure, folder, stem, formats)

  def recording_check(figure, draw=True):
    # `save` checks each figure it has just drawn (draw=False): record its verdict.
    assert not draw, "save should check the figure its savefig drew"
    checked[saving[-1]] = missing_tick_labels(figure, draw=False)
    return checked[saving[-1]]

  monkeypatch.setattr(figures, "save", recording_save)
  monkeypatch.setattr(figures, "missing_tick_labels", recording_check)
  study = load.load_study(base_dir, defaults=DEFAULTS)
  report.write_analysis(study, out_dir, ["png"], source=base_dir)
  return checked


@pytest.mark.parametrize("layout", ["adversarial_only", "natural_only", "no_ticket",
                                    "both_modes", "no_pruning_levels"])
def test_every_figure_keeps_its_tick_labels(layout, tmp_path, monkeypatch):
  base_dir = str(tmp_path / "runs")
  if layout == "adversarial_only":  # The quick start: one FGSM-trained ticket.
    fixtures.write_run(base_dir, adv_train=True, trials=1, prune_iters=2)
  elif layout == "natural_only":
    fixtures.write_run(base_dir, trials=2, prune_iters=2)
    fixtures.write_run(base_dir, experiment="reinit_none", trials=2, prune_iters=2)
  elif layout == "no_ticket":
    fixtures.write_run(base_dir, experiment="reinit_rand", adv_train=True, trials=2,
                       prune_iters=2)
  elif layout == "both_modes":
    for adv_train in (False, True):
      fixtures.write_run(base_dir, adv_train=adv_train, trials=2, prune_iters=2)
  else:
    fixtures.write_run(base_dir, experiment="train", trials=2, new_columns=True)
    fixtures.write_run(base_dir, experiment="train", trials=2, new_columns=True,
                       weight_decay=0.0005)
  checked = _drawn_figures(base_dir, str(tmp_path / "analysis"), monkeypatch)
  assert checked, "the analysis drew no figure"
  assert {stem: bare for stem, bare in checked.items() if bare} == {}


def test_an_empty_panel_sharing_the_axis_is_caught():
  # The old layout: an empty natural-training panel sharing its row's y axis.
  figure, axes = plt.subplots(1, 2, sharey="row", squeeze=False)
  axes[0, 1].plot([1, 2], [3, 4])
  axes[0, 0].tick_params(labelleft=False)
  bare = figures.missing_tick_labels(figure)
  plt.close(figure)
  assert bare == ["panel 1 (''): y axis", "panel 2 (''): y axis"]


def test_one_mode_draws_one_column(tmp_path):
  fixtures.write_run(str(tmp_path), adv_train=True, trials=1, prune_iters=2)
  study = load.load_study(str(tmp_path), defaults=DEFAULTS)
  final = metrics.final_evaluations(study.evaluations, "test")
  figure = figures.plot_accuracy_vs_sparsity(final, "end of training")
  titles = [axis.get_title() for axis in figure.axes]
  plt.close(figure)
  assert titles == ["adversarial training\n(no runs with natural training)", ""]
