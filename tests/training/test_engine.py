"""The engine: BN models through pruning levels, fit/runner agreement, exact resume, divergence."""

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

from robust_sparse.attacks import AttackConfig, make_attack
from robust_sparse.data import augment as augment_lib
from robust_sparse.data import load_dataset
from robust_sparse.experiments.runner import DivergedError, Runner, level_dir
from robust_sparse.models import build_model
from robust_sparse.nn.layers import MaskedDense
from robust_sparse.training import engine as engine_lib
from robust_sparse.core import files
from robust_sparse.training.engine import Engine, index_stream
from robust_sparse.core.hparams import Hparams
from robust_sparse.training.keras_model import RobustModel
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.schedules import make_schedule
from robust_sparse.training.steps import LossScale, OptimizerGroup, standard_loss_grad_fn
from tests.conftest import REPO, child_env, one_line_error, run_cli, run_cli_batch


def test_bn_lottery_run_on_cifar_rewinds_bn_statistics(tmp_path, data_dir):
  """A 2-level rewind run of a BN convnet on 2000 CIFAR-10 images."""
  dataset = load_dataset("cifar10", data_dir, 500)
  hparams = Hparams(dataset="cifar10", model="conv-bn", experiment="rewind",
                    rewind_iteration=10, prune_iters=1, trials=1, train_examples=2000,
                    valid_size=500, batch_size=100, epochs=2, optimizer="sgd",
                    learning_rate=0.05, momentum=0.9, augment="crop_flip", data_dir=data_dir,
                    lr_schedule="cosine", schedule_per="iteration",
                    # Not about evaluation: no attack or sharpness on CIFAR-10's 10000 test
                    # images at each of the 6 evaluations.
                    attack="none", sharpness_examples=0)
  run_dir = Runner(hparams, dataset, str(tmp_path), progress=False).run()
  load = lambda level, name: files.load_arrays(os.path.join(level_dir(run_dir, 0, level), name))
  rewind, level1 = load(0, "weights_rewind.npz"), load(1, "weights_init.npz")
  fresh, final = load(0, "weights_init.npz"), load(0, "weights_final.npz")
  statistics = [k for k in rewind if "moving_" in k]
  assert statistics, sorted(rewind)
  for key in statistics:
    # Level 1 starts from the rewind point's statistics: neither fresh nor final ones.
    np.testing.assert_array_equal(level1[key], rewind[key], err_msg=key)
    assert not np.array_equal(rewind[key], fresh[key]), key
    assert not np.array_equal(rewind[key], final[key]), key
  meta = json.load(open(os.path.join(level_dir(run_dir, 0, 1), "metadata.json")))
  assert meta["completed"] and meta["percent_weights_remaining"] < 100
  test = np.genfromtxt(os.path.join(level_dir(run_dir, 0, 1), "test.csv"), delimiter=",",
                       names=True)
  np.testing.assert_array_equal(test["iteration"], [10, 20, 40])  # 20 iterations per epoch
  np.testing.assert_array_equal(test["epoch"], [0.5, 1.0, 2.0])
  # The rewound level resumes the schedule at the rewind point (lr of the last step).
  schedule = make_schedule("cosine", 0.05, total_iterations=40, steps_per_epoch=20,
                           per="iteration")
  np.testing.assert_allclose(test["lr"], [float(schedule(i - 1)) for i in (10, 20, 40)],
                             rtol=1e-6)


def _engine_and_fit_models(digits):
  keras.utils.set_random_seed(3)
  a = build_model("conv-bn", digits.input_shape, digits.num_classes)
  b = build_model("conv-bn", digits.input_shape, digits.num_classes)
  b.set_weights(a.get_weights())
  return a, b


