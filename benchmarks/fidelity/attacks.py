"""Fidelity of the attacks: FGSM, PGD (L-inf, L2, restarts) and APGD-CE.

References: torchattacks 3.5.1 itself (FGSM, PGD and PGDL2 without a random
start, APGD's `attack_single_run`), a PyTorch re-derivation of PGD with
restarts, and NumPy re-derivations (closed-form gradients of a linear
softmax model and hand-written backpropagation through a ReLU MLP) that also
run in the test suite.

Deterministic where the start can be shared: the toolkit's random start is
read back from the toolkit itself (the same stateless seed with zero steps
returns it, drawn in the same compile mode as the full attack) and handed to
the reference: to PGD re-derivations as the starting point, to torchattacks'
APGD in place of its own `torch.rand` / `torch.randn` draw. Statistical where
each side must draw its own start (torchattacks' PGD, MultiAttack restarts,
APGD's `perturb`): the robust accuracy on real MNIST, within a tolerance.

What is compared: the adversarial batch itself for FGSM and PGD; for APGD
each example's verdict (`robust`: still classified as its label, which must
agree exactly) and the cross-entropy at the returned point. APGD's late
steps are tiny (2 eps / 2^8 after 100 iterations) and its box corners are
revisited, so losses of successive iterates often tie to float32's
resolution; which of two such iterates is "best" is then decided by
rounding, and ours, torchattacks' and the float64 NumPy run pick differently
on a few examples (by the same amounts pairwise: measured, 16-20 of 64
random-network examples, up to 1e-2 in a coordinate). The loss there agrees
to about 1e-4, so that is what is compared; the robust accuracy where the
starts differ.

The networks: the toolkit's dense-300-100 (no biases) with random weights and
random 50 % masks on 28x28 uniform images, a small MLP with biases on 8x8
images for the NumPy references, and (with `--data_dir`) a dense-300-100
trained for one epoch on MNIST, attacked on the first test images.
"""

import functools

import keras
import numpy as np
import tensorflow as tf

from robust_sparse.attacks import apgd_ce, fgsm, pgd
from benchmarks.fidelity import Check
from robust_sparse.data import load_dataset
from robust_sparse.models import build_model

PEER = "benchmarks.peers.fidelity_attacks"
BATCH = 64

# ----------------------------------------------------------------------------
# Networks and data.


def _masked_network(seed, input_shape=(28, 28, 1), keep=0.5):
  """The toolkit's dense-300-100, its initial weights drawn from `seed`, random masks."""
  keras.utils.set_random_seed(seed)
  model = build_model("dense-300-100", input_shape, 10)
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if hasattr(layer, "mask"):
      layer.mask.assign((rng.random(layer.mask.shape) < keep).astype(np.float32))
  return model


def _small_mlp(seed, input_shape=(8, 8, 1), hidden=32, classes=10, depth=1):
  """Flatten - (Dense + ReLU) x depth - Dense logits, random weights and biases."""
  keras.utils.set_random_seed(seed)
  layers = [keras.Input(input_shape), keras.layers.Flatten()]
  layers += [keras.layers.Dense(hidden, activation="relu") for _ in range(depth)]
  model = keras.Sequential(layers + [keras.layers.Dense(classes)])
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if layer.weights:
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0.0, 0.3, bias.shape).astype(np.float32)])
  return model


def _weights(model):
  """{kernel_<i>, bias_<i>}: the effective (masked) kernels [in, out] and biases, in order."""
  arrays, index = {}, 0
  for layer in model.layers:
    if hasattr(layer, "masked_kernel"):
      arrays[f"kernel_{index}"] = np.asarray(layer.masked_kernel)
    elif hasattr(layer, "kernel"):
      arrays[f"kernel_{index}"] = np.asarray(layer.kernel)
    else:
      continue
    if getattr(layer, "bias", None) is not None:
      arrays[f"bias_{index}"] = np.asarray(layer.bias)
    index += 1
  return arrays


