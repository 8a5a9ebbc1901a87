"""torchattacks and PyTorch references of the attack checks (`benchmarks/fidelity/attacks.py`).

Each function takes the arrays of the toolkit's side (a dict of NumPy arrays)
and returns arrays with the keys of its outputs. The network is rebuilt in
PyTorch from the toolkit's effective (masked) kernels, `kernel_<i>` of shape
[in, out] (Keras' layout) and optional `bias_<i>`, with ReLU between the
layers. Images travel in the toolkit's NHWC layout; torchattacks sees NCHW
(its layout), and the network flattens in NHWC order, so both frameworks
compute the same function of the same pixels. Labels: `y` when given, else
the network's own predictions on the clean images (the toolkit's default
`--attack_labels=predicted`, computed here independently).

Imports torch and torchattacks, never TensorFlow.
"""

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn


class _NHWCFlatten(nn.Module):
  """NCHW images flattened in NHWC order (Keras' `Flatten` of its NHWC images)."""

  def forward(self, x):
    return torch.flatten(x.permute(0, 2, 3, 1), 1)


def network(inputs):
  """The MLP of `kernel_0, kernel_1, ...` (and `bias_<i>` where given), in eval mode."""
  modules = [_NHWCFlatten()]
  count = sum(1 for key in inputs if key.startswith("kernel_"))
  for i in range(count):
    kernel = inputs[f"kernel_{i}"]
    bias = inputs.get(f"bias_{i}")
    linear = nn.Linear(*kernel.shape, bias=bias is not None)
    with torch.no_grad():
      linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T, np.float32)))
      if bias is not None:
        linear.bias.copy_(torch.from_numpy(bias.astype(np.float32)))
    modules.append(linear)
    if i < count - 1:
      modules.append(nn.ReLU())
  return nn.Sequential(*modules).eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(x):
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _labels(net, inputs, x):
  if "y" in inputs:
    return torch.from_numpy(inputs["y"].astype(np.int64))
  with torch.no_grad():
    return net(x).argmax(1)


def _scalar(inputs, key):
  return float(inputs[key])


# ----------------------------------------------------------------------------
# torchattacks as it ships.


def fgsm(inputs):
  """torchattacks.FGSM: x + eps * sign(grad of the mean CE), clamped to [0, 1]."""
  net = network(inputs)
  x = _nchw(inputs["x"])
  attack = torchattacks.FGSM(net, eps=_scalar(inputs, "eps"))
  x_adv = _nhwc(attack(x, _labels(net, inputs, x)))
  if "decisive" in inputs:  # The coordinates compared (see benchmarks/fidelity/attacks.py).
    x_adv = x_adv * inputs["decisive"]
  return {"x_adv": x_adv}


def pgd_no_random_start(inputs):
  """torchattacks.PGD / PGDL2 with `random_start=False` (deterministic)."""
  net = network(inputs)
  x = _nchw(inputs["x"])
  kwargs = dict(eps=_scalar(inputs, "eps"), alpha=_scalar(inputs, "step_size"),
                steps=int(inputs["steps"]), random_start=False)
  if np.isinf(_scalar(inputs, "norm")):
    attack = torchattacks.PGD(net, **kwargs)
  else:
    attack = torchattacks.PGDL2(net, **kwargs)
  return {"x_adv": _nhwc(attack(x, _labels(net, inputs, x)))}


def robust_accuracy(inputs):
  """The robust accuracy under torchattacks' own attack, with its own random starts.

  `attack`: "pgd" (PGD or PGDL2 with `random_start=True`; `restarts` > 1 chains
  that many through `MultiAttack`, which attacks again the examples not fooled
  yet, as restarts do) or "apgd_ce" (`APGD(loss="ce", n_restarts=1)`).
  """
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  torch.manual_seed(int(inputs["seed"]))
  eps, steps, linf = _scalar(inputs, "eps"), int(inputs["steps"]), np.isinf(inputs["norm"])
  if str(inputs["attack"]) == "apgd_ce":
    attack = torchattacks.APGD(net, norm="Linf" if linf else "L2", eps=eps, steps=steps,
                               n_restarts=1, seed=int(inputs["seed"]), loss="ce")
  else:
    cls = torchattacks.PGD if linf else torchattacks.PGDL2
    attacks = [cls(net, eps=eps, alpha=_scalar(inputs, "step_size"), steps=steps,
                   random_start=True) for _ in range(int(inputs["restarts"]))]
    attack = attacks[0] if len(attacks) == 1 else torchattacks.MultiAttack(attacks)
  x_adv = attack(x, y)
  with torch.no_grad():
    correct = (net(x_adv).argmax(1) == y) & (net(x).argmax(1) == y)
  return {"robust_accuracy": np.asarray(correct.float().mean().item())}


# ----------------------------------------------------------------------------
# torchattacks' APGD from the toolkit's starting point.


@contextlib.contextmanager
def _draws(rand=None, randn=None):
  """Makes `torch.rand` / `torch.randn` return the given tensor (APGD's start draw)."""
  saved = torch.rand, torch.randn
  if rand is not None:
    torch.rand = lambda *args, **kwargs: rand.clone()
  if randn is not None:
    torch.randn = lambda *args, **kwargs: randn.clone()
  try:
    yield
  finally:
    torch.rand, torch.randn = saved


