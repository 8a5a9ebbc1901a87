"""Builds the compiled J-SquaredReLU op library against the installed TensorFlow.

The library goes into a cache beside this module (`custom_ops/_build/`, ignored
by git). `custom_ops.jsrelu` calls `ensure_built()` on first use, so building by
hand is only needed to see the compiler output or to rebuild on purpose:

  python -m robust_sparse.custom_ops.build            # (re)build now, print the command
  python -m robust_sparse.custom_ops.build --if-stale # build only if missing or out of date

Several processes may start at once (a sweep launching runs in parallel), so a
build holds a file lock and compiles to a temporary file that is renamed into
place with `os.replace`: a reader sees either the old library or the new one,
never a half-written one.
"""

import argparse
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = (SOURCE_DIR / "jsrelu_op.cc",)
BUILD_DIR = SOURCE_DIR / "_build"
LIBRARY_PATH = BUILD_DIR / "jsrelu_ops.so"
_LOCK_PATH = BUILD_DIR / ".build.lock"
# Compiler errors must surface, but a hung compiler must not hang a run forever.
_COMPILE_TIMEOUT_S = 900
# TF 2.21 headers trigger these two warnings on every include; they are noise.
_EXTRA_FLAGS = ("-Wno-deprecated-declarations", "-Wno-interference-size")


class BuildError(RuntimeError):
  """The library could not be built; the message says why and how to fix it."""


def compiler() -> str:
  """Returns the C++ compiler to use ($CXX, else g++).

  Raises:
    BuildError: if no such compiler is on the PATH.
  """
  name = os.environ.get("CXX", "g++")
  path = shutil.which(name)
  if path is None:
    raise BuildError(
        f"C++ compiler {name!r} not found; install g++ (e.g. `apt-get install "
        "g++`) or set $CXX, then run `python -m robust_sparse.custom_ops.build`")
  return path


def compile_command(output: Path) -> List[str]:
  """Returns the compiler command line that builds the library into `output`."""
  import tensorflow as tf  # Imported late: `--help` should not load TF.

  return ([compiler(), "-std=c++17", "-O2", "-shared", "-fPIC", *_EXTRA_FLAGS]
          + list(tf.sysconfig.get_compile_flags())
          + [str(source) for source in SOURCES]
          + ["-o", str(output)]
          + list(tf.sysconfig.get_link_flags()))


def needs_build(library: Path = LIBRARY_PATH) -> bool:
  """True if `library` is missing or older than a source (or this script)."""
  if not library.exists():
    return True
  built_at = library.stat().st_mtime
  inputs = (*SOURCES, Path(__file__).resolve())
  return any(path.stat().st_mtime > built_at for path in inputs)


def build(force: bool = False, verbose: bool = False) -> Path:
  """Builds the library unless it is up to date; safe to call concurrently.

  Args:
    force: rebuild even if the library looks up to date (e.g. after a
      TensorFlow upgrade, which the timestamps cannot see).
    verbose: print the compiler command.

  Returns:
    The path of the library.

  Raises:
    BuildError: if the compiler is missing or the compilation fails.
  """
  BUILD_DIR.mkdir(parents=True, exist_ok=True)
  with open(_LOCK_PATH, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      # Whoever held the lock before us may have just built it.
      if not force and not needs_build():
        return LIBRARY_PATH
      handle, temp_name = tempfile.mkstemp(
          dir=BUILD_DIR, prefix=".jsrelu_ops.", suffix=".so.tmp")
      os.close(handle)
      temp_path = Path(temp_name)
      try:
        command = compile_command(temp_path)
        if verbose:
          print(shlex.join(command), flush=True)
        try:
          result = subprocess.run(command, capture_output=True, text=True,
                                  timeout=_COMPILE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
          raise BuildError(f"compiler timed out after {_COMPILE_TIMEOUT_S} s: "
                           f"{shlex.join(command)}") from None
        if result.returncode != 0:
          raise BuildError(
              f"compiling {', '.join(s.name for s in SOURCES)} failed "
              f"(exit {result.returncode}); command: {shlex.join(command)}\n"
              f"{result.stderr.strip()}")
        os.replace(temp_path, LIBRARY_PATH)
      finally:
        if temp_path.exists():
          temp_path.unlink()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return LIBRARY_PATH


def ensure_built() -> Path:
  """Builds the library if it is missing or stale; returns its path."""
  if needs_build():
    return build()
  return LIBRARY_PATH


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m robust_sparse.custom_ops.build",
      description="Build the J-SquaredReLU TensorFlow op library into "
      f"{LIBRARY_PATH}.")
  parser.add_argument("--if-stale", action="store_true",
                      help="only build if the library is missing or older "
                      "than its sources")
  args = parser.parse_args(argv)
  try:
    path = build(force=not args.if_stale, verbose=True)
  except BuildError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"built {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
