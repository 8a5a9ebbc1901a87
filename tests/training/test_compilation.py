"""`--compile`: the engine's choice between one XLA loop, an XLA call per step and a graph,
by rules, or by timing the two where the rules measured them tied."""

import os

import keras
import numpy as np
import pytest

from robust_sparse.core import files
from robust_sparse.core.hparams import Hparams
from robust_sparse.core.run_folder import COMPILE_FILE, level_dir
from robust_sparse.experiments.runner import Runner
from robust_sparse.training import compilation
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
from robust_sparse.training.engine import Engine, index_stream
from robust_sparse.training.optimizers import make_optimizer
from robust_sparse.training.steps import OptimizerGroup, standard_loss_grad_fn


class _NoXla(keras.layers.Layer):
  """A layer that says it has no XLA kernel, as the compiled JSReLU op does."""

  def __init__(self):
    super().__init__()
    self.supports_jit = False

  def call(self, x):
    return x


def _mlp(extra=None):
  layers = [keras.Input((8,)), MaskedDense(16, name="d1")]
  if extra is not None:
    layers.append(extra)
  layers.append(MaskedDense(3, name="d2"))
  return keras.Sequential(layers)


def _conv():
  return keras.Sequential([keras.Input((8, 8, 3)), MaskedConv2D(4, 3, name="c"),
                           keras.layers.GlobalAveragePooling2D(), MaskedDense(3, name="d")])


def test_auto_compiles_dense_models_as_a_loop_unless_adversarial_or_from_files():
  model = _mlp()
  assert compilation.choose(model) == "xla_loop"
  assert compilation.choose(model, adv_train=True) == "xla_step"
  assert compilation.choose(model, in_memory=False) == "xla_step"


def _max_pool():
  return keras.Sequential([keras.Input((8, 8, 3)), MaskedConv2D(4, 3, name="c"),
                           keras.layers.MaxPooling2D(), keras.layers.Flatten(),
                           MaskedDense(3, name="d")])


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_auto_compiles_convolutions_with_xla_on_a_cpu_only_for_small_natural_batches():
  model = _conv()
  small, large = compilation.XLA_CONV_BATCH, compilation.XLA_CONV_BATCH + 1
  assert compilation.choose(model, batch_size=small) == "xla_step"
  assert compilation.choose(model, batch_size=large) == "graph"
  assert compilation.choose(model) == "graph"  # Batch size unknown: counted as large.
  assert compilation.choose(model, batch_size=small, adv_train=True) == "graph"
  assert compilation.choose(model, batch_size=small, in_memory=False) == "xla_step"
  assert compilation.choose(_max_pool(), batch_size=small) == "graph"
  assert not compilation.xla_pays_off(model)
  assert compilation.choose(model, "xla_step") == "xla_step"  # Named: as asked.
  assert compilation.choose(model, "xla_loop", batch_size=small) == "xla_loop"


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_evaluation_chooses_on_its_own_batch_and_a_named_mode_holds_for_it():
  conv, mlp = _conv(), _mlp()
  # Auto: a conv net trained with XLA at batch 8 evaluates batches of 1000 as a graph.
  assert not compilation.evaluation_uses_xla(conv, "auto", "xla_step", 1000)
  assert not compilation.evaluation_uses_xla(conv, "auto", "xla_step", 8)  # Attacks' loops.
  assert compilation.evaluation_uses_xla(mlp, "auto", "xla_loop", 1000)
  assert compilation.evaluation_uses_xla(conv, "xla_step", "xla_step", 1000)
  assert not compilation.evaluation_uses_xla(mlp, "graph", "graph", 1000)
  assert not compilation.evaluation_uses_xla(mlp, "auto", "graph", 1000)


def test_layers_or_augmentation_without_xla_kernels_train_as_graphs():
  model = _mlp(_NoXla())
  assert compilation.choose(model) == "graph"

  class NoXlaAugment:
    supports_jit = False

  assert compilation.choose(_mlp(), augment=NoXlaAugment()) == "graph"
  with pytest.raises(ValueError, match="--compile=xla_loop.*no XLA kernel"):
    compilation.choose(model, "xla_loop")


def test_bad_modes_are_refused_with_the_flag_named():
  with pytest.raises(ValueError, match="--compile=jit is not one of"):
    compilation.choose(_mlp(), "jit")
  with pytest.raises(ValueError, match="--compile=xla_loop needs the training set in memory"):
    compilation.choose(_mlp(), "xla_loop", in_memory=False)


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_auto_times_xla_and_graph_only_where_the_rules_measured_them_tied():
  model, small = _conv(), compilation.XLA_CONV_BATCH

  def timed(network, mode="auto", **options):
    return compilation.timed_candidates(network, mode,
                                        compilation.choose(network, mode, **options))

  assert timed(model, batch_size=small) == ("xla_step", "graph")
  assert timed(model, "xla_step", batch_size=small) == ()
  assert timed(model, batch_size=small + 1) == ()
  assert timed(model) == ()  # Batch size unknown: counted as large.
  assert timed(model, adv_train=True, batch_size=small) == ()
  assert timed(_max_pool(), batch_size=small) == ()
  assert timed(_mlp(), batch_size=small) == ()


