"""Configuration grids (experiments/grid.py): expansion, defaults, mapping, shipped configs, errors.

Pure Python and fast: `experiments/grid.py` is loaded from its file, because
importing the `experiments` package imports TensorFlow; the toolkit's field and
registry names are read from the sources with `ast` for the same reason.
"""

import ast
import glob
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = os.path.join(REPO, "experiments", "configs")


def _load_grid_module():
  spec = importlib.util.spec_from_file_location(
      "grid_under_test", os.path.join(REPO, "experiments", "grid.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


grid = _load_grid_module()

# Fields the lead is adding to Hparams alongside the grids (--measure, --delta,
# --saturation_downsampling); accepted whether or not hparams.py has them yet.
NEW_FIELDS = {"measure", "delta", "saturation_downsampling"}

LRS60 = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, nesterov=False,
             weight_decay=5e-4, lr_schedule="step", lr_step_epochs=20.0, gamma=0.1,
             schedule_per="epoch")

# Expected number of runs per shipped config.
EXPECTED_RUNS = {
    "fig1_vgg16_cifar10.json": 1,
    "fig2_resnet18_cifar10_resolutions.json": 3,
    "fig3_vgg16_random_positioning.json": 4,
    "fig4_vgg_depths.json": 4,
    "fig5_noskip_dilated.json": 2,
    "fig6_vgg16_pixelwise_probes.json": 1,
    "fig7_resnet18_resnet34.json": 2,
    "fig8_resnet_pc.json": 2,
    "reduced_fig1.json": 1,
}


def _source_tree(relative):
  with open(os.path.join(REPO, relative), encoding="utf-8") as f:
    return ast.parse(f.read())


def _hparams_fields():
  """Every annotated field of the dataclasses in robust_sparse/core/hparams.py."""
  fields = set()
  for node in ast.walk(_source_tree("robust_sparse/core/hparams.py")):
    if isinstance(node, ast.ClassDef):
      for item in node.body:
        if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
          fields.add(item.target.id)
  return fields


def _registered_names(relative, function_names):
  """First string arguments of calls to `function_names` (e.g. `_register("vgg16", ...)`)."""
  names = set()
  for node in ast.walk(_source_tree(relative)):
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      func = node.func
      called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if called in function_names and isinstance(node.args[0].value, str):
        names.add(node.args[0].value)
  return names


def _write(tmp_path, content, name="grid.json"):
  path = tmp_path / name
  path.write_text(content if isinstance(content, str) else json.dumps(content))
  return str(path)


# ---- expansion -----------------------------------------------------------------------------
def test_expansion_follows_the_seeds_key_order_not_the_files(tmp_path):
  content = {"resolution": [32, 64], "epoch": [1, 2], "model": ["vgg11", "vgg16"],
             "dataset": "Cifar10"}
  points = grid.load_grid(_write(tmp_path, content))
  assert len(points) == 8
  # model, epoch, ..., resolution: the last key of EXPANSION_ORDER varies fastest.
  assert [(p["model"], p["epoch"], p["resolution"]) for p in points] == [
      (m, e, r) for m in ["vgg11", "vgg16"] for e in [1, 2] for r in [32, 64]]
  reordered = dict(reversed(list(content.items())))
  assert grid.load_grid(_write(tmp_path, reordered, "other.json")) == points


def test_count_is_the_product_of_list_lengths(tmp_path):
  content = {"model": ["vgg11", "vgg13", "vgg16"], "dataset": ["Cifar10", "MNIST"],
             "optimizer": ["lrs60", "adam"], "delta": [0.9, 0.99], "downsampling": [None, 1]}
  assert len(grid.load_grid(_write(tmp_path, content))) == 3 * 2 * 2 * 2 * 2


def test_missing_keys_take_the_seeds_defaults(tmp_path):
  (point,) = grid.load_grid(_write(tmp_path, {}))
  assert point == grid.SEED_DEFAULTS
  overrides = grid.to_overrides(point)
  assert overrides["model"] == "resnet18_imagenet"
  assert overrides["dataset"] == "cifar10" and overrides["resolution"] == 32
  assert overrides["epochs"] == 30.0 and overrides["batch_size"] == 128
  assert overrides["optimizer"] == "adam" and overrides["learning_rate"] == 0.001
  assert overrides["delta"] == 0.99 and overrides["saturation_downsampling"] is None


def test_scalars_are_single_choices_and_comments_are_ignored(tmp_path):
  content = {"_comment": ["anything", {"nested": 1}], "_note": 3, "model": "vgg16",
             "epoch": 2, "downsampling": None, "data_parallel": False}
  (point,) = grid.load_grid(_write(tmp_path, content))
  assert point["model"] == "vgg16" and point["epoch"] == 2 and point["downsampling"] is None
  assert "_comment" not in point


def test_metrics_are_shared_not_expanded(tmp_path):
  points = grid.load_grid(_write(tmp_path, {"metrics": ["Accuracy"], "epoch": [1, 2]}))
  assert len(points) == 2 and all(p["metrics"] == ("Accuracy",) for p in points)


# ---- mapping -------------------------------------------------------------------------------
def test_lrs60_maps_to_sgd_with_a_step_schedule():
  overrides = grid.to_overrides({"optimizer": "lrs60"})
  assert {k: overrides[k] for k in LRS60} == LRS60


def test_other_optimizer_presets():
  lrs180 = grid.to_overrides({"optimizer": "lrs180"})
  assert lrs180["lr_step_epochs"] == 50.0 and lrs180["learning_rate"] == 0.1
  sgd = grid.to_overrides({"optimizer": "sgd"})
  assert (sgd["optimizer"], sgd["learning_rate"], sgd["momentum"], sgd["weight_decay"],
          sgd["lr_schedule"]) == ("sgd", 0.01, 0.9, 5e-4, "constant")
  adamw = grid.to_overrides({"optimizer": "adamw"})
  assert (adamw["optimizer"], adamw["learning_rate"], adamw["weight_decay"]) == (
      "adamw", 0.001, 0.01)


def test_a_paper_point_maps_to_these_overrides():
  point = dict(model="vgg16", epoch=30, batch_size=64, dataset="Cifar10", resolution=32,
               optimizer="lrs60", delta=0.99, downsampling=1)
  assert grid.to_overrides(point) == dict(
      model="vgg16", dataset="cifar10", normalize="cifar", augment="crop,flip",
      resolution=32, epochs=30.0, batch_size=64, delta=0.99, saturation_downsampling=1,
      experiment="train", attack="none", adv_train=False, trials=1, valid_size=0,
      label_smoothing=0.0, measure=("saturation",), top5=True, **LRS60)


@pytest.mark.parametrize("seed_name,toolkit_name", [
    ("resnet18", "resnet18_imagenet"), ("resnet18noskip", "resnet18_imagenet_noskip"),
    ("ResNet18_PC", "resnet18_pc"), ("ResNet34_PC", "resnet34_pc"), ("vgg19_d3", "vgg19_d3"),
    ("resnet18_pc", "resnet18_pc")])
def test_model_names(seed_name, toolkit_name):
  assert grid.to_overrides({"model": seed_name})["model"] == toolkit_name


def test_dataset_names():
  rp = grid.to_overrides({"dataset": "Cifar10SmallRandomPositioning", "resolution": 160})
  assert (rp["dataset"], rp["augment"], rp["resolution"]) == (
      "cifar10_random_positioning", "flip", 160)
  assert grid.to_overrides({"dataset": "MNIST"})["dataset"] == "digits_rgb"
  assert grid.to_overrides({"dataset": "ImageNet"})["normalize"] == "imagenet"


def test_mapped_names_exist_in_the_toolkit():
  models = (_registered_names("models/vgg.py", {"_register"})
            | _registered_names("models/resnet.py", {"_register"}))
  datasets = _registered_names("data/registry.py", {"register"})
  assert set(grid.MODELS.values()) <= models
  assert {entry[0] for entry in grid.DATASETS.values()} <= datasets
  fields = _hparams_fields() | NEW_FIELDS
  for preset in grid.OPTIMIZERS:
    assert set(grid.to_overrides({"optimizer": preset})) <= fields, preset


# ---- the shipped configs -------------------------------------------------------------------
def test_every_config_loads_and_maps():
  paths = sorted(glob.glob(os.path.join(CONFIGS, "*.json")))
  assert {os.path.basename(p) for p in paths} == set(EXPECTED_RUNS)
  for path in paths:
    runs = grid.grid_runs(path, "RES", "/tmp/out")
    assert len(runs) == EXPECTED_RUNS[os.path.basename(path)], path
    for overrides, base in runs:
      assert base == os.path.join("/tmp/out", "RES")
      assert {k: overrides[k] for k in LRS60} == LRS60
      assert (overrides["batch_size"], overrides["delta"],
              overrides["saturation_downsampling"]) == (64, 0.99, 1)
      assert overrides["epochs"] == (2.0 if "reduced" in path else 30.0)


def test_figure_grids():
  def runs(name):
    return [(o["model"], o["dataset"], o["resolution"])
            for o, _ in grid.grid_runs(os.path.join(CONFIGS, name), "RES", "out")]
  assert runs("fig1_vgg16_cifar10.json") == [("vgg16", "cifar10", 32)]
  assert runs("fig2_resnet18_cifar10_resolutions.json") == [
      ("resnet18_imagenet", "cifar10", r) for r in (32, 224, 1024)]
  assert runs("fig3_vgg16_random_positioning.json") == [
      ("vgg16", d, r) for d in ("cifar10", "cifar10_random_positioning") for r in (32, 160)]
  assert [m for m, _, _ in runs("fig4_vgg_depths.json")] == ["vgg11", "vgg13", "vgg16", "vgg19"]
  assert [m for m, _, _ in runs("fig5_noskip_dilated.json")] == [
      "resnet18_imagenet_noskip", "vgg19_d3"]
  assert [m for m, _, _ in runs("fig7_resnet18_resnet34.json")] == [
      "resnet18_imagenet", "resnet34_imagenet"]
  assert [m for m, _, _ in runs("fig8_resnet_pc.json")] == ["resnet18_pc", "resnet34_pc"]


# ---- run IDs -------------------------------------------------------------------------------
def test_run_id_namespaces_the_base_folder(tmp_path):
  path = _write(tmp_path, {"model": ["vgg11", "vgg16"], "logs_dir": "seed_logs"})
  assert [b for _, b in grid.grid_runs(path, "A", "out")] == [os.path.join("out", "A")] * 2
  assert [b for _, b in grid.grid_runs(path, "B", None)] == [os.path.join("seed_logs", "B")] * 2


@pytest.mark.parametrize("run_id", ["", "a/b", "..", ".hidden", "-x", "a b", 3])
def test_bad_run_ids(tmp_path, run_id):
  with pytest.raises(ValueError, match="run_id"):
    grid.grid_runs(_write(tmp_path, {}), run_id, "out")


# ---- bad input -----------------------------------------------------------------------------
BAD_FILES = [
    ('{"model": ["vgg16"],}', None, "not valid JSON"),
    ('["vgg16"]', None, "must be a JSON object"),
    ('"vgg16"', None, "must be a JSON object"),
    ('{"model": "vgg16", "model": "vgg11"}', None, "appears twice"),
    ({"modle": ["vgg16"]}, "modle", "unknown key"),
    ({"model": []}, "model", "empty list"),
    ({"metrics": []}, "metrics", "empty list"),
    ({"epoch": "30"}, "epoch", "expected an integer"),
    ({"epoch": [30.5]}, "epoch", "expected an integer"),
    ({"batch_size": True}, "batch_size", "expected an integer"),
    ({"batch_size": 0}, "batch_size", ">= 1"),
    ({"resolution": [[32, 64]]}, "resolution", "a list"),
    ({"model": 16}, "model", "expected a non-empty string"),
    ({"model": {"name": "vgg16"}}, "model", "got an object"),
    ({"model": ["vgg16", ["vgg11"]]}, "model", "inside the list"),
    ({"delta": "0.99"}, "delta", "expected a number"),
    ({"delta": [0.0]}, "delta", "(0, 1]"),
    ({"delta": 1.5}, "delta", "(0, 1]"),
    ({"data_parallel": "false"}, "data_parallel", "expected true or false"),
    ({"downsampling": 0}, "downsampling", ">= 1"),
    ({"metrics": "Accuracy"}, "metrics", "list of metric names"),
    ({"resolution": [32, 32]}, "resolution", "listed twice"),
]


@pytest.mark.parametrize("content,key,message", BAD_FILES)
def test_bad_grids_raise_one_line_errors_naming_file_and_key(tmp_path, content, key, message):
  path = _write(tmp_path, content)
  with pytest.raises(ValueError) as error:
    grid.load_grid(path)
  text = str(error.value)
  assert "\n" not in text and path in text and message in text
  if key is not None:
    assert repr(key) in text


def test_unreadable_file_names_the_file(tmp_path):
  missing = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="cannot read") as error:
    grid.load_grid(missing)
  assert missing in str(error.value) and "\n" not in str(error.value)
  binary = tmp_path / "binary.json"
  binary.write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ValueError, match="cannot read|not valid JSON"):
    grid.load_grid(str(binary))


