"""Configuration grids: phd-lab's JSON experiment grids as runs of this toolkit (spec 5.2).

  python -m run_experiments --config=experiments/configs/fig1_vgg16_cifar10.json --run_id=RES

A grid is a JSON object in the format of the phd-lab seed (`configs/**.json`
of MLRichter/size_matters_paper). Each key takes one value or a list of
values; the lists are expanded as a cartesian product, one run per
combination (`metrics` is the exception: one list used by every run). Keys
missing from the file take the seed's `DEFAULT_CONFIG` (`SEED_DEFAULTS`), and
keys starting with "_" (e.g. "_comment") are ignored. The combinations come
in the seed's order (`phd_lab/experiments/main.py`): `itertools.product` over
`EXPANSION_ORDER`, whatever the order of the keys in the file, so the last
key varies fastest.

`load_grid` reads and checks a file (one-line `ValueError`s naming the file
and the key); `to_overrides` turns one combination into the toolkit's
hyper-parameters (`robust_sparse.core.hparams.Hparams` field names); `grid_runs`
does both for a whole file and gives each run its base folder. Nothing here
imports TensorFlow.

Mapping (seed key / value -> `Hparams` field / value):

  model           vgg11, vgg13, vgg16, vgg19, vgg19_d3 -> model (the same names:
                    phd-lab's VGG, models/vgg.py)
                  resnet18, resnet34, resnet50 -> resnet18_imagenet, resnet34_imagenet,
                    resnet50_imagenet (phd-lab's 7x7-stem ResNets, even at 32 px)
                  resnet18noskip -> resnet18_imagenet_noskip
                  ResNet18_PC, ResNet34_PC -> resnet18_pc, resnet34_pc
                  (the toolkit names on the right are accepted as they are)
  epoch           E -> epochs = float(E)
  batch_size      B -> batch_size = B
  dataset         Cifar10 -> dataset cifar10, normalize cifar, augment crop,flip
                  Cifar100 -> cifar100, cifar, crop,flip
                  Cifar10SmallRandomPositioning -> cifar10_random_positioning, cifar, flip
                  MNIST -> digits_rgb, cifar, crop,flip
                  TinyImageNet -> tiny_imagenet, cifar, crop,flip
                  ImageNet -> imagenet, imagenet, flip
  resolution      R -> resolution = R
  optimizer       lrs60 -> optimizer sgd, learning_rate 0.1, momentum 0.9, nesterov False,
                    weight_decay 5e-4, lr_schedule step, lr_step_epochs 20, gamma 0.1,
                    schedule_per epoch (torch SGD + StepLR(step_size=20), gamma 0.1)
                  lrs180 -> the same with lr_step_epochs 50
                  sgd -> sgd, learning_rate 0.01, momentum 0.9, weight_decay 5e-4, constant
                  adam -> adam, learning_rate 0.001, weight_decay 0, constant
                  adamw -> adamw, learning_rate 0.001, weight_decay 0.01, constant
  delta           d -> delta = d (saturation threshold, in (0, 1])
  downsampling    D or null -> saturation_downsampling = D or None
  conv_method     channelwise -> (the toolkit's only conv treatment; nothing to set)
  metrics         [Accuracy, Top5Accuracy] -> top5 = True when Top5Accuracy is listed
                    (accuracy is always logged)
  logs_dir        the base folder when `grid_runs` gets no `base_dir`
  data_parallel   false -> (nothing to set)

Beyond phd-lab's names, a grid takes the toolkit's own: `model` any registered
model (`models.MODELS`, e.g. dense-300-100), `dataset` any registered data set
(`data.DATASETS`, e.g. sklearn_digits; its normalisation and augmentation stay
the flags' defaults), `optimizer` any `--optimizer` (e.g. ssamf-sgd, with the
flags' learning rate), and every other key named after a `run_experiments` flag
(an `Hparams` field: "learning_rate", "prune_iters", "experiment", "attack",
...), one value or a list of values, expanded after the seed's keys in file
order. Such keys override the seed's settings below; a list-valued field (e.g.
"measure") takes one list (or "a,b") per run, a list of lists to vary it;
"train_iters" replaces the seed's "epoch" (give one of them). Unknown keys and
names are one-line `ValueError`s listing what is known.

Every run also gets the settings the seed implies (`SEED_SETTINGS`): plain
training (`experiment=train`, one level, no pruning), no attack, one trial,
no validation split (phd-lab trains on the whole training set and reports
the test set), no label smoothing (plain cross-entropy), and saturation
measured (`measure=("saturation",)`), as every phd-lab run computes it.

What is refused with a `ValueError` rather than run differently: models,
data sets and optimizer presets neither listed above nor the toolkit's (e.g. efficentnet_b0,
vgg13PCA*, iNaturalist, ResizedImageNet, MNISTSmallRandomPositioning, radam,
noopt), metrics other than Accuracy / Top5Accuracy, `conv_method` other than
channelwise, `data_parallel: true` (use --devices), `device` (use --devices)
and a non-null `cache_dir` (use --data_dir: the toolkit reads the official
raw files, not torchvision's cache).

Known differences from phd-lab that are not refused:
- Augmentation runs after the resize to `resolution` here, while phd-lab crops
  the 32 px image (padding 4) and then resizes; the same at 32 px, but at
  224 px the crop's shift is 4 pixels here and up to 28 there. phd-lab's
  MNIST crop pads 3 px at 28 px, its TinyImageNet crop 8 px at 64 px, and its
  ImageNet uses RandomResizedCrop (not available here: flip only).
- `Top5Accuracy` sets `top5` (top-5 accuracy also for 10 classes); the
  runner otherwise logs top-5 only for data sets with more than
  10 classes.
- phd-lab trains under AMP autocast on GPU; these runs keep float32 unless
  --mixed_precision is given.
- Adam: Keras' epsilon (1e-7, added before the bias correction) instead of
  PyTorch's 1e-8.

Run IDs: phd-lab keeps the runs of a config under `logs/{Model}/{Dataset}_{res}/
{run_id}/`, so the same config under two run IDs gives two independent sets of
runs. Here a grid's runs go under `{base_dir}/{run_id}/`, and each run's folder
below that is the toolkit's usual one, `{base_dir}/{run_id}/{dataset}/{model}/
train/none/natural_{hash}` (`Hparams.run_dir`). Re-running a grid with the same
run ID resumes or skips its finished runs; another run ID starts a separate
set. A run ID only names folders: the toolkit's runs are seeded (`--seed`,
default 0), so for independent repetitions vary `--seed` too, or two run IDs
give identical numbers.
"""

