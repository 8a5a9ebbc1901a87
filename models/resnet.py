"""CIFAR ResNets (kuangliu/pytorch-cifar style), built from reusable blocks.

`resnet18` is the CIFAR ResNet-18 of the SSAM and AutoReP seeds: a 3x3
stride-1 stem conv (64, no bias) + BN + activation and no max-pool, four
stages of BasicBlocks [2, 2, 2, 2] with widths 64/128/256/512 and strides
1/2/2/2, global average pooling and a dense layer to the logits; 11,173,962
trainable weights for 10 classes (the masks are extra non-trainable weights).

Initialisation is PyTorch's default, kaiming_uniform_(a=sqrt(5)) =
VarianceScaling(1/3, "fan_in", "uniform") for every conv and dense kernel and
U(+-1/sqrt(fan_in)) for the dense bias, as in the SSAM seed's code. AutoReP
instead re-initialises conv and linear weights with kaiming_normal_ before
loading its pretrained checkpoint; that only matters when training from
scratch. Batch norm uses PyTorch's momentum and epsilon (see
`models.registry.batch_norm`), and stride-2 convs pad like PyTorch.

Layer names are deterministic: stem_conv, stem_bn, stem_activation,
layer{s}_block{b}_{conv1,bn1,activation1,conv2,bn2}, the shortcut's
layer{s}_block{b}_shortcut_{conv,bn}, layer{s}_block{b}_add,
layer{s}_block{b}_activation2, pool, output. Each activation layer has
`site` "after_bn" or "after_residual" (see `models.registry`).

A block is a function `block(x, filters, strides, *, activation, l1_reg,
name) -> tensor` that adds a projection shortcut itself when its output shape
differs from its input's; `resnet` stacks blocks into stages, so deeper
ResNets only need a new block (e.g. a bottleneck) and a stage list.
"""

import keras

from models.registry import (AFTER_BN, AFTER_RESIDUAL, MODELS, activation_layer, batch_norm,
                             conv, logits_layer)


def _shortcut(x, out_channels, strides, *, l1_reg, name):
  """Identity, or a 1x1 conv (no bias) + BN when the stride or width changes."""
  if strides == 1 and x.shape[-1] == out_channels:
    return x
  x = conv(x, out_channels, 1, strides=strides, l1_reg=l1_reg, name=f"{name}_shortcut_conv")
  return batch_norm(x, name=f"{name}_shortcut_bn")


def basic_block(x, filters, strides, *, activation, l1_reg, name):
  """ResNet BasicBlock: conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act.

  Args:
    x: input tensor [batch, height, width, channels].
    filters: output channels of both convs.
    strides: stride of the first conv and of the shortcut.
    activation: activation spec (see `robust_sparse.activations`).
    l1_reg: L1 coefficient on every conv kernel.
    name: prefix of the block's layer names, e.g. "layer2_block1".

  Returns:
    The block's output [batch, height / strides, width / strides, filters].
  """
  shortcut = _shortcut(x, filters, strides, l1_reg=l1_reg, name=name)
  x = conv(x, filters, 3, strides=strides, l1_reg=l1_reg, name=f"{name}_conv1")
  x = batch_norm(x, name=f"{name}_bn1")
  x = activation_layer(x, activation, site=AFTER_BN, name=f"{name}_activation1")
  x = conv(x, filters, 3, l1_reg=l1_reg, name=f"{name}_conv2")
  x = batch_norm(x, name=f"{name}_bn2")
  x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
  return activation_layer(x, activation, site=AFTER_RESIDUAL, name=f"{name}_activation2")


def resnet(input_shape, num_classes, *, block, blocks_per_stage, widths, strides,
           stem_width=64, activation="relu", l1_reg=0.0, name):
  """A CIFAR ResNet: 3x3 stem, stages of `block`, global average pool, dense logits.

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    block: a block function such as `basic_block`.
    blocks_per_stage: blocks in each stage, e.g. [2, 2, 2, 2].
    widths: `filters` of each stage's blocks.
    strides: stride of each stage's first block (later blocks use 1).
    stem_width: channels of the stem conv.
    activation: activation spec for every nonlinearity.
    l1_reg: L1 coefficient on every conv and dense kernel.
    name: the model's name.

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].

  Raises:
    ValueError: if the stage lists differ in length.
  """
  if not len(blocks_per_stage) == len(widths) == len(strides):
    raise ValueError(f"blocks_per_stage {blocks_per_stage}, widths {widths} and strides "
                     f"{strides} must have the same length")
  inputs = keras.Input(input_shape, name="input")
  x = conv(inputs, stem_width, 3, l1_reg=l1_reg, name="stem_conv")
  x = batch_norm(x, name="stem_bn")
  x = activation_layer(x, activation, site=AFTER_BN, name="stem_activation")
  for stage, (count, filters, stage_strides) in enumerate(
      zip(blocks_per_stage, widths, strides)):
    for index in range(count):
      x = block(x, filters, stage_strides if index == 0 else 1, activation=activation,
                l1_reg=l1_reg, name=f"layer{stage + 1}_block{index + 1}")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  logits = logits_layer(x, num_classes, l1_reg=l1_reg)
  return keras.Model(inputs, logits, name=name)


@MODELS.register("resnet18")
def resnet18(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """The kuangliu CIFAR ResNet-18 (see the module docstring)."""
  return resnet(input_shape, num_classes, block=basic_block, blocks_per_stage=[2, 2, 2, 2],
                widths=[64, 128, 256, 512], strides=[1, 2, 2, 2], activation=activation,
                l1_reg=l1_reg, name="resnet18")
