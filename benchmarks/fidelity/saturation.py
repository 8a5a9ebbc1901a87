"""Fidelity of layer saturation (spec 5.1, `robust_sparse.measure.saturation`) against delve 0.1.50.

A conv-bn network (two masked 3x3 convs with batch norm, a dense layer, a
dead dense layer added to it: zero kernel and bias, and the 10-unit output
layer), random 50 % masks, measured as the toolkit's engine does: the tap
model's raw conv / dense outputs feed a `SaturationTracker` batch by batch,
training batches in training mode (batch statistics), evaluation batches in
inference mode. delve 0.1.50 itself (`benchmarks/peers/fidelity_delve.py`)
gets the same activations and computes each layer's saturation and
intrinsic dimensionality with its own tracker. Every layer type is compared:
conv maps (nearest-resized to `downsampling` by delve's interpolate, then
channelwise), dense, the output layer, the dead layer (0) and, under
`downsampling` 1 on images with a black corner (as MNIST's), the first conv,
whose top-left output is its bias for every image (a constant-input layer:
0, see the peer's note on its first-row shift).

The synthetic variants need no data; the MNIST variant trains the network
for one short epoch on real MNIST (`--data_dir`) first.
"""

import numpy as np

from benchmarks.fidelity import Check

DELTA = 0.99
BATCH = 64
REFERENCE = "delve 0.1.50's SaturationTracker on the same activations"


def _model(size, seed):
  import keras
  from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((size, size, 1))
  x = MaskedConv2D(6, 3, padding="same", bias_initializer="random_normal", name="conv_1")(inputs)
  x = keras.layers.BatchNormalization(name="bn_1")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.MaxPooling2D(2)(x)
  x = MaskedConv2D(8, 3, padding="same", bias_initializer="random_normal", name="conv_2")(x)
  x = keras.layers.BatchNormalization(name="bn_2")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.MaxPooling2D(2)(x)
  x = keras.layers.Flatten()(x)
  x = MaskedDense(16, bias_initializer="random_normal", name="dense")(x)
  dead = MaskedDense(16, kernel_initializer="zeros", name="dead")(x)
  x = keras.layers.ReLU()(keras.layers.Add()([x, dead]))
  model = keras.Model(inputs, MaskedDense(10, name="output")(x))
  rng = np.random.default_rng(seed)
  for name in ("conv_1", "conv_2", "dense", "output"):
    layer = model.get_layer(name)
    layer.mask.assign((rng.random(layer.mask.shape) < 0.5).astype(np.float32))
  return model


def _synthetic(size, count, seed):
  """Images with a black 4x4 top-left corner (as MNIST's), labels from a random linear rule."""
  rng = np.random.default_rng(seed)
  x = rng.random((count, size, size, 1)).astype(np.float32)
  x[:, :4, :4] = 0.0
  y = (x.reshape(count, -1) @ rng.normal(size=(size * size, 10))).argmax(-1)
  return x, y


def _measure(model, splits, downsampling, shift):
  """Feeds the tracker split by split in batches; returns (inputs, outputs) of a check."""
  import tensorflow as tf
  from robust_sparse.measure import saturation
  tracker = saturation.SaturationTracker.for_model(model, delta=DELTA, downsampling=downsampling)
  taps = saturation.tap_model(model)
  inputs = {"names": np.array(tracker.layer_names), "delta": np.array(DELTA),
            "downsampling": np.array(-1 if downsampling is None else downsampling),
            "shift": np.array(int(shift))}
  for split, x in splits.items():
    training = split == "train"

    @tf.function
    def step(batch, training=training, split=split):
      outputs = taps(batch, training=training)[1:]
      tracker.update(outputs, split)
      return outputs

    seen = [step(tf.constant(x[i:i + BATCH])) for i in range(0, len(x), BATCH)]
    for index in range(len(tracker.layer_names)):
      inputs[f"{split}/{index}"] = np.concatenate([s[index].numpy() for s in seen])
  outputs = {k: np.array(v) for k, v in tracker.results().items()}
  return inputs, outputs


def _synthetic_check(downsampling, shift):
  def ours(context):
    model = _model(12, context.seed)
    x, _ = _synthetic(12, 6 * BATCH + 17, context.seed + 1)
    x_eval, _ = _synthetic(12, 2 * BATCH + 5, context.seed + 2)
    return _measure(model, {"train": x, "eval": x_eval}, downsampling, shift)
  return ours


def _mnist(context):
  import keras
  from robust_sparse.data import load_dataset
  digits = load_dataset("digits", context.data_dir, 0)
  model = _model(28, context.seed)
  model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(digits.x_train[:4096], digits.y_train[:4096], batch_size=BATCH, epochs=1,
            verbose=0, shuffle=False)
  dead = model.get_layer("dead")  # Training moved it; dead again for the measurement.
  dead.kernel.assign(np.zeros(dead.kernel.shape, np.float32))
  dead.bias.assign(np.zeros(dead.bias.shape, np.float32))
  return model, digits


def _mnist_check(downsampling, shift):
  def ours(context):
    model, digits = _mnist(context)
    return _measure(model, {"train": digits.x_train[:1000], "eval": digits.x_test[:500]},
                    downsampling, shift)
  return ours


CHECKS = [
    Check(name="saturation per layer type (conv at downsampling 2, dense, output, dead "
               "layer), synthetic conv-bn",
          reference=REFERENCE, tolerance=1e-12, ours=_synthetic_check(2, shift=False),
          peer="benchmarks.peers.fidelity_delve:saturation", needs=("torch", "delve")),
    Check(name="saturation at downsampling 1 with a constant-input conv, synthetic conv-bn",
          reference=REFERENCE + " (activations less their first row)", tolerance=1e-12,
          ours=_synthetic_check(1, shift=True),
          peer="benchmarks.peers.fidelity_delve:saturation", needs=("torch", "delve")),
    Check(name="saturation of a conv-bn trained on MNIST, downsampling 1 (paper configs; "
               "constant-input first conv)",
          reference=REFERENCE + " (activations less their first row)", tolerance=1e-12,
          ours=_mnist_check(1, shift=True),
          peer="benchmarks.peers.fidelity_delve:saturation", needs=("torch", "delve"),
          needs_data=True),
    Check(name="saturation of a conv-bn trained on MNIST, whole conv maps",
          reference=REFERENCE, tolerance=1e-12, ours=_mnist_check(None, shift=False),
          peer="benchmarks.peers.fidelity_delve:saturation", needs=("torch", "delve"),
          needs_data=True),
]
