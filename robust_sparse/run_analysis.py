"""Analyses the runs written by `run_experiments`: figures, tables and a report.

Example:
  python -m run_analysis --base_dir=output
  python -m run_analysis --base_dir=output --attack=pgd --noadv_train \
      --format=png,pdf --out_dir=/tmp/pgd_natural

Every folder under --base_dir holding `hparams.json` is a run. Runs are
pooled only when their hyper-parameters are equal (a field an older run lacks
counts as its default); settings that share a data set, model, experiment,
attack and training mode are labelled by the fields that differ
("prune_iters=3"). Lottery-ticket runs get the sparsity figures and tables;
runs without pruning levels (`--experiment=train`, `no_pruning`) get learning
curves and a final table; diverged levels are listed, never plotted. The
output (default `<base_dir>/analysis`) holds `report.md`, which shows every
figure and table. Every run with an attack also gets the gradient-masking
checks (`analysis.masking`; `--nomasking_checks` skips them): the runner
attacks each level's final weights as it finishes (`run_experiments
--masking_checks`, on for adversarially trained runs) and keeps the results in
the level's folder, which the analysis reads; levels without them are attacked
here once, with a progress bar, on the first `--masking_examples` test images
(read from `--data_dir`, else from the run's own `--data_dir`), and the
results are written into their folders, so the next analysis only reads. Bad
input (a missing or empty folder, no run, filters that match nothing) ends with
a one-line message on stderr and exit status 1.
"""

import os
import shlex
import sys
import time

from absl import app
from absl import flags
from absl import logging

from robust_sparse.core import startup

startup.import_tensorflow_when_needed()  # Quietly, if and when the analysis needs it.

from robust_sparse.analysis import load  # noqa: E402
from robust_sparse.analysis import masking  # noqa: E402
from robust_sparse.analysis import report  # noqa: E402

FIGURE_FORMATS = ("png", "svg", "pdf")

_BASE_DIR = flags.DEFINE_string(
    "base_dir", None, "Folder searched recursively for runs (hparams.json).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where figures, tables and report.md go; default "
    "<base_dir>/analysis.")
_DATASET = flags.DEFINE_list(
    "dataset", None, "Only these data sets (comma list); default all.")
_MODEL = flags.DEFINE_list(
    "model", None, "Only these models (comma list); default all.")
_ATTACK = flags.DEFINE_list(
    "attack", None, "Only these attacks, e.g. fgsm,pgd; default all.")
_EXPERIMENT = flags.DEFINE_list(
    "experiment", None, "Only these experiments, e.g. reinit_orig,"
    "reinit_rand or train; default all.")
_ADV_TRAIN = flags.DEFINE_boolean(
    "adv_train", None, "--adv_train: only adversarially trained runs; "
    "--noadv_train: only naturally trained runs; unset: both.")
_FORMAT = flags.DEFINE_list(
    "format", ["png"], f"Figure formats, a comma list of {FIGURE_FORMATS}.")
_MASKING_CHECKS = flags.DEFINE_boolean(
    "masking_checks", True, "Gradient-masking checks of every run with an --attack: FGSM, "
    "PGD, a 5x stronger PGD, eps 1.0 and a transfer attack on its final weights "
    "(tables/gradient_masking.*), read from the level folders where the runner kept them.")
_MASKING_EXAMPLES = flags.DEFINE_integer(
    "masking_examples", None, "Test images the gradient-masking checks attack (the first "
    "N); unset: the checks stored in the level folders, whatever their N (levels without "
    "them: the run's --masking_examples, 500 by default). Stored checks of another N are "
    "made again with this one and replace them.", lower_bound=1)
_MASKING_TOLERANCE = flags.DEFINE_float(
    "masking_tolerance", 0.01, "Slack of the gradient-masking checks, as a fraction "
    "(0.01: 1 point of robust accuracy).", lower_bound=0.0)
_MASKING_ALL_LEVELS = flags.DEFINE_boolean(
    "masking_all_levels", False, "Check every finished pruning level, not only the last.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Folder with the raw data files for the gradient-masking checks; "
    "default: each run's own --data_dir, else $ROBUST_SPARSE_DATA_DIR (sklearn_digits needs "
    "none).")

flags.mark_flag_as_required("base_dir")
flags.register_validator(
    "format", lambda formats: bool(formats) and all(
        f in FIGURE_FORMATS for f in formats),
    message=f"--format must be a non-empty comma list of {FIGURE_FORMATS}")
flags.register_validator(
    "data_dir", lambda path: path is None or os.path.isdir(path),
    message="--data_dir must be an existing folder")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  base_dir = _BASE_DIR.value
  out_dir = _OUT_DIR.value or f"{base_dir.rstrip('/')}/analysis"
  began = time.time()
  try:
    study = load.load_study(
        base_dir, datasets=_DATASET.value, models=_MODEL.value,
        attacks=_ATTACK.value, experiments=_EXPERIMENT.value,
        adv_train=_ADV_TRAIN.value)
  except load.AnalysisError as error:
    sys.exit(f"run_analysis: error: {error}")
  command = "python -m run_analysis " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  masking_options = masking.Options(
      examples=_MASKING_EXAMPLES.value, tolerance=_MASKING_TOLERANCE.value,
      data_dir=_DATA_DIR.value, all_levels=_MASKING_ALL_LEVELS.value) if (
          _MASKING_CHECKS.value) else None
  logging.info("loaded %d runs (%d evaluations) in %.1f s; writing the figures, tables and "
               "report to %s", len(study.runs), len(study.evaluations), time.time() - began,
               out_dir)
  path = report.write_analysis(study, out_dir, _FORMAT.value, base_dir,
                               command, masking_options)
  logging.info("analysis written in %.1f s", time.time() - began)
  refused = [p for p in study.problems if ": refused, " in p]
  if refused:
    print(f"run_analysis: {len(refused)} level(s) refused, their logs disagree with their "
          f"metadata.json (listed in the report), e.g. {refused[0]}", file=sys.stderr)
  print(f"Analysed {len(study.runs)} runs"
        + (f" ({len(refused)} level(s) refused)" if refused else "") + f"; report: {path}")


if __name__ == "__main__":
  app.run(main)