def _images(seed, shape=(28, 28, 1), n=BATCH):
  """Uniform images in [0, 1] with a few pixels at 0 and 1 (so the data range clips)."""
  rng = np.random.default_rng(seed + 1)
  x = rng.random((n, *shape))
  x[rng.random(x.shape) < 0.1] = 0.0
  x[rng.random(x.shape) < 0.05] = 1.0
  return x.astype(np.float32)


def _true_labels(model, x, seed, wrong=0.25):
  """The model's predictions with a random `wrong` fraction replaced by another class.

  So some clean images are misclassified (their own worst case) and the
  others are attacked, as with true labels on real data.
  """
  rng = np.random.default_rng(seed + 2)
  y = np.argmax(model(x).numpy(), -1).astype(np.int64)
  flip = rng.random(len(y)) < wrong
  y[flip] = (y[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
  return y


@functools.lru_cache(maxsize=2)
def _mnist(data_dir, seed, examples=500):
  """A dense-300-100 trained one epoch on MNIST, and the first `examples` test images."""
  data = load_dataset("digits", data_dir)
  keras.utils.set_random_seed(seed)
  model = build_model("dense-300-100", data.input_shape, data.num_classes)
  model.compile(optimizer=keras.optimizers.Adam(1e-3),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
  model.fit(data.x_train, data.y_train, epochs=1, batch_size=128, verbose=0)
  x = np.ascontiguousarray(data.x_test[:examples], np.float32)
  return model, x, data.y_test[:examples].astype(np.int64)


def _seed(context, salt=0):
  return tf.constant([context.seed, salt], tf.int32)


def _scalars(**values):
  return {k: np.asarray(v, np.float64) for k, v in values.items()}


# ----------------------------------------------------------------------------
# The toolkit's side.


def _fgsm_case(network, true_labels, eps=0.1):
  def ours(context):
    model = network(context.seed)
    shape = model.input_shape[1:]
    x = _images(context.seed, shape)
    y = _true_labels(model, x, context.seed) if true_labels else None
    inputs = dict(_weights(model), x=x, **_scalars(eps=eps))
    if true_labels:
      inputs["y"] = y
    return inputs, {"x_adv": fgsm(model, x, y, eps=eps).numpy()}
  return ours


def _pgd_no_start_case(network, norm, eps, step_size, steps=10):
  def ours(context):
    model = network(context.seed)
    x = _images(context.seed, model.input_shape[1:])
    x_adv = pgd(model, x, eps=eps, step_size=step_size, steps=steps, random_start=False,
                norm=norm).numpy()
    inputs = dict(_weights(model), x=x,
                  **_scalars(eps=eps, step_size=step_size, steps=steps, norm=norm))
    return inputs, {"x_adv": x_adv}
  return ours


def pgd_starts(model, x, y, seed, *, eps, step_size, restarts, norm):
  """The clipped starting point of each restart: the toolkit's own, read back with 0 steps.

  Restart 0 draws from `seed`, restart r from `stateless_fold_in(seed, r)`
  (`attacks/pgd.py`); a one-restart attack of zero steps returns its start.
  """
  starts = []
  for r in range(restarts):
    seed_r = seed if r == 0 else tf.random.experimental.stateless_fold_in(seed, r)
    starts.append(pgd(model, x, y, eps=eps, step_size=step_size, steps=0, seed=seed_r,
                      norm=norm).numpy())
  return np.stack(starts)


def _pgd_restarts_case(network, norm, eps, step_size, steps, restarts, true_labels=False):
  def ours(context):
    model = network(context.seed)
    x = _images(context.seed, model.input_shape[1:])
    y = _true_labels(model, x, context.seed) if true_labels else None
    seed = _seed(context, 1)
    budget = dict(eps=eps, step_size=step_size, norm=norm)
    x_adv = pgd(model, x, y, steps=steps, seed=seed, restarts=restarts, **budget).numpy()
    inputs = dict(_weights(model), x=x, starts=pgd_starts(model, x, y, seed, restarts=restarts,
                                                          **budget),
                  **_scalars(steps=steps, **budget))
    if true_labels:
      inputs["y"] = y
    return inputs, {"x_adv": x_adv}
  return ours


def apgd_start(model, x, seed, *, eps, norm):
  """The toolkit's unclipped APGD start x + eps t / |t|_p (zero steps, no data range)."""
  return apgd_ce(model, x, None, eps=eps, steps=0, clip_min=-1e3, clip_max=1e3, seed=seed,
                 norm=norm).numpy()


def _apgd_case(network, norm, eps, steps=100, true_labels=False, paper_first_window=True,
               data=None):
  def ours(context):
    if data is None:
      model = network(context.seed)
      x = _images(context.seed, model.input_shape[1:])
      y = _true_labels(model, x, context.seed) if true_labels else None
    else:
      model, x, y = _mnist(context.data_dir, context.seed)
      y = y if true_labels else None
    seed = _seed(context, 2)
    x_adv = apgd_ce(model, x, y, eps=eps, steps=steps, seed=seed, norm=norm,
                    first_window="paper" if paper_first_window else "fra31").numpy()
    outcome = _outcome(model, x, y, x_adv)
    inputs = dict(_weights(model), x=x, start=apgd_start(model, x, seed, eps=eps, norm=norm),
                  **_scalars(eps=eps, steps=steps, norm=norm, rho=0.75,
                             paper_first_window=paper_first_window))
    if y is not None:
      inputs["y"] = y
    return inputs, outcome
  return ours


def _outcome(model, x, y, x_adv):
  """{robust: 1 where still classified as the attack's label, loss: the CE there}."""
  labels = y if y is not None else np.argmax(model(x).numpy(), -1)
  logits = model(x_adv)
  loss = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
  return {"robust": (np.argmax(logits.numpy(), -1) == labels).astype(np.float32),
          "loss": np.asarray(loss, np.float64)}


def _mnist_robust_accuracy_case(attack, norm, eps, steps, step_size=0.0, restarts=1):
  """Robust accuracy (true labels) on MNIST, each side with its own random starts."""
  def ours(context):
    model, x, y = _mnist(context.data_dir, context.seed)
    seed = _seed(context, 3)
    if attack == "apgd_ce":
      x_adv = apgd_ce(model, x, y, eps=eps, steps=steps, seed=seed, norm=norm).numpy()
    else:
      x_adv = pgd(model, x, y, eps=eps, step_size=step_size, steps=steps, seed=seed,
                  restarts=restarts, norm=norm).numpy()
    correct = ((np.argmax(model(x_adv).numpy(), -1) == y)
               & (np.argmax(model(x).numpy(), -1) == y))
    inputs = dict(_weights(model), x=x, y=y, attack=np.asarray(attack),
                  **_scalars(eps=eps, steps=steps, step_size=step_size, restarts=restarts,
                             norm=norm, seed=context.seed))
    return inputs, {"robust_accuracy": np.asarray(correct.mean())}
  return ours


# A coordinate is a rounding-level tie, its sign float32 noise on either side, when
# its exact (float64) input gradient is below `_TIE` of the sum of the absolute terms
# that cancel into it (float32 sums of a few hundred terms err by up to about 1e-5 of
# that sum), or below `_TIE` of its example's largest. So is every coordinate of an
# example classified with 1 - p(top) below `_SURE`: float32 holds p(top) to about
# 6e-8, so its softmax - onehot, hence its whole gradient, is mostly rounding.
_TIE, _SURE = 1e-5, 1e-4


def _mnist_fgsm(context, eps=0.1):
  """FGSM on a trained network, compared on every coordinate that is no tie.

  Where a trained network is confident, the input gradient of some pixels is a
  sum of terms that cancel to rounding noise, and its sign (hence the FGSM
  step, +-eps) differs between two correct float32 implementations. Those
  coordinates (judged on the exact float64 gradient of the same weights, so that
  neither implementation's rounding decides, see `_TIE`), and every coordinate of
  an example the network is sure of (1 - p(top) below `_SURE`), are left out on
  both sides; every other one must agree exactly.
  """
  model, x, _ = _mnist(context.data_dir, context.seed)
  weights = _weights(model)
  layers = _np_layers(weights)
  labels = np.argmax(model(x).numpy(), -1)  # FGSM's labels: the float32 predictions.
  logits, loss_and_gradient = np_loss_and_gradient(layers, x)
  g = np.abs(loss_and_gradient(labels)[1]).reshape(len(x), -1)
  terms = loss_and_gradient(labels, absolute=True)[1].reshape(len(x), -1)
  shifted = logits - logits.max(1, keepdims=True)
  p_top = 1.0 / np.exp(shifted).sum(1)
  unsure = 1.0 - p_top > _SURE
  decisive = ((g > _TIE * g.max(1, keepdims=True)) & (g > _TIE * terms)) & unsure[:, None]
  decisive = decisive.reshape(x.shape).astype(np.float32)
  inputs = dict(weights, x=x, decisive=decisive, **_scalars(eps=eps))
  return inputs, {"x_adv": fgsm(model, x, eps=eps).numpy() * decisive}


# ----------------------------------------------------------------------------
# NumPy references (float64): forward and backward through the MLP by hand.


def _np_layers(inputs):
  count = sum(1 for key in inputs if key.startswith("kernel_"))
  return [(np.asarray(inputs[f"kernel_{i}"], np.float64),
           np.asarray(inputs.get(f"bias_{i}", 0.0), np.float64)) for i in range(count)]


def np_loss_and_gradient(layers, x):
  """(logits [n, classes], function labels -> (CE per example, d sum CE / d x))."""
  h = x.reshape(len(x), -1).astype(np.float64)
  activations, pre = [h], []
  for i, (kernel, bias) in enumerate(layers):
    z = h @ kernel + bias
    pre.append(z)
    h = np.maximum(z, 0.0) if i < len(layers) - 1 else z
    activations.append(h)
  logits = h
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))

  def loss_and_gradient(y, absolute=False):
    """(CE per example, its input gradient); with `absolute`, in place of the gradient
    the sum of the absolute values of the terms that add up to it (the same backward
    pass through |softmax - one_hot| and |W|: the scale of float32's rounding error
    in the gradient)."""
    rows = np.arange(len(x))
    loss = -log_p[rows, y]
    g = np.exp(log_p)
    g[rows, y] -= 1.0  # d CE / d logits = softmax - one_hot.
    if absolute:
      g = np.abs(g)
    for i in range(len(layers) - 1, -1, -1):
      if i < len(layers) - 1:
        g = g * (pre[i] > 0)
      g = g @ (np.abs(layers[i][0]) if absolute else layers[i][0]).T
    return loss, g.reshape(x.shape)
  return logits, loss_and_gradient


def _np_attack_labels(inputs, layers, x):
  if "y" in inputs:
    return inputs["y"].astype(np.int64)
  return np.argmax(np_loss_and_gradient(layers, x)[0], axis=1)


def np_fgsm(inputs):
  """x + eps sign(d CE / d x), clipped to [0, 1]."""
  layers, x = _np_layers(inputs), inputs["x"].astype(np.float64)
  y = _np_attack_labels(inputs, layers, x)
  _, gradient = np_loss_and_gradient(layers, x)[1](y)
  return {"x_adv": np.clip(x + float(inputs["eps"]) * np.sign(gradient), 0.0, 1.0)}


def np_fgsm_linear(inputs):
  """Closed form for logits = x W + b: d CE / d x = (softmax - one_hot(y)) W^T."""
  (kernel, bias), = _np_layers(inputs)
  x = inputs["x"].astype(np.float64)
  flat = x.reshape(len(x), -1)
  logits = flat @ kernel + bias
  y = inputs["y"] if "y" in inputs else np.argmax(logits, axis=1)
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  p[np.arange(len(x)), y] -= 1.0
  gradient = (p @ kernel.T).reshape(x.shape)
  return {"x_adv": np.clip(x + float(inputs["eps"]) * np.sign(gradient), 0.0, 1.0)}


def _np_norm(v):
  return np.sqrt(np.sum(v.reshape(len(v), -1) ** 2, axis=1)).reshape((-1,) + (1,) * (v.ndim - 1))


def _np_geometry(x, eps, linf):
  """(projection onto the eps-ball around x and [0, 1], step direction of a gradient)."""
  if linf:
    lower, upper = np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)
    return (lambda z: np.clip(z, lower, upper)), np.sign

  def project(z):
    delta = z - x
    return np.clip(x + delta * np.minimum(1.0, eps / np.maximum(_np_norm(delta), 1e-12)),
                   0.0, 1.0)
  return project, (lambda g: g / np.maximum(_np_norm(g), 1e-12))


