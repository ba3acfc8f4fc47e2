"""What the in-process ASGI benchmarks share: a request scope, a runner that drives an app
directly through ``app(scope, receive, send)`` (no client, no server: what is measured is
the app and its middleware), and rounds in a shuffled order so that slow drift on a shared
machine lands on every variant alike."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp

Runner = Callable[[int, int], Awaitable[float]]
"""``run(start, n)``: seconds per request over ``n`` requests numbered from ``start``."""


def http_scope(
    path: str,
    *,
    client: str = "10.0.0.1",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "GET",
) -> dict[str, Any]:
    if headers is None:
        headers = [(b"host", b"bench"), (b"user-agent", b"bench")]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": (client, 40000),
        "server": ("bench", 80),
        "state": {},
    }


def client_address(n: int) -> str:
    """The ``n``-th of many distinct IPv4 client addresses."""
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def runner(app: ASGIApp, scope_of: Callable[[int], dict[str, Any]], expect: int = 200) -> Runner:
    """Drive ``app`` with ``scope_of(i)`` for each request; every answer must be ``expect``."""
    statuses: list[int] = []

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def run(start: int, n: int) -> float:
        scopes = [scope_of(start + i) for i in range(n)]
        statuses.clear()
        t0 = time.perf_counter()
        for scope in scopes:
            await app(scope, receive, send)
        dt = time.perf_counter() - t0
        assert statuses and all(s == expect for s in statuses), set(statuses)
        return dt / n

    return run


async def measure(
    runners: dict[str, Runner],
    n: int,
    rounds: int,
    *,
    warmup: int = 200,
    seed: int = 7,
    pause: float = 0.0,
) -> dict[str, list[float]]:
    """Seconds per request of every variant in every round; each round runs every variant
    once, in a shuffled order. ``pause`` lets background timers (slowapi's storage sweep)
    fire between variants rather than inside another variant's timed loop."""
    samples: dict[str, list[float]] = {name: [] for name in runners}
    offsets = dict.fromkeys(runners, 0)
    order = list(runners)
    rng = random.Random(seed)
    for name, run in runners.items():  # warm-up: stacks build on first call, caches fill
        await run(offsets[name], min(n, warmup))
        offsets[name] += min(n, warmup)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            gc.collect()
            samples[name].append(await runners[name](offsets[name], n))
            offsets[name] += n
            if pause:
                await asyncio.sleep(pause)
    return samples
