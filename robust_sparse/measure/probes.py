"""Linear probes (phd-lab, spec 5.4): how linearly separable each layer's outputs are.

A probe is a logistic regression fitted on one layer's outputs; its test
accuracy, layer by layer, shows where a network stops adding useful
information (Richter et al., "Size matters").

1. `extract_latents` runs a data set through a weight-sharing tap model
   (`saturation.tap_model`: no second forward pass per layer) in batches and
   stores the raw output of every conv and dense layer as `.npy` (never
   pickle) under a folder: `{split}-{layer}.npy` [n, features] and
   `{split}-labels.npy`, plus `latents.json` (layer order, pool size). Conv
   maps are adaptive-average-pooled to `pool` x `pool` (PyTorch's
   `adaptive_avg_pool2d`) and flattened channel-major (C, d, d) as the seed's
   `view`; `pool=None` keeps whole maps [n, H, W, C] for pixel-wise probes.
   The "train" split runs in training mode by default, as the seed (batch
   statistics, dropout); the model's variables are never changed. Its
   batches may be an iterable (the seed reads the training set through its
   shuffled, augmented training loader, whose batch size sets the batch
   statistics); `experiments/phd_lab.py` builds that.
2. `train_probes` fits scikit-learn's `LogisticRegression` (multinomial, saga,
   C 1.0, max_iter 100, tol 1e-4, no feature scaling, as the seed) per layer
   in parallel (joblib), caches each layer's result in `probes/<layer>.json`
   so a re-run skips finished layers, and writes the seed's
   `probe_performances.csv` (`;name;train_acc;eval_acc`, name
   `train-<layer>`, accuracies in [0, 1]).
3. `train_pixelwise_probes`: one probe per spatial position of each conv map
   (C features), `pixelwise_probe_performances.csv`, names
   `train-<layer>-(i,j)`.
"""

import json
import os
import warnings
from typing import Dict, Optional, Sequence

import joblib
import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from robust_sparse.core.files import atomic_open, write_json
from robust_sparse.measure.saturation import tap_model, tapped_layers

SPLITS = ("train", "eval")
MANIFEST = "latents.json"


# ---- adaptive average pooling --------------------------------------------------------
def pooling_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's adaptive average pooling along one axis, as a matrix [out_size, in_size].

  Output i averages inputs floor(i * in / out) up to ceil((i + 1) * in / out)
  (exclusive), so windows overlap when the sizes do not divide, and repeat
  inputs when out_size > in_size.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, received in_size={in_size}, "
                     f"out_size={out_size}")
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool2d(x, size: int, *, allow_upsampling: bool = False):
  """PyTorch's `adaptive_avg_pool2d(x, size)` for channels-last maps.

  Args:
    x: maps [B, H, W, C] with static H and W.
    size: the output side d.
    allow_upsampling: pool a map smaller than d too (PyTorch repeats its
      pixels); otherwise that is an error.

  Returns:
    [B, d, d, C], in x's dtype.

  Raises:
    ValueError: for d < 1, or d larger than H or W without `allow_upsampling`.
  """
  height, width = int(x.shape[1]), int(x.shape[2])
  if size < 1 or (not allow_upsampling and size > min(height, width)):
    raise ValueError(f"size must be in [1, {min(height, width)}] for a {height}x{width} map, "
                     f"received size={size}")
  rows = tf.constant(pooling_matrix(height, size), x.dtype)
  cols = tf.constant(pooling_matrix(width, size), x.dtype)
  return tf.einsum("ih,bhwc,jw->bijc", rows, x, cols)


# ---- extraction ------------------------------------------------------------------------
def _latent_path(folder, split, layer):
  return os.path.join(folder, f"{split}-{layer}.npy")


def _read_manifest(folder):
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _batches(data, batch_size):
  """(x, y) batches and the example count of arrays or of an iterable of batches."""
  x, y = data
  count = len(x)
  if len(y) != count:
    raise ValueError(f"data holds {count} inputs but {len(y)} labels")
  return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, count, batch_size)), count


