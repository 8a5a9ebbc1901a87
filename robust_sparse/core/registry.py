"""One small registry type shared by every extensible concept of the toolkit.

Data sets, models, activations, attacks and experiments each keep a `Registry`
keyed by the name used on the command line, so they all share one contract:
`register(name)` as a decorator, `get(name)` (an unknown name is a `ValueError`
that lists the known ones) and `names()`.
"""

from typing import Callable, Dict, Generic, List, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps command-line names to objects (usually factories or classes)."""

  def __init__(self, kind: str):
    """Args:
      kind: what the registry holds, used in error messages ("model", ...).
    """
    self.kind = kind
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers its argument under `name`."""

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = obj
      return obj

    return decorator

  def get(self, name: str) -> T:
    """Returns the entry called `name`.

    Raises:
      ValueError: if no entry has that name; the message lists the known ones.
    """
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(
          f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
      ) from None

  def names(self) -> List[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries
