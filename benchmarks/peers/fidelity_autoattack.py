"""torchattacks references of the AutoAttack checks (`benchmarks/fidelity/autoattack.py`).

APGD-T from the toolkit's starting points: `starts` [targets, batch, H, W, C]
holds, per target class, the toolkit's unclipped start x + eps t / |t|_p for
the whole batch; each of torchattacks' runs (one per target, on the
examples still robust) gets the rows of its examples in place of its own
`torch.rand` / `torch.randn` draw. L-infinity runs torchattacks' `APGDT`
itself (`perturb`: the targets, the still-robust subsets). Its L2 step
multiplies every example's gradient by the first example's step size
(`step_size[0]`, a slip fra31's later code fixed), so the L2 reference runs
the same target loop around torchattacks' `APGD.attack_single_run` (whose L2
step is per example) with its DLR loss replaced by the targeted one of
`APGDT.dlr_loss_targeted`.

Both count the first window's loss increases from the start's loss, as the
paper and the toolkit do (`fidelity_attacks._PaperAPGD`).

Imports torch and torchattacks, never TensorFlow.
"""

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks

from benchmarks.peers.fidelity_attacks import _draws, _labels, _nchw, _nhwc, network


def _first_window_from_start(cls):
  """`cls` whose first window counts loss increases from the start's loss (the paper's)."""

  class PaperFirstWindow(cls):
    def check_oscillation(self, x, j, k, y5, k3=0.75):
      if j - k + 1 == 0:
        x = np.array(x)
        x[j - k] = self._start_loss
      return super().check_oscillation(x, j, k, y5, k3)

    def _record(self, loss):
      if self._start_loss is None:
        self._start_loss = loss.detach().numpy()
      return loss

  return PaperFirstWindow


class _APGDT(_first_window_from_start(torchattacks.APGDT)):
  """torchattacks' APGDT, each run from the toolkit's start for its target and examples."""

  def dlr_loss_targeted(self, x, y, y_target):
    return self._record(super().dlr_loss_targeted(x, y, y_target))

  def attack_single_run(self, x_in, y_in):
    self._start_loss = None
    subset = torch.nonzero(self._robust).flatten()
    start = self._starts[self.target_class - 2][subset]
    with _start_draws(start, x_in, self.eps, self.norm == "Linf"):
      result = super().attack_single_run(x_in, y_in)
    self._robust[subset[~result[1]]] = False
    self._last_best[subset] = result[0]
    return result


class _APGDTargetedDLR(_first_window_from_start(torchattacks.APGD)):
  """torchattacks' APGD run whose "dlr" loss is APGDT's targeted DLR towards `_target`."""

  def dlr_loss(self, x, y):
    return self._record(torchattacks.APGDT.dlr_loss_targeted(self, x, y, self._target))


def _start_draws(start, x, eps, linf):
  direction = (start - x) / eps
  return _draws(rand=(direction + 1.0) / 2.0) if linf else _draws(randn=direction)


def apgd_t(inputs):
  """APGD-T (targeted DLR, `targets` targets of `steps` iterations) from the toolkit's starts.

  Returns the toolkit's result rule: per example the last misclassified
  iterate of the first target that fooled it, else the highest-loss point of
  the last target's run; a clean image misclassified under given labels
  comes back as it is. `robust` (1: never fooled) and `loss`, the
  cross-entropy at the result.
  """
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  eps, steps = float(inputs["eps"]), int(inputs["steps"])
  targets, linf = int(inputs["targets"]), np.isinf(float(inputs["norm"]))
  starts = torch.stack([_nchw(s) for s in inputs["starts"]])
  with torch.no_grad():
    clean = net(x)
  robust = clean.argmax(1) == y
  adv, best = x.clone(), x.clone()
  if linf:
    attack = _APGDT(net, norm="Linf", eps=eps, steps=steps, n_restarts=1, rho=0.75,
                    n_classes=targets + 1)
    attack._starts, attack._robust, attack._last_best = starts, robust.clone(), best
    fooled_robust, adv = attack.perturb(x, y, cheap=True)
    robust, best = attack._robust, attack._last_best
    assert torch.equal(fooled_robust, robust)
  else:
    attack = _APGDTargetedDLR(net, norm="L2", eps=eps, steps=steps, n_restarts=1, loss="dlr",
                              rho=0.75)
    order = clean.sort(dim=1)[1]
    for k in range(targets):
      subset = torch.nonzero(robust).flatten()
      if not len(subset):
        break
      attack._start_loss, attack._target = None, order[subset, -(k + 2)]
      with _start_draws(starts[k][subset], x[subset], eps, False):
        x_best, acc, _, x_fooled = attack.attack_single_run(x[subset], y[subset])
      fooled = subset[~acc]
      adv[fooled] = x_fooled[~acc]
      best[subset] = x_best
      robust[fooled] = False
  with torch.no_grad():
    clean_wrong = net(x).argmax(1) != y
  result = torch.where((robust | clean_wrong).view(-1, 1, 1, 1), best, adv)
  result = torch.where(clean_wrong.view(-1, 1, 1, 1), x, result)
  with torch.no_grad():
    loss = F.cross_entropy(net(result), y, reduction="none").numpy()
  robust = robust.float().numpy()
  return {"x_adv": _nhwc(result), "robust": robust, "robust_accuracy": np.asarray(robust.mean()),
          "loss": loss}