import dataclasses
import importlib
import itertools
import json
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from robust_sparse.core import hparams

# The seed's keys in the order of its cartesian product (phd_lab/experiments/
# main.py), then `cache_dir` (spec 5.2's later list). `metrics` is not expanded.
EXPANSION_ORDER = ("model", "epoch", "batch_size", "dataset", "resolution", "optimizer",
                   "logs_dir", "device", "conv_method", "delta", "data_parallel",
                   "downsampling", "cache_dir")

# phd_lab/experiments/utils/config.py DEFAULT_CONFIG (its "epoch" is the string
# "30" there; an int here). `device` defaults to None: the toolkit's --devices.
SEED_DEFAULTS: Dict[str, Any] = {
    "model": "resnet18",
    "epoch": 30,
    "batch_size": 128,
    "dataset": "Cifar10",
    "resolution": 32,
    "optimizer": "adam",
    "metrics": ("Accuracy", "Top5Accuracy"),
    "logs_dir": "./logs/",
    "device": None,
    "conv_method": "channelwise",
    "delta": 0.99,
    "data_parallel": False,
    "downsampling": None,
    "cache_dir": None,
}

# Seed model name -> the toolkit's model registry name (models/vgg.py, models/resnet.py).
MODELS = {
    "vgg11": "vgg11",
    "vgg13": "vgg13",
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "vgg19_d3": "vgg19_d3",
    "resnet18": "resnet18_imagenet",
    "resnet34": "resnet34_imagenet",
    "resnet50": "resnet50_imagenet",
    "resnet18noskip": "resnet18_imagenet_noskip",
    "ResNet18_PC": "resnet18_pc",
    "ResNet34_PC": "resnet34_pc",
}

