"""SSAM's perturbation masks over training: SSAM-F (Fisher) and SSAM-D (dynamic).

A `PerturbationMasks` owns one non-trainable 0/1 variable per trainable
weight; `sharpness.sharpness_aware(..., mask_fn=masks.values)` perturbs only
where they are 1, so the compiled step reads their current values and the
runner can refresh them between compiled chunks. They are part of the
engine's checkpointed state (`variables`), so a resumed run continues with
the masks it had.

When (spec 4.2 / 4.3): at the first batch of every epoch `e` with
`e % update_freq == 0`, after that batch's step, i.e. at iteration
`e * steps_per_epoch + 1`; `refresh_points` lists them so the runner can stop
its compiled chunks there.

Implicit sparse perturbation (`FisherMasks(..., implicit=True)`, spec 4.4)
refreshes *before* the first batch of every due epoch instead (iteration
`e * steps_per_epoch`, epoch 0 included, so the first step already uses a
Fisher mask), and its masks start at ones, as the seed's SAMConv.

- SSAM-F (`FisherMasks`): masks start all zero (the first epoch's first step
  is plain SGD at SAM's cost, as the seed); a refresh sums squared
  single-example gradients over `num_samples` training examples drawn without
  replacement by a stateless shuffle of (seed, epoch), with the training
  augmentation, and keeps the top entries by `pattern`.
- SSAM-D (`DynamicMasks`): a random global top-k to start; a refresh drops and
  regrows entries (`ssam.dynamic_update`) by the clean gradient of the epoch's
  first batch. The seed takes that gradient at the weights before that batch's
  update; the runner sees the batch only after the compiled step, so the
  gradient here is taken after it (one optimizer step later): an approximation
  whose effect on a mask chosen by |grad| ranks is small, and the random
  strategies do not use the gradient at all.

The registry entries `ssamf` and `ssamd` (`--optimizer=ssamf-<base>`,
`ssamd-<base>`, see `registry.py`) are at the end of this module.
"""

from typing import Callable, List, Optional

import numpy as np
import tensorflow as tf

from robust_sparse.core.hparams import Hparams
from robust_sparse.training.sharpness import ssam
from robust_sparse.training.sharpness.registry import PERTURBATIONS, MaskContext, Perturbation


def _mask_variables(model) -> List[tf.Variable]:
  return [tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False,
                      name=f"perturbation_mask_{i}")
          for i, v in enumerate(model.trainable_variables)]


class PerturbationMasks:
  """Base class: the mask variables, their schedule and their statistics.

  Args:
    model: the model whose trainable weights are perturbed.
    update_freq: refresh every this many epochs (>= 1).
  """

  def __init__(self, model, *, update_freq: int):
    if update_freq < 1:
      raise ValueError(f"--update_freq must be >= 1, got {update_freq}")
    self.model = model
    self.update_freq = update_freq
    self.masks = _mask_variables(model)

  @property
  def variables(self):
    """The masks by a stable name, for the engine's checkpoints."""
    return {f"perturbation_mask/{v.path}": m
            for v, m in zip(self.model.trainable_variables, self.masks)}

  def values(self):
    """The current masks as tensors (`sharpness_aware`'s `mask_fn`)."""
    return [tf.convert_to_tensor(m) for m in self.masks]

  # Iterations into a due epoch after which its refresh comes: 1 (after the
  # epoch's first step, SSAM-F / SSAM-D) or 0 (before it, implicit).
  refresh_offset = 1

  def refresh_points(self, total_iterations: int, steps_per_epoch: int) -> List[int]:
    """Iterations after which a refresh is due (after, or for `refresh_offset` 0 before,
    the first batch of each due epoch; 0 means before the first step)."""
    points = []
    epoch = 0
    while epoch * steps_per_epoch + 1 <= total_iterations:
      if epoch % self.update_freq == 0:
        points.append(epoch * steps_per_epoch + self.refresh_offset)
      epoch += 1
    return points

  def epoch_at(self, iteration: int, steps_per_epoch: int) -> int:
    """The epoch whose refresh comes after `iteration` (a point of `refresh_points`)."""
    return (iteration - self.refresh_offset) // steps_per_epoch

  def lived_weight(self) -> float:
    """The fraction of perturbed entries (the seed's "Mask Lived Weight")."""
    return float(ssam.mask_lived_weight(self.values()))

  def _assign(self, masks):
    for variable, mask in zip(self.masks, masks):
      variable.assign(tf.cast(mask, tf.float32))

  def initialize(self, seed: int):
    raise NotImplementedError

  def refresh(self, epoch: int, seed: int, batch_fn: Callable):
    raise NotImplementedError


