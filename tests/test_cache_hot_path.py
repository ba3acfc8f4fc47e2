"""No per-byte work for what is stored (issue 16), through the server face.

A blob whose verified copy is stored passes through untouched (no recording, no hash, no
copy); metadata whose validators say it is unchanged is refreshed without copying a byte,
on the memory and the disk store; changed metadata is recorded again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.cache import DiskStore, FallbackCache, MemoryStore, Store
from seawall.clock import ManualClock

BODY = bytes(range(256)) * 64
BLOB = "/v2/lib/app/blobs/sha256:" + hashlib.sha256(BODY).hexdigest()
INDEX = "/simple/demo/"


class Upstream:
    def __init__(self) -> None:
        self.etag = '"v1"'
        self.failing = False

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if self.failing:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = BODY if "/blobs/" in scope["path"] else b"<a href=x>demo</a> " + self.etag.encode()
        headers = [
            (b"content-type", b"text/html"),
            (b"etag", self.etag.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["memory", "disk"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return MemoryStore() if request.param == "memory" else DiskStore(tmp_path)


async def test_a_stored_blob_passes_through_untouched(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream = Upstream()
    cache = FallbackCache(store, clock=ManualClock())
    mw = FallbackCacheMiddleware(upstream, cache)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://r") as c:
        assert (await c.get(BLOB)).content == BODY  # recorded: one hash pass, one write
        commits = store.stats.commits
        hashed: list[str] = []
        real_new = hashlib.new

        def counting(name: str, *args: object) -> object:
            hashed.append(name)
            return real_new(name, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(hashlib, "new", counting)
        for _ in range(5):
            assert (await c.get(BLOB)).content == BODY
    assert store.stats.commits == commits  # nothing written again
    assert cache.stats.already_stored == 5
    assert hashed == []  # and not one byte hashed


async def test_unchanged_metadata_is_refreshed_without_copying_a_byte(store: Store) -> None:
    clock = ManualClock()
    upstream = Upstream()
    cache = FallbackCache(store, clock=clock)
    mw = FallbackCacheMiddleware(upstream, cache)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://r") as c:
        first = await c.get(INDEX)
        commits = store.stats.commits
        clock.advance(50)
        await c.get(INDEX)  # same ETag: only the freshness is renewed
        assert store.stats.commits == commits and cache.stats.revalidated == 1
        clock.advance(50)  # 100 s after the first answer, 50 s after the refresh
        upstream.failing = True
        served = await c.get(INDEX)
        assert served.content == first.content
        assert served.headers["x-seawall-cache"] == "hit"  # fresh: the refresh counted
        upstream.failing = False
        upstream.etag = '"v2"'
        changed = await c.get(INDEX)  # another ETag: recorded again, bytes and all
    assert changed.content.endswith(b'"v2"')
    assert store.stats.commits == commits + 1
