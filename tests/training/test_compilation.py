"""`--compile`: the engine's choice between one XLA loop, an XLA call per step and a graph."""

import keras
import pytest

from robust_sparse.training import compilation
from robust_sparse.nn.layers import MaskedConv2D, MaskedDense


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
