"""Each shortfall of plain aiobreaker 1.2.0 next to seawall's behaviour.

These tests keep the reason for seawall's own breaker visible: if an aiobreaker release
fixes a gap, the "plain" half of its test fails and tells us to reconsider.
aiobreaker reads the wall clock itself, so its half uses its public ``half_open()`` /
``open()`` methods instead of waiting; seawall's half runs on the ManualClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from datetime import timedelta

import aiobreaker
import pytest
from aiobreaker import CircuitBreakerListener
from aiobreaker.state import CircuitBreakerState
from aiobreaker.storage.memory import CircuitMemoryStorage

from seawall.breaker import (
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
)
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy


class Upstream:
    """An async upstream that counts the calls reaching it and holds them until released."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def __call__(self, fail: bool = False) -> str:
        self.calls += 1
        await self.gate.wait()
        if fail:
            raise ConnectionError("upstream down")
        return "ok"


class StateLog(CircuitBreakerListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.changes: list[tuple[str | None, str]] = []

    def state_change(self, breaker: object, old: object, new: object) -> None:
        self.changes.append((old.state.name if old else None, new.state.name))  # type: ignore[attr-defined]


class CountingStorage(CircuitMemoryStorage):  # type: ignore[misc]
    """aiobreaker's own memory storage, counting how often ``opened_at`` is rewritten."""

    def __init__(self) -> None:
        super().__init__(CircuitBreakerState.CLOSED)
        self.opened_at_writes = 0

    @property
    def opened_at(self) -> object:
        return self._opened_at

    @opened_at.setter
    def opened_at(self, value: object) -> None:
        self.opened_at_writes += 1
        self._opened_at = value


def collect(bus: EventBus) -> list[BreakerStateChanged]:
    seen: list[BreakerStateChanged] = []

    def listener(event: Event) -> None:
        if isinstance(event, BreakerStateChanged):
            seen.append(event)

    bus.subscribe(listener)
    return seen


def tripped(clock: ManualClock, **policy: object) -> CircuitBreaker:
    """A seawall breaker tripped by failures, its open period elapsed (now HALF_OPEN)."""
    settings: dict[str, object] = {
        "window": "count",
        "window_size": 10,
        "minimum_calls": 2,
        "jitter": 0.0,
        "open_duration": 5.0,
    }
    settings.update(policy)
    breaker = CircuitBreaker("registry.test", BreakerPolicy.from_dict(settings), clock=clock)
    for _ in range(2):
        breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    clock.advance(5.0)
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker


async def swarm(n: int, call: object) -> list[object]:
    async def one() -> object:
        try:
            return await call()  # type: ignore[operator]
        except Exception as exc:
            return exc

    return list(await asyncio.gather(*(one() for _ in range(n))))


# -- gap 1: half-open lets every concurrent call through ---------------------------------


async def test_plain_half_open_admits_every_concurrent_call() -> None:
    breaker = aiobreaker.CircuitBreaker(fail_max=1)
    breaker.half_open()
    upstream = Upstream()
    task = asyncio.ensure_future(swarm(500, lambda: breaker.call_async(upstream)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert upstream.calls == 500  # all 500 reach an upstream that is just recovering
    upstream.gate.set()
    await task


async def test_seawall_half_open_admits_exactly_the_probes(clock: ManualClock) -> None:
    breaker = tripped(clock, half_open_probes=3)
    upstream = Upstream()
    task = asyncio.ensure_future(swarm(500, lambda: breaker.call(upstream)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert upstream.calls == 3
    upstream.gate.set()
    results = await task
    assert sum(r == "ok" for r in results) == 3
    rejected = [r for r in results if isinstance(r, CircuitOpenError)]
    assert len(rejected) == 497
    assert all(r.name == "registry.test" for r in rejected)
    assert breaker.state is BreakerState.CLOSED  # three good probes close it


# -- gap 2: concurrent failures re-open it once per failure ------------------------------


async def test_plain_concurrent_failures_open_it_several_times() -> None:
    log, storage = StateLog(), CountingStorage()
    breaker = aiobreaker.CircuitBreaker(fail_max=5, listeners=[log], state_storage=storage)
    upstream = Upstream()
    task = asyncio.ensure_future(swarm(10, lambda: breaker.call_async(upstream, True)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert upstream.calls == 10
    upstream.gate.set()
    await task
    opens = [c for c in log.changes if c[1] == "OPEN"]
    assert len(opens) == 6  # failures 5..10 each call open() again
    assert ("OPEN", "OPEN") in log.changes
    assert storage.opened_at_writes == 6  # and each one moves opened_at, extending the open period


async def test_seawall_concurrent_failures_open_it_once(clock: ManualClock) -> None:
    bus = EventBus()
    seen = collect(bus)
    policy = BreakerPolicy(window="count", window_size=10, minimum_calls=5, jitter=0.0)
    breaker = CircuitBreaker("registry.test", policy, clock=clock, events=bus)
    upstream = Upstream()
    task = asyncio.ensure_future(swarm(10, lambda: breaker.call(upstream, True)))
    for _ in range(3):
        await asyncio.sleep(0)
    assert upstream.calls == 10
    opened_at = clock.now()
    upstream.gate.set()
    await task
    clock.advance(1.0)  # later stale failures must not move opened_at
    assert breaker.state is BreakerState.OPEN
    assert [(e.old, e.new) for e in seen] == [(BreakerState.CLOSED, BreakerState.OPEN)]
    assert breaker.opened_at == opened_at
    assert breaker.in_flight == 0


# -- gap 3: one success in half-open closes it --------------------------------------------


async def test_plain_one_half_open_success_closes() -> None:
    breaker = aiobreaker.CircuitBreaker(fail_max=1)
    breaker.half_open()
    upstream = Upstream()
    upstream.gate.set()
    await breaker.call_async(upstream)
    assert breaker.current_state is CircuitBreakerState.CLOSED


async def test_seawall_needs_every_probe_to_succeed(clock: ManualClock) -> None:
    breaker = tripped(clock, half_open_probes=3)
    upstream = Upstream()
    upstream.gate.set()
    await breaker.call(upstream)
    assert breaker.state is BreakerState.HALF_OPEN
    await breaker.call(upstream)
    assert breaker.state is BreakerState.HALF_OPEN
    await breaker.call(upstream)
    assert breaker.state is BreakerState.CLOSED


# -- gap 4: excluded exceptions count as successes ----------------------------------------


async def test_plain_excluded_exception_counts_as_success() -> None:
    breaker = aiobreaker.CircuitBreaker(fail_max=5, exclude=[LookupError])

    async def fail() -> None:
        raise ConnectionError("down")

    async def not_found() -> None:
        raise LookupError("no such tag")

    for _ in range(4):
        with pytest.raises(ConnectionError):
            await breaker.call_async(fail)
    assert breaker.fail_counter == 4
    with pytest.raises(LookupError):
        await breaker.call_async(not_found)
    assert breaker.fail_counter == 0  # "says nothing" was taken as "healthy"
    breaker.half_open()
    with pytest.raises(LookupError):
        await breaker.call_async(not_found)
    assert breaker.current_state is CircuitBreakerState.CLOSED  # ...and even closes it


async def test_seawall_neutral_outcome_changes_nothing(clock: ManualClock) -> None:
    policy = BreakerPolicy(
        window="count", window_size=10, minimum_calls=5, failure_rate_threshold=1.0
    )
    breaker = CircuitBreaker("h", policy, clock=clock)
    for _ in range(4):
        breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
    breaker.record(breaker.admit(), Outcome.NEUTRAL, 0.01)
    assert breaker.rates()[:2] == (4, 1.0)  # not diluted, not reset
    breaker.record(breaker.admit(), Outcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    half = tripped(clock, half_open_probes=1)
    half.record(half.admit(), Outcome.NEUTRAL, 0.01)
    assert half.state is BreakerState.HALF_OPEN  # a neutral probe closes nothing


# -- gap 5: time_until_open depends on the machine's time zone ----------------------------


@pytest.fixture
def time_zone() -> Iterator[object]:
    """Switch the process time zone with POSIX TZ strings (no tzdata needed); restore after."""
    saved = os.environ.get("TZ")

    def use(tz: str) -> None:
        os.environ["TZ"] = tz
        time.tzset()

    yield use
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


def test_plain_time_until_open_is_off_by_the_utc_offset(time_zone: object) -> None:
    time_zone("EST+5")  # type: ignore[operator]
    assert time.timezone == 5 * 3600
    breaker = aiobreaker.CircuitBreaker(fail_max=1, timeout_duration=timedelta(seconds=60))
    breaker.open()
    remaining = breaker.time_until_open
    assert remaining is not None
    assert remaining > timedelta(hours=4, minutes=59)  # 5 h 1 min instead of 1 min

    time_zone("JST-9")  # type: ignore[operator]
    assert time.timezone == -9 * 3600
    breaker.open()
    with pytest.raises(TypeError):  # opens_at is None (it looks 9 h past), then None - datetime
        _ = breaker.time_until_open


@pytest.mark.parametrize("tz", ["UTC0", "EST+5", "JST-9", "NPT-5:45"])
def test_seawall_open_period_ignores_the_time_zone(time_zone: object, tz: str) -> None:
    time_zone(tz)  # type: ignore[operator]
    clock = ManualClock()
    policy = BreakerPolicy(
        window="count", window_size=2, minimum_calls=2, jitter=0.0, open_duration=60.0
    )
    breaker = CircuitBreaker("h", policy, clock=clock)
    for _ in range(2):
        breaker.record(breaker.admit(), Outcome.FAILURE, 0.0)
    clock.advance(5.0)
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert info.value.retry_in == pytest.approx(55.0)
    assert "55.0s" in str(info.value)


def test_seawall_error_keeps_aiobreaker_time_remaining_right(time_zone: object) -> None:
    """On the system clock, the aiobreaker-compatible ``time_remaining`` is right in any zone."""
    for tz in ("EST+5", "JST-9"):
        time_zone(tz)  # type: ignore[operator]
        policy = BreakerPolicy(
            window="count", window_size=2, minimum_calls=2, jitter=0.0, open_duration=60.0
        )
        breaker = CircuitBreaker("h", policy)
        for _ in range(2):
            breaker.record(breaker.admit(), Outcome.FAILURE, 0.0)
        with pytest.raises(aiobreaker.CircuitBreakerError) as info:
            breaker.admit()
        remaining = info.value.time_remaining.total_seconds()
        assert 0 < remaining <= 60.5  # within a minute, not hours off


# -- gap 6: a 50 %-error upstream ------------------------------------------------------------


async def test_plain_never_trips_on_alternating_errors() -> None:
    breaker = aiobreaker.CircuitBreaker(fail_max=5)

    async def call(i: int) -> None:
        if i % 2:
            raise ConnectionError("every other request fails")

    for i in range(200):
        with contextlib.suppress(ConnectionError):
            await breaker.call_async(call, i)
    assert breaker.current_state is CircuitBreakerState.CLOSED
    assert breaker.fail_counter <= 1


async def test_seawall_trips_on_a_fifty_percent_error_rate(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", BreakerPolicy(), clock=clock)  # the defaults

    async def call(i: int) -> None:
        clock.advance(0.05)
        if i % 2:
            raise ConnectionError("every other request fails")

    outcomes: list[str] = []
    for i in range(200):
        try:
            await breaker.call(call, i)
            outcomes.append("ok")
        except ConnectionError:
            outcomes.append("failed")
        except CircuitOpenError:
            outcomes.append("rejected")
    assert outcomes.index("rejected") == 10  # tripped after minimum_calls
    assert "ok" not in outcomes[10:]


# -- gap 7: cancellation in half-open --------------------------------------------------------


async def test_plain_cancelled_half_open_call_records_nothing() -> None:
    events: list[str] = []

    class Log(CircuitBreakerListener):  # type: ignore[misc]
        def success(self, breaker: object) -> None:
            events.append("success")

        def failure(self, breaker: object, exc: BaseException) -> None:
            events.append("failure")

    breaker = aiobreaker.CircuitBreaker(fail_max=1, listeners=[Log()])
    breaker.half_open()
    upstream = Upstream()
    task = asyncio.ensure_future(breaker.call_async(upstream))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Nothing recorded: it only "works" because plain half-open has no probe limit at all.
    assert events == []
    assert breaker.current_state is CircuitBreakerState.HALF_OPEN


async def test_seawall_cancelled_probe_frees_its_permit(clock: ManualClock) -> None:
    breaker = tripped(clock, half_open_probes=1)
    upstream = Upstream()
    probe = asyncio.ensure_future(breaker.call(upstream))
    await asyncio.sleep(0)
    assert upstream.calls == 1
    with pytest.raises(CircuitOpenError):
        breaker.admit()  # the only probe slot is taken
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert breaker.state is BreakerState.HALF_OPEN
    permit = breaker.admit()  # the slot came back
    assert permit.probe
    breaker.record(permit, Outcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.CLOSED


# -- gap 8: the Redis storage is synchronous ----------------------------------------------------


class FakeSyncRedis:
    """Stands in for ``redis.Redis``: records every (blocking) command and where it ran."""

    def __init__(self) -> None:
        self.data: dict[str, object] = {}
        self.on_loop: list[str] = []

    def _note(self, command: str) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.on_loop.append(command)

    def setnx(self, key: str, value: object) -> None:
        self._note("setnx")
        self.data.setdefault(key, str(value).encode())

    def get(self, key: str) -> object:
        self._note("get")
        return self.data.get(key)

    def set(self, key: str, value: object) -> None:
        self._note("set")
        self.data[key] = str(value).encode()

    def incr(self, key: str) -> None:
        self._note("incr")
        self.data[key] = str(int(self.data.get(key, b"0")) + 1).encode()  # type: ignore[call-overload]


async def test_plain_redis_storage_blocks_the_event_loop() -> None:
    from aiobreaker.storage.redis import CircuitRedisStorage

    redis = FakeSyncRedis()
    storage = CircuitRedisStorage(CircuitBreakerState.CLOSED, redis, namespace="registry")
    breaker = aiobreaker.CircuitBreaker(fail_max=5, state_storage=storage)

    async def ok() -> str:
        return "ok"

    redis.on_loop.clear()
    assert await breaker.call_async(ok) == "ok"
    # Every one of these is a synchronous network round trip on the event loop thread
    # with a real redis.Redis: the loop stalls for each of them on every call.
    assert len(redis.on_loop) >= 2
    assert "get" in redis.on_loop