def _dense_bn_models(digits):
  """Two equal dense nets with batch norm, for the XLA modes: XLA compiles them faster
  than a conv net on a CPU; batch norm's moving statistics are state the loop must
  carry, and the augmentation still acts on the images."""
  keras.utils.set_random_seed(3)

  def build():
    return keras.Sequential([
        keras.Input(digits.input_shape), keras.layers.Flatten(name="flatten"),
        MaskedDense(64, name="hidden"), keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"), MaskedDense(10, name="output")], name="dense_bn")

  a, b = build(), build()
  b.set_weights(a.get_weights())
  return a, b


def _groups():
  schedule = make_schedule("cosine", 0.05, total_iterations=30, steps_per_epoch=10,
                           per="iteration", warmup_epochs=1)
  return [OptimizerGroup("weights", make_optimizer("sgd", 0.05, momentum=0.9,
                                                   weight_decay=5e-4), schedule)]


def test_fit_and_runner_engine_give_the_same_weights(digits):
  attack = make_attack(AttackConfig("pgd", eps=0.1, step_size=0.05, steps=2))
  augment = augment_lib.build("crop,flip", num_classes=10)
  engine_model, fit_model = _engine_and_fit_models(digits)
  steps, seed, data_seed = 30, 11, 7

  engine = Engine(engine_model, standard_loss_grad_fn(
      engine_model, num_classes=10, label_smoothing=0.1, attack=attack), _groups(),
      x_train=digits.x_train, y_train=digits.y_train, batch_size=32, attack=attack,
      adv_train=True, augment=augment)
  engine.reset(seed)
  engine.train(iter(index_stream(len(digits.x_train), 32, data_seed)), steps)

  x, y = tf.constant(digits.x_train), tf.constant(digits.y_train, tf.int32)
  batches = index_stream(len(digits.x_train), 32, data_seed).take(steps).map(
      lambda i: (tf.gather(x, i), tf.gather(y, i)))
  robust = RobustModel(fit_model, label_smoothing=0.1, attack=attack, augment=augment,
                       seed=seed)
  robust.compile(groups=_groups(), steps_per_execution=5)
  history = robust.fit(batches, epochs=1, verbose=0)
  assert np.isfinite(history.history["loss"][0])

  assert int(robust.step_iteration.numpy()) == int(engine.iteration.numpy()) == steps
  for a, b in zip(engine_model.variables, fit_model.variables):
    assert a.path == b.path
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)
  # And training moved them: the comparison is not between untouched weights.
  fresh, _ = _engine_and_fit_models(digits)
  assert not np.allclose(fresh.variables[0].numpy(), engine_model.variables[0].numpy())


def test_fit_runs_keras_callbacks_and_evaluates_robust_accuracy(tmp_path, digits):
  keras.utils.set_random_seed(0)
  network = build_model("lenet5", digits.input_shape, digits.num_classes)
  robust = RobustModel(network, attack=make_attack(AttackConfig("fgsm", eps=0.1)))
  robust.compile(optimizer=make_optimizer("adam", 1e-3))
  data = tf.data.Dataset.from_tensor_slices(
      (digits.x_train, digits.y_train)).batch(64)
  log = str(tmp_path / "log.csv")
  robust.fit(data, epochs=2, validation_data=data.take(2), verbose=0,
             callbacks=[keras.callbacks.CSVLogger(log)])
  rows = open(log).read().splitlines()
  assert rows[0].split(",")[:1] == ["epoch"] and "val_adv_acc" in rows[0] and len(rows) == 3
  results = robust.evaluate(data, return_dict=True, verbose=0)
  assert 0.0 <= results["adv_acc"] <= results["acc"] <= 1.0


def test_mixed_precision_loss_scaling_keeps_small_gradients(digits):
  """Under mixed_float16 tiny gradients underflow unless the loss is scaled."""
  from robust_sparse.training.steps import cross_entropy, loss_and_gradients
  keras.utils.set_random_seed(0)
  reference = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  model.set_weights(reference.get_weights())
  x = tf.constant(digits.x_train[:32])
  y = tf.constant(digits.y_train[:32], tf.int32)
  # A tiny objective weight: float16 gradients of ~1e-9 underflow to zero.
  batch = dict(x=x, y=y, weight=tf.fill([32], 1e-7 / 32), seed=tf.constant([0, 0], tf.int64))

  def gradients(net, loss_scale=None):
    values = [[tf.convert_to_tensor(v) for v in vs]
              for vs in (net.trainable_variables, net.non_trainable_variables)]
    grads, _, _ = loss_and_gradients(net, cross_entropy(10), loss_scale)(*values, batch)
    return tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads], 0).numpy()

  exact, unscaled, scaled = gradients(reference), gradients(model), gradients(model,
                                                                             LossScale())
  assert np.abs(exact).max() > 0
  assert np.all(unscaled == 0)
  # float16 compute: close to the float32 gradients as a whole, not elementwise.
  assert np.linalg.norm(scaled - exact) < 0.05 * np.linalg.norm(exact)


