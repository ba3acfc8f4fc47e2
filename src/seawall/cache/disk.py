"""A directory store bounded in bytes that survives restarts and crashes.

Each entry is ONE file: the body, then the JSON metadata, then a 24-byte trailer
(body length, metadata length, magic). A write goes to ``tmp/*.part``, is fsynced and
renamed into place, so a reader sees either the old entry or the whole new one; a crash
mid-write leaves only a ``.part`` file, which is never read and is deleted on start.
A file with a bad trailer is deleted and counted. Its calls block on the disk
(``blocking = True``): the async faces run them in worker threads, in blocks of about
1 MiB, so the event loop never waits on the disk. A full disk or an unwritable directory
disables writes (with an event) and reads go on; writes are tried again after
``retry_writes_after`` seconds. ``root`` may start with ``~`` (the user's home).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from seawall.cache.store import (
    CacheEvicted,
    CacheWritesDisabled,
    Meta,
    Reader,
    Store,
    StoreStats,
    Writer,
)
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, EventBus

__all__ = ["DiskStore"]

fcntl: ModuleType | None
try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

_MAGIC = b"SEAWALL1"
_TRAILER = struct.Struct(">QQ8s")
_BLOCK = 1024 * 1024


def _lock(f: IO[bytes], *, shared: bool) -> None:
    """An advisory lock on an entry file until it is closed (threads and processes that
    share the directory); a no-op where the platform has no ``fcntl``."""
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)


class DiskStore(Store):
    """Entries as files under ``root/<namespace>/``; an in-memory LRU index of sizes."""

    blocking = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int = 10 * 1024 * 1024 * 1024,
        *,
        namespace: str = "seawall",
        retry_writes_after: float = 60.0,
        fsync: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.namespace = namespace
        self.stats = StoreStats()
        self.dir = Path(root).expanduser() / namespace
        self.tmp = self.dir / "tmp"
        self.retry_writes_after = retry_writes_after
        self.fsync = fsync
        self._clock = clock
        self._bus = events or DEFAULT_BUS
        self._lock = threading.Lock()  # guards the index; loop-agnostic on purpose
        self._start_lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> size, LRU order
        self._size = 0
        self._ready = False
        self._disabled_at: float | None = None
        self.last_error: str | None = None

    # -- start-up -----------------------------------------------------------------------

    def _ensure_ready(self) -> None:
        """Scan the directory once: delete partial files, index entries. An error that
        makes the directory unwritable disables writes; reading what is there goes on."""
        if self._ready:
            return
        with self._start_lock:
            if self._ready:
                return
            error = self._scan_sync()
            self._ready = True
        if error is not None:
            self._disable(error)

    def _scan_sync(self) -> OSError | None:
        error: OSError | None = None
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            for part in self.tmp.iterdir():
                with contextlib.suppress(OSError):
                    part.unlink()
            if not os.access(self.tmp, os.W_OK):
                raise PermissionError(errno.EACCES, "directory is not writable", str(self.tmp))
        except OSError as exc:
            error = exc
        found: list[tuple[float, str, int]] = []
        try:
            for sub in self.dir.iterdir():
                if sub.name == "tmp" or not sub.is_dir():
                    continue
                for f in sub.iterdir():
                    if f.suffix == ".entry":
                        st = f.stat()
                        found.append((st.st_mtime, f.name, st.st_size))
        except OSError as exc:
            self.last_error = str(exc)
        found.sort()
        with self._lock:
            for _, name, size in found:
                self._index[name] = size
                self._size += size
        self._evict_sync()  # a smaller max_bytes than last time: trim quietly at start
        return error

    # -- paths and index ----------------------------------------------------------------

    @staticmethod
    def _name(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest() + ".entry"

    def _path(self, name: str) -> Path:
        return self.dir / name[:2] / name

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def writable(self) -> bool:
        if self._disabled_at is None:
            return True
        if self._clock.now() - self._disabled_at >= self.retry_writes_after:
            self._disabled_at = None  # try again; the next failure disables once more
            return True
        return False

    def _disable(self, exc: BaseException) -> None:
        self.stats.write_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        first = self._disabled_at is None
        self._disabled_at = self._clock.now()
        if first and self._bus.active:
            self._bus.emit(
                CacheWritesDisabled(
                    at=self._clock.now(), store=str(self.dir), error=self.last_error
                )
            )

    def _evict_sync(self) -> list[tuple[str, int]]:
        """Delete least-recently-used files until within bounds; returns what went."""
        gone: list[tuple[str, int]] = []
        while True:
            with self._lock:
                if self._size <= self.max_bytes or not self._index:
                    return gone
                name, size = self._index.popitem(last=False)
                self._size -= size
                self.stats.evictions += 1
            with contextlib.suppress(OSError):
                self._path(name).unlink()
            gone.append((name, size))

    def _report_evictions(self, gone: list[tuple[str, int]]) -> None:
        if gone and self._bus.active:
            for name, size in gone:
                self._bus.emit(
                    CacheEvicted(at=self._clock.now(), store=str(self.dir), key=name, size=size)
                )

    def _forget(self, name: str) -> None:
        with self._lock:
            size = self._index.pop(name, None)
            if size is not None:
                self._size -= size

    # -- reading ------------------------------------------------------------------------

    def _read_meta_sync(self, name: str, key: str | None = None) -> tuple[Meta, int] | None:
        """The entry's metadata and body length; with ``key``, only if the file is that
        key's (a file copied under another key's name is corrupt, never served)."""
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                _lock(f, shared=True)  # replace_meta rewrites the tail in place
                end = f.seek(0, os.SEEK_END)
                if end < _TRAILER.size:
                    raise ValueError("too short")
                f.seek(end - _TRAILER.size)
                body_len, meta_len, magic = _TRAILER.unpack(f.read(_TRAILER.size))
                if magic != _MAGIC or body_len + meta_len + _TRAILER.size != end:
                    raise ValueError("bad trailer")
                f.seek(body_len)
                doc = json.loads(f.read(meta_len))
                meta = doc["meta"]
                if not isinstance(meta, dict):
                    raise ValueError("bad metadata")
                if key is not None and doc.get("key") != key:
                    raise ValueError("the file holds another key's entry")
                return meta, body_len
        except FileNotFoundError:
            self._forget(name)
            return None
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
            self.stats.corrupt += 1
            self._forget(name)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def open_reader(self, key: str) -> Reader | None:
        self._ensure_ready()
        name = self._name(key)
        with self._lock:
            if name not in self._index:
                return None
            self._index.move_to_end(name)
        found = self._read_meta_sync(name, key)
        if found is None:
            return None
        meta, body_len = found
        return meta, self._iterate(name, body_len)

    def _iterate(self, name: str, body_len: int) -> Iterator[bytes]:
        """The body in blocks of up to 1 MiB: each block is one blocking read."""
        f: IO[bytes] = open(self._path(name), "rb")  # noqa: SIM115 - closed below
        try:
            left = body_len
            while left > 0:
                block = f.read(min(_BLOCK, left))
                if not block:
                    raise OSError(f"cache entry {name} ended early")
                left -= len(block)
                yield block
        finally:
            f.close()

    def delete(self, key: str) -> None:
        self._ensure_ready()
        name = self._name(key)
        self._forget(name)
        self._unlink(self._path(name))

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def keys(self) -> list[str]:
        self._ensure_ready()
        with self._lock:
            names = list(self._index)
        out: list[str] = []
        for name in names:
            doc = self._read_key_sync(name)
            if doc is not None:
                out.append(doc)
        return out

    def _read_key_sync(self, name: str) -> str | None:
        found = self._read_meta_sync(name)
        if found is None:
            return None
        with open(self._path(name), "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(end - _TRAILER.size)
            body_len, meta_len, _ = _TRAILER.unpack(f.read(_TRAILER.size))
            f.seek(body_len)
            key: Any = json.loads(f.read(meta_len)).get("key")
        return key if isinstance(key, str) else None

    # -- writing ------------------------------------------------------------------------

    def open_writer(self, key: str) -> Writer:
        self._ensure_ready()
        return _DiskWriter(self, key)

    def has(self, key: str) -> bool:
        return self._ready and self._name(key) in self._index

    def read_meta(self, key: str) -> Meta | None:
        self._ensure_ready()
        name = self._name(key)
        if name not in self._index:
            return None
        found = self._read_meta_sync(name, key)
        return found[0] if found is not None else None

    def replace_meta(self, key: str, meta: Meta) -> bool:
        """Rewrite the metadata and trailer after the body, in place: a torn write leaves a
        bad trailer, which is read as a corrupt entry and dropped, never served."""
        self._ensure_ready()
        name = self._name(key)
        if name not in self._index or not self.writable:
            return False
        found = self._read_meta_sync(name, key)
        if found is None:
            return False
        body_len = found[1]
        meta_bytes = json.dumps({"key": key, "meta": meta}, separators=(",", ":")).encode()
        try:
            with open(self._path(name), "r+b") as f:
                _lock(f, shared=False)  # readers of the tail wait for the whole of it
                f.seek(body_len)
                f.write(meta_bytes)
                f.write(_TRAILER.pack(body_len, len(meta_bytes), _MAGIC))
                f.truncate()
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
        except OSError as exc:
            self._disable(exc)
            return False
        total = body_len + len(meta_bytes) + _TRAILER.size
        with self._lock:
            old = self._index.pop(name, None)
            if old is not None:
                self._size -= old
            self._index[name] = total
            self._size += total
        return True


class _DiskWriter(Writer):
    def __init__(self, store: DiskStore, key: str) -> None:
        self._store = store
        self._key = key
        self._name = store._name(key)
        self._file: IO[bytes] | None = None
        self._tmp: Path | None = None
        self._buf: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._failed = not store.writable
        self._done = False

    def _fail(self, exc: BaseException | None) -> None:
        self._failed = True
        self._buf = []
        self._buffered = 0
        if exc is not None:
            self._store._disable(exc)

    def _cleanup_sync(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tmp = None

    def _flush_sync(self, blocks: list[bytes]) -> None:
        if self._file is None:
            self._tmp = self._store.tmp / f"{self._name}.{secrets.token_hex(6)}.part"
            self._file = open(self._tmp, "xb")  # noqa: SIM115 - closed in commit/abort
        for block in blocks:
            self._file.write(block)

    def flush(self) -> None:
        if self._failed:
            self._cleanup_sync()  # cannot fit, or the disk failed: keep no partial file
            return
        blocks, self._buf, self._buffered = self._buf, [], 0
        try:
            self._flush_sync(blocks)
        except OSError as exc:
            self._fail(exc)
            self._cleanup_sync()

    def write(self, chunk: bytes) -> bool:
        if self._failed or self._done or not chunk:
            return False
        self._size += len(chunk)
        if self._size > self._store.max_bytes:
            self._fail(None)  # cannot fit: stop buffering now; flush() removes the file
            return self._file is not None
        self._buf.append(bytes(chunk))
        self._buffered += len(chunk)
        return self._buffered >= _BLOCK

    def _commit_sync(self, meta_bytes: bytes) -> int:
        assert self._file is not None and self._tmp is not None
        self._file.write(meta_bytes)
        self._file.write(_TRAILER.pack(self._size, len(meta_bytes), _MAGIC))
        self._file.flush()
        if self._store.fsync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._store._path(self._name)
        final.parent.mkdir(exist_ok=True)
        os.replace(self._tmp, final)
        self._tmp = None
        if self._store.fsync:
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return self._size + len(meta_bytes) + _TRAILER.size

    def commit(self, meta: Meta) -> bool:
        if self._done:
            return False
        self._done = True
        store = self._store
        if self._failed:
            store.stats.aborts += 1
            self._cleanup_sync()
            return False
        meta_bytes = json.dumps({"key": self._key, "meta": meta}, separators=(",", ":")).encode()
        try:
            self._flush_sync(self._buf)
            self._buf = []
            total = self._commit_sync(meta_bytes)
        except OSError as exc:
            self._fail(exc)
            store.stats.aborts += 1
            self._cleanup_sync()
            return False
        with store._lock:
            old = store._index.pop(self._name, None)
            if old is not None:
                store._size -= old
            store._index[self._name] = total
            store._size += total
        store.stats.commits += 1
        store._report_evictions(store._evict_sync())
        return True

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buf = []
        self._store.stats.aborts += 1
        self._cleanup_sync()
