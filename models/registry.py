"""The model registry (`--model`) and the layer helpers its builders share.

An entry builds a Keras functional model from
`(input_shape, num_classes, activation, l1_reg)`; every prunable layer is a
`MaskedDense` or `MaskedConv2D`, hidden activations come from the activation
registry, and the model outputs logits (the softmax lives in the loss).

Every layer gets an explicit name, the Input, pooling and batch-norm layers
included: Keras numbers unnamed layers per process (`batch_normalization_1` on
the second build), and the engine matches saved variables by `variable.path`,
so a model built twice in one process must name everything the same way.

Batch-norm models (`conv-bn` here, the ResNets in `models/resnet.py`) follow
PyTorch's defaults, as the seeds that use them are PyTorch code: see
`torch_kernel_initializer` and `batch_norm`. Their activation layers carry a
`site` attribute, "after_bn" or "after_residual" (AutoReP's `var_map` 1 / 2),
for methods that treat the two kinds of ReLU differently.
"""

import math

import keras

from robust_sparse import activations
from robust_sparse.layers import MaskedConv2D, MaskedDense
from robust_sparse.registry import Registry

MODELS = Registry("model")

# Values of the `site` attribute of an activation layer in a batch-norm model.
AFTER_BN = "after_bn"
AFTER_RESIDUAL = "after_residual"


def l1_regularizer(l1_reg):
  """The kernel regulariser of every masked layer: L1(l1_reg), or None for 0."""
  return keras.regularizers.L1(l1_reg) if l1_reg else None


def torch_kernel_initializer():
  """PyTorch's default Conv/Linear weight init: kaiming_uniform_(a=sqrt(5)).

  That is U(-b, b) with b = 1/sqrt(fan_in), i.e. VarianceScaling(1/3, fan_in,
  uniform). A fresh instance per layer: an unseeded Keras initializer draws
  its seed once, so a shared instance would give equal kernels of equal shape.
  """
  return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_initializer(fan_in):
  """PyTorch's default Linear bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return keras.initializers.RandomUniform(-bound, bound)


def conv(x, filters, kernel_size, *, strides=1, l1_reg=0.0, name):
  """A bias-free masked conv with PyTorch's padding k//2 and default init.

  With stride 1, 'same' padding is PyTorch's symmetric padding. With stride
  2 on an even input, 'same' pads only the bottom/right, which shifts the
  sampling grid by one pixel from PyTorch's; a `{name}_pad` ZeroPadding2D
  then pads symmetrically instead, so PyTorch weights port unchanged.

  Args:
    x: input tensor [batch, height, width, channels].
    filters, kernel_size, strides: as in `keras.layers.Conv2D`.
    l1_reg: L1 coefficient on the kernel (0 for none).
    name: the conv layer's name.

  Returns:
    The output tensor.
  """
  padding = "same"
  if strides != 1 and kernel_size > 1:
    x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    padding = "valid"
  return MaskedConv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=False,
                      kernel_initializer=torch_kernel_initializer(),
                      kernel_regularizer=l1_regularizer(l1_reg), name=name)(x)


def batch_norm(x, *, name):
  """BatchNormalization with PyTorch's defaults (momentum 0.1 = Keras 0.9, eps 1e-5).

  One known difference: PyTorch updates the running variance with the
  unbiased batch variance, Keras with the biased one (a factor n/(n-1)).
  """
  return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x)


def activation_layer(x, activation, *, site, name):
  """Applies a fresh `activation` layer tagged with `site` (AFTER_BN / AFTER_RESIDUAL)."""
  layer = activations.build(activation, name=name)
  # A plain attribute, not config: it describes the layer's place in this
  # architecture, which rebuilding the model restores.
  layer.site = site
  return layer(x)


def logits_layer(x, num_classes, *, l1_reg=0.0, name="output"):
  """Global-average-pooled features -> masked dense logits, PyTorch-initialised."""
  fan_in = x.shape[-1]
  return MaskedDense(num_classes, kernel_initializer=torch_kernel_initializer(),
                     bias_initializer=torch_bias_initializer(fan_in),
                     kernel_regularizer=l1_regularizer(l1_reg), name=name)(x)


def _dense_stack(x, units, activation, l1_reg, use_bias, names=None):
  """Hidden masked dense layers, each followed by an activation, then the logits."""
  for i, width in enumerate(units[:-1]):
    name = names[i] if names else f"dense_{i + 1}"
    x = MaskedDense(width, use_bias=use_bias, kernel_regularizer=l1_regularizer(l1_reg),
                    name=name)(x)
    x = activations.build(activation, name=f"{name}_activation")(x)
  return MaskedDense(units[-1], use_bias=use_bias, kernel_regularizer=l1_regularizer(l1_reg),
                     name="output")(x)


@MODELS.register("dense-300-100")
def dense_300_100(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """The seed's 784-300-100-10 network without biases (layers hidden_1, hidden_2, output)."""
  inputs = keras.Input(input_shape, name="input")
  x = keras.layers.Flatten(name="flatten")(inputs)
  logits = _dense_stack(x, [300, 100, num_classes], activation, l1_reg, use_bias=False,
                        names=["hidden_1", "hidden_2"])
  return keras.Model(inputs, logits, name="dense-300-100")


