# Generated from src/seawall/cache/_async/io.py by scripts/generate_sync.py: do not edit.
"""The fallback cache's I/O, written once: this async source is the only one kept by hand.

``seawall/cache/_sync/io.py`` is generated from it by ``scripts/generate_sync.py`` (``make
test`` checks that the copy is current). Store calls that may block go through
``async_offload``: in a worker thread for a blocking store (disk), directly for a memory
store; the sync copy always calls directly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Generator, Iterator, Iterator, Sequence

from seawall.cache.fallback import (
    CacheCorruptError,
    FallbackCache,
    Hit,
    Recording,
    vary_index_meta,
)
from seawall.cache.keys import RequestInfo, RequestKey, variant_key, vary_values
from seawall.cache.store import Writer
from seawall.concurrency import sync_offload

__all__ = ["SyncCacheIO", "SyncCacheRecorder"]


def _next_block(chunks: Iterator[bytes]) -> bytes | None:
    return next(chunks, None)


class SyncCacheIO:
    """Reads, verifies and records entries of one :class:`FallbackCache`."""

    __slots__ = ("_blocking", "cache")

    def __init__(self, cache: FallbackCache) -> None:
        self.cache = cache
        self._blocking = cache.store.blocking

    def _chunks(self, chunks: Iterator[bytes]) -> Generator[bytes, None]:
        """A stored body, each block read where the store's reads belong."""
        try:
            while True:
                block = sync_offload(self._blocking, _next_block, chunks)
                if block is None:
                    return
                yield block
        finally:
            self._close(chunks)

    def _close(self, chunks: Iterator[bytes]) -> None:
        """Give back a stored body's reader (a user's store may hold a file or connection)."""
        close = getattr(chunks, "close", None)
        if close is not None:
            sync_offload(self._blocking, close)

    # -- reading ------------------------------------------------------------------------

    def lookup(self, request: RequestInfo, rk: RequestKey | None = None) -> Hit | None:
        """The verified stored response for ``request``, or None (counted as a miss);
        ``rk`` is its key when the caller already has it."""
        if request.method.upper() not in ("GET", "HEAD"):
            return None
        cache = self.cache
        store = cache.store
        if rk is None:
            rk = cache.key(request)
        if not rk.cacheable:  # never stored, so never served
            cache.stats.misses += 1
            return None
        key = rk.base
        reader = sync_offload(self._blocking, store.open_reader, key)
        if reader is not None and "vary_index" in reader[0]:
            names = tuple(str(n) for n in reader[0]["vary_index"])
            self._close(reader[1])  # an index has no body worth reading
            key = variant_key(rk.base, vary_values(request, names))
            reader = sync_offload(self._blocking, store.open_reader, key)
        if reader is None:
            cache.stats.misses += 1
            return None
        meta, chunks = reader
        hit = cache.hit_from_meta(key, rk, meta)
        if hit is None:
            self._close(chunks)
            self._corrupt(key, rk.url, "unreadable metadata")
            return None
        if store.trusted_bytes:
            self._close(chunks)
            return hit  # verified when committed, and they cannot change since
        problem = self._verify(hit, chunks)
        if problem is not None:
            self._corrupt(key, rk.url, problem)
            return None
        return hit

    def _verify(self, hit: Hit, chunks: Iterator[bytes]) -> str | None:
        h = self.cache.hasher(hit.content_hash)
        size = 0
        try:
            for chunk in self._chunks(chunks):
                h.update(chunk)
                size += len(chunk)
        except OSError as exc:
            return f"unreadable body: {exc}"
        if size != hit.size:
            return f"size {size} != recorded {hit.size}"
        if f"{h.name}:{h.hexdigest()}" != hit.content_hash:
            return "digest mismatch" if hit.digest else "content hash mismatch"
        return None

    def _corrupt(self, key: str, url: str, reason: str) -> None:
        sync_offload(self._blocking, self.cache.store.delete, key)
        self.cache.corrupt(url, reason)

    def body(self, hit: Hit) -> Iterator[bytes]:
        """Stream the stored body, checking its hash again as it goes.

        Raises :class:`CacheCorruptError` before the first byte when the entry is gone or
        was replaced since ``hit`` was looked up (its bytes would not match the headers
        already chosen): a face pulls the first chunk before it answers.
        """
        cache = self.cache
        reader = sync_offload(self._blocking, cache.store.open_reader, hit.key)
        if reader is None:
            raise CacheCorruptError(f"cache entry for {hit.url} disappeared")
        meta, chunks = reader
        if meta.get("hash") != hit.content_hash or meta.get("size") != hit.size:
            self._close(chunks)
            raise CacheCorruptError(f"cache entry for {hit.url} was replaced since its lookup")
        # closed on leaving: a caller that stops reading early closes the reader now, not at the
        # garbage collector's next pass
        if cache.store.trusted_bytes:
            with contextlib.closing(self._chunks(chunks)) as blocks:
                for chunk in blocks:
                    yield chunk
            return
        h = cache.hasher(hit.content_hash)
        size = 0
        with contextlib.closing(self._chunks(chunks)) as blocks:
            for chunk in blocks:
                h.update(chunk)
                size += len(chunk)
                yield chunk
        if size != hit.size or f"{h.name}:{h.hexdigest()}" != hit.content_hash:
            self._corrupt(hit.key, hit.url, "changed while served")
            raise CacheCorruptError(f"cache entry for {hit.url} changed while served")

    # -- writing ------------------------------------------------------------------------

    def recorder(
        self,
        request: RequestInfo,
        status: int,
        headers: Sequence[tuple[str, str]],
        rk: RequestKey | None = None,
    ) -> SyncCacheRecorder | None:
        """A tee for this response, or None when it must not (or need not) be stored."""
        cache = self.cache
        recording = cache.plan_recording(request, status, headers, rk)
        if recording is None:
            return None
        store = cache.store
        try:
            stored = sync_offload(self._blocking, store.read_meta, recording.key)
            fresh = cache.unchanged(recording, stored)
            if fresh is not None and sync_offload(
                self._blocking, store.replace_meta, recording.key, fresh
            ):
                cache.release(recording.key)
                cache.stats.revalidated += 1  # same validators: new freshness, no byte copied
                return None
            writer = sync_offload(self._blocking, store.open_writer, recording.key)
        except Exception:
            cache.release(recording.key)
            return None
        return SyncCacheRecorder(self, recording, writer)

    def refresh(self, hit: Hit, headers: Sequence[tuple[str, str]]) -> Hit:
        """Apply a 304 Not Modified: new freshness, same (verified) body, rewritten."""
        cache = self.cache
        fresh = cache.refreshed(hit, headers)
        store = cache.store
        if store.writable and cache.claim(hit.key):
            try:  # never raise for the cache's sake: the caller gets the fresh hit anyway
                if not sync_offload(self._blocking, store.replace_meta, hit.key, fresh.meta):
                    self._rewrite(hit, fresh)  # a store that cannot: copy the body
            except Exception:
                pass
            finally:
                cache.release(hit.key)
        return fresh

    def _rewrite(self, hit: Hit, fresh: Hit) -> None:
        writer = sync_offload(self._blocking, self.cache.store.open_writer, hit.key)
        try:
            for chunk in self.body(hit):
                if writer.write(chunk):
                    sync_offload(self._blocking, writer.flush)
        except BaseException:
            sync_offload(self._blocking, writer.abort)
            raise
        sync_offload(self._blocking, writer.commit, fresh.meta)