def np_pgd(inputs):
  """PGD from each of `starts` (or from x), worst case over the restarts."""
  layers, x = _np_layers(inputs), inputs["x"].astype(np.float64)
  y = _np_attack_labels(inputs, layers, x)
  eps, step_size = float(inputs["eps"]), float(inputs["step_size"])
  project, direction = _np_geometry(x, eps, np.isinf(float(inputs["norm"])))
  starts = inputs["starts"].astype(np.float64) if "starts" in inputs else x[None]
  best = best_loss = best_wrong = None
  for start in starts:
    x_adv = start
    for _ in range(int(inputs["steps"])):
      _, gradient = np_loss_and_gradient(layers, x_adv)[1](y)
      x_adv = project(x_adv + step_size * direction(gradient))
    logits, loss_fn = np_loss_and_gradient(layers, x_adv)
    loss, wrong = loss_fn(y)[0], np.argmax(logits, axis=1) != y
    if best is None:
      best, best_loss, best_wrong = x_adv, loss, wrong
      continue
    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
    best = np.where(better.reshape((-1,) + (1,) * (x.ndim - 1)), x_adv, best)
    best_loss, best_wrong = np.where(better, loss, best_loss), best_wrong | wrong
  return {"x_adv": best}


def np_apgd_ce(inputs):
  """APGD-CE, Algorithm 1 of Croce & Hein (2020) with the reference code's checkpoints.

  Momentum 0.75 (none at the first step), step size 2 eps halved per example
  at the checkpoints (windows of int(0.22 N) iterations, shrinking by
  int(0.03 N) to at least int(0.06 N)) where at most rho of the window's steps
  increased the loss (counted from the start's loss in the first window), or
  where the best loss has not improved and the step was not halved at the
  previous checkpoint; a halving moves the example back to its best point.
  Returns the last misclassified iterate where one exists, else the best.
  """
  layers, x = _np_layers(inputs), inputs["x"].astype(np.float64)
  y = _np_attack_labels(inputs, layers, x)
  eps, steps, rho = float(inputs["eps"]), int(inputs["steps"]), float(inputs["rho"])
  project, direction = _np_geometry(x, eps, np.isinf(float(inputs["norm"])))
  expand = (-1,) + (1,) * (x.ndim - 1)

  def evaluate(point):
    logits, loss_fn = np_loss_and_gradient(layers, point)
    loss, gradient = loss_fn(y)
    return loss, np.argmax(logits, axis=1) != y, gradient

  x_adv = np.clip(inputs["start"].astype(np.float64), 0.0, 1.0)
  loss, wrong, gradient = evaluate(x_adv)
  x_previous, history = x_adv, [loss]
  x_best, loss_best, gradient_best = x_adv, loss, gradient
  fooled, x_fooled = wrong, x_adv
  step = np.full(len(x), 2.0 * eps)
  window = max(int(0.22 * steps), 1)
  shrink, smallest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
  last_check, loss_best_last_check = 0, loss_best
  reduced_last_check = np.ones(len(x), bool)
  for i in range(steps):
    alpha = 1.0 if i == 0 else 0.75
    z = project(x_adv + step.reshape(expand) * direction(gradient))
    x_new = project(x_adv + alpha * (z - x_adv) + (1.0 - alpha) * (x_adv - x_previous))
    x_previous, x_adv = x_adv, x_new
    loss, wrong, gradient = evaluate(x_adv)
    history.append(loss)
    x_fooled = np.where(wrong.reshape(expand), x_adv, x_fooled)
    fooled = fooled | wrong
    improved = loss > loss_best
    x_best = np.where(improved.reshape(expand), x_adv, x_best)
    gradient_best = np.where(improved.reshape(expand), gradient, gradient_best)
    loss_best = np.where(improved, loss, loss_best)
    if i + 1 - last_check == window:
      increases = sum(history[t] > history[t - 1] for t in range(last_check + 1, i + 2))
      reduce = (increases <= rho * window) | (~reduced_last_check
                                              & (loss_best_last_check >= loss_best))
      step = np.where(reduce, step / 2.0, step)
      x_adv = np.where(reduce.reshape(expand), x_best, x_adv)
      gradient = np.where(reduce.reshape(expand), gradient_best, gradient)
      reduced_last_check, loss_best_last_check = reduce, loss_best
      last_check, window = i + 1, max(window - shrink, smallest)
  result = np.where(fooled.reshape(expand), x_fooled, x_best)
  if "y" in inputs:  # A clean image misclassified already is its own worst case.
    clean_wrong = np.argmax(np_loss_and_gradient(layers, x)[0], axis=1) != y
    result = np.where(clean_wrong.reshape(expand), x, result)
  logits, loss_fn = np_loss_and_gradient(layers, result)
  return {"x_adv": result, "robust": (np.argmax(logits, axis=1) == y).astype(np.float64),
          "loss": loss_fn(y)[0]}


