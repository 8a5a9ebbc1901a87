"""The runner end to end: the run folder, resuming after a kill, and bad input."""

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, child_env, one_line_error, run_cli, run_cli_batch

SMALL = ["--dataset=sklearn_digits", "--experiment=reinit_orig", "--attack=pgd", "--adv_train",
         "--trials=1", "--prune_iters=2", "--train_iters=60", "--eval_every=20",
         "--batch_size=32", "--pgd_steps=3", "--noprogress",
         # The end-of-level gradient-masking checks (tests/analysis/test_masking_analysis.py tests
         # them) and sharpness on 1000 images cost more than the training; kept small.
         "--nomasking_checks", "--sharpness_examples=64"]


def _run_dir(base):
  [hparams] = glob.glob(os.path.join(base, "**", "hparams.json"), recursive=True)
  return os.path.dirname(hparams)


def _tree(run_dir):
  """Every result file of a run (not timings) as comparable values."""
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "**", "*"), recursive=True)):
    rel = os.path.relpath(path, run_dir)
    if path.endswith(".csv"):
      out[rel] = open(path).read()
    elif path.endswith(".npy"):
      out[rel] = np.load(path).tobytes()
    elif path.endswith("metadata.json"):
      meta = json.load(open(path))
      meta.pop("seconds"), meta.pop("worker")  # Who trained it, and how long.
      out[rel] = meta
  return out


