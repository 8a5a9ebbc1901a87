"""Sparse SAM's perturbation masks (SSAM-F, SSAM-D) and implicit sparse perturbation.

Spec section 4 (Mi-Peng's "Systematic Investigation of Sparse Perturbed
Sharpness-Aware Minimization"). SSAM perturbs only part of the weights: the
perturbation `e = rho * (g * mask) / ||g||` (see `robust_sparse.training.sharpness.sam`,
whose `sharpness_aware(..., mask_fn=...)` takes the masks built here). Every
function is a pure function of tensors, vectorised, and traceable inside a
`tf.function`; the masks are float 0/1 tensors, one per
`model.trainable_variables`, in that order.

SSAM-F (spec 4.2): `fisher_information` sums squared single-example gradients;
`fisher_masks` keeps the weights of largest Fisher information, with one of
three patterns:

* `unstructured`: a global top-k over every entry, k = int(N * (1 - sparsity));
* `structured`: whole tensors by decreasing mean Fisher, while the kept count
  is under the budget (the last kept tensor may overshoot it), as the seed;
* `nm`: N of every M consecutive weights along the input dimension: along
  `in` of a dense kernel `[in, out]`, along PyTorch's flattened `(in, kh, kw)`
  of each filter of a conv kernel `[kh, kw, in, out]` (the order the seed's
  `get_nm_mask` and sparse tensor cores group; see `nm_mask` for fan-ins that
  M does not divide). `nm_conv_layout="seed"`
  reproduces the released SSAM-F code (spec 4.2 [BUG]), which masks the
  transposed `(in*kh*kw, out)` view and reinterprets the result as
  `(out, in, kh, kw)` without transposing back: still N:M in PyTorch memory
  order, but not at the positions of largest Fisher. 1-D weights are kept.

SSAM-D (spec 4.3): `random_masks` draws the initial mask, `dynamic_update`
drops and regrows live weights with a cosine-decaying drop rate.

Implicit sparse perturbation (spec 4.4) is a property of the masked layers:
`robust_sparse.nn.implicit_ops` holds its two ops, which the layers call under
`robust_sparse.nn.layers.implicit_backprop`.

Ties are broken towards the earlier entry (in `model.trainable_variables`
order, then row-major), so a mask is a deterministic function of its scores.
"""

import contextlib
import logging
import math
from typing import Callable, List, Optional, Sequence

import tensorflow as tf

from robust_sparse.nn import layers as layers_lib

PATTERNS = ("unstructured", "structured", "nm")
NM_CONV_LAYOUTS = ("correct", "seed")
DROP_STRATEGIES = ("gradient", "weight", "random")
GROWTH_STRATEGIES = ("random", "gradient", "weight")


