"""Sharpness-aware minimisation as a wrapper of the step library: SAM and ASAM.

`sharpness_aware(inner, ...)` wraps a `LossGradFn` (see `robust_sparse.training.steps`)
into one that returns the gradient at the perturbed weights `w + e`:

1. `g = grad L(w)` from `inner` (the clean pass: its logits and losses are
   the step's metrics);
2. `e = rho * m * T^2 g / (||T g||_2 + epsilon)`, the norm over every live
   weight (see `perturbation`): T = 1 for SAM (Foret et al.); for ASAM (Kwon
   et al.) T = |w| + eta on kernels and gamma, 1 on biases and beta (the
   official code, `asam_rule="official"`) or T = |w| everywhere (davda54/sam
   `adaptive=True`, `asam_rule="davda54"`); m = 1 except for SSAM, whose mask
   multiplies `e` but not the norm's gradient (the original code);
3. `g' = grad L(w + e)` from `inner` again, on the `w + e` tensors: the
   variables are never moved, so nothing has to be subtracted back (in
   float32 `(w + e) - e != w` for about 0.1 % of the weights);
4. the caller's update applies `g'` to `w` with the base optimizer.

The registry entries `sam` and `asam` (`--optimizer=sam-<base>`,
`asam-<base>`, see `registry.py`) are at the end of this module, with their
option `--implicit`.

The seed's released code zeroes `g'` before the base step (spec 4.1 [BUG]);
that is not offered: standard SAM is what its paper and every peer run.

Masks hold: a pruned weight's gradient is masked before the norm and the
perturbation, so it gets no perturbation and stays exactly zero. (Pruned
weights do not exist, so they leave the norm; SSAM's unperturbed weights do
exist, so they stay in it.) With
adversarial training, `adversarial(sharpness_aware(...))` runs both passes on
the same adversarial batch. Batch-norm statistics come from the clean pass by
default (google-research/sam); `bn_stats="second"` keeps the perturbed pass's,
`"both"` applies both updates in turn (the seed's PyTorch code). m-sharpness
(`batch_splits` = m) computes one perturbation per split of the batch and
averages the splits' gradients (google-research/sam's per-replica SAM on one
device). Under `tf.distribute` (`robust_sparse.training.distribute`) each replica
perturbs with its own shard's gradient, as google-research/sam does;
`sync=True` perturbs with the replicas' summed gradient, so every replica
takes the single-device `e`.
"""

from typing import Callable, Optional

import tensorflow as tf

from robust_sparse.core.hparams import Hparams
from robust_sparse.nn import layers as layers_lib
from robust_sparse.training import distribute
from robust_sparse.training.sharpness import sparse_perturbation, ssam
from robust_sparse.training.sharpness.registry import PERTURBATIONS, MaskContext, Perturbation

BN_STATS = ("first", "second", "both")
ASAM_RULES = ("official", "davda54")
SSAM_NORMS = ("full", "masked")
# The norm's guard of each original: Mi-Peng's SAM / SSAM (spec 4.1, 4.2), the
# official ASAM (SamsungLabs/ASAM), davda54/sam's `adaptive=True` (also
# google-research/sam's).
SAM_EPSILON = 1e-7
ASAM_OFFICIAL_EPSILON = 1e-16
NORM_EPSILON = 1e-12
# Keras names of the variables that PyTorch calls `weight` (conv and linear
# kernels, batch / layer norm gamma, embeddings): the official ASAM scales
# only these by |w| + eta; biases, beta and other parameters get T = 1.
_ASAM_WEIGHT_NAMES = ("kernel", "gamma", "embeddings")


def is_asam_weight(variable) -> bool:
  """True for a variable the official ASAM scales by `|w| + eta` (PyTorch's `*.weight`).

  Kernels (dense, conv, depthwise, LoRA-free masked kernels), batch / layer
  norm `gamma` and embeddings; False for biases, `beta` and anything else
  (class tokens, position embeddings, mask logits), whose PyTorch names carry
  no "weight".
  """
  name = (getattr(variable, "path", None) or getattr(variable, "name", "")).split("/")[-1]
  name = name.split(":")[0]
  return name.endswith(_ASAM_WEIGHT_NAMES)


