"""`--measure=saturation` in the runner: fed from the training step, equal to NumPy, resumable."""

import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.data import load_dataset
from robust_sparse.experiments.runner import Runner, derived_seed, level_dir
from robust_sparse.measure import saturation
from robust_sparse.training.engine import index_stream
from robust_sparse.core.hparams import Hparams


def _expected(layer_outputs, delta=0.99, rule="delve"):
  centred = layer_outputs - layer_outputs.mean(0)
  covariance = centred.T @ centred / len(layer_outputs)
  k = saturation.intrinsic_dimensionality(np.linalg.eigvalsh(covariance), delta, rule)
  return k / layer_outputs.shape[1], k


@pytest.mark.parametrize("rule", ["delve", "intended"])
def test_runner_saturation_equals_numpy_on_the_batches_it_trained_on(tmp_path, rule):
  digits = load_dataset("sklearn_digits", None, 300)
  hp = Hparams(dataset="sklearn_digits", model="dense-300-100", experiment="train", trials=1,
               train_iters=20, eval_every=10, batch_size=60, learning_rate=0.0,
               measure=("saturation",), attack="fgsm", adv_train=True, eps=0.1,
               sharpness_examples=0, saturation_rule=rule)
  run_dir = Runner(hp, digits, str(tmp_path), progress=False).run()
  rows = open(os.path.join(level_dir(run_dir, 0, 0), "train.csv")).read().splitlines()
  header = rows[0].split(",")
  second = dict(zip(header, map(float, rows[2].split(","))))
  # Learning rate 0: the weights stay at their initial values, so the taps are
  # the initial network's layer outputs on the batches of iterations 10-19.
  network = Runner(hp, digits, str(tmp_path / "rebuild"), progress=False).build(0, 0)
  weights = np.load(os.path.join(level_dir(run_dir, 0, 0), "weights_final.npz"))
  for variable in network.variables:
    variable.assign(weights[variable.path])
  stream = index_stream(len(digits.x_train), 60, derived_seed(hp.seed, 0, "data"), 10)
  indices = np.concatenate([b.numpy() for b, _ in zip(stream, range(10))])
  taps = saturation.tap_model(network)
  train_outputs = taps(tf.constant(digits.x_train[indices]), training=True)[1:]
  test_outputs = taps(tf.constant(digits.x_test), training=False)[1:]
  for name, train, test in zip(["hidden_1", "hidden_2", "output"], train_outputs,
                               test_outputs):
    value, k = _expected(np.asarray(train, np.float64), rule=rule)
    assert second[f"train-saturation_{name}"] == pytest.approx(value)
    assert second[f"train-intrinsic-dimensionality_{name}"] == k
    value, k = _expected(np.asarray(test, np.float64), rule=rule)
    assert second[f"eval-saturation_{name}"] == pytest.approx(value)


def test_measurements_compose_the_registered_families_by_their_declared_taps(monkeypatch):
  from robust_sparse.core.registry import Registry
  from robust_sparse.measure import activation_stats, measurements, registry
  from robust_sparse.models import build_model

  fed = {}

  class Logits(registry.Measurement):
    """Taps the logits' producer (the last dense layer) and asks for its gradient."""

    def __init__(self, model, chosen, options):
      del chosen, options
      self.taps = [model.get_layer("hidden_2").output, model.get_layer("output").output]
      self.gradient_taps = (1,)

    def update(self, taps, gradients, split):
      fed[split] = (len(taps), None if gradients is None else len(gradients))

    def columns(self):
      return ["logits_tapped"]

    def results(self):
      return {"logits_tapped": 1.0}

    def reset(self):
      pass

  fresh = Registry("measurement")
  fresh.register("saturation")(saturation.Saturation)
  fresh.register("activation")(activation_stats.Activation)
  fresh.register("logits")(Logits)
  monkeypatch.setattr(registry, "MEASUREMENTS", fresh)
  assert registry.known() == ("saturation", "activation_sparsity",
                              "effective_gradient_sparsity", "spectral_increase", "logits")
  network = build_model("dense-300-100", (64,), 10)
  m = measurements.Measurements(network, ["logits", "spectral_increase", "saturation"])
  assert list(m.parts) == ["saturation", "activation", "logits"]
  # 3 saturation taps, 2 + 2 activation inputs / outputs, then the 2 of `logits`.
  assert len(m.tap_model.outputs) == 1 + 3 + 4 + 2
  assert m.tap_model.gradient_taps == (5, 6, 8)
  assert m.columns()[-1] == "logits_tapped" and m.results()["logits_tapped"] == 1.0
  x = tf.zeros([4, 64])
  outputs = m.tap_model(x, training=False)[1:]
  m.update(outputs, "eval")
  assert fed["eval"] == (2, None)
  m.update(outputs + [tf.zeros_like(outputs[i]) for i in m.tap_model.gradient_taps], "train")
  assert fed["train"] == (2, 1)
  with pytest.raises(ValueError, match="need the gradients at 3 taps"):
    m.update(outputs, "train")


