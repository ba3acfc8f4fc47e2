"""Telemetry: scripted runs of the real middleware and transport, driven by ManualClock, then
the Prometheus registry scraped, OpenTelemetry's in-memory reader read and the logs read.

Expected counts come from the script's own semantics (stated next to each assertion),
never from what the exporter happened to record.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from seawall import (
    BreakerPolicy,
    ClientPolicy,
    FallbackCacheMiddleware,
    LimitRule,
    LoadShedMiddleware,
    ManualClock,
    RateLimitMiddleware,
    RateLimitPolicy,
    ResilientTransport,
    RetryPolicy,
    ShedPolicy,
)
from seawall.breaker import BreakerState, BreakerStateChanged
from seawall.events import Event, EventBus
from seawall.ratelimit import RateLimited
from seawall.shed import RequestShed
from seawall.telemetry import SIGNALS, EventLogger
from seawall.telemetry.otel import OpenTelemetryMetrics
from seawall.telemetry.prometheus import PrometheusMetrics
from seawall.telemetry.signals import OTHER, LabelLimiter, reason_kind, signal_for

# --------------------------------------------------------------------------- helpers


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the registry's exposition, parsed back as Prometheus would."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: dict[Any, float], prefix: str) -> list[Any]:
    return [k for k in samples if k[0].startswith(prefix)]


def scope(path: str, client: str, method: str = "GET") -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"registry")],
        "client": (client, 40000),
        "server": ("registry", 80),
        "state": {},
    }


async def call(app: Any, s: Scope) -> int:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await app(s, receive, send)
    return statuses[0]


async def ok(_request: Request) -> Response:
    return PlainTextResponse("ok")


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def registry(bus: EventBus) -> CollectorRegistry:
    reg = CollectorRegistry()
    PrometheusMetrics(reg).attach(bus)
    return reg


# --------------------------------------------------------------------------- the table


def test_every_event_class_in_the_package_has_a_row() -> None:
    """A new Event subclass must get a row (or this test says which one is missing)."""
    import importlib
    import pkgutil

    import seawall
    from seawall.events import Event

    for mod in pkgutil.walk_packages(seawall.__path__, "seawall."):
        if not mod.name.startswith(("seawall.replay", "seawall.telemetry")):
            importlib.import_module(mod.name)

    def subclasses(cls: type) -> Iterator[type]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    # dataclass(slots=True) replaces each class: keep the ones their module really holds.
    events = {
        c
        for c in subclasses(Event)
        if c.__module__.startswith("seawall.")
        and not c.__module__.startswith("seawall.replay")
        and getattr(sys.modules[c.__module__], c.__name__, None) is c
    }
    assert len(events) >= 18
    missing = sorted(c.__name__ for c in events if signal_for(c) is None)
    assert missing == []
    assert len({s.event for s in SIGNALS}) == len(SIGNALS)


def test_names_follow_prometheus_conventions() -> None:
    names = [m.name for s in SIGNALS for m in s.metrics]
    assert len(names) == len(set(names))
    for s in SIGNALS:
        for m in s.metrics:
            assert m.name.startswith("seawall_") and not m.name.endswith("_total")
            assert set(m.labels) <= set(s.label_names)
            if m.kind == "histogram":
                assert m.name.endswith(("_seconds", "_bytes"))
            for forbidden in ("key", "client", "url", "address", "token"):
                assert forbidden not in s.label_names


def test_reason_kind_keeps_words_and_drops_numbers() -> None:
    assert reason_kind("status 503") == "status 503"
    assert reason_kind("ConnectError") == "ConnectError"
    assert reason_kind("size 12 != recorded 13") == "size"
    assert reason_kind("incomplete body: 1 of 2 bytes") == "incomplete body"
    assert reason_kind("unreadable body: [Errno 28] No space") == "unreadable body"
    assert reason_kind("12345") == OTHER


def test_label_limiter_folds_values_past_the_cap() -> None:
    limit = LabelLimiter(max_values=3)
    assert [limit("upstream", f"h{i}") for i in range(5)] == ["h0", "h1", "h2", OTHER, OTHER]
    assert limit("upstream", "h1") == "h1"  # values already seen keep their series
    assert limit("policy", "p") == "p"  # each label name has its own cap


# --------------------------------------------------------------------------- Prometheus


async def test_rate_limit_counts_by_policy(
    bus: EventBus, registry: CollectorRegistry, clock: ManualClock
) -> None:
    policy = RateLimitPolicy(limit="3/minute", rules=(LimitRule("5/minute", "global", "global"),))
    app = RateLimitMiddleware(Starlette(routes=[Route("/", ok)]), policy, clock=clock, events=bus)
    # Client A: 3 fit (its own 3/minute is the tighter rule each time), the 4th is refused
    # by "default". Client B: the global rule has 2 left and is then the tighter one,
    # so B's 2 admissions count under "global" and its 3rd is refused by "global".
    a = [await call(app, scope("/", "10.0.0.1")) for _ in range(4)]
    b = [await call(app, scope("/", "10.0.0.2")) for _ in range(3)]
    assert a == [200, 200, 200, 429] and b == [200, 200, 429]
    s = scrape(registry)
    assert value(s, "seawall_ratelimit_admitted_requests_total", policy="default") == 3
    assert value(s, "seawall_ratelimit_admitted_requests_total", policy="global") == 2
    assert value(s, "seawall_ratelimit_limited_requests_total", policy="default") == 1
    assert value(s, "seawall_ratelimit_limited_requests_total", policy="global") == 1
    assert value(s, "seawall_ratelimit_retry_after_seconds_count", policy="default") == 1
    assert value(s, "seawall_ratelimit_retry_after_seconds_sum", policy="default") == 60.0


def registry_app(gate: asyncio.Event) -> Starlette:
    async def manifest(request: Request) -> Response:
        if request.query_params.get("hold"):
            await gate.wait()
        return Response(b'{"schemaVersion": 2}', media_type="application/json")

    return Starlette(routes=[Route("/v2/app/manifests/{tag}", manifest)])


async def test_shed_and_cache_counts(
    bus: EventBus, registry: CollectorRegistry, clock: ManualClock
) -> None:
    gate = asyncio.Event()
    app = registry_app(gate)
    one_slot = ShedPolicy(
        adaptive=False, min_limit=1, initial_limit=1, max_queue_length=0, classes=()
    )
    app.add_middleware(LoadShedMiddleware, policy=one_slot, clock=clock, events=bus)
    app.add_middleware(FallbackCacheMiddleware, clock=clock, events=bus)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://registry") as client:
        assert (await client.get("/v2/app/manifests/latest")).status_code == 200  # stored
        holder = asyncio.create_task(client.get("/v2/app/manifests/other?hold=1"))
        for _ in range(50):
            await asyncio.sleep(0)
        clock.advance(120)  # the stored manifest is now stale
        stale = await client.get("/v2/app/manifests/latest")  # shed, answered stale
        refused = await client.get("/v2/app/manifests/never-seen")  # shed, nothing stored
        gate.set()
        await holder
    assert stale.headers["x-seawall-cache"] == "stale" and refused.status_code == 503
    s = scrape(registry)
    # Two requests found the only slot taken and no queue: queue_full, default priority 20.
    assert value(s, "seawall_shed_requests_total", reason="queue_full", priority="20") == 2
    assert value(s, "seawall_cache_served_responses_total", state="stale", reason="status 503") == 1
    assert value(s, "seawall_cache_served_age_seconds_count", state="stale") == 1
    assert value(s, "seawall_cache_served_age_seconds_sum", state="stale") == 120
    # Stored: the first manifest and the held one once it completed (two 200s of GETs).
    assert value(s, "seawall_cache_stored_responses_total") == 2
    assert value(s, "seawall_cache_stored_bytes_total") == 2 * len(b'{"schemaVersion": 2}')


def failing_then_healthy_upstream() -> tuple[httpx.MockTransport, list[int]]:
    status = [503]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status[0])

    return httpx.MockTransport(handler), status


CLIENT_POLICY = ClientPolicy(
    retry=RetryPolicy(
        attempts=3,
        backoff_base=0.1,
        backoff_cap=0.1,
        budget_ratio=0.0,  # only the floor: 0.1/s x 10 s = 1 retry per window
        budget_min_retries_per_second=0.1,
        budget_window=10.0,
    ),
    breaker=BreakerPolicy(
        window="count",
        window_size=2,
        minimum_calls=2,
        failure_rate_threshold=0.5,
        open_duration=30.0,
        max_open_duration=30.0,
        jitter=0.0,
        half_open_probes=1,
    ),
)


async def client_script(clock: ManualClock, bus: EventBus) -> None:
    """One failing call, two refused by the open breaker, then recovery through a probe."""
    inner, status = failing_then_healthy_upstream()
    transport = ResilientTransport(inner, CLIENT_POLICY, clock=clock, events=bus)
    async with httpx.AsyncClient(transport=transport) as client:
        # attempt 1: 503; the budget's single retry: 503 again, and two failures in a
        # window of 2 trip the breaker; a second retry finds the budget spent.
        assert (await client.get("http://registry.test/v2/")).status_code == 503
        for _ in range(2):  # refused without reaching the upstream
            with pytest.raises(httpx.TransportError):
                await client.get("http://registry.test/v2/")
        clock.advance(31)
        status[0] = 200  # one probe succeeds: half-open -> closed
        assert (await client.get("http://registry.test/v2/")).status_code == 200


async def test_client_counts_retries_budget_and_breaker(
    bus: EventBus, registry: CollectorRegistry, clock: ManualClock
) -> None:
    await client_script(clock, bus)
    s = scrape(registry)
    up = "registry.test"
    assert value(s, "seawall_retry_scheduled_total", upstream=up, reason="status 503") == 1
    assert value(s, "seawall_retry_wait_seconds_count", upstream=up) == 1
    assert value(s, "seawall_retry_budget_refused_total", upstream=up) == 1
    assert value(s, "seawall_retry_exhausted_calls_total", upstream=up, why="budget") == 1
    assert value(s, "seawall_breaker_rejected_calls_total", upstream=up, state="open") == 2
    transitions = {
        (dict(k[1])["from_state"], dict(k[1])["to_state"]): v
        for k, v in s.items()
        if k[0] == "seawall_breaker_transitions_total"
    }
    assert transitions == {
        ("closed", "open"): 1,
        ("open", "half_open"): 1,
        ("half_open", "closed"): 1,
    }
    assert value(s, "seawall_breaker_state", upstream=up) == 0  # closed again


async def test_label_cardinality_stays_bounded_under_100k_clients(
    bus: EventBus, registry: CollectorRegistry, clock: ManualClock
) -> None:
    """10^5 distinct client addresses, each admitted once then limited: 4 series in all."""
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/", ok)]),
        RateLimitPolicy(limit="1/minute", max_tracked_keys=200_000),
        clock=clock,
        events=bus,
    )
    n = 100_000
    for i in range(n):
        address = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert await call(app, scope("/", address)) == 200
        assert await call(app, scope("/", address)) == 429
    s = scrape(registry)
    assert value(s, "seawall_ratelimit_admitted_requests_total", policy="default") == n
    assert value(s, "seawall_ratelimit_limited_requests_total", policy="default") == n
    ratelimit_series = series(s, "seawall_ratelimit_")
    counters = [k for k in ratelimit_series if k[0].endswith("_total")]
    assert len(counters) == 2
    text = generate_latest(registry).decode()
    assert "10.0.0.1" not in text and "ip:" not in text


def test_unbounded_upstreams_are_folded_into_other(bus: EventBus) -> None:
    """A proxy fetching from 10^5 user-named hosts: at most 100 + 'other' series."""
    reg = CollectorRegistry()
    PrometheusMetrics(reg, max_label_values=100).attach(bus)
    for i in range(100_000):
        bus.emit(
            BreakerStateChanged(
                breaker=f"host{i}.example",
                old=BreakerState.CLOSED,
                new=BreakerState.OPEN,
                generation=1,
                failure_rate=1.0,
                slow_rate=0.0,
                reason="failure_rate",
                open_for=10.0,
            )
        )
    s = scrape(reg)
    states = [k for k in s if k[0] == "seawall_breaker_state"]
    assert len(states) == 101
    assert value(s, "seawall_breaker_state", upstream=OTHER) == 2
    other = value(
        s,
        "seawall_breaker_transitions_total",
        upstream=OTHER,
        from_state="closed",
        to_state="open",
    )
    assert other == 100_000 - 100


def test_a_broken_exporter_never_breaks_the_emitter(bus: EventBus) -> None:
    class Odd(RateLimited):
        pass

    reg = CollectorRegistry()
    PrometheusMetrics(reg).attach(bus)
    # A subclass of a listed event is counted as its base.
    bus.emit(Odd(rule="r", key="k", cost=1, limit=1, window=60, retry_after=1.0))
    assert value(scrape(reg), "seawall_ratelimit_limited_requests_total", policy="r") == 1

    class Unknown(Event):
        pass

    bus.emit(Unknown())  # no row: ignored, not an error


# --------------------------------------------------------------------------- OpenTelemetry


def otel_points(reader: InMemoryMetricReader) -> dict[tuple[str, frozenset[Any]], Any]:
    data = reader.get_metrics_data()
    out = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, frozenset(point.attributes.items()))
                    out[key] = point.value if hasattr(point, "value") else point.count
    return out


async def test_otel_metrics_match_the_prometheus_ones(bus: EventBus, clock: ManualClock) -> None:
    reader = InMemoryMetricReader()
    OpenTelemetryMetrics(MeterProvider(metric_readers=[reader]), spans=False).attach(bus)
    reg = CollectorRegistry()
    PrometheusMetrics(reg).attach(bus)
    await client_script(clock, bus)
    points = otel_points(reader)
    up = frozenset({("upstream", "registry.test")})
    assert points[("seawall.retry.scheduled", up | {("reason", "status 503")})] == 1
    assert points[("seawall.retry.budget_refused", up)] == 1
    assert points[("seawall.breaker.rejected_calls", up | {("state", "open")})] == 2
    assert points[("seawall.breaker.state", up)] == 0
    assert points[("seawall.retry.wait", up)] == 1  # histogram: one observation
    # The same numbers as Prometheus for every counter (Prometheus also shows unlabelled
    # counters at 0 that OpenTelemetry reports only once they are used).
    prom = scrape(reg)
    for (name, labels), v in prom.items():
        if name.endswith("_total"):
            base = name.removesuffix("_total").removesuffix("_bytes")
            assert points.get((base.replace("_", ".", 2), labels), 0) == v, name


async def test_otel_span_events_on_the_current_span(bus: EventBus, clock: ManualClock) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracer_provider.get_tracer("test")
    OpenTelemetryMetrics(MeterProvider()).attach(bus)
    with tracer.start_as_current_span("fetch"):
        await client_script(clock, bus)
    policy = RateLimitPolicy(limit="1/minute")
    app = RateLimitMiddleware(Starlette(routes=[Route("/", ok)]), policy, clock=clock, events=bus)
    with tracer.start_as_current_span("serve"):
        await call(app, scope("/", "10.0.0.9"))
        await call(app, scope("/", "10.0.0.9"))
    await call(app, scope("/", "10.0.0.9"))  # no current span: nothing recorded, no error
    spans = {s.name: [e.name for e in s.events] for s in exporter.get_finished_spans()}
    assert spans["fetch"] == [
        "seawall.retry",
        "seawall.short_circuited",
        "seawall.short_circuited",
    ]
    assert spans["serve"] == ["seawall.rate_limited"]
    (event,) = next(s for s in exporter.get_finished_spans() if s.name == "serve").events
    assert event.attributes is not None and event.attributes["seawall.policy"] == "default"
    assert "10.0.0.9" not in repr(dict(event.attributes))


# --------------------------------------------------------------------------- logging


async def test_logs_one_line_per_interval_during_an_outage(
    bus: EventBus, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    EventLogger(interval=60.0).attach(bus)
    app = RateLimitMiddleware(
        Starlette(routes=[Route("/", ok)]),
        RateLimitPolicy(limit="1/hour"),
        clock=clock,
        events=bus,
    )
    caplog.set_level(logging.INFO, logger="seawall")
    await call(app, scope("/", "10.0.0.1"))
    for _ in range(100):  # 100 refusals within 50 s: one line
        assert await call(app, scope("/", "10.0.0.1")) == 429
        clock.advance(0.5)
    lines = [r for r in caplog.records if r.name == "seawall.ratelimit"]
    assert len(lines) == 1 and "rate limit 'default' is refusing requests" in lines[0].message
    clock.advance(10)  # past the interval: the next refusal logs, with the count it stood for
    await call(app, scope("/", "10.0.0.1"))
    lines = [r for r in caplog.records if r.name == "seawall.ratelimit"]
    assert len(lines) == 2 and "(99 more like it in the last 60 s)" in lines[1].message
    assert all("10.0.0.1" not in r.getMessage() for r in caplog.records)


async def test_logs_every_breaker_transition(
    bus: EventBus, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    EventLogger(interval=60.0).attach(bus)
    caplog.set_level(logging.INFO, logger="seawall")
    await client_script(clock, bus)
    transitions = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert [t.split(":")[0] for t in transitions] == [
        "breaker registry.test closed -> open",
        "breaker registry.test open -> half_open",
        "breaker registry.test half_open -> closed",
    ]
    refusals = [r for r in caplog.records if "refusing calls" in r.getMessage()]
    assert len(refusals) == 1  # two refusals within the interval: one line


def test_shed_lines_are_warnings_and_keyed_by_priority(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    EventLogger(interval=60.0).attach(bus)
    caplog.set_level(logging.INFO, logger="seawall")
    for at in (0.0, 1.0, 2.0):
        bus.emit(RequestShed(at=at, reason="queue_full", priority=20, retry_after=1.0))
        bus.emit(RequestShed(at=at, reason="queue_full", priority=40, retry_after=1.0))
    lines = [r for r in caplog.records if r.name == "seawall.shed"]
    assert len(lines) == 2 and {r.levelno for r in lines} == {logging.WARNING}


def test_logging_off_costs_no_state(bus: EventBus) -> None:
    log = EventLogger(interval=60.0)
    log.attach(bus)
    logging.getLogger("seawall").setLevel(logging.ERROR)
    try:
        bus.emit(RequestShed(at=0.0, reason="queue_full", priority=20, retry_after=1.0))
    finally:
        logging.getLogger("seawall").setLevel(logging.NOTSET)
    assert not log._last
