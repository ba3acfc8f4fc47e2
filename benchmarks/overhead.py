"""Per-request cost of seawall's RateLimitMiddleware against peers, in one process and run.

Each variant is a Starlette app driven directly through ``app(scope, receive, send)`` in a
loop (no HTTP client, no server), so what is measured is the middleware, not httpx.
Every variant uses the moving-window strategy in memory and a limit that never rejects;
the client address rotates every ``KEY_SPAN`` requests so that no key ever holds more
timestamps than a real key under that limit would.

    .venv/bin/python benchmarks/overhead.py            # full run
    .venv/bin/python benchmarks/overhead.py --quick    # a few seconds

Goals (issue 3): seawall's added cost <= 1/10 of SlowAPIMiddleware's, <= 1/3 of
SlowAPIASGIMiddleware's, and <= 2x the cost of the ``limits`` calls it makes.

Redis rows (issue 14, ``redis_rows``; ``--redis-only`` runs just them): seawall's middleware
on Redis, with its default strategy, against the same ``limits`` strategy on limits' own
async Redis storage called directly (hit + window stats, what a middleware needs), as a
ratio in one run (goal <= 1.2x), and Redis round trips per request (goal 1), counted where
redis-py writes a command to its socket. A private ``redis-server`` on a free port is used
when one is on PATH (no other client shares it), else ``REDIS_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from limits import parse
from limits.aio.storage import MemoryStorage as LimitsAsyncMemory
from limits.aio.strategies import MovingWindowRateLimiter
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIASGIMiddleware, SlowAPIMiddleware
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_bench import Runner, client_address, http_scope, measure
from asgi_bench import runner as asgi_runner
from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.policy.ratelimit import RateLimitPolicy
from seawall.ratelimit import RateLimiter
from seawall.storage import BoundedMemoryStorage

LIMIT = "100000/minute"
KEY_SPAN = 1000


async def home(_request: Any) -> PlainTextResponse:
    return PlainTextResponse("ok")


class NoOp:
    """The cheapest possible pure-ASGI middleware: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def starlette_app(middleware: list[Middleware] | None = None, slowapi: bool = False) -> Starlette:
    app = Starlette(routes=[Route("/", home)], middleware=middleware or [])
    if slowapi:
        app.state.limiter = Limiter(
            key_func=get_remote_address, default_limits=[LIMIT], strategy="moving-window"
        )
        app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def app_runner(app: ASGIApp) -> Runner:
    """Many clients, each sending ``KEY_SPAN`` requests to ``/``."""
    return asgi_runner(app, lambda i: http_scope("/", client=client_address(i // KEY_SPAN)))


def limits_runner(storage: Any) -> Runner:
    """The limits calls a middleware needs per request: one hit plus the window stats."""
    strategy = MovingWindowRateLimiter(storage)
    item = parse(LIMIT)

    async def run(start: int, n: int) -> float:
        keys = [f"10.0.0.{(start + i) // KEY_SPAN}" for i in range(n)]
        t0 = time.perf_counter()
        for key in keys:
            await strategy.hit(item, "bench", key)
            await strategy.get_window_stats(item, "bench", key)
        return (time.perf_counter() - t0) / n

    return run


def seawall_limiter_runner() -> Runner:
    limiter = RateLimiter(RateLimitPolicy(limit=LIMIT))

    async def run(start: int, n: int) -> float:
        keys = [(f"ip:10.0.0.{(start + i) // KEY_SPAN}",) for i in range(n)]
        t0 = time.perf_counter()
        for key in keys:
            await limiter.hit(key, 1)
        return (time.perf_counter() - t0) / n

    return run


async def medians(
    runners: dict[str, Runner], n: int, repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median µs/request per variant, and median of per-round differences to bare Starlette
    (taken within a round, which cancels most of the drift of a shared machine)."""
    # limits' sync MemoryStorage (slowapi) sweeps keys in a threading.Timer 10 ms after
    # its last hit: the pause lets it finish outside the timed loops of other variants.
    samples = await measure(runners, n, repeats, pause=0.03)
    bare = samples["bare starlette"]
    median = {name: statistics.median(v) * 1e6 for name, v in samples.items()}
    added = {
        name: statistics.median(x - b for x, b in zip(v, bare, strict=True)) * 1e6
        for name, v in samples.items()
    }
    return median, added


class _RoundTrips:
    """Counts commands redis-py writes to a socket (a pipeline or a script call is one)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        from redis.asyncio.connection import AbstractConnection

        original = AbstractConnection.send_packed_command

        async def counting(self: Any, command: Any, check_health: bool = True) -> None:
            cls.count += 1
            await original(self, command, check_health)

        AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]


def _private_redis() -> tuple[str, Any]:
    """A private redis-server on a free port (stopped by its pid), else REDIS_URL."""
    import os
    import shutil
    import socket
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"), None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return url, proc


def redis_rows(quick: bool) -> None:
    """seawall on Redis vs the same limits strategy on Redis called directly (issue 14)."""
    from limits.aio.storage import RedisStorage as LimitsRedisStorage

    n, repeats = (500, 5) if quick else (3_000, 9)
    url, proc = _private_redis()
    _RoundTrips.install()
    try:
        policy = RateLimitPolicy(limit=LIMIT, storage=url)  # defaults otherwise: moving window
        limits_storage = LimitsRedisStorage("async+" + url, implementation="redispy")
        runners: dict[str, Runner] = {
            "bare starlette": app_runner(starlette_app()),
            "seawall RateLimitMiddleware (redis)": app_runner(
                starlette_app([Middleware(RateLimitMiddleware, policy=policy)])
            ),
            "limits hit+stats (limits async RedisStorage)": limits_runner(limits_storage),
        }

        async def run_all() -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
            us, added = await medians(runners, n, repeats)
            trips: dict[str, float] = {}
            for name, run in runners.items():  # one loop: redis-py connections are per loop
                _RoundTrips.count = 0
                await run(10_000_000, 200)
                trips[name] = _RoundTrips.count / 200
            return us, added, trips

        us, added, trips = asyncio.run(run_all())
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
    where = "private redis-server" if proc is not None else url
    print(f"\nRedis ({where}): {n} requests x {repeats} rounds, median µs/request\n")
    print(f"{'variant':<50} {'µs/req':>8} {'added':>8} {'trips/req':>10}")
    for name, value in us.items():
        extra = value if name.startswith("limits") else added[name]
        print(f"{name:<50} {value:8.2f} {extra:8.2f} {trips[name]:10.2f}")
    ours = added["seawall RateLimitMiddleware (redis)"]
    theirs = us["limits hit+stats (limits async RedisStorage)"]
    label = "seawall added on Redis / limits hit+stats on Redis"
    print(f"\n{label:<55} {ours / theirs:6.3f}   goal <= 1.200")
    print(
        f"{'seawall Redis round trips per request':<55} "
        f"{trips['seawall RateLimitMiddleware (redis)']:6.2f}   goal 1"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats")
    parser.add_argument("--redis-only", action="store_true", help="only the Redis rows")
    args = parser.parse_args()
    if args.redis_only:
        redis_rows(args.quick)
        return
    n, repeats = (2_000, 5) if args.quick else (10_000, 15)

    seawall_policy = RateLimitPolicy(limit=LIMIT)
    runners: dict[str, Runner] = {
        "bare starlette": app_runner(starlette_app()),
        "no-op ASGI middleware": app_runner(starlette_app([Middleware(NoOp)])),
        "seawall RateLimitMiddleware": app_runner(
            starlette_app([Middleware(RateLimitMiddleware, policy=seawall_policy)])
        ),
        "slowapi SlowAPIMiddleware": app_runner(
            starlette_app([Middleware(SlowAPIMiddleware)], slowapi=True)
        ),
        "slowapi SlowAPIASGIMiddleware": app_runner(
            starlette_app([Middleware(SlowAPIASGIMiddleware)], slowapi=True)
        ),
        "limits hit+stats (limits async MemoryStorage)": limits_runner(LimitsAsyncMemory()),
        "limits hit+stats (seawall BoundedMemoryStorage)": limits_runner(BoundedMemoryStorage()),
        "seawall RateLimiter.hit (no HTTP)": seawall_limiter_runner(),
    }
    us, added = asyncio.run(medians(runners, n, repeats))
    direct = ("limits", "seawall RateLimiter")
    print(f"\n{n} requests x {repeats} rounds per variant (shuffled order), median µs/request")
    print("'added' = median over rounds of (variant - bare starlette) in the same round;")
    print("for the direct calls (no HTTP) it is their own cost.\n")
    print(f"{'variant':<50} {'µs/req':>8} {'added':>8}")
    for name, value in us.items():
        extra = value if name.startswith(direct) else added[name]
        print(f"{name:<50} {value:8.2f} {extra:8.2f}")
    ours = added["seawall RateLimitMiddleware"]
    slow_bh = added["slowapi SlowAPIMiddleware"]
    slow_asgi = added["slowapi SlowAPIASGIMiddleware"]
    lim = us["limits hit+stats (limits async MemoryStorage)"]
    lim_ours = us["limits hit+stats (seawall BoundedMemoryStorage)"]
    print()
    rows = [
        ("seawall added / SlowAPIMiddleware added", ours / slow_bh, "<= 0.100"),
        ("seawall added / SlowAPIASGIMiddleware added", ours / slow_asgi, "<= 0.333"),
        ("seawall added / limits hit+stats (limits memory)", ours / lim, "<= 2.000"),
        ("seawall added / limits hit+stats (seawall storage)", ours / lim_ours, "<= 2.000"),
    ]
    for label, ratio, goal in rows:
        print(f"{label:<55} {ratio:6.3f}   goal {goal}")
    redis_rows(args.quick)


if __name__ == "__main__":
    main()
