"""A big blob streams through either face, into and out of the disk store, with RSS growth
under 64 MiB. The bytes are generated on the fly. The 1 GiB runs take about 25 s each on a
2-core machine, so they are marked slow and run only with SEAWALL_RUN_SLOW=1, which
`make test` (and so CI) sets; a 256 MiB variant of each runs in any pytest run."""

from __future__ import annotations

import gc
import hashlib
import os
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped]
import pytest
from starlette.types import Message, Receive, Scope, Send

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.cache import DiskStore, FallbackCache, MemoryStore
from seawall.client.cache import FallbackCacheTransport
from seawall.clock import ManualClock

MIB = 1024 * 1024
LIMIT = 64 * MIB
SLOW = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("SEAWALL_RUN_SLOW") != "1", reason="1 GiB run: set SEAWALL_RUN_SLOW=1"
    ),
]
_BASE = os.urandom(MIB)


def chunks(total: int) -> Iterator[bytes]:
    """``total`` bytes in 1 MiB chunks, each different, made when asked for."""
    for i in range(total // MIB):
        yield struct.pack(">Q", i) + _BASE[8:]


def digest_of(total: int) -> str:
    h = hashlib.sha256()
    for c in chunks(total):
        h.update(c)
    return "sha256:" + h.hexdigest()


class Meter:
    """Peak RSS growth over a baseline, sampled as the bytes flow."""

    def __init__(self) -> None:
        gc.collect()
        self.proc = psutil.Process()
        self.base: int = self.proc.memory_info().rss
        self.peak: int = self.base
        self.n = 0

    def sample(self) -> None:
        self.n += 1
        if self.n % 16 == 0:
            self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


class Sink:
    """An ASGI ``send`` that hashes and drops the body (a client reading slowly enough)."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.status = 0
        self.headers: dict[bytes, bytes] = {}
        self.h = hashlib.sha256()
        self.size = 0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message["headers"])
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            self.h.update(body)
            self.size += len(body)
            self.meter.sample()


async def _run_asgi(total: int, cache: FallbackCache) -> tuple[int, list[Sink]]:
    digest = digest_of(total)
    path = f"/v2/big/layer/blobs/{digest}"
    state = {"up": True}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if not state["up"]:
            raise RuntimeError("registry down")
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(total).encode())],
            }
        )
        for c in chunks(total):
            await send({"type": "http.response.body", "body": c, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    mw = FallbackCacheMiddleware(app, cache)
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "scheme": "http",
        "query_string": b"",
        "headers": [(b"host", b"registry")],
    }
    meter = Meter()
    sinks = []
    for up in (True, False):
        state["up"] = up
        sink = Sink(meter)
        await mw(scope, receive, sink)
        assert sink.status == 200 and sink.size == total
        assert "sha256:" + sink.h.hexdigest() == digest
        sinks.append(sink)
    return meter.growth, sinks


class BigUpstream(httpx.AsyncBaseTransport):
    def __init__(self, total: int) -> None:
        self.total = total
        self.up = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("registry down", request=request)
        total = self.total

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                for c in chunks(total):
                    yield c

        return httpx.Response(
            200,
            headers={"content-length": str(total), "cache-control": "max-age=31536000"},
            stream=Body(),
        )


async def _run_client(total: int, cache: FallbackCache) -> tuple[int, list[str]]:
    digest = digest_of(total)
    upstream = BigUpstream(total)
    labels = []
    meter = Meter()
    async with httpx.AsyncClient(
        transport=FallbackCacheTransport(upstream, cache), base_url="https://registry"
    ) as client:
        for up in (True, False):
            upstream.up = up
            h = hashlib.sha256()
            size = 0
            async with client.stream("GET", f"/v2/big/layer/blobs/{digest}") as r:
                assert r.status_code == 200
                async for c in r.aiter_raw():
                    h.update(c)
                    size += len(c)
                    meter.sample()
                labels.append(r.headers.get("x-seawall-cache", "upstream"))
            assert size == total and "sha256:" + h.hexdigest() == digest
    return meter.growth, labels


def _disk_cache(tmp_path: Path) -> FallbackCache:
    clock = ManualClock()
    return FallbackCache(DiskStore(tmp_path, max_bytes=2 * 1024 * MIB, clock=clock), clock=clock)


@pytest.mark.parametrize(
    "total", [256 * MIB, pytest.param(1024 * MIB, marks=SLOW)], ids=["256MiB", "1GiB"]
)
async def test_asgi_face_streams_big_blob_through_disk_store(tmp_path: Path, total: int) -> None:
    cache = _disk_cache(tmp_path)
    growth, sinks = await _run_asgi(total, cache)
    assert sinks[1].headers[b"x-seawall-cache"] == b"verified"
    assert cache.stats.stored == 1 and cache.stats.verified == 1
    print(f"asgi face, disk store, {total // MIB} MiB: RSS growth {growth / MIB:.1f} MiB")
    assert growth < LIMIT


@pytest.mark.parametrize(
    "total", [256 * MIB, pytest.param(1024 * MIB, marks=SLOW)], ids=["256MiB", "1GiB"]
)
async def test_client_face_streams_big_blob_through_disk_store(tmp_path: Path, total: int) -> None:
    cache = _disk_cache(tmp_path)
    growth, labels = await _run_client(total, cache)
    assert labels == ["upstream", "verified"]
    print(f"client face, disk store, {total // MIB} MiB: RSS growth {growth / MIB:.1f} MiB")
    assert growth < LIMIT


async def test_big_blob_through_default_memory_store_is_not_held(tmp_path: Path) -> None:
    """Over ``max_entry_bytes`` the memory store drops its buffer at once: RSS stays flat."""
    cache = FallbackCache(clock=ManualClock())
    assert isinstance(cache.store, MemoryStore)
    total = 256 * MIB
    upstream = BigUpstream(total)
    meter = Meter()
    async with (
        httpx.AsyncClient(
            transport=FallbackCacheTransport(upstream, cache), base_url="https://registry"
        ) as client,
        client.stream("GET", f"/v2/big/layer/blobs/{digest_of(total)}") as r,
    ):
        async for _ in r.aiter_raw():
            meter.sample()
    assert cache.stats.stored == 0 and cache.store.size_bytes == 0
    assert meter.growth < LIMIT
