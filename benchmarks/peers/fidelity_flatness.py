"""PyTorch reference of augmented flatness as the seed measures it (cdgyp/sparsity).

Re-derived from the seed's `hooks.py: CoefficientPlugin` and
`imagenet1k.py: train_one_epoch` (`--augmented-flatness-only
--correct-samples-only`), without its code: the network runs in train mode;
forward hooks keep the key and value layers' inputs, full backward hooks
read dL/dZ at both layers and dL/dA at the ReLU; the loss is
`cross_entropy(reduction='none', label_smoothing) * correct`, averaged over
the batch and multiplied by the loss scale (the AMP scaler's factor), with
soft labels turned into their argmax first. Each term is observed per
batch, averaged over batches, and the gradient terms are divided by the
mean accuracy (the notebook's step). Imports torch and numpy only.
"""

import numpy as np
import torch
from torch import nn

GRADIENT_TERMS = ("key", "L0_sum", "L0_preview", "value", "L2", "L2_term")


class _Network(nn.Module):
  def __init__(self, a):
    super().__init__()
    features = a["mlp_key/kernel"].shape[0]
    self.norm = nn.BatchNorm1d(features, eps=1e-3)
    self.key = nn.Linear(*a["mlp_key/kernel"].shape)
    self.activation = nn.ReLU()
    self.value = nn.Linear(*a["mlp_value/kernel"].shape)
    self.head = nn.Linear(*a["output/kernel"].shape)
    with torch.no_grad():
      self.norm.weight.copy_(torch.from_numpy(a["norm/gamma"]).double())
      self.norm.bias.copy_(torch.from_numpy(a["norm/beta"]).double())
      for module, name in ((self.key, "mlp_key"), (self.value, "mlp_value"),
                           (self.head, "output")):
        module.weight.copy_(torch.from_numpy(a[name + "/kernel"]).double().T)
        module.bias.copy_(torch.from_numpy(a[name + "/bias"]).double())

  def forward(self, x):                     # x: [B, T, d]
    x = self.norm(x.transpose(1, 2)).transpose(1, 2)
    v = self.value(self.activation(self.key(x)))
    return self.head(v.mean(dim=1))


def augmented_flatness(a):
  net = _Network(a).double()
  net.train()
  kept = {}
  net.key.register_forward_hook(lambda m, i, o: kept.__setitem__("X_key", i[0].detach()))
  net.value.register_forward_hook(lambda m, i, o: kept.__setitem__("A", i[0].detach()))
  net.key.register_full_backward_hook(lambda m, gi, go: kept.__setitem__("G_key", go[0]))
  net.value.register_full_backward_hook(lambda m, gi, go: kept.__setitem__("G_value", go[0]))
  net.activation.register_full_backward_hook(lambda m, gi, go: kept.__setitem__("G_A", go[0]))

  size = int(a["batch_size"])
  smoothing, scale = float(a["label_smoothing"]), float(a["loss_scale"])
  x_all = torch.from_numpy(a["x"]).double()
  y_all = torch.from_numpy(a["y"]).double()
  observed = {}

  def observe(name, value):
    observed.setdefault(name, []).append(float(value))

  for start in range(0, len(x_all), size):
    x, target = x_all[start:start + size], y_all[start:start + size]
    net.zero_grad()
    output = net(x)
    if len(target.shape) > 1:
      target = target.argmax(dim=-1)
    loss = nn.functional.cross_entropy(output, target, reduction="none",
                                       label_smoothing=smoothing)
    correct = output.argmax(dim=-1) == target
    loss = (loss * correct).mean()
    observe("accuracy", correct.double().mean())
    (loss * scale).backward()
    with torch.no_grad():
      for name, inputs, grad in (("key", kept["X_key"], kept["G_key"]),
                                 ("value", kept["A"], kept["G_value"])):
        observe(name, ((grad ** 2).sum(-1) * (inputs ** 2).sum(-1)).sum(1).mean())
      activation, x_norm = kept["A"], (kept["X_key"] ** 2).sum(-1)
      mask = activation > 0
      total = ((kept["G_A"] ** 2) * mask * x_norm.unsqueeze(-1)).mean()
      weight = mask.double().mean()
      observe("L0_sum", total)
      observe("L0_weight", weight)
      observe("L0_preview", total / weight)
      norms = (kept["G_value"] ** 2).sum(-1)
      observe("a2", (activation ** 2).sum(-1).mean())
      observe("L2", norms.mean())
      observe("L2_term", ((activation ** 2).sum(-1) * norms).mean())
  accuracy = np.mean(observed["accuracy"])
  out = {name: np.array(np.mean(values) / (accuracy if name in GRADIENT_TERMS else 1.0))
         for name, values in observed.items() if name != "accuracy"}
  out["accuracy"] = np.array(accuracy)
  return out
