"""One bounded, thread-safe map of per-key state (per host, per client): least recently
used keys are forgotten first, so a crawler of many hosts cannot grow it without bound."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedMap"]

K = TypeVar("K")
V = TypeVar("V")


class BoundedMap(Generic[K, V]):
    """``get(key)`` returns the key's value, made by ``factory(key)`` on first use."""

    __slots__ = ("_data", "_factory", "_lock", "_max")

    def __init__(self, factory: Callable[[K], V], max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1: {max_size!r}")
        self._data: OrderedDict[K, V] = OrderedDict()
        self._factory = factory
        self._max = max_size
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                value = self._data[key] = self._factory(key)
                if len(self._data) > self._max:
                    self._data.popitem(last=False)
            else:
                self._data.move_to_end(key)
            return value

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
