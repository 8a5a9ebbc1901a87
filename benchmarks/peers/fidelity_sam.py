"""PyTorch references of the optimizers and sharpness-aware steps (fidelity checks).

Written from the papers and the original code's semantics, not from the
toolkit: `torch.optim.SGD / Adam / AdamW` themselves; SAM as Mi-Peng's
`first_step` (`e = rho g / (||g|| + 1e-7)`, weights moved in place and
restored before the base step); SSAM-F / SSAM-D as their `first_step`
(`e = m * rho g / (||g|| + 1e-7)`, the norm of the whole gradient); ASAM as
SamsungLabs/ASAM's `ascent_step` (T = |w| + eta on parameters whose PyTorch
name holds "weight", T = 1 on biases, norm guard 1e-16) and as davda54/sam
with `adaptive=True` (T = |w| everywhere, guard 1e-12); implicit sparse
perturbation as the seed's SAMConv (the ascent pass back-propagates input
gradients through `W * mask`, convolutions only); SSAM-F's Fisher
information as `get_fisher` (batch-1 gradients in train mode, squared and
summed); the masks as `update_mask` / `get_nm_mask`; SSAM-D's drop and grow
as its `update_mask`.

Every function takes and returns a dict of NumPy arrays (see
`benchmarks/fidelity/sam.py` and `optimizers.py` for the keys). Weights
arrive in Keras layout (conv kernels `[kh, kw, in, out]`, dense `[in, out]`)
and go back in it; the model computes in PyTorch's NCHW layout, in float64.
Imports torch and NumPy only.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

DTYPE = torch.float64


def _t(array):
  return torch.tensor(np.asarray(array), dtype=DTYPE)


def _scalar(inputs, key):
  return float(np.asarray(inputs[key]))


def _text(inputs, key):
  return str(np.asarray(inputs[key]))


# ---- plain optimizers ----------------------------------------------------------------
def _optimizer_steps(inputs, build):
  """Two steps of `build(params, config)` on the given gradients, at the given rates."""
  outputs = {}
  configs = sorted({k.split(".")[0] for k in inputs if "." in k})
  names = sorted(k[len("w:"):] for k in inputs if k.startswith("w:"))
  for config in configs:
    params = [torch.nn.Parameter(_t(inputs["w:" + n])) for n in names]
    optimizer = build(params, {k.split(".", 1)[1]: np.asarray(v) for k, v in inputs.items()
                               if k.startswith(config + ".")})
    for step, lr in enumerate(np.asarray(inputs["lr"])):
      for group in optimizer.param_groups:
        group["lr"] = float(lr)
      for p, n in zip(params, names):
        p.grad = _t(inputs[f"g{step}:{n}"])
      optimizer.step()
    for p, n in zip(params, names):
      outputs[f"{config}:{n}"] = p.detach().numpy()
  return outputs


def sgd(inputs):
  return _optimizer_steps(inputs, lambda params, c: torch.optim.SGD(
      params, lr=1.0, momentum=float(c["momentum"]), nesterov=bool(c["nesterov"]),
      weight_decay=float(c["weight_decay"])))


def adam(inputs):
  return _optimizer_steps(inputs, lambda params, c: torch.optim.Adam(
      params, lr=1.0, betas=(float(c["beta_1"]), float(c["beta_2"])), eps=float(c["epsilon"]),
      weight_decay=float(c["weight_decay"])))


def adamw(inputs):
  return _optimizer_steps(inputs, lambda params, c: torch.optim.AdamW(
      params, lr=1.0, betas=(float(c["beta_1"]), float(c["beta_2"])), eps=float(c["epsilon"]),
      weight_decay=float(c["weight_decay"])))


# ---- the conv model ------------------------------------------------------------------
# conv1 (3x3, same, no bias) -> BN -> ReLU -> conv2 (3x3, same, bias) -> ReLU -> flatten
# (in NHWC order, as Keras' Flatten) -> dense (bias). PyTorch names, as in the seeds.
TORCH_NAMES = {"conv1_kernel": "conv1.weight", "bn_gamma": "bn.weight", "bn_beta": "bn.bias",
               "conv2_kernel": "conv2.weight", "conv2_bias": "conv2.bias",
               "dense_kernel": "linear.weight", "dense_bias": "linear.bias"}
BN_EPSILON = 1e-3  # Keras' BatchNormalization default.


def _to_torch(key, array):
  """A Keras-layout array as the PyTorch parameter's layout."""
  array = np.asarray(array)
  if array.ndim == 4:
    return array.transpose(3, 2, 0, 1)
  if array.ndim == 2:
    return array.T
  return array


def _to_keras(array):
  if array.ndim == 4:
    return array.transpose(2, 3, 1, 0)
  if array.ndim == 2:
    return array.T
  return array


