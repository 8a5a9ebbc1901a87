"""Magnitude pruning: exact counts, only active weights, the seed's schedule."""

import numpy as np
import pytest

from robust_sparse.nn import pruning

DENSE_300_100 = {"hidden_1": (784, 300), "hidden_2": (300, 100), "output": (100, 10)}


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  kernels = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
  masks = {n: np.ones(s, np.float32) for n, s in shapes.items()}
  return kernels, masks


def test_layerwise_counts_and_seed_levels():
  kernels, masks = _random(DENSE_300_100)
  rates = pruning.layer_rates(DENSE_300_100, 0.2, 0.1)
  assert rates == {"hidden_1": 0.2, "hidden_2": 0.2, "output": 0.1}
  percents = [pruning.percent_remaining(masks)]
  for _ in range(2):
    active = {n: int(m.sum()) for n, m in masks.items()}
    new = pruning.prune(kernels, masks, rates)
    for name in masks:
      removed = active[name] - int(new[name].sum())
      assert removed == round(rates[name] * active[name])
      # Pruned weights stay pruned.
      assert np.all(new[name][masks[name] == 0] == 0)
    masks = new
    percents.append(pruning.percent_remaining(masks))
  np.testing.assert_allclose(percents, [100.0, 80.04, 64.06], atol=0.005)


def test_removes_the_smallest_magnitudes():
  kernels = {"a": np.array([[0.5, -0.1], [3.0, -2.0]], np.float32)}
  masks = {"a": np.array([[1, 1], [0, 1]], np.float32)}  # 3.0 already pruned
  new = pruning.prune(kernels, masks, {"a": 0.34})  # round(0.34 * 3) = 1
  np.testing.assert_array_equal(new["a"], [[1, 0], [0, 1]])


def test_global_scope_ranks_across_layers():
  kernels = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([0.1, 0.2, 5.0])}
  masks = {n: np.ones(3, np.float32) for n in kernels}
  new = pruning.prune(kernels, masks, {"a": 0.5, "b": 0.5}, scope="global")
  np.testing.assert_array_equal(new["a"], [0, 1, 1])
  np.testing.assert_array_equal(new["b"], [0, 0, 1])


@pytest.mark.parametrize("rates,scope", [({"a": 1.5}, "layer"), ({"a": 0.2}, "sideways"),
                                         ({"a": 0.2, "b": 0.3}, "global")])
def test_bad_arguments(rates, scope):
  kernels = {"a": np.ones(3), "b": np.ones(3)}
  masks = {n: np.ones(3, np.float32) for n in kernels}
  with pytest.raises(ValueError):
    pruning.prune(kernels, masks, rates, scope)


def test_scope_rates_are_the_runners():
  names = ["hidden_1", "hidden_2", "output"]
  assert pruning.scope_rates(names, 0.2, 0.1) == pruning.layer_rates(names, 0.2, 0.1)
  assert pruning.scope_rates(names, 0.2) == {n: 0.2 for n in names}
  assert pruning.scope_rates(names, 0.3, None, "global") == {n: 0.3 for n in names}
  for args in [(0.2, 0.1, "global"), (0.2, 1.5, "layer"), (0.2, None, "sideways")]:
    with pytest.raises(ValueError):
      pruning.scope_rates(names, *args)
