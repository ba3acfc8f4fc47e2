"""Stores: memory LRU in bytes; disk atomicity, crash recovery, corruption, full disk."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from seawall.cache import (
    CacheCorrupt,
    CacheWritesDisabled,
    DiskStore,
    FallbackCache,
    MemoryStore,
    RequestInfo,
)
from seawall.cache import disk as disk_module
from seawall.cache.store import Store
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.cache import CachePolicy


def put(store: Store, key: str, chunks: list[bytes], meta: dict[str, object] | None = None) -> bool:
    writer = store.open_writer(key)
    for chunk in chunks:
        if writer.write(chunk):
            writer.flush()
    return writer.commit(meta or {"n": key})


def get(store: Store, key: str) -> tuple[dict[str, object], bytes] | None:
    found = store.open_reader(key)
    if found is None:
        return None
    meta, chunks = found
    return meta, b"".join(chunks)


def blob(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


async def record(
    cache: FallbackCache, url: str, body: bytes, headers: list[tuple[str, str]] | None = None
) -> bool:
    rec = await cache.recorder(RequestInfo("GET", url), 200, headers or [])
    if rec is None:
        return False
    for i in range(0, len(body), 1000):
        await rec.feed(body[i : i + 1000])
    return await rec.finish()


def patch_file(
    path: Path, offset: int, data: bytes | None = None, *, truncate: int | None = None
) -> None:
    """Damage a file the way bit rot or a torn copy would (sync: tests only)."""
    with open(path, "r+b") as f:
        if truncate is not None:
            f.truncate(truncate)
        if data is not None:
            f.seek(offset)
            f.write(data)


def oci_url(body: bytes) -> str:
    return f"https://r/v2/lib/x/blobs/sha256:{hashlib.sha256(body).hexdigest()}"


# -- memory -----------------------------------------------------------------------------


async def test_memory_lru_is_bounded_in_bytes() -> None:
    store = MemoryStore(max_bytes=3 * 1024 + 3 * 512)
    for k in "abc":
        assert put(store, k, [b"x" * 1024])
    assert sorted(store.keys()) == ["a", "b", "c"]
    assert get(store, "a") is not None  # a is now most recently used
    assert put(store, "d", [b"y" * 1024])
    assert sorted(store.keys()) == ["a", "c", "d"]  # b was least recently used
    assert store.size_bytes <= store.max_bytes
    assert store.stats.evictions == 1


async def test_memory_entry_over_entry_bound_streams_through_uncached() -> None:
    store = MemoryStore(max_bytes=10_000, max_entry_bytes=2_000)
    writer = store.open_writer("big")
    for _ in range(10):
        writer.write(b"z" * 500)
    assert writer.commit({}) is False
    assert get(store, "big") is None
    assert store.size_bytes == 0


async def test_memory_old_entry_readable_until_commit_and_abort_leaves_nothing() -> None:
    store = MemoryStore()
    assert put(store, "k", [b"old"])
    writer = store.open_writer("k")
    writer.write(b"new")
    assert get(store, "k") == ({"n": "k"}, b"old")
    writer.abort()
    assert get(store, "k") == ({"n": "k"}, b"old")
    w2 = store.open_writer("k")
    w2.write(b"new")
    assert w2.commit({"v": 2})
    assert get(store, "k") == ({"v": 2}, b"new")


async def test_namespaces_do_not_mix(tmp_path: Path) -> None:
    a, b = DiskStore(tmp_path, namespace="a"), DiskStore(tmp_path, namespace="b")
    assert put(a, "k", [b"from a"])
    assert get(b, "k") is None
    assert put(b, "k", [b"from b"])
    assert get(a, "k") == ({"n": "k"}, b"from a")
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir()


# -- disk -------------------------------------------------------------------------------


async def test_disk_round_trip_and_restart_keeps_cache_usable(tmp_path: Path) -> None:
    clock = ManualClock()
    store = DiskStore(tmp_path, clock=clock)
    body = blob(3 * 1024 * 1024 + 17)  # crosses the 1 MiB write blocks
    cache = FallbackCache(store, clock=clock)
    assert await record(cache, oci_url(body), body)
    meta_url = "https://r/v2/lib/x/manifests/1"
    assert await record(cache, meta_url, b'{"m":1}', [("etag", '"e1"')])
    # a new process: new store and cache objects over the same directory
    store2 = DiskStore(tmp_path, clock=clock)
    cache2 = FallbackCache(store2, clock=clock)
    hit = await cache2.lookup(RequestInfo("GET", oci_url(body)))
    assert hit is not None and hit.immutable
    assert b"".join([c async for c in cache2.body(hit)]) == body
    meta_hit = await cache2.lookup(RequestInfo("GET", meta_url))
    assert meta_hit is not None and meta_hit.header("etag") == '"e1"'
    assert len(store2.keys()) == 2
    assert store2.size_bytes == store.size_bytes > len(body)


async def test_disk_is_bounded_in_bytes(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=5000)
    for k in "abcd":
        assert put(store, k, [b"x" * 1500])
    keys = store.keys()
    assert "a" not in keys and "d" in keys
    assert store.size_bytes <= 5000
    files = list((tmp_path / "seawall").glob("*/*.entry"))
    assert len(files) == len(keys)
    too_big = store.open_writer("huge")
    too_big.write(b"y" * 6000)
    assert too_big.commit({}) is False
    assert list((tmp_path / "seawall" / "tmp").iterdir()) == []


async def test_crash_mid_write_leaves_no_servable_partial_file(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    assert put(store, "k", [b"committed"])
    writer = store.open_writer("k")
    assert writer.write(b"p" * (2 * 1024 * 1024))  # asks to be flushed...
    writer.flush()  # ... to a .part file on disk
    parts = list((tmp_path / "seawall" / "tmp").glob("*.part"))
    assert len(parts) == 1 and parts[0].stat().st_size >= 1024 * 1024
    # the process "dies" here: no commit, no abort. Readers still see the old entry only.
    assert get(store, "k") == ({"n": "k"}, b"committed")
    # a stray partial file from an older crash too
    (tmp_path / "seawall" / "tmp" / "deadbeef.1234.part").write_bytes(b"half")
    restarted = DiskStore(tmp_path)
    assert get(restarted, "k") == ({"n": "k"}, b"committed")
    assert list((tmp_path / "seawall" / "tmp").iterdir()) == []
    assert restarted.keys() == ["k"]
    writer.abort()  # the dead writer's file is already gone; abort is harmless


async def test_truncated_entry_file_is_never_served(tmp_path: Path) -> None:
    store = DiskStore(tmp_path)
    assert put(store, "k", [b"0123456789" * 100])
    (entry,) = (tmp_path / "seawall").glob("*/*.entry")
    patch_file(entry, 0, truncate=500)  # e.g. a torn copy restored from a backup
    restarted = DiskStore(tmp_path)
    assert get(restarted, "k") is None
    assert restarted.stats.corrupt == 1
    assert not entry.exists()


async def test_corrupted_blob_on_disk_is_never_served(tmp_path: Path) -> None:
    clock = ManualClock()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    cache = FallbackCache(DiskStore(tmp_path, clock=clock), clock=clock, events=bus)
    body = blob(200_000)
    assert await record(cache, oci_url(body), body)
    (entry,) = (tmp_path / "seawall").glob("*/*.entry")
    patch_file(entry, 1234, b"\xff\xfe")  # bit rot in the body; the trailer is intact
    cache2 = FallbackCache(DiskStore(tmp_path, clock=clock), clock=clock, events=bus)
    assert await cache2.lookup(RequestInfo("GET", oci_url(body))) is None
    assert cache2.stats.corrupt == 1
    assert not entry.exists()  # evicted
    assert any(isinstance(e, CacheCorrupt) for e in seen)
    assert await cache2.lookup(RequestInfo("GET", oci_url(body))) is None  # and stays gone


async def test_corrupted_metadata_body_is_never_served(tmp_path: Path) -> None:
    clock = ManualClock()
    cache = FallbackCache(DiskStore(tmp_path, clock=clock), clock=clock)
    assert await record(cache, "https://r/simple/pkg/", b"<a href=x>x</a>" * 50)
    (entry,) = (tmp_path / "seawall").glob("*/*.entry")
    patch_file(entry, 0, b"<script>")
    assert await cache.lookup(RequestInfo("GET", "https://r/simple/pkg/")) is None
    assert cache.stats.corrupt == 1


async def test_disk_full_disables_writes_keeps_serving_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    store = DiskStore(tmp_path, clock=clock, events=bus, retry_writes_after=60.0)
    cache = FallbackCache(store, clock=clock, events=bus)
    old = blob(10_000, seed=1)
    assert await record(cache, oci_url(old), old)

    real_flush = disk_module._DiskWriter._flush_sync

    def enospc(self: object, blocks: list[bytes]) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk_module._DiskWriter, "_flush_sync", enospc)
    new = blob(3 * 1024 * 1024, seed=2)
    # the request that hits the full disk does not fail: the entry is just not kept
    assert await record(cache, oci_url(new), new) is False
    assert not store.writable
    assert store.stats.write_errors == 1
    disabled = [e for e in seen if isinstance(e, CacheWritesDisabled)]
    assert len(disabled) == 1 and "No space" in disabled[0].error
    assert list((tmp_path / "seawall" / "tmp").iterdir()) == []
    # reads go on
    hit = await cache.lookup(RequestInfo("GET", oci_url(old)))
    assert hit is not None and b"".join([c async for c in cache.body(hit)]) == old
    # while disabled, no writer is even opened
    assert await cache.recorder(RequestInfo("GET", oci_url(new)), 200, []) is None
    monkeypatch.setattr(disk_module._DiskWriter, "_flush_sync", real_flush)
    clock.advance(61.0)
    assert await record(cache, oci_url(new), new)
    assert await cache.lookup(RequestInfo("GET", oci_url(new))) is not None


async def test_enospc_at_commit_fsync_is_handled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DiskStore(tmp_path)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    assert put(store, "k", [b"data"]) is False
    assert not store.writable
    assert store.keys() == []
    assert list((tmp_path / "seawall" / "tmp").iterdir()) == []


async def test_unwritable_directory_disables_writes_but_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    cache = FallbackCache(DiskStore(tmp_path, clock=clock), clock=clock)
    body = blob(5000)
    assert await record(cache, oci_url(body), body)
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if m == os.W_OK else real_access(p, m))
    store = DiskStore(tmp_path, clock=clock, events=bus)
    cache2 = FallbackCache(store, clock=clock, events=bus)
    hit = await cache2.lookup(RequestInfo("GET", oci_url(body)))
    assert hit is not None
    assert not store.writable
    assert [type(e) for e in seen] == [CacheWritesDisabled]
    other = blob(100, seed=9)
    assert await record(cache2, oci_url(other), other) is False


async def test_root_that_is_a_file_disables_writes(tmp_path: Path) -> None:
    root = tmp_path / "not-a-dir"
    root.write_bytes(b"")
    store = DiskStore(root)
    assert put(store, "k", [b"x"]) is False
    assert not store.writable
    assert get(store, "k") is None


async def test_a_digest_mismatch_is_never_written(tmp_path: Path) -> None:
    for store in (MemoryStore(), DiskStore(tmp_path)):
        cache = FallbackCache(store, CachePolicy())
        good = blob(4000)
        evil = blob(4000, seed=3)
        assert await record(cache, oci_url(good), evil) is False
        assert cache.stats.rejected == 1
        assert store.keys() == []
        assert await cache.lookup(RequestInfo("GET", oci_url(good))) is None


class MemoryStoreMachine(RuleBasedStateMachine):
    """The memory store against a model: LRU order, byte bound, readable content."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore(max_bytes=4 * 1024, max_entry_bytes=2 * 1024)
        self.model: dict[str, bytes] = {}
        self.order: list[str] = []  # least recently used first

    def _touch(self, key: str) -> None:
        if key in self.order:
            self.order.remove(key)
        self.order.append(key)

    @rule(key=st.sampled_from("abcdef"), size=st.integers(0, 2600))
    def put(self, key: str, size: int) -> None:
        body = bytes([ord(key)]) * size
        ok = put(self.store, key, [body[:100], body[100:]])
        fits = size <= 2 * 1024
        assert ok == fits
        if not ok:
            return
        self.model[key] = body
        self._touch(key)
        while sum(len(self.model[k]) + 512 for k in self.order) > 4 * 1024:
            del self.model[self.order.pop(0)]

    @rule(key=st.sampled_from("abcdef"))
    def read(self, key: str) -> None:
        got = get(self.store, key)
        if key in self.model:
            assert got is not None and got[1] == self.model[key]
            self._touch(key)
        else:
            assert got is None

    @rule(key=st.sampled_from("abcdef"))
    def delete(self, key: str) -> None:
        self.store.delete(key)
        self.model.pop(key, None)
        if key in self.order:
            self.order.remove(key)

    @invariant()
    def bounded_and_consistent(self) -> None:
        assert self.store.size_bytes <= self.store.max_bytes
        assert sorted(self.store.keys()) == sorted(self.model)
        assert self.store.size_bytes == sum(len(b) + 512 for b in self.model.values())


MemoryStoreMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
test_memory_store_state_machine = MemoryStoreMachine.TestCase


@settings(max_examples=40, deadline=None)
@given(body=st.binary(max_size=3000), claimed=st.binary(max_size=3000), chunk=st.integers(1, 700))
def test_a_blob_is_stored_only_under_the_digest_its_bytes_hash_to(
    body: bytes, claimed: bytes, chunk: int
) -> None:
    async def scenario() -> None:
        cache = FallbackCache(MemoryStore())
        rec = await cache.recorder(RequestInfo("GET", oci_url(claimed)), 200, [])
        assert rec is not None
        for i in range(0, len(body), chunk):
            await rec.feed(body[i : i + chunk])
        stored = await rec.finish()
        assert stored == (hashlib.sha256(body).digest() == hashlib.sha256(claimed).digest())
        hit = await cache.lookup(RequestInfo("GET", oci_url(claimed)))
        if hit is not None:
            served = b"".join([c async for c in cache.body(hit)])
            assert hashlib.sha256(served).hexdigest() == hashlib.sha256(claimed).hexdigest()

    asyncio.run(scenario())


def test_disk_store_expands_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    store = DiskStore("~/.cache/seawall")
    assert put(store, "k", [b"data"])
    assert (tmp_path / ".cache" / "seawall" / "seawall").is_dir()
    assert not Path("~").exists()  # no directory literally named "~"
