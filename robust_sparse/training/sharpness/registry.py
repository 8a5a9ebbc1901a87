"""The SAM family's registry: what `--optimizer=<name>-<base>` means for each method.

Every method of the family is one `Perturbation` subclass, registered in its
own module under the name the flag uses:

  @PERTURBATIONS.register("sam")
  class SAM(Perturbation):
    implicit = True  # accepts --implicit

and says there everything the runner needs to know about it: its own flag
checks (`check`), whether it keeps perturbation masks for these flags
(`has_masks`) and how to build them (`masks`), and the keyword arguments of
`sam.sharpness_aware` it trains with (`options`: adaptive or not, the masks as
`mask_fn` or as `implicit_mask_fn`, the radius...). `experiments/build.py`
looks the method up (`PERTURBATIONS.get(name)()`) and never compares names;
`optimizers.split_optimizer` takes the known names from here. The methods'
modules register on import: `robust_sparse/training/sharpness/__init__.py`
imports each of them (a new method adds its module there).

Pure Python (the hyper-parameters are read, nothing is built here), so any
module of the family may import it.
"""

import dataclasses
from typing import Callable, Optional

from robust_sparse.core.hparams import Hparams
from robust_sparse.core.registry import Registry


@dataclasses.dataclass(frozen=True)
class MaskContext:
  """What the runner gives a method to build its perturbation masks with.

  Attributes:
    network: the model whose trainable weights are perturbed.
    loss: the per-example training loss `loss(x, y, logits) -> [N]`
      (`steps.cross_entropy` with `--label_smoothing`).
    loss_grad_fn: the plain `LossGradFn` of `network` under `loss`
      (`steps.loss_and_gradients(network, loss)`), for masks chosen by the
      clean gradient.
    augment: the training augmentation `(x, y, seed) -> (x, y)`, or None.
    num_train: the number of training images.
  """
  network: object
  loss: Callable
  loss_grad_fn: Callable
  augment: Optional[Callable]
  num_train: int


class Perturbation:
  """One method of the SAM family; the defaults are plain SAM's.

  Attributes:
    adaptive: ASAM's elementwise scaling (`sharpness_aware(adaptive=...)`).
    implicit: whether the method accepts `--implicit` (implicit sparse
      perturbation, spec 4.4).
  """

  adaptive = False
  implicit = False

  def check(self, hp: Hparams) -> None:
    """Raises a one-line ValueError naming the flag unless `hp` suits the method.

    The options every method shares (`--rho`, `--sam_bn_stats`, ...) are
    checked by the runner after this (`sam.check_options`).
    """
    del hp

  def has_masks(self, hp: Hparams) -> bool:
    """Whether the method keeps perturbation masks (refreshed during training) for `hp`."""
    del hp
    return False

  def masks(self, hp: Hparams, context: MaskContext):
    """The method's `sparse_perturbation.PerturbationMasks` for `hp`, or None."""
    del hp, context
    return None

  def options(self, hp: Hparams, masks) -> dict:
    """`sam.sharpness_aware`'s keyword arguments (all but `inner` and `model`).

    Args:
      masks: what `masks` built (their current values restrict `e`), or None.
    """
    return dict(rho=hp.rho, adaptive=self.adaptive, eta=hp.asam_eta, asam_rule=hp.asam_rule,
                ssam_norm=hp.ssam_norm, bn_stats=hp.sam_bn_stats,
                batch_splits=hp.sam_batch_splits,
                mask_fn=masks.values if masks is not None else None, implicit_mask_fn=None,
                sync=hp.sam_sync)


PERTURBATIONS: Registry[Callable[[], Perturbation]] = Registry("perturbation")
