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
  difference = check.compare(outputs, reference)
  assert difference <= check.tolerance, (check.name, difference)


def test_max_difference_sees_missing_keys_and_shapes():
  import numpy as np
  assert fidelity.max_difference({"a": np.zeros(2)}, {"a": np.ones(2)}) == 1.0
  assert fidelity.max_difference({"a": np.zeros(2)}, {"b": np.zeros(2)}) == float("inf")
  assert fidelity.max_difference({"a": np.zeros(2)}, {"a": np.zeros(3)}) == float("inf")


def test_quantile_difference_lets_a_few_examples_part_but_no_verdict():
  import numpy as np
  difference = fidelity.quantile_difference("loss", 0.99)
  loss = np.zeros(200)
  robust = np.ones(200)
  apart = loss.copy()
  apart[:2] = 0.5  # 1 % of the examples part.
  assert difference({"loss": loss, "robust": robust}, {"loss": apart, "robust": robust}) == 0.0
  apart[:3] = 0.5  # 1.5 %: the 99 % quantile sees it.
  assert difference({"loss": loss, "robust": robust}, {"loss": apart, "robust": robust}) == 0.5
  flipped = robust.copy()
  flipped[7] = 0.0  # One verdict differs: the whole difference.
  assert difference({"loss": loss, "robust": robust}, {"loss": loss, "robust": flipped}) == 1.0
  assert difference({"loss": loss}, {"robust": robust}) == float("inf")