def _np_apgd_case(network, norm, eps, steps, true_labels):
  def ours(context):
    model = network(context.seed)
    x = _images(context.seed, model.input_shape[1:])
    y = _true_labels(model, x, context.seed) if true_labels else None
    seed = _seed(context, 4)
    x_adv = apgd_ce(model, x, y, eps=eps, steps=steps, seed=seed, norm=norm).numpy()
    inputs = dict(_weights(model), x=x, start=apgd_start(model, x, seed, eps=eps, norm=norm),
                  **_scalars(eps=eps, steps=steps, norm=norm, rho=0.75))
    if true_labels:
      inputs["y"] = y
    return inputs, _outcome(model, x, y, x_adv)
  return ours


# ----------------------------------------------------------------------------
# The checks.

_DENSE = "dense-300-100, random weights and 50 % masks"
_MLP = "MLP 64-32-10 with biases, random weights"
_MNIST = "dense-300-100 trained 1 epoch, 500 MNIST test images"
_STARTS = "the toolkit's random start given"
_INF = np.inf


def _linear(seed):
  return _small_mlp(seed, depth=0)


def _mlp(seed):
  return _small_mlp(seed)


# Tolerances. EXACT: float32 rounding (sign steps see none unless a gradient
# coordinate is about 0). BENT: PGD from random starts (an L2 step follows the
# gradient, so where rounding moves a ReLU to its other side the path bends; up
# to 9e-4 measured at eps 1.5). DRIFT: APGD's losses at the result (see the
# module docstring).
# The restart checks take fewer, shorter steps than the budget needs to reach
# its corner, so restarts end apart: with all of them at the same corner, the
# worst case among equal losses would be picked by rounding.
EXACT, BENT, DRIFT = 1e-6, 1e-3, 1e-2
_TA = "torchattacks 3.5.1"
_APGD_PAPER = f"{_TA} APGD attack_single_run, first window from the start's loss (paper)"

