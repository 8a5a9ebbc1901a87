"""Fidelity of the TRADES and MART training steps (`robust_sparse/training/adversarial_losses.py`).

Ours is one toolkit step, `steps.standard_loss_grad_fn(adv_loss=...)` inside
`steps.make_train_step` with plain SGD, on random weights with random 50 %
masks and random images in [0, 1] (some pixels at 0 and 1, so the data range
clips); the reference is `benchmarks/peers/fidelity_trades_mart.py`, each
paper's released loss (yaodongyu/TRADES `trades_loss`, YisenWang/MART
`mart_loss`) re-derived in PyTorch, float64, from the same float32 start.

The inner maximisation's start `x + 0.001 N(0, 1)` is random: the toolkit's
own draw (`adversarial_losses.start_noise` at the step's seed, computed here
the way the step computes it) is given to the reference, so both run the
same PGD. Compared: the adversarial batch `x_adv`, the loss, every weight's
gradient and the weights after the SGD step.

The networks have no batch normalisation: the toolkit passes `[x; x']` in
one training pass, the papers' code passes them separately, and their batch
statistics differ by design (as under `pgd_ce`).
"""

import numpy as np

from benchmarks.fidelity import Check

PEER = "benchmarks.peers.fidelity_trades_mart"
BATCH, CLASSES, FEATURES = 8, 4, 10
CONV_INPUT = (6, 6, 2)
EPS, STEP_SIZE, STEPS, LR = 0.1, 0.02, 10, 0.1
BETA = {"trades": 6.0, "mart": 6.0}
SEED, ITERATION = 3, 0


def _mlp():
  import keras

  from robust_sparse.nn.layers import MaskedDense
  inputs = keras.Input((FEATURES,))
  hidden = keras.layers.ReLU()(MaskedDense(12, name="hidden")(inputs))
  return keras.Model(inputs, MaskedDense(CLASSES, name="out")(hidden))


def _conv():
  import keras

  from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
  inputs = keras.Input(CONV_INPUT)
  h = keras.layers.ReLU()(MaskedConv2D(4, 3, padding="same", name="conv")(inputs))
  h = keras.layers.Flatten()(h)
  return keras.Model(inputs, MaskedDense(CLASSES, name="out")(h))


def _layers(model):
  return [layer for layer in model.layers if hasattr(layer, "mask")]


def _randomize(model, rng):
  """Random kernels (zero where masked), biases and 50 % masks."""
  for layer in _layers(model):
    mask = (rng.random(tuple(layer.mask.shape)) < 0.5).astype(np.float32)
    fan_in = int(np.prod(layer.kernel.shape[:-1]))
    kernel = rng.normal(size=tuple(layer.kernel.shape)) * 2.0 / np.sqrt(fan_in)
    layer.mask.assign(mask)
    layer.kernel.assign((kernel * mask).astype(np.float32))
    layer.bias.assign((0.2 * rng.normal(size=tuple(layer.bias.shape))).astype(np.float32))


def _named(model):
  """{"<layer>_kernel" / "<layer>_bias": variable}, in the model's trainable order."""
  names = {}
  for layer in _layers(model):
    names[id(layer.kernel)] = f"{layer.name}_kernel"
    names[id(layer.bias)] = f"{layer.name}_bias"
  return {names[id(v)]: v for v in model.trainable_variables}


def _images(rng, shape):
  x = rng.random((BATCH,) + shape)
  x[rng.random(x.shape) < 0.1] = 0.0
  x[rng.random(x.shape) < 0.05] = 1.0
  return x.astype(np.float32)


def _step_case(adv_loss, arch):
  def ours(context):
    import keras
    import tensorflow as tf

    from robust_sparse.training import adversarial_losses as al
    from robust_sparse.training.optimizers import make_optimizer
    from robust_sparse.training.steps import (OptimizerGroup, make_train_step,
                                              standard_loss_grad_fn, stream_seed)
    keras.utils.set_random_seed(context.seed)
    rng = np.random.default_rng(context.seed)
    model = _mlp() if arch == "mlp" else _conv()
    _randomize(model, rng)
    named = _named(model)
    x = _images(rng, tuple(model.input_shape[1:]))
    y = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    budget = al.Budget(eps=EPS, step_size=STEP_SIZE, steps=STEPS)
    beta = BETA[adv_loss]
    fn = standard_loss_grad_fn(model, num_classes=CLASSES, attack=lambda *args: None,
                               adv_loss=adv_loss, trades_beta=beta, mart_beta=beta,
                               budget=budget)
    seed = stream_seed(tf.constant(SEED, tf.int64), tf.constant(ITERATION, tf.int64), 0)
    x_t, y_t = tf.constant(x), tf.constant(y, tf.int32)
    noise = al.start_noise(x_t, seed).numpy()
    inputs = {"p:" + n: v.numpy() for n, v in named.items()}
    inputs.update({"m:" + layer.name: layer.mask.numpy() for layer in _layers(model)})
    inputs.update(x=x, y=y, noise=noise, adv_loss=np.array(adv_loss), arch=np.array(arch),
                  eps=np.array(EPS), step_size=np.array(STEP_SIZE), steps=np.array(STEPS),
                  beta=np.array(beta), lr=np.array(LR))
    if adv_loss == "trades":
      x_adv = al.trades_perturbation(model, x_t, seed, budget)
    else:
      x_adv = al.mart_perturbation(model, x_t, y_t, seed, budget)
    values = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    batch = dict(x=x_t, y=y_t, weight=tf.fill([BATCH], 1.0 / BATCH), seed=seed)
    grads, _, aux = fn(values, [tf.convert_to_tensor(v) for v in model.non_trainable_variables],
                       batch)
    outputs = {"x_adv": x_adv.numpy(), "loss": aux["objective"].numpy()}
    outputs.update({"g:" + n: g.numpy() for n, g in zip(named, grads)})
    step = make_train_step(model, fn, [OptimizerGroup("weights", make_optimizer("sgd", LR))])
    step(x_t, y_t, tf.constant(SEED, tf.int64), tf.constant(ITERATION, tf.int64))
    outputs.update({"p:" + n: v.numpy() for n, v in named.items()})
    return inputs, outputs

  return ours


_NETS = {"mlp": "MLP 10-12-4", "conv": "conv 3x3x4 - dense 4"}
_REF = {"trades": "PyTorch re-derivation of yaodongyu/TRADES trades_loss, float64",
        "mart": "PyTorch re-derivation of YisenWang/MART mart_loss, float64"}
# float32 against float64 through 10 PGD steps, a forward and a backward pass.
TOLERANCE = 1e-5

CHECKS = [
    Check(f"{adv_loss.upper()} step (beta 6, PGD-10 eps {EPS}, SGD): {_NETS[arch]}, "
          "random weights and 50 % masks", _REF[adv_loss], TOLERANCE,
          _step_case(adv_loss, arch), peer=f"{PEER}:step", needs=("torch",))
    for adv_loss in ("trades", "mart") for arch in ("mlp", "conv")
]
