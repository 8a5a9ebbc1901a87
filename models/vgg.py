"""CIFAR VGGs: SSAM's `vgg{11,13,16,19}_bn` and phd-lab's `vgg{11,13,16,19}`, `vgg19_d3`.

Both stack configurations A/B/D/E (`CONFIGS`) of 3x3 conv - BN - activation
layers with 2x2 stride-2 max-pools ('M'); they differ in padding, head and
initialisation.

SSAM (`models/vgg.py` of Mi-Peng's sparse-SAM code, `vgg_bn`): convs with bias
and padding 1, then the flattened features go through the seed's classifier
Linear(512, 4096) - ReLU - Dropout(0.5) - Linear(4096, 4096) - ReLU -
Dropout(0.5) - Linear(4096, classes). PyTorch's default initialisation
everywhere. The flatten is the seed's `view`: on 32x32 inputs the features
are 1x1x512; larger inputs (which the seed's Linear(512, ...) would refuse)
give a wider first dense layer here.

phd-lab (`phd_lab/models/vgg.py`, `vgg`; spec 5.3): convs with bias and
padding = k_eff - 2, where k_eff = 3 + 2 (dilation - 1) is the dilated
kernel's extent. With dilation 1 that is padding 1 (size kept); with
`vgg19_d3`'s dilation 3 it is padding 5 for an extent of 7, so every conv
GROWS the map by 4 pixels [QUIRK, reproduced]. Head: global average pool,
BN, Dropout(0.25), Linear(512, 256), ReLU, BN, Dropout(0.25),
Linear(256, classes). Initialisation: conv kaiming_normal_(fan_out), linear
N(0, 0.01), every bias 0, BN gamma 1 beta 0.

The dropout rates are fixed by the seeds; these models take no `--dropout`.
A classifier ReLU that follows a linear layer has `site` "after_dense"; the
conv ones "after_bn".

Layer names: [normalize,] block{b}_conv{i}, block{b}_conv{i}_bn,
block{b}_conv{i}_activation (with block{b}_conv{i}_pad when padding cannot be
'same'), block{b}_pool; then SSAM's flatten, fc1, fc1_activation,
fc1_dropout, fc2, ..., output, or phd-lab's pool, head_bn1, head_dropout1,
head_dense, head_activation, head_bn2, head_dropout2, output.
"""

import keras

from robust_sparse.models.registry import (AFTER_BN, AFTER_DENSE, MODELS, activation_layer,
                                           batch_norm, conv, dense, dropout_layer, logits_layer,
                                           max_pool, model_input)

CONFIGS = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
          512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}


def _padding(dilation):
  """phd-lab's padding rule: the dilated 3x3 kernel's extent minus 2."""
  return 3 + 2 * (dilation - 1) - 2


def min_input_size(config, dilation=1):
  """The smallest side for which every conv and pool of `config` keeps a pixel."""
  padding, extent = _padding(dilation), 3 + 2 * (dilation - 1)
  for size in range(1, 4097):
    side = size
    for item in config:
      side = side // 2 if item == "M" else side + 2 * padding - extent + 1
      if side < 1:
        break
    else:
      return size
  raise ValueError(f"VGG configuration {config} needs inputs larger than 4096 pixels")


def _features(x, config, *, activation, l1_reg, padding, dilation, kernel_init, bias_init):
  """The conv - BN - activation / max-pool stack of `config`."""
  block, index = 1, 0
  for item in config:
    if item == "M":
      x = max_pool(x, 2, 2, name=f"block{block}_pool")
      block, index = block + 1, 0
      continue
    index += 1
    prefix = f"block{block}_conv{index}"
    x = conv(x, item, 3, padding=padding, dilation=dilation, use_bias=True,
             kernel_init=kernel_init, bias_init=bias_init, l1_reg=l1_reg, name=prefix)
    x = batch_norm(x, name=f"{prefix}_bn")
    x = activation_layer(x, activation, site=AFTER_BN, name=f"{prefix}_activation")
  return x


