"""The server face as the README composes it: the cache outside the shedder.

A request that LoadShedMiddleware refuses is answered by FallbackCacheMiddleware from a
copy recorded earlier, so a shed build step still gets its manifest.
"""

from __future__ import annotations

import asyncio

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
