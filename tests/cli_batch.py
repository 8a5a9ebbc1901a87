"""Runs many `python -m run_experiments ...` command lines in one interpreter.

The bad-input tests check that each wrong command ends with a one-line error
and a non-zero status. Starting a fresh interpreter per case spent most of
their time importing TensorFlow, so this driver parses and runs each case as
`absl.app.run` does (the same flag parsing and validators, the same `main`,
"FATAL Flags parsing error: ..." on a flag error, the flags reset to their
defaults between cases) and reports (status, stderr) per case. A handful of
tests still run the real command in its own process.

  echo '[["--dataset=sklearn_digits", "--trials=0"]]' | python -m tests.cli_batch
"""

import contextlib
import io
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

from robust_sparse import run_experiments  # noqa: E402


def run_case(argv):
  """(exit status, stderr) of `run_experiments` with `argv`, as `app.run` would give."""
  flag_values = flags.FLAGS
  flag_values.unparse_flags()
  stderr, stdout = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
    try:
      remaining = flag_values(["run_experiments", *argv])
    except flags.Error as e:
      print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
      print("Pass --helpshort or --helpfull to see help on flags.", file=sys.stderr)
      return 1, stderr.getvalue()
    try:
      status = run_experiments.main(remaining)
    except SystemExit as e:
      status = e.code if isinstance(e.code, int) else 1
    except Exception:  # pylint: disable=broad-except
      import traceback
      traceback.print_exc()
      status = 1
  return int(status or 0), stderr.getvalue()


def main():
  cases = json.load(sys.stdin)
  results = [run_case(argv) for argv in cases]
  sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
  main()