# Seed data set name -> (toolkit data set, normalisation, training augmentation),
# from phd_lab/datasets/*.py: every CIFAR / MNIST / TinyImageNet loader
# normalises with the CIFAR statistics, ImageNet with torchvision's.
DATASETS = {
    "Cifar10": ("cifar10", "cifar", "crop,flip"),
    "Cifar100": ("cifar100", "cifar", "crop,flip"),
    "Cifar10SmallRandomPositioning": ("cifar10_random_positioning", "cifar", "flip"),
    "MNIST": ("digits_rgb", "cifar", "crop,flip"),
    "TinyImageNet": ("tiny_imagenet", "cifar", "crop,flip"),
    "ImageNet": ("imagenet", "imagenet", "flip"),
}


def _constant(optimizer, learning_rate, momentum, weight_decay):
  return dict(optimizer=optimizer, learning_rate=learning_rate, momentum=momentum,
              nesterov=False, weight_decay=weight_decay, lr_schedule="constant",
              schedule_per="epoch")


def _step(step_epochs):
  return dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=False,
              weight_decay=5e-4, lr_schedule="step", lr_step_epochs=float(step_epochs),
              gamma=0.1, schedule_per="epoch")


# Seed optimizer preset -> toolkit fields (phd_lab/optimizers/factories.py; the
# Adam ones take PyTorch's default arguments; StepLR's gamma defaults to 0.1).
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    "lrs60": _step(20),
    "lrs180": _step(50),
    "sgd": _constant("sgd", 0.01, 0.9, 5e-4),
    "adam": _constant("adam", 0.001, 0.0, 0.0),
    "adamw": _constant("adamw", 0.001, 0.0, 0.01),
}

METRICS = ("Accuracy", "Top5Accuracy")

# What every phd-lab run is, in the toolkit's terms (see the module docstring).
SEED_SETTINGS: Dict[str, Any] = {
    "experiment": "train",
    "attack": "none",
    "adv_train": False,
    "trials": 1,
    "valid_size": 0,
    "label_smoothing": 0.0,
    "measure": ("saturation",),
}

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Invalid(Exception):
  """A bad value; `load_grid` adds the file and the key to the message."""


def _type_name(value) -> str:
  return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
          int: "an integer", float: "a number", type(None): "null"}.get(type(value),
                                                                      type(value).__name__)


def _integer(minimum):
  def check(value):
    if isinstance(value, bool) or not isinstance(value, int):
      raise _Invalid(f"expected an integer, got {_type_name(value)} {value!r}")
    if value < minimum:
      raise _Invalid(f"expected an integer >= {minimum}, got {value!r}")
    return value
  return check


def _string(value):
  if not isinstance(value, str) or not value:
    raise _Invalid(f"expected a non-empty string, got {_type_name(value)} {value!r}")
  return value


def _optional(check):
  def optional(value):
    return None if value is None else check(value)
  return optional


def _delta(value):
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise _Invalid(f"expected a number in (0, 1], got {_type_name(value)} {value!r}")
  if not 0.0 < value <= 1.0:
    raise _Invalid(f"expected a number in (0, 1], got {value!r}")
  return float(value)


def _boolean(value):
  if not isinstance(value, bool):
    raise _Invalid(f"expected true or false, got {_type_name(value)} {value!r}")
  return value


# Per key: the check of one value (returns the value, normalised).
_CHECKS = {
    "model": _string,
    "epoch": _integer(1),
    "batch_size": _integer(1),
    "dataset": _string,
    "resolution": _optional(_integer(1)),
    "optimizer": _string,
    "logs_dir": _string,
    "device": _optional(_string),
    "conv_method": _string,
    "delta": _delta,
    "data_parallel": _boolean,
    "downsampling": _optional(_integer(1)),
    "cache_dir": _optional(_string),
}


def _choices(key: str, value) -> List[Any]:
  """The checked choices of one key: a list, or a scalar as a single choice."""
  if isinstance(value, dict):
    raise _Invalid(f"expected a value or a list of values, got an object {value!r}")
  values = value if isinstance(value, list) else [value]
  if not values:
    raise _Invalid("empty list: give at least one value")
  checked = []
  for item in values:
    if isinstance(item, (list, dict)):
      raise _Invalid(f"expected a value or a list of values, got {_type_name(item)} "
                     f"{item!r} inside the list")
    item = _CHECKS[key](item)
    if item in checked:
      raise _Invalid(f"{item!r} is listed twice (the runs would be the same)")
    checked.append(item)
  return checked


