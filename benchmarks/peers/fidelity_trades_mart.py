"""PyTorch references of the TRADES and MART step checks (`benchmarks/fidelity/trades_mart.py`).

Written from the papers and their released code, not from the toolkit:
TRADES as yaodongyu/TRADES `trades_loss` (inner loop: `KLDivLoss(sum)` of
`log_softmax(f(x'))` against `softmax(f(x))`, signed steps, `min/max` onto
the eps-ball, `clamp(0, 1)`; outer: `cross_entropy(f(x), y) + beta *
KLDivLoss(sum) / batch`, the gradient through both distributions); MART as
YisenWang/MART `mart_loss` (inner loop on `cross_entropy(f(x'), y)`; outer:
`cross_entropy(f(x'), y) + nll_loss(log(1.0001 - p(x') + 1e-12), y')`, `y'`
from `argsort`, plus `beta / batch * sum(KLDivLoss(none)(log(p(x') + 1e-12),
p(x)).sum(1) * (1.0000001 - p_y(x)))`). Both start at `x + noise`, the noise
given (the toolkit's draw of `0.001 N(0, 1)`). Then `torch.optim.SGD`.

The networks compute in float64 from the toolkit's float32 weights: kernels
in Keras' layout (`[in, out]`, `[kh, kw, in, out]`) times their masks;
images NHWC, the convolution in NCHW, flattened in NHWC order as Keras does.
Imports torch and NumPy only.
"""

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64


def _t(array):
  return torch.tensor(np.asarray(array), dtype=DTYPE)


def _network(inputs, params):
  """`f(x)`: the MLP or the conv net of `params` (Keras layouts) times the masks."""
  masks = {k[2:]: _t(v) for k, v in inputs.items() if k.startswith("m:")}
  w = lambda layer: params[f"{layer}_kernel"] * masks[layer]  # noqa: E731
  b = lambda layer: params[f"{layer}_bias"]  # noqa: E731
  if str(inputs["arch"]) == "mlp":
    def f(x):
      return F.relu(x @ w("hidden") + b("hidden")) @ w("out") + b("out")
  else:
    def f(x):
      h = F.conv2d(x.permute(0, 3, 1, 2), w("conv").permute(3, 2, 0, 1), b("conv"), padding=1)
      h = F.relu(h).permute(0, 2, 3, 1).reshape(x.shape[0], -1)
      return h @ w("out") + b("out")
  return f


def _inner(f, x, y, noise, inputs, kind):
  """The papers' L-infinity PGD from `x + noise` (model in eval mode: no layer here differs)."""
  eps, step_size = float(inputs["eps"]), float(inputs["step_size"])
  kl_sum = torch.nn.KLDivLoss(reduction="sum")
  x_adv = x.detach() + noise
  for _ in range(int(inputs["steps"])):
    x_adv.requires_grad_()
    with torch.enable_grad():
      if kind == "trades":
        loss = kl_sum(F.log_softmax(f(x_adv), dim=1), F.softmax(f(x), dim=1))
      else:
        loss = F.cross_entropy(f(x_adv), y)
    grad = torch.autograd.grad(loss, [x_adv])[0]
    x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
  return torch.clamp(x_adv, 0.0, 1.0).detach()


def _trades_loss(f, x, x_adv, y, beta):
  kl_sum = torch.nn.KLDivLoss(reduction="sum")
  natural = F.cross_entropy(f(x), y)
  robust = kl_sum(F.log_softmax(f(x_adv), dim=1), F.softmax(f(x), dim=1)) / len(x)
  return natural + beta * robust


def _mart_loss(f, x, x_adv, y, beta):
  kl = torch.nn.KLDivLoss(reduction="none")
  logits, logits_adv = f(x), f(x_adv)
  adv_probs = F.softmax(logits_adv, dim=1)
  top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
  new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
  loss_adv = (F.cross_entropy(logits_adv, y)
              + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y))
  nat_probs = F.softmax(logits, dim=1)
  true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze(1)
  robust = torch.sum(torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1)
                     * (1.0000001 - true_probs)) / len(x)
  return loss_adv + beta * robust


def step(inputs):
  """One TRADES or MART step: x_adv, the loss, the gradients and the SGD step's weights."""
  kind = str(inputs["adv_loss"])
  names = [k[2:] for k in inputs if k.startswith("p:")]
  params = {n: torch.nn.Parameter(_t(inputs["p:" + n])) for n in names}
  f = _network(inputs, params)
  x, y = _t(inputs["x"]), torch.tensor(inputs["y"], dtype=torch.long)
  x_adv = _inner(f, x, y, _t(inputs["noise"]), inputs, kind)
  optimizer = torch.optim.SGD(list(params.values()), lr=float(inputs["lr"]))
  optimizer.zero_grad()
  loss = (_trades_loss if kind == "trades" else _mart_loss)(f, x, x_adv, y,
                                                           float(inputs["beta"]))
  loss.backward()
  outputs = {"x_adv": x_adv.numpy(), "loss": loss.detach().numpy()}
  outputs.update({"g:" + n: p.grad.numpy().copy() for n, p in params.items()})
  optimizer.step()
  outputs.update({"p:" + n: p.detach().numpy() for n, p in params.items()})
  return outputs
