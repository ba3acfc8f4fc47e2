"""What metrics cost: the default server stack with and without each telemetry listener.

The stack is the README's, every middleware with its defaults:
``FallbackCacheMiddleware(LoadShedMiddleware(RateLimitMiddleware(app)))``, all on one
``EventBus``. Without a listener no event is even built (the bus is inactive); with one,
every request emits ``RateLimitAdmitted`` and the cache records the response
(``CacheStored``), so this is the success path's worst case for telemetry.

Variants (same run, shuffled order each round, ASGI app called directly):

* bare Starlette (the floor);
* the stack, metrics off (no listener);
* the stack + ``PrometheusMetrics`` (a private ``CollectorRegistry``);
* the stack + ``OpenTelemetryMetrics`` (the SDK's ``MeterProvider`` with an in-memory
  reader; span events on, but no span is current);
* the stack + ``EventLogger`` (the ``seawall`` logger at its default level: nothing on
  the success path is a log line, so this is the cost of asking).

The client addresses rotate every ``KEY_SPAN`` requests, below the default per-client
limit, so nothing is refused.

    .venv/bin/python benchmarks/telemetry_overhead.py            # full run
    .venv/bin/python benchmarks/telemetry_overhead.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from seawall import FallbackCacheMiddleware, LoadShedMiddleware, RateLimitMiddleware
from seawall.events import EventBus
from seawall.telemetry import EventLogger
from seawall.telemetry.otel import OpenTelemetryMetrics
from seawall.telemetry.prometheus import PrometheusMetrics

KEY_SPAN = 500  # requests per client address; the default limit is 1000/minute
PATH = "/v2/library/app/manifests/latest"

Runner = Callable[[int, int], Awaitable[float]]


async def manifest(_request: Any) -> PlainTextResponse:
    return PlainTextResponse('{"schemaVersion": 2}', media_type="application/json")


def stack(listener: Callable[[Any], None] | None) -> ASGIApp:
    bus = EventBus()
    if listener is not None:
        bus.subscribe(listener)
    app = Starlette(routes=[Route(PATH, manifest)])
    app.add_middleware(RateLimitMiddleware, events=bus)
    app.add_middleware(LoadShedMiddleware, events=bus)
    app.add_middleware(FallbackCacheMiddleware, events=bus)  # added last: outermost
    return app


def make_scope(i: int) -> dict[str, Any]:
    n = i // KEY_SPAN
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), (b"user-agent", b"bench")],
        "client": (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", 40000),
        "server": ("bench", 80),
        "state": {},
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def runner(app: ASGIApp) -> Runner:
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def run(start: int, n: int) -> float:
        scopes = [make_scope(start + i) for i in range(n)]
        statuses.clear()
        t0 = time.perf_counter()
        for scope in scopes:
            await app(scope, receive, send)
        dt = time.perf_counter() - t0
        assert statuses and all(s == 200 for s in statuses), set(statuses)
        return dt / n

    return run


async def measure(runners: dict[str, Runner], n: int, repeats: int) -> dict[str, list[float]]:
    """Per-round µs/request of every variant, rounds in a shuffled order (drift lands on all)."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    offsets = dict.fromkeys(runners, 0)
    order = list(runners)
    rng = random.Random(7)
    for name, run in runners.items():  # warm-up: middleware stacks build on first call
        await run(offsets[name], min(n, 500))
        offsets[name] += min(n, 500)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            gc.collect()
            samples[name].append(await runners[name](offsets[name], n) * 1e6)
            offsets[name] += n
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats")
    args = parser.parse_args()
    n, repeats = (2_000, 5) if args.quick else (10_000, 15)

    reader = InMemoryMetricReader()
    runners: dict[str, Runner] = {
        "bare starlette": runner(Starlette(routes=[Route(PATH, manifest)])),
        "stack, metrics off": runner(stack(None)),
        "stack + PrometheusMetrics": runner(stack(PrometheusMetrics(CollectorRegistry()))),
        "stack + OpenTelemetryMetrics": runner(
            stack(OpenTelemetryMetrics(MeterProvider(metric_readers=[reader])))
        ),
        "stack + EventLogger": runner(stack(EventLogger())),
    }
    samples = asyncio.run(measure(runners, n, repeats))
    bare, off = samples["bare starlette"], samples["stack, metrics off"]
    print(f"\n{n} requests x {repeats} rounds per variant (shuffled order), median µs/request")
    print("'stack added' = median over rounds of (variant - bare starlette), same round;")
    print("'exporter' = median over rounds of (variant - stack, metrics off), same round;")
    print("'ratio' = stack added with the exporter / stack added without it.\n")
    print(f"{'variant':<32} {'µs/req':>8} {'stack added':>12} {'exporter':>9} {'ratio':>6}")
    off_added = statistics.median(o - b for o, b in zip(off, bare, strict=True))
    for name, values in samples.items():
        added = statistics.median(v - b for v, b in zip(values, bare, strict=True))
        extra = statistics.median(v - o for v, o in zip(values, off, strict=True))
        ratio = added / off_added if name != "bare starlette" else float("nan")
        print(
            f"{name:<32} {statistics.median(values):8.2f} {added:12.2f} {extra:9.2f} {ratio:6.2f}"
        )


if __name__ == "__main__":
    main()
