"""Fidelity of the sharpness-aware steps and SSAM's masks, against PyTorch (and NumPy).

Ours is the toolkit's compiled train step (`robust_sparse.training.steps.make_train_step`
with `robust_sparse.training.sharpness.sam.sharpness_aware`, base `TorchSGD`, momentum 0.9,
weight decay 5e-4), two steps on two random batches, float32, from random
weights; the references re-derive each original (see
`benchmarks/peers/fidelity_sam.py`) in float64 from the same float32 start.

- Peer checks use a small conv model (conv -> batch norm -> ReLU -> conv with
  bias -> ReLU -> flatten -> dense), so kernels, gamma, beta and biases all
  take part (the ASAM rules differ on them) and the implicit perturbation
  has a convolution whose masked input gradient reaches another weight.
- NumPy checks use a two-layer perceptron whose gradients are written by
  hand, so the test suite covers SAM, both ASAM rules and SSAM-F too.

SSAM masks are random 50 % masks over every weight (the classifier
included: the implicit perturbation must ignore its mask).
"""

import math

import numpy as np

from benchmarks.fidelity import Check

RHO, ETA, LR, MOMENTUM, WEIGHT_DECAY = 0.5, 0.01, 0.1, 0.9, 5e-4
BATCH, CLASSES = 8, 3
CONV_INPUT = (6, 6, 2)
MLP_INPUT = 5


