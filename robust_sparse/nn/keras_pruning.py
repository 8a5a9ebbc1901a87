"""Pruning a live Keras model: its masks, magnitude pruning, sparsity reports.

The model-level counterpart of `robust_sparse.nn.pruning` (which works on plain
dicts of arrays): these functions read the kernels and masks of a model's
`MaskedDense` / `MaskedConv2D` layers, prune with `pruning.prune` (so the
counts are the runner's: `round(rate * active)` per layer, or over all layers
with global scope) and write the new masks back, zeroing the pruned weights.
The masked layers' kernel constraint then keeps them zero through any
`model.fit` (see `robust_sparse.nn.layers`).

`masked(model)` turns a plain Keras model's `Dense` / `Conv2D` layers into
masked ones (the inverse of `layers.strip_masks`), so any Sequential or
functional model can be pruned.

Names follow tensorflow/model-optimization where the idea is the same
(`prune_low_magnitude`, `strip_pruning` is `layers.strip_masks`), with one
difference: `prune_low_magnitude` here prunes the model in place, one step at
a time, instead of wrapping it for a schedule during training; the
lottery-ticket callback (`robust_sparse.training.lottery`) is the schedule.
"""

import dataclasses
from typing import Dict, Mapping, Optional, Sequence

import keras
import numpy as np
from keras.src.models.functional import Functional

from robust_sparse.nn import pruning
from robust_sparse.nn.layers import (MASKED_LAYER_TYPES, MaskedConv2D, MaskedDense,
                                     clone_layer_pairs, enforce_masks)

# The plain Keras layers `masked` converts, by exact type (subclasses such as
# `Conv2DTranspose` compute otherwise).
_CONVERTED = {keras.layers.Dense: MaskedDense, keras.layers.Conv2D: MaskedConv2D}


def _masked_layers_in_order(model) -> list:
  """The masked layers of `model`, depth first, each model's layers in its own order.

  For a flat functional or Sequential model this is `layers.masked_layers`
  (the runner's order, whose last layer takes the output rate). Keras'
  `_flatten_layers`, which that uses, lists the layers of a nested model
  (a `RobustModel`'s network, a Sequential block) last to first; here they
  keep their call order.
  """
  found, seen = [], set()

  def visit(layer):
    for inner in layer._layers:  # pylint: disable=protected-access
      if id(inner) in seen:
        continue
      seen.add(id(inner))
      if isinstance(inner, MASKED_LAYER_TYPES):
        found.append(inner)
      visit(inner)

  visit(model)
  return found


def _checked_layers(model, layers: Optional[Sequence[str]] = None) -> list:
  """The masked layers of `model` (those named in `layers`, if given), in call order.

  Raises:
    ValueError: no masked layers, an unknown name, or two masked layers with one name.
  """
  found = _masked_layers_in_order(model)
  if not found:
    raise ValueError(f"model {model.name!r} has no MaskedDense or MaskedConv2D layers; "
                     "convert it with `robust_sparse.api.masked(model)` or build it from "
                     "`robust_sparse.nn.layers`")
  names = [layer.name for layer in found]
  duplicates = sorted({name for name in names if names.count(name) > 1})
  if duplicates:
    raise ValueError(f"model {model.name!r} has several masked layers named {duplicates}; "
                     "give every layer its own name")
  if layers is None:
    return found
  unknown = sorted(set(layers) - set(names))
  if unknown:
    raise ValueError(f"layers={unknown} are not masked layers of model {model.name!r}; "
                     f"known: {', '.join(names)}")
  return [layer for layer in found if layer.name in set(layers)]


def get_masks(model) -> Dict[str, np.ndarray]:
  """{layer name: 0/1 float32 mask} of every masked layer of `model`."""
  return {layer.name: np.asarray(layer.mask.numpy(), np.float32)
          for layer in _checked_layers(model)}


def get_kernels(model) -> Dict[str, np.ndarray]:
  """{layer name: kernel} of every masked layer (the variable's values, as the runner saves)."""
  return {layer.name: np.asarray(layer.raw_kernel.numpy()) for layer in _checked_layers(model)}


def set_masks(model, masks: Mapping[str, np.ndarray]) -> None:
  """Assigns `masks` to the named masked layers and zeroes their pruned weights.

  Args:
    model: a model with masked layers.
    masks: {layer name: 0/1 array of the layer's kernel shape}; layers not
      named keep their masks.

  Raises:
    ValueError: an unknown layer, a mask of the wrong shape, or values other than 0 and 1.
  """
  layers = {layer.name: layer for layer in _checked_layers(model, list(masks))}
  for name, mask in masks.items():
    mask = np.asarray(mask, np.float32)
    expected = tuple(layers[name].mask.shape)
    if mask.shape != expected:
      raise ValueError(f"mask of layer {name!r} has shape {mask.shape}, expected {expected}")
    if not np.all((mask == 0) | (mask == 1)):
      raise ValueError(f"mask of layer {name!r} holds values other than 0 and 1")
  for name, mask in masks.items():
    layers[name].mask.assign(np.asarray(mask, np.float32))
  enforce_masks(model)


