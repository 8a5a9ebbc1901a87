"""The spec syntax shared by `--activation` and `--eval_attacks`: `name(key=value,...)`.

A spec is a name, optionally followed by parenthesised `key=value` pairs whose
values are numbers (kept as their text) or specs themselves, nested to any
depth: `shift(inner=sshaped(inner=relu2,h=1.5),sx=1.6)`, `pgd(norm=2,eps=1.5)`.
A bare name as a value (`norm=inf`) is a spec without parameters. `parse`
returns the tree; what the names and values mean is the caller's.
"""

import dataclasses
import re
from typing import Dict, List, Tuple, Union

_TOKEN = re.compile(r"""\s*(?:
    (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<punct>[(),=])
  | (?P<bad>\S))""", re.VERBOSE)


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed spec: its name and its parameters (number texts or nested specs)."""
  name: str
  params: Dict[str, Union[str, "Spec"]]


def _tokenize(spec: str, error) -> List[Tuple[str, str]]:
  tokens = []
  for match in _TOKEN.finditer(spec):
    kind = match.lastgroup
    if kind is None:  # Trailing whitespace.
      continue
    if kind == "bad":
      raise error(f"unexpected character {match.group(kind)!r}")
    tokens.append((kind, match.group(kind)))
  return tokens


def parse(spec: str, *, what: str = "spec", noun: str = "a name") -> Spec:
  """Parses `spec`.

  Args:
    spec: the text.
    what: how errors name the spec's source, e.g. "activation spec" or
      "--eval_attacks": errors read `{what} {spec!r}: {problem}`.
    noun: what a missing name is called in errors ("an activation name").

  Raises:
    ValueError: one line: an empty spec, an unexpected character or token, a
      parameter given twice.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"{what} must be a non-empty string, got {spec!r}")

  def error(problem):
    return ValueError(f"{what} {spec!r}: {problem}")

  tokens = _tokenize(spec, error)
  position = 0

  def fail(expected):
    found = tokens[position][1] if position < len(tokens) else "end of spec"
    raise error(f"expected {expected}, found {found!r}")

  def take(kind, value=None):
    nonlocal position
    if (position < len(tokens) and tokens[position][0] == kind
        and (value is None or tokens[position][1] == value)):
      position += 1
      return tokens[position - 1][1]
    return None

  def parse_spec():
    name = take("name")
    if name is None:
      fail(noun)
    params = {}
    if take("punct", "("):
      if not take("punct", ")"):
        while True:
          key = take("name")
          if key is None:
            fail("a parameter name")
          if key in params:
            raise error(f"parameter {key!r} given twice")
          if not take("punct", "="):
            fail(f"'=' after {key!r}")
          number = take("number")
          if number is None and (position >= len(tokens) or tokens[position][0] != "name"):
            fail(f"a value for {key!r}")
          params[key] = number if number is not None else parse_spec()
          if take("punct", ")"):
            break
          if not take("punct", ","):
            fail("',' or ')'")
    return Spec(name, params)

  parsed = parse_spec()
  if position != len(tokens):
    fail("end of spec")
  return parsed
