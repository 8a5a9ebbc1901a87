"""`--experiment=augmented_flatness` end to end: README example, numbers, resume, bad input."""

import contextlib
import csv
import io
import os
import re
import shlex
import shutil

import numpy as np
import pytest

from robust_sparse.experiments import flatness as experiment
from robust_sparse.core.run_folder import checkpoints
from robust_sparse.experiments.runner import Runner, assign_weights, level_dir
from robust_sparse.models import build_model
from robust_sparse.core import files
from robust_sparse.measure import flatness
from robust_sparse.training.engine import index_stream
from robust_sparse.core.hparams import Hparams
from tests.conftest import REPO, one_line_error, run_cli_batch

# The README's example (`<!-- readme-test: augmented-flatness -->`), run as written.
EXAMPLE = (
    "base=$(python -m run_experiments --dataset=sklearn_digits --model=residual_mlp "
    "--experiment=train --trials=1 --epochs=2 --save_every_epochs=1 --attack=none "
    "--sharpness_examples=0 --base_dir=flatness | tail -n 1)\n"
    "python -m run_experiments --dataset=sklearn_digits --model=residual_mlp "
    "--experiment=augmented_flatness --pretrained_run=\"$base\" --correct_samples_only "
    "--max_iterations=4 --base_dir=flatness")
README_MARKER = "<!-- readme-test: augmented-flatness -->"
BATCH_SIZE = 60  # The default --batch_size.
MAX_ITERATIONS = 4
LINE = re.compile(r"augmented flatness: (\d+) checkpoints, average key \S+ -> \S+ "
                  r"\(no value layers\)$")


def _run_experiments(argv):
  """(status, stdout, stderr) of `python -m run_experiments argv`, run in this process.

  As `tests/cli_batch.py` does (the same flag parsing and `main`), keeping the
  standard output: TensorFlow is not imported again, and the model compiled
  once serves every run.
  """
  from absl import flags
  from robust_sparse import run_experiments  # pylint: disable=import-outside-toplevel
  flags.FLAGS.unparse_flags()
  stdout, stderr = io.StringIO(), io.StringIO()
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      status = run_experiments.main(flags.FLAGS(["run_experiments", *argv]))
  finally:
    flags.FLAGS.unparse_flags()
  return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """(folder, source run, measured run, printed lines) of the README example.

  Its two commands run as the shell would run them in `folder`: the first's
  last line is `$base`.
  """
  first, second = EXAMPLE.splitlines()
  match = re.fullmatch(r"base=\$\(python -m run_experiments (.*) \| tail -n 1\)", first)
  assert match and second.startswith("python -m run_experiments "), EXAMPLE
  folder = str(tmp_path_factory.mktemp("example"))
  here = os.getcwd()
  os.chdir(folder)
  try:
    status, stdout, stderr = _run_experiments(shlex.split(match.group(1)) + ["--noprogress"])
    assert status == 0, stderr[-3000:]
    source = stdout.strip().splitlines()[-1]
    argv = shlex.split(second.replace('"$base"', shlex.quote(source)))[3:]
    status, stdout, stderr = _run_experiments(argv + ["--noprogress"])
    assert status == 0, stderr[-3000:]
  finally:
    os.chdir(here)
  lines = stdout.strip().splitlines()
  return folder, source, lines[-2], lines


def _measured_again(run_dir, base_dir, digits, **changes):
  """Runs the measurement of `run_dir`'s hparams (with `changes`) in-process under `base_dir`."""
  hparams = Hparams.from_dict({**files.read_json(os.path.join(run_dir, "hparams.json")),
                               **changes})
  runner = Runner(hparams, digits, str(base_dir), progress=False)
  runner.run()
  return runner


def test_readme_shows_the_tested_example():
  text = open(os.path.join(REPO, "README.md")).read()
  match = re.search(re.escape(README_MARKER) + r"\s*```bash\n(.*?)```", text, re.S)
  assert match, f"README has no bash block after {README_MARKER}"
  assert match.group(1).strip() == EXAMPLE


def test_every_checkpoint_is_measured_as_the_library_measures_it(example, digits, monkeypatch):
  folder, source, run_dir, lines = example
  monkeypatch.chdir(folder)
  level = level_dir(source, 0, 0)
  saved = checkpoints(level)
  iterations = [iteration for iteration, _ in saved]
  assert iterations == [0, 19, 38]  # 19 steps per epoch.
  assert LINE.fullmatch(lines[-1]) and LINE.fullmatch(lines[-1]).group(1) == "3", lines[-1]
  assert os.path.exists(os.path.join(run_dir, experiment.FIGURE))
  with open(os.path.join(run_dir, experiment.SUMMARY_CSV), newline="") as handle:
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
  assert [row["iteration"] for row in rows] == iterations
  assert [row["epoch"] for row in rows] == [round(i / 19, 6) for i in iterations]

  model = build_model("residual_mlp", digits.input_shape, digits.num_classes)
  hparams = Hparams.from_dict(files.read_json(os.path.join(run_dir, "hparams.json")))
  assert hparams.flatness_data == "train"  # The seed's protocol, by default.
  # The engine's first training batches for the run's seed (no --augment here).
  batches = list(experiment.training_batches(digits, BATCH_SIZE, hparams.seed))
  assert len(batches) == MAX_ITERATIONS or len(batches) == len(digits.y_train) // BATCH_SIZE
  first = next(iter(index_stream(len(digits.y_train), BATCH_SIZE, hparams.seed)))
  np.testing.assert_array_equal(batches[0][1], digits.y_train[first.numpy()])
  for (iteration, path), row in zip(saved, rows):
    assign_weights(model, files.load_arrays(path))
    expected = flatness.augmented_flatness(
        model, batches, correct_samples_only=True, max_iterations=MAX_ITERATIONS,
        label_smoothing=hparams.label_smoothing)
    written = flatness.read_csv(experiment.checkpoint_csv(run_dir, iteration))
    assert list(written) == list(expected)
    assert expected[flatness.SUMMARY]["batches"] == MAX_ITERATIONS
    assert expected[flatness.SUMMARY]["samples"] < MAX_ITERATIONS * BATCH_SIZE
    for block, terms in expected.items():
      assert written[block] == pytest.approx(terms, rel=1e-12), block
      for term, value in terms.items():
        column = term if block == flatness.SUMMARY else f"{block}/{term}"
        assert row[column] == pytest.approx(value, rel=1e-12), column
  # Training moved the weights: the checkpoints differ.
  assert len({row["average/key"] for row in rows}) == len(rows)


