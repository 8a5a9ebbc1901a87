"""delve 0.1.50's own saturation of given layer activations (the reference of spec 5.1).

Runs delve's `SaturationTracker` unchanged: one PyTorch `Conv2d` or `Linear`
per layer, named as the toolkit's layer, whose registered forward hook is
called with the layer's activations as the module's output (NCHW for conv
maps), in training mode for the "train" split and evaluation mode for
"eval"; then `add_saturations`, whose values a capturing writer keeps. So
delve's own code does the nearest interpolation (`interpolation_strategy=
'nearest'`, `interpolation_downsampling`), the channelwise reshape, the
float64 `TorchCovarianceMatrix`, `torch.linalg.eigh` and its count.

Two departures, both documented by the caller's check:
  * delve 0.1.50's hook replaces a layer's covariance accumulator at every
    batch (0.1.41, which phd-lab ran, accumulates the epoch), so each split's
    activations are passed as one batch: the epoch's covariance.
  * with `shift`, each layer's activations are first shifted by their first
    row (channelwise). The covariance is shift-invariant; unshifted, a
    constant layer's sum(x x^T)/n - mu mu^T is float64 cancellation noise, to
    which delve gives a k of 0 to 3 depending on the data's size.

Imports torch, numpy and delve only.
"""

import tempfile

import numpy as np
import torch
from delve import SaturationTracker
from delve.writers import AbstractWriter


class _Capture(AbstractWriter):
  """A delve writer that keeps the values it is given."""

  def __init__(self):
    self.values = {}

  def resume_from_saved_state(self, initial_epoch):
    pass

  def add_scalar(self, name, value, **kwargs):
    self.values[name] = value

  def add_scalars(self, prefix, value_dict, global_step=None, **kwargs):
    self.values.update(value_dict)

  def save(self):
    pass

  def close(self):
    pass


def saturation(a):
  """{"<split>-saturation_<layer>", "<split>-intrinsic-dimensionality_<layer>"} by delve.

  Inputs: "names" (layer names), "<split>/<i>" the i-th layer's activations
  (NHWC or [N, units]), "delta", "downsampling" (-1: none), "shift" (0/1).
  """
  names = [str(n) for n in a["names"]]
  downsampling = int(a["downsampling"])
  modules = torch.nn.ModuleDict()
  for index, name in enumerate(names):
    width = a[f"train/{index}"].shape[-1]
    modules[name] = (torch.nn.Conv2d(1, width, 1) if a[f"train/{index}"].ndim == 4
                     else torch.nn.Linear(1, width))
  writer = _Capture()
  tracker = SaturationTracker(
      tempfile.mkdtemp(prefix="delve_"), writer, modules, stats=["lsat", "idim"],
      sat_threshold=float(a["delta"]), device="cpu", conv_method="channelwise",
      interpolation_strategy="nearest" if downsampling > 0 else None,
      interpolation_downsampling=downsampling if downsampling > 0 else 32)
  for split in ("train", "eval"):
    for index, name in enumerate(names):
      layer = modules[name]
      layer.train(split == "train")
      x = np.asarray(a[f"{split}/{index}"], np.float64)
      if int(a["shift"]):
        x = x - x.reshape(-1, x.shape[-1])[0]
      output = torch.from_numpy(x)
      if output.dim() == 4:
        output = output.permute(0, 3, 1, 2).contiguous()
      for hook in layer._forward_hooks.values():  # noqa: SLF001 -- delve's own hook
        hook(layer, (), output)
  tracker.add_saturations(save=False)
  return {key: np.asarray(float(value)) for key, value in writer.values.items()}