UNSUPPORTED = [
    ({"model": "efficentnet_b0"}, "model"),
    ({"dataset": "iNaturalist"}, "dataset"),
    ({"dataset": "ResizedImageNet"}, "dataset"),
    ({"dataset": "MNISTSmallRandomPositioning"}, "dataset"),
    ({"optimizer": "radam"}, "optimizer"),
    ({"optimizer": "noopt"}, "optimizer"),
    ({"metrics": ["Accuracy", "MCC"]}, "metrics"),
    ({"device": "cuda:0"}, "device"),
    ({"data_parallel": True}, "data_parallel"),
    ({"cache_dir": "tmp"}, "cache_dir"),
    ({"conv_method": "median"}, "conv_method"),
]


@pytest.mark.parametrize("content,key", UNSUPPORTED)
def test_what_the_toolkit_cannot_run_is_refused(tmp_path, content, key):
  path = _write(tmp_path, content)
  grid.load_grid(path)  # Well-formed...
  with pytest.raises(ValueError) as error:
    grid.grid_runs(path, "RES", "out")  # ...but not runnable as the seed runs it.
  text = str(error.value)
  assert "\n" not in text and path in text and repr(key) in text


def test_to_overrides_refuses_unknown_keys_and_bad_values():
  with pytest.raises(ValueError, match="'modle'"):
    grid.to_overrides({"modle": "vgg16"})
  with pytest.raises(ValueError, match="'delta'"):
    grid.to_overrides({"delta": 2.0})


