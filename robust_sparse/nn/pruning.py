"""Magnitude pruning of the weights that are still unpruned.

Masks and kernels are plain dicts `{layer_name: np.ndarray}` so the functions
work on saved `.npy` files as well as on live models.
"""

from typing import Dict, Mapping, Optional

import numpy as np

SCOPES = ("layer", "global")


def _smallest_active(magnitudes: np.ndarray, count: int) -> np.ndarray:
  """Flat indices of the `count` smallest of `magnitudes` (ties: lowest index first)."""
  order = np.argsort(magnitudes, kind="stable")
  return order[:count]


def prune(kernels: Mapping[str, np.ndarray], masks: Mapping[str, np.ndarray],
          rates: Mapping[str, float], scope: str = "layer") -> Dict[str, np.ndarray]:
  """Removes the smallest-magnitude active weights.

  With `scope="layer"`, each layer loses `round(rates[layer] * n_active)` of its
  `n_active` unpruned weights. With `scope="global"`, all layers' active weights
  are ranked together and `round(rate * n_active_total)` are removed, where
  `rate` must be the same for every layer.

  Args:
    kernels: layer name -> kernel values (any shape).
    masks: layer name -> 0/1 mask of the kernel's shape.
    rates: layer name -> fraction in [0, 1] of the active weights to remove.
    scope: "layer" or "global".

  Returns:
    layer name -> new 0/1 float32 mask. Pruned weights stay pruned.
  """
  if scope not in SCOPES:
    raise ValueError(f"unknown prune scope {scope!r}; known: {', '.join(SCOPES)}")
  for name, rate in rates.items():
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"prune rate for {name} must be in [0, 1], got {rate}")
  new_masks = {name: np.array(masks[name], dtype=np.float32, copy=True) for name in masks}
  if scope == "layer":
    for name, rate in rates.items():
      mask = new_masks[name].reshape(-1)
      active = np.flatnonzero(mask)
      count = int(round(rate * active.size))
      magnitudes = np.abs(np.asarray(kernels[name]).reshape(-1)[active])
      mask[active[_smallest_active(magnitudes, count)]] = 0.0
    return new_masks
  distinct = set(rates.values())
  if len(distinct) != 1:
    raise ValueError("global pruning needs one rate for all layers, got "
                     f"{sorted(distinct)}")
  rate = distinct.pop()
  names = list(rates)
  actives = [np.flatnonzero(new_masks[n].reshape(-1)) for n in names]
  magnitudes = np.concatenate([np.abs(np.asarray(kernels[n]).reshape(-1)[a])
                               for n, a in zip(names, actives)])
  owners = np.concatenate([np.full(a.size, i) for i, a in enumerate(actives)])
  positions = np.concatenate(actives)
  chosen = _smallest_active(magnitudes, int(round(rate * magnitudes.size)))
  for i, name in enumerate(names):
    new_masks[name].reshape(-1)[positions[chosen[owners[chosen] == i]]] = 0.0
  return new_masks


def random_masks(like: Mapping[str, np.ndarray], seed) -> Dict[str, np.ndarray]:
  """Uniformly random 0/1 masks with each layer's count of ones in `like` (OpenLTH's
  `randomly_prune` control: a ticket's per-layer sparsity, none of its choices).

  Args:
    like: layer name -> 0/1 mask whose number of ones per layer is kept.
    seed: anything `np.random.default_rng` takes.
  """
  rng = np.random.default_rng(seed)
  masks = {}
  for name in sorted(like):
    mask = np.zeros(np.size(like[name]), np.float32)
    mask[rng.permutation(mask.size)[:int(np.sum(like[name]))]] = 1.0
    masks[name] = mask.reshape(np.shape(like[name]))
  return masks


def layer_rates(layer_names, rate: float, output_rate: float) -> Dict[str, float]:
  """The seed's schedule: `rate` for every layer but the last, `output_rate` for it."""
  names = list(layer_names)
  return {name: (output_rate if i == len(names) - 1 else rate) for i, name in enumerate(names)}


def scope_rates(layer_names, rate: float, output_rate: Optional[float] = None,
                scope: str = "layer") -> Dict[str, float]:
  """The per-layer rates of one pruning step, as `prune` takes them.

  `scope="layer"`: `rate` for every layer but the last, `output_rate` for it
  (`layer_rates`; None: `rate` too). `scope="global"`: `rate` for every layer,
  since global pruning ranks all layers' weights together at one rate; an
  `output_rate` other than None or `rate` is then refused.

  Raises:
    ValueError: an unknown scope, a rate outside [0, 1], or an output rate
      with global scope.
  """
  if scope not in SCOPES:
    raise ValueError(f"unknown prune scope {scope!r}; known: {', '.join(SCOPES)}")
  for label, value in (("rate", rate), ("output_rate", output_rate)):
    if value is not None and not 0.0 <= value <= 1.0:
      raise ValueError(f"prune {label} must be in [0, 1], got {value}")
  names = list(layer_names)
  if scope == "global":
    if output_rate is not None and output_rate != rate:
      raise ValueError(f"output_rate={output_rate} needs scope='layer': global pruning ranks "
                       f"every layer's weights together at rate={rate}")
    return {name: rate for name in names}
  return layer_rates(names, rate, rate if output_rate is None else output_rate)


def percent_remaining(masks: Mapping[str, np.ndarray]) -> float:
  total = sum(m.size for m in masks.values())
  return 100.0 * sum(float(m.sum()) for m in masks.values()) / total