def check_asam_rule(rule: str):
  if rule not in ASAM_RULES:
    raise ValueError(f"--asam_rule must be one of {', '.join(ASAM_RULES)}, got {rule!r}")


def perturbation(weights, grads, *, rho: float, adaptive: bool = False, eta: float = 0.01,
                 masks=None, sparse_masks=None, asam_rule: str = "official",
                 asam_weights=None, sparse_norm: str = "full", epsilon=None):
  """SAM's / ASAM's / SSAM's ascent step `e` for each weight (None where its gradient is None).

  `e = rho * m * T^2 g / (||T g|| + epsilon)`, the norm over every weight:

  - SAM: T = 1 (Foret et al.; Mi-Peng's `first_step`, epsilon 1e-7);
  - ASAM, `asam_rule="official"` (SamsungLabs/ASAM): T = |w| + eta for the
    weights `asam_weights` marks (kernels, gamma), T = 1 for the others
    (biases, beta), epsilon 1e-16; `"davda54"` (davda54/sam `adaptive=True`):
    T = |w| for every weight, no eta, epsilon 1e-12;
  - SSAM (`sparse_masks` m): the full gradient's norm, so `||e|| <= rho` (both
    Mi-Peng repositories' `first_step`, spec 4.2); `sparse_norm="masked"`
    normalises the masked gradient instead (`||e|| = rho`).

  Args:
    weights: weight tensors w.
    grads: their gradients g (None for weights that get none).
    rho: the neighbourhood radius (of `T^-1 e` for ASAM).
    adaptive: ASAM's elementwise scaling.
    eta: the official ASAM's eta.
    masks: per weight, None or a 0/1 tensor: pruning masks. A pruned weight
      does not exist: its gradient is left out of the norm and it gets no
      perturbation.
    sparse_masks: per weight, None or a 0/1 tensor: SSAM's perturbation masks
      (only `e` is masked, the norm is `sparse_norm`'s).
    asam_rule: "official" or "davda54".
    asam_weights: per weight, whether the official rule scales it (default:
      every weight).
    sparse_norm: "full" (the originals) or "masked".
    epsilon: the norm's guard; None: the original's for the method (above).

  Returns:
    A list of tensors (or None) matching `weights`.

  Raises:
    ValueError: an unknown `asam_rule` or `sparse_norm`.
  """
  check_asam_rule(asam_rule)
  if sparse_norm not in SSAM_NORMS:
    raise ValueError(f"--ssam_norm must be one of {', '.join(SSAM_NORMS)}, got "
                     f"{sparse_norm!r}")
  count = len(weights)
  masks = masks if masks is not None else [None] * count
  sparse_masks = sparse_masks if sparse_masks is not None else [None] * count
  asam_weights = asam_weights if asam_weights is not None else [True] * count
  if epsilon is None:
    epsilon = (SAM_EPSILON if not adaptive else
               ASAM_OFFICIAL_EPSILON if asam_rule == "official" else NORM_EPSILON)
  parts = []
  for w, g, m, s, scaled in zip(weights, grads, masks, sparse_masks, asam_weights):
    if g is None:
      parts.append(None)
      continue
    g = tf.cast(g, tf.float32)
    if m is not None:
      g = g * tf.cast(m, g.dtype)
    t = None
    if adaptive and asam_rule == "davda54":
      t = tf.abs(tf.cast(w, tf.float32))
    elif adaptive and scaled:
      t = tf.abs(tf.cast(w, tf.float32)) + eta
    s = None if s is None else tf.cast(s, tf.float32)
    parts.append((g, t, s))
  squares = []
  for g, t, s in (p for p in parts if p is not None):
    normed = g if t is None else t * g
    if s is not None and sparse_norm == "masked":
      normed = normed * s
    squares.append(tf.reduce_sum(tf.square(normed)))
  norm = tf.sqrt(tf.add_n([tf.constant(0.0)] + squares))
  factor = rho / (norm + epsilon)
  out = []
  for w, p in zip(weights, parts):
    if p is None:
      out.append(None)
      continue
    g, t, s = p
    e = (g if t is None else tf.square(t) * g) * factor
    if s is not None:
      e = e * s
    out.append(tf.cast(e, w.dtype))
  return out