# ---- the toolkit's own names and flags -------------------------------------------------------
def test_registered_models_data_sets_optimizers_and_flags(tmp_path):
  content = {"model": "dense-300-100", "dataset": "sklearn_digits", "optimizer": "ssamf-sgd",
             "train_iters": 50, "experiment": "reinit_orig", "prune_iters": 1,
             "attack": "fgsm", "adv_train": [False, True], "sparsity": [0.5, 0.9],
             "measure": [["activation_sparsity"], []]}
  points = grid.load_grid(_write(tmp_path, content))
  assert len(points) == 2 * 2 * 2
  overrides = grid.to_overrides(points[-1])
  assert {k: overrides[k] for k in content if k != "epoch"} == dict(
      content, adv_train=True, sparsity=0.9, measure=())
  # The seed's 32 px and epochs are its data sets' and its length; not forced on these.
  assert overrides["resolution"] is None and overrides["epochs"] is None
  assert "normalize" not in overrides and "augment" not in overrides
  # Flags override the seed's settings; the rest still apply.
  assert overrides["valid_size"] == 0 and overrides["trials"] == 1
  assert [p["sparsity"] for p in points[:2]] == [0.5, 0.5]  # The last key varies fastest.
  assert [p["measure"] for p in points[:2]] == [("activation_sparsity",), ()]