def test_bad_measure_settings_name_the_flag(tmp_path):
  digits = load_dataset("sklearn_digits", None, 300)
  with pytest.raises(ValueError, match="--measure"):
    Runner(Hparams(dataset="sklearn_digits", measure=("curvature",)), digits, str(tmp_path))
  with pytest.raises(ValueError, match="delta"):
    Runner(Hparams(dataset="sklearn_digits", delta=0.0), digits, str(tmp_path))


def test_probes_receptive_fields_and_the_layer_figures(tmp_path):
  from robust_sparse.analysis import load, report
  digits = load_dataset("sklearn_digits", None, 300)
  common = dict(dataset="sklearn_digits", model="conv-bn", trials=1, batch_size=32,
                attack="fgsm", eps=0.1, sharpness_examples=0)
  training = Runner(Hparams(**common, experiment="train", epochs=2.0, measure=("saturation",),
                           probes=True, probe_jobs=1, pixelwise_probes=True,
                           phd_lab_csv=True), digits, str(tmp_path), progress=False)
  trained = training.run()
  assert training.summary.startswith("4x4 probe of train-output")
  probes = Runner(Hparams(**common, experiment="probes", pretrained_run=trained, probe_jobs=1,
                          probe_pool=(2.0,)), digits, str(tmp_path), progress=False)
  probes.run()
  table = open(os.path.join(probes.run_dir, "2x2_probe_performances.csv")).read().splitlines()
  assert table[0] == ";name;train_acc;eval_acc"
  assert [line.split(";")[1] for line in table[1:]] == ["train-conv_1", "train-conv_2",
                                                         "train-output"]
  assert os.path.exists(os.path.join(trained, "4x4_probe_performances.csv"))
  pixelwise = open(os.path.join(trained, "pixelwise_probe_performances.csv")).read()
  assert "train-conv_1-(7,7)" in pixelwise and "train-output" in pixelwise
  [seed_csv] = glob.glob(os.path.join(level_dir(trained, 0, 0), "conv-bn-*.csv"))
  assert os.path.basename(seed_csv) == "conv-bn-sklearn_digits-r8-bs32-e2.csv"
  lines = open(seed_csv).read().splitlines()
  assert lines[0].startswith(";training_accuracy;training_top5-accuracy;training_loss;"
                             "test_accuracy;test_top5-accuracy;test_loss;train-saturation_conv_1")
  assert len(lines) == 3
  fields = Runner(Hparams(**common, experiment="receptive_field"), digits, str(tmp_path),
                  progress=False)
  fields.run()
  rows = open(os.path.join(fields.run_dir, "receptive_field.csv")).read().splitlines()
  assert [row.split(";")[-1] for row in rows[1:]] == ["3.0", "5.0"]
  with open(os.path.join(fields.run_dir, "computational_info.json")) as f:
    info = json.load(f)
  # phd-lab counts its loader's batches x the batch size, 30 epochs unless set.
  assert info["n_samples"] == -(-fields.num_train // 32) * 32 != fields.num_train
  assert info["total flops"] == info["macs"] * 2 * 3 * info["n_samples"] * 30
  with open(os.path.join(trained, "probes.json")) as f:
    assert json.load(f)["batch_size"] == 32  # The training loader's, as phd-lab.
  study = load.load_study(str(tmp_path))
  report.write_analysis(study, str(tmp_path / "analysis"), source=str(tmp_path))
  figures = tmp_path / "analysis" / "figures"
  assert (figures / "sklearn_digits_conv-bn_saturation.png").exists()
  assert (figures / "sklearn_digits_conv-bn_layers.png").exists()
  assert (figures / "sklearn_digits_conv-bn_pixelwise_probes.png").exists()
  assert "no probes run found" not in (tmp_path / "analysis" / "report.md").read_text()


BAD_GRID_FLAGS = [
    (["--config=experiments/configs/reduced_fig1.json"], "--run_id"),
    (["--run_id=x"], "--config"),
    (["--config=/nonexistent.json", "--run_id=x"], "nonexistent.json"),
]


def test_bad_grid_flags_fail_in_one_line(tmp_path):
  from tests.conftest import one_line_error, run_cli_batch
  results = run_cli_batch([[*args, f"--base_dir={tmp_path}"] for args, _ in BAD_GRID_FLAGS])
  for (args, message), (status, stderr) in zip(BAD_GRID_FLAGS, results.values()):
    one_line_error(status, stderr, message)