def _split(tensor, splits):
  """Strided split of the batch axis: split i holds examples i, i + m, i + 2m, ...

  Strided, not contiguous, so that under adversarial training (a batch of
  `[x; x_adv]`) each split holds the natural and adversarial copies of the
  same images when the half-batch is divisible by m.
  """
  shape = tf.shape(tensor)
  grouped = tf.reshape(tensor, tf.concat([[shape[0] // splits, splits], shape[1:]], 0))
  perm = [1, 0] + list(range(2, len(tensor.shape) + 1))
  return tf.unstack(tf.transpose(grouped, perm), num=splits)


def _merge(parts):
  """Inverse of `_split`."""
  stacked = tf.stack(parts, 1)
  shape = tf.shape(stacked)
  return tf.reshape(stacked, tf.concat([[shape[0] * shape[1]], shape[2:]], 0))


def check_options(*, rho: float, bn_stats: str = "first", batch_splits: int = 1,
                  batch_size: Optional[int] = None, asam_rule: str = "official",
                  ssam_norm: str = "full"):
  """Raises a ValueError naming the flag unless the SAM options are valid.

  `batch_size`, when given, must be divisible by `batch_splits`.
  """
  check_asam_rule(asam_rule)
  if ssam_norm not in SSAM_NORMS:
    raise ValueError(f"--ssam_norm must be one of {', '.join(SSAM_NORMS)}, got {ssam_norm!r}")
  if not rho > 0:
    raise ValueError(f"--rho must be > 0, got {rho}")
  if bn_stats not in BN_STATS:
    raise ValueError(f"--sam_bn_stats must be one of {', '.join(BN_STATS)}, got {bn_stats!r}")
  if batch_splits < 1:
    raise ValueError(f"--sam_batch_splits must be >= 1, got {batch_splits}")
  if batch_size is not None and batch_size % batch_splits:
    raise ValueError(f"--sam_batch_splits={batch_splits} must divide "
                     f"--batch_size={batch_size}")


def sharpness_aware(inner, model, *, rho: float = 0.05, adaptive: bool = False,
                    eta: float = 0.01, asam_rule: str = "official", ssam_norm: str = "full",
                    bn_stats: str = "first", batch_splits: int = 1,
                    mask_fn: Optional[Callable] = None,
                    implicit_mask_fn: Optional[Callable] = None, sync: bool = False):
  """Wraps the `LossGradFn` `inner` into SAM (or ASAM): gradients at `w + e`.

  Args:
    inner: the loss-and-gradients function to sharpen.
    model: the model whose `trainable_variables` the weight lists follow (for
      the pruning masks).
    rho, adaptive, eta, asam_rule: see `perturbation`.
    ssam_norm: `perturbation`'s `sparse_norm`: "full" (the originals: the
      norm of the whole gradient, `||e|| <= rho`) or "masked".
    bn_stats: whose batch-norm statistics to keep: "first" (clean pass),
      "second" (perturbed pass) or "both" (first, then second).
    batch_splits: m of m-sharpness; the batch size must be divisible by it.
    mask_fn: `() -> list` of per-weight perturbation masks (None entries for
      dense ones), e.g. SSAM's Fisher masks; `e` is zero outside them (and
      outside the pruning masks).
    implicit_mask_fn: `() -> list` of per-weight masks for SSAM's implicit
      sparse perturbation (spec 4.4): the ascent pass back-propagates input
      gradients of each convolution through `kernel * mask` (its kernel's
      entry), while `e` itself stays dense. As the seed's SAMConv, only
      convolutions take part: dense layers (the classifier) stay dense.
    sync: on the replicas of a `tf.distribute` strategy, the perturbation of
      the gradient summed over them (`--sam_sync`), not of each shard's own.
      Nothing changes on one device.

  Returns:
    A `LossGradFn`; `aux` gains `sharp_objective`, the objective at `w + e`.

  Raises:
    ValueError: rho <= 0, an unknown `bn_stats`, or batch_splits < 1.
  """
  check_options(rho=rho, bn_stats=bn_stats, batch_splits=batch_splits, asam_rule=asam_rule,
                ssam_norm=ssam_norm)
  variables = model.trainable_variables
  pruning = pruning_masks(model)
  asam_weights = [is_asam_weight(v) for v in variables]

  def masks():
    return [None if p is None else tf.convert_to_tensor(p.value) for p in pruning]

  kernel_layers = {id(layer.raw_kernel): layer.name
                   for layer in layers_lib.masked_layers(model)
                   if isinstance(layer, layers_lib.MaskedConv2D)}

  def ascent(trainable, non_trainable, batch):
    if implicit_mask_fn is None:
      return inner(trainable, non_trainable, batch)
    implicit = {kernel_layers[id(v)]: m for v, m in zip(variables, implicit_mask_fn())
                if id(v) in kernel_layers and m is not None}
    with layers_lib.implicit_backprop(implicit):
      return inner(trainable, non_trainable, batch)

  def one(trainable, non_trainable, batch):
    grads, first_nt, aux = ascent(trainable, non_trainable, batch)
    if sync:
      grads = distribute.all_reduce_sum(grads)
    e = perturbation(trainable, grads, rho=rho, adaptive=adaptive, eta=eta, masks=masks(),
                     sparse_masks=mask_fn() if mask_fn is not None else None,
                     asam_rule=asam_rule, asam_weights=asam_weights, sparse_norm=ssam_norm)
    perturbed = [w if d is None else w + d for w, d in zip(trainable, e)]
    start = first_nt if bn_stats == "both" else non_trainable
    sharp_grads, second_nt, sharp_aux = inner(perturbed, start, batch)
    kept = first_nt if bn_stats == "first" else second_nt
    return sharp_grads, kept, dict(aux, sharp_objective=sharp_aux["objective"])

  def fn(trainable, non_trainable, batch):
    if batch_splits == 1:
      return one(trainable, non_trainable, batch)
    tf.debugging.assert_equal(tf.shape(batch["y"])[0] % batch_splits, 0,
                              message="--sam_batch_splits must divide the batch size")
    keys = [k for k in ("x", "y", "weight") if k in batch]
    parts = {k: _split(batch[k], batch_splits) for k in keys}
    total, state, auxes = None, non_trainable, []
    for i in range(batch_splits):
      split = dict(batch, **{k: parts[k][i] for k in keys})
      grads, state, aux = one(trainable, state, split)
      total = grads if total is None else [
          a if b is None else (b if a is None else a + b) for a, b in zip(total, grads)]
      auxes.append(aux)
    merged = {}
    for key, value in auxes[0].items():
      if isinstance(value, (list, tuple)):  # Measurement taps: per tap, over the splits.
        merged[key] = [_merge([a[key][j] for a in auxes]) for j in range(len(value))]
      elif value.shape.rank == 0:  # Objectives: sums over the splits' weighted examples.
        merged[key] = tf.add_n([a[key] for a in auxes])
      else:
        merged[key] = _merge([a[key] for a in auxes])
    return total, state, merged

  return fn


def pruning_masks(model):
  """Per trainable variable of `model`: its pruning mask, or None (not a masked kernel)."""
  masks = {id(layer.raw_kernel): layer.mask for layer in layers_lib.masked_layers(model)}
  return [masks.get(id(v)) for v in model.trainable_variables]


def measure_sharpness(model, x, y, *, rho: float, batch_size: int):
  """The measured sharpness of `model` at its current weights on the fixed set (x, y).

  Both numbers use the natural cross-entropy (no label smoothing), the model
  in inference mode (batch-norm moving statistics, so the measurement is
  deterministic and changes no state) and perturbations restricted to the live
  (unpruned) weights:

  - `sharpness` = L(w + e) - L(w) over the whole set, with
    `e = rho * g / ||g||` and g the gradient of the whole set's mean loss;
  - `m_sharpness` = the mean over consecutive batches B of `batch_size`
    examples of L_B(w + e_B) - L_B(w), each batch with its own `e_B` (the
    m-sharpness of Foret et al. with m = batch_size; a last partial batch is
    dropped).

  Args:
    model: a Keras model that outputs logits.
    x, y: the fixed set (float images, int labels); tensors or arrays.
    rho: the perturbation radius.
    batch_size: m.

  Returns:
    `{"sharpness": scalar, "m_sharpness": scalar}` float32 tensors.
  """
  x = tf.convert_to_tensor(x)
  y = tf.cast(tf.convert_to_tensor(y), tf.int32)
  weights = [tf.convert_to_tensor(v.value) for v in model.trainable_variables]
  state = [tf.convert_to_tensor(v.value) for v in model.non_trainable_variables]
  masks = [None if m is None else tf.convert_to_tensor(m.value) for m in pruning_masks(model)]
  # Static sizes (XLA needs compile-time slice sizes): the set's length is
  # known when tracing.
  count = int(y.shape[0])
  size = min(int(batch_size), count)
  batches = count // size

  def loss_sum(values, xb, yb):
    logits, _ = model.stateless_call(values, state, xb, training=False)
    return tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=yb, logits=tf.cast(logits, tf.float32)))

  def loss_and_grad(values, xb, yb):
    with tf.GradientTape() as tape:
      tape.watch(values)
      total = loss_sum(values, xb, yb)
    return total, tape.gradient(total, values)

  def shifted(e):
    return [w if d is None else w + d for w, d in zip(weights, e)]

  total_loss = tf.constant(0.0)
  total_grad = [tf.zeros_like(w) for w in weights]
  m_sum = tf.constant(0.0)
  for b in tf.range(batches):
    xb = x[b * size:(b + 1) * size]
    yb = y[b * size:(b + 1) * size]
    loss, grads = loss_and_grad(weights, xb, yb)
    grads = [tf.zeros_like(w) if g is None else g for w, g in zip(weights, grads)]
    total_loss += loss
    total_grad = [t + g for t, g in zip(total_grad, grads)]
    e = perturbation(weights, grads, rho=rho, masks=masks, epsilon=NORM_EPSILON)
    m_sum += (loss_sum(shifted(e), xb, yb) - loss) / float(size)
  used = float(batches * size)
  e = perturbation(weights, total_grad, rho=rho, masks=masks, epsilon=NORM_EPSILON)
  perturbed = shifted(e)
  total_perturbed = tf.constant(0.0)
  for b in tf.range(batches):
    total_perturbed += loss_sum(perturbed, x[b * size:(b + 1) * size],
                                y[b * size:(b + 1) * size])
  return {"sharpness": (total_perturbed - total_loss) / used,
          "m_sharpness": m_sum / float(batches)}


# ---- the registry entries: --optimizer=sam-<base>, asam-<base> -------------------------
@PERTURBATIONS.register("sam")
class SAM(Perturbation):
  """SAM (Foret et al.); with `--implicit`, implicit sparse perturbation (spec 4.4): the
  ascent pass back-propagates through the conv kernels times a Fisher mask
  (`sparse_perturbation.FisherMasks(implicit=True)`) while `e` stays dense."""

  implicit = True

  def check(self, hp: Hparams) -> None:
    if not hp.implicit:
      return
    if hp.pattern not in ("structured", "nm"):
      raise ValueError(f"--implicit needs a mask: --pattern=structured or nm, got "
                       f"--pattern={hp.pattern}")
    if hp.pattern == "nm":
      ssam.check_nm(hp.n_structured, hp.m_structured)

  def has_masks(self, hp: Hparams) -> bool:
    return hp.implicit

  def masks(self, hp: Hparams, context: MaskContext):
    return sparse_perturbation.build_fisher_masks(hp, context, implicit=True) if hp.implicit else None

  def options(self, hp: Hparams, masks) -> dict:
    options = super().options(hp, masks)
    if hp.implicit:
      options.update(mask_fn=None, implicit_mask_fn=options["mask_fn"])
    return options


@PERTURBATIONS.register("asam")
class ASAM(SAM):
  """ASAM (Kwon et al.): SAM with `T^2 g` (see `perturbation`); `--implicit` as SAM's."""

  adaptive = True
