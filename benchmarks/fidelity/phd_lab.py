"""Fidelity of phd-lab's probes and receptive fields (spec 5.4, 5.5) against NumPy / sklearn.

Probes, in two parts:
  * the latents: a masked conv-bn network with random weights, masks and
    batch-norm affine parameters; the training set extracted in training
    mode in batches of 16 (train-mode batch norm: each batch's own biased
    statistics), the test set in inference mode (moving statistics), every
    conv map adaptive-average-pooled to 4x4 as PyTorch's
    `adaptive_avg_pool2d` (overlapping windows floor(i H/d)..ceil((i+1) H/d)
    on a 6x6 map) and flattened channel-major (C, d, d) as the seed's `view`;
    re-derived in NumPy (convolution by explicit sums over the zero-padded
    input).
  * the probe: the toolkit's `train_probes` on stored latents against
    scikit-learn's `LogisticRegression` called as phd-lab calls it
    (multinomial, saga, C 1, max_iter 100, tol 1e-4, no feature scaling),
    scored with `accuracy_score` on train and eval (saga's seed fixed to 0
    on both sides; phd-lab leaves it unset).
Receptive fields: phd-lab's recursion (j = 1, r = 1, start = 0.5; per conv
and max-pool k_eff = k + (k-1)(d-1), r += (k_eff-1) j, start += ((k_eff-1)/2
- p) j, j *= s) in NumPy on a random stack of PyTorch-style layers (random
kernel, stride, dilation and symmetric padding, as ZeroPadding2D + 'valid'
layers in Keras) and on phd-lab's VGG16 configuration D.
"""

import numpy as np

from benchmarks.fidelity import Check

SIZE, CHANNELS, BATCH, POOL, EPSILON = 6, 2, 16, 4, 1e-5


# ---- probe latents ---------------------------------------------------------------------
def _probe_model(seed):
  import keras
  from robust_sparse.nn.layers import MaskedConv2D, MaskedDense
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((SIZE, SIZE, CHANNELS))
  x = MaskedConv2D(3, 3, padding="same", bias_initializer="random_normal", name="conv_a")(inputs)
  x = keras.layers.BatchNormalization(epsilon=EPSILON, name="bn")(x)
  x = keras.layers.ReLU()(x)
  x = MaskedConv2D(4, 3, padding="same", bias_initializer="random_normal", name="conv_b")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  model = keras.Model(inputs, MaskedDense(3, bias_initializer="random_normal", name="out")(x))
  rng = np.random.default_rng(seed)
  for name in ("conv_a", "conv_b", "out"):
    layer = model.get_layer(name)
    layer.mask.assign((rng.random(layer.mask.shape) < 0.5).astype(np.float32))
  bn = model.get_layer("bn")
  for variable, low, high in ((bn.gamma, 0.5, 1.5), (bn.beta, -0.5, 0.5),
                              (bn.moving_mean, -0.5, 0.5), (bn.moving_variance, 0.5, 2.0)):
    variable.assign(rng.uniform(low, high, variable.shape).astype(np.float32))
  return model


def _data(count, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, count)
  x = rng.normal(size=(count, SIZE, SIZE, CHANNELS)).astype(np.float32)
  x[np.arange(count), :, :, 0] += y[:, None, None] * 0.7
  return x, y


def _weights(model):
  arrays = {}
  for name in ("conv_a", "conv_b", "out"):
    layer = model.get_layer(name)
    arrays[f"{name}/kernel"] = layer.masked_kernel.numpy()
    arrays[f"{name}/bias"] = layer.bias.numpy()
  bn = model.get_layer("bn")
  for key in ("gamma", "beta", "moving_mean", "moving_variance"):
    arrays[f"bn/{key}"] = getattr(bn, key).numpy()
  return arrays


def _latents_ours(context):
  import tempfile
  from robust_sparse.measure import probes
  model = _probe_model(context.seed)
  x_train, y_train = _data(40, context.seed + 1)
  x_eval, y_eval = _data(24, context.seed + 2)
  folder = tempfile.mkdtemp(prefix="probe_fidelity_")
  train = probes.extract_latents(model, (x_train, y_train), folder, split="train", pool=POOL,
                                 batch_size=BATCH)
  evaluation = probes.extract_latents(model, (x_eval, y_eval), folder, split="eval", pool=POOL,
                                      batch_size=BATCH)
  inputs = dict(_weights(model), x_train=x_train, x_eval=x_eval)
  outputs = {f"{split}/{name}": np.load(paths[name]) for split, paths in
             (("train", train), ("eval", evaluation)) for name in ("conv_a", "conv_b", "out")}
  return inputs, outputs