# ---- validation ------------------------------------------------------------------------
def check_sparsity(sparsity: float):
  """Raises a ValueError naming `--sparsity` unless 0 <= sparsity < 1.

  Sparsity 1 (no perturbation at all) is plain training at twice the cost: use
  the base optimizer instead.
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"--sparsity must be in [0, 1), got {sparsity}")


def check_nm(n: Optional[int], m: Optional[int]):
  """Raises a ValueError naming `--n_structured` / `--m_structured` unless 1 <= N <= M."""
  if n is None or m is None:
    raise ValueError("--pattern=nm needs --n_structured and --m_structured, got "
                     f"--n_structured={n} --m_structured={m}")
  if not 1 <= m or not 1 <= n:
    raise ValueError(f"--n_structured and --m_structured must be >= 1, got N={n}, M={m}")
  if n > m:
    raise ValueError(f"--n_structured must be <= --m_structured, got N={n} > M={m}")


def _check_choice(flag, value, choices):
  if value not in choices:
    raise ValueError(f"--{flag} must be one of {', '.join(choices)}, got {value!r}")


# ---- ranking helpers -----------------------------------------------------------------
def _top_k_mask(scores, k):
  """1.0 at the `k` largest entries of the 1-D `scores` (ties: the earlier entry).

  Ranks from a full stable sort rather than `tf.math.top_k(scores, k)`: on a
  CPU that is 4x faster for ResNet-18's 11M weights (1.9 s against 8.5 s at
  k = N/2), and `k` may be a tensor (SSAM-D) with static shapes throughout.
  """
  order = tf.argsort(scores, direction="DESCENDING", stable=True)
  ranks = tf.math.invert_permutation(order)
  return tf.cast(ranks < tf.cast(k, ranks.dtype), tf.float32)


def _flat(tensors):
  return tf.concat([tf.reshape(tf.cast(t, tf.float32), [-1]) for t in tensors], 0)


def _unflat(flat, shapes):
  sizes = [math.prod(shape) for shape in shapes]
  return [tf.reshape(part, shape) for part, shape in zip(tf.split(flat, sizes), shapes)]


def _shapes(variables):
  shapes = [tuple(v.shape) for v in variables]
  for variable, shape in zip(variables, shapes):
    if None in shape:
      raise ValueError(f"masks need static shapes; {_name(variable)} has shape {shape}")
  return shapes


def _name(variable):
  return getattr(variable, "path", None) or getattr(variable, "name", None) or "a tensor"


# ---- SSAM-F: Fisher information --------------------------------------------------------
@contextlib.contextmanager
def _quiet_known_pfor_fallback():
  """Silences pfor's per-conv "Conv2DBackpropFilter uses a while_loop" warning.

  `tf.vectorized_map` has no batched conversion for the kernel gradient of a
  convolution whose input differs per example, so it loops over the chunk for
  that one op (everything else is batched). That is known and measured (see
  `make_fisher_information`); any other op's fallback is still logged.
  """

  class Filter(logging.Filter):

    def filter(self, record):
      return not record.getMessage().startswith("Conv2DBackpropFilter uses a while_loop")

  logger = logging.getLogger("tensorflow")
  quiet = Filter()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def make_fisher_information(model, loss: Callable, *, augment: Optional[Callable] = None,
                            chunk_size: int = 16):
  """Builds `fisher(x, y, seed=None) -> list of tensors`, SSAM-F's Fisher information.

  `F_p = sum_i (dL_i / dp)^2` over the examples of `x`, summed rather than
  averaged (spec 4.2), one tensor per `model.trainable_variables` (zeros for a
  weight that gets no gradient). Each example's gradient is that of a batch of
  one with the model in training mode, as the seed's batch-1 DataLoader: a
  batch-norm layer then normalises over the spatial positions of that one
  image. The examples are processed `chunk_size` at a time by
  `tf.vectorized_map`, so memory is bounded by `chunk_size` per-example
  gradients (ResNet-18: 45 MB each).

  Non-trainable state is not updated: the pass is a measurement. (The seed's
  pass runs in train mode and so moves the batch-norm running statistics
  `num_samples` times towards single-image statistics, which would then leak
  into evaluation; the method does not call for it.) A dropout layer's random
  state is not advanced either, so its masks are not independent across
  examples and refreshes (the seed's models have no dropout). Regularisation
  losses (`model.losses`) are left out: the Fisher information is that of the
  data loss. Pruned weights (masked layers) get exactly zero, also when the
  pass is traced under `layers.masks_hold()`.

  Cost: `tf.vectorized_map` batches everything except the convolutions'
  kernel gradients, which it computes one example at a time (pfor's
  Conv2DBackpropFilter fallback, a while loop inside the vectorised graph).
  On 2 CPU cores, ResNet-18 at 32x32 takes 6.5-8.5 s per 128 examples after
  the first call (which traces: 13-17 s), about one batched gradient of 128
  examples (5.7-6.8 s); a `tf.map_fn` loop of batch-1 gradients takes
  10.5 s. That is under 0.2 % of a SAM epoch.

  Args:
    model: the Keras model; its current variable values are used.
    loss: per-example loss `loss(x, y, logits) -> [N]`, e.g.
      `steps.cross_entropy(num_classes)`.
    augment: `augment(x, y, seed) -> (x, y)`, the training augmentation (the
      seed draws Fisher examples with it), applied to all of `x` at once.
    chunk_size: examples per vectorised chunk.

  Returns:
    A function `fisher(x, y, seed=None)` (compiled: a `tf.function` inside);
    `x` is `[N, ...]`, `y` `[N]` (or soft labels), `seed` a `[2]` stateless
    seed for `augment` (required with one). Build it once and call it at every
    refresh: each new function traces the per-example gradient graph again
    (seconds for a ResNet).

  Raises:
    ValueError: chunk_size < 1 (here), or a missing seed with `augment` (at
      the call).
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  variables = list(model.trainable_variables)
  non_trainable_variables = list(model.non_trainable_variables)

  def squared_gradients(trainable, non_trainable, x, y):
    with tf.GradientTape() as tape:
      tape.watch(trainable)
      logits, _ = model.stateless_call(trainable, non_trainable, x[None], training=True)
      objective = tf.reduce_sum(loss(x[None], y[None], logits))
    grads = tape.gradient(objective, trainable)
    return [tf.zeros(v.shape, tf.float32) if g is None
            else tf.square(tf.cast(tf.convert_to_tensor(g), tf.float32))
            for v, g in zip(variables, grads)]

  @tf.function
  def compiled(x, y, seed):
    if augment is not None:
      x, y = augment(x, y, seed)
    trainable = [tf.convert_to_tensor(v.value) for v in variables]
    non_trainable = [tf.convert_to_tensor(v.value) for v in non_trainable_variables]
    count = tf.shape(x)[0]
    chunk = chunk_size if x.shape[0] is None else max(1, min(chunk_size, x.shape[0]))
    num_chunks = (count + chunk - 1) // chunk
    # The last chunk is filled up with repeats of real examples (finite
    # gradients) that weigh 0.
    slots = tf.range(num_chunks * chunk)
    index = tf.reshape(slots % count, [num_chunks, chunk])
    weight = tf.reshape(tf.cast(slots < count, tf.float32), [num_chunks, chunk])

    def body(i, totals):
      squares = tf.vectorized_map(
          lambda example: squared_gradients(trainable, non_trainable, *example),
          (tf.gather(x, index[i]), tf.gather(y, index[i])))
      return i + 1, [t + tf.tensordot(weight[i], s, 1) for t, s in zip(totals, squares)]

    zeros = [tf.zeros(v.shape, tf.float32) for v in variables]
    _, totals = tf.while_loop(lambda i, _: i < num_chunks, body, (tf.constant(0), zeros))
    return layers_lib.mask_gradients(model, variables, totals)

  def fisher(x, y, seed=None):
    if augment is not None and seed is None:
      raise ValueError("fisher_information: a seed is needed with augment")
    seed = tf.zeros([2], tf.int64) if seed is None else tf.cast(seed, tf.int64)
    with _quiet_known_pfor_fallback():
      return compiled(x, y, seed)

  return fisher


def fisher_information(model, loss: Callable, x, y, *, augment: Optional[Callable] = None,
                       seed=None, chunk_size: int = 16) -> List[tf.Tensor]:
  """SSAM-F's Fisher information of `model` over the examples `(x, y)`.

  A one-off `make_fisher_information(model, loss, ...)(x, y, seed)`; see there.
  Code that refreshes masks repeatedly should build that function once.
  """
  return make_fisher_information(model, loss, augment=augment, chunk_size=chunk_size)(
      x, y, seed)


# ---- SSAM-F: masks ---------------------------------------------------------------------
def unstructured_masks(scores: Sequence, shapes, sparsity: float) -> List[tf.Tensor]:
  """1 at the global top k = int(N * (1 - sparsity)) of all `scores`' entries."""
  total = sum(math.prod(shape) for shape in shapes)
  keep = int(total * (1 - sparsity))
  return _unflat(_top_k_mask(_flat(scores), keep), shapes)


def structured_masks(scores: Sequence, shapes, sparsity: float) -> List[tf.Tensor]:
  """Whole tensors by decreasing mean score while the kept count is under budget.

  The budget is int(N * (1 - sparsity)); a tensor is kept while the count kept
  before it is below the budget, so the last one kept may overshoot it (the
  seed's loop). Equal means keep the earlier tensor first.
  """
  sizes = [math.prod(shape) for shape in shapes]
  budget = int(sum(sizes) * (1 - sparsity))
  means = tf.stack([tf.reduce_mean(tf.cast(s, tf.float32)) for s in scores])
  order = tf.argsort(means, direction="DESCENDING", stable=True)
  kept_before = tf.cumsum(tf.gather(tf.constant(sizes, tf.int64), order), exclusive=True)
  kept = tf.scatter_nd(order[:, None], tf.cast(kept_before < budget, tf.float32),
                       [len(sizes)])
  return [tf.fill(shape, kept[i]) for i, shape in enumerate(shapes)]


def _keep_n_of_every_m(scores, n: int, m: int):
  """0/1 of `scores`' shape: the N largest of every M consecutive (row-major) entries."""
  groups = tf.reshape(scores, [-1, m])
  _, kept = tf.math.top_k(groups, n)  # Ties: the earlier entry, as `_top_k_mask`.
  return tf.reshape(tf.reduce_sum(tf.one_hot(kept, m), axis=-2), tf.shape(scores))


def nm_mask(score, n: int, m: int, *, conv_layout: str = "correct", name: str = "a tensor"):
  """The N:M mask of one Keras weight tensor from its `score` (e.g. its Fisher).

  The groups are M consecutive entries of the weight in PyTorch's memory order,
  the seed's `get_nm_mask` on the PyTorch tensor: a dense kernel `[in, out]`
  as `(out, in)`, a conv kernel `[kh, kw, in, out]` as `(out, in, kh, kw)`.
  When M divides the fan-in (`in`, or `in*kh*kw`) that is N of every M along
  each output unit's inputs; otherwise a group straddles two units, as in the
  seed (ResNet-18's stem conv has 3*3*3 = 27 inputs per filter, and the
  seed's README runs it at 2:4). `conv_layout="seed"` gives the released
  SSAM-F conv mask instead (spec 4.2 [BUG]): the groups of the transposed
  `(in*kh*kw, out)` view, whose 0/1 result is read back as `(out, in, kh, kw)`
  without transposing. Other ranks (biases, batch norm): all ones.

  Raises:
    ValueError: M does not divide the weight's size (the seed's reshape fails
      too).
  """
  _check_choice("nm_conv_layout", conv_layout, NM_CONV_LAYOUTS)
  score = tf.cast(score, tf.float32)
  shape = tuple(score.shape)
  if len(shape) not in (2, 4):
    return tf.ones(shape, tf.float32)
  if math.prod(shape) % m:
    raise ValueError(f"--m_structured={m} does not divide the size {math.prod(shape)} of "
                     f"{name} (shape {shape})")
  # Keras [in, out] / [kh, kw, in, out] to PyTorch's (out, in) / (out, in, kh, kw), and back.
  to_torch = [1, 0] if len(shape) == 2 else [3, 2, 0, 1]
  to_keras = [1, 0] if len(shape) == 2 else [2, 3, 1, 0]
  torch_order = tf.transpose(score, to_torch)
  if len(shape) == 4 and conv_layout == "seed":
    # The seed: `view(co, -1).t()`, N:M in that (in*kh*kw, co) order, then a
    # `view(co, ci, kh, kw)` that reinterprets the (in*kh*kw, co) memory.
    filters = shape[3]
    transposed = tf.transpose(tf.reshape(torch_order, [filters, -1]))
    torch_mask = tf.reshape(_keep_n_of_every_m(transposed, n, m), tf.shape(torch_order))
  else:
    torch_mask = _keep_n_of_every_m(torch_order, n, m)
  return tf.transpose(torch_mask, to_keras)


def fisher_masks(fisher: Sequence, variables: Sequence, *, sparsity: float, pattern: str,
                 n: Optional[int] = None, m: Optional[int] = None,
                 nm_conv_layout: str = "correct") -> List[tf.Tensor]:
  """SSAM-F's perturbation masks from the Fisher information (spec 4.2).

  Args:
    fisher: one score tensor (or None, read as zeros) per variable, e.g. from
      `fisher_information`.
    variables: the weights the masks are for (their shapes and ranks decide the
      N:M grouping), normally `model.trainable_variables`.
    sparsity: the fraction of entries not perturbed, in [0, 1); unused by `nm`,
      whose sparsity is 1 - N/M on the kernels.
    pattern: "unstructured", "structured" or "nm" (see the module docstring).
    n, m: N and M of the `nm` pattern.
    nm_conv_layout: "correct" or "seed" (see `nm_mask`).

  Returns:
    One float32 0/1 tensor per variable, of its shape.

  Raises:
    ValueError: sparsity outside [0, 1) (`--sparsity`), an unknown pattern or
      layout, missing N or M, N > M, or a kernel whose size M does not divide.
  """
  check_sparsity(sparsity)
  _check_choice("pattern", pattern, PATTERNS)
  _check_choice("nm_conv_layout", nm_conv_layout, NM_CONV_LAYOUTS)
  if len(fisher) != len(variables):
    raise ValueError(f"fisher_masks: {len(fisher)} Fisher tensors for {len(variables)} "
                     "variables")
  shapes = _shapes(variables)
  scores = [tf.zeros(shape, tf.float32) if f is None else f for f, shape in zip(fisher, shapes)]
  if pattern == "unstructured":
    return unstructured_masks(scores, shapes, sparsity)
  if pattern == "structured":
    return structured_masks(scores, shapes, sparsity)
  check_nm(n, m)
  return [nm_mask(s, n, m, conv_layout=nm_conv_layout, name=_name(v))
          for s, v in zip(scores, variables)]


# ---- SSAM-D: dynamic masks -------------------------------------------------------------
def _check_dynamic(sparsity, drop_rate, drop_strategy, growth_strategy, epochs=1):
  check_sparsity(sparsity)
  if isinstance(epochs, (int, float)) and epochs <= 0:
    raise ValueError(f"--epochs must be > 0 (the drop-rate schedule's end), got {epochs}")
  if not 0.0 <= drop_rate <= 1.0:
    raise ValueError(f"--drop_rate must be in [0, 1], got {drop_rate}")
  _check_choice("drop_strategy", drop_strategy, DROP_STRATEGIES)
  _check_choice("growth_strategy", growth_strategy, GROWTH_STRATEGIES)


def random_masks(variables: Sequence, sparsity: float, seed) -> List[tf.Tensor]:
  """SSAM-D's initial masks: a random global top-k (spec 4.3).

  U(0, 1) scores for every entry, drawn from the stateless `seed` ([2]
  integers); the N - ceil(N * sparsity) highest are live.

  Raises:
    ValueError: sparsity outside [0, 1) (`--sparsity`).
  """
  check_sparsity(sparsity)
  shapes = _shapes(variables)
  total = sum(math.prod(shape) for shape in shapes)
  live = total - math.ceil(total * sparsity)
  scores = tf.random.stateless_uniform([total], tf.cast(seed, tf.int64))
  return _unflat(_top_k_mask(scores, live), shapes)


def drop_rate_at(epoch, epochs, drop_rate: float):
  """SSAM-D's cosine drop rate `drop_rate * (1 + cos(pi * epoch / epochs)) / 2` (float64)."""
  progress = tf.cast(epoch, tf.float64) / tf.cast(epochs, tf.float64)
  return drop_rate * (1.0 + tf.cos(math.pi * progress)) / 2.0


def _scores(strategy, grads, weights, shapes, seed):
  if strategy == "gradient":
    return _flat([tf.zeros(shape) if g is None else tf.abs(tf.convert_to_tensor(g))
                  for g, shape in zip(grads, shapes)])
  if strategy == "weight":
    return _flat([tf.abs(tf.convert_to_tensor(w)) for w in weights])
  total = sum(math.prod(shape) for shape in shapes)
  return tf.random.stateless_uniform([total], seed)


def dynamic_update(masks: Sequence, grads: Sequence, weights: Sequence, *, epoch, epochs,
                   sparsity: float, drop_rate: float = 0.5, drop_strategy: str = "gradient",
                   growth_strategy: str = "random", seed) -> List[tf.Tensor]:
  """One SSAM-D mask update: drop live entries, regrow as many dead ones (spec 4.3).

  With `N_live` live entries (ones in `masks`) of N, and the drop rate
  `dr = drop_rate_at(epoch, epochs, drop_rate)`:
  `death_num = int(min(N_live * dr, N * sparsity))` live entries of lowest
  death score die (|grad| for "gradient", |w| for "weight", U(0, 1) for
  "random"), and the `death_num` dead entries (dead before this update, so a
  weight that just died cannot come straight back) of highest growth score
  revive. The number of live entries is preserved exactly. (The seed counts
  N_live as the float N - N * sparsity and floors the survivors and the
  regrown separately, so it can lose one live weight per update.)

  Args:
    masks: the current 0/1 masks, one per weight.
    grads: the weights' gradients at this step (the seed uses the clean-pass
      gradients, still present after SAM's first step); None reads as zeros.
    weights: the weights' values.
    epoch, epochs: the current epoch and the schedule's end T_end (python or
      tensors).
    sparsity: the SSAM-D sparsity, in [0, 1).
    drop_rate: the initial drop rate, in [0, 1].
    drop_strategy: "gradient", "weight" or "random".
    growth_strategy: "random", "gradient" or "weight".
    seed: a `[2]` stateless seed for the random strategies.

  Returns:
    The new float32 0/1 masks.

  Raises:
    ValueError: sparsity, drop rate or epochs out of range, or an unknown
      strategy (messages name the flags).
  """
  _check_dynamic(sparsity, drop_rate, drop_strategy, growth_strategy, epochs)
  shapes = _shapes(weights)
  total = sum(math.prod(shape) for shape in shapes)
  alive = _flat(masks) > 0
  live = tf.reduce_sum(tf.cast(alive, tf.int64))
  rate = drop_rate_at(epoch, epochs, drop_rate)
  death_num = tf.cast(tf.floor(tf.minimum(tf.cast(live, tf.float64) * rate,
                                          total * sparsity)), tf.int64)
  # Never more than the dead entries available to regrow (masks not made here).
  death_num = tf.minimum(death_num, total - live)
  seed = tf.cast(seed, tf.int64)
  death = _scores(drop_strategy, grads, weights, shapes, tf.random.fold_in(seed, 0))
  growth = _scores(growth_strategy, grads, weights, shapes, tf.random.fold_in(seed, 1))
  lowest = tf.constant(-float("inf"))
  survivors = _top_k_mask(tf.where(alive, death, lowest), live - death_num)
  grown = _top_k_mask(tf.where(alive, lowest, growth), death_num)
  return _unflat(survivors + grown, shapes)


def mask_lived_weight(masks: Sequence) -> tf.Tensor:
  """The fraction of ones over all entries of `masks` (the seed's "Mask Lived Weight")."""
  live = tf.add_n([tf.math.count_nonzero(m, dtype=tf.int64) for m in masks])
  total = sum(math.prod(tuple(m.shape)) for m in masks)
  return tf.cast(live, tf.float64) / total
