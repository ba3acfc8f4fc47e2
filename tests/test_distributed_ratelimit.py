"""Distributed rate limits on a real Redis: exact under bursts, across processes, and when
Redis dies or hangs; the shortfalls of limits' Redis storage that made seawall's own."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from limits import parse
from limits.aio.storage import RedisStorage as LimitsRedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message

from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.breaker import BreakerState
from seawall.clock import ManualClock
from seawall.events import EventBus
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.ratelimit import RateLimiter
from seawall.redis_storage import SCHEMA, RedisLimitStorage
from seawall.storage import BoundedMemoryStorage

pytestmark = pytest.mark.redis

STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]


def _name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


async def home(_request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def _app(policy: RateLimitPolicy, **kwargs: Any) -> Starlette:
    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(RateLimitMiddleware, policy=policy, events=EventBus(), **kwargs)
    return app


def _client(app: Any, peer: str = "198.51.100.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def _shutdown(app: Any) -> None:
    """Run the ASGI lifespan to its end, as a server does on shutdown."""
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --- exact under bursts ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_500_concurrent_requests_against_10_per_minute_admit_exactly_10(
    redis_url: str, strategy: str
) -> None:
    """Issue 14 measured 410 admitted (redis-py's pool raised "Too many connections" and
    each such request failed open). Now a burst waits for one of 32 connections."""
    policy = RateLimitPolicy(
        limit="10/minute",
        storage=redis_url,
        name=_name(),
        strategy=strategy,  # type: ignore[arg-type]
        on_storage_error="closed",  # a storage error would show as a 503
        # The burst and its client share one event loop on a machine shared with other
        # jobs: give loop lag room, the point here is the pool, not the timeout.
        storage_timeout=2.0,
    )
    app = _app(policy)
    async with _client(app) as client:
        responses = await asyncio.gather(*(client.get("/") for _ in range(500)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 490
    limited = next(r for r in responses if r.status_code == 429)
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert limited.headers["ratelimit-policy"] == f'"{policy.name}";q=10;w=60'
    await _shutdown(app)


async def test_several_limits_are_one_round_trip_and_atomic(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rates in two rules: one EVALSHA per request, counted where redis-py writes to
    the socket. A request refused by the global rate consumes none of its tenant's."""
    from redis.asyncio.connection import AbstractConnection

    writes = 0
    original = AbstractConnection.send_packed_command

    async def counting(self: Any, command: Any, check_health: bool = True) -> None:
        nonlocal writes
        writes += 1
        await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    policy = RateLimitPolicy(
        limit="3/second;4/minute",
        key="header:x-tenant",
        header_keys_verified=True,
        storage=redis_url,
        name=_name(),
        rules=(LimitRule("5/minute", key="global", name=_name()),),
    )
    limiter = RateLimiter(policy, events=EventBus())
    await limiter.hit(("h:warm", "*"))  # loads the script once (EVALSHA, SCRIPT LOAD)
    writes = 0
    a = [(await limiter.hit(("h:a", "*"))).admitted for _ in range(3)]
    b = [(await limiter.hit(("h:b", "*"))).admitted for _ in range(3)]
    assert writes == 6
    assert a == [True, True, True]
    assert b == [True, False, False]  # global 5 = warm + a:3 + b:1
    await limiter.clear(("h:b", "*"))
    assert (await limiter.hit(("h:b", "*"))).admitted
    await limiter.aclose()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_keys_carry_schema_and_strategy_and_all_expire(redis_url: str, strategy: str) -> None:
    name = _name()
    policy = RateLimitPolicy(
        limit="5/minute",
        storage=redis_url,
        name=name,
        strategy=strategy,  # type: ignore[arg-type]
        key="header:x-tenant",  # with its per-address twin: two keys
    )
    limiter = RateLimiter(policy, events=EventBus())
    await limiter.hit(("h:acme", "ip:198.51.100.9"), cost=2)
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"seawall:*:{name}*")])
        assert keys == [
            f"seawall:{SCHEMA}:{strategy}:{name}-client:5/60:{{ip:198.51.100.9}}",
            f"seawall:{SCHEMA}:{strategy}:{name}:5/60:{{h:acme}}",
        ]
        for key in keys:
            ttl = await client.pttl(key)
            assert 0 < ttl <= (120_000 if strategy == "sliding-window-counter" else 60_000)
    finally:
        await client.aclose()
        await limiter.aclose()


