"""ResNets: the CIFAR (kuangliu / SSAM), AutoReP max-pool and phd-lab ImageNet-stem variants.

Four different networks are called "resnet18" in the seeds; each has a name
here that says which:

| name | stem | blocks | residuals | init |
|---|---|---|---|---|
| `resnet18`, `resnet34` | 3x3 s1 | Basic [2,2,2,2] / [3,4,6,3] | yes | PyTorch |
| `resnet50` | 3x3 s1 | Bottleneck [3,4,6,3] | yes | PyTorch |
| `resnet18_maxpool`, `resnet9_maxpool` | 3x3 s1, MaxPool(3,2,1) | Basic [2]*4 / [1]*4 | yes | kn |
| `resnet{18,34,50}_imagenet` | 7x7 s2 p3, MaxPool(3,2,1) | as resnet{18,34,50} | yes | tv |
| `resnet18_imagenet_noskip` | 7x7 s2 p3, MaxPool(3,2,1) | Basic [2,2,2,2] | no | tv |
| `resnet18_pc`, `resnet34_pc` | 3x3 s1 | Basic [2,2,2,2] / [3,4,6,3] | no | PyTorch |

(init: PyTorch's default; kn = kaiming_normal_ fan_in; tv = torchvision's.)

All have widths 64/128/256/512 (times 4 after a bottleneck), strides 1/2/2/2,
a 1x1 conv (no bias) + BN projection shortcut where the shape changes,
global average pooling and a dense layer to the logits. `resnet18` has
11,173,962 trainable weights for 10 classes (the masks are extra
non-trainable weights); tests/models/test_model_zoo.py pins every model's count
against the PyTorch original.

Seeds: `resnet18/34/50` are SSAM's `models/resnet.py` (kuangliu's
pytorch-cifar; AutoReP's `ResNet18` is the same network). The `_maxpool` ones
are AutoReP's `models_cifar/resnet_basic.py` `resnet18` / `resnet9`, whose
training script re-initialises every conv and linear weight with
`kaiming_normal_()` (fan_in, gain sqrt(2)); the linear bias keeps PyTorch's
default. The `_imagenet` ones are phd-lab's `models/resnet.py`, which uses the
ImageNet stem at every resolution (even 32 px), conv weights
kaiming_normal_(fan_out), BN gamma 1 / beta 0 and PyTorch's default linear
init; its `resnet18noskip` drops every residual addition and builds no
downsample branch. The `_pc` ones are phd-lab's `models/resnetModified.py`,
whose `_make_layer` hard-codes `noskip=True` [QUIRK]: no residual
connections. That PyTorch module still creates the unused shortcut conv + BN
(173,824 parameters that never get a gradient); a Keras functional model
holds only the layers on the path, so the `_pc` counts here are the
PyTorch count minus those.

Layer names are deterministic: [normalize,] stem_conv (with stem_conv_pad
for the strided 7x7), stem_bn, stem_activation, [stem_pool,]
layer{s}_block{b}_{conv1,bn1,activation1,conv2,bn2,...}, the shortcut's
layer{s}_block{b}_shortcut_{conv,bn}, layer{s}_block{b}_add, the last
activation (activation2 in a basic block, activation3 in a bottleneck), pool,
output. Each activation layer has `site` "after_bn", or "after_residual"
when it follows the residual sum (see `models.registry`); without residuals
every site is "after_bn".

A block is a function `block(x, filters, strides, *, activation, l1_reg,
name, skip=True, conv_init="torch") -> tensor` that adds a projection
shortcut itself when its output shape differs from its input's; `resnet`
stacks blocks into stages, so a new depth only needs a stage list, and
`resnet(..., widths=[4, 8, 8, 8])` builds a miniature of any variant.
"""

import keras

from robust_sparse.models.registry import (AFTER_BN, AFTER_RESIDUAL, MODELS, activation_layer,
                                           batch_norm, conv, logits_layer, max_pool, model_input)

STEMS = ("cifar", "maxpool", "imagenet")


def _shortcut(x, out_channels, strides, *, l1_reg, conv_init, name):
  """Identity, or a 1x1 conv (no bias) + BN when the stride or width changes."""
  if strides == 1 and x.shape[-1] == out_channels:
    return x
  x = conv(x, out_channels, 1, strides=strides, kernel_init=conv_init, l1_reg=l1_reg,
           name=f"{name}_shortcut_conv")
  return batch_norm(x, name=f"{name}_shortcut_bn")


def _residual_end(x, shortcut, activation, *, skip, name, index):
  """Adds the shortcut (unless `skip` is False) and applies the block's last activation."""
  if not skip:
    return activation_layer(x, activation, site=AFTER_BN, name=f"{name}_activation{index}")
  x = keras.layers.Add(name=f"{name}_add")([x, shortcut])
  return activation_layer(x, activation, site=AFTER_RESIDUAL, name=f"{name}_activation{index}")


