"""`pip install <repo>`: the toolkit under the one namespace `robust_sparse`, from anywhere.

The installed copy is tested where a researcher uses it: a fresh virtualenv
(over this environment's packages, so nothing is downloaded) and a notebook
folder with its own `models.py` and `data/` package, which must neither shadow
the toolkit nor be shadowed by it. The source checkout keeps its layout and
`python -m run_experiments`; no file imports a toolkit package by its
top-level name, so no module is loaded twice under two names.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest

from tests.conftest import REPO

PACKAGES = ("analysis", "attacks", "custom_ops", "data", "experiments", "models")
# What the repository holds but a wheel does not: outputs, caches, builds.
NOT_SHIPPED = shutil.ignore_patterns(".git", "output", "runs", "build", "*.egg-info",
                                     "__pycache__", "_build", ".pytest_cache")

USER_SCRIPT = '''
import os
import sys

import numpy as np

import data  # namespace: keep (this folder's own modules, not the toolkit's)
import models  # namespace: keep
assert models.OWNER == "user" and data.OWNER == "user", (models.__file__, data.__file__)

import keras
import tensorflow as tf

import robust_sparse
from robust_sparse.nn import pruning
from robust_sparse.attacks import AttackConfig, fgsm, make_attack
from robust_sparse.data import load_dataset
from robust_sparse.training.keras_model import RobustModel
from robust_sparse.nn.layers import masked_layers
from robust_sparse.models import build_model
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.measure.saturation import SaturationCallback

assert robust_sparse.__file__.startswith(sys.prefix), robust_sparse.__file__
assert list(robust_sparse.__path__) == [os.path.dirname(robust_sparse.__file__)]

digits = load_dataset("sklearn_digits")
train = tf.data.Dataset.from_tensor_slices((digits.x_train, digits.y_train)).batch(64)
network = build_model("dense-300-100", digits.input_shape, digits.num_classes)

# Train: FGSM adversarial training in Keras' fit.
robust = RobustModel(network, attack=make_attack(AttackConfig("fgsm", eps=0.1)), seed=0)
robust.compile(optimizer=make_optimizer("adam", 1e-3))
history = robust.fit(train, epochs=1, steps_per_epoch=5, verbose=0)
assert np.isfinite(history.history["loss"][-1])

# Prune: the runner's exact counts, 20% of the hidden layers, 10% of the output.
layers = masked_layers(network)
kernels = {layer.name: np.asarray(layer.kernel) for layer in layers}
masks = {layer.name: np.asarray(layer.mask) for layer in layers}
rates = pruning.layer_rates([layer.name for layer in layers], 0.2, 0.1)
pruned = pruning.prune(kernels, masks, rates)
for layer in layers:
  layer.mask.assign(pruned[layer.name])
for layer, rate in zip(layers, rates.values()):
  mask = np.asarray(layer.mask)
  assert int(np.sum(mask == 0)) == round(rate * mask.size)

# Attack: FGSM stays within its budget.
x = digits.x_test[:32]
x_adv = np.asarray(fgsm(network, x, eps=0.1))
assert np.max(np.abs(x_adv - x)) <= 0.1 + 1e-6

# Measure: per-layer saturation in fit.
callback = SaturationCallback()
measured = callback.wrap(network)
measured.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
logs = measured.fit(train, epochs=1, steps_per_epoch=3, verbose=0, callbacks=[callback])
assert any("saturation" in key for key in logs.history), sorted(logs.history)

generic = {"attacks", "data", "models", "experiments", "analysis", "custom_ops",
           "run_experiments", "run_analysis"}
assert sys.modules["models"] is models and sys.modules["data"] is data
loaded = sorted(name for name in sys.modules if name.split(".")[0] in generic
                and name not in ("models", "data"))
assert not loaded, loaded
print("user script: ok")
'''


def _run(argv, cwd, env=None, timeout=300):
  result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
  return result


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
  """A fresh virtualenv over this environment's packages, the repository installed in it."""
  root = tmp_path_factory.mktemp("install")
  source = root / "source"  # A copy: pip builds in the source folder (build/, *.egg-info).
  shutil.copytree(REPO, source, ignore=NOT_SHIPPED)
  venv = root / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
       root)
  python = str(venv / "bin" / "python")
  # This environment's pip and setuptools install into the venv: no index, so the
  # pinned dependencies must be the ones installed here (as requirements.txt's are).
  _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-index",
        "--no-build-isolation", str(source)], root)
  return venv


