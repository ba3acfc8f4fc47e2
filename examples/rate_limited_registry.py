"""A tiny artifact registry behind RateLimitMiddleware, hammered by a few tenants.

Three CI tenants pull "images" (one manifest lookup, then six blobs) through
``httpx.ASGITransport`` (in-process, no network), in waves every 5 s of *simulated* time
(a ManualClock drives the limiter, so a minute of traffic runs in well under a second).
Each tenant has its own budget, blobs cost more than manifests, a global cap protects the
registry as a whole, and ``/healthz`` is never limited. The table at the end shows what
each tenant saw: admitted, limited, and the Retry-After values that told it when to come
back.

    .venv/bin/python examples/rate_limited_registry.py
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import sys
import time

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.ratelimit import RateLimited

LAYERS = {f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}": 2048 + i for i in range(6)}


async def manifest(request: Request) -> JSONResponse:
    layers = [{"digest": d, "size": n} for d, n in LAYERS.items()]
    return JSONResponse({"schemaVersion": 2, "name": request.path_params["name"], "layers": layers})


async def blob(request: Request) -> Response:
    size = LAYERS.get(request.path_params["digest"])
    if size is None:
        return PlainTextResponse("blob unknown", status_code=404)
    return Response(b"\0" * size, media_type="application/octet-stream")


async def healthz(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


POLICY = RateLimitPolicy(
    limit="120/minute",  # per tenant
    key="header:x-tenant",
    rules=(LimitRule("250/minute", key="global", name="registry"),),
    costs={"/v2/*/blobs/*": 2},  # a blob pull costs two manifest lookups
)
CLOCK = ManualClock()

app = Starlette(
    routes=[
        Route("/v2/{name:path}/manifests/{reference}", manifest),
        Route("/v2/{name:path}/blobs/{digest}", blob),
        Route("/healthz", healthz),
    ]
)
BUS = EventBus()
app.add_middleware(RateLimitMiddleware, policy=POLICY, events=BUS, clock=CLOCK)


class Tally:
    def __init__(self) -> None:
        self.admitted = 0
        self.limited = 0
        self.retry_after: collections.Counter[int] = collections.Counter()


async def pull_images(client: httpx.AsyncClient, tenant: str, images: int, tally: Tally) -> None:
    headers = {"x-tenant": tenant}
    for i in range(images):
        r = await client.get(f"/v2/{tenant}/app{i % 3}/manifests/latest", headers=headers)
        paths = [f"/v2/{tenant}/app/blobs/{d}" for d in LAYERS] if r.status_code == 200 else []
        for resp in [r, *await asyncio.gather(*(client.get(p, headers=headers) for p in paths))]:
            if resp.status_code == 429:
                tally.limited += 1
                tally.retry_after[int(resp.headers["retry-after"])] += 1
            else:
                resp.raise_for_status()
                tally.admitted += 1


async def main() -> int:
    limited_by: collections.Counter[str] = collections.Counter()

    def listen(event: Event) -> None:
        if isinstance(event, RateLimited):
            limited_by[event.rule] += 1

    BUS.subscribe(listen)
    # Images pulled per 5 s wave: a greedy tenant, a busy one and a quiet one.
    plan = {"greedy-ci": 3.0, "busy-ci": 1.0, "quiet-dev": 0.25}
    tallies = {tenant: Tally() for tenant in plan}
    transport = httpx.ASGITransport(app=app, client=("10.0.0.5", 40000))
    started = time.perf_counter()
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        for wave in range(24):  # two simulated minutes
            due = {t: int((wave + 1) * rate) - int(wave * rate) for t, rate in plan.items()}
            await asyncio.gather(*(pull_images(client, t, n, tallies[t]) for t, n in due.items()))
            CLOCK.advance(5.0)
        health = [(await client.get("/healthz")).status_code for _ in range(50)]
    elapsed = time.perf_counter() - started

    print(
        f"policy: {POLICY.limit} per tenant, {POLICY.rules[0].limit} for the registry, "
        f"blobs cost {dict(POLICY.costs)['/v2/*/blobs/*']}\n"
    )
    print(
        f"{'tenant':<12} {'requests':>8} {'admitted':>8} {'limited':>8}  "
        "Retry-After seen (seconds: count)"
    )
    for tenant, tally in tallies.items():
        seen = ", ".join(f"{s}: {n}" for s, n in sorted(tally.retry_after.items())) or "-"
        total = tally.admitted + tally.limited
        print(f"{tenant:<12} {total:>8} {tally.admitted:>8} {tally.limited:>8}  {seen}")
    print(f"\nlimited by rule: {dict(limited_by)}")
    print(
        f"/healthz: {health.count(200)}/50 answered 200 (exempt); "
        f"120 s of simulated traffic ran in {elapsed:.2f} s"
    )
    ok = (
        all(code == 200 for code in health)
        and tallies["greedy-ci"].limited > 0
        and all(s >= 1 for t in tallies.values() for s in t.retry_after)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