def vgg_bn(input_shape, num_classes, *, config, classifier_width=4096, activation="relu",
           l1_reg=0.0, normalize="none", name):
  """SSAM's CIFAR VGG with batch norm (see the module docstring).

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    config: a `CONFIGS` list (or a smaller one of the same form, for tests).
    classifier_width: units of the two hidden dense layers (4096 in the seed).
    activation: activation spec for every nonlinearity.
    l1_reg: L1 coefficient on every conv and dense kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    name: the model's name.

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].
  """
  inputs, x = model_input(input_shape, normalize)
  x = _features(x, config, activation=activation, l1_reg=l1_reg, padding=1, dilation=1,
                kernel_init="torch", bias_init="torch")
  x = keras.layers.Flatten(name="flatten")(x)
  for index in (1, 2):
    prefix = f"fc{index}"
    x = dense(x, classifier_width, l1_reg=l1_reg, name=prefix)
    x = activation_layer(x, activation, site=AFTER_DENSE, name=f"{prefix}_activation")
    x = dropout_layer(x, 0.5, name=f"{prefix}_dropout")
  logits = logits_layer(x, num_classes, l1_reg=l1_reg)
  return keras.Model(inputs, logits, name=name)


def vgg(input_shape, num_classes, *, config, dilation=1, head_width=None, activation="relu",
        l1_reg=0.0, normalize="none", name):
  """phd-lab's VGG (see the module docstring).

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    config: a `CONFIGS` list (or a smaller one of the same form, for tests).
    dilation: every conv's dilation (3 for `vgg19_d3`).
    head_width: units of the head's hidden dense layer; default half the
      last conv's width (256 for the seed's 512).
    activation: activation spec for every nonlinearity.
    l1_reg: L1 coefficient on every conv and dense kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    name: the model's name.

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].
  """
  inputs, x = model_input(input_shape, normalize)
  x = _features(x, config, activation=activation, l1_reg=l1_reg, padding=_padding(dilation),
                dilation=dilation, kernel_init="kaiming_normal_fan_out", bias_init="zeros")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  head_width = head_width or x.shape[-1] // 2
  x = batch_norm(x, name="head_bn1")
  x = dropout_layer(x, 0.25, name="head_dropout1")
  x = dense(x, head_width, kernel_init="normal_0.01", bias_init="zeros", l1_reg=l1_reg,
            name="head_dense")
  x = activation_layer(x, activation, site=AFTER_DENSE, name="head_activation")
  x = batch_norm(x, name="head_bn2")
  x = dropout_layer(x, 0.25, name="head_dropout2")
  logits = logits_layer(x, num_classes, l1_reg=l1_reg, kernel_init="normal_0.01",
                        bias_init="zeros")
  return keras.Model(inputs, logits, name=name)


def _register(name, family, config, **options):
  def build(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0):
    del dropout  # Fixed rates: the registry entry refuses `--dropout`.
    return family(input_shape, num_classes, config=CONFIGS[config], activation=activation,
                  l1_reg=l1_reg, normalize=normalize, name=name, **options)

  build.__name__ = name
  build.__doc__ = f"{name}: configuration {config} (see the `models.vgg` module docstring)."
  min_size = min_input_size(CONFIGS[config], options.get("dilation", 1))
  return MODELS.register(name, min_size=min_size)(build)


vgg11_bn = _register("vgg11_bn", vgg_bn, "A")
vgg13_bn = _register("vgg13_bn", vgg_bn, "B")
vgg16_bn = _register("vgg16_bn", vgg_bn, "D")
vgg19_bn = _register("vgg19_bn", vgg_bn, "E")
vgg11 = _register("vgg11", vgg, "A")
vgg13 = _register("vgg13", vgg, "B")
vgg16 = _register("vgg16", vgg, "D")
vgg19 = _register("vgg19", vgg, "E")
vgg19_d3 = _register("vgg19_d3", vgg, "E", dilation=3)
