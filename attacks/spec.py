"""Evaluation-attack specs (`--eval_attacks`): strings like `pgd(steps=50,restarts=5)`.

The syntax is that of the activation specs (`robust_sparse/nn/activations.py`):
a name, optionally with keyword parameters. Values are numbers, `inf` for
the norm, or `paper`/`fra31` for APGD's `first_window` (`attacks/apgd.py`):

  fgsm                      pgd                        pgd(steps=50,restarts=5)
  pgd(norm=2,eps=1.5)       apgd_ce                    apgd_ce(steps=100,eps=0.03)
  apgd_t                    fab_t(norm=2,eps=0.5)      square(n_queries=1000)
  autoattack                autoattack(norm=2,eps=0.5) apgd_ce(first_window=fra31)

Unspecified parameters take the run's values (`AttackConfig`: eps, PGD step
size and steps, random start, data range); `restarts` defaults to 1, `norm`
to L-infinity, and the AutoAttack parameters to its standard version's:
`steps` 100 for `apgd_ce`, `apgd_t`, `fab_t` and `autoattack`,
`n_target_classes` 9, `n_queries` 5000 and `first_window` paper. Spec attacks are
always the native implementation. Each spec has a canonical column name, safe
in a CSV header: the attack and the parameters given, in a fixed order
(`pgd_steps50_restarts5`, `pgd_norm2_eps1.5`, `apgd_ce`).
"""

import dataclasses
from typing import Callable, Dict, List, Tuple

import numpy as np

from robust_sparse.attacks.apgd import FIRST_WINDOWS
from robust_sparse.attacks.registry import AttackConfig, make_attack
from robust_sparse.core import specs

FLAG = "--eval_attacks"
# `apgd_ce`, `apgd_t`, `fab_t` and `autoattack` iterations unless the spec says otherwise
# (Croce & Hein 2020), and AutoAttack's standard targets and queries.
APGD_STEPS = 100
TARGET_CLASSES = 9
QUERIES = 5000
_AUTOATTACK = ("apgd_ce", "apgd_t", "fab_t", "square", "autoattack")
_STANDARD = {"steps": APGD_STEPS, "n_target_classes": TARGET_CLASSES, "n_queries": QUERIES}

def _non_negative_float(text):
  value = float(text)
  if not value >= 0:
    raise ValueError("must be a number >= 0")
  return value


def _count(minimum):
  def parse(text):
    value = float(text)
    if not value.is_integer() or value < minimum:
      raise ValueError(f"must be an integer >= {minimum}")
    return int(value)
  return parse


def _flag(text):
  if text not in ("0", "1"):
    raise ValueError("must be 0 or 1")
  return text == "1"


def _first_window(text):
  if text not in FIRST_WINDOWS:
    raise ValueError(f"must be one of {', '.join(FIRST_WINDOWS)}")
  return text


def _norm(text):
  if text in ("inf", "linf"):
    return np.inf
  if text in ("2", "2.0"):
    return 2
  raise ValueError("must be 2 or inf")


# Each attack's parameters, in column-name order: (AttackConfig field, parser).
_PARAMETERS: Dict[str, Dict[str, Callable]] = {
    "fgsm": {"eps": _non_negative_float},
    "pgd": {"norm": _norm, "eps": _non_negative_float, "step_size": _non_negative_float,
            "steps": _count(0), "restarts": _count(1), "random_start": _flag},
    "apgd_ce": {"norm": _norm, "eps": _non_negative_float, "steps": _count(0),
                "first_window": _first_window},
    "apgd_t": {"norm": _norm, "eps": _non_negative_float, "steps": _count(0),
               "n_target_classes": _count(1), "first_window": _first_window},
    "fab_t": {"norm": _norm, "eps": _non_negative_float, "steps": _count(0),
              "n_target_classes": _count(1)},
    "square": {"norm": _norm, "eps": _non_negative_float, "n_queries": _count(1)},
    "autoattack": {"norm": _norm, "eps": _non_negative_float, "steps": _count(0),
                   "n_target_classes": _count(1), "n_queries": _count(1),
                   "first_window": _first_window},
}


def names() -> List[str]:
  """The attacks a spec may name."""
  return sorted(_PARAMETERS)


