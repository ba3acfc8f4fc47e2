"""The default store: an in-memory LRU bounded in bytes.

Small enough to be safe with no configuration: entries larger than ``max_entry_bytes``
stream through uncached (their buffered chunks are dropped as soon as the bound is
crossed), and committing evicts least-recently-used entries until the total fits.
Nothing here ever waits (``blocking = False``): the async faces call it directly. One
lock makes it safe for sync faces used from many threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from seawall.cache.store import CacheEvicted, Meta, Reader, Store, StoreStats, Writer
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, EventBus

__all__ = ["MemoryStore"]

_META_OVERHEAD = 512  # rough cost of headers and bookkeeping per entry


class _Entry:
    __slots__ = ("chunks", "meta", "size")

    def __init__(self, meta: Meta, chunks: tuple[bytes, ...], size: int) -> None:
        self.meta = meta
        self.chunks = chunks
        self.size = size


class MemoryStore(Store):
    """LRU of whole entries kept as the chunks they arrived in."""

    def __init__(
        self,
        max_bytes: int = 256 * 1024 * 1024,
        *,
        max_entry_bytes: int | None = None,
        namespace: str = "seawall",
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self._max_entry_bytes = min(max_entry_bytes or max_bytes, max_bytes)
        self.namespace = namespace
        self.stats = StoreStats()
        self._clock = clock
        self._bus = events or DEFAULT_BUS
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def _k(self, key: str) -> str:
        return f"{self.namespace}:{key}"

    @property
    def max_entry_bytes(self) -> int:
        return self._max_entry_bytes

    @property
    def size_bytes(self) -> int:
        return self._size

    trusted_bytes = True  # immutable bytes objects, verified when committed

    def open_writer(self, key: str) -> Writer:
        return _MemoryWriter(self, self._k(key))

    def has(self, key: str) -> bool:
        return self._k(key) in self._entries

    def read_meta(self, key: str) -> Meta | None:
        entry = self._entries.get(self._k(key))
        return dict(entry.meta) if entry is not None else None

    def replace_meta(self, key: str, meta: Meta) -> bool:
        with self._lock:
            entry = self._entries.get(self._k(key))
            if entry is None:
                return False
            entry.meta = dict(meta)
            return True

    def open_reader(self, key: str) -> Reader | None:
        full = self._k(key)
        with self._lock:
            entry = self._entries.get(full)
            if entry is None:
                return None
            self._entries.move_to_end(full)
        return dict(entry.meta), iter(entry.chunks)

    def delete(self, key: str) -> None:
        with self._lock:
            self._remove(self._k(key))

    def keys(self) -> list[str]:
        prefix = f"{self.namespace}:"
        with self._lock:
            return [k[len(prefix) :] for k in self._entries if k.startswith(prefix)]

    def _remove(self, full_key: str) -> _Entry | None:
        entry = self._entries.pop(full_key, None)
        if entry is not None:
            self._size -= entry.size
        return entry

    def _commit(self, full_key: str, meta: Meta, chunks: list[bytes], body_size: int) -> bool:
        size = body_size + _META_OVERHEAD
        if size > self.max_bytes:
            return False
        evicted: list[tuple[str, _Entry]] = []
        with self._lock:
            self._remove(full_key)
            while self._entries and self._size + size > self.max_bytes:
                old_key, old = self._entries.popitem(last=False)
                self._size -= old.size
                self.stats.evictions += 1
                evicted.append((old_key, old))
            self._entries[full_key] = _Entry(dict(meta), tuple(chunks), size)
            self._size += size
            self.stats.commits += 1
        if evicted and self._bus.active:
            for old_key, old in evicted:
                self._bus.emit(
                    CacheEvicted(at=self._clock.now(), store="memory", key=old_key, size=old.size)
                )
        return True


class _MemoryWriter(Writer):
    __slots__ = ("_chunks", "_done", "_key", "_overflow", "_size", "_store")

    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store = store
        self._key = key
        self._chunks: list[bytes] = []
        self._size = 0
        self._overflow = False
        self._done = False

    def write(self, chunk: bytes) -> bool:
        if self._overflow or self._done or not chunk:
            return False
        self._size += len(chunk)
        if self._size > self._store.max_entry_bytes:
            self._overflow = True  # too big to keep: stop holding it in memory now
            self._chunks.clear()
            return False
        self._chunks.append(bytes(chunk))
        return False

    def commit(self, meta: Meta) -> bool:
        if self._done:
            return False
        self._done = True
        if self._overflow:
            self._store.stats.aborts += 1
            return False
        ok = self._store._commit(self._key, meta, self._chunks, self._size)
        self._chunks = []
        if not ok:
            self._store.stats.aborts += 1
        return ok

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._chunks = []
            self._store.stats.aborts += 1
