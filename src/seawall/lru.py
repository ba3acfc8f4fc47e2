"""Bounded maps of per-key state.

:class:`BoundedMap` is one thread-safe map of per-key state (per host, per client): least
recently used keys are forgotten first, so a crawler of many hosts cannot grow it without
bound. State that is in use (a bulkhead with slots taken, a pacer with slots reserved) is
never forgotten: forgetting it would hand out a fresh one and break the limit it keeps.

:func:`remember` is the memo of a pure function on a hot path (a request line's class, a
client address's key): a full memo starts over, which costs one recomputation per entry
and keeps a flood of distinct inputs from growing it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["BoundedMap", "remember"]

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], key: K, value: V, max_size: int) -> V:
    """Store ``value`` under ``key`` in a memo of at most ``max_size`` entries; returns it.

    Starting over when full (not LRU) keeps the hit path a plain ``dict.get`` with no
    bookkeeping. The GIL makes the clear and the store safe from threads; a lost entry is
    only recomputed.
    """
    if len(memo) >= max_size:
        memo.clear()
    memo[key] = value
    return value


class BoundedMap(Generic[K, V]):
    """``get(key)`` returns the key's value, made by ``factory(key)`` on first use."""

    __slots__ = ("_busy", "_data", "_factory", "_lock", "_max")

    _SCAN = 64  # how many of the oldest entries to try before keeping one over the bound

    def __init__(
        self,
        factory: Callable[[K], V],
        max_size: int,
        busy: Callable[[V], bool] | None = None,
    ) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be at least 1: {max_size!r}")
        self._data: OrderedDict[K, V] = OrderedDict()
        self._factory = factory
        self._max = max_size
        self._busy = busy
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                value = self._data[key] = self._factory(key)
                if len(self._data) > self._max:
                    self._forget_one(key)
            else:
                self._data.move_to_end(key)
            return value

    def _forget_one(self, newest: K) -> None:
        busy = self._busy
        for i, (key, value) in enumerate(self._data.items()):
            if i >= self._SCAN or key == newest:
                return  # everything old is in use: over the bound until some is free
            if busy is None or not busy(value):
                del self._data[key]
                return

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
