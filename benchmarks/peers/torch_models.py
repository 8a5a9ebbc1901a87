"""PyTorch counterparts of the zoo models that `benchmarks/bench_models.py` times.

Written from the Keras zoo (`models/`), layer for layer: the same widths,
strides, padding, pooling, normalisation and activations, so a training step
does the same arithmetic in both frameworks and the trainable parameter
counts are equal (the benchmark asserts it; `tests/benchmarks/test_bench_models.py` too).
Images are NCHW here (PyTorch's default, what the seeds use), NHWC in Keras.

| name | Keras source | PyTorch seed it follows |
|---|---|---|
| `dense-300-100` | `models/registry.py` | robust-sparse-networks' MLP (no biases) |
| `conv-bn` | `models/registry.py` | (the toolkit's own tiny BN convnet) |
| `resnet18` | `models/resnet.py` | kuangliu pytorch-cifar / SSAM `resnet18` |
| `resnet18_maxpool` | `models/resnet.py` | AutoReP `resnet_basic.resnet18` |
| `vgg16_bn` | `models/vgg.py` | SSAM `vgg16_bn` (classifier 4096-4096) |
| `wideresnet16x4` | `models/wideresnet.py` | SSAM `WideResNet(16, 4)` |
| `vit_tiny` | `models/vit.py` | torchvision `VisionTransformer` at the zoo's tiny size |

Only speed is measured, so every layer keeps PyTorch's default
initialisation (the zoo follows each seed's; that changes no FLOP).

  build(name, input_shape, num_classes) -> torch.nn.Module
"""

import torch
from torch import nn


def trainable_count(module: nn.Module) -> int:
  """Trainable parameters, as `models.check_zoo.trainable_count` counts the Keras model's."""
  return sum(p.numel() for p in module.parameters() if p.requires_grad)


def _bn(channels):
  # The zoo's `batch_norm` is PyTorch's defaults (momentum 0.1, eps 1e-5).
  return nn.BatchNorm2d(channels)


# ----------------------------------------------------------------------------
# The lottery-ticket MLP and the tiny BN convnet.


def dense_300_100(input_shape, num_classes):
  """784-300-100-classes, ReLU, no biases (the zoo's `dense-300-100`)."""
  inputs = 1
  for side in input_shape:
    inputs *= side
  return nn.Sequential(
      nn.Flatten(),
      nn.Linear(inputs, 300, bias=False), nn.ReLU(),
      nn.Linear(300, 100, bias=False), nn.ReLU(),
      nn.Linear(100, num_classes, bias=False))


