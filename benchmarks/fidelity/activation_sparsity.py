"""Fidelity of the activation-sparsity columns (spec 2.2, `robust_sparse.measure.activation_stats`).

Every column `ActivationTap.measure` + `ActivationStatistics` write
(activation sparsity, pre-activation concentration, mean squared derivative,
effective gradient sparsity at 1e-9 / 1e-6 / 1e-3, spectral increase kkT and
M, each per layer and averaged over layers) against a NumPy re-derivation of
the seed's `hooks.py` definitions: the habitats of ReLU and J-SquaredReLU
(x <= 0 and |a| <= 1e-6), f'(x) = 1[x > 0] for ReLU (TensorFlow's, the
seed's is 1[x >= 0]: the same off x = 0, which random data never hits) and
(x + 1) 1[x >= 0] for J-SquaredReLU, g = dL/da of the batch-mean
cross-entropy by explicit backpropagation. Random weights, random 50 %
masks, random data, two batches accumulated.
"""

import keras
import numpy as np

from benchmarks.fidelity import Check

FEATURES, HIDDEN1, HIDDEN2, CLASSES, BATCH = 5, 7, 6, 3, 16
THRESHOLDS = ("1e-09", "1e-06", "0.001")


def _ours(context):
  from robust_sparse.measure import activation_stats
  from robust_sparse.nn import activations
  from robust_sparse.nn.layers import MaskedDense
  keras.utils.set_random_seed(context.seed)
  rng = np.random.default_rng(context.seed + 5)
  inputs = keras.Input((FEATURES,))
  h = MaskedDense(HIDDEN1, bias_initializer="random_normal", name="key1")(inputs)
  h = activations.build("relu", name="act1")(h)
  h = MaskedDense(HIDDEN2, bias_initializer="random_normal", name="key2")(h)
  h = activations.build("jsrelu", name="act2")(h)
  model = keras.Model(inputs, keras.layers.Dense(CLASSES, name="head")(h))
  arrays = {}
  for name in ("key1", "key2"):
    layer = model.get_layer(name)
    layer.mask.assign((rng.random(layer.mask.shape) < 0.5).astype(np.float32))
    arrays[name + "/kernel"] = layer.masked_kernel.numpy()
    arrays[name + "/bias"] = layer.bias.numpy()
  head = model.get_layer("head")
  arrays["head/kernel"], arrays["head/bias"] = head.kernel.numpy(), head.bias.numpy()
  x = rng.normal(0, 1, (2 * BATCH, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, 2 * BATCH)
  arrays.update(x=x, y=y, batch_size=np.array(BATCH))
  tap = activation_stats.ActivationTap(model)
  statistics = tap.statistics(measure=activation_stats.MEASUREMENTS)
  for start in (0, BATCH):
    tap.measure(statistics, x[start:start + BATCH], y[start:start + BATCH])
  return arrays, {k: np.array(v) for k, v in statistics.results().items()}


def numpy_reference(a):
  f = {k: np.asarray(v, np.float64) for k, v in a.items() if k != "y"}
  y, size = a["y"], int(a["batch_size"])
  sums = {}

  def add(key, numerator, denominator):
    n, d = sums.get(key, (0.0, 0.0))
    sums[key] = (n + numerator, d + denominator)

  for start in range(0, len(f["x"]), size):
    x, labels = f["x"][start:start + size], y[start:start + size]
    x1 = x @ f["key1/kernel"] + f["key1/bias"]
    a1 = np.maximum(x1, 0)
    d1 = (x1 > 0).astype(np.float64)
    x2 = a1 @ f["key2/kernel"] + f["key2/bias"]
    a2 = np.where(x2 >= 0, x2 + x2 ** 2 / 2, 0.0)
    d2 = np.where(x2 >= 0, x2 + 1, 0.0)
    logits = a2 @ f["head/kernel"] + f["head/bias"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d_logits = (p - np.eye(CLASSES)[labels]) / len(x)
    g2 = d_logits @ f["head/kernel"].T
    g1 = (g2 * d2) @ f["key2/kernel"].T
    for name, pre, out, deriv, g, kernel in (("act1", x1, a1, d1, g1, f["key1/kernel"]),
                                             ("act2", x2, a2, d2, g2, f["key2/kernel"])):
      add(f"activation_sparsity/{name}", (np.abs(out) <= 1e-6).sum(), out.size)
      add(f"pre_activation_concentration/{name}", (pre <= 0).sum(), pre.size)
      add(f"mean_squared_derivative/{name}", (deriv ** 2).sum(), pre.size)
      eta = np.abs(g * deriv)
      for label, p_value in zip(THRESHOLDS, (1e-9, 1e-6, 1e-3)):
        add(f"effective_gradient_sparsity/{label}/{name}", (eta < p_value).sum(), eta.size)
      add(f"spectral_increase/kkT/{name}", (kernel ** 2).sum(), 1)
      add(f"spectral_increase/M/{name}", (g ** 2).sum(), len(g))
  out = {key: n / d for key, (n, d) in sums.items()}
  for metric in {key.rsplit("/", 1)[0] for key in out}:
    out[f"{metric}/average"] = np.mean([out[f"{metric}/act1"], out[f"{metric}/act2"]])
  return {k: np.array(v) for k, v in out.items()}


CHECKS = [
    Check(name="activation-sparsity columns (ReLU, J-SquaredReLU; random masks)",
          reference="NumPy re-derivation of the seed's hooks.py definitions",
          tolerance=1e-6, ours=_ours, numpy_reference=numpy_reference),
]