def test_mixed_precision_run_trains(tmp_path, digits):
  hparams = Hparams(dataset="sklearn_digits", experiment="train", trials=1, train_iters=40,
                    eval_every=20, valid_size=300, batch_size=32, mixed_precision=True,
                    sharpness_examples=0)
  try:
    run_dir = Runner(hparams, digits, str(tmp_path), progress=False).run()
  finally:
    keras.mixed_precision.set_global_policy("float32")
  test = np.genfromtxt(os.path.join(level_dir(run_dir, 0, 0), "test.csv"), delimiter=",",
                       names=True)
  assert np.all(np.isfinite(test["loss"])) and test["acc"][-1] > 0.5


def test_diverging_level_stops_and_is_not_retrained(tmp_path, digits):
  hparams = Hparams(dataset="sklearn_digits", experiment="train", trials=1, train_iters=60,
                    eval_every=20, valid_size=300, batch_size=32, optimizer="sgd",
                    learning_rate=1e38, sharpness_examples=0)
  with pytest.raises(DivergedError, match="trial 0, prune_iter 0, at iteration"):
    Runner(hparams, digits, str(tmp_path), progress=False).run()
  run_dir = hparams.run_dir(str(tmp_path))
  meta = json.load(open(os.path.join(level_dir(run_dir, 0, 0), "metadata.json")))
  assert meta["diverged"] and not meta["completed"]
  test = np.genfromtxt(os.path.join(level_dir(run_dir, 0, 0), "test.csv"), delimiter=",",
                       names=True)
  assert np.all(np.isfinite(np.atleast_1d(test["loss"])))
  with pytest.raises(DivergedError):
    Runner(hparams, digits, str(tmp_path), progress=False).run()


def test_diverging_run_cli_one_line_error_and_force(tmp_path):
  args = ["--dataset=sklearn_digits", "--experiment=train", "--trials=1", "--train_iters=40",
          "--eval_every=20", "--optimizer=sgd", "-lr=1e38", "--noprogress",
          "--sharpness_examples=0", "--compile=graph", f"--base_dir={tmp_path}"]
  # Diverges; run again: the diverged level is not retrained; --force: retrained.
  for extra in ([], [], ["--force"]):
    result = run_cli(*args, *extra)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "prune_iter 0" in errors[0]


def _tree(run_dir):
  out = {}
  for path in sorted(glob.glob(os.path.join(run_dir, "**", "*"), recursive=True)):
    rel = os.path.relpath(path, run_dir)
    if path.endswith((".csv", ".json")) and not path.endswith("metadata.json"):
      out[rel] = open(path).read()
    elif path.endswith(".npy"):
      out[rel] = np.load(path)
    elif path.endswith(".npz"):
      out.update({f"{rel}:{k}": v for k, v in files.load_arrays(path).items()})
  return out


def test_kill_9_anywhere_resumes_exactly_bn_augment_sgd_cosine(tmp_path):
  args = ["--dataset=sklearn_digits", "--model=conv-bn", "--experiment=train", "--trials=1",
          "--epochs=4", "--batch_size=32", "--optimizer=sgd", "--momentum=0.9",
          "--weight_decay=5e-4", "-lr=0.05", "--lr_schedule=cosine", "--warmup_epochs=1",
          "--augment=crop,flip", "--attack=pgd", "--pgd_steps=2", "--adv_train",
          "--noprogress", "--nomasking_checks", "--sharpness_examples=64"]
  reference = run_cli(*args, f"--base_dir={tmp_path / 'a'}")
  assert reference.returncode == 0, reference.stderr[-2000:]
  base = tmp_path / "b"
  env = child_env()
  rng = np.random.default_rng(0)
  kills = 0
  for _ in range(2):  # Killed, resumed and killed again, then resumed to the end.
    process = subprocess.Popen([sys.executable, "-m", "run_experiments", *args,
                                f"--base_dir={base}"], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not glob.glob(str(base / "**" / "checkpoint.npz"), recursive=True):
      if process.poll() is not None or time.time() > deadline:
        break
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.5))  # Anywhere: mid-chunk, mid-evaluation, mid-write.
    if process.poll() is None:
      process.send_signal(signal.SIGKILL)
      kills += 1
    process.wait()
  assert kills >= 1
  resumed = run_cli(*args, f"--base_dir={base}")
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  expected = _tree(os.path.dirname(glob.glob(str(tmp_path / "a" / "**" / "hparams.json"),
                                             recursive=True)[0]))
  actual = _tree(os.path.dirname(glob.glob(str(base / "**" / "hparams.json"),
                                           recursive=True)[0]))
  assert expected.keys() == actual.keys()
  for key in expected:
    if isinstance(expected[key], str):
      assert actual[key] == expected[key], key
    else:
      assert np.max(np.abs(actual[key] - expected[key]), initial=0) == 0, key


