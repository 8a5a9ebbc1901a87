"""SAM and ASAM as a wrapper of the step library: closed forms, masks, BN statistics, CLI."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from robust_sparse.models import build_model
from robust_sparse.nn.layers import MaskedDense, masked_layers
from robust_sparse.training.optimizers import make_optimizer, split_optimizer
from robust_sparse.training.sharpness.sam import (_merge, _split, is_asam_weight, perturbation,
                                    sharpness_aware)
from robust_sparse.training.steps import (OptimizerGroup, cross_entropy, loss_and_gradients,
                                 make_train_step)
from tests.conftest import one_line_error, run_cli, run_cli_batch

CURVATURE = np.array([[1.0], [3.0]], np.float32)


def _quadratic_model(w):
  """A 2-weight model (one [2, 1] masked kernel) and the loss 0.5 * sum(A * w^2)."""
  inputs = keras.Input((2,))
  layer = MaskedDense(1, use_bias=False, name="w")
  model = keras.Model(inputs, layer(inputs))
  layer.raw_kernel.assign(np.array(w, np.float32).reshape(2, 1))

  def inner(trainable, non_trainable, batch):
    del batch
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      objective = 0.5 * tf.reduce_sum(CURVATURE * tf.square(trainable[0]))
    grads = tape.gradient(objective, trainable)
    return grads, non_trainable, dict(objective=objective, logits=tf.zeros([1, 2]),
                                      per_example=tf.reshape(objective, [1]))

  return model, layer, inner


def _one_sgd_step(model, fn, lr):
  step = make_train_step(model, fn, [OptimizerGroup("weights", make_optimizer("sgd", lr))])
  step(tf.zeros([1, 2]), tf.zeros([1], tf.int32), tf.constant(0, tf.int64),
       tf.constant(0, tf.int64))


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_one_step_on_a_quadratic_equals_the_hand_computed_value(adaptive):
  w, rho, eta, lr = np.array([[0.5], [-2.0]]), 0.1, 0.01, 0.2
  model, layer, inner = _quadratic_model(w)
  _one_sgd_step(model, sharpness_aware(inner, model, rho=rho, adaptive=adaptive, eta=eta), lr)
  g = CURVATURE * w
  t = np.abs(w) + eta if adaptive else np.ones_like(w)
  e = rho * t ** 2 * g / np.linalg.norm(t * g)
  expected = w - lr * CURVATURE * (w + e)
  np.testing.assert_allclose(layer.raw_kernel.numpy(), expected, rtol=0, atol=1e-6)
  # Not the plain step: the perturbation matters.
  assert np.abs(expected - (w - lr * g)).max() > 1e-3


def test_pruned_weights_get_no_perturbation_and_stay_zero():
  w = np.array([[0.5], [-2.0]])
  model, layer, inner = _quadratic_model(w)
  layer.mask.assign(np.array([[1.0], [0.0]], np.float32))
  layer.raw_kernel.assign(layer.raw_kernel * layer.mask)
  e = perturbation([layer.raw_kernel.value], [tf.constant(CURVATURE * w, tf.float32)],
                   rho=0.1, masks=[layer.mask.value])[0].numpy()
  assert e[1, 0] == 0.0 and e[0, 0] == pytest.approx(0.1)  # ||e|| = rho over live weights.
  _one_sgd_step(model, sharpness_aware(inner, model, rho=0.1), 0.2)
  kernel = layer.raw_kernel.numpy()
  assert kernel[1, 0] == 0.0
  np.testing.assert_allclose(kernel[0, 0], 0.5 - 0.2 * 1.0 * (0.5 + 0.1), atol=1e-6)


def _bn_model():
  keras.utils.set_random_seed(3)
  return build_model("conv-bn", (8, 8, 3), 10)


def _images(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return (tf.constant(rng.random((n, 8, 8, 3)), tf.float32),
          tf.constant(rng.integers(0, 10, n), tf.int32))


@pytest.mark.parametrize("bn_stats", ["first", "second", "both"])
def test_batch_norm_statistics_come_from_the_requested_pass(bn_stats):
  model = _bn_model()
  x, y = _images()
  trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
  base = loss_and_gradients(model, cross_entropy(10))
  batch = dict(x=x, y=y, weight=tf.fill([8], 1 / 8), seed=tf.constant([0, 0], tf.int64))
  grads, clean, _ = base(trainable, non_trainable, batch)
  e = perturbation(trainable, grads, rho=0.5)
  perturbed = [w + d for w, d in zip(trainable, e)]
  start = clean if bn_stats == "both" else non_trainable
  _, second, _ = base(perturbed, start, batch)
  expected = clean if bn_stats == "first" else second
  _, kept, _ = sharpness_aware(base, model, rho=0.5, bn_stats=bn_stats)(
      trainable, non_trainable, batch)
  paths = [v.path for v in model.non_trainable_variables]
  moving = [i for i, p in enumerate(paths) if "moving_mean" in p]
  assert moving
  for i in moving:
    np.testing.assert_allclose(kept[i].numpy(), expected[i].numpy(), atol=1e-7,
                               err_msg=paths[i])
  # The two passes do give different statistics, so the choice is observable.
  assert any(np.abs(clean[i].numpy() - second[i].numpy()).max() > 1e-6 for i in moving)


def test_m_sharpness_averages_the_splits_own_sam_gradients():
  model = _bn_model()
  x, y = _images(n=8)
  trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
  base = loss_and_gradients(model, cross_entropy(10))
  weight = tf.fill([8], 1 / 8)
  seed = tf.constant([0, 0], tf.int64)
  split_grads, _, aux = sharpness_aware(base, model, rho=0.2, batch_splits=2)(
      trainable, non_trainable, dict(x=x, y=y, weight=weight, seed=seed))
  sam = sharpness_aware(base, model, rho=0.2)
  state, expected = non_trainable, None
  for i in range(2):
    grads, state, _ = sam(trainable, state, dict(x=x[i::2], y=y[i::2], weight=weight[i::2],
                                                 seed=seed))
    expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
  for got, want in zip(split_grads, expected):
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6)
  assert aux["logits"].shape == (8, 10)
  values = tf.range(12)
  np.testing.assert_array_equal(_merge(_split(values, 3)).numpy(), values.numpy())


def test_split_optimizer_names():
  assert split_optimizer("sam-sgd") == ("sam", "sgd")
  assert split_optimizer("asam-adam") == ("asam", "adam")
  assert split_optimizer("sgd") == (None, "sgd")
  with pytest.raises(ValueError, match="--optimizer=ssam-sgd: unknown perturbation"):
    split_optimizer("ssam-sgd")
  with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
    split_optimizer("sam-rmsprop")


def test_the_sam_family_registry_says_what_build_decided_by_name():
  from robust_sparse.core.hparams import Hparams
  from robust_sparse.training.sharpness import PERTURBATIONS
  from robust_sparse.training.sharpness.sparse_perturbation import PerturbationMasks

  assert PERTURBATIONS.names() == ["asam", "sam", "ssamd", "ssamf"]
  methods = {name: PERTURBATIONS.get(name)() for name in PERTURBATIONS.names()}
  assert [n for n, m in methods.items() if m.adaptive] == ["asam"]
  assert [n for n, m in methods.items() if m.implicit] == ["asam", "sam"]
  plain, implicit = Hparams(), Hparams(implicit=True, pattern="structured")
  assert [n for n, m in methods.items() if m.has_masks(plain)] == ["ssamd", "ssamf"]
  assert [n for n, m in methods.items() if m.has_masks(implicit)] == [
      "asam", "sam", "ssamd", "ssamf"]

  class Masks(PerturbationMasks):

    def __init__(self):  # pylint: disable=super-init-not-called
      pass

  masks = Masks()
  options = methods["ssamf"].options(plain, masks)
  assert options["mask_fn"] == masks.values and options["implicit_mask_fn"] is None
  options = methods["sam"].options(implicit, masks)
  assert options["mask_fn"] is None and options["implicit_mask_fn"] == masks.values
  assert methods["asam"].options(plain, None)["adaptive"]
  assert methods["sam"].options(plain, None) == dict(
      rho=0.05, adaptive=False, eta=0.01, asam_rule="official", ssam_norm="full",
      bn_stats="first", batch_splits=1, mask_fn=None, implicit_mask_fn=None, sync=False)
  with pytest.raises(ValueError, match="--implicit needs a mask: --pattern=structured or nm"):
    methods["sam"].check(Hparams(implicit=True))
  with pytest.raises(ValueError, match="--pattern=nm needs --n_structured"):
    methods["ssamf"].check(Hparams(pattern="nm"))
  methods["ssamd"].check(Hparams(pattern="nm"))  # SSAM-D has no pattern.


def test_lottery_ticket_with_sam_adam_and_adversarial_training_end_to_end(tmp_path, data_dir):
  from robust_sparse.experiments.runner import level_dir
  result = run_cli(
      "--dataset=digits", f"--data_dir={data_dir}",
      "--experiment=reinit_orig", "--optimizer=sam-adam", "--adv_train", "--attack=fgsm",
      "--train_examples=600", "--valid_size=200", "--train_iters=40", "--eval_every=20",
      "--prune_iters=1", "--trials=1", "--noprogress", f"--base_dir={tmp_path}",
      # Not asserted here, and dearer than the training: sharpness on 1000 images at every
      # evaluation and the end-of-level gradient-masking checks.
      "--sharpness_examples=0", "--nomasking_checks")
  assert result.returncode == 0, result.stderr[-2000:]
  run_dir = result.stdout.strip().splitlines()[-1]
  pruned = level_dir(run_dir, 0, 1)
  assert json.load(open(os.path.join(pruned, "metadata.json")))["completed"]
  for name in ("hidden_1", "hidden_2", "output"):
    mask = np.load(os.path.join(pruned, "masks", f"{name}.npy"))
    kernel = np.load(os.path.join(pruned, "post_kernels", f"{name}.npy"))
    assert 0 < mask.mean() < 1
    assert np.all(kernel[mask == 0] == 0.0), name
    assert np.any(kernel[mask == 1] != 0.0), name


BAD_SHARPNESS_FLAGS = [
    (["--optimizer=sam-sgd", "--rho=0"], "--rho"),
    (["--optimizer=ssam-sgd"], "--optimizer"),
    (["--optimizer=sam-sgd", "--sam_batch_splits=7"], "--sam_batch_splits"),
    (["--optimizer=ssamf-sgd", "--sparsity=1"], "--sparsity"),
    (["--optimizer=sgd", "--implicit", "--pattern=nm"], "--implicit"),
    (["--optimizer=sam-sgd", "--implicit"], "--pattern"),
    (["--optimizer=ssamf-sgd", "--pattern=nm", "--n_structured=2"], "--m_structured"),
    (["--optimizer=ssamf-sgd", "--pattern=nm", "--n_structured=4", "--m_structured=2"],
     "--n_structured"),
    (["--optimizer=asam-sgd", "--asam_rule=adaptive"], "--asam_rule"),
    (["--optimizer=ssamf-sgd", "--ssam_norm=l2"], "--ssam_norm"),
]


@pytest.fixture(scope="module")
def bad_sharpness_flags_results(tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_flags")
  prefix = ["--dataset=sklearn_digits", "--train_iters=5", "--noprogress"]
  return run_cli_batch([[*prefix, *args, f"--base_dir={base}"] for args, _ in BAD_SHARPNESS_FLAGS])


@pytest.mark.parametrize("args,message", BAD_SHARPNESS_FLAGS)
def test_bad_sharpness_flags_fail_in_one_line(bad_sharpness_flags_results, args, message):
  [(status, stderr)] = [outcome for argv, outcome in bad_sharpness_flags_results.items()
                        if list(argv[3:-1]) == args]
  one_line_error(status, stderr, message)


def test_masked_layers_helper_sees_the_quadratic_kernel():
  model, layer, _ = _quadratic_model([[1.0], [1.0]])
  assert masked_layers(model) == [layer]


def test_measured_sharpness_equals_its_definition_and_changes_nothing():
  from robust_sparse.training.sharpness.sam import measure_sharpness
  model = _bn_model()
  layer = masked_layers(model)[0]
  mask = (np.random.default_rng(1).random(layer.mask.shape) > 0.5).astype(np.float32)
  layer.mask.assign(mask)
  layer.raw_kernel.assign(layer.raw_kernel * mask)
  x, y = _images(n=12, seed=4)
  before = [v.numpy().copy() for v in model.variables]
  got = measure_sharpness(model, x, y, rho=0.5, batch_size=4)

  def loss(values, xb, yb):
    state = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
    logits, _ = model.stateless_call(values, state, xb, training=False)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=yb,
                                                                         logits=logits))

  def sharp(xb, yb):
    w = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    with tf.GradientTape() as tape:
      tape.watch(w)
      base = loss(w, xb, yb)
    grads = tape.gradient(base, w)
    masks = [layer.mask.value if v is layer.raw_kernel else None
             for v in model.trainable_variables]
    grads = [g if m is None else g * m for g, m in zip(grads, masks)]
    norm = tf.sqrt(tf.add_n([tf.reduce_sum(g * g) for g in grads]))
    return float(loss([a + 0.5 * g / norm for a, g in zip(w, grads)], xb, yb) - base)

  assert float(got["sharpness"]) == pytest.approx(sharp(x, y), abs=1e-5)
  m_expected = np.mean([sharp(x[i:i + 4], y[i:i + 4]) for i in (0, 4, 8)])
  assert float(got["m_sharpness"]) == pytest.approx(m_expected, abs=1e-5)
  assert float(got["sharpness"]) > 0
  for variable, value in zip(model.variables, before):
    np.testing.assert_array_equal(variable.numpy(), value)


def test_ssam_masks_refresh_after_each_due_epochs_first_step_and_are_checkpointed():
  from robust_sparse.training.engine import Engine
  from robust_sparse.training.sharpness.sparse_perturbation import DynamicMasks, FisherMasks
  model = _bn_model()
  fisher = FisherMasks(model, cross_entropy(10), augment=None, num_samples=4, sparsity=0.5,
                       pattern="unstructured", update_freq=2)
  assert fisher.refresh_points(total_iterations=50, steps_per_epoch=10) == [1, 21, 41]
  fisher.initialize(0)
  assert fisher.lived_weight() == 0.0  # SSAM-F starts as plain SGD (spec 4.2).
  x, y = _images(n=4)
  fisher.refresh(0, 0, lambda kind, count, epoch: (x[:count], y[:count]))
  assert fisher.lived_weight() == pytest.approx(0.5, abs=1e-3)
  dynamic = DynamicMasks(model, lambda x, y: None, sparsity=0.3, epochs=3)
  dynamic.initialize(5)
  assert dynamic.lived_weight() == pytest.approx(0.7, abs=1e-3)
  engine = Engine(model, loss_and_gradients(model, cross_entropy(10)),
                  [OptimizerGroup("weights", make_optimizer("sgd", 0.1))],
                  x_train=np.zeros((8, 8, 8, 3), np.float32), y_train=np.zeros(8, np.int64),
                  batch_size=4, attack=None, extra_state=fisher.variables)
  state = engine.get_state()
  names = [n for n in state if n.startswith("engine/perturbation_mask/")]
  assert len(names) == len(model.trainable_variables)
  saved = {n: state[n].copy() for n in names}
  fisher.initialize(0)
  engine.set_state(state)
  for name in names:
    np.testing.assert_array_equal(engine.get_state()[name], saved[name])


@pytest.mark.parametrize("optimizer", [dict(optimizer="ssamf-sgd"), dict(optimizer="ssamd-sgd"),
                                       dict(optimizer="sam-sgd", implicit=True,
                                            pattern="structured")],
                         ids=["ssamf", "ssamd", "implicit"])
def test_ssam_runs_end_to_end_and_logs_the_live_fraction(tmp_path, optimizer):
  import pandas as pd
  from robust_sparse.data import load_dataset
  from robust_sparse.experiments.runner import Runner
  from robust_sparse.core.hparams import Hparams
  hp = Hparams(dataset="sklearn_digits", model="lenet5", experiment="train", **optimizer,
               epochs=2.0, batch_size=50, train_examples=200, num_samples=16, update_freq=1,
               sparsity=0.5, sharpness_examples=100, trials=1)
  run_dir = Runner(hp, load_dataset("sklearn_digits", None, 300), str(tmp_path),
                   progress=False).run()
  train = pd.read_csv(os.path.join(run_dir, "trial_0", "prune_iter_0", "train.csv"))
  if optimizer.get("pattern") == "structured":  # Whole tensors: the last may overshoot.
    assert (train["mask_lived_weight"] >= 0.5).all() and (train["mask_lived_weight"] < 1).all()
  else:
    assert list(train["mask_lived_weight"].round(3)) == [0.5, 0.5]
  assert np.isfinite(train["sharpness"]).all() and np.isfinite(train["m_sharpness"]).all()


def test_implicit_ascent_masks_the_input_gradient_but_not_the_output():
  from robust_sparse.nn.layers import implicit_backprop
  keras.utils.set_random_seed(0)
  inputs = keras.Input((4,))
  hidden = MaskedDense(3, use_bias=False, name="a")(inputs)
  model = keras.Model(inputs, MaskedDense(2, use_bias=False, name="b")(hidden))
  x = tf.constant(np.random.default_rng(0).random((5, 4)), tf.float32)
  mask = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

  def grads(masks):
    with tf.GradientTape() as tape:
      tape.watch(x)
      with implicit_backprop(masks):
        out = model(x)
      loss = tf.reduce_sum(out * tf.constant([[1.0, -2.0]]))
    return out, tape.gradient(loss, [x] + model.trainable_variables)

  dense_out, dense = grads({})
  out, implicit = grads({"b": mask})
  np.testing.assert_allclose(out.numpy(), dense_out.numpy())
  np.testing.assert_allclose(implicit[2].numpy(), dense[2].numpy())  # b's own gradient: dense.
  b = model.get_layer("b").kernel.numpy()
  a = model.get_layer("a").kernel.numpy()
  upstream = np.tile([[1.0, -2.0]], (5, 1))
  np.testing.assert_allclose(implicit[0].numpy(), upstream @ (b * mask.numpy()).T @ a.T,
                             rtol=1e-5)
  assert np.abs(implicit[0].numpy() - dense[0].numpy()).max() > 1e-4


# ---- the originals' rules (issue 23) ---------------------------------------------------------
def test_ssam_perturbation_divides_by_the_full_gradient_norm():
  rng = np.random.default_rng(0)
  weights = [tf.constant(rng.normal(size=s), tf.float32) for s in [(6, 4), (4,)]]
  grads = [tf.constant(rng.normal(size=w.shape), tf.float32) for w in weights]
  sparse = [tf.constant((rng.random(w.shape) < 0.5).astype(np.float32)) for w in weights]
  e = perturbation(weights, grads, rho=0.3, sparse_masks=sparse)
  norm = np.sqrt(sum(float(np.sum(g.numpy() ** 2)) for g in grads))
  for got, g, m in zip(e, grads, sparse):  # Mi-Peng's first_step: m * rho g / (||g|| + 1e-7).
    np.testing.assert_allclose(got.numpy(), m.numpy() * 0.3 * g.numpy() / (norm + 1e-7),
                               rtol=1e-6, atol=1e-8)
  length = np.sqrt(sum(float(np.sum(d.numpy() ** 2)) for d in e))
  assert 0.1 < length < 0.29  # ||e|| < rho with a random half of the entries.
  masked = perturbation(weights, grads, rho=0.3, sparse_masks=sparse, sparse_norm="masked")
  assert np.sqrt(sum(float(np.sum(d.numpy() ** 2)) for d in masked)) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="--ssam_norm"):
    perturbation(weights, grads, rho=0.3, sparse_norm="l1")


def test_asam_official_rule_scales_kernels_and_gamma_and_davda54_every_weight():
  model = _bn_model()
  kinds = {v.path.split("/")[-1]: is_asam_weight(v) for v in model.trainable_variables}
  assert kinds == {"kernel": True, "gamma": True, "beta": False, "bias": False}
  rng = np.random.default_rng(1)
  weights = [tf.constant(rng.normal(size=v.shape), tf.float32)
             for v in model.trainable_variables]
  grads = [tf.constant(rng.normal(size=w.shape), tf.float32) for w in weights]
  scaled = [is_asam_weight(v) for v in model.trainable_variables]
  rho, eta = 0.5, 0.01
  t = [np.abs(w.numpy()) + eta if s else np.ones(w.shape) for w, s in zip(weights, scaled)]
  norm = np.sqrt(sum(np.sum((ti * g.numpy()) ** 2) for ti, g in zip(t, grads)))
  official = perturbation(weights, grads, rho=rho, adaptive=True, eta=eta,
                          asam_weights=scaled)
  for got, ti, g in zip(official, t, grads):  # SamsungLabs/ASAM.
    np.testing.assert_allclose(got.numpy(), rho * ti ** 2 * g.numpy() / norm, rtol=1e-5,
                               atol=1e-8)
  norm = np.sqrt(sum(np.sum((np.abs(w.numpy()) * g.numpy()) ** 2)
                     for w, g in zip(weights, grads)))
  davda54 = perturbation(weights, grads, rho=rho, adaptive=True, eta=eta, asam_rule="davda54",
                         asam_weights=scaled)
  for got, w, g in zip(davda54, weights, grads):  # davda54/sam adaptive=True: T = |w|.
    np.testing.assert_allclose(got.numpy(), rho * w.numpy() ** 2 * g.numpy() / norm,
                               rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="--asam_rule"):
    sharpness_aware(None, model, adaptive=True, asam_rule="adaptive")


def _conv_dense_model():
  from robust_sparse.nn.layers import MaskedConv2D
  keras.utils.set_random_seed(4)
  inputs = keras.Input((5, 5, 2))
  x = MaskedConv2D(3, 3, padding="same", name="conv1")(inputs)
  x = keras.layers.ReLU()(x)
  x = MaskedConv2D(3, 3, padding="same", name="conv2")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Flatten()(x)
  x = MaskedDense(4, name="hidden")(x)
  return keras.Model(inputs, MaskedDense(3, name="classifier")(x))


def test_implicit_perturbation_masks_convolutions_only():
  model = _conv_dense_model()
  rng = np.random.default_rng(2)
  batch = dict(x=tf.constant(rng.random((4, 5, 5, 2)), tf.float32),
               y=tf.constant([0, 1, 2, 1]), weight=tf.fill([4], 0.25),
               seed=tf.zeros([2], tf.int64))
  trainable = [tf.convert_to_tensor(v) for v in model.trainable_variables]
  non_trainable = [tf.convert_to_tensor(v) for v in model.non_trainable_variables]
  base = loss_and_gradients(model, cross_entropy(3))
  names = [v.path for v in model.trainable_variables]

  def sam_grads(masks):
    fn = sharpness_aware(base, model, rho=0.5,
                         implicit_mask_fn=None if masks is None else lambda: masks)
    return fn(trainable, non_trainable, batch)[0]

  dense = sam_grads(None)
  # Zero masks on the dense layers only: as the seed's SAMConv, nothing changes.
  zeros_on_dense = [tf.zeros_like(w) if "hidden" in n or "classifier" in n else tf.ones_like(w)
                    for w, n in zip(trainable, names)]
  for got, want in zip(sam_grads(zeros_on_dense), dense):
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
  # A zero mask on conv2 cuts conv1 off the ascent: its e is 0, so conv1's gradient
  # is the one at w (conv2's own perturbation still moves the rest).
  zeros_on_conv2 = [tf.zeros_like(w) if "conv2" in n else tf.ones_like(w)
                    for w, n in zip(trainable, names)]
  cut = sam_grads(zeros_on_conv2)
  conv1 = names.index(next(n for n in names if "conv1" in n and n.endswith("kernel")))
  assert np.abs(cut[conv1].numpy() - dense[conv1].numpy()).max() > 1e-5


def test_implicit_masks_start_at_ones_and_refresh_before_the_due_epochs_first_batch():
  from robust_sparse.training.sharpness.sparse_perturbation import FisherMasks
  model = _bn_model()
  implicit = FisherMasks(model, cross_entropy(10), augment=None, num_samples=4,
                         sparsity=0.5, pattern="structured", update_freq=2, implicit=True)
  implicit.initialize(0)
  assert implicit.lived_weight() == 1.0
  assert implicit.refresh_points(total_iterations=50, steps_per_epoch=10) == [0, 20, 40]
  assert [implicit.epoch_at(i, 10) for i in (0, 20, 40)] == [0, 2, 4]
  explicit = FisherMasks(model, cross_entropy(10), augment=None, num_samples=4,
                         sparsity=0.5, pattern="structured", update_freq=2)
  assert [explicit.epoch_at(i, 10) for i in (1, 21, 41)] == [0, 2, 4]
