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
import statistics
from collections.abc import Callable
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from asgi_bench import Runner, client_address, http_scope, measure
from asgi_bench import runner as asgi_runner
from seawall import FallbackCacheMiddleware, LoadShedMiddleware, RateLimitMiddleware
from seawall.events import EventBus
from seawall.telemetry import EventLogger
from seawall.telemetry.otel import OpenTelemetryMetrics
from seawall.telemetry.prometheus import PrometheusMetrics

KEY_SPAN = 500  # requests per client address; the default limit is 1000/minute
PATH = "/v2/library/app/manifests/latest"


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


def runner(app: ASGIApp) -> Runner:
    return asgi_runner(app, lambda i: http_scope(PATH, client=client_address(i // KEY_SPAN)))


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
    seconds = asyncio.run(measure(runners, n, repeats, warmup=500))
    samples = {name: [v * 1e6 for v in values] for name, values in seconds.items()}
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
