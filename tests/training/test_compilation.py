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


@pytest.mark.skipif(compilation.on_gpu(), reason="the CPU rule; on a GPU convolutions use XLA")
def test_auto_keeps_convolutions_out_of_xla_on_a_cpu():
  model = _conv()
  assert not compilation.xla_pays_off(model)
  assert compilation.choose(model) == "graph"
  assert compilation.choose(model, "xla_step") == "xla_step"  # Named: as asked.


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
