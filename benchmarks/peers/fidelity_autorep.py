"""AutoReP re-derived in PyTorch, for `benchmarks/fidelity/autorep.py` (no TensorFlow).

Written from harveyp123/AutoReP's code (spec section 3), not from the toolkit:

- `models_util/model_spReLU.py` (e37c8bb): `STEFunction` (forward 1[alpha > 0],
  backward softplus(alpha) * grad), `ReLU_Pruned` (forward x, backward
  1[x > 0]), `x2act` (scale_x2 x^2 + scale_x x), `x2act_auto` / `xact_auto`
  (the autopoly fits by var_map; degree 1 returns x), and each module's
  forward `relu(x) * m + g(x) * (1 - m)` with `self.act = F.relu(inplace=True)`
  evaluated first: "released" keeps that in-place relu (g then sees relu(x)),
  "intended" is the fixed form of e066c1f / af8dc5a. Mask dropout: in training,
  `sel = random.uniform(0, 1) < p` and `sel * relu(x) + (1 - sel) * out`, in the
  spgrad, poly and autopoly modules only (ReLU_masked has no `p`).
- `model_spReLU_relay.py`: `STEFunction_relay` (forward the state mask M,
  backward softplus(alpha) * grad) and `update_mask`, M <- M 1[alpha > -t] +
  (1 - M) 1[alpha > t] at the start of a forward pass; af8dc5a's trainable
  polynomials `x2act_auto(x, para, scale_x2) = scale_x2 w2 x^2 + w1 x + w0`,
  `x1act_auto = w1 x + w0`, one coefficient per channel.
- `train_cifar.py` / `train_util.train_mask`: per batch, `alpha_optim.zero_grad()`,
  forward, CE + lamda * relu(density - target), backward, Adam step on the
  alphas (betas (0.5, 0.999), L2 weight decay); then `w_optim.zero_grad()`, a
  second forward, CE, backward, SGD step on the weights (momentum, L2 weight
  decay); both `CosineAnnealingLR` over the mask epochs (weights to w_lr_min,
  alphas to 0), stepped per epoch; batch norm in training mode in both passes.

Arrays come in the toolkit's layout (NHWC, alpha HWC) and are transposed to
AutoReP's NCHW / CHW here, and back.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F


def _in_float64(reference):
  """Runs `reference` with PyTorch's default dtype float64, restored afterwards.

  The peers' process runs every check's reference in turn: a global default
  set at import would leak into the others (torchattacks' FAB and Square then
  mix float64 draws with float32 models).
  """

  @functools.wraps(reference)
  def run(inputs):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
      return reference(inputs)
    finally:
      torch.set_default_dtype(previous)

  return run

DROPOUT_REPLACEMENTS = ("identity_relu_grad", "poly", "autopoly1", "autopoly2")
AUTOPOLY2 = {"after_bn": (0.2, 0.5, 0.2), "after_residual": (0.1414, 0.5, 0.2828)}


class STEFunctionRelay(torch.autograd.Function):
  """AutoReP's gate: the mask forward, softplus(alpha) * grad to alpha backward."""

  @staticmethod
  def forward(ctx, alpha, mask):
    ctx.save_for_backward(alpha)
    return mask.clone()

  @staticmethod
  def backward(ctx, grad_output):
    alpha, = ctx.saved_tensors
    return F.softplus(alpha) * grad_output, None


class ReLUPruned(torch.autograd.Function):
  """x forward, relu's derivative backward."""

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x > 0)
    return x.clone()

  @staticmethod
  def backward(ctx, grad_output):
    positive, = ctx.saved_tensors
    return positive.to(grad_output.dtype) * grad_output


def _f64(a, **kwargs):
  return torch.tensor(np.asarray(a, np.float64), **kwargs)


def _text(value):
  return str(np.asarray(value))


def _channels(w, ndim):
  """A per-channel coefficient [C] as [1, C, 1, 1] (conv) or [1, C] (dense)."""
  return w.view(1, -1, *([1] * (ndim - 2)))