class _PaperAPGD(torchattacks.APGD):
  """torchattacks' APGD whose first window counts loss increases from the start's loss.

  Algorithm 1 of Croce & Hein (2020) counts f(x^(i+1)) > f(x^(i)) for i from
  w_0 = 0, so the first comparison is with the loss at the random start x^(0);
  fra31's code (and torchattacks) compare with an unwritten, zero, entry of the
  loss history there. The toolkit follows the paper (`attacks/apgd.py`). The
  start's loss is the one torchattacks computes itself: that of the run's
  first forward pass.
  """

  def attack_single_run(self, x_in, y_in):
    self._labels, self._start_loss = y_in, None
    return super().attack_single_run(x_in, y_in)

  def get_logits(self, inputs, *args, **kwargs):
    logits = super().get_logits(inputs, *args, **kwargs)
    if self._start_loss is None:
      self._start_loss = F.cross_entropy(logits.detach(), self._labels,
                                         reduction="none").numpy()
    return logits

  def check_oscillation(self, x, j, k, y5, k3=0.75):
    if j - k + 1 == 0:
      x = np.array(x)
      x[j - k] = self._start_loss  # Row -1: the unwritten entry the first window reads.
    return super().check_oscillation(x, j, k, y5, k3)


def apgd_ce(inputs):
  """torchattacks' `APGD.attack_single_run` (loss "ce") from the toolkit's start.

  `start` is the toolkit's unclipped starting point x + eps t / |t|_p; its
  direction (start - x) / eps replaces torchattacks' own random draw, which
  then rescales it exactly as for its own draw. `paper_first_window` (0-d):
  count the first window's increases from the start's loss (the toolkit's
  default, the paper's Algorithm 1) or from zero (fra31's code as it ships).

  Returns the toolkit's result rule applied to torchattacks' run: the last
  misclassified iterate where the run fooled the network, else the iterate of
  highest loss; the clean image where given labels misclassify it already.
  Also `robust` (1: correctly classified throughout), its mean
  `robust_accuracy`, and `loss`, the cross-entropy at the result.
  """
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  eps = _scalar(inputs, "eps")
  linf = np.isinf(_scalar(inputs, "norm"))
  direction = (_nchw(inputs["start"]) - x) / eps
  attack_class = _PaperAPGD if bool(inputs["paper_first_window"]) else torchattacks.APGD
  attack = attack_class(net, norm="Linf" if linf else "L2", eps=eps, steps=int(inputs["steps"]),
                        n_restarts=1, loss="ce", rho=_scalar(inputs, "rho"))
  draws = _draws(rand=(direction + 1.0) / 2.0) if linf else _draws(randn=direction)
  with draws:
    x_best, robust, _, x_fooled = attack.attack_single_run(x, y)
  result = torch.where((~robust).view(-1, 1, 1, 1), x_fooled, x_best)
  if "y" in inputs:
    with torch.no_grad():
      clean_wrong = net(x).argmax(1) != y
    result = torch.where(clean_wrong.view(-1, 1, 1, 1), x, result)
    robust = robust & ~clean_wrong
  with torch.no_grad():
    loss = F.cross_entropy(net(result), y, reduction="none").numpy()
  robust = robust.float().numpy()
  return {"x_adv": _nhwc(result), "robust": robust, "robust_accuracy": np.asarray(robust.mean()),
          "loss": loss}


# ----------------------------------------------------------------------------
# PGD from given starting points, with restarts: a re-derivation (torchattacks'
# PGD draws its own start and has no restarts).


def pgd_from_starts(inputs):
  """Madry et al.'s PGD from each of `starts` [restarts, batch, H, W, C] (clipped starts).

  L-infinity steps x + a sign(g), L2 steps x + a g / |g|_2, each projected onto
  the eps-ball around x and clipped to [0, 1]. Over the restarts each example
  keeps its worst case: a misclassified result over a correctly classified
  one, else the higher loss (the first restart wins ties).
  """
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  eps, alpha, steps = _scalar(inputs, "eps"), _scalar(inputs, "step_size"), int(inputs["steps"])
  linf = np.isinf(_scalar(inputs, "norm"))
  best = best_loss = best_wrong = None
  for start in inputs["starts"]:
    x_adv = _nchw(start)
    for _ in range(steps):
      x_adv.requires_grad_(True)
      loss = F.cross_entropy(net(x_adv), y, reduction="sum")
      grad, = torch.autograd.grad(loss, x_adv)
      with torch.no_grad():
        if linf:
          x_adv = torch.minimum(torch.maximum(x_adv + alpha * grad.sign(), x - eps), x + eps)
        else:
          norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
          delta = x_adv + alpha * grad / norm - x
          size = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
          x_adv = x + delta * torch.clamp(eps / size.clamp_min(1e-12), max=1.0)
        x_adv = x_adv.clamp(0.0, 1.0)
    with torch.no_grad():
      logits = net(x_adv)
      loss = F.cross_entropy(logits, y, reduction="none")
      wrong = logits.argmax(1) != y
    if best is None:
      best, best_loss, best_wrong = x_adv, loss, wrong
      continue
    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
    best = torch.where(better.view(-1, 1, 1, 1), x_adv, best)
    best_loss = torch.where(better, loss, best_loss)
    best_wrong = best_wrong | wrong
  return {"x_adv": _nhwc(best)}