def _digits_conv(seed):
  keras.utils.set_random_seed(seed)
  return keras.Sequential([
      keras.Input((8, 8, 1)), MaskedConv2D(8, 3, name="conv"),
      keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu"),
      keras.layers.GlobalAveragePooling2D(name="pool"), MaskedDense(10, name="output")])


def _engine(digits, mode, seed=3):
  model = _digits_conv(seed)
  engine = Engine(model, standard_loss_grad_fn(model, num_classes=10),
                  [OptimizerGroup("weights", make_optimizer("sgd", 0.05, momentum=0.9))],
                  x_train=digits.x_train, y_train=digits.y_train, batch_size=8,
                  attack=None, compile=mode)
  engine.reset(5)
  return engine


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_timing_the_modes_changes_nothing_and_auto_trains_as_the_faster(digits, monkeypatch):
  timed = _engine(digits, "auto")
  assert timed.compile_candidates == ("xla_step", "graph")
  before = timed.get_state()
  timing = timed.time_compile_modes()
  assert sorted(timing) == ["graph", "xla_step"] and min(timing.values()) > 0, timing
  after = timed.get_state()
  assert after.keys() == before.keys()
  for name in before:  # Optimizer slots, batch-norm statistics, the iteration: as they were.
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  assert timed.compile_candidates == ("xla_step", "graph")  # Timed, not settled.
  # The first step settles: here "graph" is said to be the faster.
  monkeypatch.setattr(timed, "time_compile_modes", lambda: {"xla_step": 1.0, "graph": 2.0})
  reference = _engine(digits, "graph")
  assert reference.compile_candidates == ()  # A named mode is never timed.
  for engine in (timed, reference):
    engine.train(iter(index_stream(len(digits.x_train), 8, 9)), 6)
  assert (timed.compile_mode, timed.jit_compile, timed.compile_candidates) == (
      "graph", False, ())
  for a, b in zip(timed.model.variables, reference.model.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
  assert not np.array_equal(timed.model.variables[0].numpy(), _digits_conv(3).variables[0])


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_a_recorded_mode_settles_without_timing(digits):
  engine = _engine(digits, "auto")
  with pytest.raises(ValueError, match="'xla_loop' is not one of xla_step, graph"):
    engine.settle_compile("xla_loop")
  assert engine.settle_compile("xla_step") == "xla_step"
  assert engine.settle_compile("graph") == "xla_step"  # Settled once and for all.
  assert list(engine._traced_modes) == ["xla_step"]  # pylint: disable=protected-access


def test_a_json_written_once_keeps_the_first_writers(tmp_path):
  path = str(tmp_path / "folder" / "record.json")
  assert files.write_json_once(path, {"compile": "graph"})
  assert not files.write_json_once(path, {"compile": "xla_step"})
  assert files.read_json(path) == {"compile": "graph"}
  assert os.listdir(tmp_path / "folder") == ["record.json"]  # No temporary file left.


def test_a_json_written_once_without_hard_links_is_created_exclusively(tmp_path, monkeypatch):
  def no_links(source, target):
    raise PermissionError(1, "Operation not permitted", target)

  monkeypatch.setattr(os, "link", no_links)
  path = str(tmp_path / "record.json")
  assert files.write_json_once(path, {"compile": "xla_step"})
  assert not files.write_json_once(path, {"compile": "graph"})
  assert files.read_json(path) == {"compile": "xla_step"}
  assert os.listdir(tmp_path) == ["record.json"]


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_the_runner_times_once_per_run_and_a_resumed_run_keeps_the_recorded_mode(tmp_path,
                                                                                  digits):
  hp = Hparams(dataset="sklearn_digits", model="conv-bn", experiment="reinit_orig", trials=1,
               prune_iters=1, train_iters=4, eval_every=4, batch_size=8, attack="none",
               sharpness_examples=0, masking_checks=False)
  run_dir = Runner(hp, digits, str(tmp_path / "timed"), progress=False).run()
  record = files.read_json(os.path.join(run_dir, COMPILE_FILE))
  assert record["compile"] in ("xla_step", "graph")
  assert sorted(record["steps_per_second"]) == ["graph", "xla_step"]
  for level in (0, 1):  # Timed once: every level trains as recorded.
    metadata = files.read_json(os.path.join(level_dir(run_dir, 0, level), "metadata.json"))
    assert metadata["compile"] == record["compile"], level
    assert metadata["compile_timed"] == record["steps_per_second"]
  # A run that finds a recorded choice (resumed, or a worker sharing the folder) keeps it.
  other = {"xla_step": "graph", "graph": "xla_step"}[record["compile"]]
  runner = Runner(hp, digits, str(tmp_path / "recorded"), progress=False)
  files.write_json(os.path.join(runner.run_dir, COMPILE_FILE),
                   {"compile": other, "steps_per_second": {}})
  metadata = files.read_json(os.path.join(level_dir(runner.run(), 0, 0), "metadata.json"))
  assert (metadata["compile"], metadata["compile_timed"]) == (other, {})
