"""Retry amplification under a dead upstream: 200 clients, 30 s of driven time.

A naive client with 4 attempts sends up to 4x what it was asked to; seawall's retry
budget caps the extra at 10% of first attempts. Time is virtual: a tiny scheduler (below)
wakes sleepers in time order, so 30 s of outage run in well under a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random

import httpx
import pytest

from seawall.client.httpx import ResilientTransport
from seawall.clock import ManualClock
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import RetryBudget


class VirtualClock(ManualClock):
    """A clock whose ``sleep`` really waits, for the scheduler to reach the wake-up time."""

    def __init__(self) -> None:
        super().__init__(start=0.0)
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now() + max(0.0, seconds), next(self._seq), fut))
        await fut

    async def run(self, tasks: list[asyncio.Task[None]]) -> None:
        """Advance time to the next wake-up whenever every live task is asleep."""
        live = len(tasks)

        def finished(_: asyncio.Task[None]) -> None:
            nonlocal live
            live -= 1

        for t in tasks:
            t.add_done_callback(finished)
        while True:
            while live > 0 and len(self._timers) < live:  # noqa: ASYNC110 - the idle loop
                await asyncio.sleep(0)
            if live == 0:
                return
            when, _, fut = heapq.heappop(self._timers)
            self._now = max(self._now, when)
            fut.set_result(None)


async def _outage(
    policy: ClientPolicy,
    budgets: RetryBudget | None = None,
    clients: int = 200,
    seconds: float = 30.0,
) -> tuple[int, int]:
    clock = VirtualClock()
    upstream = 0

    def dead(request: httpx.Request) -> httpx.Response:
        nonlocal upstream
        upstream += 1
        return httpx.Response(503)

    transport = ResilientTransport(httpx.MockTransport(dead), policy, clock=clock, budgets=budgets)
    logical = 0
    rng = random.Random(7)

    async with httpx.AsyncClient(transport=transport) as client:

        async def ci_runner() -> None:
            nonlocal logical
            await clock.sleep(rng.uniform(0, 2))
            while clock.now() < seconds:
                logical += 1
                with contextlib.suppress(httpx.TransportError):
                    await client.get("http://registry.test/v2/library/alpine/manifests/3.20")
                await clock.sleep(rng.uniform(1.0, 3.0))  # the next build step

        tasks = [asyncio.create_task(ci_runner()) for _ in range(clients)]
        await clock.run(tasks)
        await asyncio.gather(*tasks)
    assert clock.now() >= seconds
    return upstream, logical


@pytest.mark.parametrize("breaker", [False, True], ids=["budget-only", "budget+breaker"])
async def test_retry_amplification_stays_under_1_1(breaker: bool) -> None:
    policy = ClientPolicy() if breaker else ClientPolicy(breaker=None)
    upstream, logical = await _outage(policy)
    assert logical > 2500  # 200 clients x ~15 requests
    amplification = upstream / logical
    assert amplification <= 1.1, f"{upstream} upstream requests for {logical} asked"
    if breaker:
        assert amplification < 0.5  # an open breaker sends (almost) nothing


async def test_without_a_budget_the_same_clients_amplify() -> None:
    """The control: same clients, unlimited budget, naive amplification (~4x)."""
    policy = ClientPolicy(breaker=None, retry=RetryPolicy(budget_ratio=1.0))
    unlimited = RetryBudget(1.0, 1e6, clock=ManualClock())
    upstream, logical = await _outage(policy, budgets=unlimited, clients=50, seconds=10.0)
    assert upstream / logical > 3.5  # 4 attempts each
