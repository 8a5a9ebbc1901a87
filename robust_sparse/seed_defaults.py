"""Each seed's own defaults, for the hyper-parameters a user leaves unset.

`Hparams`' dataclass defaults are the lottery-ticket seed's. An experiment
or optimizer that comes from another seed (AutoReP's `relu_prune`, SSAM's
optimizers, phd-lab's saturation grids, the activation-sparsity seed's
`augmented_flatness`) takes that seed's values for every field the command
line, grid file or notebook did not set. A rule says when it applies (a
predicate on the hyper-parameters), which values it sets, and where they come
from; `apply` resolves them once, before the `Hparams` is built, so
`hparams.json` records the values used and the run folder's hash covers them.

Pure Python: reading or resolving hyper-parameters imports no TensorFlow.
"""

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping


@dataclasses.dataclass(frozen=True)
class Rule:
  """Seed defaults: `values` for the unset fields whenever `when(hyper-parameters)` holds."""
  seed: str
  source: str
  when: Callable[[Mapping[str, Any]], bool]
  values: Mapping[str, Any]


def _experiment(*names):
  return lambda hp: hp.get("experiment") in names


def _perturbation(*names):
  return lambda hp: str(hp.get("optimizer", "")).split("-")[0] in names


RULES: List[Rule] = [
    # Filled in per seed below; see each rule's `source`.
]


def apply(values: Mapping[str, Any], explicit: Iterable[str]) -> Dict[str, Any]:
  """`values` with each matching rule's values for the fields not in `explicit`.

  Rules are matched on `values` with the explicit settings in place (so
  `--experiment=relu_prune` selects AutoReP's rule), in `RULES` order; a
  later rule does not override a field an earlier one set.

  Args:
    values: every hyper-parameter (field name -> value).
    explicit: the fields the user set (flags present, grid or notebook keys).

  Returns:
    A new dict.
  """
  explicit = set(explicit)
  resolved = dict(values)
  set_by_rule = set()
  for rule in RULES:
    if not rule.when(resolved):
      continue
    for field, value in rule.values.items():
      if field not in explicit and field not in set_by_rule:
        resolved[field] = value
        set_by_rule.add(field)
  return resolved


def applied(values: Mapping[str, Any]) -> List[Rule]:
  """The rules that match `values` (for help text and the README)."""
  return [rule for rule in RULES if rule.when(values)]
