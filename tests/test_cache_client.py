"""FallbackCacheTransport: a client that pulled an image once pulls it again with the
registry switched off; revalidation; nothing served that should not be."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from seawall.cache import DiskStore, FallbackCache
from seawall.client.cache import FallbackCacheSyncTransport, FallbackCacheTransport
from seawall.clock import ManualClock
from seawall.errors import PolicyError, SeawallError
from seawall.events import EventBus
from seawall.policy.cache import CachePolicy

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


class Chunks(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A body delivered in several chunks, as a real registry's is."""

    def __init__(self, body: bytes, size: int = 4096) -> None:
        self.parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts


class CircuitOpen(SeawallError):
    """Stands in for seawall.breaker.CircuitOpenError (any SeawallError counts)."""


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Registry:
    """A tiny CNCF-distribution-like registry: manifests by tag, blobs by digest."""

    layers: list[bytes] = field(
        default_factory=lambda: [bytes([i]) * (50_000 + i * 1000) for i in range(3)]
    )
    down: str = ""  # "", "connect", "breaker", "503", "429"
    evil: bool = False  # serve wrong bytes for blobs
    requests: list[httpx.Request] = field(default_factory=list)
    manifest_version: int = 1

    @property
    def manifest(self) -> bytes:
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "v": self.manifest_version,
            "layers": [{"digest": sha(b), "size": len(b)} for b in self.layers],
        }
        return json.dumps(doc).encode()

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down == "connect":
            raise httpx.ConnectError("connection refused", request=request)
        if self.down == "breaker":
            raise CircuitOpen("breaker open for registry")
        if self.down in ("503", "429"):
            return httpx.Response(int(self.down), content=b"busy")
        path = request.url.path
        if "/manifests/" in path:
            body = self.manifest
            etag = f'"{sha(body)}"'
            if request.headers.get("if-none-match") == etag:
                return httpx.Response(304, headers={"etag": etag})
            return httpx.Response(
                200,
                headers={
                    "content-type": MANIFEST_TYPE,
                    "etag": etag,
                    "docker-content-digest": sha(body),
                    "content-length": str(len(body)),
                },
                stream=Chunks(body, 256),
            )
        for layer in self.layers:
            if path.endswith(sha(layer)):
                body = b"X" * len(layer) if self.evil else layer
                return httpx.Response(
                    200,
                    headers={
                        "cache-control": "max-age=31536000",
                        "etag": f'"{sha(layer)}"',
                        "content-length": str(len(body)),
                    },
                    stream=Chunks(body),
                )
        return httpx.Response(404)

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        return self.handle(request)


async def pull(client: httpx.AsyncClient, token: str = "t") -> tuple[httpx.Response, list[str]]:
    """Pull like python-dxf/oras-py: manifest by tag, then blobs streamed and verified."""
    auth = {"authorization": f"Bearer {token}", "accept": MANIFEST_TYPE}
    manifest = await client.get("/v2/lib/app/manifests/latest", headers=auth)
    manifest.raise_for_status()
    labels = []
    for layer in json.loads(manifest.content)["layers"]:
        h = hashlib.sha256()
        async with client.stream("GET", f"/v2/lib/app/blobs/{layer['digest']}", headers=auth) as r:
            r.raise_for_status()
            chunks = 0
            async for chunk in r.aiter_raw(8192):
                h.update(chunk)
                chunks += 1
            assert chunks > 1  # streamed, not one lump
            labels.append(r.headers.get("x-seawall-cache", "upstream"))
        assert "sha256:" + h.hexdigest() == layer["digest"]
    return manifest, labels


def make(
    clock: ManualClock, policy: CachePolicy | None = None, cache: FallbackCache | None = None
) -> tuple[Registry, FallbackCacheTransport, httpx.AsyncClient]:
    registry = Registry()
    transport = FallbackCacheTransport(
        httpx.MockTransport(registry.ahandle), cache or FallbackCache(policy=policy, clock=clock)
    )
    client = httpx.AsyncClient(transport=transport, base_url="https://registry.example")
    return registry, transport, client


