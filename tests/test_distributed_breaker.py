"""Breaker state shared across processes through Redis, decided locally, moved off-path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from seawall.breaker import BreakerRegistry, BreakerState, CircuitOpenError, Outcome
from seawall.policy.breaker import BreakerPolicy
from seawall.shared_breaker import SharedBreakerState

pytestmark = pytest.mark.redis

POLICY = BreakerPolicy(
    window="count",
    window_size=10,
    minimum_calls=5,
    open_duration=1.0,
    jitter=0.0,
    half_open_probes=2,
    probe_timeout=5.0,
)
HOST = "registry.example:443"


def _trip(registry: BreakerRegistry) -> None:
    breaker = registry.get(HOST)
    for _ in range(5):
        breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN


async def _wait_for(predicate: Callable[[], bool], limit: float) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > limit:
            raise AssertionError(f"not within {limit} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_trip_in_one_process_opens_the_others_and_one_prober_closes_all(
    redis_url: str,
) -> None:
    namespace = uuid.uuid4().hex
    a, b, c = (BreakerRegistry(POLICY) for _ in range(3))
    async with (
        SharedBreakerState(a, redis_url, namespace=namespace) as share_a,
        SharedBreakerState(b, redis_url, namespace=namespace),
        SharedBreakerState(c, redis_url, namespace=namespace),
    ):
        b.get(HOST)  # c has never called the host: it learns of the trip anyway
        _trip(a)
        took = await _wait_for(
            lambda: all(
                r.peek(HOST) is not None and r.get(HOST).state is BreakerState.OPEN for r in (b, c)
            ),
            1.0,
        )
        assert share_a.published == 1
        # After the open period every process goes half-open; the probes are shared.
        await asyncio.sleep(1.05)
        probes = []
        for _ in range(100):
            for registry in (a, b, c):
                with contextlib.suppress(CircuitOpenError):
                    probes.append((registry, registry.get(HOST).admit()))
            await asyncio.sleep(0.005)
        assert len(probes) == POLICY.half_open_probes
        assert len({id(r) for r, _ in probes}) == 1  # one process holds them all
        prober = probes[0][0]
        for _, permit in probes:
            prober.get(HOST).record(permit, Outcome.SUCCESS, 0.01)
        await _wait_for(
            lambda: all(r.get(HOST).state is BreakerState.CLOSED for r in (a, b, c)), 1.0
        )
    print(f"\nopen in the other processes after {took * 1000:.1f} ms")


async def test_decisions_stay_local_when_redis_is_paused_or_gone(
    redis_process: Callable[..., Any],
) -> None:
    """SIGSTOP: admit/record never wait on Redis; the half-open breaker, unable to claim the
    shared probes, grants them to itself after the timeout instead of refusing forever."""
    server = redis_process()
    registry = BreakerRegistry(POLICY)
    async with SharedBreakerState(registry, server.url, namespace="x", timeout=0.2):
        server.pause()
        try:
            started = time.perf_counter()
            _trip(registry)
            for _ in range(1000):
                with contextlib.suppress(CircuitOpenError):
                    registry.get(HOST).admit()
            took = time.perf_counter() - started
            # 1,005 decisions, none waiting on the paused Redis: a decision that waited would
            # take the 0.2 s timeout, so 1,005 would take minutes. The bound is five such
            # waits, far from the ~10 ms they take here: a busy CI machine once took 148 ms.
            assert took < 1.0
            await asyncio.sleep(1.05)
            breaker = registry.get(HOST)
            assert breaker.state is BreakerState.HALF_OPEN
            with pytest.raises(CircuitOpenError):
                breaker.admit()  # gated until the claim answers, or fails
            await asyncio.sleep(0.4)
            assert breaker.admit().probe  # the claim timed out: probes granted locally
        finally:
            server.resume()
            server.stop()


def test_four_processes_share_one_breaker(redis_url: str, tmp_path: Path) -> None:
    """A trip in one of 4 real processes opens the breaker in the 3 others within 1 s, and
    across all of them at most half_open_probes (2) probes run in the half-open period."""
    namespace = uuid.uuid4().hex
    go = tmp_path / "go"
    worker = Path(__file__).with_name("distributed_breaker_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), redis_url, namespace, role, str(go), "6"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role in ("trip", "watch", "watch", "watch")
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert json.loads(line)["event"] == "ready", proc.stderr.read() if proc.stderr else ""
        go.touch()
        outputs = [proc.communicate(timeout=30) for proc in procs]
    finally:
        for proc in procs:  # by process id
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    events = [[json.loads(line) for line in out.splitlines()] for out, _ in outputs]
    assert all(e[-1]["event"] == "done" for e in events), [err for _, err in outputs]
    tripped = next(e["t"] for e in events[0] if e["event"] == "tripped")
    delays = [next(e["t"] for e in ev if e["event"] == "open") - tripped for ev in events[1:]]
    assert max(delays) <= 1.0, delays
    probes = [e for ev in events for e in ev if e["event"] == "probe"]
    assert 1 <= len(probes) <= POLICY.half_open_probes
    assert all(any(e["event"] == "closed" for e in ev) for ev in events)
    print(
        f"\ntrip -> open elsewhere (ms): {[round(d * 1000, 1) for d in delays]}; "
        f"probes across 4 processes: {len(probes)}"
    )


async def test_sharing_resumes_after_redis_restarts(redis_process: Callable[..., Any]) -> None:
    """Redis killed: each process goes on alone. Restarted on its port: the subscriptions
    come back by themselves (back-off of at most 5 s) and a trip is shared again."""
    server = redis_process()
    a, b = BreakerRegistry(POLICY), BreakerRegistry(POLICY)
    async with (
        SharedBreakerState(a, server.url, namespace="r", timeout=0.2),
        SharedBreakerState(b, server.url, namespace="r", timeout=0.2) as share_b,
    ):
        server.stop()
        _trip(a)  # not shared: Redis is gone
        await asyncio.sleep(0.3)
        assert b.get(HOST).state is BreakerState.CLOSED
        server = redis_process(port=server.port)
        await _wait_for(lambda: share_b.subscriptions >= 2, 8.0)  # resubscribed by itself
        other = "mirror.example:443"
        breaker = a.get(other)
        for _ in range(5):
            breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
        await _wait_for(lambda: b.get(other).state is BreakerState.OPEN, 8.0)