class FisherMasks(PerturbationMasks):
  """SSAM-F (see the module docstring).

  Args:
    model: the model.
    loss: the per-example training loss, e.g. `steps.cross_entropy(classes)`.
    augment: the training augmentation `(x, y, seed) -> (x, y)`, or None.
    num_samples: examples in each Fisher estimate.
    sparsity, pattern, n, m, nm_conv_layout: as `ssam.fisher_masks`.
    update_freq: refresh every this many epochs.
    implicit: the masks of implicit sparse perturbation (start at ones,
      refresh before the due epoch's first batch; see the module docstring).
  """

  def __init__(self, model, loss, *, augment: Optional[Callable], num_samples: int,
               sparsity: float, pattern: str, n: Optional[int] = None,
               m: Optional[int] = None, nm_conv_layout: str = "correct",
               update_freq: int = 5, implicit: bool = False):
    super().__init__(model, update_freq=update_freq)
    self.implicit = bool(implicit)
    self.refresh_offset = 0 if self.implicit else 1
    ssam.check_sparsity(sparsity)
    if pattern == "nm":
      ssam.check_nm(n, m)
    if num_samples < 1:
      raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    self.num_samples = num_samples
    self.options = dict(sparsity=sparsity, pattern=pattern, n=n, m=m,
                        nm_conv_layout=nm_conv_layout)
    self._fisher = ssam.make_fisher_information(model, loss, augment=augment)
    self._augmented = augment is not None

  def initialize(self, seed: int):
    del seed
    fill = tf.ones if self.implicit else tf.zeros
    self._assign([fill(m.shape) for m in self.masks])

  def refresh(self, epoch: int, seed: int, batch_fn: Callable):
    """Recomputes the masks from `num_samples` examples of `batch_fn("sample", ...)`."""
    x, y = batch_fn("sample", self.num_samples, epoch)
    fisher_seed = tf.constant([seed, epoch], tf.int64) if self._augmented else None
    fisher = self._fisher(x, y, fisher_seed)
    self._assign(ssam.fisher_masks(fisher, self.model.trainable_variables, **self.options))


class DynamicMasks(PerturbationMasks):
  """SSAM-D (see the module docstring).

  Args:
    model: the model.
    loss_grad: `(x, y) -> grads`, the clean-pass gradients at the current weights.
    sparsity, drop_rate, drop_strategy, growth_strategy: as `ssam.dynamic_update`.
    epochs: the drop-rate schedule's end T_end (the run's epochs).
    update_freq: refresh every this many epochs.
  """

  def __init__(self, model, loss_grad: Callable, *, sparsity: float, epochs: int,
               drop_rate: float = 0.5, drop_strategy: str = "gradient",
               growth_strategy: str = "random", update_freq: int = 1):
    super().__init__(model, update_freq=update_freq)
    ssam.check_sparsity(sparsity)
    if not 0 <= drop_rate <= 1:
      raise ValueError(f"--drop_rate must be in [0, 1], got {drop_rate}")
    self.loss_grad = loss_grad
    self.epochs = max(1, int(np.ceil(epochs)))
    self.options = dict(sparsity=sparsity, drop_rate=drop_rate, drop_strategy=drop_strategy,
                        growth_strategy=growth_strategy)

  def initialize(self, seed: int):
    self._assign(ssam.random_masks(self.model.trainable_variables, self.options["sparsity"],
                                   tf.constant([seed, -1], tf.int64)))

  def refresh(self, epoch: int, seed: int, batch_fn: Callable):
    """Drops and regrows entries by the gradient of the epoch's first batch."""
    x, y = batch_fn("first_batch", None, epoch)
    grads = self.loss_grad(x, y)
    weights = [tf.convert_to_tensor(v.value) for v in self.model.trainable_variables]
    self._assign(ssam.dynamic_update(self.values(), grads, weights, epoch=epoch,
                                     epochs=self.epochs,
                                     seed=tf.constant([seed, epoch], tf.int64),
                                     **self.options))


def build_fisher_masks(hp: Hparams, context: MaskContext, *, implicit: bool) -> FisherMasks:
  """The `FisherMasks` of the flags: SSAM-F's, or (`implicit`) those of `--implicit`."""
  return FisherMasks(context.network, context.loss, augment=context.augment,
                     num_samples=hp.num_samples, sparsity=hp.sparsity, pattern=hp.pattern,
                     n=hp.n_structured, m=hp.m_structured, nm_conv_layout=hp.nm_conv_layout,
                     update_freq=hp.update_freq, implicit=implicit)


# ---- the registry entries: --optimizer=ssamf-<base>, ssamd-<base> ----------------------
@PERTURBATIONS.register("ssamf")
class SSAMF(Perturbation):
  """SSAM-F: SAM whose `e` is zero outside a Fisher mask (`FisherMasks`)."""

  def check(self, hp: Hparams) -> None:
    ssam.check_sparsity(hp.sparsity)
    if hp.pattern == "nm":
      ssam.check_nm(hp.n_structured, hp.m_structured)

  def has_masks(self, hp: Hparams) -> bool:
    return True

  def masks(self, hp: Hparams, context: MaskContext):
    return build_fisher_masks(hp, context, implicit=False)


@PERTURBATIONS.register("ssamd")
class SSAMD(Perturbation):
  """SSAM-D: SAM whose `e` is zero outside a dynamic mask (`DynamicMasks`)."""

  def check(self, hp: Hparams) -> None:
    ssam.check_sparsity(hp.sparsity)

  def has_masks(self, hp: Hparams) -> bool:
    return True

  def masks(self, hp: Hparams, context: MaskContext):
    network, base = context.network, context.loss_grad_fn

    @tf.function
    def clean_grads(x, y):
      weight = tf.fill([tf.shape(y)[0]], 1.0 / tf.cast(tf.shape(y)[0], tf.float32))
      grads, _, _ = base(
          [tf.convert_to_tensor(v.value) for v in network.trainable_variables],
          [tf.convert_to_tensor(v.value) for v in network.non_trainable_variables],
          dict(x=x, y=y, weight=weight, seed=tf.zeros([2], tf.int64)))
      return grads

    epochs = hp.total_iterations(context.num_train) / hp.steps_per_epoch(context.num_train)
    return DynamicMasks(network, clean_grads, sparsity=hp.sparsity, epochs=epochs,
                        drop_rate=hp.drop_rate, drop_strategy=hp.drop_strategy,
                        growth_strategy=hp.growth_strategy, update_freq=hp.update_freq)