def conv_bn(input_shape, num_classes):
  """conv 16@3x3 - BN - ReLU - conv 32@3x3 stride 2 - BN - ReLU - global pool - dense."""
  channels = input_shape[-1]
  return nn.Sequential(
      nn.Conv2d(channels, 16, 3, 1, 1, bias=False), _bn(16), nn.ReLU(),
      nn.Conv2d(16, 32, 3, 2, 1, bias=False), _bn(32), nn.ReLU(),
      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


# ----------------------------------------------------------------------------
# ResNets (models/resnet.py): basic blocks, projection shortcut where the shape changes.


class BasicBlock(nn.Module):
  """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (identity or 1x1 conv + BN), ReLU."""

  def __init__(self, in_channels, filters, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(in_channels, filters, 3, stride, 1, bias=False)
    self.bn1 = _bn(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.bn2 = _bn(filters)
    self.shortcut = nn.Identity()
    if stride != 1 or in_channels != filters:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, filters, 1, stride, bias=False),
                                    _bn(filters))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
  """3x3 stride-1 stem + BN + ReLU [+ MaxPool(3, 2, 1)], four stages, global pool, dense.

  Args:
    input_shape: (height, width, channels), the Keras order.
    num_classes: logits.
    blocks_per_stage: basic blocks per stage ([2, 2, 2, 2] for ResNet-18).
    maxpool: AutoReP's stem max-pool (`resnet18_maxpool`).
  """

  WIDTHS = (64, 128, 256, 512)

  def __init__(self, input_shape, num_classes, blocks_per_stage=(2, 2, 2, 2), maxpool=False):
    super().__init__()
    width = self.WIDTHS[0]
    stem = [nn.Conv2d(input_shape[-1], width, 3, 1, 1, bias=False), _bn(width), nn.ReLU()]
    if maxpool:
      stem.append(nn.MaxPool2d(3, 2, 1))
    self.stem = nn.Sequential(*stem)
    layers, in_channels = [], width
    for stage, (count, filters) in enumerate(zip(blocks_per_stage, self.WIDTHS)):
      for index in range(count):
        stride = 2 if stage > 0 and index == 0 else 1
        layers.append(BasicBlock(in_channels, filters, stride))
        in_channels = filters
    self.layers = nn.Sequential(*layers)
    self.pool = nn.AdaptiveAvgPool2d(1)
    self.output = nn.Linear(in_channels, num_classes)

  def forward(self, x):
    x = self.layers(self.stem(x))
    return self.output(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------
# SSAM's VGG with batch norm (models/vgg.py, `vgg_bn`).

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M")


def vgg16_bn(input_shape, num_classes, classifier_width=4096):
  """Config D of conv3x3 (bias, padding 1) - BN - ReLU and 2x2 max-pools, then
  flatten - 4096 - ReLU - Dropout(0.5) - 4096 - ReLU - Dropout(0.5) - logits."""
  layers, channels = [], input_shape[-1]
  height, width = input_shape[0], input_shape[1]
  for item in VGG16:
    if item == "M":
      layers.append(nn.MaxPool2d(2, 2))
      height, width = height // 2, width // 2
      continue
    layers += [nn.Conv2d(channels, item, 3, 1, 1, bias=True), _bn(item), nn.ReLU()]
    channels = item
  features = channels * height * width
  layers += [nn.Flatten(),
             nn.Linear(features, classifier_width), nn.ReLU(), nn.Dropout(0.5),
             nn.Linear(classifier_width, classifier_width), nn.ReLU(), nn.Dropout(0.5),
             nn.Linear(classifier_width, num_classes)]
  return nn.Sequential(*layers)


# ----------------------------------------------------------------------------
# Wide ResNets (models/wideresnet.py): pre-activation blocks.


class WideBlock(nn.Module):
  """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut, no activation after the sum.

  When the width or stride changes, the shortcut is a 1x1 conv of the
  activated input (as the seed, which overwrites x with its activation);
  else it is the raw input.
  """

  def __init__(self, in_channels, filters, stride):
    super().__init__()
    self.bn1 = _bn(in_channels)
    self.conv1 = nn.Conv2d(in_channels, filters, 3, stride, 1, bias=False)
    self.bn2 = _bn(filters)
    self.conv2 = nn.Conv2d(filters, filters, 3, 1, 1, bias=False)
    self.shortcut = None
    if in_channels != filters or stride != 1:
      self.shortcut = nn.Conv2d(in_channels, filters, 1, stride, bias=False)

  def forward(self, x):
    activated = torch.relu(self.bn1(x))
    shortcut = x if self.shortcut is None else self.shortcut(activated)
    out = self.conv1(activated)
    out = self.conv2(torch.relu(self.bn2(out)))
    return shortcut + out


def wide_resnet(input_shape, num_classes, depth, widen_factor):
  """WRN-depth-k: 3x3 conv (16), three groups of (depth - 4) / 6 blocks of widths
  16k, 32k, 64k (strides 1, 2, 2), BN, ReLU, global pool, dense."""
  if depth < 10 or (depth - 4) % 6:
    raise ValueError(f"a wide ResNet's depth must be 6n+4 with n >= 1, got {depth}")
  blocks = (depth - 4) // 6
  k = widen_factor
  layers = [nn.Conv2d(input_shape[-1], 16, 3, 1, 1, bias=False)]
  in_channels = 16
  for filters, stride in zip((16 * k, 32 * k, 64 * k), (1, 2, 2)):
    for index in range(blocks):
      layers.append(WideBlock(in_channels, filters, stride if index == 0 else 1))
      in_channels = filters
  layers += [_bn(in_channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(in_channels, num_classes)]
  return nn.Sequential(*layers)


# ----------------------------------------------------------------------------
# The ViT (models/vit.py, vanilla): torchvision's encoder at the zoo's "tiny" size.


class EncoderBlock(nn.Module):
  """Pre-LN: x + attention(ln_1(x)), then x + mlp(ln_2(x)); LayerNorm eps 1e-6.

  The attention is `nn.MultiheadAttention` (torchvision's), whose stacked
  in-projection holds the parameters of the zoo's separate query, key and
  value layers.
  """

  def __init__(self, width, heads, mlp_width):
    super().__init__()
    self.ln_1 = nn.LayerNorm(width, eps=1e-6)
    self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
    self.ln_2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.ReLU(),
                             nn.Linear(mlp_width, width))

  def forward(self, x):
    y = self.ln_1(x)
    y, _ = self.attention(y, y, y, need_weights=False)
    x = x + y
    return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
  """Patch conv (patch x patch, stride patch), class token, learned position
  embeddings, pre-LN encoder blocks, final LayerNorm, linear head on the class token."""

  def __init__(self, input_shape, num_classes, patch_size=4, depth=4, heads=4, width=128,
               mlp_width=512):
    super().__init__()
    height, image_width, channels = input_shape
    if height % patch_size or image_width % patch_size:
      raise ValueError(f"image {height}x{image_width} not divisible by patch {patch_size}")
    tokens = (height // patch_size) * (image_width // patch_size) + 1
    self.patch_embedding = nn.Conv2d(channels, width, patch_size, patch_size)
    self.class_token = nn.Parameter(torch.zeros(1, 1, width))
    self.position_embedding = nn.Parameter(torch.empty(1, tokens, width).normal_(std=0.02))
    self.blocks = nn.Sequential(*[EncoderBlock(width, heads, mlp_width)
                                  for _ in range(depth)])
    self.final_ln = nn.LayerNorm(width, eps=1e-6)
    self.output = nn.Linear(width, num_classes)

  def forward(self, x):
    x = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [batch, patches, width]
    x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    x = self.blocks(x + self.position_embedding)
    return self.output(self.final_ln(x)[:, 0])


# ----------------------------------------------------------------------------

BUILDERS = {
    "dense-300-100": dense_300_100,
    "conv-bn": conv_bn,
    "resnet18": lambda shape, classes: ResNet(shape, classes),
    "resnet18_maxpool": lambda shape, classes: ResNet(shape, classes, maxpool=True),
    "vgg16_bn": vgg16_bn,
    "wideresnet16x4": lambda shape, classes: wide_resnet(shape, classes, 16, 4),
    "vit_tiny": lambda shape, classes: VisionTransformer(shape, classes),
}


def build(name, input_shape, num_classes):
  """The PyTorch module of zoo model `name` for `input_shape` (H, W, C) images.

  Raises:
    ValueError: a model without a counterpart here (the message lists those there are).
  """
  try:
    builder = BUILDERS[name]
  except KeyError:
    raise ValueError(f"no PyTorch counterpart of model {name!r}; known: "
                     f"{', '.join(BUILDERS)}") from None
  return builder(tuple(input_shape), num_classes)
