"""The fallback cache's I/O against a store written to the Store interface, as a user would.

A blocking store (disk, network) is never called on the event loop thread; every reader
the cache opens is closed; a writer is committed or aborted once and never used after;
a recording or a refresh never raises for the store's sake; misses, corrupt entries,
rejected and stored recordings are counted and announced with the URL and the reason.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from seawall.cache import CacheCorrupt, FallbackCache, MemoryStore, RequestInfo
from seawall.cache.fallback import CacheCorruptError, CacheRejected, CacheStored, Hit
from seawall.cache.store import Meta, Reader, Store, StoreStats, Writer
from seawall.clock import ManualClock
from seawall.events import Event, EventBus

PAGE = "https://r/simple/demo/"
BODY = b"<a href=demo-1.0.tar.gz>demo</a>" * 40
ETAG = [("etag", '"v1"'), ("cache-control", "max-age=60")]


class SpyChunks:
    """A stored body as a reader hands it out: one block per ``next``, with ``close``."""

    def __init__(self, store: SpyStore, blocks: list[bytes]) -> None:
        self._store = store
        self._blocks = iter(list(blocks))
        self.started = False
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        self.started = True
        self._store.call("read")
        return next(self._blocks)

    def close(self) -> None:
        self._store.call("close")
        self.closed = True


class SpyWriter(Writer):
    def __init__(self, store: SpyStore, key: str) -> None:
        self._store = store
        self.key = key
        self.blocks: list[bytes] = []
        self.state = "open"  # then "committed" or "aborted"
        self.flushes = 0

    def _use(self, what: str) -> None:
        if self.state != "open":
            self._store.misuse.append(f"{what} after {self.state}")

    def write(self, chunk: bytes) -> bool:
        self._use("write")  # never blocks: called right on the loop
        self.blocks.append(bytes(chunk))
        return self._store.flush_every_write

    def flush(self) -> None:
        self._use("flush")
        self._store.call("flush")
        self.flushes += 1

    def commit(self, meta: Meta) -> bool:
        self._use("commit")
        self._store.call("commit")
        self.state = "committed"
        self._store.entries[self.key] = (dict(meta), list(self.blocks))
        return True

    def abort(self) -> None:
        if self.state == "committed":
            self._store.misuse.append("abort after committed")
        self.state = "aborted"
        self._store.call("abort")


class SpyStore(Store):
    """An in-memory store that says it may block and does not trust its bytes (like a
    disk or a network store), and records how the cache uses it."""

    def __init__(self, *, blocking: bool = True, trusted: bool = False) -> None:
        self.max_bytes = 1 << 30
        self.namespace = "spy"
        self.stats = StoreStats()
        self.blocking = blocking
        self.trusted_bytes = trusted
        self.entries: dict[str, tuple[Meta, list[bytes]]] = {}
        self.can_replace_meta = True
        self.flush_every_write = False
        self.writes_enabled = True
        self.fail: set[str] = set()  # operations that raise OSError
        self.loop_thread = threading.get_ident()  # made inside the test, on the loop
        self.on_loop: list[str] = []  # blocking calls made on the event loop thread
        self.misuse: list[str] = []  # a writer used after commit or abort
        self.calls: list[str] = []
        self.readers: list[SpyChunks] = []
        self.writers: list[SpyWriter] = []

    def call(self, name: str) -> None:
        self.calls.append(name)
        if self.blocking and threading.get_ident() == self.loop_thread:
            self.on_loop.append(name)
        if name in self.fail:
            raise OSError(f"{name} failed")

    def open_writer(self, key: str) -> Writer:
        self.call("open_writer")
        writer = SpyWriter(self, key)
        self.writers.append(writer)
        return writer

    def open_reader(self, key: str) -> Reader | None:
        self.call("open_reader")
        found = self.entries.get(key)
        if found is None:
            return None
        chunks = SpyChunks(self, found[1])
        self.readers.append(chunks)
        return dict(found[0]), chunks

    def read_meta(self, key: str) -> Meta | None:
        self.call("read_meta")
        found = self.entries.get(key)
        return None if found is None else dict(found[0])

    def replace_meta(self, key: str, meta: Meta) -> bool:
        self.call("replace_meta")
        if not self.can_replace_meta or key not in self.entries:
            return False
        self.entries[key] = (dict(meta), self.entries[key][1])
        return True

    def delete(self, key: str) -> None:
        self.call("delete")
        self.entries.pop(key, None)

    def keys(self) -> list[str]:
        return list(self.entries)

    @property
    def size_bytes(self) -> int:
        return sum(sum(map(len, blocks)) for _, blocks in self.entries.values())

    @property
    def writable(self) -> bool:
        return self.writes_enabled

    def well_used(self) -> None:
        """Nothing blocking ran on the loop, every body read was closed, no writer misused."""
        assert self.on_loop == []
        assert [r.closed for r in self.readers if r.started] == [
            True for r in self.readers if r.started
        ]
        assert self.misuse == []

    def all_closed(self) -> None:
        """Every reader the cache opened was given back, read or not: a user's store may
        hold a file or a connection open until then."""
        assert [r.closed for r in self.readers] == [True] * len(self.readers)


def make(store: SpyStore) -> tuple[FallbackCache, ManualClock, list[Event]]:
    clock = ManualClock()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return FallbackCache(store, clock=clock, events=bus), clock, seen


def blob_url(body: bytes) -> str:
    return f"https://r/v2/lib/x/blobs/sha256:{hashlib.sha256(body).hexdigest()}"


async def record(
    cache: FallbackCache,
    url: str,
    body: bytes,
    headers: list[tuple[str, str]] | None = None,
    request_headers: tuple[tuple[str, str], ...] = (),
) -> bool:
    rec = await cache.recorder(RequestInfo("GET", url, request_headers), 200, headers or [])
    assert rec is not None
    for i in range(0, len(body), 500):
        await rec.feed(body[i : i + 500])
    return await rec.finish()


async def read(body: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in body])


async def stored_page(cache: FallbackCache) -> Hit:
    """The page recorded, then looked up (fresh)."""
    assert await record(cache, PAGE, BODY, ETAG)
    hit = await cache.lookup(RequestInfo("GET", PAGE))
    assert hit is not None
    return hit


def flip(store: SpyStore, key: str) -> None:
    """Bit rot in a stored body: same length, same metadata, other bytes."""
    blocks = store.entries[key][1]
    blocks[0] = bytes([blocks[0][0] ^ 0xFF]) + blocks[0][1:]


# -- reading ------------------------------------------------------------------------------


async def test_a_round_trip_through_a_blocking_store_stays_off_the_loop() -> None:
    store = SpyStore()
    store.flush_every_write = True
    cache, clock, seen = make(store)
    assert await record(cache, PAGE, BODY, ETAG)
    assert seen == [CacheStored(at=clock.now(), url=PAGE, size=len(BODY), digest=None)]
    assert store.writers[0].flushes == 3  # each fed chunk asked to be flushed
    hit = await cache.lookup(RequestInfo("GET", PAGE))
    assert hit is not None and hit.size == len(BODY)
    assert await read(cache.body(hit)) == BODY
    assert {"open_writer", "flush", "commit", "open_reader", "read", "close"} <= set(store.calls)
    assert len(store.readers) == 2  # verified at lookup, then streamed: both closed
    store.well_used()


async def test_a_stored_blob_is_announced_with_its_digest() -> None:
    store = SpyStore()
    cache, clock, seen = make(store)
    body = bytes(range(256)) * 8
    assert await record(cache, blob_url(body), body)
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    assert seen == [CacheStored(at=clock.now(), url=blob_url(body), size=len(body), digest=digest)]
    store.well_used()


async def test_a_variant_is_found_through_its_vary_index() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    headers = [*ETAG, ("vary", "Accept")]
    json, html = (("accept", "application/json"),), (("accept", "text/html"),)
    assert await record(cache, PAGE, b'{"demo": 1}', headers, json)
    assert await record(cache, PAGE, BODY, headers, html)
    for request_headers, body in ((json, b'{"demo": 1}'), (html, BODY)):
        hit = await cache.lookup(RequestInfo("GET", PAGE, request_headers))
        assert hit is not None and await read(cache.body(hit)) == body
    assert await cache.lookup(RequestInfo("GET", PAGE, (("accept", "text/plain"),))) is None
    store.well_used()


async def test_every_miss_is_counted_once() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    assert await cache.lookup(RequestInfo("GET", PAGE)) is None  # nothing stored
    assert cache.stats.misses == 1
    assert await cache.lookup(RequestInfo("GET", PAGE)) is None
    assert cache.stats.misses == 2
    unverifiable = "https://r/v2/lib/x/blobs/sha256:abc"  # a digest of the wrong length
    assert await cache.lookup(RequestInfo("GET", unverifiable)) is None
    assert cache.stats.misses == 3
    assert await cache.lookup(RequestInfo("GET", unverifiable)) is None
    assert cache.stats.misses == 4
    assert await cache.lookup(RequestInfo("POST", PAGE)) is None  # not a cache read at all
    assert cache.stats.misses == 4
    store.well_used()


async def test_unreadable_metadata_is_evicted_and_announced() -> None:
    store = SpyStore()
    cache, clock, seen = make(store)
    key = cache.key(RequestInfo("GET", PAGE)).base
    store.entries[key] = ({"v": "an older format"}, [BODY])
    assert await cache.lookup(RequestInfo("GET", PAGE)) is None
    assert key not in store.entries
    assert cache.stats.corrupt == 1
    assert seen == [CacheCorrupt(at=clock.now(), url=PAGE, reason="unreadable metadata")]
    store.well_used()


@pytest.mark.parametrize(
    ("url", "reason"),
    [(PAGE, "content hash mismatch"), (blob_url(BODY), "digest mismatch")],
)
async def test_bit_rot_is_evicted_and_named(url: str, reason: str) -> None:
    store = SpyStore()
    cache, clock, seen = make(store)
    assert await record(cache, url, BODY, ETAG)
    key = cache.key(RequestInfo("GET", url)).base
    flip(store, key)
    assert await cache.lookup(RequestInfo("GET", url)) is None
    assert key not in store.entries
    assert cache.stats.corrupt == 1
    assert seen[-1] == CacheCorrupt(at=clock.now(), url=url, reason=reason)
    store.well_used()


async def test_a_body_that_disappeared_since_its_lookup_is_not_served() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    hit = await stored_page(cache)
    store.entries.clear()  # evicted by another worker
    with pytest.raises(CacheCorruptError, match=f"entry for {PAGE} disappeared"):
        await anext(cache.body(hit))
    store.well_used()


async def test_a_body_replaced_since_its_lookup_fails_before_its_first_byte() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    hit = await stored_page(cache)
    # another worker recorded a new version of the same length: the headers chosen for
    # the old one would go out with the new bytes
    new = BODY.replace(b"demo", b"DEMO")
    assert len(new) == len(BODY) and await record(cache, PAGE, new, [("etag", '"v2"')])
    with pytest.raises(CacheCorruptError, match=f"entry for {PAGE} was replaced since its lookup"):
        await anext(cache.body(hit))
    assert b"".join(store.entries[hit.key][1]) == new  # the new version stays
    assert store.readers[-1].closed  # opened to compare, never read
    store.well_used()


async def test_a_replaced_body_is_refused_on_the_memory_store_too() -> None:
    cache = FallbackCache(MemoryStore(), clock=ManualClock())
    hit = await stored_page(cache)
    assert await record(cache, PAGE, BODY.replace(b"demo", b"DEMO"), [("etag", '"v2"')])
    with pytest.raises(CacheCorruptError, match="was replaced since its lookup"):
        await anext(cache.body(hit))  # its chunks have no close(): nothing to close


async def test_bytes_that_change_while_served_cut_the_stream_and_evict_the_entry() -> None:
    store = SpyStore()
    cache, clock, seen = make(store)
    hit = await stored_page(cache)
    flip(store, hit.key)  # bit rot between the lookup's check and the answer
    served: list[bytes] = []
    with pytest.raises(CacheCorruptError, match=f"entry for {PAGE} changed while served"):
        async for chunk in cache.body(hit):
            served.append(chunk)
    assert len(b"".join(served)) == len(BODY)  # the stream is cut at its end, not completed
    assert hit.key not in store.entries
    assert cache.stats.corrupt == 1
    assert seen[-1] == CacheCorrupt(at=clock.now(), url=PAGE, reason="changed while served")
    store.well_used()


# -- recording ------------------------------------------------------------------------------


async def test_unchanged_validators_refresh_the_entry_without_copying_a_byte() -> None:
    store = SpyStore()
    cache, clock, _ = make(store)
    assert await record(cache, PAGE, BODY, ETAG)
    clock.advance(100)  # expired (max-age=60)
    stale = await cache.lookup(RequestInfo("GET", PAGE))
    assert stale is not None and not stale.fresh
    # the same strong ETag again: new freshness, same body
    assert await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG) is None
    assert cache.stats.revalidated == 1
    assert len(store.writers) == 1  # no second copy of the body was started
    hit = await cache.lookup(RequestInfo("GET", PAGE))
    assert hit is not None and hit.fresh and hit.age == 0
    assert await read(cache.body(hit)) == BODY
    clock.advance(100)  # and again
    assert await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG) is None
    assert cache.stats.revalidated == 2
    # the key is free again: a changed response is recorded
    changed = [("etag", '"v2"'), ("cache-control", "max-age=60")]
    assert await record(cache, PAGE, b"v2", changed)
    store.well_used()


@pytest.mark.parametrize("failing", ["read_meta", "open_writer"])
async def test_a_store_that_fails_to_start_a_recording_only_skips_it(failing: str) -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    store.fail = {failing}
    assert await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG) is None
    store.fail = set()
    assert await record(cache, PAGE, BODY, ETAG)  # the key was not left claimed
    store.well_used()


async def test_a_recording_is_done_once_finished_and_its_writer_left_alone() -> None:
    store = SpyStore()
    cache, _, seen = make(store)
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG)
    assert rec is not None and rec.done is False
    await rec.feed(BODY)
    assert await rec.finish()
    assert rec.done
    assert await rec.finish() is False  # kept once
    await rec.feed(b"more")  # a face that keeps feeding after the end
    # a new recording of the same key starts; the first one's late abort is harmless
    second = await cache.recorder(RequestInfo("GET", PAGE), 200, [("etag", '"v2"')])
    assert second is not None
    await rec.abort()
    assert await cache.recorder(RequestInfo("GET", PAGE), 200, [("etag", '"v3"')]) is None
    assert cache.stats.concurrent_skipped == 1  # the second recording still holds the key
    assert store.writers[0].blocks == [BODY]
    assert [type(e) for e in seen] == [CacheStored]
    store.well_used()


async def test_an_aborted_recording_keeps_nothing_and_is_never_judged() -> None:
    store = SpyStore()
    cache, _, seen = make(store)
    headers = [*ETAG, ("content-length", str(len(BODY)))]
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, headers)
    assert rec is not None
    await rec.feed(BODY[:100])
    await rec.abort()  # the client went away
    assert rec.done
    assert store.writers[0].state == "aborted"
    await rec.abort()
    assert await rec.finish() is False
    assert seen == [] and cache.stats.rejected == 0
    assert store.calls.count("abort") == 1
    assert store.entries == {}
    store.well_used()


async def test_a_store_that_fails_to_abort_does_not_fail_the_caller() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    store.fail = {"abort"}
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG)
    assert rec is not None
    await rec.feed(BODY)
    await rec.abort()
    assert rec.done
    headers = [*ETAG, ("content-length", "10")]
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, headers)
    assert rec is not None
    await rec.feed(b"abc")
    assert await rec.finish() is False  # incomplete, and the abort fails too
    store.well_used()


async def test_an_incomplete_body_is_rejected_by_url_and_reason() -> None:
    store = SpyStore()
    cache, clock, seen = make(store)
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, [*ETAG, ("content-length", "10")])
    assert rec is not None
    await rec.feed(b"abc")
    assert await rec.finish() is False
    assert seen == [
        CacheRejected(at=clock.now(), url=PAGE, reason="incomplete body: 3 of 10 bytes")
    ]
    assert cache.stats.rejected == 1
    assert store.writers[0].state == "aborted"
    assert store.entries == {}
    store.well_used()


@pytest.mark.parametrize("abort_fails", [False, True])
async def test_a_commit_that_fails_keeps_nothing_and_raises_nothing(abort_fails: bool) -> None:
    store = SpyStore()
    cache, _, seen = make(store)
    store.fail = {"commit", "abort"} if abort_fails else {"commit"}
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, ETAG)
    assert rec is not None
    await rec.feed(BODY)
    assert await rec.finish() is False
    assert store.writers[0].state == "aborted" and store.calls.count("abort") == 1
    assert seen == [] and cache.stats.stored == 0
    store.fail = set()
    assert await record(cache, PAGE, BODY, ETAG)  # the key was released
    store.well_used()


# -- refreshing (304 Not Modified) -----------------------------------------------------------


async def stale_entry(store: SpyStore) -> tuple[FallbackCache, ManualClock, Hit]:
    """The page recorded with a 60 s max-age, looked up 100 s later: stale."""
    cache, clock, _ = make(store)
    assert await record(cache, PAGE, BODY, ETAG)
    clock.advance(100)
    stale = await cache.lookup(RequestInfo("GET", PAGE))
    assert stale is not None and not stale.fresh
    return cache, clock, stale


async def test_a_304_refreshes_the_stored_metadata_in_place() -> None:
    store = SpyStore()
    cache, _, stale = await stale_entry(store)
    fresh = await cache.refresh(stale, [("cache-control", "max-age=600")])
    assert fresh.fresh
    assert store.entries[stale.key][0] == fresh.meta
    assert len(store.writers) == 1  # no byte copied
    assert await record(cache, PAGE, b"v2", [("etag", '"v2"')])  # the key was released
    store.well_used()


async def test_a_304_on_a_store_that_cannot_replace_metadata_copies_the_body() -> None:
    store = SpyStore()
    store.can_replace_meta = False
    cache, clock, stale = await stale_entry(store)
    store.flush_every_write = True
    fresh = await cache.refresh(stale, [("cache-control", "max-age=600")])
    copy = store.writers[-1]
    assert len(store.writers) == 2 and copy.state == "committed" and copy.flushes >= 1
    assert store.entries[stale.key][0] == fresh.meta
    assert b"".join(store.entries[stale.key][1]) == BODY
    clock.advance(300)  # fresh by the 304's max-age, not by the stored 60 s
    hit = await cache.lookup(RequestInfo("GET", PAGE))
    assert hit is not None and hit.fresh and await read(cache.body(hit)) == BODY
    assert await record(cache, PAGE, b"v2", [("etag", '"v2"')])  # the key was released
    store.well_used()


async def test_a_copy_that_fails_midway_is_aborted_and_the_304_still_answers() -> None:
    store = SpyStore()
    store.can_replace_meta = False
    cache, _, stale = await stale_entry(store)
    new = BODY.replace(b"demo", b"DEMO")
    assert await record(cache, PAGE, new, [("etag", '"v2"')])  # replaced meanwhile
    fresh = await cache.refresh(stale, [("cache-control", "max-age=600")])
    assert fresh.fresh
    copy = store.writers[-1]
    assert copy.state == "aborted" and copy.blocks == []
    assert b"".join(store.entries[stale.key][1]) == new  # the replacement stays
    store.well_used()


async def test_a_304_leaves_the_store_alone_while_the_key_is_being_recorded() -> None:
    store = SpyStore()
    cache, _, stale = await stale_entry(store)
    before = store.entries[stale.key]
    rec = await cache.recorder(RequestInfo("GET", PAGE), 200, [("etag", '"v2"')])
    assert rec is not None
    fresh = await cache.refresh(stale, [("cache-control", "max-age=600")])
    assert fresh.fresh  # the caller still gets the refreshed answer
    assert store.entries[stale.key] == before and "replace_meta" not in store.calls
    # the recording still holds its key
    assert await cache.recorder(RequestInfo("GET", PAGE), 200, [("etag", '"v3"')]) is None
    await rec.feed(b"v2")
    assert await rec.finish()
    store.well_used()


async def test_a_304_does_not_write_to_a_store_whose_writes_are_disabled() -> None:
    store = SpyStore()
    cache, _, stale = await stale_entry(store)
    store.writes_enabled = False  # e.g. a full disk
    fresh = await cache.refresh(stale, [("cache-control", "max-age=600")])
    assert fresh.fresh
    assert "replace_meta" not in store.calls and len(store.writers) == 1
    store.well_used()


# -- readers given back ---------------------------------------------------------------------


async def test_a_lookup_closes_the_readers_it_does_not_stream() -> None:
    store = SpyStore()
    cache, _, _ = make(store)
    headers = [*ETAG, ("vary", "Accept")]
    json = (("accept", "application/json"),)
    assert await record(cache, PAGE, b'{"demo": 1}', headers, json)
    assert await cache.lookup(RequestInfo("GET", PAGE, json)) is not None
    assert len(store.readers) == 2  # the Vary index, then the variant
    key = cache.key(RequestInfo("GET", blob_url(BODY))).base
    store.entries[key] = ({"v": "an older format"}, [BODY])
    assert await cache.lookup(RequestInfo("GET", blob_url(BODY))) is None
    store.all_closed()


async def test_a_lookup_on_a_store_of_trusted_bytes_closes_the_reader_it_did_not_need() -> None:
    store = SpyStore(trusted=True)
    cache, _, _ = make(store)
    assert await record(cache, PAGE, BODY, ETAG)
    assert await cache.lookup(RequestInfo("GET", PAGE)) is not None
    assert len(store.readers) == 1
    store.all_closed()


@pytest.mark.parametrize("trusted", [False, True])
async def test_a_body_left_after_its_first_chunk_closes_its_reader_at_once(trusted: bool) -> None:
    store = SpyStore(trusted=trusted)
    cache, _, _ = make(store)
    hit = await stored_page(cache)
    body = cache.body(hit)
    assert await anext(body) == BODY[:500]
    await body.aclose()  # the client went away: closed now, not at the next GC pass
    store.all_closed()
