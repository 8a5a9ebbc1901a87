"""The model registry (`--model`).

An entry builds a Keras functional model from
`(input_shape, num_classes, activation, l1_reg)`; every prunable layer is a
`MaskedDense` or `MaskedConv2D`, hidden activations come from the activation
registry, and the model outputs logits (the softmax lives in the loss).
"""

import keras

from robust_sparse import activations
from robust_sparse.layers import MaskedConv2D, MaskedDense
from robust_sparse.registry import Registry

MODELS = Registry("model")


def _regularizer(l1_reg):
  return keras.regularizers.L1(l1_reg) if l1_reg else None


def _dense_stack(x, units, activation, l1_reg, use_bias, names=None):
  """Hidden masked dense layers, each followed by an activation, then the logits."""
  for i, width in enumerate(units[:-1]):
    name = names[i] if names else f"dense_{i + 1}"
    x = MaskedDense(width, use_bias=use_bias, kernel_regularizer=_regularizer(l1_reg),
                    name=name)(x)
    x = activations.build(activation, name=f"{name}_activation")(x)
  return MaskedDense(units[-1], use_bias=use_bias, kernel_regularizer=_regularizer(l1_reg),
                     name="output")(x)


@MODELS.register("dense-300-100")
def dense_300_100(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """The seed's 784-300-100-10 network without biases (layers hidden_1, hidden_2, output)."""
  inputs = keras.Input(input_shape)
  x = keras.layers.Flatten()(inputs)
  logits = _dense_stack(x, [300, 100, num_classes], activation, l1_reg, use_bias=False,
                        names=["hidden_1", "hidden_2"])
  return keras.Model(inputs, logits, name="dense-300-100")


@MODELS.register("lenet5")
def lenet5(input_shape, num_classes, activation="relu", l1_reg=0.0):
  """LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, dense 120, 84.

  'same' padding keeps it valid for any input of at least 4x4 pixels.
  """
  inputs = keras.Input(input_shape)
  x = inputs
  for i, filters in enumerate([6, 16]):
    x = MaskedConv2D(filters, 5, padding="same", kernel_regularizer=_regularizer(l1_reg),
                     name=f"conv_{i + 1}")(x)
    x = activations.build(activation, name=f"conv_{i + 1}_activation")(x)
    x = keras.layers.MaxPooling2D(2, padding="same")(x)
  x = keras.layers.Flatten()(x)
  logits = _dense_stack(x, [120, 84, num_classes], activation, l1_reg, use_bias=True)
  return keras.Model(inputs, logits, name="lenet5")


def _conv_net(name, blocks):
  """The lottery-ticket paper's Conv-2/4/6: pairs of 3x3 convs then 2x2 max-pool, FC 256-256."""

  def build(input_shape, num_classes, activation="relu", l1_reg=0.0):
    inputs = keras.Input(input_shape)
    x = inputs
    index = 0
    for filters in blocks:
      for _ in range(2):
        index += 1
        x = MaskedConv2D(filters, 3, padding="same",
                         kernel_regularizer=_regularizer(l1_reg), name=f"conv_{index}")(x)
        x = activations.build(activation, name=f"conv_{index}_activation")(x)
      x = keras.layers.MaxPooling2D(2, padding="same")(x)
    x = keras.layers.Flatten()(x)
    logits = _dense_stack(x, [256, 256, num_classes], activation, l1_reg, use_bias=True)
    return keras.Model(inputs, logits, name=name)

  return build


MODELS.register("conv-2")(_conv_net("conv-2", [64]))
MODELS.register("conv-4")(_conv_net("conv-4", [64, 128]))
MODELS.register("conv-6")(_conv_net("conv-6", [64, 128, 256]))


def build_model(name, input_shape, num_classes, activation="relu", l1_reg=0.0):
  """Builds the registered model `name` (see the module docstring)."""
  return MODELS.get(name)(tuple(input_shape), num_classes, activation=activation,
                          l1_reg=l1_reg)