@MODELS.register("lenet5")
def lenet5(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84.

  'same' padding keeps it valid for any input of at least 4x4 pixels.
  """
  inputs = keras.Input(input_shape, name="input")
  x = inputs
  for i, filters in enumerate([6, 16]):
    x = MaskedConv2D(filters, 5, padding="same", kernel_regularizer=l1_regularizer(l1_reg),
                     name=f"conv_{i + 1}")(x)
    x = activations.build(activation, name=f"conv_{i + 1}_activation")(x)
    x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{i + 1}")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  logits = _dense_stack(x, [120, 84, num_classes], activation, l1_reg, use_bias=True)
  return keras.Model(inputs, logits, name="lenet5")


def _conv_net(name, blocks):
  """The lottery-ticket paper's Conv-2/4/6: pairs of 3x3 convs then 2x2 max-pool, FC 256-256."""

  def build(input_shape, num_classes, activation="relu", l1_reg=0.0):
    inputs = keras.Input(input_shape, name="input")
    x = inputs
    index = 0
    for block, filters in enumerate(blocks):
      for _ in range(2):
        index += 1
        x = MaskedConv2D(filters, 3, padding="same",
                         kernel_regularizer=l1_regularizer(l1_reg), name=f"conv_{index}")(x)
        x = activations.build(activation, name=f"conv_{index}_activation")(x)
      x = keras.layers.MaxPooling2D(2, padding="same", name=f"pool_{block + 1}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    logits = _dense_stack(x, [256, 256, num_classes], activation, l1_reg, use_bias=True)
    return keras.Model(inputs, logits, name=name)

  return build


MODELS.register("conv-2")(_conv_net("conv-2", [64]))
MODELS.register("conv-4")(_conv_net("conv-4", [64, 128]))
MODELS.register("conv-6")(_conv_net("conv-6", [64, 128, 256]))


@MODELS.register("conv-bn")
def conv_bn(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """A tiny batch-norm convnet (about 5.5k weights) for tests and quick CPU studies.

  conv 16@3x3 - BN - act - conv 32@3x3 stride 2 - BN - act - global average
  pool - dense; the layers are those of the ResNets (bias-free convs, PyTorch
  init and BN defaults), so it is a cheap stand-in for them.
  """
  inputs = keras.Input(input_shape, name="input")
  x = inputs
  for i, (filters, strides) in enumerate([(16, 1), (32, 2)]):
    prefix = f"conv_{i + 1}"
    x = conv(x, filters, 3, strides=strides, l1_reg=l1_reg, name=prefix)
    x = batch_norm(x, name=f"{prefix}_bn")
    x = activation_layer(x, activation, site=AFTER_BN, name=f"{prefix}_activation")
  x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
  logits = logits_layer(x, num_classes, l1_reg=l1_reg)
  return keras.Model(inputs, logits, name="conv-bn")


def build_model(name, input_shape, num_classes, activation="relu", l1_reg=0.0):
  """Builds the registered model `name` (see the module docstring)."""
  return MODELS.get(name)(tuple(input_shape), num_classes, activation=activation,
                          l1_reg=l1_reg)
