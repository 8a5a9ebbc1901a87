"""torchattacks references of the FAB-T and Square checks (`benchmarks/fidelity/fab_square.py`).

The network, layouts and labels are those of `fidelity_attacks` (the MLP
rebuilt from the toolkit's kernels; NHWC arrays here, NCHW in torchattacks).
Each function returns, per example, `x_adv` (torchattacks' result: the
adversarial where it succeeded, the clean image elsewhere), the attack's
own verdict `fooled` (1 where it changed the image) and `distance` (the Lp
norm of the change), and `robust` (1: correctly classified when clean and
under attack, re-evaluated here) with its mean `robust_accuracy`.

Imports torch and torchattacks, never TensorFlow.
"""

import numpy as np
import torch
import torchattacks

from benchmarks.peers.fidelity_attacks import _labels, _nchw, _nhwc, _scalar, network


def _result(inputs, net, x, y, x_adv):
  """The attack's own verdict and result (see the module docstring)."""
  with torch.no_grad():
    robust = ((net(x_adv).argmax(1) == y) & (net(x).argmax(1) == y)).float().numpy()
  x_adv = _nhwc(x_adv)
  delta = (x_adv - inputs["x"]).reshape(len(x_adv), -1)
  distance = (np.abs(delta).max(1) if np.isinf(_scalar(inputs, "norm"))
              else np.sqrt((delta.astype(np.float64) ** 2).sum(1)))
  return {"x_adv": x_adv, "fooled": (distance > 0).astype(np.float32), "distance": distance,
          "robust": robust, "robust_accuracy": np.asarray(robust.mean())}


def _norm_name(inputs):
  return "Linf" if np.isinf(_scalar(inputs, "norm")) else "L2"


def fab_t(inputs):
  """torchattacks' `FAB(multi_targeted=True)`: AutoAttack's FAB-T, one restart (deterministic).

  `n_classes` = 10 gives the 9 targets ranked 2nd to 10th; `steps` as given
  (the standard's 100, not torchattacks' default of 10).
  """
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  attack = torchattacks.FAB(net, norm=_norm_name(inputs), eps=_scalar(inputs, "eps"),
                            steps=int(inputs["steps"]), n_restarts=1,
                            alpha_max=_scalar(inputs, "alpha_max"), eta=_scalar(inputs, "eta"),
                            beta=_scalar(inputs, "beta"), multi_targeted=True,
                            n_classes=int(inputs["classes"]))
  return _result(inputs, net, x, y, attack(x, y))


class _InjectedSquare(torchattacks.Square):
  """torchattacks' Square whose random choices are the toolkit's (`attacks/square.py` draws).

  `random_int` returns the next window corner, `random_choice` the next signs
  (rows of the examples attacked: the subset `perturb` passes, then, for
  L2's per-query signs, those not fooled yet), `eta` the next orientation;
  every other line is torchattacks' own. The draws are for the whole batch
  in the toolkit's layout: corners [queries, 2 or 4]; L-infinity signs
  [batch, 1, width, channels] at the start and [queries, channels] per
  query; L2 signs [batch, blocks, blocks, channels] at the start and
  [queries, batch, channels] per query, orientations [blocks, blocks] and
  [queries].
  """

  def __init__(self, model, draws, subset, **kwargs):
    super().__init__(model, **kwargs)
    # torchattacks' Attack.__setattr__ walks lists for sub-attacks; the queues bypass it.
    store = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    store("_corners", [int(v) for v in np.asarray(draws["corners"]).reshape(-1)])
    linf = kwargs["norm"] == "Linf"
    start = np.asarray(draws["start_signs"], np.float32)
    if linf:
      signs = [start.transpose(0, 3, 1, 2)]
      signs += [s.reshape(-1, 1, 1) for s in np.asarray(draws["signs"], np.float32)]
    else:
      signs = [start[:, a, b, :, None, None] for a in range(start.shape[1])
               for b in range(start.shape[2])]
      signs += [s[:, :, None, None] for s in np.asarray(draws["signs"], np.float32)]
    store("_signs", signs)
    store("_flips", [bool(v) for v in np.asarray(draws.get("flips", []), bool).reshape(-1)])
    store("_subset", subset)
    store("_margin_min", None)

  def margin_and_loss(self, x, y):
    margin, loss = super().margin_and_loss(x, y)
    if self._margin_min is None:  # The run's margin_min, updated in place by the run.
      object.__setattr__(self, "_margin_min", margin)
    return margin, loss

  def random_int(self, low=0, high=1, shape=[1]):  # noqa: B006 -- the reference's signature
    value = self._corners.pop(0)
    if not low <= value < max(high, low + 1):
      raise ValueError(f"injected corner {value} outside [{low}, {high})")
    return torch.tensor([value], dtype=torch.long)

  def random_choice(self, shape):
    signs = torch.from_numpy(np.ascontiguousarray(self._signs.pop(0)))
    if len(shape) == 3:  # L-infinity's per-query signs, one per channel.
      return signs.reshape(shape)
    signs = signs[self._subset]
    if self._margin_min is not None:  # L2's per-query signs: the examples not fooled yet.
      signs = signs[(self._margin_min > 0.0).nonzero().flatten()]
    if tuple(signs.shape) != tuple(shape):
      raise ValueError(f"injected signs {tuple(signs.shape)}, asked for {tuple(shape)}")
    return signs

  def eta(self, s):
    delta = torch.zeros([s, s])
    delta[:s // 2] = self.eta_rectangles(s // 2, s)
    delta[s // 2:] = -1.0 * self.eta_rectangles(s - s // 2, s)
    delta /= (delta ** 2).sum(dim=(0, 1), keepdim=True).sqrt()
    if self._flips.pop(0):  # The reference: torch.rand([1]) > 0.5.
      delta = delta.permute([1, 0])
    return delta


def square_injected(inputs):
  """torchattacks' Square (margin loss, one restart) with the toolkit's random choices."""
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  with torch.no_grad():
    subset = (net(x).argmax(1) == y).nonzero().flatten()
  draws = {k[len("draw_"):]: v for k, v in inputs.items() if k.startswith("draw_")}
  attack = _InjectedSquare(net, draws, subset, norm=_norm_name(inputs),
                           eps=_scalar(inputs, "eps"), n_queries=int(inputs["n_queries"]),
                           n_restarts=1, p_init=_scalar(inputs, "p_init"), loss="margin")
  return _result(inputs, net, x, y, attack(x, y))


def square_own_draws(inputs):
  """torchattacks' Square as it ships (its own `torch.rand` draws, seeded)."""
  net = network(inputs)
  x = _nchw(inputs["x"])
  y = _labels(net, inputs, x)
  attack = torchattacks.Square(net, norm=_norm_name(inputs), eps=_scalar(inputs, "eps"),
                               n_queries=int(inputs["n_queries"]), n_restarts=1,
                               p_init=_scalar(inputs, "p_init"), loss="margin",
                               seed=int(inputs["seed"]))
  result = _result(inputs, net, x, y, attack(x, y))
  return {"robust_accuracy": result["robust_accuracy"]}
