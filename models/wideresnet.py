"""Wide ResNets `wideresnet{depth}x{k}` (SSAM's `models/wideresnet.py`, Zagoruyko & Komodakis).

Any name matching `wideresnet(\\d+)x(\\d+)` builds a WRN-depth-k: a 3x3 conv
(16 channels, no BN after it), three groups of n = (depth - 4) / 6
pre-activation blocks of widths 16k, 32k, 64k with strides 1, 2, 2, then
BN, activation, global average pooling and a dense layer. `wideresnet28x10`
and `wideresnet34x10` (SSAM's two) are listed by `MODELS.names()`; the others
resolve on request. `wideresnet28x10` has 36,479,194 trainable weights for
10 classes.

A block (`wide_block`) is BN-act-conv3x3-BN-act-[dropout]-conv3x3 plus a
shortcut, with no activation after the sum (so every activation's `site` is
"after_bn"). As in the seed, when the block changes the width its first
BN-act is applied to the input before both the conv and the 1x1 shortcut conv
(which therefore sees the activated input); when it keeps the width the
shortcut is the raw input. `dropout` (`--dropout`, default 0) is
`F.dropout` between the two convs; with 0 no layer is added.

Initialisation as the seed: every conv N(0, sqrt(2 / (k * k * out_channels)))
(= kaiming_normal_ fan_out), BN gamma 1 beta 0, the linear weight PyTorch's
default and its bias 0. The seed pools with `avg_pool2d(out, 8)`, which on
its 32x32 inputs is the global average; global pooling keeps other sizes
valid.

Layer names: [normalize,] stem_conv, layer{g}_block{b}_{bn1, activation1,
conv1, bn2, activation2, dropout, conv2, shortcut_conv, add}, final_bn,
final_activation, pool, output.
"""

import keras

from robust_sparse.models.registry import (AFTER_BN, MODELS, ModelEntry, activation_layer,
                                           batch_norm, conv, dropout_layer, logits_layer,
                                           model_input)

PATTERN = r"wideresnet(\d+)x(\d+)"
_INIT = "kaiming_normal_fan_out"


def wide_block(x, filters, strides, *, activation, l1_reg, dropout, name):
  """A pre-activation WRN block (see the module docstring).

  Args:
    x: input tensor [batch, height, width, channels].
    filters: output channels.
    strides: stride of the first conv and of the shortcut.
    activation: activation spec.
    l1_reg: L1 coefficient on every conv kernel.
    dropout: rate of the dropout between the convs (0: none).
    name: prefix of the block's layer names.

  Returns:
    The block's output [batch, ceil(height / strides), ceil(width / strides), filters].
  """
  # The seed tests the width only; a stride with equal widths (never in its
  # configurations) needs the projection too.
  same_width = x.shape[-1] == filters and strides == 1
  activated = batch_norm(x, name=f"{name}_bn1")
  activated = activation_layer(activated, activation, site=AFTER_BN,
                               name=f"{name}_activation1")
  if same_width:
    shortcut = x
  else:
    # The seed overwrites x with its activation here, so the shortcut conv
    # sees the activated input.
    shortcut = conv(activated, filters, 1, strides=strides, kernel_init=_INIT, l1_reg=l1_reg,
                    name=f"{name}_shortcut_conv")
  out = conv(activated, filters, 3, strides=strides, kernel_init=_INIT, l1_reg=l1_reg,
             name=f"{name}_conv1")
  out = batch_norm(out, name=f"{name}_bn2")
  out = activation_layer(out, activation, site=AFTER_BN, name=f"{name}_activation2")
  if dropout:
    out = dropout_layer(out, dropout, name=f"{name}_dropout")
  out = conv(out, filters, 3, kernel_init=_INIT, l1_reg=l1_reg, name=f"{name}_conv2")
  return keras.layers.Add(name=f"{name}_add")([shortcut, out])


def check_depth(depth, widen_factor, name="wideresnet"):
  """Raises a one-line `ValueError` unless depth = 6n + 4 (n >= 1) and k >= 1."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f"model {name!r}: a wide ResNet's depth must be 6n+4 with n >= 1 "
                     f"(10, 16, 22, 28, 34, 40, ...), got {depth}")
  if widen_factor < 1:
    raise ValueError(f"model {name!r}: the widen factor must be at least 1, got "
                     f"{widen_factor}")


def wideresnet(input_shape, num_classes, *, depth, widen_factor, widths=None,
               activation="relu", l1_reg=0.0, normalize="none", dropout=0.0, name=None):
  """A WRN-depth-k (see the module docstring).

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    depth: total depth, 6n + 4 (n blocks per group).
    widen_factor: k.
    widths: the stem's and the three groups' widths; default
      [16, 16k, 32k, 64k] (smaller ones build a miniature for tests).
    activation: activation spec for every nonlinearity.
    l1_reg: L1 coefficient on every conv and dense kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    dropout: dropout rate between each block's convs.
    name: the model's name; default `wideresnet{depth}x{k}`.

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].

  Raises:
    ValueError: for a depth that is not 6n + 4 or a bad `widths`.
  """
  name = name or f"wideresnet{depth}x{widen_factor}"
  check_depth(depth, widen_factor, name)
  k = widen_factor
  widths = list(widths or [16, 16 * k, 32 * k, 64 * k])
  if len(widths) != 4:
    raise ValueError(f"model {name!r}: widths must list the stem's and 3 groups' widths, "
                     f"got {widths}")
  blocks = (depth - 4) // 6
  inputs, x = model_input(input_shape, normalize)
  x = conv(x, widths[0], 3, kernel_init=_INIT, l1_reg=l1_reg, name="stem_conv")
  for group, (filters, strides) in enumerate(zip(widths[1:], [1, 2, 2])):
    for index in range(blocks):
      x = wide_block(x, filters, strides if index == 0 else 1, activation=activation,
                     l1_reg=l1_reg, dropout=dropout,
                     name=f"layer{group + 1}_block{index + 1}")
  x = batch_norm(x, name="final_bn")
  x = activation_layer(x, activation, site=AFTER_BN, name="final_activation")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  logits = logits_layer(x, num_classes, l1_reg=l1_reg, bias_init="zeros")
  return keras.Model(inputs, logits, name=name)


def _entry(name, match):
  """The registry entry of `wideresnet{depth}x{k}` (a `MODELS.register_pattern` factory)."""
  depth, widen_factor = int(match.group(1)), int(match.group(2))
  check_depth(depth, widen_factor, name)

  def build(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0):
    return wideresnet(input_shape, num_classes, depth=depth, widen_factor=widen_factor,
                      activation=activation, l1_reg=l1_reg, normalize=normalize,
                      dropout=dropout, name=name)

  build.__name__ = name
  build.__doc__ = f"WRN-{depth}-{widen_factor} (see the `models.wideresnet` docstring)."
  return ModelEntry(name, build, dropout=True)


MODELS.register_pattern(PATTERN, "wideresnet{depth}x{k}", _entry, dropout=True)
# SSAM's two, listed by MODELS.names() (so also in --model's help).
for _name in ("wideresnet28x10", "wideresnet34x10"):
  MODELS.register(_name)(MODELS.get(_name))