class SyncCacheRecorder:
    """The tee of one response into the store: ``feed`` chunks, then ``finish``/``abort``.

    Never raises for the cache's sake: store trouble only means the entry is not kept.
    """

    __slots__ = ("_done", "_hash", "_io", "_recording", "_size", "_writer")

    def __init__(self, io: SyncCacheIO, recording: Recording, writer: Writer) -> None:
        self._io = io
        self._recording = recording
        self._writer = writer
        self._hash = hashlib.new(recording.algorithm)
        self._size = 0
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, chunk: bytes) -> None:
        if self._done or not chunk:
            return
        self._hash.update(chunk)
        self._size += len(chunk)
        try:
            if self._writer.write(chunk):
                sync_offload(self._io._blocking, self._writer.flush)
        except Exception:
            self.abort()

    def finish(self) -> bool:
        """Commit if the body is complete and verified; True when the entry was kept."""
        if self._done:
            return False
        io = self._io
        cache = io.cache
        rec = self._recording
        try:
            actual = f"{self._hash.name}:{self._hash.hexdigest()}"
            reason = cache.judge_recording(rec, self._size, actual)
            if reason is not None:
                cache.rejected(rec.rk.url, reason)
                with contextlib.suppress(Exception):
                    sync_offload(io._blocking, self._writer.abort)
                return False
            try:  # never raise for the cache's sake: the caller's body is already read
                meta = cache.meta_for(rec.rk, rec.status, rec.headers, rec.vary, self._size, actual)
                ok = sync_offload(io._blocking, self._writer.commit, meta)
                if ok and rec.vary:
                    index = sync_offload(io._blocking, cache.store.open_writer, rec.rk.base)
                    sync_offload(io._blocking, index.commit, vary_index_meta(rec.vary))
            except Exception:
                with contextlib.suppress(Exception):
                    sync_offload(io._blocking, self._writer.abort)
                return False
            if ok:
                cache.stored(rec.rk.url, self._size, rec.rk.digest)
            return bool(ok)
        finally:
            self._done = True
            cache.release(rec.key)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._io.cache.release(self._recording.key)
        with contextlib.suppress(Exception):  # the store's trouble is not the caller's
            sync_offload(self._io._blocking, self._writer.abort)