def test_a_rerun_measures_only_the_missing_checkpoint(example, digits, tmp_path, monkeypatch):
  folder, _, run_dir, lines = example
  monkeypatch.chdir(folder)
  base = tmp_path / "base"
  copy = base / os.path.relpath(run_dir, "flatness")
  shutil.copytree(run_dir, copy)
  missing = experiment.checkpoint_csv(str(copy), 19)
  before = {name: open(os.path.join(copy, name), "rb").read()
            for name in (os.path.relpath(missing, copy), experiment.SUMMARY_CSV)}
  os.remove(missing)
  calls = []
  measure = flatness.augmented_flatness
  monkeypatch.setattr(flatness, "augmented_flatness",
                      lambda *args, **kwargs: calls.append(1) or measure(*args, **kwargs))
  runner = _measured_again(run_dir, base, digits)
  assert runner.run_dir == str(copy)
  assert len(calls) == 1
  assert runner.summary == lines[-1]
  for name, content in before.items():
    assert open(os.path.join(copy, name), "rb").read() == content, name
  assert sorted(os.listdir(os.path.join(copy, experiment.FOLDER))) == [
      f"iteration_{i:08d}.csv" for i in (0, 19, 38)]


def test_flatness_data_test_is_the_earlier_test_set_measurement(example, digits, tmp_path,
                                                                monkeypatch):
  folder, source, run_dir, _ = example
  monkeypatch.chdir(folder)
  runner = _measured_again(run_dir, tmp_path / "runs", digits, flatness_data="test")
  model = build_model("residual_mlp", digits.input_shape, digits.num_classes)
  iteration, path = checkpoints(level_dir(source, 0, 0))[-1]
  assign_weights(model, files.load_arrays(path))
  batches = [(digits.x_test[i:i + BATCH_SIZE], digits.y_test[i:i + BATCH_SIZE])
             for i in range(0, MAX_ITERATIONS * BATCH_SIZE, BATCH_SIZE)]
  expected = flatness.augmented_flatness(model, batches, correct_samples_only=True,
                                         training=False, loss_reduction="sum")
  written = flatness.read_csv(experiment.checkpoint_csv(runner.run_dir, iteration))
  for block, terms in expected.items():
    assert written[block] == pytest.approx(terms, rel=1e-12), block
  seed = flatness.read_csv(experiment.checkpoint_csv(run_dir, iteration))
  assert seed["average"]["key"] != pytest.approx(expected["average"]["key"])


def test_a_run_with_only_initial_and_final_weights_says_how_to_get_more(example, digits,
                                                                        tmp_path, monkeypatch):
  folder, source, run_dir, _ = example
  monkeypatch.chdir(folder)
  bare = tmp_path / "bare"
  shutil.copytree(source, bare)
  shutil.rmtree(bare / "trial_0" / "prune_iter_0" / "checkpoints")
  runner = _measured_again(run_dir, tmp_path / "runs", digits, pretrained_run=str(bare))
  assert runner.summary.startswith("augmented flatness: 2 checkpoints, average key ")
  assert "--save_every_epochs" in runner.summary
  assert sorted(os.listdir(os.path.join(runner.run_dir, experiment.FOLDER))) == [
      "iteration_00000000.csv", "iteration_00000038.csv"]


def test_bad_input_fails_in_one_line(example, tmp_path):
  folder, source, _, _ = example
  source = os.path.join(folder, source)
  # A finished run of a model without MLP blocks (nothing is loaded before the check).
  conv = tmp_path / "conv"
  files.write_json(str(conv / "hparams.json"),
                   Hparams(dataset="sklearn_digits", model="conv-bn", valid_size=300,
                           experiment="train").to_dict())
  files.save_arrays(str(conv / "trial_0" / "prune_iter_0" / "weights_final.npz"), {})
  files.write_json(str(conv / "trial_0" / "prune_iter_0" / "metadata.json"),
                   {"completed": True, "final_iteration": 5})
  base = ["--dataset=sklearn_digits", "--experiment=augmented_flatness", "--noprogress",
          f"--base_dir={tmp_path / 'runs'}"]
  cases = {
      (*base, "--model=residual_mlp"): "--pretrained_run",
      (*base, "--model=residual_mlp", f"--pretrained_run={tmp_path / 'nowhere'}"):
          "--pretrained_run",
      (*base, "--model=dense-300-100", f"--pretrained_run={source}"): "--model=residual_mlp",
      (*base, "--model=conv-bn", f"--pretrained_run={conv}"): "--model=conv-bn has no MLP",
      (*base, "--model=residual_mlp", f"--pretrained_run={source}", "--max_iterations=0"):
          "max_iterations",
      (*base, "--model=residual_mlp", f"--pretrained_run={source}",
       "--flatness_loss_scale=0"): "--flatness_loss_scale",
  }
  outcomes = run_cli_batch(list(cases))
  for case, message in cases.items():
    status, stderr = outcomes[case]
    one_line_error(status, stderr, message)