async def test_two_strategies_on_one_redis_are_both_enforced(redis_url: str) -> None:
    """Two app versions side by side, same rule name, different strategies."""
    name = _name()
    old = RateLimiter(
        RateLimitPolicy(limit="3/minute", storage=redis_url, name=name, strategy="fixed-window"),
        events=EventBus(),
    )
    new = RateLimiter(
        RateLimitPolicy(limit="2/minute", storage=redis_url, name=name, strategy="moving-window"),
        events=EventBus(),
    )
    keys = ("ip:203.0.113.50",)
    old_results = [(await old.hit(keys)).admitted for _ in range(4)]
    new_results = [(await new.hit(keys)).admitted for _ in range(3)]
    assert old_results == [True, True, True, False]
    assert new_results == [True, True, False]
    assert old.storage_failures == new.storage_failures == 0
    await old.aclose()
    await new.aclose()


async def test_limits_redis_storage_shortfall_wrongtype(redis_url: str) -> None:
    """Why seawall has its own keys: limits names a rate's key without its strategy, so a
    fixed window and a moving window of one rate collide, and Redis answers WRONGTYPE."""
    from redis.exceptions import ResponseError

    storage = LimitsRedisStorage("async+" + redis_url, implementation="redispy", key_prefix=_name())
    item = parse("3/minute")
    assert await FixedWindowRateLimiter(storage).hit(item, "k")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await MovingWindowRateLimiter(storage).hit(item, "k")
    await storage.bridge.storage.aclose()  # type: ignore[attr-defined]


# --- the same decisions as the in-process twin --------------------------------------------


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    strategy=st.sampled_from(STRATEGIES),
    limit=st.sampled_from(["3/10second", "5/minute", "2/15second;4/minute", "7/minute"]),
    steps=st.lists(
        st.tuples(st.integers(0, 80), st.integers(1, 8)),  # (eighths of a second, cost)
        min_size=1,
        max_size=25,
    ),
)
def test_redis_scripts_decide_exactly_like_the_memory_storage(
    redis_url: str, strategy: str, limit: str, steps: list[tuple[int, int]]
) -> None:
    """Same driven clock, same requests: same admissions, same remaining, same reset (to
    the millisecond Redis answers in). Times are multiples of 1/8 s, exact in seconds and
    in milliseconds, so both sides see the same window boundaries."""
    clock = ManualClock(start=0.0, wall_start=0.0)
    policy = RateLimitPolicy(limit=limit, strategy=strategy, name=_name())  # type: ignore[arg-type]

    async def run() -> None:
        memory = RateLimiter(policy, storage=BoundedMemoryStorage(clock=clock), clock=clock)
        shared = RateLimiter(policy, storage=RedisLimitStorage(redis_url, clock=clock), clock=clock)
        try:
            for eighths, cost in steps:
                clock.advance(eighths / 8)
                ours = memory.hit_now(("k",), cost)
                theirs = await shared.hit(("k",), cost)
                assert theirs.storage_failed is False
                assert (ours.admitted, ours.rule, ours.remaining) == (
                    theirs.admitted,
                    theirs.rule,
                    theirs.remaining,
                )
                assert theirs.reset_after == pytest.approx(ours.reset_after, abs=0.0011)
                assert theirs.retry_after == pytest.approx(ours.retry_after, abs=0.0011)
        finally:
            await shared.aclose()

    asyncio.run(run())


