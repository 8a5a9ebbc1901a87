"""Start-up of the entry points: TensorFlow's pre-logging noise filtered, lazy modules, exit."""

import ast
import os
import subprocess
import sys
import types

import pytest

from robust_sparse.core import startup
from tests.conftest import NOISE_RE, REPO, user_env

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796003206.541356    6965 port.cc:153] oneDNN custom operations are on. You "
    "may see slightly different numerical results due to floating-point round-off errors from "
    "different computation orders. To turn them off, set the environment variable "
    "`TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796003206.541678    6965 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.",
]
CUINIT = ("E0000 00:00:1796003212.592818    6965 cuda_platform.cc:52] failed call to cuInit: "
          "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")


def test_filtered_stderr_drops_exactly_the_noise(capfd):
  kept = ["a Python warning: keep me", "E0000 00:00:1.0 1 other.cc:1] a real error",
          "I0000 port.cc:153] oneDNN custom operations are on (no timestamp: not the line)"]
  with startup.filtered_stderr(startup.noise_pattern(has_nvidia_driver=False)):
    for line in NOISE[:1] + kept[:1] + NOISE[1:] + [CUINIT] + kept[1:]:
      os.write(2, (line + "\n").encode())
  assert capfd.readouterr().err.splitlines() == kept


def test_the_cuinit_line_stays_where_a_driver_is_installed(capfd):
  with startup.filtered_stderr(startup.noise_pattern(has_nvidia_driver=True)):
    os.write(2, "\n".join(NOISE + [CUINIT, ""]).encode())
  assert capfd.readouterr().err.splitlines() == [CUINIT]


def test_filtered_stderr_writes_back_before_an_exception_escapes(capfd):
  with pytest.raises(ImportError, match="broken"):
    with startup.filtered_stderr(startup.noise_pattern(has_nvidia_driver=False)):
      os.write(2, (NOISE[0] + "\nwhy it broke\n").encode())
      raise ImportError("broken")
  assert capfd.readouterr().err == "why it broke\n"
  os.write(2, b"fd 2 is back\n")
  assert capfd.readouterr().err == "fd 2 is back\n"


def test_verbose_startup_variable(monkeypatch):
  for value, expected in (("", False), ("0", False), ("1", True), ("yes", True)):
    monkeypatch.setenv(startup.VERBOSE_ENV, value)
    assert startup.verbose() is expected
  monkeypatch.delenv(startup.VERBOSE_ENV)
  assert not startup.verbose()


def test_lazy_modules_run_on_first_use(tmp_path, monkeypatch):
  (tmp_path / "lazy_probe.py").write_text("import os\nos.environ['LAZY_PROBE_RAN'] = '1'\n"
                                          "VALUE = 42\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delenv("LAZY_PROBE_RAN", raising=False)
  monkeypatch.delitem(sys.modules, "lazy_probe", raising=False)
  with startup.lazy_modules(("lazy_probe",)):
    import lazy_probe  # pylint: disable=import-outside-toplevel
  assert "LAZY_PROBE_RAN" not in os.environ
  assert lazy_probe.VALUE == 42
  assert os.environ["LAZY_PROBE_RAN"] == "1"
  assert type(sys.modules["lazy_probe"]) is types.ModuleType
  # Outside the block imports are eager again.
  monkeypatch.delitem(sys.modules, "lazy_probe")
  monkeypatch.delenv("LAZY_PROBE_RAN")
  import lazy_probe  # noqa: F811  pylint: disable=import-outside-toplevel,reimported
  assert os.environ["LAZY_PROBE_RAN"] == "1"


def test_the_escape_hatch_keeps_tensorflows_lines(tmp_path):
  """ROBUST_SPARSE_VERBOSE_STARTUP=1 keeps the lines the filter drops (where this build
  prints any). That the entry points start quietly without it is checked where they
  run as a user runs them: run_experiments and run_analysis in the README's quick start
  (tests/test_readme.py), run_analysis making gradient-masking checks, which imports
  TensorFlow (tests/analysis/test_masking_analysis.py)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  verbose = subprocess.run(
      [sys.executable, "-m", "run_experiments", "--dataset=sklearn_digits",
       "--experiment=train", "--trials=1", "--train_iters=2", "--eval_every=2",
       "--attack=none", "--sharpness_examples=0", f"--base_dir={tmp_path / 'verbose'}",
       "--noprogress"], cwd=REPO, env=dict(user_env(), **{startup.VERBOSE_ENV: "1"}),
      capture_output=True, text=True, timeout=600)
  assert verbose.returncode == 0, verbose.stderr[-3000:]
  if tf.sysconfig.get_build_info().get("is_cuda_build") and not startup.has_nvidia_driver():
    assert "cudart_stub.cc" in verbose.stderr, verbose.stderr[-3000:]


def test_import_tensorflow_pauses_collection_and_keeps_lazy_apis_working():
  """After `import_tensorflow`: collection is on again, the import's objects are frozen,
  and the lazily imported APIs (tf.compat, tf.feature_column, Keras' wrappers) still work
  on first use."""
  code = """
import gc, sys
from robust_sparse.core import startup
tf = startup.import_tensorflow()
import keras
print(gc.isenabled(), gc.get_freeze_count() > 100000)
print(type(sys.modules["tensorflow._api.v2.compat"]).__name__)
print(tf.compat.v1.placeholder.__name__, tf.feature_column.numeric_column("a").key)
print(keras.wrappers.SKLearnClassifier.__name__)
print(type(sys.modules["tensorflow._api.v2.compat"]).__name__)
"""
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split("\n")[:5] == ["True True", "_LazyModule", "placeholder a",
                                           "SKLearnClassifier", "module"], result.stdout


# ---- quiet as a library ------------------------------------------------------------------
LIBRARY_PACKAGES = ("data", "models", "attacks", "experiments")


def test_every_package_imports_the_quiet_start_up_first():
  """Each package's first import is `robust_sparse`, whose import installs the filter."""
  for package in LIBRARY_PACKAGES:
    tree = ast.parse(open(os.path.join(REPO, package, "__init__.py")).read())
    first = next(node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom)))
    assert isinstance(first, ast.Import) and [a.name for a in first.names] == ["robust_sparse"], (
        package, ast.unparse(first))


def test_importing_the_toolkit_as_a_library_is_quiet():
  # What a notebook imports first, each in a fresh interpreter (TensorFlow's first import):
  # a package of the checkout (each starts as this one does, see the test above) and the
  # namespace's API.
  for module in ("data", "robust_sparse.api"):
    result = subprocess.run([sys.executable, "-c", f"import {module}; import tensorflow"],
                            cwd=REPO, env=user_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not NOISE_RE.search(result.stderr), (module, result.stderr[-2000:])


# Ray workers start quietly: tests/experiments/test_ray_launcher.py runs trials on them.
