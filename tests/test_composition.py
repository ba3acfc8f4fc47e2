"""The server face as the README composes it: the cache outside the shedder.

A request that LoadShedMiddleware refuses is answered by FallbackCacheMiddleware from a
copy recorded earlier, so a shed build step still gets its manifest.
"""

from __future__ import annotations

import asyncio
import hashlib

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from seawall import FallbackCacheMiddleware, LoadShedMiddleware, ManualClock, ShedPolicy

MANIFEST = b'{"schemaVersion": 2, "layers": []}'


def registry(gate: asyncio.Event) -> Starlette:
    async def manifest(request: Request) -> Response:
        if request.query_params.get("hold"):
            await gate.wait()
        return Response(MANIFEST, media_type="application/vnd.oci.image.manifest.v1+json")

    return Starlette(routes=[Route("/v2/app/manifests/{tag}", manifest)])


async def test_a_shed_request_is_answered_from_the_cache(clock: ManualClock) -> None:
    gate = asyncio.Event()
    app = registry(gate)
    policy = ShedPolicy(
        adaptive=False, min_limit=1, initial_limit=1, max_queue_length=0, classes=()
    )
    app.add_middleware(LoadShedMiddleware, policy=policy, clock=clock)
    app.add_middleware(FallbackCacheMiddleware, clock=clock)  # added last: outermost
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        first = await client.get("/v2/app/manifests/latest")
        assert first.status_code == 200 and "x-seawall-cache" not in first.headers

        holder = asyncio.create_task(client.get("/v2/app/manifests/other?hold=1"))
        for _ in range(50):  # let the holder take the only slot
            await asyncio.sleep(0)
        clock.advance(120)  # past the default 60 s freshness: stale-if-error
        shed_but_served = await client.get("/v2/app/manifests/latest")
        uncached = await client.get("/v2/app/manifests/never-seen")
        gate.set()
        assert (await holder).status_code == 200

    assert shed_but_served.status_code == 200
    assert shed_but_served.content == MANIFEST
    assert shed_but_served.headers["x-seawall-cache"] == "stale"
    assert uncached.status_code == 503 and uncached.headers["x-seawall-refused"] == "shed"
    assert int(uncached.headers["retry-after"]) >= 1


LAYER = b"layer bytes " * 100
LAYER_URL = "/v2/app/blobs/sha256:" + hashlib.sha256(LAYER).hexdigest()


async def test_while_shedding_copies_by_digest_are_served_before_the_app(
    clock: ManualClock,
) -> None:
    """Under overload a verified layer costs the registry nothing; a healthy app is asked."""
    gate = asyncio.Event()
    calls: list[str] = []

    async def layer(request: Request) -> Response:
        calls.append(request.url.path)
        return Response(LAYER, media_type="application/octet-stream")

    async def manifest(request: Request) -> Response:
        calls.append(request.url.path)
        if request.query_params.get("hold"):
            await gate.wait()
        return Response(MANIFEST, media_type="application/vnd.oci.image.manifest.v1+json")

    app = Starlette(
        routes=[Route("/v2/app/blobs/{digest}", layer), Route("/v2/app/manifests/{tag}", manifest)]
    )
    policy = ShedPolicy(adaptive=False, min_limit=1, initial_limit=1, max_queue_length=0)
    app.add_middleware(LoadShedMiddleware, policy=policy, clock=clock)
    app.add_middleware(FallbackCacheMiddleware, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        assert (await client.get(LAYER_URL)).status_code == 200  # recorded
        healthy = await client.get(LAYER_URL)  # a healthy app is asked, not the copy
        assert (
            "x-seawall-cache" not in healthy.headers and calls.count(LAYER_URL.split("?")[0]) == 2
        )
        holder = asyncio.create_task(client.get("/v2/app/manifests/v1?hold=1"))
        for _ in range(50):
            await asyncio.sleep(0)
        shed = await client.get("/v2/app/manifests/other")  # refused: Retry-After 1 s
        assert shed.status_code == 503
        gate.set()
        await holder  # the slot is free again, but the server said "come back in 1 s"
        before = len(calls)
        during = await client.get(LAYER_URL)
        assert during.status_code == 200 and during.content == LAYER
        assert during.headers["x-seawall-cache"] == "verified" and len(calls) == before
        clock.advance(1.5)  # past the Retry-After: the app is the authority again
        after = await client.get(LAYER_URL)
        assert "x-seawall-cache" not in after.headers and len(calls) == before + 1
