"""Fidelity of APGD-T (AutoAttack's targeted APGD with the DLR loss) against torchattacks.

The toolkit's starts are read back from the toolkit itself (target k draws
from `stateless_fold_in(seed, k)` for the whole batch, which APGD-CE with
zero steps returns, in the same compile mode) and handed to torchattacks'
runs in place of their own draws (`benchmarks/peers/fidelity_autoattack.py`:
`APGDT.perturb` for L-infinity; for L2, whose `APGDT` step uses the first
example's step size for all, the same target loop around `APGD`'s
single run with the targeted DLR loss). Compared: each example's verdict
(`robust`, exactly) and the cross-entropy at the returned point (to
`DRIFT`, for the reason the APGD-CE checks give: float32 ties between
successive iterates' losses, `benchmarks/fidelity/attacks.py`).

On the trained MNIST network the loss is compared on 99 % of the examples
(`quantile_difference`), every verdict on all of them. Its gradients have
coordinates whose exact value is a rounding-level tie, whose sign (hence
APGD's step on that pixel, +-2 eps at first) is float32 noise that two
correct implementations round differently; the example's two runs then
part. Measured (seed 0, 500 images): 2 examples' losses ended 7.4e-2 and
3.4e-2 apart, the other 498 within 1.1e-3. The first of them left the
reference's path at iteration 4 of the first target's run, on one pixel,
(10, 10), whose float64 gradient at iteration 3 is -3.0e-9, 1.1e-8 of the
example's largest (9e-10 of the sum of the absolute terms that cancel
into it); the reference itself, re-run in float64, stays within 1e-7 of
its float32 run there (it rounds that tie the same way both times).

The whole AutoAttack sequence, FAB-T and Square are compared on robust
accuracy with their own random draws by `python -m benchmarks.bench_autoattack`.
"""

import numpy as np
import tensorflow as tf

from benchmarks.fidelity import Check, quantile_difference
from benchmarks.fidelity.attacks import (DRIFT, _MNIST, _masked_network, _images, _mnist, _outcome,
                                         _scalars, _seed, _true_labels, _weights, apgd_start)
from robust_sparse.attacks.apgd import apgd_t

PEER = "benchmarks.peers.fidelity_autoattack"
TARGETS = 9


def apgd_t_starts(model, x, seed, *, eps, norm, targets=TARGETS):
  """The toolkit's unclipped start of each target's run, [targets, batch, ...]."""
  return np.stack([apgd_start(model, x, tf.random.experimental.stateless_fold_in(seed, k),
                              eps=eps, norm=norm) for k in range(targets)])


def _apgd_t_case(norm, eps, steps=100, true_labels=False, data=None):
  def ours(context):
    if data is None:
      model = _masked_network(context.seed)
      x = _images(context.seed, model.input_shape[1:])
      y = _true_labels(model, x, context.seed) if true_labels else None
    else:
      model, x, y = _mnist(context.data_dir, context.seed)
      y = y if true_labels else None
    seed = _seed(context, 5)
    x_adv = apgd_t(model, x, y, eps=eps, steps=steps, n_target_classes=TARGETS, seed=seed,
                   norm=norm).numpy()
    outcome = _outcome(model, x, y, x_adv)
    inputs = dict(_weights(model), x=x, starts=apgd_t_starts(model, x, seed, eps=eps, norm=norm),
                  **_scalars(eps=eps, steps=steps, norm=norm, targets=TARGETS))
    if y is not None:
      inputs["y"] = y
    return inputs, outcome
  return ours


_DENSE = "dense-300-100, random weights and 50 % masks"
_STARTS = "the toolkit's random starts given"
_TA = "torchattacks 3.5.1"

CHECKS = [
    Check("attack APGD-T L-inf eps 0.01, 9 targets x 100 steps, " + _STARTS + ": " + _DENSE,
          f"{_TA} APGDT.perturb, first window from the start's loss (paper)", DRIFT,
          _apgd_t_case(np.inf, 0.01), peer=f"{PEER}:apgd_t", needs=("torchattacks",)),
    Check("attack APGD-T L-inf eps 0.01, 9 targets x 100 steps, " + _STARTS + ": " + _DENSE
          + ", true labels",
          f"{_TA} APGDT.perturb, first window from the start's loss (paper)", DRIFT,
          _apgd_t_case(np.inf, 0.01, true_labels=True), peer=f"{PEER}:apgd_t",
          needs=("torchattacks",)),
    Check("attack APGD-T L2 eps 0.2, 9 targets x 100 steps, " + _STARTS + ": " + _DENSE
          + ", true labels",
          f"{_TA} APGD single runs with APGDT's targeted DLR, per-example L2 steps", DRIFT,
          _apgd_t_case(2, 0.2, true_labels=True), peer=f"{PEER}:apgd_t",
          needs=("torchattacks",)),
    # A trained network's sign ties part a few examples' runs (the module docstring).
    Check("attack APGD-T L-inf eps 0.05, 9 targets x 100 steps, " + _STARTS + ": " + _MNIST
          + ", true labels, every verdict, the loss of 99 % of the examples",
          f"{_TA} APGDT.perturb, first window from the start's loss (paper)", DRIFT,
          _apgd_t_case(np.inf, 0.05, true_labels=True, data="mnist"), peer=f"{PEER}:apgd_t",
          needs=("torchattacks",), needs_data=True,
          difference=quantile_difference("loss", 0.99)),
]