CHECKS = [
    # FGSM: exact (same weights, same images, same labels).
    Check("attack FGSM eps 0.1: " + _DENSE + ", predicted labels", f"{_TA} FGSM", EXACT,
          _fgsm_case(_masked_network, False), peer=f"{PEER}:fgsm", needs=("torchattacks",)),
    Check("attack FGSM eps 0.1: " + _DENSE + ", true labels", f"{_TA} FGSM", EXACT,
          _fgsm_case(_masked_network, True), peer=f"{PEER}:fgsm", needs=("torchattacks",)),
    Check("attack FGSM eps 0.1: linear softmax model 64-10, predicted labels",
          "NumPy closed form x + eps sign((p - onehot) W^T)", EXACT,
          _fgsm_case(_linear, False), numpy_reference=np_fgsm_linear),
    Check("attack FGSM eps 0.1: " + _MLP + ", true labels", "NumPy backpropagation", EXACT,
          _fgsm_case(_mlp, True), numpy_reference=np_fgsm),
    # PGD without a random start: deterministic, against torchattacks itself.
    Check("attack PGD L-inf eps 0.01, 10 steps, no random start: " + _DENSE,
          f"{_TA} PGD(random_start=False)", EXACT,
          _pgd_no_start_case(_masked_network, _INF, 0.01, 0.0025),
          peer=f"{PEER}:pgd_no_random_start", needs=("torchattacks",)),
    Check("attack PGD L2 eps 0.2, 10 steps, no random start: " + _DENSE,
          f"{_TA} PGDL2(random_start=False)", EXACT,
          _pgd_no_start_case(_masked_network, 2, 0.2, 0.05),
          peer=f"{PEER}:pgd_no_random_start", needs=("torchattacks",)),
    Check("attack PGD L-inf eps 0.02, 10 steps, no random start: " + _MLP,
          "NumPy re-derivation", EXACT,
          _pgd_no_start_case(_mlp, _INF, 0.02, 0.005), numpy_reference=np_pgd),
    # PGD with random starts and restarts: the same starts, a re-derivation.
    Check("attack PGD L-inf eps 0.01, 5 steps, 3 restarts, " + _STARTS + ": " + _DENSE,
          "PyTorch re-derivation (Madry et al.), worst case over restarts", BENT,
          _pgd_restarts_case(_masked_network, _INF, 0.01, 0.001, 5, 3),
          peer=f"{PEER}:pgd_from_starts", needs=("torch",)),
    Check("attack PGD L2 eps 0.2, 5 steps, 3 restarts, " + _STARTS + ": " + _DENSE
          + ", true labels",
          "PyTorch re-derivation (Madry et al.), worst case over restarts", BENT,
          _pgd_restarts_case(_masked_network, 2, 0.2, 0.02, 5, 3, true_labels=True),
          peer=f"{PEER}:pgd_from_starts", needs=("torch",)),
    Check("attack PGD L-inf eps 0.02, 5 steps, 2 restarts, " + _STARTS + ": " + _MLP,
          "NumPy re-derivation, worst case over restarts", BENT,
          _pgd_restarts_case(_mlp, _INF, 0.02, 0.002, 5, 2), numpy_reference=np_pgd),
    Check("attack PGD L2 eps 0.2, 5 steps, 2 restarts, " + _STARTS + ": " + _MLP
          + ", true labels", "NumPy re-derivation, worst case over restarts", BENT,
          _pgd_restarts_case(_mlp, 2, 0.2, 0.02, 5, 2, true_labels=True),
          numpy_reference=np_pgd),
    # APGD-CE: torchattacks' own iterations from the toolkit's start.
    Check("attack APGD-CE L-inf eps 0.01, 100 steps, " + _STARTS + ": " + _DENSE,
          _APGD_PAPER, DRIFT, _apgd_case(_masked_network, _INF, 0.01), peer=f"{PEER}:apgd_ce",
          needs=("torchattacks",)),
    Check("attack APGD-CE L2 eps 0.2, 100 steps, " + _STARTS + ": " + _DENSE + ", true labels",
          _APGD_PAPER, DRIFT, _apgd_case(_masked_network, 2, 0.2, true_labels=True),
          peer=f"{PEER}:apgd_ce", needs=("torchattacks",)),
    Check("attack APGD-CE L-inf eps 0.01, 100 steps, " + _STARTS + ": " + _DENSE
          + ", first_window=fra31",
          f"{_TA} APGD attack_single_run as shipped (first window from 0)", DRIFT,
          _apgd_case(_masked_network, _INF, 0.01, paper_first_window=False),
          peer=f"{PEER}:apgd_ce", needs=("torchattacks",)),
    Check("attack APGD-CE L-inf eps 0.02, 100 steps, " + _STARTS + ": " + _MLP,
          "NumPy re-derivation of Algorithm 1", DRIFT,
          _np_apgd_case(_mlp, _INF, 0.02, 100, False), numpy_reference=np_apgd_ce),
    Check("attack APGD-CE L2 eps 0.2, 100 steps, " + _STARTS + ": " + _MLP + ", true labels",
          "NumPy re-derivation of Algorithm 1", DRIFT,
          _np_apgd_case(_mlp, 2, 0.2, 100, True), numpy_reference=np_apgd_ce),
    # Real MNIST.
    Check("attack FGSM eps 0.1: " + _MNIST + ", predicted labels, coordinates not at a "
          "rounding-level gradient tie", f"{_TA} FGSM",
          EXACT, _mnist_fgsm, peer=f"{PEER}:fgsm", needs=("torchattacks",),
          needs_data=True),
    Check("attack APGD-CE L-inf eps 0.05, 100 steps, " + _STARTS + ": " + _MNIST
          + ", true labels, robust and loss", _APGD_PAPER, DRIFT,
          _apgd_case(None, _INF, 0.05, true_labels=True, data="mnist"), peer=f"{PEER}:apgd_ce",
          needs=("torchattacks",), needs_data=True),
    Check("attack APGD-CE L-inf eps 0.05, 100 steps: " + _MNIST + ", robust accuracy",
          f"{_TA} APGD (own random start)", 0.02,
          _mnist_robust_accuracy_case("apgd_ce", _INF, 0.05, 100),
          peer=f"{PEER}:robust_accuracy", needs=("torchattacks",), needs_data=True),
    Check("attack PGD L-inf eps 0.1, 20 steps: " + _MNIST + ", robust accuracy",
          f"{_TA} PGD (own random start)", 0.02,
          _mnist_robust_accuracy_case("pgd", _INF, 0.1, 20, step_size=0.01),
          peer=f"{PEER}:robust_accuracy", needs=("torchattacks",), needs_data=True),
    Check("attack PGD L-inf eps 0.1, 20 steps, 5 restarts: " + _MNIST + ", robust accuracy",
          f"{_TA} MultiAttack of 5 PGD (own random starts)", 0.02,
          _mnist_robust_accuracy_case("pgd", _INF, 0.1, 20, step_size=0.01, restarts=5),
          peer=f"{PEER}:robust_accuracy", needs=("torchattacks",), needs_data=True),
    Check("attack PGD L2 eps 1.5, 20 steps: " + _MNIST + ", robust accuracy",
          f"{_TA} PGDL2 (own random start)", 0.02,
          _mnist_robust_accuracy_case("pgd", 2, 1.5, 20, step_size=0.15),
          peer=f"{PEER}:robust_accuracy", needs=("torchattacks",), needs_data=True),
]