class _ImplicitConv(torch.autograd.Function):
  """SAMConv's ascent pass: output and weight gradient dense, input gradient via W * mask."""

  @staticmethod
  def forward(ctx, x, weight, mask):
    ctx.save_for_backward(x, weight, mask)
    return F.conv2d(x, weight, padding=1)

  @staticmethod
  def backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    grad_x = torch.nn.grad.conv2d_input(x.shape, weight * mask, grad, padding=1)
    grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, padding=1)
    return grad_x, grad_w, None


def _conv(x, weight, mask):
  if mask is None:
    return F.conv2d(x, weight, padding=1)
  return _ImplicitConv.apply(x, weight, mask)


def _conv_model_loss(p, x, y, implicit=None):
  """Mean cross-entropy of the conv model; `implicit`: {param name: torch-layout mask}."""
  implicit = implicit or {}
  h = x.permute(0, 3, 1, 2)
  h = _conv(h, p["conv1.weight"], implicit.get("conv1.weight"))
  h = F.batch_norm(h, None, None, p["bn.weight"], p["bn.bias"], training=True, eps=BN_EPSILON)
  h = F.relu(h)
  h = _conv(h, p["conv2.weight"], implicit.get("conv2.weight")) + p["conv2.bias"][None, :,
                                                                                  None, None]
  h = F.relu(h)
  h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)
  logits = F.linear(h, p["linear.weight"], p["linear.bias"])
  return F.cross_entropy(logits, y)


def _params(inputs):
  return {TORCH_NAMES[k[2:]]: torch.nn.Parameter(_t(_to_torch(k[2:], v)))
          for k, v in inputs.items() if k.startswith("p:")}


def _masks(inputs, prefix):
  return {TORCH_NAMES[k[len(prefix):]]: _t(_to_torch(k[len(prefix):], v))
          for k, v in inputs.items() if k.startswith(prefix)}


def _outputs(params):
  back = {v: k for k, v in TORCH_NAMES.items()}
  return {"p:" + back[n]: _to_keras(p.detach().numpy()) for n, p in params.items()}


def _backward(params, loss):
  for p in params.values():
    p.grad = None
  loss.backward()


def _ascent(params, rule, rho, eta, masks):
  """The perturbation each original adds in place; returns {name: e}."""
  grads = {n: p.grad for n, p in params.items()}
  if rule in ("sam", "ssam"):  # Mi-Peng's first_step: the whole gradient's norm.
    norm = torch.norm(torch.stack([g.norm(p=2) for g in grads.values()]), p=2)
    scale = rho / (norm + 1e-7)
    return {n: g * scale * (masks[n] if rule == "ssam" and n in masks else 1.0)
            for n, g in grads.items()}
  if rule == "asam_official":  # SamsungLabs/ASAM ascent_step.
    t = {n: (params[n].detach().abs() + eta if "weight" in n else None) for n in params}
    scaled = {n: g if t[n] is None else g * t[n] for n, g in grads.items()}
    norm = torch.norm(torch.stack([g.norm(p=2) for g in scaled.values()]), p=2) + 1e-16
    return {n: (g if t[n] is None else g * t[n]) * (rho / norm) for n, g in scaled.items()}
  if rule == "asam_davda54":  # davda54/sam, adaptive=True.
    norm = torch.norm(torch.stack([(params[n].detach().abs() * g).norm(p=2)
                                   for n, g in grads.items()]), p=2)
    scale = rho / (norm + 1e-12)
    return {n: torch.pow(params[n].detach(), 2) * g * scale for n, g in grads.items()}
  raise ValueError(f"unknown rule {rule!r}")


def sam_steps(inputs):
  """Two SAM-family steps with an SGD base (torch.optim.SGD) on the conv model."""
  params = _params(inputs)
  rule = _text(inputs, "rule")
  rho, eta = _scalar(inputs, "rho"), _scalar(inputs, "eta")
  sparse = _masks(inputs, "mask:")
  implicit = _masks(inputs, "implicit:")
  # SAMConv: only the convolutions back-propagate through their masks.
  implicit = {n: m for n, m in implicit.items() if n in ("conv1.weight", "conv2.weight")}
  optimizer = torch.optim.SGD(list(params.values()), lr=_scalar(inputs, "lr"),
                              momentum=_scalar(inputs, "momentum"),
                              weight_decay=_scalar(inputs, "weight_decay"))
  steps = sorted(int(k[1:]) for k in inputs if k.startswith("x"))
  for step in steps:
    x, y = _t(inputs[f"x{step}"]), torch.tensor(inputs[f"y{step}"], dtype=torch.long)
    _backward(params, _conv_model_loss(params, x, y, implicit))
    with torch.no_grad():
      e = _ascent(params, rule, rho, eta, sparse)
      for n, p in params.items():
        p.add_(e[n])
    _backward(params, _conv_model_loss(params, x, y))
    with torch.no_grad():
      for n, p in params.items():
        p.sub_(e[n])
    optimizer.step()
  outputs = _outputs(params)
  if "ssamd_sparsity" in inputs:  # SSAMD.init_mask keeps N - ceil(N * sparsity) entries.
    total = sum(m.numel() for m in sparse.values())
    outputs["live"] = np.array(float(total - math.ceil(total * _scalar(inputs,
                                                                        "ssamd_sparsity"))))
  return outputs