def _metrics(value) -> Tuple[str, ...]:
  if not isinstance(value, list):
    raise _Invalid(f"expected a list of metric names, got {_type_name(value)} {value!r}")
  if not value:
    raise _Invalid("empty list: give at least one metric")
  for item in value:
    _string(item)
  return tuple(value)


def _reject_duplicate_keys(pairs):
  grid = {}
  for key, value in pairs:
    if key in grid:
      raise _Invalid(f"key {key!r} appears twice")
    grid[key] = value
  return grid


def _read(path: str) -> Dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    reason = getattr(e, "strerror", None) or str(e)
    raise ValueError(f"{path}: cannot read the grid: {reason}") from None
  try:
    grid = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column "
                     f"{e.colno}") from None
  except _Invalid as e:
    raise ValueError(f"{path}: {e}") from None
  if not isinstance(grid, dict):
    raise ValueError(f"{path}: a grid must be a JSON object of keys to values or lists of "
                     f"values, got {_type_name(grid)}")
  return grid


def _hparams_fields() -> Dict[str, Any]:
  """{name: dataclass field} of `Hparams`."""
  return {field.name: field for field in dataclasses.fields(hparams.Hparams)}


def _field_value(field, value):
  """Checks one value of an `Hparams` field as its flag would (type, choices, bounds)."""
  kind = hparams._flag_kind(field)  # pylint: disable=protected-access
  meta = field.metadata
  if value is None:
    if field.default is None or meta.get("flag_default", 0) is None:
      return None
    raise _Invalid(f"null is not allowed (default {field.default!r})")
  if kind == "list":
    item = hparams._list_item_type(field)  # pylint: disable=protected-access
    items = ([v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str)
             else list(value) if isinstance(value, tuple) else value)  # tuple: checked before
    if not isinstance(items, list) or any(isinstance(v, (list, dict, bool)) for v in items):
      raise _Invalid(f"expected a list of {item.__name__} values (or a comma string), got "
                     f"{_type_name(value)} {value!r}")
    try:
      return tuple(item(v) for v in items)
    except (TypeError, ValueError):
      raise _Invalid(f"expected a list of {item.__name__} values, got {value!r}") from None
  expected, what = {"bool": ((bool,), "true or false"), "integer": ((int,), "an integer"),
                    "float": ((int, float), "a number"), "string": ((str,), "a string")}[kind]
  if not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool)):
    raise _Invalid(f"expected {what}, got {_type_name(value)} {value!r}")
  if kind == "float":
    value = float(value)
  if "choices" in meta and value not in meta["choices"]():
    raise _Invalid(f"{value!r} is not one of {', '.join(map(str, meta['choices']()))}")
  if "lower_bound" in meta and value < meta["lower_bound"]:
    raise _Invalid(f"expected a value >= {meta['lower_bound']}, got {value!r}")
  if "upper_bound" in meta and value > meta["upper_bound"]:
    raise _Invalid(f"expected a value <= {meta['upper_bound']}, got {value!r}")
  return value


def _field_choices(field, value) -> List[Any]:
  """The checked choices of an `Hparams` key: a value, or a list of values (of lists for a
  list-valued field)."""
  if isinstance(value, dict):
    raise _Invalid(f"expected a value or a list of values, got an object {value!r}")
  if hparams._flag_kind(field) == "list":  # pylint: disable=protected-access
    values = value if isinstance(value, list) and value and all(
        isinstance(v, list) for v in value) else [value]
  else:
    values = value if isinstance(value, list) else [value]
  if not values:
    raise _Invalid("empty list: give at least one value")
  checked = []
  for item in values:
    item = _field_value(field, item)
    if item in checked:
      raise _Invalid(f"{item!r} is listed twice (the runs would be the same)")
    checked.append(item)
  return checked


def _unknown_key(key: str) -> _Invalid:
  return _Invalid(f"unknown key: neither phd-lab's ({', '.join(sorted(SEED_DEFAULTS))}) nor "
                  "a run_experiments flag (python -m run_experiments --helpfull lists them); "
                  "keys starting with '_' are comments")