def extract_latents(model: keras.Model, data, folder: str, *, split: str,
                    pool: Optional[int] = 4, training: Optional[bool] = None,
                    layers: Optional[Sequence[str]] = None, batch_size: int = 256,
                    num_examples: Optional[int] = None, upsample_small_maps: bool = True,
                    source: Optional[Dict[str, object]] = None,
                    overwrite: bool = False) -> Dict[str, str]:
  """Stores every conv and dense layer's output over a data set as `.npy` files.

  Args:
    model: a functional Keras model.
    data: a tuple `(x, y)` of arrays (integer labels), or an iterable of
      `(x, y)` batches (e.g. a `tf.data.Dataset` with the training
      augmentation) with `num_examples`.
    folder: where `{split}-{layer}.npy`, `{split}-labels.npy` and
      `latents.json` go.
    split: "train" or "eval".
    pool: conv maps are adaptive-average-pooled to pool x pool; None keeps
      whole maps (for `train_pixelwise_probes`).
    training: run the model in training mode (BN batch statistics, dropout)
      with its variables left unchanged; default: for "train", as the seed.
    layers: names of the layers to store; None: every conv and dense layer.
    batch_size: examples per forward pass (for arrays).
    num_examples: the example count of an iterable of batches.
    upsample_small_maps: pool maps smaller than `pool` as PyTorch does,
      repeating pixels (the seed's `-d 4` on vgg16 at 32 px meets 2x2 maps);
      False makes them an error.
    source: how the batches were made (e.g. augmentation and batch size),
      JSON-serialisable; stored with the split, whose latents are extracted
      again when it differs.
    overwrite: extract again even when the split is stored for the same
      layers, pool, mode and source.

  Returns:
    layer name (and "labels") -> file path.

  Raises:
    ValueError: for an unknown split, a pool larger than every conv map (or
      than any, without `upsample_small_maps`), a model that cannot be tapped,
      or a data count that does not match.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, received split={split!r}")
  if pool is not None and (isinstance(pool, bool) or int(pool) != pool or pool < 1):
    raise ValueError(f"pool must be a positive int or None, received pool={pool!r}")
  training = split == "train" if training is None else bool(training)
  taps = tap_model(model, layers)
  names = [layer.name for layer in tapped_layers(model, layers)]
  maps = [tuple(t.shape[1:3]) for t in taps.outputs[1:] if len(t.shape) == 4]
  if pool is not None and maps:
    largest = max(min(shape) for shape in maps)
    smallest = min(min(shape) for shape in maps)
    if pool > largest or (not upsample_small_maps and pool > smallest):
      limit = largest if upsample_small_maps else smallest
      raise ValueError(f"pool must be at most {limit}, the conv maps' side, received "
                       f"pool={pool}")

  paths = {name: _latent_path(folder, split, name) for name in names}
  paths["labels"] = _latent_path(folder, split, "labels")
  manifest = _read_manifest(folder) or {}
  if manifest and (manifest.get("layers") != names or manifest.get("pool") != pool):
    if not overwrite:
      raise ValueError(f"{folder} holds latents of other layers or pool "
                       f"({manifest.get('pool')}); use another folder or overwrite=True")
    manifest = {}
  done = manifest.get("splits", {}).get(split)
  source = dict(source or {})
  if done and done.get("training") == training and done.get("source", {}) == source and (
      not overwrite) and all(os.path.exists(p) for p in paths.values()):
    return paths

  if isinstance(data, tuple) and len(data) == 2:
    batches, count = _batches(data, batch_size)
  else:
    if num_examples is None:
      raise ValueError("num_examples is needed with an iterable of batches")
    batches, count = iter(data), int(num_examples)
  forward = _forward(taps, pool, training)

  os.makedirs(folder, exist_ok=True)
  files, offset = {}, 0
  state = [tf.convert_to_tensor(v) for v in taps.non_trainable_variables]
  trainable = [tf.convert_to_tensor(v) for v in taps.trainable_variables]
  try:
    labels = np.lib.format.open_memmap(_partial(paths["labels"]), "w+", np.int64, (count,))
    for x, y in batches:
      x = tf.convert_to_tensor(x)
      size = int(x.shape[0])
      if offset + size > count:
        raise ValueError(f"data holds more than num_examples={count} examples")
      if training:
        outputs, state = forward(trainable, state, x)
      else:
        outputs = forward(x)
      for name, value in zip(names, outputs):
        value = value.numpy()
        if name not in files:
          files[name] = np.lib.format.open_memmap(_partial(paths[name]), "w+", np.float32,
                                                  (count,) + value.shape[1:])
        files[name][offset:offset + size] = value
      y = np.asarray(y)
      # Soft labels (mixup, cutmix) count as their largest class, as the seed's argmax.
      labels[offset:offset + size] = (y.argmax(-1) if y.ndim == 2 else y).reshape(-1)
      offset += size
    if offset != count:
      raise ValueError(f"data held {offset} examples, expected {count}")
    # Labels last: their file marks a complete split.
    for name in names:
      files[name].flush()
      os.replace(_partial(paths[name]), paths[name])
    labels.flush()
    os.replace(_partial(paths["labels"]), paths["labels"])
  finally:
    for path in [_partial(p) for p in paths.values()]:
      if os.path.exists(path):
        os.remove(path)
  manifest.update(layers=names, pool=pool)
  manifest.setdefault("splits", {})[split] = {"training": training, "examples": count,
                                              "source": source}
  write_json(os.path.join(folder, MANIFEST), manifest)
  return paths


def _partial(path):
  return path + ".partial"


def _pooled(outputs, pool):
  """Each tap as float32 [B, features]: conv maps pooled and flattened (C, d, d)."""
  features = []
  for value in outputs:
    value = tf.cast(value, tf.float32)
    if value.shape.rank == 4:
      if pool is None:
        features.append(value)
        continue
      value = adaptive_avg_pool2d(value, pool, allow_upsampling=True)
      value = tf.transpose(value, [0, 3, 1, 2])
    features.append(tf.reshape(value, [tf.shape(value)[0], -1]))
  return features


def _forward(taps, pool, training):
  """A compiled pass returning the pooled taps (training mode: stateless, state carried)."""
  if training:
    @tf.function(reduce_retracing=True)
    def forward_training(trainable, state, x):
      outputs, state = taps.stateless_call(trainable, state, x, training=True)
      return _pooled(outputs[1:], pool), state
    return forward_training

  @tf.function(reduce_retracing=True)
  def forward(x):
    return _pooled(taps(x, training=False)[1:], pool)
  return forward


# ---- probes ------------------------------------------------------------------------------
def probe_csv_name(pool: Optional[int], prefix: str = "") -> str:
  """The seed's result file: `{prefix}{d}x{d}_probe_performances.csv`, or pixel-wise's."""
  if pool is None:
    return f"{prefix}pixelwise_probe_performances.csv"
  return f"{prefix}{pool}x{pool}_probe_performances.csv"


def _load(path, position=None):
  array = np.load(path, mmap_mode="r")
  if position is not None:
    array = array[:, position[0], position[1], :]
  return np.ascontiguousarray(array.reshape(array.shape[0], -1))


def _fit_probe(folder, layer, position, result_path, settings):
  """Fits one probe (a joblib task); writes and returns its result dict."""
  # Imported here: scikit-learn's import costs every run a second, and only probes use it.
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.metrics import accuracy_score  # pylint: disable=import-outside-toplevel
  x_train = _load(_latent_path(folder, "train", layer), position)
  y_train = np.load(_latent_path(folder, "train", "labels"))
  x_eval = _load(_latent_path(folder, "eval", layer), position)
  y_eval = np.load(_latent_path(folder, "eval", "labels"))
  probe = LogisticRegression(solver="saga", C=settings["C"], max_iter=settings["max_iter"],
                             tol=settings["tol"], random_state=settings["random_state"])
  with warnings.catch_warnings(record=True) as caught:
    # The seed's 100 saga iterations often stop short; `converged` records it.
    warnings.simplefilter("always", ConvergenceWarning)
    probe.fit(x_train, y_train)
  result = dict(settings, train_acc=float(accuracy_score(y_train, probe.predict(x_train))),
                eval_acc=float(accuracy_score(y_eval, probe.predict(x_eval))),
                n_iter=int(np.max(probe.n_iter_)),
                converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught))
  write_json(result_path, result)
  return result


def _run_probes(folder, tasks, *, output_csv, n_jobs, backend, settings, overwrite):
  """Fits the (name, layer, position, result_path) tasks not cached; writes the CSV."""
  results, todo = {}, []
  for name, layer, position, result_path in tasks:
    cached = None
    if os.path.exists(result_path) and not overwrite:
      with open(result_path) as f:
        cached = json.load(f)
    if cached is not None and all(cached.get(k) == v for k, v in settings.items()):
      results[name] = cached
    else:
      todo.append((name, layer, position, result_path))
  fitted = joblib.Parallel(n_jobs=n_jobs, backend=backend)(
      joblib.delayed(_fit_probe)(folder, layer, position, result_path, settings)
      for _, layer, position, result_path in todo)
  results.update({task[0]: result for task, result in zip(todo, fitted)})
  names = [task[0] for task in tasks]
  frame = pd.DataFrame({"name": names,
                        "train_acc": [results[n]["train_acc"] for n in names],
                        "eval_acc": [results[n]["eval_acc"] for n in names]})
  if output_csv is not None:
    with atomic_open(output_csv) as f:
      frame.to_csv(f, sep=";")
  return frame


def _checked_manifest(folder, layers):
  manifest = _read_manifest(folder)
  if manifest is None or not all(s in manifest.get("splits", {}) for s in SPLITS):
    raise ValueError(f"{folder} holds no complete train and eval latents; run "
                     f"extract_latents for both splits first")
  names = manifest["layers"]
  if layers is not None:
    unknown = sorted(set(layers) - set(names))
    if unknown:
      raise ValueError(f"layers {unknown} are not in {folder}; known: {', '.join(names)}")
    names = [n for n in names if n in set(layers)]
  return manifest, names


def train_probes(folder: str, *, output_csv: Optional[str] = None,
                 layers: Optional[Sequence[str]] = None, n_jobs: int = 1,
                 backend: str = "threading", C: float = 1.0, max_iter: int = 100,
                 tol: float = 1e-4, random_state: int = 0,
                 overwrite: bool = False) -> pd.DataFrame:
  """Fits one logistic-regression probe per stored layer; writes the seed's CSV.

  saga releases the GIL, so threads (the default backend) fit layers in
  parallel without copying the latents; "loky" uses processes.

  Args:
    folder: a folder holding both splits of `extract_latents`.
    output_csv: where to write `;name;train_acc;eval_acc` (e.g.
      `os.path.join(run_dir, probe_csv_name(4))`); None: not written.
    layers: a subset of the stored layers; None: all.
    n_jobs: parallel fits (joblib; -1: every core).
    backend: joblib backend.
    C, max_iter, tol: `LogisticRegression`'s (the seed uses the defaults).
    random_state: saga's shuffling seed (the seed left it unset).
    overwrite: refit layers whose result is cached in `probes/<layer>.json`.

  Returns:
    A DataFrame with columns name (`train-<layer>`), train_acc, eval_acc, in
    layer order.

  Raises:
    ValueError: for a folder without both splits, or unknown layers.
  """
  _, names = _checked_manifest(folder, layers)
  settings = dict(C=float(C), max_iter=int(max_iter), tol=float(tol),
                  random_state=random_state)
  tasks = [(f"train-{name}", name, None, os.path.join(folder, "probes", f"{name}.json"))
           for name in names]
  return _run_probes(folder, tasks, output_csv=output_csv, n_jobs=n_jobs, backend=backend,
                     settings=settings, overwrite=overwrite)


def train_pixelwise_probes(folder: str, *, output_csv: Optional[str] = None,
                           layers: Optional[Sequence[str]] = None, n_jobs: int = 1,
                           backend: str = "threading", C: float = 1.0, max_iter: int = 100,
                           tol: float = 1e-4, random_state: int = 0,
                           overwrite: bool = False) -> pd.DataFrame:
  """One probe per spatial position (i, j) of every stored conv map (seed's pixel-wise probes).

  Needs latents extracted with `pool=None`. Each probe sees the C channels at
  one position; dense layers get one probe each. Results are cached in
  `pixelwise_probes/<layer>-(i,j).json`; arguments as `train_probes`.

  Returns:
    A DataFrame with columns name (`train-<layer>-(i,j)`, or `train-<layer>`
    for a dense layer), train_acc, eval_acc.

  Raises:
    ValueError: for latents stored with a pool, or as `train_probes`.
  """
  manifest, names = _checked_manifest(folder, layers)
  if manifest.get("pool") is not None:
    raise ValueError(f"{folder} holds latents pooled to {manifest['pool']}; pixel-wise probes "
                     f"need extract_latents(..., pool=None)")
  settings = dict(C=float(C), max_iter=int(max_iter), tol=float(tol),
                  random_state=random_state)
  tasks = []
  for name in names:
    shape = np.load(_latent_path(folder, "train", name), mmap_mode="r").shape
    if len(shape) == 4:
      for i in range(shape[1]):
        for j in range(shape[2]):
          tasks.append((f"train-{name}-({i},{j})", name, (i, j),
                        os.path.join(folder, "pixelwise_probes", f"{name}-({i},{j}).json")))
    else:
      tasks.append((f"train-{name}", name, None,
                    os.path.join(folder, "pixelwise_probes", f"{name}.json")))
  return _run_probes(folder, tasks, output_csv=output_csv, n_jobs=n_jobs, backend=backend,
                     settings=settings, overwrite=overwrite)