# --- token bucket -----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["memory", "redis"])
async def test_token_bucket_allows_the_burst_then_the_sustained_rate(
    redis_url: str, where: str
) -> None:
    """ "10/10second" as a token bucket: a CI fan-out of 10 at once, then 1 per second."""
    clock = ManualClock()
    policy = RateLimitPolicy(
        limit="10/10second",
        strategy="token-bucket",
        name=_name(),
        storage=redis_url if where == "redis" else "memory://",
    )
    app = _app(policy, clock=clock)
    async with _client(app) as client:
        burst = [await client.get("/") for _ in range(11)]
        clock.advance(1.0)
        refilled = [await client.get("/") for _ in range(2)]
        clock.advance(0.5)
        half = await client.get("/")
        clock.advance(10.0)
        full = await client.get("/")
    assert [r.status_code for r in burst] == [200] * 10 + [429]
    assert burst[0].headers["ratelimit"] == f'"{policy.name}";r=9;t=1'
    assert burst[9].headers["ratelimit"] == f'"{policy.name}";r=0;t=10'
    assert burst[10].headers["retry-after"] == "1"
    assert [r.status_code for r in refilled] == [200, 429]
    assert half.status_code == 429
    assert half.headers["retry-after"] == "1"  # 0.5 s rounds up
    assert full.headers["ratelimit"] == f'"{policy.name}";r=9;t=1'
    await _shutdown(app)


# --- when Redis dies or hangs -----------------------------------------------------------


async def test_redis_killed_then_restarted_sharing_resumes_without_a_restart(
    redis_process: Callable[..., Any],
) -> None:
    """No 5xx while Redis is down (fail open: in-process limits), and once it is back the
    store's breaker probes it and the shared counters are used again."""
    server = redis_process()
    clock = ManualClock()
    name = _name()
    policy = RateLimitPolicy(limit="5/minute", storage=server.url, name=name)
    app = _app(policy, clock=clock)
    middleware = app.build_middleware_stack()
    limiter = _limiter_of(middleware)
    breaker = limiter.storage_breaker
    assert breaker is not None
    async with _client(middleware) as client:
        before = [(await client.get("/")).status_code for _ in range(2)]
        server.stop()
        during = [(await client.get("/")).status_code for _ in range(6)]
        assert breaker.state is BreakerState.OPEN
        server = redis_process(port=server.port)
        clock.advance(6.0)  # past the longest open period (5 s plus jitter)
        after = [(await client.get("/")).status_code for _ in range(2)]
        assert breaker.state is BreakerState.CLOSED
    assert before == [200, 200]
    assert set(during) <= {200, 429}
    assert during.count(200) == 5  # the in-process limits, counted from the outage
    assert after == [200, 200]
    check = aioredis.Redis.from_url(server.url)
    keys = [k async for k in check.scan_iter(match=f"seawall:*:{name}:*")]
    await check.aclose()
    assert len(keys) == 1  # the new server holds the shared counter again
    await _shutdown(middleware)


def _limiter_of(app: Any) -> RateLimiter:
    while not isinstance(app, RateLimitMiddleware):
        app = app.app
    return app.limiter


async def test_paused_redis_costs_at_most_the_timeout_until_the_breaker_opens(
    redis_process: Callable[..., Any],
) -> None:
    """SIGSTOP: the socket accepts, nothing answers. Issue 14 measured the full timeout on
    every request for as long as the pause lasts; now until the breaker opens, then ~0."""
    server = redis_process()
    timeout = 0.2
    policy = RateLimitPolicy(
        limit="100/minute", storage=server.url, name=_name(), storage_timeout=timeout
    )
    app = _app(policy)
    latencies: list[float] = []
    statuses: list[int] = []
    try:
        async with _client(app) as client:
            assert (await client.get("/")).status_code == 200  # connected while healthy
            server.pause()
            for _ in range(10):
                started = time.perf_counter()
                statuses.append((await client.get("/")).status_code)
                latencies.append(time.perf_counter() - started)
            burst_started = time.perf_counter()
            burst = await asyncio.gather(*(client.get("/") for _ in range(50)))
            burst_took = time.perf_counter() - burst_started
    finally:
        server.resume()
    assert set(statuses) == {200}  # fail open: in-process limits
    paid = [t for t in latencies if t > timeout / 2]
    assert len(paid) == 2  # with the earlier success, 2 timeouts of 3 calls open it
    assert all(t < timeout + 0.15 for t in latencies[:2])
    assert max(latencies[2:]) < timeout / 4
    assert {r.status_code for r in burst} == {200}
    assert burst_took < timeout
    print(f"\nSIGSTOP latencies (ms): {[round(t * 1000, 1) for t in latencies]}")
    await _shutdown(app)