def test_a_toolkit_grid_names_its_run_folders_as_the_command_line_does(tmp_path):
  from robust_sparse.core.hparams import Hparams  # pylint: disable=import-outside-toplevel
  path = _write(tmp_path, {"model": "dense-300-100", "dataset": "sklearn_digits",
                           "train_iters": 50, "learning_rate": [0.1, 0.01]})
  runs = grid.grid_runs(path, "RES", "out")
  folders = [Hparams(**overrides).run_dir(base) for overrides, base in runs]
  assert len(set(folders)) == 2
  assert all(f.startswith(os.path.join("out", "RES", "sklearn_digits", "dense-300-100"))
             for f in folders)


@pytest.mark.parametrize("content,key,message", [
    ({"lerning_rate": 0.1}, "lerning_rate", "nor a run_experiments flag"),
    ({"learning_rate": "fast"}, "learning_rate", "expected a number"),
    ({"attack": "cw"}, "attack", "is not one of"),
    ({"prune_iters": -1}, "prune_iters", ">= 0"),
    ({"adv_train": "yes"}, "adv_train", "true or false"),
    ({"train_iters": 10, "epoch": 2}, None, "give one"),
    ({"model": "dense-3OO-100"}, "model", "dense-300-100"),
    ({"dataset": "mnist"}, "dataset", "sklearn_digits"),
    ({"optimizer": "lion"}, "optimizer", "ssamf-"),
])
def test_unknown_toolkit_names_and_flags_are_one_line_errors(tmp_path, content, key, message):
  path = _write(tmp_path, content)
  with pytest.raises(ValueError) as error:
    grid.grid_runs(path, "RES", "out")
  text = str(error.value)
  assert "\n" not in text and path in text and message in text
  if key is not None:
    assert repr(key) in text
