"""One small registry type, used once per concept (normalizers, models, datasets, optimizers).

A leaf module: it imports nothing of lipnorm, so every layer of the package may use it.
"""
from __future__ import annotations

from typing import Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """Maps names to factories; unknown names raise a ValueError listing the valid ones."""

  def __init__(self, concept: str):
    self.concept = concept
    self._entries: Dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.concept} {name!r} is already registered")
      self._entries[name] = obj
      return obj
    return decorator

  def get(self, name: str) -> T:
    if not isinstance(name, str) or name not in self._entries:
      raise ValueError(
          f"unknown {self.concept} {name!r}; valid names: {', '.join(self.names())}")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())