BAD_ENGINE_FLAGS = [
    (["--optimizer=rmsprop"], "optimizer"),
    (["--lr_schedule=linear"], "lr_schedule"),
    (["--momentum=-0.1"], "momentum"),
    (["--weight_decay=-1"], "weight_decay"),
    (["--lr_schedule=multistep", "--milestones=30,10", "--epochs=40"], "milestones"),
    (["--lr_schedule=multistep", "--milestones=a,b"], "milestones"),
    (["--warmup_epochs=5", "--epochs=3"], "warmup_epochs"),
    (["--epochs=3", "--train_iters=100"], "--epochs"),
    (["--optimizer=sgd", "--nesterov"], "nesterov"),
    (["--train_examples=100000"], "train_examples"),
]


@pytest.fixture(scope="module")
def bad_engine_flags_results(tmp_path_factory):
  base = tmp_path_factory.mktemp("bad_flags")
  prefix = ["--dataset=sklearn_digits", "--noprogress"]
  return run_cli_batch([[*prefix, *args, f"--base_dir={base}"] for args, _ in BAD_ENGINE_FLAGS])


@pytest.mark.parametrize("args,message", BAD_ENGINE_FLAGS)
def test_bad_engine_flags_fail_in_one_line(bad_engine_flags_results, args, message):
  [(status, stderr)] = [outcome for argv, outcome in bad_engine_flags_results.items()
                        if list(argv[2:-1]) == args]
  one_line_error(status, stderr, message)

@pytest.mark.parametrize("jit_compile", [None, False])
def test_engine_compiles_each_function_once(digits, jit_compile):
  """Chunks of any length and evaluation sets of any size retrace nothing, with XLA or
  without (layers that have no XLA kernel)."""
  attack = make_attack(AttackConfig("pgd", eps=0.2, step_size=0.05, steps=3))
  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10, attack=attack),
                  [OptimizerGroup("weights", make_optimizer("adam", 1e-3))],
                  x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                  attack=attack, adv_train=True, eval_batch_size=128, jit_compile=jit_compile)
  engine.reset(0)
  stream = iter(index_stream(len(digits.x_train), 32, 3))
  for steps in (5, 3, 30):
    assert np.isfinite(engine.train(stream, steps)["loss"])
  assert int(engine.iteration.numpy()) == 38
  for count in (300, 200, 100, 50):
    assert 0 <= engine.evaluate(digits.x_valid[:count], digits.y_valid[:count], 1)["acc"] <= 1
  [eval_tensors] = engine._eval_tensors.values()  # pylint: disable=protected-access
  for name, function in [(name, getattr(engine, name)) for name in (
      "_train_chunk", "_train_step", "_eval_batch", "_enforce_masks")] + [
          ("_eval_tensors", eval_tensors)]:
    assert not function.autograph, name
    assert function.function.experimental_get_tracing_count() == 1, name