@pytest.mark.parametrize("down", ["connect", "breaker", "503", "429"])
async def test_image_pulls_again_with_the_registry_switched_off(
    clock: ManualClock, down: str
) -> None:
    policy = CachePolicy(default_fresh_seconds=60, max_stale=24 * 3600)
    registry, transport, client = make(clock, policy)
    async with client:
        first, labels = await pull(client)
        assert labels == ["upstream"] * 3
        assert transport.cache.stats.stored == 4
        registry.down = down
        clock.advance(6 * 3600)  # manifest long past fresh, well within max-stale
        again, labels = await pull(client)
        assert again.content == first.content
        assert again.headers["x-seawall-cache"] == "stale"
        assert int(again.headers["age"]) == 6 * 3600
        assert labels == ["verified"] * 3  # layers by digest: verified, never stale
        clock.advance(19 * 3600)  # beyond max-stale: the manifest may not be served
        if down in ("connect", "breaker"):
            with pytest.raises((httpx.ConnectError, CircuitOpen)):
                await pull(client)
        else:
            with pytest.raises(httpx.HTTPStatusError):
                await pull(client)


async def test_fresh_blobs_are_served_without_asking(clock: ManualClock) -> None:
    registry, _transport, client = make(clock)
    async with client:
        await pull(client)
        n = len(registry.requests)
        clock.advance(30)
        _, labels = await pull(client)
    assert labels == ["verified"] * 3
    assert len(registry.requests) == n  # manifest still fresh too: zero upstream requests


async def test_revalidation_304_serves_the_stored_body_and_refreshes(clock: ManualClock) -> None:
    registry, transport, client = make(clock)
    async with client:
        first, _ = await pull(client)
        clock.advance(120)
        n = len(registry.requests)
        again, _ = await pull(client)
        conditional = registry.requests[n]
        assert conditional.headers["if-none-match"] == first.headers["etag"]
        assert again.content == first.content
        assert again.headers["x-seawall-cache"] == "hit"
        assert transport.cache.stats.revalidated == 1
        m = len(registry.requests)
        clock.advance(30)  # refreshed by the 304: fresh again, no request at all
        await pull(client)
        assert len(registry.requests) == m


async def test_revalidation_200_replaces_the_entry(clock: ManualClock) -> None:
    registry, _transport, client = make(clock)
    async with client:
        first, _ = await pull(client)
        registry.manifest_version = 2
        clock.advance(120)
        second, _ = await pull(client)
        assert second.content != first.content and "x-seawall-cache" not in second.headers
        registry.down = "connect"
        clock.advance(120)
        third, _ = await pull(client)
    assert third.content == second.content and third.headers["x-seawall-cache"] == "stale"


async def test_nothing_it_gets_is_bytes_it_should_not_have(clock: ManualClock) -> None:
    registry, _transport, client = make(clock)
    async with client:
        # another user's pull is cached...
        await pull(client, token="alice")
        registry.down = "connect"
        # ...but is never served to a different credential
        with pytest.raises(httpx.ConnectError):
            await pull(client, token="mallory")
    # and an upstream serving wrong bytes under a digest never gets them stored
    registry2, transport2, client2 = make(clock)
    registry2.evil = True
    async with client2:
        with pytest.raises(AssertionError):
            await pull(client2)  # the client's own digest check catches the bad bytes
        assert transport2.cache.stats.rejected >= 1
        registry2.down = "connect"
        layer = registry2.layers[0]
        with pytest.raises(httpx.ConnectError):
            await client2.get(
                f"/v2/lib/app/blobs/{sha(layer)}", headers={"authorization": "Bearer t"}
            )


def damage_big_entries(root: Path) -> None:
    for entry in root.glob("seawall/*/*.entry"):
        if entry.stat().st_size > 40_000:  # the layers, not the manifest
            with open(entry, "r+b") as f:
                f.write(b"\x00corrupt")


async def test_corrupted_store_entry_is_not_served(clock: ManualClock, tmp_path: Path) -> None:
    root = tmp_path
    cache = FallbackCache(DiskStore(root, clock=clock), clock=clock)
    registry, _transport, client = make(clock, cache=cache)
    async with client:
        await pull(client)
        damage_big_entries(root)
        registry.down = "connect"
        with pytest.raises(httpx.ConnectError):
            await pull(client)
    assert cache.stats.corrupt >= 1


async def test_stale_while_revalidate_serves_at_once_and_refreshes_in_background(
    clock: ManualClock,
) -> None:
    registry, transport, client = make(clock, CachePolicy(stale_while_revalidate=300))
    async with client:
        first, _ = await pull(client)
        registry.manifest_version = 2
        clock.advance(100)
        stale, _ = await pull(client)
        assert stale.content == first.content and stale.headers["x-seawall-cache"] == "stale"
        await transport._layer._tasks.join()
        fresh, _ = await pull(client)
    assert fresh.content != first.content
    assert fresh.headers["x-seawall-cache"] == "hit"


