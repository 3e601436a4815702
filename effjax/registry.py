"""A name -> implementation registry for families of alternatives (mixers, optimizers, ...)."""

from __future__ import annotations

import difflib
from typing import Callable, TypeVar

T = TypeVar('T')


class Registry:
  """Name -> class, with an error that lists what exists (and the closest name) on a miss."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, type] = {}

  def register(self, name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} is registered twice')
      self._entries[name] = cls
      return cls
    return add

  def get(self, name: str) -> type:
    if name not in self._entries:
      close = difflib.get_close_matches(name, self._entries, n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise KeyError(f'unknown {self.kind} {name!r}{hint}; registered: {", ".join(sorted(self))}')
    return self._entries[name]

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self):
    return iter(self._entries)