def basic_block(x, filters, strides, *, activation, l1_reg, name, skip=True,
                conv_init="torch"):
  """ResNet BasicBlock: conv3x3-BN-act-conv3x3-BN, plus the shortcut, then act.

  Args:
    x: input tensor [batch, height, width, channels].
    filters: output channels of both convs.
    strides: stride of the first conv and of the shortcut.
    activation: activation spec (see `robust_sparse.nn.activations`).
    l1_reg: L1 coefficient on every conv kernel.
    name: prefix of the block's layer names, e.g. "layer2_block1".
    skip: False drops the residual sum and the shortcut (phd-lab's noskip).
    conv_init: the convs' `models.registry.KERNEL_INITIALIZERS` name.

  Returns:
    The block's output [batch, ceil(height / strides), ceil(width / strides), filters].
  """
  shortcut = (_shortcut(x, filters, strides, l1_reg=l1_reg, conv_init=conv_init, name=name)
              if skip else None)
  x = conv(x, filters, 3, strides=strides, kernel_init=conv_init, l1_reg=l1_reg,
           name=f"{name}_conv1")
  x = batch_norm(x, name=f"{name}_bn1")
  x = activation_layer(x, activation, site=AFTER_BN, name=f"{name}_activation1")
  x = conv(x, filters, 3, kernel_init=conv_init, l1_reg=l1_reg, name=f"{name}_conv2")
  x = batch_norm(x, name=f"{name}_bn2")
  return _residual_end(x, shortcut, activation, skip=skip, name=name, index=2)


basic_block.expansion = 1


def bottleneck_block(x, filters, strides, *, activation, l1_reg, name, skip=True,
                     conv_init="torch"):
  """ResNet Bottleneck (v1.5, stride on the 3x3): 1x1-BN-act, 3x3-BN-act, 1x1-BN, sum, act.

  The output has `4 * filters` channels (expansion 4); arguments as in
  `basic_block`.
  """
  out_channels = 4 * filters
  shortcut = (_shortcut(x, out_channels, strides, l1_reg=l1_reg, conv_init=conv_init,
                        name=name) if skip else None)
  x = conv(x, filters, 1, kernel_init=conv_init, l1_reg=l1_reg, name=f"{name}_conv1")
  x = batch_norm(x, name=f"{name}_bn1")
  x = activation_layer(x, activation, site=AFTER_BN, name=f"{name}_activation1")
  x = conv(x, filters, 3, strides=strides, kernel_init=conv_init, l1_reg=l1_reg,
           name=f"{name}_conv2")
  x = batch_norm(x, name=f"{name}_bn2")
  x = activation_layer(x, activation, site=AFTER_BN, name=f"{name}_activation2")
  x = conv(x, out_channels, 1, kernel_init=conv_init, l1_reg=l1_reg, name=f"{name}_conv3")
  x = batch_norm(x, name=f"{name}_bn3")
  return _residual_end(x, shortcut, activation, skip=skip, name=name, index=3)


bottleneck_block.expansion = 4


def _stem(x, kind, width, *, activation, l1_reg, conv_init):
  """The stem conv + BN + activation, and the max-pool of the "maxpool" / "imagenet" stems."""
  if kind == "imagenet":
    x = conv(x, width, 7, strides=2, padding=3, kernel_init=conv_init, l1_reg=l1_reg,
             name="stem_conv")
  else:
    x = conv(x, width, 3, kernel_init=conv_init, l1_reg=l1_reg, name="stem_conv")
  x = batch_norm(x, name="stem_bn")
  x = activation_layer(x, activation, site=AFTER_BN, name="stem_activation")
  if kind != "cifar":
    x = max_pool(x, 3, 2, 1, name="stem_pool")
  return x


