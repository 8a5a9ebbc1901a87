"""The fidelity checks whose reference needs no peer package (NumPy), run as tests.

The PyTorch, delve and torchattacks references run in
`python -m benchmarks.check_fidelity` (peers in their own folder).
"""

import pytest

from benchmarks import fidelity

NUMPY_CHECKS = [c for c in fidelity.checks() if c.numpy_reference is not None
                and not c.needs_data]


def test_every_check_has_a_reference_and_a_tolerance():
  for check in fidelity.checks():
    assert check.reference and check.tolerance > 0, check.name


@pytest.mark.parametrize("check", NUMPY_CHECKS, ids=[c.name for c in NUMPY_CHECKS])
def test_numpy_check_agrees(check):
  inputs, outputs = check.ours(fidelity.Context())
  reference = check.numpy_reference(inputs)
  difference = fidelity.max_difference(outputs, reference)
  assert difference <= check.tolerance, (check.name, difference)


def test_max_difference_sees_missing_keys_and_shapes():
  import numpy as np
  assert fidelity.max_difference({"a": np.zeros(2)}, {"a": np.ones(2)}) == 1.0
  assert fidelity.max_difference({"a": np.zeros(2)}, {"b": np.zeros(2)}) == float("inf")
  assert fidelity.max_difference({"a": np.zeros(2)}, {"a": np.zeros(3)}) == float("inf")
