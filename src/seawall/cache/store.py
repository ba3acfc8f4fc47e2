"""The store interface behind the fallback cache.

Bounded in bytes, with namespaced string keys and streaming in both directions, so a
memory LRU, a disk directory and (later) a Redis metadata store fit behind it and no face
ever holds a whole blob. Metadata is a JSON-friendly dict; the store never interprets it.
A writer never raises on store trouble (full disk, capacity): the entry is simply not
kept, because the request it rides on must not fail for the cache's sake.

The interface is synchronous, one implementation for both colours of face: a store whose
calls may wait on a disk or a network says so with ``blocking = True``, and the async
cache I/O (``seawall/cache/_async/io.py``) then runs those calls in worker threads, so the
event loop never waits; a memory store is called directly. Stores are thread-safe: a sync
face may be used from many threads. Events may be emitted from those worker threads.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
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
Reader = tuple[Meta, Iterator[bytes]]


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
    def write(self, chunk: bytes) -> bool:
        """Append ``chunk`` without blocking; never raises for store trouble (the entry is
        dropped instead). True when enough is buffered that :meth:`flush` should run."""

    def flush(self) -> None:  # noqa: B027 - a store that never buffers has nothing to do
        """Write what is buffered (may block on a blocking store)."""

    @abc.abstractmethod
    def commit(self, meta: Meta) -> bool:
        """Make the entry visible atomically; False when it was dropped. May block."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Forget everything written; nothing becomes visible. Idempotent. May block."""


class Store(abc.ABC):
    """Bytes-bounded key/value store of (meta, streamed body) entries."""

    max_bytes: int
    namespace: str
    stats: StoreStats
    blocking: bool = False
    """True when calls may wait on a disk or a network (run off the event loop)."""
    trusted_bytes: bool = False
    """True when a committed body cannot change afterwards (bytes held by this process):
    it was verified when committed, so reads need not hash it again."""

    @abc.abstractmethod
    def open_writer(self, key: str) -> Writer:
        """Start writing ``key``; the old entry stays readable until commit."""

    @abc.abstractmethod
    def open_reader(self, key: str) -> Reader | None:
        """``(meta, chunks)`` of a committed entry, or None. Each chunk read may block."""

    def has(self, key: str) -> bool:
        """Whether ``key`` is committed, answered without blocking (False when unsure)."""
        return False

    def read_meta(self, key: str) -> Meta | None:
        """The metadata of a committed entry, without its body. May block."""
        found = self.open_reader(key)
        if found is None:
            return None
        meta, chunks = found
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        return meta

    def replace_meta(self, key: str, meta: Meta) -> bool:
        """Replace an entry's metadata and keep its body (a refresh that changes no byte);
        False when the store cannot, and the entry must be written again. May block."""
        return False

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if present."""

    @abc.abstractmethod
    def keys(self) -> list[str]:
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

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default store holds none."""
