"""The toolkit's public API for library users: one module to import from a notebook.

  from robust_sparse import api

  api.list_models(), api.list_datasets(), api.list_attacks(), api.list_experiments()
  data = api.load_dataset("sklearn_digits")
  network = api.build_model("lenet5", data.input_shape, data.num_classes)
  api.prune_low_magnitude(network, 0.5, scope="global")   # -> SparsityReport
  robust = api.RobustModel(network, attack=api.make_attack(api.AttackConfig("pgd", eps=0.1)))
  robust.fit(..., callbacks=[api.LotteryTicket(prune_rate=0.2, rounds=3)])

Everything here is re-exported from the module that defines it (documented
there); this module adds only the `list_*` look-ups. It sits above every other
package of the toolkit (it imports models, data and attacks), so nothing in
the toolkit imports it.

Names, as their users know them:
  * pruning (tensorflow/model-optimization's names where the idea is the
    same): `masked(model)` converts a plain Keras model's Dense / Conv2D
    layers, `prune_low_magnitude(model, rate, scope=...)` prunes one step in
    place with the runner's exact counts, `sparsity_report(model)`,
    `get_masks` / `set_masks`, `strip_masks(model)` (tfmot's `strip_pruning`);
    `LotteryTicket`, the train-prune-rewind callback for `fit`.
  * training: `RobustModel` (adversarial training, SAM, distillation ... in
    `fit`), `make_optimizer`, `make_schedule`.
  * attacks: `fgsm`, `pgd`, `apgd_ce` take the labels explicitly,
    `attack(model, x, y, eps=...)`; `y=None` attacks the model's own
    predictions (the lottery-ticket seed's and cleverhans' default, which the
    runner keeps as `--attack_labels=predicted`). `make_attack(AttackConfig(
    name, ..., labels=...))` returns `attack(model, x, y, seed)`; with the
    default `labels="predicted"` it ignores the `y` it is given, with
    `labels="true"` it attacks `y` (standard robust accuracy).
  * measurements: `Measurements` + `MeasurementCallback` (saturation and
    activation statistics fed by a `RobustModel`'s own passes),
    `SaturationCallback` (plain models, via `wrap`),
    `ActivationSparsityCallback` (any model, `RobustModel` included).
"""

import fnmatch
from typing import List

from robust_sparse.attacks import ATTACKS, AttackConfig, apgd_ce, fgsm, make_attack, pgd
from robust_sparse.data import DATASETS, load_dataset
from robust_sparse.models import MODELS, build_model
from robust_sparse.measure.activation_stats import ActivationSparsityCallback
from robust_sparse.training.keras_model import RobustModel
from robust_sparse.nn.keras_pruning import (SparsityReport, get_kernels, get_masks, masked,
                                         prune_low_magnitude, set_masks, sparsity_report)
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense, masked_layers, strip_masks
from robust_sparse.training.lottery import LotteryTicket
from robust_sparse.measure.measurement_callback import MeasurementCallback
from robust_sparse.measure.measurements import Measurements
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.measure.saturation import SaturationCallback
from robust_sparse.training.schedules import make_schedule

__all__ = [
    "ActivationSparsityCallback", "AttackConfig", "LotteryTicket", "MaskedConv2D",
    "MaskedDense", "MeasurementCallback", "Measurements", "RobustModel", "SaturationCallback",
    "SparsityReport", "apgd_ce", "build_model", "fgsm", "get_kernels", "get_masks",
    "list_attacks", "list_datasets", "list_experiments", "list_models", "load_dataset",
    "make_attack", "make_optimizer", "make_schedule", "masked", "masked_layers", "pgd",
    "prune_low_magnitude", "set_masks", "sparsity_report", "strip_masks",
]


def _filtered(names, pattern: str) -> List[str]:
  return sorted(name for name in names if not pattern or fnmatch.fnmatchcase(name, pattern))


def list_models(pattern: str = "") -> List[str]:
  """The registered model names (`build_model`, `--model`), sorted, as timm's `list_models`.

  Args:
    pattern: a shell-style filter, e.g. "resnet*"; "" lists all. Families
      resolved by pattern (any `wideresnet{depth}x{k}`) appear through their
      registered members only.
  """
  return _filtered(MODELS.names(), pattern)


def list_datasets(pattern: str = "") -> List[str]:
  """The registered data set names (`load_dataset`, `--dataset`), sorted; `pattern` as above."""
  return _filtered(DATASETS.names(), pattern)


def list_attacks(pattern: str = "") -> List[str]:
  """The registered attack names (`AttackConfig`, `--attack`), "none" included; sorted."""
  return _filtered(ATTACKS.names(), pattern)


def list_experiments(pattern: str = "") -> List[str]:
  """The registered experiment names (`--experiment`), sorted; `pattern` as above."""
  # Imported here: the experiment families pull in the runner, which a
  # notebook that only prunes and attacks never needs.
  from robust_sparse.experiments import EXPERIMENTS  # pylint: disable=import-outside-toplevel
  return _filtered(EXPERIMENTS.names(), pattern)
