"""The store interface behind the fallback cache.

Async, bounded in bytes, with namespaced string keys and streaming in both directions,
so a memory LRU, a disk directory and (later) a Redis metadata store fit behind it and
no face ever holds a whole blob. Metadata is a JSON-friendly dict; the store never
interprets it. A writer never raises on store trouble (full disk, capacity): the entry
is simply not kept, because the request it rides on must not fail for the cache's sake.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar

from seawall.events import Event

__all__ = [
    "CacheEvicted",
    "CacheWritesDisabled",
    "Meta",
    "Reader",
    "Store",
    "StoreStats",
    "Writer",
]

Meta = dict[str, Any]
Reader = tuple[Meta, AsyncIterator[bytes]]


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheWritesDisabled(Event):
    """The store stopped accepting writes (full disk, unwritable directory); reads go on."""

    name: ClassVar[str] = "cache.writes_disabled"
    store: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheEvicted(Event):
    """An entry left the store to keep it within its byte bound."""

    name: ClassVar[str] = "cache.evicted"
    store: str
    key: str
    size: int


@dataclass(slots=True)
class StoreStats:
    """Counters every store keeps (plain ints: cheap, and readable in tests)."""

    commits: int = 0
    aborts: int = 0
    evictions: int = 0
    write_errors: int = 0
    corrupt: int = 0


class Writer(abc.ABC):
    """One streaming write: ``write`` chunks, then ``commit`` or ``abort`` exactly once."""

    @abc.abstractmethod
    async def write(self, chunk: bytes) -> None:
        """Append ``chunk``; never raises for store trouble (the entry is dropped instead)."""

    @abc.abstractmethod
    async def commit(self, meta: Meta) -> bool:
        """Make the entry visible atomically; False when it was dropped."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Forget everything written; nothing becomes visible. Idempotent."""


class Store(abc.ABC):
    """Bytes-bounded async key/value store of (meta, streamed body) entries."""

    max_bytes: int
    namespace: str
    stats: StoreStats

    @abc.abstractmethod
    async def open_writer(self, key: str) -> Writer:
        """Start writing ``key``; the old entry stays readable until commit."""

    @abc.abstractmethod
    async def open_reader(self, key: str) -> Reader | None:
        """``(meta, chunks)`` of a committed entry, or None. Holds no resource until iterated."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    @abc.abstractmethod
    async def keys(self) -> list[str]:
        """Committed keys of this namespace (tests and tooling; may be slow)."""

    @property
    @abc.abstractmethod
    def size_bytes(self) -> int:
        """Bytes currently held by committed entries."""

    @property
    def max_entry_bytes(self) -> int:
        """Largest body worth starting to record (a declared Content-Length above it is skipped)."""
        return self.max_bytes

    @property
    def writable(self) -> bool:
        """False once writes were disabled (full disk...); reads keep working."""
        return True

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default store holds none."""