def test_xla_training_loop_compiles_once_and_matches_a_call_per_step(digits):
  """Natural training on in-memory data runs each chunk as one XLA loop; chunks of any
  length (longer than `XLA_CHUNK` too) reuse it, and it trains as a call per step does
  (batch norm, augmentation, a schedule)."""
  augment = augment_lib.build("crop,flip", num_classes=10)
  attack = make_attack(AttackConfig("fgsm", eps=0.1))
  engines = []
  for mode, model in zip(("xla_loop", "xla_step"), _dense_bn_models(digits)):
    engine = Engine(model, standard_loss_grad_fn(model, num_classes=10), _groups(),
                    x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                    attack=attack, augment=augment, compile=mode)
    assert engine.loop_in_xla == (mode == "xla_loop")
    engine.reset(5)
    stream = iter(index_stream(len(digits.x_train), 32, 9))
    for steps in (5, 3, engine_lib.XLA_CHUNK + 8):
      assert np.isfinite(engine.train(stream, steps)["loss"])
    assert int(engine.iteration.numpy()) == engine_lib.XLA_CHUNK + 16
    engines.append(engine)
  looped, stepped = engines
  for function in (looped._train_chunk, looped._train_loop):
    assert function.function.experimental_get_tracing_count() == 1
  assert stepped._train_loop.function.experimental_get_tracing_count() == 0
  for a, b in zip(looped.model.variables, stepped.model.variables):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
  fresh, _ = _dense_bn_models(digits)
  assert not np.allclose(fresh.variables[0].numpy(), looped.model.variables[0].numpy())


@pytest.mark.parametrize("adv_train,mode", [(False, "xla_loop"), (True, "xla_step"),
                                             (False, "graph")])
def test_warm_up_compiles_training_and_evaluation_and_changes_nothing(digits, adv_train, mode):
  """`Engine.warm_up` traces both functions (in two threads) and leaves every variable as it
  was: training and evaluation then give what an engine without it gives, untraced again."""
  attack = make_attack(AttackConfig("pgd", eps=0.1, step_size=0.05, steps=2))
  augment = augment_lib.build("crop,flip", num_classes=10)
  results = []
  for warm in (True, False):
    model, _ = (_engine_and_fit_models if mode == "graph" else _dense_bn_models)(digits)
    engine = Engine(model, standard_loss_grad_fn(
        model, num_classes=10, attack=attack if adv_train else None), _groups(),
                    x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                    attack=attack, augment=augment, adv_train=adv_train, eval_batch_size=100,
                    compile=mode)
    assert engine.compile_mode == mode
    assert engine.loop_in_xla == (mode == "xla_loop")
    engine.reset(5, iteration=3)
    before = engine.get_state()
    if warm:
      engine.warm_up(digits.x_valid, digits.y_valid)
      after = engine.get_state()
      assert after.keys() == before.keys()
      for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
      traced = {name: getattr(engine, name).function.experimental_get_tracing_count()
                for name in ("_train_chunk", "_eval_batch")}
      assert traced == {"_train_chunk": 1, "_eval_batch": 1}
      engine.warm_up(digits.x_valid, digits.y_valid)  # Once only.
    first = engine.evaluate(digits.x_valid, digits.y_valid)
    trained = engine.train(iter(index_stream(len(digits.x_train), 32, 9, 3)), 6)
    results.append((first, trained, engine.evaluate(digits.x_test, digits.y_test, 2),
                    engine.get_state()))
    if warm:
      for name in ("_train_chunk", "_eval_batch"):
        assert getattr(engine, name).function.experimental_get_tracing_count() == 1, name
  (first, trained, last, state), (first_0, trained_0, last_0, state_0) = results
  assert first.keys() == first_0.keys()  # From the same weights: exactly the same.
  np.testing.assert_array_equal(list(first.values()), list(first_0.values()))
  for metrics, metrics_0 in ((trained, trained_0), (last, last_0)):
    assert metrics.keys() == metrics_0.keys()
    np.testing.assert_allclose(list(metrics.values()), list(metrics_0.values()), atol=1e-5)
  for name in state:
    np.testing.assert_allclose(state[name], state_0[name], atol=1e-5, err_msg=name)