def test_small_run_writes_the_tree(tmp_path):
  result = run_cli(*SMALL, f"--base_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  run_dir = _run_dir(tmp_path)
  hparams = json.load(open(os.path.join(run_dir, "hparams.json")))
  assert hparams["attack"] == "pgd" and hparams["adv_train"] is True
  for level in range(3):
    level_dir = os.path.join(run_dir, "trial_0", f"prune_iter_{level}")
    for split in ("train", "valid", "test"):
      rows = np.genfromtxt(os.path.join(level_dir, f"{split}.csv"), delimiter=",", names=True)
      assert rows.dtype.names[:4] == ("iteration", "loss", "acc", "adv_acc")
      expected = [20, 40, 60] if split == "train" else [0, 20, 40, 60]
      np.testing.assert_array_equal(rows["iteration"], expected)
      assert np.all((rows["acc"] >= 0) & (rows["acc"] <= 1))
    for layer in ("hidden_1", "hidden_2", "output"):
      for sub in ("masks", "init_kernels", "post_kernels"):
        assert os.path.exists(os.path.join(level_dir, sub, f"{layer}.npy"))
    mask = np.load(os.path.join(level_dir, "masks", "hidden_1.npy"))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    meta = json.load(open(os.path.join(level_dir, "metadata.json")))
    assert meta["completed"] and meta["prune_iteration"] == level
    assert meta["compile"] == "xla_step"  # An MLP, adversarially trained: an XLA call per step.
    assert meta["eval_compile"] == "xla"  # Its evaluation too (no convolution).
    assert not os.path.exists(os.path.join(level_dir, "checkpoint.npz"))
  # Re-running a finished command changes nothing.
  before = _tree(run_dir)
  again = run_cli(*SMALL, f"--base_dir={tmp_path}")
  assert again.returncode == 0 and _tree(run_dir) == before


def test_real_mnist_weights_remaining(tmp_path, data_dir):
  result = run_cli("--dataset=digits", f"--data_dir={data_dir}",
                   "--experiment=reinit_orig", "--attack=fgsm", "--trials=1",
                   "--train_iters=2", "--prune_iters=2", "--eval_every=2", "--noprogress",
                   # About the masks: no sharpness, and the 10000 test images attacked
                   # only at the last evaluation (not the first) of each level.
                   "--sharpness_examples=0", "--eval_examples=100",
                   f"--base_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  run_dir = _run_dir(tmp_path)
  percents = [json.load(open(os.path.join(run_dir, "trial_0", f"prune_iter_{k}",
                                          "metadata.json")))["percent_weights_remaining"]
              for k in range(3)]
  np.testing.assert_allclose(percents, [100.0, 80.04, 64.06], atol=0.05)


def test_killed_run_resumes_to_the_same_results(tmp_path):
  # Not about compilation (test_small_run_writes_the_tree runs the default "auto").
  args = [*SMALL, "--train_iters=240", "--eval_every=20", "--prune_iters=1", "--compile=graph"]
  reference = run_cli(*args, f"--base_dir={tmp_path / 'a'}")
  assert reference.returncode == 0, reference.stderr[-2000:]

  base = tmp_path / "b"
  env = child_env()
  # Killed in the pruned level: the resume re-reads the finished dense level's kernels and
  # masks too (tests/training/test_engine.py kills a first level at random points).
  for kill_at in ("prune_iter_1",):
    process = subprocess.Popen([sys.executable, "-m", "run_experiments", *args,
                                f"--base_dir={base}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(str(base / "**" / kill_at / "checkpoint.npz"), recursive=True):
      assert process.poll() is None, "run finished before it could be killed"
      assert time.time() < deadline
      time.sleep(0.05)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
  resumed = run_cli(*args, f"--base_dir={base}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  expected, actual = _tree(_run_dir(tmp_path / "a")), _tree(_run_dir(base))
  assert expected.keys() == actual.keys()
  for key in expected:
    assert actual[key] == expected[key], key


BAD_FLAGS = [
    (["--dataset=imagenet22k"], "dataset"),
    (["--augment=crop,twirl"], "augment"),
    (["--resolution=0"], "resolution"),
    (["--normalize=cifar11"], "normalize"),
    (["--model=vgg11"], "vgg11"),  # 8x8 digits are too small for its five pools.
    (["--model=resnet18", "--dropout=0.3"], "--dropout"),
    (["--model=wideresnet27x10"], "wideresnet"),
    (["--model=resnet9000"], "model"),
    (["--experiment=reinit_sideways"], "experiment"),
    (["--attack=cw"], "attack"),
    (["--trials=0"], "trials"),
    (["--eps=-0.1"], "eps"),
    (["--prune_rate=1.5"], "prune_rate"),
    (["--activation=sigmoidish"], "activation"),
    (["--valid_size=5000"], "valid_size"),
    (["--rewind_iteration=100", "--train_iters=50"], "rewind_iteration"),
]


def _corrupt_data_dirs(root, data_dir):
  """{name: data folder} with MNIST's training labels truncated or not gzip."""
  def copy_with_labels(name, content, compress):
    folder = root / name / "mnist"
    folder.mkdir(parents=True)
    for file in os.listdir(os.path.join(data_dir, "mnist")):
      if file != "train-labels-idx1-ubyte.gz":
        os.symlink(os.path.join(data_dir, "mnist", file), folder / file)
    if compress:
      with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(content)
    else:
      (folder / "train-labels-idx1-ubyte.gz").write_bytes(content)
    return root / name

  return {"truncated": copy_with_labels(
              "truncated", b"\x00\x00\x08\x01\x00\x00\xea\x60" + b"\x01" * 100, True),
          "not_gzip": copy_with_labels("not_gzip", b"not gzip at all", False)}


@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, data_dir):
  """{"bad_flags": {argv: (status, stderr)}, "data": {name: (status, stderr)}}.

  Every bad command of this file in one `tests.cli_batch` process (TensorFlow
  imported once): BAD_FLAGS, and the missing and corrupt data folders.
  """
  base = tmp_path_factory.mktemp("bad_flags")
  bad = [["--dataset=sklearn_digits", *args, f"--base_dir={base}"] for args, _ in BAD_FLAGS]
  root = tmp_path_factory.mktemp("data_dirs")
  empty, no_files = root / "empty", root / "no_files"
  empty.mkdir()
  (no_files / "mnist").mkdir(parents=True)
  corrupt = _corrupt_data_dirs(root, data_dir)
  data_cases = {"no_mnist": (empty, "digits"), "no_idx": (no_files, "digits"),
                "no_cifar": (empty, "cifar10"), "truncated": (corrupt["truncated"], "digits"),
                "not_gzip": (corrupt["not_gzip"], "digits")}
  data_argvs = {name: [f"--dataset={dataset}", f"--data_dir={folder}",
                       f"--base_dir={root / 'out'}", "--noprogress"]
                for name, (folder, dataset) in data_cases.items()}
  outcomes = run_cli_batch(bad + list(data_argvs.values()))
  return {"bad_flags": {tuple(argv): outcomes[tuple(argv)] for argv in bad},
          "data": {name: outcomes[tuple(argv)] for name, argv in data_argvs.items()}}


@pytest.mark.parametrize("args,message", BAD_FLAGS)
def test_bad_flags_fail_in_one_line(cli_errors, args, message):
  [(status, stderr)] = [outcome for argv, outcome in cli_errors["bad_flags"].items()
                        if list(argv[1:-1]) == args]
  one_line_error(status, stderr, message)


def _data_dir_error(cli_errors, name):
  """The one error line of `run_experiments` for the data folder case `name`."""
  status, stderr = cli_errors["data"][name]
  assert status != 0
  assert "Traceback" not in stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr[-1000:]
  return errors[0]


def test_missing_data_files(cli_errors):
  assert "mnist" in _data_dir_error(cli_errors, "no_mnist")
  assert "train-images-idx3-ubyte.gz" in _data_dir_error(cli_errors, "no_idx")
  assert "cifar-10" in _data_dir_error(cli_errors, "no_cifar")


def test_corrupt_data_files(cli_errors):
  first = _data_dir_error(cli_errors, "truncated")
  assert "corrupt" in first and "train-labels" in first
  assert "corrupt" in _data_dir_error(cli_errors, "not_gzip")
