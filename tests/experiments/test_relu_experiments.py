"""The ReLU-reduction experiments end to end: relu_count, relu_prune's phases, resume, bad input."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.experiments.runner import Runner, level_dir
from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from robust_sparse.training.steps import OptimizerGroup, make_train_step
from tests.conftest import REPO, child_env, run_cli

# Graphs, no XLA compile per level (the README's ReLU example runs the default XLA choice).
BASE = dict(dataset="sklearn_digits", model="dense-300-100", trials=1, batch_size=60,
            attack="fgsm", eps=0.1, sharpness_examples=0, compile="graph")
PRUNE = dict(BASE, experiment="relu_prune", relu_sparsity=0.5, mask_epochs=6.0,
             alpha_lr=0.01, epochs=2.0, optimizer="sgd", learning_rate=0.01, momentum=0.9)


@pytest.fixture(scope="module")
def baseline(digits, tmp_path_factory):
  """A finished dense-300-100 run to start the mask phase from."""
  hp = Hparams(**BASE, experiment="train", train_iters=120, eval_every=60)
  return Runner(hp, digits, str(tmp_path_factory.mktemp("baseline")), progress=False).run()


def test_relu_count_command_writes_the_csv_and_prints_the_total_last(tmp_path, data_dir):
  result = run_cli("--experiment=relu_count", "--model=resnet18_maxpool",
                   "--dataset=cifar10", f"--data_dir={data_dir}", f"--base_dir={tmp_path}")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "relu count: 188416"
  [path] = glob.glob(str(tmp_path / "**" / "relu_counts.csv"), recursive=True)
  lines = open(path).read().splitlines()
  assert lines[0] == "layer,site,relus"
  assert lines[1] == "stem_activation,after_bn,65536"
  assert lines[-1] == "total,,188416"
  assert sum(int(line.split(",")[2]) for line in lines[1:-1]) == 188416


def test_sequential_groups_update_the_second_group_at_the_first_groups_new_values():
  """AutoReP's alternating step: the weights' pass sees the alpha the first group just set."""
  inputs = keras.Input((1,))
  layer = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="w")
  scale = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones", name="a")
  model = keras.Model(inputs, scale(layer(inputs)))

  def loss_grad_fn(trainable, non_trainable, batch):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      out, new, _ = model.stateless_call(trainable, non_trainable, batch["x"],
                                         training=True, return_losses=True)
      loss = tf.reduce_sum(out)  # d/dw = a * x, d/da = w * x
    return tape.gradient(loss, trainable), new, dict(
        logits=tf.concat([out, -out], -1), per_example=out[:, 0], objective=loss)

  is_a = lambda v: v.path.startswith("a/")
  groups = [OptimizerGroup("a", keras.optimizers.SGD(0.5), predicate=is_a,
                           loss_grad_fn=loss_grad_fn),
            OptimizerGroup("w", keras.optimizers.SGD(0.5), predicate=lambda v: not is_a(v))]
  step = make_train_step(model, loss_grad_fn, groups)
  step(tf.constant([[1.0]]), tf.constant([0]), tf.constant(0, tf.int64),
       tf.constant(0, tf.int64))
  a = model.get_layer("a").kernel.numpy().item()
  w = model.get_layer("w").kernel.numpy().item()
  assert a == pytest.approx(1.0 - 0.5 * 1.0)  # From w = 1.
  assert w == pytest.approx(1.0 - 0.5 * a)  # From the new a = 0.5, not from 1.


def test_relu_prune_reaches_the_target_and_runs_both_phases(digits, baseline, tmp_path):
  hp = Hparams(**PRUNE, pretrained_run=baseline)
  run_dir = Runner(hp, digits, str(tmp_path), progress=False).run()
  mask, finetune = level_dir(run_dir, 0, 0), level_dir(run_dir, 0, 1)
  meta = files.read_json(os.path.join(mask, "metadata.json"))
  assert meta["relu_total"] == 400 and meta["target_density"] == 0.5
  assert abs(meta["relu_density"] - 0.5) <= 0.01, meta["relu_density"]
  assert meta["best"] is not None and meta["best"]["relu_density"] - 0.5 < 0.01
  assert os.path.exists(os.path.join(mask, "weights_best.npz"))
  later = files.read_json(os.path.join(finetune, "metadata.json"))
  assert later["started_from"] == "best mask-phase weights"
  # Fine-tuning keeps the masks: the count is the best checkpoint's.
  assert later["relu_count"] == round(meta["best"]["relu_density"] * 400)
  train = open(os.path.join(mask, "train.csv")).read().splitlines()
  assert train[0].endswith("relu_count,relu_density")
  sites = open(os.path.join(finetune, "relu_sites.csv")).read().splitlines()
  assert sites[0] == "iteration,layer,relus,live"
  assert sites[-1].startswith("38,hidden_2_activation,100,")
  # The weights' pass started from the baseline: its first evaluation is the baseline's.
  first = open(os.path.join(mask, "test.csv")).read().splitlines()[1].split(",")
  base_last = open(os.path.join(level_dir(baseline, 0, 0), "test.csv")).read().splitlines()
  assert first[2] == base_last[-1].split(",")[2]
  # Robust accuracy under the run's attack comes with every evaluation.
  assert np.isfinite(float(first[3]))


def test_relu_prune_resumes_after_kill_9_in_either_phase(digits, baseline, tmp_path):
  args = ["--dataset=sklearn_digits", "--experiment=relu_prune", f"--pretrained_run={baseline}",
          "--relu_sparsity=0.5", "--mask_epochs=4", "--alpha_lr=0.02", "--epochs=3",
          "--optimizer=sgd", "--learning_rate=0.01", "--momentum=0.9", "--trials=1",
          "--batch_size=60", "--eval_every=10", "--attack=fgsm", "--eps=0.1",
          "--sharpness_examples=0", "--hysteresis_threshold=0.01", "--mask_dropout=0.2",
          "--relu_replacement=identity_relu_grad", "--noprogress",
          "--compile=graph"]  # About resuming, not compilation: no XLA compile per process.
  # The uninterrupted reference, in this process (the same hyper-parameters as the flags).
  reference = Hparams.with_seed_defaults(**{**PRUNE, "mask_epochs": 4.0, "alpha_lr": 0.02, "epochs": 3.0,
                         "eval_every": 10,
                         "hysteresis_threshold": 0.01, "mask_dropout": 0.2,
                         "relu_replacement": "identity_relu_grad", "pretrained_run": baseline})
  Runner(reference, digits, str(tmp_path / "a"), progress=False).run()
  base = tmp_path / "b"
  env = child_env()
  for kill_at in ("prune_iter_0", "prune_iter_1"):
    process = subprocess.Popen([sys.executable, "-m", "run_experiments", *args,
                                f"--base_dir={base}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    pattern = str(base / "**" / kill_at / "checkpoint.npz")
    while not glob.glob(pattern, recursive=True):
      assert process.poll() is None, "run finished before it could be killed"
      assert time.time() < deadline
      time.sleep(0.02)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
  resumed = run_cli(*args, f"--base_dir={base}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  def tree(root):
    [hparams] = glob.glob(str(root / "**" / "hparams.json"), recursive=True)
    out = {}
    for path in sorted(glob.glob(os.path.join(os.path.dirname(hparams), "**", "*"),
                                 recursive=True)):
      rel = os.path.relpath(path, os.path.dirname(hparams))
      if path.endswith(".csv"):
        out[rel] = open(path).read()
      elif path.endswith(".npz"):
        out.update({f"{rel}:{k}": v.tobytes() for k, v in files.load_arrays(path).items()})
      elif path.endswith("metadata.json"):
        meta = json.load(open(path))
        meta.pop("seconds"), meta.pop("worker")  # Who trained it, and how long.
        out[rel] = meta
    return out

  expected, actual = tree(tmp_path / "a"), tree(base)
  assert expected.keys() == actual.keys()
  assert any(key.endswith("weights_best.npz:hidden_1_activation/alpha") for key in expected)
  for key in expected:
    assert actual[key] == expected[key], key


@pytest.mark.parametrize("changes,message", [
    (dict(relu_sparsity=1.0), "--relu_sparsity"),
    (dict(relu_sparsity=None, relu_count=0.5), "--relu_count"),  # 500 > 400 ReLUs.
    (dict(relu_count=0.1), "--relu_count"),  # Both given.
    (dict(model="lenet5"), "--model"),
    (dict(pretrained_run="/nonexistent"), "--pretrained_run"),
    (dict(pretrained_run=None), "--pretrained_run"),
    (dict(mask_epochs=0.0), "--mask_epochs"),
])
def test_bad_relu_prune_settings_name_the_flag(digits, baseline, tmp_path, changes, message):
  hp = Hparams(**{**PRUNE, "pretrained_run": baseline, **changes})
  with pytest.raises(ValueError, match=message):
    Runner(hp, digits, str(tmp_path), progress=False)


def test_bad_relu_prune_input_fails_in_one_line(baseline, tmp_path):
  result = run_cli("--dataset=sklearn_digits", "--experiment=relu_prune",
                   "--noprogress", f"--pretrained_run={baseline}", "--relu_count=0.5",
                   f"--base_dir={tmp_path}")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "--relu_count" in errors[0], result.stderr[-1000:]


def test_pareto_front_keeps_only_unbeaten_points():
  import pandas as pd
  from robust_sparse.analysis import relu
  frame = pd.DataFrame({
      "run_dir": list("abcde"), "variant": ["v"] * 5, "target": ["t"] * 5,
      "relu_count": [100, 200, 300, 300, 400], "relu_density": [0.1, 0.2, 0.3, 0.3, 0.4],
      "acc": [0.80, 0.79, 0.85, 0.84, 0.85], "adv_acc": [0.1] * 5})
  front = relu.pareto_front(frame)
  assert list(front["run_dir"]) == ["a", "c"]


def test_analysis_draws_accuracy_against_relu_count(digits, baseline, tmp_path):
  from robust_sparse.analysis import load, relu, report
  hp = Hparams(**{**PRUNE, "epochs": 0.0}, pretrained_run=baseline)
  run_dir = Runner(hp, digits, str(tmp_path / "runs"), progress=False).run()
  assert not os.path.exists(level_dir(run_dir, 0, 1))  # --epochs=0: the mask phase only.
  study = load.load_study(str(tmp_path / "runs"))
  frame = relu.points(study)
  meta = files.read_json(os.path.join(level_dir(run_dir, 0, 0), "metadata.json"))
  [point] = frame.to_dict("records")
  assert point["relu_count"] == meta["relu_count"] and point["prune_iteration"] == 0
  test_rows = open(os.path.join(level_dir(run_dir, 0, 0), "test.csv")).read().splitlines()
  assert point["acc"] == pytest.approx(float(test_rows[-1].split(",")[2]))
  path = report.write_analysis(study, str(tmp_path / "analysis"))
  text = open(path).read()
  assert "ReLU reduction" in text and f"| {meta['relu_count']:,} |" in text
  assert os.path.exists(tmp_path / "analysis" / "figures" /
                        "sklearn_digits_dense-300-100_relu.png")