def replacement_fn(name, *, scale_x2, scale_x, site, poly):
  """g(x) of AutoReP's module for the toolkit's replacement `name`."""
  if name in ("identity", "autopoly1"):
    return lambda x: x
  if name == "identity_relu_grad":
    return ReLUPruned.apply
  if name == "poly":
    return lambda x: scale_x2 * torch.mul(x, x) + scale_x * x
  if name == "autopoly2":
    a, b, c = AUTOPOLY2[site]
    return lambda x: a * torch.mul(x, x) + b * x + c
  if name == "trainable_poly":
    return lambda x: (scale_x2 * _channels(poly[2], x.dim()) * torch.mul(x, x)
                      + _channels(poly[1], x.dim()) * x + _channels(poly[0], x.dim()))
  if name == "trainable_poly1":
    return lambda x: _channels(poly[1], x.dim()) * x + _channels(poly[0], x.dim())
  raise ValueError(f"unknown replacement {name!r}")


def update_mask(state, alpha, threshold):
  with torch.no_grad():
    return state * (alpha > -threshold).to(state.dtype) + (1 - state) * (
        alpha > threshold).to(state.dtype)


def masked_relu_forward(x, alpha, mask, *, name, forward, g, training, p):
  """One AutoReP site on NCHW (or NC) `x` with CHW `alpha` and the 0/1 `mask` in force."""
  relu_mask = STEFunctionRelay.apply(alpha, mask)
  pass_mask = 1 - relu_mask
  if forward == "released":
    x = x.clone()  # The seed's in-place relu overwrites x before g reads it.
    out = torch.mul(F.relu(x, inplace=True), relu_mask) + torch.mul(g(x), pass_mask)
  else:
    out = torch.mul(F.relu(x), relu_mask) + torch.mul(g(x), pass_mask)
  if training and p > 0 and name in DROPOUT_REPLACEMENTS:
    sel = float(np.random.uniform(0, 1) < p)  # p = 1 in the checks: always relu.
    out = sel * F.relu(x) + (1 - sel) * out
  return out


def _nchw(a):
  return np.moveaxis(a, -1, 1) if a.ndim == 4 else a


def _chw(a):
  return np.moveaxis(a, -1, 0) if a.ndim == 3 else a


def _nhwc(a):
  return np.moveaxis(a, 1, -1) if a.ndim == 4 else a


def _hwc(a):
  return np.moveaxis(a, 0, -1) if a.ndim == 3 else a


@_in_float64
def masked_relu(inputs):
  """Output, dL/dx, dL/dalpha (and dL/dw of trainable polynomials) for L = sum(G * y),
  and the state mask after the call, at one site."""
  name, forward = _text(inputs["replacement"]), _text(inputs["relu_forward"])
  x = _f64(_nchw(inputs["x"]), requires_grad=True)
  alpha = _f64(_chw(inputs["alpha"]), requires_grad=True)
  state = _f64(_chw(inputs["state"]))
  poly = [_f64(inputs[f"poly_w{i}"], requires_grad=True) for i in range(3)
          if f"poly_w{i}" in inputs]
  g = replacement_fn(name, scale_x2=float(inputs["scale_x2"]), scale_x=float(inputs["scale_x"]),
                     site=_text(inputs["site"]), poly=poly)
  mask = update_mask(state, alpha, float(inputs["threshold"]))
  y = masked_relu_forward(x, alpha, mask, name=name, forward=forward, g=g,
                          training=bool(inputs["training"]), p=float(inputs["mask_dropout"]))
  (_f64(_nchw(inputs["upstream"])) * y).sum().backward()
  outputs = {"y": _nhwc(y.detach().numpy()), "d_x": _nhwc(x.grad.numpy()),
             "d_alpha": _hwc(alpha.grad.numpy()), "state": _hwc(mask.numpy())}
  for i, w in enumerate(poly):
    outputs[f"d_poly_w{i}"] = w.grad.numpy()
  return outputs