async def test_fail_closed_answers_503_at_once_while_the_breaker_is_open(
    redis_process: Callable[..., Any],
) -> None:
    server = redis_process()
    policy = RateLimitPolicy(
        limit="100/minute",
        storage=server.url,
        name=_name(),
        on_storage_error="closed",
        closed_retry_after=3,
    )
    app = _app(policy)
    async with _client(app) as client:
        server.stop()
        responses = [await client.get("/") for _ in range(5)]
    assert {r.status_code for r in responses} == {503}
    assert {r.headers["retry-after"] for r in responses} == {"3"}
    assert {r.headers["x-seawall-refused"] for r in responses} == {"rate-limit"}


async def test_lifespan_shutdown_closes_every_connection(
    redis_process: Callable[..., Any],
) -> None:
    server = redis_process()
    policy = RateLimitPolicy(limit="1000/minute", storage=server.url, name=_name())
    app = _app(policy)
    check = aioredis.Redis.from_url(server.url)
    try:
        async with _client(app) as client:
            await asyncio.gather(*(client.get("/") for _ in range(100)))
        assert len(await check.client_list()) > 1  # the app's pool, and this client
        await _shutdown(app)
        assert len(await check.client_list()) == 1
    finally:
        await check.aclose()


# --- several processes --------------------------------------------------------------------


@pytest.fixture
def uvicorn_servers(redis_url: str) -> Iterator[tuple[list[str], str]]:
    """Four uvicorn processes on loopback serving one app with one shared limit."""
    name = _name()
    env = {
        **os.environ,
        "SEAWALL_TEST_STORAGE": redis_url,
        "SEAWALL_TEST_NAME": name,
        "SEAWALL_TEST_LIMIT": "100/minute",
    }
    tests = Path(__file__).parent
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    for _ in range(4):
        sock = __import__("socket").socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "uvicorn",
                    "--app-dir",
                    str(tests),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    "distributed_app:app",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        for url, proc in zip(urls, procs, strict=True):
            while True:
                if proc.poll() is not None:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    pytest.fail(f"uvicorn exited: {err[-2000:]}")
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail("uvicorn did not start within 30 s")
                time.sleep(0.1)
        yield urls, name
    finally:
        for proc in procs:  # by process id, never by name
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def test_four_server_processes_admit_the_limit_in_total(
    uvicorn_servers: tuple[list[str], str],
) -> None:
    """Issue 14 measured 300 admitted for 4 workers x 150 against 100/minute."""
    urls, _ = uvicorn_servers
    limits = httpx.Limits(max_connections=150, max_keepalive_connections=150)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        responses = await asyncio.gather(
            *(client.get(url + "/") for _ in range(150) for url in urls)  # interleaved
        )
    statuses = [r.status_code for r in responses]
    served_by = {r.text for r in responses if r.status_code == 200}
    assert statuses.count(200) == 100
    assert statuses.count(429) == 500
    assert len(served_by) >= 2  # admissions came from several processes


async def test_limits_redis_storage_shortfall_a_burst_fails_at_once(redis_url: str) -> None:
    """Why seawall's pool blocks: redis-py's default async pool raises "Too many
    connections" as soon as a burst exceeds it, and each such request failed open."""
    from limits.errors import StorageError

    storage = LimitsRedisStorage(
        "async+" + redis_url,
        implementation="redispy",
        key_prefix=_name(),
        max_connections=5,
        wrap_exceptions=True,
    )
    strategy = MovingWindowRateLimiter(storage)
    item = parse("1000/minute")
    results = await asyncio.gather(
        *(strategy.hit(item, "k") for _ in range(100)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, StorageError)]
    assert errors
    assert "Too many connections" in str(errors[0].storage_error)
    await storage.bridge.storage.aclose()  # type: ignore[attr-defined]
