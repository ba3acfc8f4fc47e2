"""FallbackCacheMiddleware: tee on success, answer from the cache when the app fails."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.cache import FallbackCache, MemoryStore
from seawall.clock import ManualClock
from seawall.errors import PolicyError
from seawall.policy.cache import CachePolicy

BLOB = b"layer-bytes-" * 5000
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BLOB_URL = f"/v2/lib/alpine/blobs/{BLOB_DIGEST}"
MANIFEST_URL = "/v2/lib/alpine/manifests/3.19"


@dataclass
class Upstream:
    """An artifact app whose behaviour tests switch: ok, fail (status), raise, shed."""

    mode: str = "ok"
    status: int = 503
    calls: int = 0
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunk: int = 4096
    yield_between_chunks: bool = False

    def body_for(self, scope: Scope) -> tuple[bytes, list[tuple[bytes, bytes]]]:
        path = scope["path"]
        headers = dict(scope["headers"])
        if path == BLOB_URL:
            return BLOB, [(b"cache-control", b"max-age=31536000"), (b"etag", BLOB_DIGEST.encode())]
        if path == "/wrong/blobs":
            return b"not what the digest says", []
        if path.startswith("/simple/"):
            accept = headers.get(b"accept", b"text/html")
            return b"page for " + accept, [(b"vary", b"Accept")]
        if path == "/private":
            return b"secret", [(b"cache-control", b"private")]
        if path == "/nostore":
            return b"volatile", [(b"cache-control", b"no-store")]
        user = headers.get(b"authorization", b"anon")
        return b'{"manifest-for":"' + user + b'"}', [(b"etag", b'"m1"')]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("registry backend exploded")
        if self.mode == "fail":
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status,
                    "headers": list(self.extra_headers),
                }
            )
            await send({"type": "http.response.body", "body": b"upstream error"})
            return
        if self.mode == "shed":
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [(b"x-seawall-refused", b"shed"), (b"retry-after", b"2")],
                }
            )
            await send({"type": "http.response.body", "body": b"shed"})
            return
        body, headers = self.body_for(scope)
        if scope["path"] == "/notfound":
            body, status = b"no", 404
        else:
            status = 200
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                    *self.extra_headers,
                ],
            }
        )
        if self.mode == "die-midway":
            await send({"type": "http.response.body", "body": body[:10], "more_body": True})
            raise RuntimeError("connection to storage lost")
        for i in range(0, len(body), self.chunk):
            if self.yield_between_chunks:
                await asyncio.sleep(0)
            piece = body[i : i + self.chunk]
            await send(
                {
                    "type": "http.response.body",
                    "body": piece,
                    "more_body": i + self.chunk < len(body),
                }
            )
        if not body:
            await send({"type": "http.response.body", "body": b""})


def make(
    clock: ManualClock, policy: CachePolicy | None = None
) -> tuple[Upstream, FallbackCache, httpx.AsyncClient]:
    upstream = Upstream()
    cache = FallbackCache(policy=policy, clock=clock)
    app = FallbackCacheMiddleware(upstream, cache)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://registry")
    return upstream, cache, client


async def test_default_construction_works_alone_on_memory() -> None:
    upstream = Upstream()
    mw = FallbackCacheMiddleware(upstream)
    assert isinstance(mw.cache.store, MemoryStore)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=mw), base_url="http://r") as c:
        assert (await c.get(BLOB_URL)).content == BLOB
        upstream.mode = "raise"
        r = await c.get(BLOB_URL)
    assert r.status_code == 200 and r.content == BLOB
    assert r.headers["x-seawall-cache"] == "verified"


@pytest.mark.parametrize("mode", ["raise", "fail", "shed"])
async def test_app_failure_is_answered_from_cache(clock: ManualClock, mode: str) -> None:
    upstream, _cache, client = make(clock)
    async with client:
        first = await client.get(MANIFEST_URL)
        assert first.status_code == 200 and "x-seawall-cache" not in first.headers
        clock.advance(30)
        upstream.mode = mode
        r = await client.get(MANIFEST_URL)
    assert r.status_code == 200
    assert r.content == first.content
    assert r.headers["x-seawall-cache"] == "hit"  # still within default freshness (60 s)
    assert r.headers["age"] == "30"
    assert r.headers["etag"] == '"m1"'
    assert upstream.calls == 2  # the middleware is a fallback: the app is always asked first


async def test_shed_is_recognized_even_when_503_is_not_a_fallback_status(
    clock: ManualClock,
) -> None:
    upstream, _cache, client = make(clock, CachePolicy(fallback_statuses=frozenset({500})))
    async with client:
        await client.get(MANIFEST_URL)
        upstream.mode = "fail"
        upstream.status = 503
        plain = await client.get(MANIFEST_URL)
        upstream.mode = "shed"
        shed = await client.get(MANIFEST_URL)
    assert plain.status_code == 503  # a plain 503 is not in this policy
    assert shed.status_code == 200 and shed.headers["x-seawall-cache"] == "hit"


async def test_failure_without_a_copy_passes_through(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    upstream.mode = "fail"
    async with client:
        r = await client.get(MANIFEST_URL)
        assert r.status_code == 503 and r.content == b"upstream error"
        upstream.mode = "raise"
        with pytest.raises(RuntimeError, match="exploded"):
            await client.get(MANIFEST_URL)


async def test_credential_isolation(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    alice = {"authorization": "Bearer alice"}
    async with client:
        recorded = await client.get(MANIFEST_URL, headers=alice)
        upstream.mode = "fail"
        assert (
            await client.get(MANIFEST_URL, headers={"authorization": "Bearer bob"})
        ).status_code == 503
        assert (await client.get(MANIFEST_URL)).status_code == 503
        again = await client.get(MANIFEST_URL, headers=alice)
    assert (
        again.status_code == 200
        and again.content == recorded.content == b'{"manifest-for":"Bearer alice"}'
    )


async def test_public_upstream_shares_across_credentials(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock, CachePolicy(public=True))
    async with client:
        await client.get(BLOB_URL, headers={"authorization": "Bearer alice"})
        upstream.mode = "fail"
        r = await client.get(BLOB_URL)
    assert r.status_code == 200 and r.content == BLOB


async def test_vary_is_honoured(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    async with client:
        html = await client.get("/simple/pkg/", headers={"accept": "text/html"})
        js = await client.get("/simple/pkg/", headers={"accept": "application/json"})
        upstream.mode = "fail"
        html2 = await client.get("/simple/pkg/", headers={"accept": "text/html"})
        js2 = await client.get("/simple/pkg/", headers={"accept": "application/json"})
        other = await client.get("/simple/pkg/", headers={"accept": "text/plain"})
    assert html2.content == html.content == b"page for text/html"
    assert js2.content == js.content == b"page for application/json"
    assert other.status_code == 503


async def test_stale_is_served_only_within_max_stale(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock, CachePolicy(default_fresh_seconds=60, max_stale=600))
    async with client:
        await client.get(MANIFEST_URL)
        upstream.mode = "fail"
        clock.advance(60 + 599)
        stale = await client.get(MANIFEST_URL)
        assert stale.status_code == 200
        assert stale.headers["x-seawall-cache"] == "stale"
        assert stale.headers["age"] == "659"
        clock.advance(2)
        too_old = await client.get(MANIFEST_URL)
    assert too_old.status_code == 503 and too_old.content == b"upstream error"


async def test_fifty_concurrent_writers_of_one_blob_end_as_one_entry(clock: ManualClock) -> None:
    upstream, cache, client = make(clock)
    upstream.chunk = 1024
    upstream.yield_between_chunks = True  # responses interleave chunk by chunk
    async with client:
        results = await asyncio.gather(*(client.get(BLOB_URL) for _ in range(50)))
    assert all(r.status_code == 200 and r.content == BLOB for r in results)
    assert len(cache.store.keys()) == 1
    assert cache.stats.stored == 1
    assert cache.stats.concurrent_skipped == 49
    assert cache.store.stats.commits == 1


async def test_head_is_answered_with_headers_only(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    async with client:
        await client.get(BLOB_URL)
        upstream.mode = "raise"
        r = await client.head(BLOB_URL)
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == str(len(BLOB))


@pytest.mark.parametrize(
    "path", ["/private", "/nostore", "/notfound", "/wrong/blobs/" + "sha256:" + "0" * 64]
)
async def test_never_cached(clock: ManualClock, path: str) -> None:
    upstream, cache, client = make(clock)
    if path.startswith("/wrong"):
        upstream.body_for = lambda scope: (b"not what the digest says", [])  # type: ignore[method-assign]
    async with client:
        await client.get(path)
        upstream.mode = "fail"
        r = await client.get(path)
    assert r.status_code == 503
    assert cache.store.keys() == []


async def test_post_is_never_recorded_nor_answered(clock: ManualClock) -> None:
    upstream, cache, client = make(clock)
    async with client:
        await client.get(MANIFEST_URL)
        await client.post(MANIFEST_URL)
        upstream.mode = "fail"
        r = await client.post(MANIFEST_URL)
    assert r.status_code == 503
    assert len(cache.store.keys()) == 1


async def test_body_cut_midway_is_not_stored(clock: ManualClock) -> None:
    upstream, cache, client = make(clock)
    upstream.mode = "die-midway"
    async with client:
        with pytest.raises(RuntimeError):
            await client.get(BLOB_URL)
    assert cache.store.keys() == []
    assert cache._inflight == set()


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    await FallbackCacheMiddleware(app)({"type": "lifespan"}, receive, send)
    assert seen == ["lifespan"]


async def test_app_failing_after_start_is_not_masked(clock: ManualClock) -> None:
    upstream, cache, client = make(clock)
    async with client:
        await client.get(BLOB_URL)
        upstream.mode = "die-midway"
        with pytest.raises(RuntimeError, match="storage lost"):
            await client.get(BLOB_URL)  # headers already went out: nothing can be replaced
    assert len(cache.store.keys()) == 1  # the earlier good copy is still there


async def test_set_cookie_is_never_replayed(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    upstream.extra_headers = [(b"set-cookie", b"session=alice-secret"), (b"x-registry", b"1")]
    async with client:
        first = await client.get(MANIFEST_URL)
        assert first.headers["set-cookie"] == "session=alice-secret"
        upstream.mode = "fail"
        with_cookie = await client.get(MANIFEST_URL)  # the jar now sends Cookie: new scope
        assert with_cookie.status_code == 503
        client.cookies.clear()
        r = await client.get(MANIFEST_URL)
    assert r.status_code == 200 and r.headers["x-seawall-cache"] == "hit"
    assert "set-cookie" not in r.headers
    assert r.headers["x-registry"] == "1"  # ordinary headers are kept


async def test_with_a_real_starlette_streaming_app(clock: ManualClock) -> None:
    """Starlette's own StreamingResponse and routing, under the middleware."""
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    state = {"up": True}

    async def layer(request: Any) -> StreamingResponse:
        if not state["up"]:
            raise RuntimeError("storage backend down")

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(BLOB), 8192):
                yield BLOB[i : i + 8192]

        return StreamingResponse(gen(), headers={"content-length": str(len(BLOB))})

    app = Starlette(routes=[Route("/v2/{name:path}/blobs/{digest}", layer)])
    cache = FallbackCache(clock=clock)
    mw = FallbackCacheMiddleware(app, cache)
    transport = httpx.ASGITransport(app=mw, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        assert (await client.get(BLOB_URL)).content == BLOB
        state["up"] = False
        r = await client.get(BLOB_URL)
        other = await client.get(f"/v2/lib/other/blobs/sha256:{'1' * 64}")
    assert r.status_code == 200 and r.content == BLOB and r.headers["x-seawall-cache"] == "verified"
    assert other.status_code == 500  # nothing stored for it: the app's failure stands


# -- answers for failures, not for deliberate refusals (issue 11, point 5) ---------------


async def test_a_429_from_the_limiter_or_the_app_is_never_replaced(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock)
    async with client:
        assert (await client.get(MANIFEST_URL)).status_code == 200
        upstream.mode = "fail"
        upstream.status = 429  # the app itself limits this client
        by_app = await client.get(MANIFEST_URL)
        upstream.status = 503
        upstream.extra_headers = [(b"x-seawall-refused", b"rate-limit"), (b"retry-after", b"3")]
        limiter_down = await client.get(MANIFEST_URL)  # the limiter's store is down
        upstream.extra_headers = []
        failed = await client.get(MANIFEST_URL)  # a real failure is still answered
    assert by_app.status_code == 429 and "x-seawall-cache" not in by_app.headers
    assert limiter_down.status_code == 503 and limiter_down.headers["retry-after"] == "3"
    assert failed.status_code == 200 and failed.headers["x-seawall-cache"] == "hit"


async def test_the_rate_limiters_429_passes_through_the_default_stack(clock: ManualClock) -> None:
    """FallbackCacheMiddleware outermost over RateLimitMiddleware: the 429 stays a 429
    and the stored copy's RateLimit fields never reach another request."""
    from seawall.asgi.ratelimit import RateLimitMiddleware
    from seawall.policy.ratelimit import RateLimitPolicy

    upstream = Upstream()
    limited = RateLimitMiddleware(upstream, RateLimitPolicy(limit="2/minute"), clock=clock)
    app = FallbackCacheMiddleware(limited, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        first = await client.get(MANIFEST_URL)
        second = await client.get(MANIFEST_URL)
        third = await client.get(MANIFEST_URL)
        upstream.mode = "raise"
        clock.advance(61)
        answered = await client.get(MANIFEST_URL)  # allowed by the limiter; the app fails
    assert first.status_code == second.status_code == 200
    assert any(k.lower().startswith("ratelimit") for k in first.headers)
    assert third.status_code == 429 and third.headers["x-seawall-refused"] == "rate-limit"
    assert "x-seawall-cache" not in third.headers
    assert answered.status_code == 200
    assert answered.headers["x-seawall-cache"] in ("hit", "stale")
    # the fields on the answer are the limiter's own for *this* request, never stored ones
    stored = await app.cache.lookup(request_for(MANIFEST_URL))
    assert stored is not None
    assert not [k for k, _ in stored.headers if k.startswith("ratelimit")]


def request_for(path: str) -> Any:
    from seawall.cache.keys import RequestInfo

    return RequestInfo("GET", f"http://registry{path}", [("host", "registry"), ("accept", "*/*")])


@pytest.mark.parametrize(
    ("path", "headers", "stored"),
    [
        ("/api/status", [(b"content-type", b"application/json")], False),  # dynamic JSON
        ("/slow", [], False),
        ("/api/report", [(b"cache-control", b"public, max-age=60")], True),  # it says so
        ("/downloads/tool.bin", [(b"cache-control", b"max-age=3600")], True),
        ("/express", [(b"content-type", b"application/vnd.npm.install-v1+json")], True),
        ("/v2/team/app/manifests/v1", [], True),  # OCI, registries send no Cache-Control
        ("/simple/requests/", [(b"content-type", b"text/html")], True),
    ],
)
async def test_only_artifacts_or_responses_that_allow_it_are_stored(
    clock: ManualClock, path: str, headers: list[tuple[bytes, bytes]], stored: bool
) -> None:
    upstream, cache, client = make(clock)
    upstream.extra_headers = headers
    async with client:
        assert (await client.get(path)).status_code == 200
        upstream.mode = "shed"
        r = await client.get(path)
    assert (r.status_code == 200) is stored
    assert (len(cache.store.keys()) > 0) is stored


async def test_other_responses_are_stored_when_the_policy_opts_in(clock: ManualClock) -> None:
    upstream, _cache, client = make(clock, CachePolicy(store_paths=(r"^/api/",)))
    async with client:
        await client.get("/api/status")
        upstream.mode = "raise"
        r = await client.get("/api/status")
    assert r.status_code == 200 and r.headers["x-seawall-cache"] == "hit"
    with pytest.raises(PolicyError, match="store_paths"):
        CachePolicy(store_paths=("(",))


async def test_per_client_fields_are_never_stored_nor_replayed(clock: ManualClock) -> None:
    upstream, cache, client = make(clock)
    upstream.extra_headers = [
        (b"ratelimit", b'"default";r=1;t=30'),
        (b"ratelimit-policy", b'"default";q=100;w=60'),
        (b"x-ratelimit-remaining", b"1"),
        (b"x-registry", b"1"),
    ]
    async with client:
        await client.get(MANIFEST_URL)
        upstream.mode = "fail"
        r = await client.get(MANIFEST_URL)
    assert r.status_code == 200 and r.headers["x-seawall-cache"] == "hit"
    assert not [k for k in r.headers if "ratelimit" in k.lower()]
    assert r.headers["x-registry"] == "1"
    hit = await cache.lookup(request_for(MANIFEST_URL))
    assert hit is not None and not [k for k, _ in hit.headers if "ratelimit" in k]