def fisher(inputs):
  """`get_fisher`: per example a batch of one in train mode, gradients squared and summed."""
  params = _params(inputs)
  x, y = _t(inputs["x"]), torch.tensor(inputs["y"], dtype=torch.long)
  totals = {n: torch.zeros_like(p) for n, p in params.items()}
  for i in range(x.shape[0]):
    _backward(params, _conv_model_loss(params, x[i:i + 1], y[i:i + 1]))
    for n, p in params.items():
      totals[n] += p.grad.detach() ** 2
  back = {v: k for k, v in TORCH_NAMES.items()}
  return {"fisher:" + back[n]: _to_keras(t.numpy()) for n, t in totals.items()}


# ---- SSAM-F masks ----------------------------------------------------------------------
def _nm(score, n, m):
  """`get_nm_mask`: groups of M consecutive entries in memory order, the M - N smallest out."""
  groups = score.reshape(-1, m)
  index = torch.argsort(groups, dim=1)[:, :m - n]
  return torch.ones_like(groups).scatter_(1, index, 0.0).reshape(score.shape)


def fisher_masks(inputs):
  """SSAMF.update_mask for `pattern` (and the conv N:M `layout`: seed's or transposed back)."""
  names = sorted(k[len("fisher:"):] for k in inputs if k.startswith("fisher:"))
  scores = {n: _t(_to_torch(n, inputs["fisher:" + n])) for n in names}
  pattern, sparsity = _text(inputs, "pattern"), _scalar(inputs, "sparsity")
  masks = {}
  if pattern == "unstructured":
    flat = torch.cat([scores[n].flatten() for n in names])
    keep = int(len(flat) * (1 - sparsity))
    chosen = torch.zeros_like(flat).scatter_(0, torch.topk(flat, keep).indices, 1.0)
    start = 0
    for n in names:
      masks[n] = chosen[start:start + scores[n].numel()].reshape(scores[n].shape)
      start += scores[n].numel()
  elif pattern == "structured":
    means = torch.stack([scores[n].mean() for n in names])
    total = sum(scores[n].numel() for n in names)
    kept, chosen = 0, set()
    for i in torch.argsort(means, descending=True).tolist():
      if kept < int(total * (1 - sparsity)):
        chosen.add(names[i])
        kept += scores[names[i]].numel()
      else:
        break
    masks = {n: torch.ones_like(scores[n]) * (n in chosen) for n in names}
  else:
    n_keep, m = int(inputs["n"]), int(inputs["m"])
    layout = _text(inputs, "layout")
    for n in names:
      score = scores[n]
      if score.ndim == 4 and layout == "seed":  # view(co, -1).t(), masked, view(co, ci, k, k).
        co = score.shape[0]
        masks[n] = _nm(score.reshape(co, -1).t().contiguous(), n_keep, m).reshape(score.shape)
      elif score.ndim in (2, 4):
        masks[n] = _nm(score, n_keep, m)
      else:
        masks[n] = torch.ones_like(score)
  return {"mask:" + n: _to_keras(masks[n].numpy()) for n in names}


# ---- SSAM-D ----------------------------------------------------------------------------
def dynamic_update(inputs):
  """SSAMD.update_mask on flat arrays: death by (score + 1e-7) * mask, growth by
  (score + 1e-7) * (1 - mask), the cosine drop rate of `epoch` / `epochs`."""
  mask = _t(inputs["mask"])
  death_scores = (_t(inputs["death_score"]) + 1e-7) * mask
  growth_scores = (_t(inputs["growth_score"]) + 1e-7) * (1 - mask)
  sparsity, drop_rate = _scalar(inputs, "sparsity"), _scalar(inputs, "drop_rate")
  epoch, epochs = _scalar(inputs, "epoch"), _scalar(inputs, "epochs")
  rate = drop_rate * (1 + math.cos(math.pi * epoch / epochs)) / 2
  total = len(mask)
  death_num = int(min((total - total * sparsity) * rate, total * sparsity))
  survivors = int((total - total * sparsity) * (1 - rate))
  new = torch.zeros_like(mask).scatter_(0, torch.topk(death_scores, survivors).indices, 1.0)
  grown = torch.zeros_like(mask).scatter_(0, torch.topk(growth_scores, death_num).indices, 1.0)
  return {"mask": (new + grown).numpy()}