def _conv_same(x, kernel, bias):
  """3x3 stride-1 convolution with one pixel of zero padding (PyTorch's padding=1)."""
  size = kernel.shape[0]
  padded = np.pad(x, ((0, 0), (size // 2,) * 2, (size // 2,) * 2, (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(size):
    for j in range(size):
      out += padded[:, i:i + x.shape[1], j:j + x.shape[2]] @ kernel[i, j]
  return out + bias


def _adaptive_pool_flatten(maps, size):
  """PyTorch's adaptive_avg_pool2d to size x size, then .view(B, -1) of the NCHW result."""
  height, width = maps.shape[1:3]
  out = np.zeros((maps.shape[0], maps.shape[3], size, size))
  for i in range(size):
    for j in range(size):
      rows = slice(i * height // size, -(-(i + 1) * height // size))
      cols = slice(j * width // size, -(-(j + 1) * width // size))
      out[:, :, i, j] = maps[:, rows, cols].mean(axis=(1, 2))
  return out.reshape(len(maps), -1)


def _latents_reference(a):
  f = {k: np.asarray(v, np.float64) for k, v in a.items()}
  results = {}
  for split, x in (("train", f["x_train"]), ("eval", f["x_eval"])):
    pieces = {"conv_a": [], "conv_b": [], "out": []}
    for start in range(0, len(x), BATCH):
      batch = x[start:start + BATCH]
      conv_a = _conv_same(batch, f["conv_a/kernel"], f["conv_a/bias"])
      if split == "train":  # The batch's own biased statistics.
        mean, variance = conv_a.mean(axis=(0, 1, 2)), conv_a.var(axis=(0, 1, 2))
      else:
        mean, variance = f["bn/moving_mean"], f["bn/moving_variance"]
      normal = (conv_a - mean) / np.sqrt(variance + EPSILON) * f["bn/gamma"] + f["bn/beta"]
      conv_b = _conv_same(np.maximum(normal, 0), f["conv_b/kernel"], f["conv_b/bias"])
      out = conv_b.mean(axis=(1, 2)) @ f["out/kernel"] + f["out/bias"]
      pieces["conv_a"].append(_adaptive_pool_flatten(conv_a, POOL))
      pieces["conv_b"].append(_adaptive_pool_flatten(conv_b, POOL))
      pieces["out"].append(out)
    results.update({f"{split}/{k}": np.concatenate(v) for k, v in pieces.items()})
  return results


# ---- the probe ---------------------------------------------------------------------------
def _probe_ours(context):
  import tempfile
  from robust_sparse.measure import probes
  model = _probe_model(context.seed)
  x_train, y_train = _data(300, context.seed + 3)
  x_eval, y_eval = _data(120, context.seed + 4)
  folder = tempfile.mkdtemp(prefix="probe_fidelity_")
  train = probes.extract_latents(model, (x_train, y_train), folder, split="train", pool=2)
  evaluation = probes.extract_latents(model, (x_eval, y_eval), folder, split="eval", pool=2)
  table = probes.train_probes(folder, n_jobs=1)
  inputs = {"y_train": y_train, "y_eval": y_eval}
  outputs = {}
  for index, name in enumerate(("conv_a", "conv_b", "out")):
    inputs[f"train/{index}"] = np.load(train[name])
    inputs[f"eval/{index}"] = np.load(evaluation[name])
    row = table[table["name"] == f"train-{name}"].iloc[0]
    outputs[f"train_acc/{index}"] = np.array(row["train_acc"])
    outputs[f"eval_acc/{index}"] = np.array(row["eval_acc"])
  return inputs, outputs


def _probe_reference(a):
  import warnings
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import accuracy_score
  results = {}
  for index in range(3):
    x_train, x_eval = a[f"train/{index}"], a[f"eval/{index}"]
    # phd-lab: LogisticRegression(multi_class='multinomial', solver='saga') with the
    # defaults (multinomial is scikit-learn's default for saga now).
    probe = LogisticRegression(solver="saga", C=1.0, max_iter=100, tol=1e-4, random_state=0)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      probe.fit(x_train, a["y_train"])
    results[f"train_acc/{index}"] = np.array(accuracy_score(a["y_train"],
                                                            probe.predict(x_train)))
    results[f"eval_acc/{index}"] = np.array(accuracy_score(a["y_eval"], probe.predict(x_eval)))
  return results


# ---- receptive fields --------------------------------------------------------------------
def _random_layers(seed):
  """[(kind, kernel, stride, dilation, padding)] of a random PyTorch-style stack on 64 px."""
  rng = np.random.default_rng(seed)
  layers = []
  for _ in range(7):
    kind = "pool" if rng.random() < 0.3 else "conv"
    kernel = int(rng.choice([2, 3]) if kind == "pool" else rng.choice([1, 3, 5]))
    stride = int(rng.choice([1, 2]))
    dilation = 1 if kind == "pool" else int(rng.choice([1, 2]))
    effective = kernel + (kernel - 1) * (dilation - 1)
    padding = int(rng.integers(0, effective // 2 + 1)) if kind == "conv" else 0
    layers.append((kind, kernel, stride, dilation, padding))
  return layers


def _keras_stack(layers, size):
  import keras
  inputs = keras.Input((size, size, 3))
  x = inputs
  for index, (kind, kernel, stride, dilation, padding) in enumerate(layers):
    if kind == "pool":
      x = keras.layers.MaxPooling2D(kernel, stride, name=f"pool_{index}")(x)
      continue
    if padding:
      x = keras.layers.ZeroPadding2D(padding, name=f"pad_{index}")(x)
    x = keras.layers.Conv2D(4, kernel, strides=stride if dilation == 1 else 1,
                            dilation_rate=dilation, name=f"conv_{index}")(x)
    x = keras.layers.BatchNormalization(name=f"bn_{index}")(x)
    x = keras.layers.ReLU()(x)
  return keras.Model(inputs, x)


def _encode(layers):
  return np.array([(0 if kind == "conv" else 1, k, s, d, p) for kind, k, s, d, p in layers])


def _fields_ours_random(context):
  from robust_sparse.measure.receptive_field import receptive_fields
  layers = _random_layers(context.seed)
  # Keras cannot stride a dilated convolution: those layers keep stride 1.
  layers = [(kind, k, 1 if d > 1 else s, d, p) for kind, k, s, d, p in layers]
  rows = receptive_fields(_keras_stack(layers, 64))
  return {"layers": _encode(layers)}, _rows(rows)


def _fields_ours_vgg16(context):
  from robust_sparse.models import build_model
  from robust_sparse.measure.receptive_field import receptive_fields
  cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
  layers = [("pool", 2, 2, 1, 0) if c == "M" else ("conv", 3, 1, 1, 1) for c in cfg]
  rows = receptive_fields(build_model("vgg16", (32, 32, 3), 10))
  return {"layers": _encode(layers)}, _rows(rows)


def _rows(rows):
  return {"receptive_field": np.array([r.receptive_field for r in rows]),
          "jump": np.array([r.jump for r in rows]),
          "start": np.array([r.start for r in rows])}


def _fields_reference(a):
  jump, field, start = 1.0, 1.0, 0.5
  out = {"receptive_field": [], "jump": [], "start": []}
  for kind, kernel, stride, dilation, padding in a["layers"]:
    effective = kernel + (kernel - 1) * (dilation - 1)
    field += (effective - 1) * jump
    start += ((effective - 1) / 2 - padding) * jump
    jump *= stride
    if kind == 0:
      out["receptive_field"].append(field)
      out["jump"].append(jump)
      out["start"].append(start)
  return {k: np.array(v) for k, v in out.items()}


CHECKS = [
    Check(name="probe latents: train-mode conv-bn at batch 16, eval mode, adaptive pool 4x4 "
               "of 6x6 maps, channel-major",
          reference="NumPy re-derivation of phd-lab's extraction (BN batch statistics, "
                    "adaptive_avg_pool2d, view)",
          tolerance=1e-5, ours=_latents_ours, numpy_reference=_latents_reference),
    Check(name="probe accuracies (saga multinomial logistic regression per layer)",
          reference="scikit-learn LogisticRegression as phd-lab calls it, accuracy_score",
          tolerance=1e-12, ours=_probe_ours, numpy_reference=_probe_reference),
    Check(name="receptive fields of a random conv / max-pool stack (kernel, stride, "
               "dilation, padding)",
          reference="NumPy recursion of phd-lab's receptive_field.py",
          tolerance=1e-12, ours=_fields_ours_random, numpy_reference=_fields_reference),
    Check(name="receptive fields of phd-lab's VGG16 (cfg D) at 32 px",
          reference="NumPy recursion of phd-lab's receptive_field.py",
          tolerance=1e-12, ours=_fields_ours_vgg16, numpy_reference=_fields_reference),
]