def test_a_notebook_folder_with_its_own_models_and_data_uses_the_installed_toolkit(
    venv, tmp_path):
  (tmp_path / "models.py").write_text('OWNER = "user"\n')
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "__init__.py").write_text('OWNER = "user"\n')
  (tmp_path / "notebook.py").write_text(USER_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  result = _run([str(venv / "bin" / "python"), "notebook.py"], tmp_path, env)
  assert result.stdout.strip().splitlines()[-1] == "user script: ok"


def test_the_console_scripts_run_and_analyse_a_study(venv, tmp_path):
  (tmp_path / "models.py").write_text("raise ImportError('the toolkit imported models.py')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  run = _run([str(venv / "bin" / "robust-sparse-run"), "--dataset=sklearn_digits",
              "--experiment=train", "--trials=1", "--train_iters=10", "--eval_every=10",
              "--noprogress", "--base_dir=output",
              # About the scripts, not the measurements: no attack, no sharpness.
              "--attack=none", "--sharpness_examples=0"], tmp_path, env)
  run_dir = run.stdout.strip().splitlines()[-1]
  assert (tmp_path / run_dir / "hparams.json").is_file(), run.stdout[-2000:]
  _run([str(venv / "bin" / "robust-sparse-analyze"), "--base_dir=output", "--nomasking_checks"],
       tmp_path, env)
  assert (tmp_path / "output" / "analysis" / "report.md").is_file()


def test_an_editable_install_imports_the_checkout_under_the_namespace_only(tmp_path):
  source = tmp_path / "source"
  shutil.copytree(REPO, source, ignore=NOT_SHIPPED)
  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
       tmp_path)
  _run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
        "--no-index", "--no-build-isolation", "-e", str(source)], tmp_path)
  notebook = tmp_path / "notebook"
  (notebook / "data").mkdir(parents=True)
  (notebook / "data" / "__init__.py").write_text('OWNER = "user"\n')
  code = textwrap.dedent("""
      import importlib.util
      import data  # namespace: keep
      assert data.OWNER == "user"
      for name in ("attacks", "models", "experiments", "analysis", "custom_ops"):
        assert importlib.util.find_spec(name) is None, name
        print(importlib.util.find_spec("robust_sparse." + name).origin)
  """)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = _run([str(venv / "bin" / "python"), "-c", code], notebook, env)
  assert result.stdout.split() == [str(source / name / "__init__.py") for name in
                                   ("attacks", "models", "experiments", "analysis", "custom_ops")]
  assert (venv / "bin" / "robust-sparse-run").exists()


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _pins(path):
  lines = (line.split("#")[0].strip() for line in open(os.path.join(REPO, path)))
  return [line for line in lines if line]


def test_the_pins_are_requirements_txt():
  project = _pyproject()["project"]
  extras = project["optional-dependencies"]
  assert project["dependencies"] + extras["test"] == _pins("requirements.txt")
  assert extras["ray"] == _pins("requirements-ray.txt")


def test_every_package_of_the_checkout_is_in_the_wheel():
  setuptools = _pyproject()["tool"]["setuptools"]
  found = set()
  for folder, _, files in os.walk(os.path.join(REPO, "robust_sparse")):  # Its own: core, nn ...
    if "__init__.py" in files:
      found.add(os.path.relpath(folder, REPO).replace(os.sep, "."))
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(REPO, package)):
      if "__init__.py" in files:
        relative = os.path.relpath(folder, REPO).replace(os.sep, ".")
        found.add(f"robust_sparse.{relative}")
  assert set(setuptools["packages"]) == found
  assert setuptools["package-dir"] == {f"robust_sparse.{p}": p for p in PACKAGES}


def test_nothing_imports_a_toolkit_package_by_its_top_level_name():
  """`tools/namespace_imports.py --check` finds nothing left to rewrite."""
  result = subprocess.run([sys.executable, os.path.join("tools", "namespace_imports.py"),
                           "--check"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout[-3000:]


def test_the_checkout_keeps_its_layout_and_loads_each_module_once():
  code = textwrap.dedent("""
      import sys
      import robust_sparse
      from robust_sparse import attacks, data, models, experiments, analysis, custom_ops
      import run_experiments  # namespace: keep (the shim: the same module)
      from robust_sparse import run_experiments as inside
      assert run_experiments is inside
      print(data.__file__)
      print(sorted(m for m in sys.modules if m.split(".")[0] in {
          "attacks", "data", "models", "experiments", "analysis", "custom_ops"}))
  """)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = _run([sys.executable, "-c", code], REPO, env)
  folder, loaded = result.stdout.strip().splitlines()[-2:]
  assert folder == os.path.join(REPO, "data", "__init__.py")
  assert loaded == "[]"
  shims = [open(os.path.join(REPO, f"{name}.py")).read()
           for name in ("run_experiments", "run_analysis")]
  assert all(re.search(r"runpy\.run_module\(\"robust_sparse\.run_", shim) for shim in shims)
