"""Masked layers in a user's own `model.fit`: the fast path trains exactly as the masked one.

In a training call a masked layer computes with its kernel variable (no
`kernel * mask`) once it knows the kernel is zero where masked, and leaves the
kernel gradient unmasked under an element-wise optimizer (robust_sparse/nn/layers.py).
The reference is the same layer computing with `kernel * mask` in every call,
as every call did before: both must give the same weights, with random masks,
momentum, Adam, weight decay and norm clipping, and with kernels and masks
written directly between fits and during one.
"""

import numpy as np
import keras
import pytest
import tensorflow as tf

from robust_sparse.nn.layers import MaskedConv2D, MaskedDense, enforce_masks, masked_layers


class _MultiplyingDense(MaskedDense):
  """The reference: `kernel * mask` (and its masked gradient) in every call."""

  def _call_kernel(self, training):
    return self.masked_kernel


class _MultiplyingConv2D(MaskedConv2D):
  def _call_kernel(self, training):
    return self.masked_kernel


OPTIMIZERS = {
    "sgd-momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
    "sgd-nesterov-weight-decay": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True,
                                                              weight_decay=0.01),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    # Norm clipping counts every gradient: these keep the gradient masked.
    "adam-global-clipnorm": lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.5),
    "sgd-clipnorm": lambda: keras.optimizers.SGD(0.05, momentum=0.9, clipnorm=0.1),
}


def _dense_net(dense):
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input((12,)), dense(16, activation="relu", name="hidden"),
                           dense(3, name="logits")])


def _conv_net(conv, dense):
  keras.utils.set_random_seed(1)
  return keras.Sequential([keras.Input((6, 6, 2)), conv(4, 3, activation="relu", name="conv"),
                           keras.layers.Flatten(), dense(3, name="logits")])


NETWORKS = {
    "dense": (lambda: _dense_net(MaskedDense), lambda: _dense_net(_MultiplyingDense),
              (12,)),
    "conv": (lambda: _conv_net(MaskedConv2D, MaskedDense),
             lambda: _conv_net(_MultiplyingConv2D, _MultiplyingDense), (6, 6, 2)),
}


def _data(input_shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(48,) + input_shape).astype(np.float32),
          rng.integers(0, 3, 48))


def _random_masks(model, seed, keep=0.6):
  rng = np.random.default_rng(seed)
  return {layer.name: (rng.random(layer.mask.shape) < keep).astype(np.float32)
          for layer in masked_layers(model)}


def _write(model, masks=None, kernels_seed=None):
  """Assigns masks and/or kernels directly (the kernels non-zero where masked too)."""
  for layer in masked_layers(model):
    if kernels_seed is not None:
      rng = np.random.default_rng(kernels_seed)
      layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    if masks is not None:
      layer.mask.assign(masks[layer.name])


def _compile(model, optimizer):
  model.compile(optimizer=optimizer,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _kernels(model):
  return {layer.name: layer.kernel.numpy() for layer in masked_layers(model)}


def _assert_same_training(fast, reference):
  for layer in masked_layers(fast):
    np.testing.assert_allclose(layer.kernel.numpy(), reference.get_layer(layer.name).kernel.numpy(),
                               rtol=1e-5, atol=1e-6, err_msg=layer.name)
    pruned = layer.mask.numpy() == 0
    assert pruned.any() and (~pruned).any()
    assert np.all(layer.kernel.numpy()[pruned] == 0.0), layer.name


def _both(network):
  make_fast, make_reference, input_shape = NETWORKS[network]
  fast, reference = make_fast(), make_reference()
  reference.set_weights(fast.get_weights())
  return fast, reference, input_shape


# Every optimizer on the conv net, which holds both kinds of masked layer (a conv and a
# dense); the dense net once (it is also in every test below).
FIT_CASES = [("conv", name) for name in sorted(OPTIMIZERS)] + [
    ("dense", "sgd-nesterov-weight-decay")]


@pytest.mark.parametrize("network,optimizer", FIT_CASES)
def test_fit_trains_as_the_masked_computation(network, optimizer):
  """Random masks and kernels written before and between fits, then more pruning."""
  fast, reference, input_shape = _both(network)
  x, y = _data(input_shape)
  first = _random_masks(fast, seed=2)
  for model in (fast, reference):
    _write(model, masks=first, kernels_seed=3)  # Kernels non-zero where masked.
    _compile(model, OPTIMIZERS[optimizer]())
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)
  # Prune more, and write kernels whose pruned weights are not zero, between fits.
  second = {name: mask * (np.random.default_rng(4).random(mask.shape) < 0.7)
            for name, mask in first.items()}
  for model in (fast, reference):
    _write(model, kernels_seed=5)
    _write(model, masks=second)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_revived_weights_start_from_the_written_kernel(network):
  """A mask that revives pruned weights, with a fresh optimizer: the same training.

  (With the same optimizer, the revived weights' slots differ: unmasked
  gradients fed them meanwhile, see robust_sparse/nn/layers.py.)
  """
  fast, reference, input_shape = _both(network)
  x, y = _data(input_shape, seed=6)
  first, second = _random_masks(fast, seed=7), _random_masks(fast, seed=8)
  for model in (fast, reference):
    _write(model, masks=first)
    _compile(model, keras.optimizers.Adam(0.01))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # Kernel first, then a mask that revives weights the old one pruned (as
    # `set_weights` and the runner's `assign_weights` write them).
    _write(model, kernels_seed=9)
    _write(model, masks=second)
    _compile(model, keras.optimizers.Adam(0.01))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)