def load_grid(path: str) -> List[Dict[str, Any]]:
  """Reads a grid file and expands it into its combinations.

  Args:
    path: a JSON file holding one object (the seed's config format).

  Returns:
    One dict per combination, in the seed's order (`itertools.product` over
    `EXPANSION_ORDER`, the last key fastest), each holding every key of
    `SEED_DEFAULTS` with one value (`metrics`: the tuple shared by all).

  Raises:
    ValueError: one line naming `path` and, where there is one, the key: an
      unreadable file or invalid JSON, a value that is not an object, an
      unknown key, an empty list, a value of the wrong type or out of range,
      a value listed twice.
  """
  grid = _read(path)
  choices = {}
  extra = {}  # Hparams keys, in file order.
  metrics = SEED_DEFAULTS["metrics"]
  fields = None
  for key, value in grid.items():
    if key.startswith("_"):
      continue
    try:
      if key == "metrics":
        metrics = _metrics(value)
      elif key in _CHECKS:
        choices[key] = _choices(key, value)
      else:
        fields = fields if fields is not None else _hparams_fields()
        if key not in fields:
          raise _unknown_key(key)
        extra[key] = _field_choices(fields[key], value)
    except _Invalid as e:
      raise ValueError(f"{path}: key {key!r}: {e}") from None
  if "train_iters" in extra:
    if "epoch" in choices or "epochs" in extra:
      other = "epoch" if "epoch" in choices else "epochs"
      raise ValueError(f"{path}: keys 'train_iters' and {other!r} both set the training "
                       "length; give one")
    choices["epoch"] = [None]  # The length is train_iters.
  axes = [choices.get(key, [SEED_DEFAULTS[key]]) for key in EXPANSION_ORDER] + list(
      extra.values())
  keys = EXPANSION_ORDER + tuple(extra)
  points = [dict(zip(keys, values), metrics=metrics) for values in itertools.product(*axes)]
  if "resolution" not in choices:  # phd-lab's 32 px is for its data sets, not the toolkit's.
    for point in points:
      if point["dataset"] not in DATASETS:
        point["resolution"] = None
  return points


def _name(key, value, table, what):
  if value in table:
    return table[value]
  known = ", ".join(sorted(table, key=str.lower))
  raise ValueError(f"grid key {key!r}: {what} {value!r} is not supported here; "
                   f"supported: {known}")


def to_overrides(point: Dict[str, Any]) -> Dict[str, Any]:
  """The toolkit's hyper-parameters of one grid combination.

  Args:
    point: seed keys to single values, as `load_grid` returns them; missing
      keys take `SEED_DEFAULTS`.

  Returns:
    `Hparams` field names to values (a plain dict): the mapped keys (see the
    module docstring), the optimizer preset's fields and `SEED_SETTINGS`.

  Raises:
    ValueError: one line naming the key, for an unknown key or a value the
      toolkit cannot run as the seed does (an unknown model, data set,
      optimizer preset or metric; a device; a cache_dir; data_parallel;
      another conv_method).
  """
  others = [key for key in point if key not in SEED_DEFAULTS]
  extra = {}
  if others:
    fields = _hparams_fields()
    for key in others:
      try:
        if key not in fields:
          raise _unknown_key(key)
        extra[key] = _field_value(fields[key], point[key])
      except _Invalid as e:
        raise ValueError(f"grid key {key!r}: {e}") from None
  point = {**SEED_DEFAULTS, **point}
  for key, check in _CHECKS.items():
    try:
      if not (key == "epoch" and point[key] is None and "train_iters" in extra):
        check(point[key])
    except _Invalid as e:
      raise ValueError(f"grid key {key!r}: {e}") from None
  if point["device"] is not None:
    raise ValueError(f"grid key 'device': {point['device']!r} cannot be chosen per run; "
                     "choose GPUs with --devices")
  if point["data_parallel"]:
    raise ValueError("grid key 'data_parallel': true is not supported in a grid; train on "
                     "several GPUs with --devices")
  if point["cache_dir"] is not None:
    raise ValueError(f"grid key 'cache_dir': {point['cache_dir']!r} is not supported (the "
                     "toolkit reads the official raw files, not torchvision's cache); give "
                     "--data_dir")
  if point["conv_method"] != "channelwise":
    raise ValueError(f"grid key 'conv_method': {point['conv_method']!r} is not supported; "
                     "supported: channelwise")
  bad_metrics = [m for m in point["metrics"] if m not in METRICS]
  if bad_metrics:
    raise ValueError(f"grid key 'metrics': {bad_metrics[0]!r} is not supported; supported: "
                     f"{', '.join(METRICS)}")
  model = (point["model"] if point["model"] in MODELS.values()
           else MODELS[point["model"]] if point["model"] in MODELS
           else _registered("model", point["model"], MODELS, "models", "MODELS"))
  if point["dataset"] in DATASETS:
    dataset, normalize, augment = DATASETS[point["dataset"]]
    data = {"dataset": dataset, "normalize": normalize, "augment": augment}
  else:  # The toolkit's own data set: its flags' normalisation and augmentation.
    data = {"dataset": _registered("dataset", point["dataset"], DATASETS, "data", "DATASETS")}
  overrides = {
      "model": model,
      **data,
      "resolution": point["resolution"],
      "epochs": None if point["epoch"] is None else float(point["epoch"]),
      "batch_size": point["batch_size"],
  }
  if point["optimizer"] in OPTIMIZERS:
    overrides.update(OPTIMIZERS[point["optimizer"]])
  else:
    overrides["optimizer"] = _toolkit_optimizer(point["optimizer"])
  overrides.update(delta=point["delta"], saturation_downsampling=point["downsampling"])
  overrides.update(SEED_SETTINGS)
  if "Top5Accuracy" in point["metrics"]:
    overrides["top5"] = True
  overrides.update(extra)
  return overrides


