"""torchattacks' and ART's side of `python -m benchmarks.bench_autoattack` (the peers' process).

  python -m benchmarks.peers.autoattack_peers EXCHANGE.npz RESULT.json

Rebuilds the benchmark's Keras network from its weights (convolutions with
`stride_i`, 'valid' padding and ReLU, flattened in NHWC order as Keras does,
then dense layers with ReLU but the last) and measures, on the same images
and true labels, the robust accuracy and the seconds of:

- each torchattacks component alone (APGD, APGDT, FAB multi-targeted,
  Square), with the budget of the exchange (`steps`, `n_target_classes`,
  `n_queries`, one restart);
- torchattacks' `AutoAttack(version="standard")`, whose components keep their
  classes' default `steps=10` unless reconfigured: they are set here to the
  exchange's `steps` (the standard version's 100 by default), so both sides
  run the same iterations;
- ART's `AutoAttack` over a `PyTorchClassifier` with the standard components
  ART has: APGD-CE, APGD with the DLR loss (untargeted: ART's AutoAttack
  runs every component untargeted, and with `targeted=True` every component
  again for each other class, which is not the standard version) and Square;
  ART has no FAB. One restart each, `steps` iterations, `n_queries` queries.

Imports no TensorFlow.
"""

import json
import sys
import time

import numpy as np
import torch
import torchattacks
from torch import nn

ART_COMPONENTS = ("APGD-CE", "APGD-DLR (untargeted)", "Square")


class _NHWCFlatten(nn.Module):
  def forward(self, x):
    return torch.flatten(x.permute(0, 2, 3, 1), 1)


def _t(array):
  return torch.from_numpy(np.ascontiguousarray(array, np.float32))


def network(arrays):
  """The PyTorch port of the benchmark's Keras network, in eval mode."""
  kernels = sorted((k for k in arrays if k.startswith("kernel_")), key=lambda k: int(k[7:]))
  modules = []
  for i in range(len(kernels)):
    kernel, bias = arrays[f"kernel_{i}"], arrays[f"bias_{i}"]
    if kernel.ndim == 4:  # Keras HWIO -> PyTorch OIHW.
      conv = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2],
                       stride=int(arrays[f"stride_{i}"]))
      with torch.no_grad():
        conv.weight.copy_(_t(kernel.transpose(3, 2, 0, 1)))
        conv.bias.copy_(_t(bias))
      modules += [conv, nn.ReLU()]
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
  return nn.Sequential(*modules).eval()


def components(net, eps, norm, steps, n_targets, n_queries, seed):
  """torchattacks' four standard components with the benchmark's budget."""
  classes = n_targets + 1  # torchattacks targets the n_classes - 1 runners-up.
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


def standard_autoattack(net, eps, norm, steps, n_targets, n_queries, seed):
  """torchattacks' `AutoAttack(version="standard")`, its components set to the budget."""
  attack = torchattacks.AutoAttack(net, norm=norm, eps=eps, version="standard",
                                   n_classes=n_targets + 1, seed=seed)
  for component in attack._autoattack.attacks:
    if isinstance(component, torchattacks.Square):
      component.n_queries = n_queries
    else:
      component.steps = steps
  return attack


def art_autoattack(net, x, eps, norm, steps, n_queries, classes):
  """ART's AutoAttack over a `PyTorchClassifier` with the standard components ART has."""
  # Imported here: only this side of the benchmark needs ART.
  from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack
  from art.estimators.classification import PyTorchClassifier

  classifier = PyTorchClassifier(net, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                 nb_classes=classes, clip_values=(0.0, 1.0))
  art_norm = np.inf if norm == "Linf" else 2
  batch = len(x)
  # eps_step = eps: ART's APGD starts at 2 eps_step, the paper's 2 eps.
  apgd = [AutoProjectedGradientDescent(classifier, norm=art_norm, eps=eps, eps_step=eps,
                                       max_iter=steps, targeted=False, nb_random_init=1,
                                       batch_size=batch, loss_type=loss, verbose=False)
          for loss in ("cross_entropy", "difference_logits_ratio")]
  square = SquareAttack(classifier, norm=art_norm, eps=eps, max_iter=n_queries, p_init=0.8,
                        nb_restarts=1, batch_size=batch, verbose=False)
  return AutoAttack(classifier, norm=art_norm, eps=eps, eps_step=eps, attacks=apgd + [square],
                    batch_size=batch, targeted=False)


def main(exchange, result_path):
  with np.load(exchange) as data:
    arrays = {k: data[k] for k in data.files}
  net = network(arrays)
  x = _t(arrays["x"].transpose(0, 3, 1, 2))
  y = torch.from_numpy(arrays["y"].astype(np.int64))
  norm = "Linf" if np.isinf(float(arrays["norm"])) else "L2"
  eps, steps = float(arrays["eps"]), int(arrays["steps"])
  n_targets, n_queries = int(arrays["n_target_classes"]), int(arrays["n_queries"])
  seed, classes = int(arrays["seed"]), int(arrays["classes"])
  names = [str(n) for n in arrays["components"]]
  peers = [str(n) for n in arrays["peers"]]
  with torch.no_grad():
    logits = net(x)
  clean = logits.argmax(1) == y
  out = {"clean": clean.float().mean().item(), "torch_threads": torch.get_num_threads(),
         "logits_max_difference": float(np.abs(logits.numpy() - arrays["logits"]).max()),
         "art_components": list(ART_COMPONENTS)}

  def robust(adv):
    adv = torch.as_tensor(adv)
    with torch.no_grad():
      return ((net(adv).argmax(1) == y) & clean).float().mean().item()

  if "torchattacks" in peers:
    attacks = components(net, eps, norm, steps, n_targets, n_queries, seed)
    for name in names:
      start = time.perf_counter()
      out[name] = robust(attacks[name](x, y))
      out[f"{name}_seconds"] = time.perf_counter() - start
      print(f"  torchattacks {name}: {100 * out[name]:.1f} % "
            f"({out[f'{name}_seconds']:.0f} s)", flush=True)
    start = time.perf_counter()
    out["autoattack"] = robust(
        standard_autoattack(net, eps, norm, steps, n_targets, n_queries, seed)(x, y))
    out["autoattack_seconds"] = time.perf_counter() - start
    print(f"  torchattacks AutoAttack(version='standard'): {100 * out['autoattack']:.1f} % "
          f"({out['autoattack_seconds']:.0f} s)", flush=True)
  if "art" in peers:
    attack = art_autoattack(net, x, eps, norm, steps, n_queries, classes)
    start = time.perf_counter()
    adv = attack.generate(x=x.numpy(), y=y.numpy())
    out["art_autoattack"] = robust(adv)
    out["art_autoattack_seconds"] = time.perf_counter() - start
    print(f"  ART AutoAttack ({', '.join(ART_COMPONENTS)}): {100 * out['art_autoattack']:.1f} % "
          f"({out['art_autoattack_seconds']:.0f} s)", flush=True)
  with open(result_path, "w") as f:
    json.dump(out, f)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
