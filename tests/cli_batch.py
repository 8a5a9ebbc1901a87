"""Runs many `python -m run_experiments ...` command lines in one interpreter.

The bad-input tests check that each wrong command ends with a one-line error
and a non-zero status. Starting a fresh interpreter per case spent most of
their time importing TensorFlow, so this driver parses and runs each case as
`absl.app.run` does (the same flag parsing and validators, the same `main`,
"FATAL Flags parsing error: ..." on a flag error, the flags reset to their
defaults between cases) and reports (status, stderr) per case. A handful of
tests still run the real command in its own process.

  echo '[["--dataset=sklearn_digits", "--trials=0"]]' | python -m tests.cli_batch

Each pytest worker keeps one such process for all its test files (`--serve`):
TensorFlow is imported once per worker, not once per file.
"""

import contextlib
import glob
import io
import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from robust_sparse import run_experiments  # noqa: E402


class _Interrupted(SystemExit):
  pass


@contextlib.contextmanager
def _interrupted_after(evaluations):
  """Every Runner made inside stops its run with status 3 at the end of its
  `evaluations`-th evaluation period, as a killed process stops (its checkpoint
  written, the level unfinished). None: no interruption."""
  if evaluations is None:
    yield
    return
  import keras  # pylint: disable=import-outside-toplevel
  from robust_sparse.experiments.runner import Runner  # pylint: disable=import-outside-toplevel

  class Interrupt(keras.callbacks.Callback):
    """Counts one Runner's evaluation periods; stops it at the `evaluations`-th."""

    def __init__(self, run_dir):
      super().__init__()
      self.run_dir, self.left = run_dir, evaluations

    def on_epoch_end(self, epoch, logs=None):
      self.left -= 1
      if self.left == 0:
        # What the stopped run leaves, on stdout's last line: each checkpoint's iteration
        # and the final weights written (none, when stopped inside its only level).
        left = {"checkpoints": {}, "final_weights": []}
        for path in glob.glob(os.path.join(self.run_dir, "**", "*.npz"), recursive=True):
          name = os.path.relpath(path, self.run_dir)
          if path.endswith("checkpoint.npz"):
            with np.load(path) as arrays:
              left["checkpoints"][name] = int(arrays["engine/iteration"])
          elif path.endswith("weights_final.npz"):
            left["final_weights"].append(name)
        print(json.dumps(left))
        raise _Interrupted(3)

  init = Runner.__init__

  def interrupted_init(self, hparams, dataset, base_dir, *args, callbacks=None, **kwargs):
    interrupt = Interrupt(hparams.run_dir(base_dir))
    init(self, hparams, dataset, base_dir, *args, callbacks=[*(callbacks or []), interrupt],
         **kwargs)

  Runner.__init__ = interrupted_init
  try:
    yield
  finally:
    Runner.__init__ = init


def run_case(argv):
  """(exit status, stderr, stdout) of `run_experiments` with `argv`, as `app.run` would
  give. `argv` may also be {"argv": [...], "interrupt_after": k}: the run stops with
  status 3 after its k-th evaluation, as if killed there (`_interrupted_after`)."""
  interrupt_after = None
  if isinstance(argv, dict):
    argv, interrupt_after = argv["argv"], argv.get("interrupt_after")
  with _interrupted_after(interrupt_after):
    return _run_case(argv)


def _run_case(argv):
  flag_values = flags.FLAGS
  flag_values.unparse_flags()
  stderr, stdout = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    try:
      remaining = flag_values(["run_experiments", *argv])
    except flags.Error as e:
      print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
      print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
      return 1, stderr.getvalue(), stdout.getvalue()
    try:
      status = run_experiments.main(remaining)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else 1
    except Exception:  # pylint: disable=broad-except
      import traceback
      traceback.print_exc()
      status = 1
  return int(status or 0), stderr.getvalue(), stdout.getvalue()


def main():
  """One JSON list of cases on stdin, their results on stdout; with `--serve`, one such
  list per line and one line of results each, until stdin closes (the tests' shared
  process, `tests.conftest.run_cli_batch`)."""
  if sys.argv[1:] == ["--serve"]:
    # The results go to a copy of fd 1; fd 1 itself goes to stderr, so that nothing else
    # written there (a C++ log line, a child process) can break a line of results.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
      results = [run_case(argv) for argv in json.loads(line)]
      out.write(json.dumps(results) + "\n")
      out.flush()
    return
  cases = json.load(sys.stdin)
  results = [run_case(argv) for argv in cases]
  sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
  main()