@dataclasses.dataclass(frozen=True)
class SparsityReport:
  """How many weights of each masked kernel remain.

  Attributes:
    layers: {layer name: (remaining, total)} in call order.
  """
  layers: Dict[str, tuple]

  @property
  def remaining(self) -> int:
    return sum(remaining for remaining, _ in self.layers.values())

  @property
  def total(self) -> int:
    return sum(total for _, total in self.layers.values())

  @property
  def percent_remaining(self) -> float:
    """Of all masked kernels together (the runner's `percent_weights_remaining`)."""
    return 100.0 * self.remaining / self.total

  @property
  def sparsity(self) -> float:
    """The pruned fraction of all masked kernels together, in [0, 1]."""
    return 1.0 - self.remaining / self.total

  def as_dict(self) -> Dict[str, float]:
    """{layer name: percent remaining, ..., "total": percent remaining}."""
    values = {name: 100.0 * remaining / total
              for name, (remaining, total) in self.layers.items()}
    values["total"] = self.percent_remaining
    return values

  def __str__(self):
    width = max([len(name) for name in self.layers] + [5])
    lines = [f"{'layer':<{width}}  {'remaining':>10} / {'total':<10} % remaining"]
    rows = list(self.layers.items()) + [("total", (self.remaining, self.total))]
    for name, (remaining, total) in rows:
      lines.append(f"{name:<{width}}  {remaining:>10} / {total:<10} "
                   f"{100.0 * remaining / total:11.2f}")
    return "\n".join(lines)


def sparsity_report(model) -> SparsityReport:
  """The remaining weights of every masked layer of `model` (see `SparsityReport`)."""
  return SparsityReport({name: (int(mask.sum()), int(mask.size))
                         for name, mask in get_masks(model).items()})


def prune_low_magnitude(model, rate: float, *, scope: str = "layer",
                        output_rate: Optional[float] = None,
                        layers: Optional[Sequence[str]] = None) -> SparsityReport:
  """Prunes the smallest-magnitude unpruned weights of `model`'s masked layers, in place.

  One step of the toolkit's magnitude pruning (`pruning.prune`, as
  `run_experiments` prunes between levels): with `scope="layer"` each layer
  loses `round(r * active)` of its `active` unpruned weights, r = `rate`, or
  `output_rate` for the last masked layer (the lottery-ticket seed prunes
  0.2 / 0.1); with `scope="global"` the active weights of all layers are
  ranked together and `round(rate * all active)` go. Pruned weights stay
  pruned; ties go to the lower index. The kernels' pruned entries become
  exact zeros and stay so in training (the masked layers' constraint).

  Args:
    model: a Keras model with `MaskedDense` / `MaskedConv2D` layers (a
      `RobustModel` too); `masked(model)` converts a plain one.
    rate: the fraction in [0, 1] of the active weights to remove.
    scope: "layer" or "global".
    output_rate: the last masked layer's rate with layer scope; None: `rate`.
    layers: names of the masked layers to prune (the last of them takes
      `output_rate`); None: all.

  Returns:
    The `SparsityReport` after pruning (every masked layer).

  Raises:
    ValueError: no masked layers, an unknown layer, a rate outside [0, 1], an
      unknown scope, or an `output_rate` with global scope.
  """
  chosen = _checked_layers(model, layers)
  names = [layer.name for layer in chosen]
  rates = pruning.scope_rates(names, rate, output_rate, scope)
  kernels = {layer.name: np.asarray(layer.raw_kernel.numpy()) for layer in chosen}
  masks = {layer.name: np.asarray(layer.mask.numpy(), np.float32) for layer in chosen}
  set_masks(model, pruning.prune(kernels, masks, rates, scope))
  return sparsity_report(model)


def masked(model) -> keras.Model:
  """A copy of `model` whose `Dense` / `Conv2D` layers are `MaskedDense` / `MaskedConv2D`.

  The inverse of `layers.strip_masks`: every `keras.layers.Dense` and
  `keras.layers.Conv2D` (exactly those types) becomes its masked twin with
  the same config, the same kernel and bias and an all-ones mask; every other
  layer (masked ones included) is cloned with its weights. The copy computes
  the same outputs and can be pruned; compile it before training (the
  optimizer is not copied).

  Args:
    model: a Sequential or functional `keras.Model` (nested ones included).

  Returns:
    The new model; `model` is left unchanged.

  Raises:
    ValueError: for a subclassed model (Keras cannot clone those) or an
      unbuilt Sequential one.
  """
  if not isinstance(model, (keras.Sequential, Functional)):
    raise ValueError(f"masked: model {model.name!r} is a subclassed Keras model, which Keras "
                     "cannot clone; build it with the Sequential or functional API, or use "
                     "`robust_sparse.nn.layers.MaskedDense` / `MaskedConv2D` in it directly")
  if not model.built:
    raise ValueError(f"masked: model {model.name!r} is not built; give it an Input or call "
                     "it once first")

  def clone(layer):
    target = _CONVERTED.get(type(layer), layer.__class__)
    return target.from_config(layer.get_config())

  copy, pairs = clone_layer_pairs(model, clone, "masked")
  for old, new in pairs:
    if isinstance(new, MASKED_LAYER_TYPES) and not isinstance(old, MASKED_LAYER_TYPES):
      values = {variable.name: variable for variable in old.weights}
      for variable in new.weights:
        if variable.name != "mask":  # The new mask is all ones.
          variable.assign(values[variable.name])
    else:
      new.set_weights(old.get_weights())
  return copy