def _error(spec, problem):
  return ValueError(f"{FLAG} {spec!r}: {problem}")


def _parse(spec: str) -> Tuple[str, Dict[str, str]]:
  """Parses `name` or `name(key=value,...)` into the name and the value texts."""
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{FLAG}: an attack spec must be a non-empty string, got {spec!r}")
  parsed = specs.parse(spec, what=FLAG, noun="an attack name")
  params = {}
  for key, value in parsed.params.items():
    if isinstance(value, specs.Spec):
      if value.params:  # Attack parameters are numbers or words (norm=inf), not specs.
        raise _error(spec, f"parameter {key!r} takes a number or a word, not a spec")
      value = value.name
    params[key] = value
  return parsed.name, params


def _format(value) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, bool):
    return str(int(value))
  if value == np.inf:
    return "inf"
  return repr(value) if isinstance(value, int) else format(value, "g")


def resolve_attack_spec(spec: str, defaults: AttackConfig) -> Tuple[str, AttackConfig]:
  """Returns (column name, the attack's `AttackConfig`) for one spec.

  Args:
    spec: e.g. "pgd(steps=50,restarts=5)".
    defaults: the run's attack budget; parameters the spec leaves out take its
      values (see the module docstring).

  Raises:
    ValueError: one line naming `--eval_attacks` and the bad part (unknown
      attack or parameter, bad value, syntax error).
  """
  name, texts = _parse(spec)
  if name not in _PARAMETERS:
    raise _error(spec, f"unknown attack {name!r}; known: {', '.join(names())}")
  parameters = _PARAMETERS[name]
  values = {}
  for key, text in texts.items():
    if key not in parameters:
      raise _error(spec, f"{name} has no parameter {key!r}; known: {', '.join(parameters)}")
    try:
      values[key] = parameters[key](text)
    except ValueError as error:
      raise _error(spec, f"{name}.{key} {error}, got {text!r}") from None
  base = dict(name=name, impl="native", restarts=1, norm=np.inf)
  if name in _AUTOATTACK:
    base.update({key: value for key, value in _STANDARD.items() if key in parameters})
  try:
    config = dataclasses.replace(defaults, **{**base, **values})
  except ValueError as error:
    raise _error(spec, str(error)) from None
  column = "_".join([name] + [f"{key}{_format(values[key])}" for key in parameters
                              if key in values])
  return column, config


def parse_attack_spec(spec: str, defaults: AttackConfig) -> Tuple[str, Callable]:
  """Returns (column name, `attack(model, x, y=None, seed=None) -> x_adv`) for one spec.

  See `resolve_attack_spec` for the arguments and errors.
  """
  column, config = resolve_attack_spec(spec, defaults)
  return column, make_attack(config)


def split_attack_specs(text: str) -> List[str]:
  """Splits a flag value like "fgsm,pgd(steps=50,restarts=5)" at its top-level commas.

  Raises:
    ValueError: unbalanced parentheses, naming `--eval_attacks`.
  """
  specs, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char == "(":
      depth += 1
    elif char == ")":
      depth -= 1
      if depth < 0:
        raise ValueError(f"{FLAG}: unbalanced ')' in {text!r}")
    elif char == "," and depth == 0:
      specs.append(text[start:i].strip())
      start = i + 1
  if depth:
    raise ValueError(f"{FLAG}: unbalanced '(' in {text!r}")
  specs.append(text[start:].strip())
  return [spec for spec in specs if spec]


def parse_attack_specs(specs, defaults: AttackConfig) -> List[Tuple[str, Callable]]:
  """`parse_attack_spec` of each spec (a list, or one string split at top-level commas).

  Raises:
    ValueError: a bad spec, or two specs with the same column name.
  """
  if isinstance(specs, str):
    specs = split_attack_specs(specs)
  parsed, seen = [], {}
  for spec in specs:
    column, attack = parse_attack_spec(spec, defaults)
    if column in seen:
      raise ValueError(f"{FLAG}: {spec!r} and {seen[column]!r} are the same attack "
                       f"({column})")
    seen[column] = spec
    parsed.append((column, attack))
  return parsed
