"""torchattacks' side of `python -m benchmarks.check_autoattack` (run in the peers' process).

  python -m benchmarks.peers.autoattack_check EXCHANGE.npz RESULT.json

Rebuilds the Keras network from its weights (`arch`: "mlp", Flatten - Dense
+ ReLU ... - Dense; "conv", Conv-ReLU-MaxPool x 2 - Flatten - Dense + ReLU -
Dense, 'valid' padding, flattened in NHWC order as Keras does) and measures
robust accuracy under each AutoAttack component alone and under the whole
standard sequence (torchattacks' `MultiAttack`, which attacks only the
examples still robust, as `AutoAttack(version="standard")` does), with the
budgets given: torchattacks' own `AutoAttack` keeps its classes' default 10
`steps` for APGD, APGD-T and FAB, where the standard version runs 100, so
the components are built here with the budget of the check. Imports no
TensorFlow.
"""

import json
import sys
import time

import numpy as np
import torch
import torchattacks
from torch import nn


class _NHWCFlatten(nn.Module):
  def forward(self, x):
    return torch.flatten(x.permute(0, 2, 3, 1), 1)


def _t(array):
  return torch.from_numpy(np.ascontiguousarray(array, np.float32))


def network(arrays, arch):
  """The PyTorch port of the check's Keras network, in eval mode."""
  kernels = sorted(k for k in arrays if k.startswith("kernel_"))
  modules = []
  for i in range(len(kernels)):
    kernel, bias = arrays[f"kernel_{i}"], arrays[f"bias_{i}"]
    if kernel.ndim == 4:  # Keras HWIO -> PyTorch OIHW.
      conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0])
      with torch.no_grad():
        conv.weight.copy_(_t(kernel.transpose(3, 2, 0, 1)))
        conv.bias.copy_(_t(bias))
      modules += [conv, nn.ReLU(), nn.MaxPool2d(2)]
      continue
    if not any(isinstance(m, _NHWCFlatten) for m in modules):
      modules.append(_NHWCFlatten())
    linear = nn.Linear(*kernel.shape)
    with torch.no_grad():
      linear.weight.copy_(_t(kernel.T))
      linear.bias.copy_(_t(bias))
    modules.append(linear)
    if i < len(kernels) - 1:
      modules.append(nn.ReLU())
  del arch
  return nn.Sequential(*modules).eval()


def components(net, eps, norm, steps, n_queries, seed, classes):
  return {
      "apgd_ce": torchattacks.APGD(net, norm=norm, eps=eps, steps=steps, n_restarts=1,
                                   loss="ce", seed=seed),
      "apgd_t": torchattacks.APGDT(net, norm=norm, eps=eps, steps=steps, n_restarts=1,
                                   seed=seed, n_classes=classes),
      "fab_t": torchattacks.FAB(net, norm=norm, eps=eps, steps=steps, n_restarts=1,
                                multi_targeted=True, n_classes=classes, seed=seed),
      "square": torchattacks.Square(net, norm=norm, eps=eps, n_queries=n_queries, n_restarts=1,
                                    seed=seed),
  }


def main(exchange, result_path):
  torch.set_num_threads(max(1, torch.get_num_threads()))
  with np.load(exchange) as data:
    arrays = {k: data[k] for k in data.files}
  net = network(arrays, str(arrays["arch"]))
  x = _t(arrays["x"].transpose(0, 3, 1, 2))
  y = torch.from_numpy(arrays["y"].astype(np.int64))
  norm = "Linf" if np.isinf(float(arrays["norm"])) else "L2"
  names = [str(n) for n in arrays["components"]]
  attacks = components(net, float(arrays["eps"]), norm, int(arrays["steps"]),
                       int(arrays["n_queries"]), int(arrays["seed"]), int(arrays["classes"]))
  with torch.no_grad():
    logits = net(x)
  clean = logits.argmax(1) == y
  out = {"clean": clean.float().mean().item(),
         "logits_max_difference": float(np.abs(logits.numpy() - arrays["logits"]).max())}

  def robust(adv):
    with torch.no_grad():
      return ((net(adv).argmax(1) == y) & clean).float().mean().item()

  for name in names:
    start = time.perf_counter()
    out[name] = robust(attacks[name](x, y))
    out[f"{name}_seconds"] = time.perf_counter() - start
  start = time.perf_counter()
  sequence = torchattacks.MultiAttack([attacks[n] for n in names])
  out["autoattack"] = robust(sequence(x, y))
  out["autoattack_seconds"] = time.perf_counter() - start
  with open(result_path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
