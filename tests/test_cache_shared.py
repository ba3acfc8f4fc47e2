"""Cache metadata shared between workers in Redis (issue 14): a manifest one worker fetched
answers for another when the registry fails; blobs stay local; bounded; Redis trouble
never fails a request; tampered bytes in Redis are never served."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from seawall import FallbackCacheMiddleware
from seawall.cache import FallbackCache, MemoryStore
from seawall.cache.keys import RequestInfo
from seawall.cache.shared import SharedMetaStore
from seawall.clock import ManualClock

pytestmark = pytest.mark.redis

MANIFEST = "/v2/team/app/manifests/1.0"


@pytest.fixture
def namespace(redis_url: str) -> Iterator[str]:
    """A namespace of its own per test; its keys are removed afterwards."""
    ns = f"test-{uuid.uuid4().hex[:12]}"
    yield ns
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"seawall:v1:cache:{ns}:*"):
        client.delete(key)
    client.close()


def _worker(redis_url: str, namespace: str, healthy: bool, body: bytes) -> httpx.AsyncClient:
    """One worker: an app that serves ``body`` (or fails with 503) behind the cache."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        if healthy:
            headers = [(b"content-type", b"application/vnd.oci.image.manifest.v1+json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        else:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"overloaded"})

    store = SharedMetaStore(redis_url, namespace=namespace)
    mw = FallbackCacheMiddleware(app, cache=FallbackCache(store))
    return httpx.AsyncClient(transport=httpx.ASGITransport(mw), base_url="http://registry.test")


async def test_a_manifest_one_worker_fetched_answers_for_another_when_the_app_fails(
    redis_url: str, namespace: str
) -> None:
    manifest = b'{"schemaVersion": 2}'
    async with _worker(redis_url, namespace, True, manifest) as a:
        assert (await a.get(MANIFEST)).content == manifest
    async with _worker(redis_url, namespace, False, b"") as b:
        got = await b.get(MANIFEST)
    assert got.status_code == 200 and got.content == manifest
    assert got.headers["x-seawall-cache"] in ("fresh", "stale", "hit")


async def test_without_sharing_the_other_worker_had_nothing_to_serve(redis_url: str) -> None:
    """The witness: two workers with their own memory stores do not help each other."""
    manifest = b'{"schemaVersion": 2}'

    def worker(healthy: bool) -> httpx.AsyncClient:
        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            status = 200 if healthy else 503
            ctype = [(b"content-type", b"application/vnd.oci.image.manifest.v1+json")]
            await send({"type": "http.response.start", "status": status, "headers": ctype})
            await send({"type": "http.response.body", "body": manifest if healthy else b""})

        mw = FallbackCacheMiddleware(app, cache=FallbackCache(MemoryStore()))
        return httpx.AsyncClient(transport=httpx.ASGITransport(mw), base_url="http://r.test")

    async with worker(True) as a:
        assert (await a.get(MANIFEST)).status_code == 200
    async with worker(False) as b:
        assert (await b.get(MANIFEST)).status_code == 503


async def _record(cache: FallbackCache, url: str, body: bytes) -> bool:
    rec = await cache.recorder(RequestInfo("GET", url), 200, [])
    assert rec is not None
    await rec.feed(body)
    return await rec.finish()


async def _read(cache: FallbackCache, url: str) -> bytes | None:
    hit = await cache.lookup(RequestInfo("GET", url))
    if hit is None:
        return None
    return b"".join([c async for c in cache.body(hit)])


async def test_a_blob_by_digest_stays_with_the_worker_that_fetched_it(
    redis_url: str, namespace: str
) -> None:
    layer = b"layer bytes" * 100
    url = f"https://registry.test/v2/team/app/blobs/sha256:{hashlib.sha256(layer).hexdigest()}"
    a = FallbackCache(SharedMetaStore(redis_url, namespace=namespace))
    b = FallbackCache(SharedMetaStore(redis_url, namespace=namespace))
    assert await _record(a, url, layer)
    assert await _read(a, url) == layer
    assert await _read(b, url) is None
    assert isinstance(a.store, SharedMetaStore) and a.store.shared_bytes == 0


async def test_shared_entries_stay_under_the_cap_and_every_key_expires(
    redis_url: str, namespace: str
) -> None:
    clock = ManualClock()
    store = SharedMetaStore(redis_url, namespace=namespace, max_bytes=10_000, clock=clock)
    cache = FallbackCache(store, clock=clock)
    reader = FallbackCache(SharedMetaStore(redis_url, namespace=namespace), clock=clock)
    for i in range(30):
        clock.advance(1)
        assert await _record(cache, f"https://registry.test/simple/p{i}/", bytes([i]) * 1000)
    assert 9_000 <= store.shared_bytes <= 10_000
    assert store.shared_stats.evictions >= 20
    assert await _read(reader, "https://registry.test/simple/p29/") == bytes([29]) * 1000
    assert await _read(reader, "https://registry.test/simple/p0/") is None  # evicted first
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(f"seawall:v1:cache:{namespace}:*"))
    assert keys and all(0 < client.ttl(k) <= 7 * 24 * 3600 for k in keys)
    client.close()


async def test_tampered_bytes_in_redis_are_never_served(redis_url: str, namespace: str) -> None:
    url = "https://registry.test/simple/pkg/"
    a = FallbackCache(SharedMetaStore(redis_url, namespace=namespace))
    assert await _record(a, url, b"<html>real index</html>")
    client = redis.Redis.from_url(redis_url)
    (entry,) = [k for k in client.scan_iter(f"seawall:v1:cache:{namespace}:e:*")]
    client.hset(entry, "body", b"<html>evil index</html>")
    client.close()
    b_store = SharedMetaStore(redis_url, namespace=namespace)
    assert await _read(FallbackCache(b_store), url) is None
    assert b_store.shared_stats.corrupt == 1


def test_the_breaker_name_carries_no_password() -> None:
    store = SharedMetaStore("redis://:hunter2@127.0.0.1:1/0", namespace="named")
    assert "hunter2" not in store._breaker.name
    assert store._breaker.name == "cache-redis 127.0.0.1:1"


async def test_redis_gone_costs_bounded_attempts_and_never_fails_a_request(
    redis_process,  # type: ignore[no-untyped-def]
) -> None:
    server = redis_process()
    clock = ManualClock()
    store = SharedMetaStore(server.url, namespace="gone", clock=clock)
    cache = FallbackCache(store, clock=clock)
    server.stop()
    for i in range(20):
        url = f"https://registry.test/simple/p{i}/"
        assert await _record(cache, url, b"page")  # kept locally
        assert await _read(cache, url) == b"page"
    # the store's breaker opened after a few failures: the rest never asked Redis
    assert 1 <= store.shared_stats.write_errors <= 5
    restarted = redis_process(server.port)
    clock.advance(10)  # past the breaker's open period: one probe, then shared again
    for i in range(3):
        await _record(cache, f"https://registry.test/simple/q{i}/", b"page")
    assert store.shared_bytes > 0
    restarted.stop()