def resnet(input_shape, num_classes, *, block, blocks_per_stage, widths, strides=None,
           stem="cifar", stem_width=None, skip=True, conv_init="torch", dense_init="torch",
           activation="relu", l1_reg=0.0, normalize="none", name):
  """A ResNet: stem, stages of `block`, global average pool, dense logits.

  Args:
    input_shape: (height, width, channels) of one image.
    num_classes: number of logits.
    block: a block function such as `basic_block` or `bottleneck_block`.
    blocks_per_stage: blocks in each stage, e.g. [2, 2, 2, 2].
    widths: `filters` of each stage's blocks.
    strides: stride of each stage's first block (later blocks use 1);
      default 1 then 2 for every later stage.
    stem: "cifar" (3x3 stride 1), "maxpool" (3x3 stride 1, then
      MaxPool(3, 2, 1)) or "imagenet" (7x7 stride 2 padding 3, then
      MaxPool(3, 2, 1)).
    stem_width: channels of the stem conv; default `widths[0]`.
    skip: False drops every residual sum and shortcut.
    conv_init: every conv's `models.registry.KERNEL_INITIALIZERS` name.
    dense_init: the logits layer's kernel initialisation (its bias keeps
      PyTorch's default).
    activation: activation spec for every nonlinearity.
    l1_reg: L1 coefficient on every conv and dense kernel.
    normalize: a `models.NORMALIZATIONS` name (the model's first layer).
    name: the model's name.

  Returns:
    A `keras.Model` mapping images to logits [batch, num_classes].

  Raises:
    ValueError: if the stage lists differ in length or `stem` is unknown.
  """
  if strides is None:
    strides = [1] + [2] * (len(widths) - 1)
  if not len(blocks_per_stage) == len(widths) == len(strides):
    raise ValueError(f"blocks_per_stage {blocks_per_stage}, widths {widths} and strides "
                     f"{strides} must have the same length")
  if stem not in STEMS:
    raise ValueError(f"unknown ResNet stem {stem!r}; known: {', '.join(STEMS)}")
  inputs, x = model_input(input_shape, normalize)
  x = _stem(x, stem, stem_width or widths[0], activation=activation, l1_reg=l1_reg,
            conv_init=conv_init)
  for stage, (count, filters, stage_strides) in enumerate(
      zip(blocks_per_stage, widths, strides)):
    for index in range(count):
      x = block(x, filters, stage_strides if index == 0 else 1, activation=activation,
                l1_reg=l1_reg, name=f"layer{stage + 1}_block{index + 1}", skip=skip,
                conv_init=conv_init)
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  logits = logits_layer(x, num_classes, l1_reg=l1_reg, kernel_init=dense_init)
  return keras.Model(inputs, logits, name=name)


WIDTHS = [64, 128, 256, 512]

# name -> the `resnet` arguments that define it (see the module docstring).
VARIANTS = {
    "resnet18": dict(block=basic_block, blocks_per_stage=[2, 2, 2, 2]),
    "resnet34": dict(block=basic_block, blocks_per_stage=[3, 4, 6, 3]),
    "resnet50": dict(block=bottleneck_block, blocks_per_stage=[3, 4, 6, 3]),
    "resnet18_maxpool": dict(block=basic_block, blocks_per_stage=[2, 2, 2, 2], stem="maxpool",
                             conv_init="kaiming_normal", dense_init="kaiming_normal"),
    "resnet9_maxpool": dict(block=basic_block, blocks_per_stage=[1, 1, 1, 1], stem="maxpool",
                            conv_init="kaiming_normal", dense_init="kaiming_normal"),
    "resnet18_imagenet": dict(block=basic_block, blocks_per_stage=[2, 2, 2, 2],
                              stem="imagenet", conv_init="kaiming_normal_fan_out"),
    "resnet34_imagenet": dict(block=basic_block, blocks_per_stage=[3, 4, 6, 3],
                              stem="imagenet", conv_init="kaiming_normal_fan_out"),
    "resnet50_imagenet": dict(block=bottleneck_block, blocks_per_stage=[3, 4, 6, 3],
                              stem="imagenet", conv_init="kaiming_normal_fan_out"),
    "resnet18_imagenet_noskip": dict(block=basic_block, blocks_per_stage=[2, 2, 2, 2],
                                     stem="imagenet", conv_init="kaiming_normal_fan_out",
                                     skip=False),
    "resnet18_pc": dict(block=basic_block, blocks_per_stage=[2, 2, 2, 2], skip=False),
    "resnet34_pc": dict(block=basic_block, blocks_per_stage=[3, 4, 6, 3], skip=False),
}


def _register(name, options):
  def build(input_shape, num_classes, activation="relu", l1_reg=0.0, normalize="none",
            dropout=0.0):
    del dropout  # No dropout option: the registry entry refuses a nonzero rate.
    return resnet(input_shape, num_classes, widths=WIDTHS, activation=activation,
                  l1_reg=l1_reg, normalize=normalize, name=name, **options)

  build.__name__ = name
  build.__doc__ = f"The {name} ResNet (see the `models.resnet` module docstring)."
  # Every stride-2 conv and pool pads like PyTorch, so even a 1x1 input keeps
  # one pixel through every stage, as in the seeds.
  return MODELS.register(name)(build)


resnet18 = _register("resnet18", VARIANTS["resnet18"])
resnet34 = _register("resnet34", VARIANTS["resnet34"])
resnet50 = _register("resnet50", VARIANTS["resnet50"])
resnet18_maxpool = _register("resnet18_maxpool", VARIANTS["resnet18_maxpool"])
resnet9_maxpool = _register("resnet9_maxpool", VARIANTS["resnet9_maxpool"])
resnet18_imagenet = _register("resnet18_imagenet", VARIANTS["resnet18_imagenet"])
resnet34_imagenet = _register("resnet34_imagenet", VARIANTS["resnet34_imagenet"])
resnet50_imagenet = _register("resnet50_imagenet", VARIANTS["resnet50_imagenet"])
resnet18_imagenet_noskip = _register("resnet18_imagenet_noskip",
                                     VARIANTS["resnet18_imagenet_noskip"])
resnet18_pc = _register("resnet18_pc", VARIANTS["resnet18_pc"])
resnet34_pc = _register("resnet34_pc", VARIANTS["resnet34_pc"])