def test_set_weights_and_load_weights_are_honoured(tmp_path):
  fast, reference, input_shape = _both("dense")
  x, y = _data(input_shape, seed=10)
  for model in (fast, reference):
    _compile(model, keras.optimizers.SGD(0.05, momentum=0.9))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  # Weights whose kernels are non-zero where their masks prune, by set_weights.
  source = _dense_net(MaskedDense)
  _write(source, masks=_random_masks(fast, seed=11), kernels_seed=12)
  paths = {}
  for model in (fast, reference):
    model.set_weights(source.get_weights())
    paths[model.name] = str(tmp_path / f"{model.name}.weights.h5")
    model.save_weights(paths[model.name])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)
  for model in (fast, reference):
    model.load_weights(paths[model.name])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)


def test_checkpoint_restore_is_honoured(tmp_path):
  fast, reference, input_shape = _both("dense")
  x, y = _data(input_shape, seed=13)
  source = _dense_net(MaskedDense)
  _write(source, masks=_random_masks(source, seed=14), kernels_seed=15)
  path = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
  for model in (fast, reference):
    _compile(model, keras.optimizers.Adam(0.01))
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    tf.train.Checkpoint(model=model).read(path).expect_partial()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)


class _PruneAtBatch(keras.callbacks.Callback):
  """Writes a mask (and a kernel non-zero where it prunes) between two steps of one fit."""

  def __init__(self, batch, masks):
    super().__init__()
    self.batch, self.masks = batch, masks

  def on_train_batch_end(self, batch, logs=None):
    if batch == self.batch:
      _write(self.model, kernels_seed=16)
      _write(self.model, masks=self.masks)


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_a_mask_written_during_fit_holds_from_the_next_step(network):
  fast, reference, input_shape = _both(network)
  x, y = _data(input_shape, seed=17)
  masks = _random_masks(fast, seed=18)
  for model in (fast, reference):
    _compile(model, keras.optimizers.AdamW(0.01, weight_decay=0.05))
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
              callbacks=[_PruneAtBatch(2, masks)])
  _assert_same_training(fast, reference)


def test_xla_fit_trains_as_the_masked_computation():
  fast, reference, input_shape = _both("conv")
  x, y = _data(input_shape, seed=19)
  masks = _random_masks(fast, seed=20)
  for model in (fast, reference):
    _write(model, masks=masks, kernels_seed=21)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=True)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
  _assert_same_training(fast, reference)


class _TraceCountingDense(MaskedDense):
  """Counts the Python executions of `call`: one per trace once compiled."""

  traces = 0

  def call(self, inputs, training=None):
    _TraceCountingDense.traces += 1
    return super().call(inputs, training=training)


def test_writes_between_fits_do_not_retrace():
  model = _dense_net(_TraceCountingDense)
  x, y = _data((12,), seed=22)
  _compile(model, keras.optimizers.Adam(0.01))
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  traced = _TraceCountingDense.traces
  _write(model, masks=_random_masks(model, seed=23), kernels_seed=24)
  model.fit(x, y, batch_size=8, epochs=1, verbose=0)
  assert _TraceCountingDense.traces == traced
  for layer in masked_layers(model):
    assert np.all(layer.kernel.numpy()[layer.mask.numpy() == 0] == 0.0)


def test_the_flag_follows_writes_and_training_calls():
  layer = MaskedDense(4)
  layer.build((None, 5))
  state = layer._mask_state
  assert bool(state.applied.numpy())  # All-ones mask.
  mask = (np.random.default_rng(25).random((5, 4)) < 0.5).astype(np.float32)
  layer.mask.assign(mask)
  assert not bool(state.applied.numpy())
  kernel = layer.kernel.numpy()
  x = np.random.default_rng(26).normal(size=(3, 5)).astype(np.float32)
  # Inference leaves the variable as written; a training call zeroes it where masked.
  np.testing.assert_allclose(layer(x).numpy(), x @ (kernel * mask) + layer.bias.numpy(),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layer.kernel.numpy(), kernel)
  np.testing.assert_allclose(layer(x, training=True).numpy(),
                             x @ (kernel * mask) + layer.bias.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(layer.kernel.numpy(), kernel * mask)
  assert bool(state.applied.numpy())
  layer.kernel.assign_add(np.ones((5, 4), np.float32))
  assert not bool(state.applied.numpy())
  enforce_masks(keras.Sequential([keras.Input((5,)), layer]))
  assert bool(state.applied.numpy())
  np.testing.assert_array_equal(layer.kernel.numpy(), (kernel * mask + 1.0) * mask)
  # The constraint's own (masked) write keeps the flag.
  layer.kernel.assign(layer.kernel.constraint(layer.kernel))
  assert bool(state.applied.numpy())


def test_flag_is_no_weight_of_the_layer():
  model = _dense_net(MaskedDense)
  names = [v.path for v in model.variables]
  assert not any("masks_applied" in name for name in names)
  assert len(model.get_weights()) == 2 * 3  # kernel, bias, mask per layer.