def test_code_that_needs_autograph_is_traced_with_it(digits):
  """Python control flow on tensors (say, in a user's own loss) still works."""

  def absolute_sum(x):
    total = tf.reduce_sum(x)
    if total < 0:
      total = -total
    return total

  traced = engine_lib._Traced(absolute_sum)  # pylint: disable=protected-access
  assert float(traced(tf.constant([-1.0, -2.0]))) == 3.0
  assert traced.autograph
  assert float(traced(tf.constant([1.0, 2.0]))) == 3.0
  plain = engine_lib._Traced(lambda x: tf.reduce_sum(x) * 2)  # pylint: disable=protected-access
  assert float(plain(tf.constant([1.0, 2.0]))) == 6.0
  assert not plain.autograph

  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  standard = standard_loss_grad_fn(model, num_classes=10)

  def clipped(trainable, non_trainable, batch):
    grads, new, aux = standard(trainable, non_trainable, batch)
    if tf.linalg.global_norm(grads) > 1.0:  # Needs AutoGraph.
      grads, _ = tf.clip_by_global_norm(grads, 1.0)
    return grads, new, aux

  engine = Engine(model, clipped, [OptimizerGroup("weights", make_optimizer("sgd", 0.1))],
                  x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                  attack=make_attack(AttackConfig("fgsm", eps=0.1)))
  engine.reset(0)
  assert np.isfinite(engine.train(iter(index_stream(len(digits.x_train), 32, 0)), 5)["loss"])
  # The XLA loop of natural training holds the step: it alone is retraced.
  assert engine.loop_in_xla
  assert engine._train_loop.autograph and not engine._train_chunk.autograph


def test_engine_compiles_by_the_cpu_rules_training_and_evaluation_apart(digits):
  """On a CPU: max pooling never in XLA (its gradient is many times slower than TensorFlow's
  kernel), other conv nets in XLA only for natural training at batch <= 8, evaluated (batches
  of 1000) as graphs; dense nets in XLA throughout (`metadata.json`'s record of both:
  tests/experiments/test_run_experiments.py)."""
  assert not tf.config.list_logical_devices("GPU")  # This test is about CPU-only machines.
  pooled = build_model("conv-2", (32, 32, 3), 10)
  conv = build_model("conv-bn", (32, 32, 3), 10)
  plain = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  assert not engine_lib.xla_pays_off(pooled, 8) and engine_lib.xla_pays_off(plain)
  attack = make_attack(AttackConfig("fgsm", eps=0.1))
  cases = [(pooled, 8, False, "graph", False), (conv, 8, False, "xla_step", False),
           (conv, 8, True, "graph", False), (conv, 32, False, "graph", False),
           (plain, 32, False, "xla_loop", True), (plain, 32, True, "xla_step", True)]
  for model, batch_size, adv_train, mode, eval_xla in cases:
    engine = Engine(model, standard_loss_grad_fn(model, num_classes=10),
                    [OptimizerGroup("weights", make_optimizer("sgd", 0.1))],
                    x_train=np.zeros((64,) + tuple(model.input_shape[1:]), np.float32),
                    y_train=np.zeros(64, np.int32), batch_size=batch_size, attack=attack,
                    adv_train=adv_train)
    case = (model.name, batch_size, adv_train)
    assert engine.compile_mode == mode, case
    assert engine.jit_compile is (mode != "graph"), case
    assert engine.eval_jit_compile is eval_xla, case
    assert engine._eval_batch._options["jit_compile"] is eval_xla, case


def _counting_engine(digits, mode, n=None):
  """An engine that trains nothing (lr 0) and counts in `seen` how often each example was
  in a training batch (image i holds i / n everywhere), and the batch sizes it saw."""
  n = n or len(digits.x_train)
  x = np.broadcast_to((np.arange(n, dtype=np.float32) / n)[:, None, None, None],
                      (n,) + digits.input_shape).copy()
  y = digits.y_train[:n]
  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  seen = tf.Variable(tf.zeros([n], tf.int32), trainable=False)
  sizes = tf.Variable(tf.zeros([64], tf.int32), trainable=False)  # Batch sizes seen.
  standard = standard_loss_grad_fn(model, num_classes=10)

  def counting(trainable, non_trainable, batch):
    ids = tf.cast(tf.round(batch["x"][:, 0, 0, 0] * n), tf.int32)
    seen.scatter_add(tf.IndexedSlices(tf.ones_like(ids), ids))
    sizes.scatter_add(tf.IndexedSlices(tf.ones([1], tf.int32), tf.shape(ids)[:1]))
    return standard(trainable, non_trainable, batch)

  engine = Engine(model, counting, [OptimizerGroup("weights", make_optimizer("sgd", 0.0))],
                  x_train=x, y_train=y, batch_size=32, attack=None, compile=mode)
  return engine, seen, sizes


