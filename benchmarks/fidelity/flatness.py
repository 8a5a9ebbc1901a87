"""Fidelity of augmented flatness (spec 2.3, `robust_sparse.measure.flatness`) with the seed's protocol.

The seed (cdgyp/sparsity, `hooks.py: CoefficientPlugin` and
`imagenet1k.py: train_one_epoch` with `--augmented-flatness-only
--correct-samples-only`): soft (mixed) labels turned into their argmax,
cross-entropy with label smoothing, `(loss * correct).mean()` scaled by the
AMP loss scale, G read by backward hooks, each term per batch, averaged over
batches, and the gradient terms divided by the mean accuracy (the notebook).
Random weights, random 50 % masks on the key and value kernels, random soft
labels, two batches.

  NumPy: explicit backpropagation of a token MLP (key -> ReLU -> value ->
    token mean -> head), inference and training mode being the same there.
  PyTorch: the seed's hooks (forward hooks on the linear layers' inputs,
    full backward hooks on their outputs and on the ReLU) on the same network
    with a batch normalisation in front, in train mode (batch statistics), as
    `model.train()` measures.
"""

import keras
import numpy as np

from benchmarks.fidelity import Check

TOKENS, FEATURES, HIDDEN, VALUE, CLASSES = 3, 4, 6, 5, 3
BATCH, BATCHES = 8, 2
LABEL_SMOOTHING = 0.11
LOSS_SCALE = 4.0
GRADIENT_TERMS = ("key", "L0_sum", "L0_preview", "value", "L2", "L2_term")
TERMS = ("key", "L0_sum", "L0_weight", "L0_preview", "value", "L2", "a2", "L2_term")


def _model(batch_norm: bool):
  from robust_sparse.nn import activations
  from robust_sparse.nn.layers import MaskedDense
  inputs = keras.Input((TOKENS, FEATURES))
  h = inputs
  if batch_norm:
    h = keras.layers.BatchNormalization(epsilon=1e-3, name="norm")(h)
  h = MaskedDense(HIDDEN, bias_initializer="random_normal", name="mlp_key")(h)
  a = activations.build("relu", name="mlp_activation")(h)
  v = MaskedDense(VALUE, bias_initializer="random_normal", name="mlp_value")(a)
  pooled = keras.layers.GlobalAveragePooling1D(name="pool")(v)
  return keras.Model(inputs, keras.layers.Dense(CLASSES, bias_initializer="random_normal",
                                                name="output")(pooled))


def _ours(batch_norm: bool):
  def ours(context):
    from robust_sparse.measure import flatness
    keras.utils.set_random_seed(context.seed)
    rng = np.random.default_rng(context.seed + 11)
    model = _model(batch_norm)
    inputs = {}
    for name in ("mlp_key", "mlp_value"):
      layer = model.get_layer(name)
      mask = (rng.random(layer.mask.shape) < 0.5).astype(np.float32)
      layer.mask.assign(mask)
      inputs[name + "/kernel"] = layer.masked_kernel.numpy()
      inputs[name + "/bias"] = layer.bias.numpy()
    output = model.get_layer("output")
    inputs["output/kernel"], inputs["output/bias"] = output.kernel.numpy(), output.bias.numpy()
    if batch_norm:
      norm = model.get_layer("norm")
      norm.gamma.assign(rng.uniform(0.5, 1.5, FEATURES).astype(np.float32))
      norm.beta.assign(rng.normal(0, 0.3, FEATURES).astype(np.float32))
      inputs["norm/gamma"], inputs["norm/beta"] = norm.gamma.numpy(), norm.beta.numpy()
    x = rng.normal(0.3, 1.0, (BATCHES * BATCH, TOKENS, FEATURES)).astype(np.float32)
    y = rng.dirichlet(np.full(CLASSES, 0.5), BATCHES * BATCH).astype(np.float32)
    inputs.update(x=x, y=y, batch_size=np.array(BATCH), label_smoothing=np.array(
        LABEL_SMOOTHING), loss_scale=np.array(LOSS_SCALE))
    batches = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    results = flatness.augmented_flatness(
        model, batches, correct_samples_only=True, label_smoothing=LABEL_SMOOTHING,
        loss_scale=LOSS_SCALE)
    outputs = {term: np.array(results["mlp"][term]) for term in TERMS}
    outputs["accuracy"] = np.array(results[flatness.SUMMARY]["accuracy"])
    return inputs, outputs
  return ours


def numpy_reference(inputs):
  """The seed's protocol by explicit float64 backpropagation (no normalisation layer)."""
  f = {k: np.asarray(v, np.float64) for k, v in inputs.items()}
  wk, bk = f["mlp_key/kernel"], f["mlp_key/bias"]
  wv, bv = f["mlp_value/kernel"], f["mlp_value/bias"]
  wo, bo = f["output/kernel"], f["output/bias"]
  size, smoothing, scale = int(f["batch_size"]), float(f["label_smoothing"]), float(
      f["loss_scale"])
  per_batch = {term: [] for term in TERMS}
  accuracies = []
  for start in range(0, len(f["x"]), size):
    x, y = f["x"][start:start + size], f["y"][start:start + size]
    labels = y.argmax(-1)
    z = x @ wk + bk                       # [B, T, H]
    a = np.maximum(z, 0)
    v = a @ wv + bv                       # [B, T, E]
    logits = v.mean(1) @ wo + bo          # [B, C]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.eye(CLASSES)[labels] * (1 - smoothing) + smoothing / CLASSES
    correct = (logits.argmax(-1) == labels).astype(np.float64)
    accuracies.append(correct.mean())
    d_logits = scale * correct[:, None] * (p - q) / len(x)
    d_v = np.repeat((d_logits @ wo.T)[:, None, :] / x.shape[1], x.shape[1], axis=1)
    d_a = d_v @ wv.T
    d_z = d_a * (z > 0)
    x2, a2 = (x ** 2).sum(-1), (a ** 2).sum(-1)
    gv2 = (d_v ** 2).sum(-1)
    active = (a > 0).astype(np.float64)
    l0_sum = (d_a ** 2 * active * x2[..., None]).mean()
    per_batch["key"].append(((d_z ** 2).sum(-1) * x2).sum(1).mean())
    per_batch["L0_sum"].append(l0_sum)
    per_batch["L0_weight"].append(active.mean())
    per_batch["L0_preview"].append(l0_sum / active.mean())
    per_batch["value"].append((gv2 * a2).sum(1).mean())
    per_batch["L2"].append(gv2.mean())
    per_batch["a2"].append(a2.mean())
    per_batch["L2_term"].append((a2 * gv2).mean())
  accuracy = float(np.mean(accuracies))
  out = {term: np.array(np.mean(values) / (accuracy if term in GRADIENT_TERMS else 1.0))
         for term, values in per_batch.items()}
  out["accuracy"] = np.array(accuracy)
  return out


CHECKS = [
    Check(name="augmented flatness, seed protocol (correct-only, label smoothing, "
               "loss scale, per-batch means / accuracy)",
          reference="NumPy backpropagation of spec 2.3 / the seed's hooks",
          tolerance=1e-6, ours=_ours(batch_norm=False), numpy_reference=numpy_reference),
    Check(name="augmented flatness, train mode with batch norm (seed's hooks)",
          reference="PyTorch CoefficientPlugin-style hooks, model.train()",
          tolerance=1e-6, ours=_ours(batch_norm=True),
          peer="benchmarks.peers.fidelity_flatness:augmented_flatness", needs=("torch",)),
]