@_in_float64
def two_phase_step(inputs):
  """AutoReP's mask-phase steps on Linear -> BatchNorm1d -> masked relu -> Linear."""
  x = _f64(inputs["x"])
  y = torch.tensor(inputs["y"], dtype=torch.long)
  name, forward = _text(inputs["replacement"]), _text(inputs["relu_forward"])
  threshold = float(inputs["threshold"])
  hidden = torch.nn.Linear(x.shape[1], inputs["hidden_kernel"].shape[1])
  bn = torch.nn.BatchNorm1d(hidden.out_features, momentum=0.1, eps=1e-5)
  output = torch.nn.Linear(hidden.out_features, inputs["output_kernel"].shape[1])
  with torch.no_grad():
    hidden.weight.copy_(_f64(inputs["hidden_kernel"].T))
    hidden.bias.copy_(_f64(inputs["hidden_bias"]))
    output.weight.copy_(_f64(inputs["output_kernel"].T))
    output.bias.copy_(_f64(inputs["output_bias"]))
    bn.weight.copy_(_f64(inputs["gamma"]))
    bn.bias.copy_(_f64(inputs["beta"]))
    bn.running_mean.copy_(_f64(inputs["moving_mean"]))
    bn.running_var.copy_(_f64(inputs["moving_variance"]))
  alpha = torch.nn.Parameter(_f64(inputs["alpha"]))
  state = _f64(inputs["state"])
  g = replacement_fn(name, scale_x2=float(inputs["scale_x2"]), scale_x=float(inputs["scale_x"]),
                     site="after_bn", poly=None)
  weights = [hidden.weight, hidden.bias, bn.weight, bn.bias, output.weight, output.bias]
  w_optim = torch.optim.SGD(weights, float(inputs["w_mask_lr"]),
                            momentum=float(inputs["momentum"]),
                            weight_decay=float(inputs["w_mask_weight_decay"]))
  alpha_optim = torch.optim.Adam([alpha], float(inputs["alpha_lr"]), betas=(0.5, 0.999),
                                 weight_decay=float(inputs["alpha_weight_decay"]))
  epochs, eta_min = float(inputs["mask_epochs"]), float(inputs["eta_min"])
  target, lamda = float(inputs["target"]), float(inputs["lamda"])

  def model():
    nonlocal state
    state = update_mask(state, alpha, threshold)  # At the start of every forward pass.
    h = bn(hidden(x))
    return output(masked_relu_forward(h, alpha, state, name=name, forward=forward, g=g,
                                      training=True, p=0.0))

  for epoch in inputs["epochs"]:
    cosine = (1 + math.cos(math.pi * float(epoch) / epochs)) / 2
    alpha_optim.param_groups[0]["lr"] = float(inputs["alpha_lr"]) * cosine
    w_optim.param_groups[0]["lr"] = eta_min + (float(inputs["w_mask_lr"]) - eta_min) * cosine
    alpha_optim.zero_grad()
    ce = F.cross_entropy(model(), y)
    density = STEFunctionRelay.apply(alpha, state).sum() / alpha.numel()
    (ce + lamda * F.relu(density - target)).backward()
    alpha_optim.step()
    w_optim.zero_grad()
    F.cross_entropy(model(), y).backward()
    w_optim.step()
  detach = lambda t: t.detach().numpy()
  return {"hidden_kernel": detach(hidden.weight).T, "hidden_bias": detach(hidden.bias),
          "gamma": detach(bn.weight), "beta": detach(bn.bias),
          "moving_mean": detach(bn.running_mean),
          "moving_variance": detach(bn.running_var), "output_kernel": detach(output.weight).T,
          "output_bias": detach(output.bias), "alpha": detach(alpha),
          "state": update_mask(state, alpha, threshold).numpy()}


@_in_float64
def dropout_everywhere(inputs):
  """`masked_relu` with p = 1 for each replacement of the "<name>/<key>" inputs."""
  names = sorted({key.split("/")[0] for key in inputs})
  outputs = {}
  for name in names:
    one = masked_relu({k.split("/", 1)[1]: v for k, v in inputs.items()
                       if k.startswith(name + "/")})
    outputs.update({f"{name}/{k}": v for k, v in one.items() if k in ("y", "d_x")})
  return outputs