@pytest.mark.parametrize("mode", ["xla_loop", "graph"])
def test_an_epoch_visits_every_example_exactly_once(digits, mode):
  """`--epochs`: ceil(n / B) batches per epoch, the last one smaller (PyTorch's DataLoader,
  drop_last=False), each example once; a run stopped anywhere, even at an epoch's last
  batch, continues with the same batches. The compiled loop keeps its one trace."""
  n = len(digits.x_train)  # 1137 = 35 * 32 + 17.
  per_epoch, last = engine_lib.batches_per_epoch(n, 32)
  assert (per_epoch, last) == (36, 17)
  engine, seen, sizes = _counting_engine(digits, mode)
  engine.reset(0)
  stream = engine.batches(seed=4)
  for steps in (10, 25, 1, 5, 31):  # Stops at the last batch and just after it.
    engine.train(stream, steps)
    done = int(engine.iteration.numpy())
    if done in (per_epoch, 2 * per_epoch):
      np.testing.assert_array_equal(seen.numpy(), done // per_epoch)
  assert done == 2 * per_epoch
  assert sizes.numpy()[32] == 2 * (per_epoch - 1) and sizes.numpy()[last] == 2
  assert engine._train_chunk.function.experimental_get_tracing_count() == 1
  # The order is index_stream's, from any starting point.
  reference = list(index_stream(n, 32, 4, whole_epochs=True).take(2 * per_epoch + 3))
  assert [len(b) for b in reference[per_epoch - 2:per_epoch + 1]] == [32, last, 32]
  for start in (per_epoch - 1, per_epoch + 5):
    resumed = list(index_stream(n, 32, 4, start, whole_epochs=True).take(3))
    for a, b in zip(resumed, reference[start:start + 3]):
      np.testing.assert_array_equal(a.numpy(), b.numpy())
  for epoch in range(2):
    np.testing.assert_array_equal(
        np.sort(np.concatenate(reference[epoch * per_epoch:(epoch + 1) * per_epoch])),
        np.arange(n))
  # Resuming the engine mid-epoch and at the last batch gives the same examples.
  for start in (per_epoch - 1, per_epoch + 3):
    engine.reset(0, iteration=start)
    seen.assign(tf.zeros_like(seen))
    engine.train(engine.batches(seed=4, start_iteration=start), 3)
    expected = np.zeros(n, np.int32)
    expected[np.concatenate(reference[start:start + 3])] = 1
    np.testing.assert_array_equal(seen.numpy(), expected)


def test_evaluation_sums_are_named_by_metric(digits):
  """`evaluate`'s values sit under the right names: natural loss and accuracy from the
  model's own logits, and an attack that returns x unchanged gives the same adversarial
  and robust values (a swapped position would put a loss under an accuracy)."""
  def identity(model, x, y, seed):
    return x

  identity.labels = "true"
  model = build_model("dense-300-100", digits.input_shape, digits.num_classes)
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10),
                  [OptimizerGroup("weights", make_optimizer("adam", 1e-3))],
                  x_train=digits.x_train, y_train=digits.y_train, batch_size=32,
                  attack=identity, eval_batch_size=64, top5=True, compile="graph",
                  eval_attacks=[("same", identity)])
  engine.reset(0)
  x, y = digits.x_valid[:150], digits.y_valid[:150]
  logits = model(x, training=False).numpy()
  loss = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits).numpy().mean()
  acc = (logits.argmax(-1) == y).mean()
  top5 = np.mean([label in np.argsort(row)[-5:] for row, label in zip(logits, y)])
  results = engine.evaluate(x, y)
  np.testing.assert_allclose([results["nat_loss"], results["adv_loss"], results["loss"]],
                             [loss] * 3, rtol=1e-5)
  np.testing.assert_allclose([results[m] for m in ("acc", "adv_acc", "adv_acc_same")],
                             [acc] * 3, rtol=1e-6)
  np.testing.assert_allclose(results["top5"], top5, rtol=1e-6)
  # Untrained: accuracy, top-5 and loss differ, so a swap of names would show.
  assert acc < top5 and not np.isclose(loss, acc) and not np.isclose(loss, top5)
