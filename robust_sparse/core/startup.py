"""Start-up of the command-line entry points: quiet, and without imports a run never uses.

`import_tensorflow()` imports TensorFlow and Keras at once (`run_experiments`);
`import_tensorflow_when_needed()` makes the first `import tensorflow` of the
process, wherever it happens, import them the same way (`run_analysis`, which
needs TensorFlow only for some checks). Either way:

- Quiet on a machine without an NVIDIA driver. TensorFlow 2.21 writes its
  first log lines through absl before absl logging is initialised, so
  `TF_CPP_MIN_LOG_LEVEL` does not reach them: "WARNING: All log messages
  before absl::InitializeLog() ...", "oneDNN custom operations are on ..." and
  "Could not find cuda drivers ..." (twice, once per library that carries
  absl), then "failed call to cuInit" when the devices are listed. Setting
  `TF_ENABLE_ONEDNN_OPTS=1` or `CUDA_VISIBLE_DEVICES` silences none of them
  (checked), and `TF_ENABLE_ONEDNN_OPTS=0` would change the numbers. So file
  descriptor 2 goes to a temporary file while TensorFlow is imported and the
  devices are listed; afterwards exactly those lines are dropped and
  everything else is written to stderr as it came (Python warnings, and a
  failed import's own messages before its traceback). The cuInit line is
  kept where `/proc/driver/nvidia` exists (there it means something).
  `ROBUST_SPARSE_VERBOSE_STARTUP=1` keeps every line, for debugging.
- The same kernels on every x86 CPU. TensorFlow turns its oneDNN kernels on
  by default only on some CPUs (those with AVX-512 and the like); elsewhere
  (e.g. an AMD EPYC without AVX-512) its own kernels run: 1.6x slower for a
  small conv net's training step (measured), and without dilated conv
  gradients. `TF_ENABLE_ONEDNN_OPTS` is set to 1 unless the user has set it.
- Faster. Keras imports, for features a run never touches, modules that cost
  a second of start-up: `scipy.stats` (through scikit-learn's
  `utils.fixes`, which uses it only inside a function), `IPython` (the
  `.keras` file editor) and `matplotlib.pyplot` (the image-gallery plots).
  Those are loaded lazily (`importlib.util.LazyLoader`): the module object
  exists at once and runs on its first attribute access, so code that uses
  it sees no difference. (pandas and scikit-learn's base classes are used
  while Keras imports, so they stay eager.) TensorFlow's own API tree imports
  more that no run uses: `tf.compat` (the v1 API), `tf.feature_column` (which
  imports the legacy tf.keras) and two test helpers of the distribution
  strategies; they are lazy too, with Keras' scikit-learn wrappers (0.3 s).
  No garbage is collected during the import (`collection_paused`): its full
  collections freed nothing and took 0.5 s. Together: 2.85 -> 1.8 s for
  TensorFlow and Keras on a 2-core CPU (best of 5).

`exit_now(status)` ends a finished command without the interpreter's
teardown, which after importing TensorFlow spends a second or two in garbage
collection of module state.
"""

import contextlib
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile

VERBOSE_ENV = "ROBUST_SPARSE_VERBOSE_STARTUP"

# Imported by TensorFlow and Keras at start-up, used by no run (see the module
# docstring): Keras' scipy.stats, IPython and pyplot; TensorFlow's v1 API
# (`tf.compat`), its feature columns (which import the legacy tf.keras) and the
# distribution strategies' test helpers; Keras' scikit-learn wrappers.
LAZY_MODULES = ("scipy.stats", "IPython", "matplotlib.pyplot",
                "tensorflow._api.v2.compat",
                "tensorflow._api.v2.feature_column",
                "tensorflow._api.v2.__internal__.feature_column",
                "tensorflow._api.v2.__internal__.distribute.combinations",
                "tensorflow._api.v2.__internal__.distribute.multi_process_runner",
                "keras.wrappers")

_NOISE = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*",
    r"I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, "
    r"GPU will not be used\.",
)
# Only noise where no NVIDIA driver is installed.
_NO_DRIVER_NOISE = (r"E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit: .*",)


def verbose() -> bool:
  """Whether `ROBUST_SPARSE_VERBOSE_STARTUP` asks for TensorFlow's start-up lines."""
  return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def noise_pattern(has_nvidia_driver: bool):
  """The compiled pattern of the start-up lines `import_tensorflow` drops."""
  lines = _NOISE + (() if has_nvidia_driver else _NO_DRIVER_NOISE)
  return re.compile("|".join(f"(?:{line})" for line in lines))