async def test_non_get_and_own_mistakes_pass_through(clock: ManualClock) -> None:
    registry, transport, client = make(clock)
    async with client:
        await pull(client)
        registry.down = "connect"
        with pytest.raises(httpx.ConnectError):
            await client.post("/v2/lib/app/blobs/uploads/")

    class Broken(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            raise PolicyError("x", 1, "is wrong")

    cache = transport.cache
    t = FallbackCacheTransport(Broken(), cache)
    async with httpx.AsyncClient(transport=t, base_url="https://registry.example") as c:
        clock.advance(3600)
        with pytest.raises(PolicyError):  # a configuration error is not hidden by a copy
            await c.get(
                "/v2/lib/app/manifests/latest",
                headers={"authorization": "Bearer t", "accept": MANIFEST_TYPE},
            )


def test_sync_transport_pulls_again_with_the_registry_switched_off(clock: ManualClock) -> None:
    registry = Registry()
    transport = FallbackCacheSyncTransport(
        httpx.MockTransport(registry.handle),
        FallbackCache(policy=CachePolicy(max_stale=3600), clock=clock),
    )
    auth = {"authorization": "Bearer t", "accept": MANIFEST_TYPE}

    def sync_pull(client: httpx.Client) -> tuple[httpx.Response, list[str]]:
        manifest = client.get("/v2/lib/app/manifests/latest", headers=auth)
        manifest.raise_for_status()
        labels = []
        for layer in json.loads(manifest.content)["layers"]:
            h = hashlib.sha256()
            with client.stream("GET", f"/v2/lib/app/blobs/{layer['digest']}", headers=auth) as r:
                r.raise_for_status()
                for chunk in r.iter_raw(8192):
                    h.update(chunk)
                labels.append(r.headers.get("x-seawall-cache", "upstream"))
            assert "sha256:" + h.hexdigest() == layer["digest"]
        return manifest, labels

    with httpx.Client(transport=transport, base_url="https://registry.example") as client:
        first, labels = sync_pull(client)
        assert labels == ["upstream"] * 3
        registry.down = "connect"
        clock.advance(1800)
        again, labels = sync_pull(client)
        assert again.content == first.content and again.headers["x-seawall-cache"] == "stale"
        assert labels == ["verified"] * 3
        clock.advance(1900)
        with pytest.raises(httpx.ConnectError):
            sync_pull(client)
        registry.down = ""
        n = len(registry.requests)
        third, _ = sync_pull(client)  # revalidation: 304 -> stored body
        assert registry.requests[n].headers["if-none-match"] == first.headers["etag"]
        assert third.content == first.content and third.headers["x-seawall-cache"] == "hit"
    assert not any(t.name == "seawall-cache-loop" for t in threading.enumerate())  # no thread


@pytest.mark.parametrize("wiring", ["composed", "cache-argument"])
async def test_outermost_over_the_resilient_transport(clock: ManualClock, wiring: str) -> None:
    """The intended pipeline: cache -> retry/breaker -> registry. Retries exhausted and,
    later, an open breaker both end in verified/stale answers from the cache. Composing
    the two transports by hand and ``ResilientTransport(cache=...)`` are the same thing."""
    from seawall.client.httpx import ResilientTransport

    registry = Registry()
    bus = EventBus()
    names: list[str] = []
    bus.subscribe(lambda e: names.append(e.name))
    cache = FallbackCache(policy=CachePolicy(max_stale=24 * 3600), clock=clock, events=bus)
    upstream = httpx.MockTransport(registry.ahandle)
    transport: httpx.AsyncBaseTransport
    if wiring == "composed":
        inner = ResilientTransport(upstream, clock=clock, events=bus)
        transport = FallbackCacheTransport(inner, cache)
    else:
        transport = ResilientTransport(upstream, clock=clock, events=bus, cache=cache)
    async with httpx.AsyncClient(transport=transport, base_url="https://registry.example") as c:
        first, _ = await pull(c)
        registry.down = "connect"
        clock.advance(3600)
        for _ in range(8):  # enough failures to open the host's breaker on the way
            again, labels = await pull(c)
            assert again.content == first.content
            assert again.headers["x-seawall-cache"] == "stale"
            assert labels == ["verified"] * 3
    assert cache.stats.stale == 8 and cache.stats.verified == 24
    assert "retry.exhausted" in names  # the inner pipeline retried and gave up...
    assert "breaker.rejected" in names  # ...and later its open breaker refused at once
    assert names.count("cache.served") == 8 + 8 * 3  # stale manifests and verified blobs


@pytest.mark.parametrize("down", ["503", "breaker"])
def test_sync_transport_falls_back_on_status_and_seawall_errors(
    clock: ManualClock, down: str
) -> None:
    registry = Registry()
    cache = FallbackCache(clock=clock)
    transport = FallbackCacheSyncTransport(httpx.MockTransport(registry.handle), cache)
    url = "/v2/lib/app/manifests/latest"
    headers = {"accept": MANIFEST_TYPE}
    with httpx.Client(transport=transport, base_url="https://registry.example") as client:
        first = client.get(url, headers=headers)
        registry.down = down
        clock.advance(600)
        r = client.get(url, headers=headers)
        assert r.status_code == 200 and r.content == first.content
        assert r.headers["x-seawall-cache"] == "stale" and r.headers["age"] == "600"
        with (
            pytest.raises((httpx.ConnectError, CircuitOpen)) if down == "breaker" else nullcontext()
        ):
            posted = client.post("/v2/lib/app/blobs/uploads/")
            assert posted.status_code == 503  # writes are never answered from the cache
    assert len(cache.store.keys()) == 1  # a shared cache outlives the transport


async def test_own_conditionals_and_ranges_go_upstream(clock: ManualClock) -> None:
    registry, _transport, client = make(clock)
    async with client:
        await pull(client)
        layer = registry.layers[0]
        url = f"/v2/lib/app/blobs/{sha(layer)}"
        auth = {"authorization": "Bearer t", "accept": MANIFEST_TYPE}
        n = len(registry.requests)
        r = await client.get(url, headers={**auth, "range": "bytes=0-9"})
        assert len(registry.requests) == n + 1 and "x-seawall-cache" not in r.headers
        r = await client.get(url, headers={**auth, "if-none-match": '"x"'})
        assert len(registry.requests) == n + 2
        registry.down = "connect"
        r = await client.get(url, headers={**auth, "range": "bytes=0-9"})
    assert r.status_code == 200 and r.content == layer  # a full 200 answers a Range too


def test_sync_resilient_transport_takes_the_cache_outermost(clock: ManualClock) -> None:
    from seawall.client.httpx import ResilientSyncTransport

    registry = Registry()
    cache = FallbackCache(clock=clock)
    transport = ResilientSyncTransport(
        httpx.MockTransport(registry.handle), clock=clock, cache=cache
    )
    url = "/v2/lib/app/manifests/latest"
    headers = {"accept": MANIFEST_TYPE}
    with httpx.Client(transport=transport, base_url="https://registry.example") as client:
        first = client.get(url, headers=headers)
        registry.down = "connect"
        clock.advance(600)
        n = len(registry.requests)
        again = client.get(url, headers=headers)
        assert again.content == first.content and again.headers["x-seawall-cache"] == "stale"
        assert len(registry.requests) > n + 1, "the resilient pipeline retried before giving up"


async def test_a_hanging_registry_costs_fallback_after_not_the_whole_deadline(
    clock: ManualClock,
) -> None:
    """With a stale copy in hand, the client gives the upstream ``fallback_after`` (5 s),
    every attempt included, then answers from the copy; without a copy it waits for its
    own deadline. (Before: 10 s attempts retried inside a 30 s deadline took 21 s.)"""
    from seawall.client.httpx import ResilientTransport

    registry = Registry()
    hanging = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if registry.down == "hang":
            hanging.set()
            await asyncio.Event().wait()
        return registry.handle(request)

    cache = FallbackCache(policy=CachePolicy(), clock=clock)
    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    async with httpx.AsyncClient(transport=transport, base_url="https://registry.example") as c:
        await pull(c)
        clock.advance(120)  # the manifest is stale now (60 s fresh by default)
        registry.down = "hang"
        started = clock.now()
        auth = {"authorization": "Bearer t", "accept": MANIFEST_TYPE}  # as pull() asked
        task = asyncio.create_task(c.get("/v2/lib/app/manifests/latest", headers=auth))
        while not task.done():  # the registry hangs until the driven clock moves on
            await asyncio.sleep(0)
            if hanging.is_set():
                clock.advance(0.5)
        answer = await task
        assert answer.headers["x-seawall-cache"] == "stale"
        assert clock.now() - started <= 5.5  # fallback_after, not 21 s
        nothing_stored = c.get("/v2/lib/app/manifests/other", headers=auth)
        task = asyncio.create_task(nothing_stored)
        started = clock.now()
        while not task.done():
            await asyncio.sleep(0)
            clock.advance(0.5)
        with pytest.raises(httpx.ReadTimeout):
            await task
        assert clock.now() - started >= 20  # no copy: the client's own deadline applies


def test_requests_adapter_serves_a_verified_pull_from_disk_when_the_registry_fails(
    clock: ManualClock, tmp_path: Path
) -> None:
    """The requests face has the same cache: blobs verified by digest, a stale manifest,
    streamed from a DiskStore, and a fresh answer again when the registry is back."""
    import requests

    from scripted import Answer, scripted_server
    from seawall.cache import DiskStore
    from seawall.client.requests import ResilientAdapter

    layer = bytes(range(256)) * 4000  # ~1 MiB, more than one disk block read
    digest = sha(layer)
    manifest = json.dumps({"layers": [{"digest": digest}]}).encode()
    cache = FallbackCache(DiskStore(tmp_path / "cache"), clock=clock)
    with scripted_server() as server, requests.Session() as session:
        session.mount("http://", ResilientAdapter(clock=clock, cache=cache))
        up = [
            Answer(200, {"content-type": MANIFEST_TYPE, "etag": '"m1"'}, manifest),
            Answer(200, {"content-length": str(len(layer))}, layer, chunks=8),
        ]
        server.play(*up)
        base = server.url + "/v2/lib/app"
        m = session.get(base + "/manifests/latest", headers={"accept": MANIFEST_TYPE})
        blob = session.get(base + "/blobs/" + digest)
        assert m.content == manifest and blob.content == layer
        assert "x-seawall-cache" not in m.headers

        server.play(Answer(503))
        clock.advance(3600)
        m2 = session.get(base + "/manifests/latest", headers={"accept": MANIFEST_TYPE})
        with session.get(base + "/blobs/" + digest, stream=True) as r:
            pieces = list(r.iter_content(64 * 1024))
        assert m2.content == manifest and m2.headers["x-seawall-cache"] == "stale"
        assert r.headers["x-seawall-cache"] == "verified" and b"".join(pieces) == layer
        assert len(pieces) > 1  # streamed from the disk store, never one lump

        server.play(Answer(200, {"content-type": MANIFEST_TYPE, "etag": '"m2"'}, b'{"v":2}'))
        m3 = session.get(base + "/manifests/latest", headers={"accept": MANIFEST_TYPE})
        assert m3.content == b'{"v":2}' and "x-seawall-cache" not in m3.headers


# ---------------------------------------------------------------- verification of stored bodies


def _flip_bytes(path: Path, offset: int) -> None:
    """Bit rot in a stored body (sync: tests only)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff\xfe")


async def _stored_blob(root: Path, clock: ManualClock, body: bytes) -> str:
    from seawall.cache.keys import RequestInfo

    url = f"https://r.test/v2/lib/x/blobs/sha256:{hashlib.sha256(body).hexdigest()}"
    cache = FallbackCache(DiskStore(root, clock=clock), clock=clock)
    rec = await cache.recorder(RequestInfo("GET", url), 200, [])
    assert rec is not None
    for i in range(0, len(body), 1000):
        await rec.feed(body[i : i + 1000])
    assert await rec.finish()
    return url


@pytest.mark.parametrize("damage", ["none", "flip"])
async def test_a_stored_body_is_served_only_when_its_bytes_verify(
    clock: ManualClock, tmp_path: Path, damage: str
) -> None:
    from seawall.cache.fallback import CacheCorrupt
    from seawall.cache.keys import RequestInfo
    from seawall.events import Event

    body = bytes((i * 31) % 251 for i in range(50_000))
    url = await _stored_blob(tmp_path, clock, body)
    (entry,) = (tmp_path / "seawall").glob("*/*.entry")
    if damage == "flip":
        _flip_bytes(entry, 1234)
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    restarted = FallbackCache(DiskStore(tmp_path, clock=clock), clock=clock, events=bus)
    hit = await restarted.lookup(RequestInfo("GET", url))
    if damage == "none":
        assert hit is not None and restarted.stats.corrupt == 0
        assert b"".join([c async for c in restarted.body(hit)]) == body
        return
    assert hit is None and restarted.stats.corrupt == 1
    assert not entry.exists()
    (event,) = [e for e in seen if isinstance(e, CacheCorrupt)]
    assert (event.url, event.reason) == (url, "digest mismatch")
