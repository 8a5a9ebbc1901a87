"""`--measure=activation_sparsity,...` in the runner: fed from the training step, equal to
direct counts and to `tf.GradientTape` on the batches it trained on."""

import csv
import os

import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.data import load_dataset
from robust_sparse.experiments.runner import Runner, derived_seed, level_dir
from robust_sparse.measure import activation_stats
from robust_sparse.training import steps
from robust_sparse.training.engine import index_stream
from robust_sparse.core.hparams import Hparams

LAYERS = ("hidden_1_activation", "hidden_2_activation")


def _row(run_dir, iteration):
  with open(os.path.join(level_dir(run_dir, 0, 0), "train.csv")) as f:
    rows = list(csv.DictReader(f))
  [row] = [r for r in rows if int(float(r["iteration"])) == iteration]
  return {key: float(value) for key, value in row.items()}


def test_logged_activation_measurements_equal_direct_computation(tmp_path):
  digits = load_dataset("sklearn_digits", None, 300)
  hp = Hparams(dataset="sklearn_digits", model="dense-300-100", experiment="train", trials=1,
               train_iters=20, eval_every=10, batch_size=60, learning_rate=0.0,
               measure=("saturation", "activation_sparsity", "effective_gradient_sparsity",
                        "spectral_increase"),
               log_every=3, attack="fgsm", eps=0.1, sharpness_examples=0)
  run_dir = Runner(hp, digits, str(tmp_path), progress=False).run()
  second = _row(run_dir, 20)
  # Saturation is still there, beside the new columns.
  assert 0.0 < second["train-saturation_hidden_1"] <= 1.0
  assert "eval-effective_gradient_sparsity_1e-09_average" not in second

  # Learning rate 0: the weights stay at their initial values. Iterations 10-19
  # were measured every third step counted from the evaluation at 10.
  network = Runner(hp, digits, str(tmp_path / "rebuild"), progress=False).build(0, 0)
  weights = np.load(os.path.join(level_dir(run_dir, 0, 0), "weights_final.npz"))
  for variable in network.variables:
    variable.assign(weights[variable.path])
  stream = index_stream(len(digits.x_train), 60, derived_seed(hp.seed, 0, "data"), 10,
                        whole_epochs=True)  # The training order (`Engine.batches`).
  batches = [b.numpy() for b, _ in zip(stream, range(10))][::3]
  tap = activation_stats.ActivationTap(network)
  assert tap.names == list(LAYERS)
  loss = steps.cross_entropy(digits.num_classes, hp.label_smoothing)
  inputs, outputs, gradients = [[[] for _ in LAYERS] for _ in range(3)]
  for indices in batches:
    x = tf.constant(digits.x_train[indices])
    y = tf.constant(digits.y_train[indices], tf.int32)
    with tf.GradientTape() as tape:
      logits, pre, post = tap(x, training=True)
      objective = tf.reduce_mean(loss(x, y, logits))
    for layer, (a, g) in enumerate(zip(post, tape.gradient(objective, post))):
      inputs[layer].append(pre[layer].numpy())
      outputs[layer].append(a.numpy())
      gradients[layer].append(g.numpy())
  _, _, test_post = tap(tf.constant(digits.x_test), training=False)

  for layer, name in enumerate(LAYERS):
    x = np.concatenate(inputs[layer])
    a = np.concatenate(outputs[layer])
    g = np.concatenate(gradients[layer])
    assert a.shape[0] == 4 * 60
    # ReLU: zero region |a| <= 1e-6, x-habitat x <= 0, f'(x) = 1[x > 0].
    assert second[f"train-activation_sparsity_{name}"] == (
        np.count_nonzero(np.abs(a) <= 1e-6) / a.size)
    concentrated = np.count_nonzero(x <= 0) / x.size
    assert second[f"train-pre_activation_concentration_{name}"] == concentrated
    assert second[f"train-mean_squared_derivative_{name}"] == pytest.approx(1.0 - concentrated)
    eta = np.abs(g * (x > 0))
    for p in ("1e-09", "1e-06", "0.001"):
      expected = np.count_nonzero(eta < float(p)) / eta.size
      assert second[f"train-effective_gradient_sparsity_{p}_{name}"] == expected, p
    assert second[f"train-spectral_increase_M_{name}"] == pytest.approx(
        np.mean(np.sum(g.astype(np.float64) ** 2, -1)), rel=1e-5)
    kernel = network.get_layer(name.replace("_activation", "")).masked_kernel.numpy()
    assert second[f"train-spectral_increase_kkT_{name}"] == pytest.approx(
        np.sum(kernel.astype(np.float64) ** 2), rel=1e-6)
    test_a = test_post[layer].numpy()
    assert second[f"eval-activation_sparsity_{name}"] == (
        np.count_nonzero(np.abs(test_a) <= 1e-6) / test_a.size)
  for metric in ("activation_sparsity", "effective_gradient_sparsity_1e-06"):
    assert second[f"train-{metric}_average"] == pytest.approx(
        np.mean([second[f"train-{metric}_{name}"] for name in LAYERS]))


def test_bad_activation_measure_settings_name_the_flag(tmp_path):
  digits = load_dataset("sklearn_digits", None, 300)
  with pytest.raises(ValueError, match="--measure=activation_sparsity,sparsity: unknown "
                     "sparsity; known: saturation, activation_sparsity"):
    Runner(Hparams(dataset="sklearn_digits", measure=("activation_sparsity", "sparsity")),
           digits, str(tmp_path))
  with pytest.raises(ValueError, match="--log_every"):
    Runner(Hparams(dataset="sklearn_digits", measure=("activation_sparsity",), log_every=0),
           digits, str(tmp_path))