def has_nvidia_driver() -> bool:
  return os.path.exists("/proc/driver/nvidia")


@contextlib.contextmanager
def filtered_stderr(pattern):
  """Sends file descriptor 2 to a temporary file; on exit writes back what `pattern`
  (matched against whole lines) does not drop, also when the body raises.

  A file, not a pipe: nothing has to read while the body writes.
  """
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No stderr to filter.
    yield
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors="replace").splitlines(True)
              if not pattern.fullmatch(line.rstrip("\n"))]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


class _LazyFinder(importlib.abc.MetaPathFinder):
  """Finds the modules `names` as the other finders do, with a lazy loader."""

  def __init__(self, names):
    self.names = frozenset(names)

  def find_spec(self, fullname, path=None, target=None):
    if fullname not in self.names:
      return None
    for finder in sys.meta_path:
      # Another lazy finder (nested `lazy_modules`) would ask this one again.
      if isinstance(finder, _LazyFinder) or not hasattr(finder, "find_spec"):
        continue
      spec = finder.find_spec(fullname, path, target)
      if spec is not None:
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
          spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec
    return None


@contextlib.contextmanager
def lazy_modules(names=LAZY_MODULES):
  """Imports of `names` inside the block create modules that run on first use."""
  finder = _LazyFinder(names)
  sys.meta_path.insert(0, finder)
  try:
    yield
  finally:
    sys.meta_path.remove(finder)


def _environment_defaults():
  """TensorFlow's settings, read when it starts, unless the user has set them: no INFO
  or WARNING lines from C++, and oneDNN's kernels on every x86 CPU (module docstring)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


def import_tensorflow():
  """Imports TensorFlow and Keras quietly and lazily (see the module docstring).

  Call it before anything imports TensorFlow; later calls do nothing.

  Returns:
    The `tensorflow` module.
  """
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  # This import is the quiet one: a pending `import_tensorflow_when_needed` hook (installed
  # by importing the `robust_sparse` package) must not wrap it a second time.
  sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _OnFirstImport)]
  _environment_defaults()
  with _quiet_and_lazy():
    # Heavy: TensorFlow, imported by this function only, never by importing this module.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    import keras  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    # Where TensorFlow first initialises CUDA (and says cuInit failed); the
    # runtime still starts later, so --devices can choose the GPUs.
    tf.config.list_physical_devices("GPU")
  return tf


@contextlib.contextmanager
def _quiet_and_lazy():
  quiet = (contextlib.nullcontext() if verbose()
           else filtered_stderr(noise_pattern(has_nvidia_driver())))
  with quiet, lazy_modules(), collection_paused():
    yield


@contextlib.contextmanager
def collection_paused():
  """No garbage collection inside the block; afterwards, what it created is frozen
  (`gc.freeze`): never collected, never traversed again.

  Importing TensorFlow and Keras creates millions of long-lived objects and no
  garbage (each collection during the import freed nothing): its five full
  collections took 0.5 s of the import, and every later full collection would
  traverse those objects again.
  """
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.freeze()
      gc.enable()


class _OnFirstImport(importlib.abc.MetaPathFinder):
  """Runs TensorFlow's own import through `_quiet_and_lazy` the first time it is imported."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname != "tensorflow":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(fullname)
    if spec is not None and hasattr(spec.loader, "exec_module"):
      spec.loader = _QuietLoader(spec.loader)
    return spec


class _QuietLoader(importlib.abc.Loader):
  """Executes `loader`'s module inside `_quiet_and_lazy`."""

  def __init__(self, loader):
    self.loader = loader

  def create_module(self, spec):
    return self.loader.create_module(spec)

  def exec_module(self, module):
    with _quiet_and_lazy():
      self.loader.exec_module(module)
      module.config.list_physical_devices("GPU")


def import_tensorflow_when_needed():
  """The first `import tensorflow` of this process (if any) will be `import_tensorflow`'s."""
  if "tensorflow" not in sys.modules and not any(
      isinstance(finder, _OnFirstImport) for finder in sys.meta_path):
    _environment_defaults()
    sys.meta_path.insert(0, _OnFirstImport())


def exit_now(status: int):
  """Flushes the output streams and the absl log and exits with `status` at once.

  For a command that has finished its work (files written and closed): the
  interpreter's teardown after TensorFlow takes seconds and does nothing a
  finished run needs.
  """
  try:
    # Lazily: importing the `robust_sparse` namespace imports no absl.
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.flush()
  except Exception:  # pylint: disable=broad-except
    pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(status)  # pylint: disable=protected-access