def _registered(key, value, seed_names, module, registry):
  """`value` if the toolkit's `module.registry` knows it; else a one-line ValueError."""
  known = importlib.import_module(module).__dict__[registry]
  try:
    if value in known or known.get(value) is not None:  # Patterned names (dense-300-100).
      return value
  except (KeyError, ValueError):
    pass
  names = list(known.names())
  raise ValueError(f"grid key {key!r}: {value!r} is neither phd-lab's "
                   f"({', '.join(sorted(seed_names, key=str.lower))}) nor the toolkit's "
                   f"({', '.join(sorted(names))})")


def _toolkit_optimizer(name):
  # Heavy: Keras; the grid file is read and checked without it.
  from robust_sparse.training.optimizers import (  # pylint: disable=import-outside-toplevel
      split_optimizer)
  try:
    split_optimizer(name)
  except ValueError as e:
    raise ValueError(f"grid key 'optimizer': {name!r} is neither a phd-lab preset "
                     f"({', '.join(sorted(OPTIMIZERS))}) nor the toolkit's: {e}") from None
  return name


def check_run_id(run_id: str) -> str:
  """Returns `run_id` if it can name a folder: letters, digits, '.', '_', '-'.

  Raises:
    ValueError: an empty run ID, one with a path separator or other
      characters, or one starting with '.' or '-'.
  """
  if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
    raise ValueError(f"run_id {run_id!r}: expected a folder name of letters, digits, '.', "
                     "'_' and '-', starting with a letter or digit")
  return run_id


def grid_runs(path: str, run_id: str,
              base_dir: Optional[str] = None) -> List[Tuple[Dict[str, Any], str]]:
  """Every run of a grid: its hyper-parameters and the base folder to run it in.

  Each run's folder is `Hparams(**overrides).run_dir(base)` as for any run,
  with `base = os.path.join(base_dir, run_id)`; with `base_dir` None the
  combination's `logs_dir` (the seed's output root, default ./logs/) is used
  instead, so a seed config run without --base_dir writes where the seed
  did. The whole grid is checked before anything is returned, so a bad
  combination stops a grid before its first run.

  Args:
    path: the grid file.
    run_id: names the set of runs (see the module docstring).
    base_dir: the output root (--base_dir), or None to use the grid's logs_dir.

  Returns:
    `[(overrides, base)]` in `load_grid`'s order; `overrides` as `to_overrides`.

  Raises:
    ValueError: one line naming `path` (and the key), from `load_grid` or
      `to_overrides`; a bad `run_id`.
  """
  check_run_id(run_id)
  runs = []
  for point in load_grid(path):
    try:
      overrides = to_overrides(point)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    root = base_dir if base_dir is not None else point["logs_dir"]
    runs.append((overrides, os.path.join(root, run_id)))
  return runs