# ---- models ----------------------------------------------------------------------------
def _conv_model():
  import keras

  from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
  inputs = keras.Input(CONV_INPUT)
  x = MaskedConv2D(4, 3, padding="same", use_bias=False, name="conv1")(inputs)
  x = keras.layers.BatchNormalization(name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = MaskedConv2D(4, 3, padding="same", name="conv2")(x)
  x = keras.layers.ReLU()(x)
  x = keras.layers.Flatten()(x)
  return keras.Model(inputs, MaskedDense(CLASSES, name="dense")(x))


def _mlp_model():
  import keras

  from robust_sparse.nn.layers import MaskedDense
  inputs = keras.Input((MLP_INPUT,))
  x = MaskedDense(6, name="hidden")(inputs)
  x = keras.layers.ReLU()(x)
  return keras.Model(inputs, MaskedDense(CLASSES, name="dense")(x))


def _named_variables(model):
  """{"<layer>_<variable>": variable} of the trainable variables, in model order."""
  owner = {}
  for layer in model.layers:
    for v in layer.trainable_weights:
      owner[id(v)] = f"{layer.name}_{v.name}"
  return {owner[id(v)]: v for v in model.trainable_variables}


def _randomize(model, rng):
  for name, v in _named_variables(model).items():
    shape = tuple(v.shape)
    if name.endswith("gamma"):
      value = 1.0 + 0.2 * rng.normal(size=shape)
    elif name.endswith(("bias", "beta")):
      value = 0.2 * rng.normal(size=shape)
    else:
      value = rng.normal(size=shape) / math.sqrt(np.prod(shape[:-1]))
    v.assign(value.astype(np.float32))


def _data(rng, input_shape, steps=2):
  return {**{f"x{s}": rng.normal(size=(BATCH,) + input_shape).astype(np.float32)
             for s in range(steps)},
          **{f"y{s}": rng.integers(0, CLASSES, BATCH).astype(np.int64) for s in range(steps)}}


def _random_masks(rng, variables):
  return {name: (rng.random(tuple(v.shape)) < 0.5).astype(np.float32)
          for name, v in variables.items()}


# ---- ours: the toolkit's SAM-family step ---------------------------------------------------
def _ours_steps(rule, model_fn, masks="none"):
  """Two toolkit steps. `rule`: sam, asam_official, asam_davda54, ssam or implicit;
  `masks`: none, random (50 %) or ssamd (SSAM-D's initial mask, sparsity 0.5)."""

  def run(context):
    import keras
    import tensorflow as tf

    from robust_sparse.training.optimizers import make_optimizer
    from robust_sparse.training.sharpness.sam import sharpness_aware
    from robust_sparse.training.sharpness.sparse_perturbation import DynamicMasks
    from robust_sparse.training.steps import (OptimizerGroup, cross_entropy, loss_and_gradients,
                                     make_train_step)
    keras.utils.set_random_seed(context.seed)
    rng = np.random.default_rng(context.seed)
    model = model_fn()
    _randomize(model, rng)
    named = _named_variables(model)
    inputs = {"p:" + n: v.numpy() for n, v in named.items()}
    inputs.update(_data(rng, tuple(model.input_shape[1:])))
    inputs.update(rule=np.array("ssam" if rule == "ssam" else
                                "sam" if rule == "implicit" else rule),
                  rho=np.array(RHO), eta=np.array(ETA), lr=np.array(LR),
                  momentum=np.array(MOMENTUM), weight_decay=np.array(WEIGHT_DECAY))
    mask_values = None
    if masks == "random":
      mask_values = _random_masks(rng, named)
    elif masks == "ssamd":
      dynamic = DynamicMasks(model, None, sparsity=0.5, epochs=1)
      dynamic.initialize(context.seed)
      mask_values = {n: m.numpy() for n, m in zip(named, dynamic.values())}
    mask_list = None if mask_values is None else [tf.constant(mask_values[n]) for n in named]
    if mask_values is not None:
      prefix = "implicit:" if rule == "implicit" else "mask:"
      inputs.update({prefix + n: m for n, m in mask_values.items()})
    options = dict(rho=RHO)
    if rule.startswith("asam"):
      options.update(adaptive=True, eta=ETA, asam_rule=rule.split("_")[1])
    if rule == "ssam":
      options.update(mask_fn=lambda: mask_list)
    if rule == "implicit":
      options.update(implicit_mask_fn=lambda: mask_list)
    fn = sharpness_aware(loss_and_gradients(model, cross_entropy(CLASSES)), model, **options)
    optimizer = make_optimizer("sgd", LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    step = make_train_step(model, fn, [OptimizerGroup("weights", optimizer)])
    for s in range(2):
      step(tf.constant(inputs[f"x{s}"]), tf.constant(inputs[f"y{s}"], tf.int32),
           tf.constant(0, tf.int64), tf.constant(s, tf.int64))
    outputs = {"p:" + n: v.numpy() for n, v in named.items()}
    if masks == "ssamd":  # The seed's live count, N - ceil(N * sparsity).
      total = sum(m.size for m in mask_values.values())
      outputs["live"] = np.array(sum(m.sum() for m in mask_values.values()))
      inputs["ssamd_sparsity"] = np.array(0.5)
    return inputs, outputs

  return run


# ---- NumPy reference: the perceptron's two steps ------------------------------------------
def _mlp_loss_grads(p, x, y):
  """Mean cross-entropy of dense(relu(hidden(x))) and its gradients, by hand."""
  pre = x @ p["hidden_kernel"] + p["hidden_bias"]
  h = np.maximum(pre, 0.0)
  logits = h @ p["dense_kernel"] + p["dense_bias"]
  logits = logits - logits.max(1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  d_logits = (probs - np.eye(CLASSES)[y]) / len(y)
  d_h = d_logits @ p["dense_kernel"].T * (pre > 0)
  return {"dense_kernel": h.T @ d_logits, "dense_bias": d_logits.sum(0),
          "hidden_kernel": x.T @ d_h, "hidden_bias": d_h.sum(0)}


def _numpy_ascent(p, g, inputs):
  """e of each original (see the peer module's `_ascent`), in NumPy."""
  rule, rho, eta = str(inputs["rule"]), float(inputs["rho"]), float(inputs["eta"])
  norm = lambda parts: math.sqrt(sum(float((a ** 2).sum()) for a in parts))  # noqa: E731
  if rule in ("sam", "ssam"):
    scale = rho / (norm(g.values()) + 1e-7)
    return {n: g[n] * scale * (inputs["mask:" + n] if rule == "ssam" else 1.0) for n in g}
  if rule == "asam_official":
    t = {n: np.abs(p[n]) + eta if n.endswith("kernel") else 1.0 for n in g}
    scale = rho / (norm(t[n] * g[n] for n in g) + 1e-16)
    return {n: t[n] ** 2 * g[n] * scale for n in g}
  scale = rho / (norm(np.abs(p[n]) * g[n] for n in g) + 1e-12)  # davda54, adaptive=True.
  return {n: p[n] ** 2 * g[n] * scale for n in g}


def numpy_mlp_steps(inputs):
  p = {k[2:]: v.astype(np.float64) for k, v in inputs.items() if k.startswith("p:")}
  lr, momentum, decay = float(inputs["lr"]), float(inputs["momentum"]), float(
      inputs["weight_decay"])
  buffers = {}
  for s in range(2):
    x, y = inputs[f"x{s}"].astype(np.float64), inputs[f"y{s}"]
    e = _numpy_ascent(p, _mlp_loss_grads(p, x, y), inputs)
    g = _mlp_loss_grads({n: p[n] + e[n] for n in p}, x, y)
    for n in p:  # torch.optim.SGD.
      d = g[n] + decay * p[n]
      buffers[n] = d if s == 0 else momentum * buffers[n] + d
      p[n] = p[n] - lr * buffers[n]
  return {"p:" + n: v for n, v in p.items()}


# ---- SSAM-F: Fisher information and masks -------------------------------------------------
def _ours_fisher(context):
  import keras

  from robust_sparse.training.sharpness import ssam
  from robust_sparse.training.steps import cross_entropy
  keras.utils.set_random_seed(context.seed)
  rng = np.random.default_rng(context.seed)
  model = _conv_model()
  _randomize(model, rng)
  named = _named_variables(model)
  data = _data(rng, CONV_INPUT, steps=1)
  fisher = ssam.fisher_information(model, cross_entropy(CLASSES), data["x0"], data["y0"],
                                   chunk_size=3)
  inputs = {"p:" + n: v.numpy() for n, v in named.items()}
  inputs.update(x=data["x0"], y=data["y0"])
  return inputs, {"fisher:" + n: f.numpy() for n, f in zip(named, fisher)}


def _ours_masks(pattern, layout="correct", model_fn=_conv_model):
  def run(context):
    import keras

    from robust_sparse.training.sharpness import ssam
    keras.utils.set_random_seed(context.seed)
    rng = np.random.default_rng(context.seed)
    named = _named_variables(model_fn())
    scores = {n: rng.random(tuple(v.shape)).astype(np.float32) for n, v in named.items()}
    masks = ssam.fisher_masks([scores[n] for n in named], list(named.values()), sparsity=0.5,
                              pattern=pattern, n=2, m=4, nm_conv_layout=layout)
    inputs = {"fisher:" + n: s for n, s in scores.items()}
    inputs.update(pattern=np.array(pattern), sparsity=np.array(0.5), n=np.array(2),
                  m=np.array(4), layout=np.array(layout))
    return inputs, {"mask:" + n: m.numpy() for n, m in zip(named, masks)}
  return run


def _torch_layout(a):
  return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


def _keras_layout(a):
  return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T if a.ndim == 2 else a


def numpy_fisher_masks(inputs):
  """SSAMF.update_mask in NumPy (PyTorch layouts; N:M groups of M in memory order)."""
  names = sorted(k[len("fisher:"):] for k in inputs if k.startswith("fisher:"))
  scores = {n: _torch_layout(inputs["fisher:" + n].astype(np.float64)) for n in names}
  pattern, sparsity = str(inputs["pattern"]), float(inputs["sparsity"])
  total = sum(s.size for s in scores.values())
  masks = {}
  if pattern == "unstructured":
    flat = np.concatenate([scores[n].ravel() for n in names])
    chosen = np.zeros_like(flat)
    chosen[np.argsort(-flat, kind="stable")[:int(total * (1 - sparsity))]] = 1.0
    sizes = np.cumsum([0] + [scores[n].size for n in names])
    masks = {n: chosen[sizes[i]:sizes[i + 1]].reshape(scores[n].shape)
             for i, n in enumerate(names)}
  elif pattern == "structured":
    kept, chosen = 0, set()
    for i in np.argsort([-scores[n].mean() for n in names], kind="stable"):
      if kept >= int(total * (1 - sparsity)):
        break
      chosen.add(names[i])
      kept += scores[names[i]].size
    masks = {n: np.full(scores[n].shape, float(n in chosen)) for n in names}
  else:
    n_keep, m = int(inputs["n"]), int(inputs["m"])

    def nm(score):
      groups = score.reshape(-1, m)
      out = np.ones_like(groups)
      np.put_along_axis(out, np.argsort(groups, axis=1)[:, :m - n_keep], 0.0, axis=1)
      return out.reshape(score.shape)

    for n in names:
      s = scores[n]
      if s.ndim == 4 and str(inputs["layout"]) == "seed":
        masks[n] = nm(np.ascontiguousarray(s.reshape(s.shape[0], -1).T)).reshape(s.shape)
      else:
        masks[n] = nm(s) if s.ndim in (2, 4) else np.ones_like(s)
  return {"mask:" + n: _keras_layout(masks[n]) for n in names}


# ---- SSAM-D: drop and grow -----------------------------------------------------------------
def _ours_dynamic(epoch, epochs, growth="random"):
  """One `ssam.dynamic_update` from a random 50 % mask; the random growth scores it
  draws are handed to the reference, which cannot draw TensorFlow's numbers."""

  def run(context):
    import tensorflow as tf

    from robust_sparse.training.sharpness import ssam
    rng = np.random.default_rng(context.seed)
    shapes = [(3, 3, 2, 4), (4,), (12, 3)]
    total = sum(int(np.prod(s)) for s in shapes)
    flat_mask = np.zeros(total, np.float32)
    flat_mask[rng.permutation(total)[:total // 2]] = 1.0
    grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
    weights = [rng.normal(size=s).astype(np.float32) for s in shapes]
    sizes = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    masks = [flat_mask[sizes[i]:sizes[i + 1]].reshape(s) for i, s in enumerate(shapes)]
    seed = tf.constant([context.seed, epoch], tf.int64)
    new = ssam.dynamic_update(masks, grads, weights, epoch=epoch, epochs=epochs, sparsity=0.5,
                              drop_rate=0.5, drop_strategy="gradient", growth_strategy=growth,
                              seed=seed)
    if growth == "random":
      growth_score = tf.random.stateless_uniform([total], tf.random.fold_in(seed, 1)).numpy()
    else:
      growth_score = np.concatenate([np.abs(w).ravel() for w in weights])
    inputs = dict(mask=flat_mask, death_score=np.concatenate([np.abs(g).ravel() for g in grads]),
                  growth_score=growth_score, sparsity=np.array(0.5), drop_rate=np.array(0.5),
                  epoch=np.array(float(epoch)), epochs=np.array(float(epochs)))
    return inputs, {"mask": np.concatenate([m.numpy().ravel() for m in new])}

  return run


def numpy_dynamic_update(inputs):
  """SSAMD.update_mask in NumPy (see the peer module's `dynamic_update`)."""
  mask = inputs["mask"].astype(np.float64)
  death = (inputs["death_score"].astype(np.float64) + 1e-7) * mask
  growth = (inputs["growth_score"].astype(np.float64) + 1e-7) * (1 - mask)
  sparsity, drop_rate = float(inputs["sparsity"]), float(inputs["drop_rate"])
  rate = drop_rate * (1 + math.cos(math.pi * float(inputs["epoch"]) / float(inputs["epochs"]))) / 2
  total = len(mask)
  death_num = int(min((total - total * sparsity) * rate, total * sparsity))
  survivors = int((total - total * sparsity) * (1 - rate))
  new = np.zeros_like(mask)
  new[np.argsort(-death, kind="stable")[:survivors]] = 1.0
  new[np.argsort(-growth, kind="stable")[:death_num]] += 1.0
  return {"mask": new}


def _ours_ssamd_live(context):
  import keras

  from robust_sparse.training.sharpness.sparse_perturbation import DynamicMasks
  keras.utils.set_random_seed(context.seed)
  model = _mlp_model()
  dynamic = DynamicMasks(model, None, sparsity=0.3, epochs=1)
  dynamic.initialize(context.seed)
  sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
  live = sum(float(m.numpy().sum()) for m in dynamic.values())
  return {"sizes": np.array(sizes), "sparsity": np.array(0.3)}, {"live": np.array(live)}


def numpy_live_count(inputs):
  """SSAMD.init_mask: N - ceil(N * sparsity) live entries."""
  total = int(inputs["sizes"].sum())
  return {"live": np.array(float(total - math.ceil(total * float(inputs["sparsity"]))))}


# ---- the checks ------------------------------------------------------------------------------
_PEER = "benchmarks.peers.fidelity_sam:"
_STEPS = "two steps (SGD momentum 0.9, wd 5e-4), rho 0.5"
_MI_PENG = "PyTorch: Mi-Peng's first_step, full-gradient norm + 1e-7"


def _peer(name, reference, ours, function, tolerance=1e-6):
  return Check(name, reference, tolerance, ours, peer=_PEER + function, needs=("torch",))


CHECKS = [
    _peer(f"SAM, {_STEPS}, conv model", "PyTorch: Mi-Peng's SAM first_step/second_step",
          _ours_steps("sam", _conv_model), "sam_steps"),
    _peer(f"ASAM official rule, {_STEPS}, conv model",
          "PyTorch: SamsungLabs/ASAM ascent_step (T=|w|+eta on *.weight, 1 on biases)",
          _ours_steps("asam_official", _conv_model), "sam_steps"),
    _peer(f"ASAM davda54 rule (--asam_rule=davda54), {_STEPS}, conv model",
          "PyTorch: davda54/sam adaptive=True (T=|w|)",
          _ours_steps("asam_davda54", _conv_model), "sam_steps"),
    _peer(f"SSAM-F, random 50 % mask, {_STEPS}, conv model", _MI_PENG,
          _ours_steps("ssam", _conv_model, "random"), "sam_steps"),
    _peer(f"SSAM-D, its initial random mask, {_STEPS}, conv model",
          _MI_PENG + "; live = N - ceil(N s)", _ours_steps("ssam", _conv_model, "ssamd"),
          "sam_steps"),
    _peer(f"implicit perturbation (sam, random 50 % masks), {_STEPS}, conv model",
          "PyTorch: SAMConv ascent pass (W*mask input gradient, convs only; dense stays dense)",
          _ours_steps("implicit", _conv_model, "random"), "sam_steps"),
    _peer("SSAM-F Fisher information, 8 examples, conv-BN model",
          "PyTorch: get_fisher (batch-1 train-mode gradients, squared, summed)", _ours_fisher,
          "fisher", tolerance=1e-5),
    _peer("SSAM-F unstructured mask, sparsity 0.5", "PyTorch: SSAMF.update_mask (global topk)",
          _ours_masks("unstructured"), "fisher_masks", tolerance=0.5),
    _peer("SSAM-F structured mask, sparsity 0.5",
          "PyTorch: SSAMF.update_mask (tensors by mean)", _ours_masks("structured"),
          "fisher_masks", tolerance=0.5),
    _peer("SSAM-F N:M 2:4 mask, dense and conv (default layout)",
          "PyTorch: get_nm_mask on (out, in[, kh, kw])", _ours_masks("nm"), "fisher_masks",
          tolerance=0.5),
    _peer("SSAM-F N:M 2:4 conv mask, --nm_conv_layout=seed",
          "PyTorch: SSAMF.update_mask's view(co,-1).t() ... view(co,ci,k,k)",
          _ours_masks("nm", "seed"), "fisher_masks", tolerance=0.5),
    _peer("SSAM-D drop (gradient) and grow (random), epoch 0 of 10",
          "PyTorch: SSAMD.update_mask on the same scores", _ours_dynamic(0, 10),
          "dynamic_update", tolerance=0.5),
    Check(f"SAM, {_STEPS}, perceptron [NumPy]", "NumPy: Mi-Peng's first_step", 1e-6,
          _ours_steps("sam", _mlp_model), numpy_reference=numpy_mlp_steps),
    Check(f"ASAM official rule, {_STEPS}, perceptron [NumPy]",
          "NumPy: SamsungLabs/ASAM (T=|w|+eta on kernels, 1 on biases)", 1e-6,
          _ours_steps("asam_official", _mlp_model), numpy_reference=numpy_mlp_steps),
    Check(f"ASAM davda54 rule, {_STEPS}, perceptron [NumPy]",
          "NumPy: davda54/sam adaptive=True", 1e-6,
          _ours_steps("asam_davda54", _mlp_model), numpy_reference=numpy_mlp_steps),
    Check(f"SSAM-F, random 50 % mask, {_STEPS}, perceptron [NumPy]",
          "NumPy: Mi-Peng's first_step, full-gradient norm", 1e-6,
          _ours_steps("ssam", _mlp_model, "random"), numpy_reference=numpy_mlp_steps),
    Check("SSAM-D initial mask live count, sparsity 0.3 [NumPy]",
          "NumPy: N - ceil(N s) (SSAMD.init_mask)", 0.5, _ours_ssamd_live,
          numpy_reference=numpy_live_count),
    Check("SSAM-F masks: unstructured, sparsity 0.5 [NumPy]", "NumPy: SSAMF.update_mask", 0.5,
          _ours_masks("unstructured"), numpy_reference=numpy_fisher_masks),
    Check("SSAM-F masks: structured, sparsity 0.5 [NumPy]", "NumPy: SSAMF.update_mask", 0.5,
          _ours_masks("structured"), numpy_reference=numpy_fisher_masks),
    Check("SSAM-F masks: N:M 2:4, dense and conv [NumPy]", "NumPy: get_nm_mask", 0.5,
          _ours_masks("nm"), numpy_reference=numpy_fisher_masks),
    Check("SSAM-F masks: N:M 2:4, --nm_conv_layout=seed [NumPy]",
          "NumPy: SSAMF.update_mask's conv reshape", 0.5, _ours_masks("nm", "seed"),
          numpy_reference=numpy_fisher_masks),
    Check("SSAM-D drop (gradient) and grow (random), epoch 0 of 10 [NumPy]",
          "NumPy: SSAMD.update_mask", 0.5, _ours_dynamic(0, 10),
          numpy_reference=numpy_dynamic_update),
    Check("SSAM-D drop (gradient) and grow (weight), epoch 5 of 10 [NumPy]",
          "NumPy: SSAMD.update_mask", 0.5, _ours_dynamic(5, 10, "weight"),
          numpy_reference=numpy_dynamic_update),
]
