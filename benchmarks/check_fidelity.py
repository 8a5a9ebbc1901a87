"""Fidelity: every algorithm against an independent reference, on the same weights and data.

Runs every check of `benchmarks/fidelity/` (see its docstring for the
contract): the toolkit's computation here, the reference in NumPy here or in
the peers' process (PyTorch re-derivations, delve, torchattacks, installed
into their own folder by `benchmarks.peers.install`, never into this
environment). Prints one row per check (algorithm, reference, max
difference, tolerance, verdict), optionally writes the same table as
Markdown (`--markdown=docs/fidelity.md`), and last
`fidelity: N of M checks agree`. A check that could not run (a peer package
missing, no `--data_dir` for a real-data check) counts in M, not in N.

  python -m benchmarks.check_fidelity --data_dir=DIR [--only=SUBSTRING] \\
      [--markdown=docs/fidelity.md] [--peers_dir=~/.cache/robust_sparse/peers]
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from robust_sparse.core import startup

startup.import_tensorflow()  # Quietly: robust_sparse/core/startup.py.

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from benchmarks import fidelity  # noqa: E402
from benchmarks.peers import install  # noqa: E402

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags():
  flags.DEFINE_string("data_dir", None, "folder with mnist/, cifar-10/ (real-data checks)")
  flags.DEFINE_string("only", None, "run only the checks whose name contains this")
  flags.DEFINE_string("markdown", None, "also write the table to this Markdown file")
  flags.DEFINE_string("peers_dir", install.DEFAULT_FOLDER,
                      "the peers' own package folder (torch, delve, torchattacks)")
  flags.DEFINE_boolean("install", True, "install missing peer packages into --peers_dir")
  flags.DEFINE_integer("seed", 0, "seed of the random weights, data and masks")


def run_checks(selected, context, peers_dir, install_missing=True, log=print):
  """[(check, max difference or None, note)] for `selected`, peers run in one process."""
  results = {}
  pending = []
  exchange = tempfile.mkdtemp(prefix="fidelity_")
  for index, check in enumerate(selected):
    if check.needs_data and context.data_dir is None:
      results[index] = (None, "not run: needs --data_dir")
      continue
    start = time.perf_counter()
    try:
      inputs, outputs = check.ours(context)
    except Exception as error:  # noqa: BLE001 -- one failing check must not hide the others
      results[index] = (None, f"ours failed: {type(error).__name__}: {error}"[:200])
      continue
    if check.numpy_reference is not None:
      try:
        reference = check.numpy_reference(inputs)
        results[index] = (check.compare(outputs, reference), "")
      except Exception as error:  # noqa: BLE001
        results[index] = (None, f"reference failed: {type(error).__name__}: {error}"[:200])
      log(f"  {check.name}: {time.perf_counter() - start:.1f} s")
      continue
    stem = os.path.join(exchange, f"{index:03d}")
    np.savez(stem + ".in.npz", **inputs)
    with open(stem + ".json", "w") as f:
      json.dump({"peer": check.peer}, f)
    pending.append((index, check, outputs, stem))
  if pending:
    needs = sorted({n for _, check, _, _ in pending for n in check.needs} | {"torch"})
    env = install.ensure(needs, peers_dir, install=install_missing)
    if env is None:
      for index, _, _, _ in pending:
        results[index] = (None, f"not run: peer packages missing ({', '.join(needs)})")
    else:
      log(f"  running {len(pending)} references in the peers' process")
      subprocess.run([sys.executable, "-m", "benchmarks.peers.fidelity_runner", exchange],
                     cwd=REPO, env=env, check=False)
      for index, check, outputs, stem in pending:
        if os.path.exists(stem + ".error.txt"):
          with open(stem + ".error.txt") as f:
            last = f.read().strip().splitlines()[-1]
          results[index] = (None, f"reference failed: {last}"[:200])
          continue
        with np.load(stem + ".ref.npz") as data:
          reference = {k: data[k] for k in data.files}
        results[index] = (check.compare(outputs, reference), "")
  return [(check, *results[i]) for i, check in enumerate(selected)]


def agrees(check, difference):
  return difference is not None and math.isfinite(difference) and difference <= check.tolerance


def table(results, markdown=False):
  rows = [("algorithm", "reference", "difference", "tolerance", "agrees")]
  for check, difference, note in results:
    shown = note if difference is None else f"{difference:.2e}"
    rows.append((check.name, check.reference, shown, f"{check.tolerance:.0e}",
                 "yes" if agrees(check, difference) else "NO"))
  if markdown:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)
  widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c[:60].ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.data_dir is not None and not os.path.isdir(FLAGS.data_dir):
    sys.exit(f"--data_dir={FLAGS.data_dir}: not a folder")
  selected = [c for c in fidelity.checks() if not FLAGS.only or FLAGS.only in c.name]
  if not selected:
    sys.exit(f"--only={FLAGS.only}: no check's name contains it")
  context = fidelity.Context(data_dir=FLAGS.data_dir, seed=FLAGS.seed)
  results = run_checks(selected, context, os.path.expanduser(FLAGS.peers_dir), FLAGS.install)
  print(table(results))
  if FLAGS.markdown:
    with open(FLAGS.markdown, "w") as f:
      f.write(table(results, markdown=True) + "\n")
  agreeing = sum(agrees(c, d) for c, d, _ in results)
  print(f"fidelity: {agreeing} of {len(results)} checks agree")


if __name__ == "__main__":
  define_flags()
  app.run(main)
