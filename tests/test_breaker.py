"""Unit tests of seawall's circuit breaker, policy, classification and registry."""

from __future__ import annotations

import asyncio
import pickle
import threading

import aiobreaker
import httpx
import pytest
import requests

from seawall.breaker import (
    BreakerRegistry,
    BreakerRejected,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
    classify_exception,
    classify_status,
)
from seawall.clock import ManualClock
from seawall.errors import PolicyError, SeawallError
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy

COUNT = BreakerPolicy(window="count", window_size=10, minimum_calls=4, jitter=0.0)


def events_of(bus: EventBus) -> list[Event]:
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return seen


def fail(breaker: CircuitBreaker, n: int = 1, duration: float = 0.01) -> None:
    for _ in range(n):
        breaker.record(breaker.admit(), Outcome.FAILURE, duration)


def succeed(breaker: CircuitBreaker, n: int = 1, duration: float = 0.01) -> None:
    for _ in range(n):
        breaker.record(breaker.admit(), Outcome.SUCCESS, duration)


# -- policy ---------------------------------------------------------------------------------


def test_policy_defaults_are_valid_and_round_trip() -> None:
    policy = BreakerPolicy()
    assert policy.window == "time"
    assert policy.half_open_probes == 3
    assert policy.count_429_as_failure is False
    assert BreakerPolicy.from_dict(policy.to_dict()) == policy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("window", "sliding"),
        ("window_size", 0),
        ("minimum_calls", 0),
        ("failure_rate_threshold", 0),
        ("failure_rate_threshold", 1.5),
        ("slow_call_duration", -1),
        ("slow_call_rate_threshold", 0),
        ("open_duration", 0),
        ("backoff_multiplier", 0.5),
        ("max_open_duration", 1.0),
        ("jitter", 1.0),
        ("jitter", -0.1),
        ("half_open_probes", 0),
        ("probe_timeout", 0),
        ("count_429_as_failure", "yes"),
        ("time_buckets", 0),
    ],
)
def test_policy_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(PolicyError) as info:
        BreakerPolicy.from_dict({field: value})
    assert info.value.field == field


def test_policy_count_window_needs_whole_calls_and_reachable_minimum() -> None:
    with pytest.raises(PolicyError, match="window_size"):
        BreakerPolicy(window="count", window_size=10.5)
    with pytest.raises(PolicyError, match="could never trip"):
        BreakerPolicy(window="count", window_size=5, minimum_calls=6)
    with pytest.raises(PolicyError, match="not a setting"):
        BreakerPolicy.from_dict({"fail_max": 5})


def test_open_duration_grows_and_is_capped() -> None:
    policy = BreakerPolicy(open_duration=10, backoff_multiplier=2, max_open_duration=120)
    assert [policy.open_duration_for(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 80, 120]
    assert policy.open_duration_for(10_000) == 120  # no overflow


# -- classification --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SUCCESS),
        (304, Outcome.SUCCESS),
        (404, Outcome.SUCCESS),
        (401, Outcome.SUCCESS),
        (429, Outcome.SUCCESS),
        (500, Outcome.FAILURE),
        (501, Outcome.SUCCESS),
        (502, Outcome.FAILURE),
        (503, Outcome.FAILURE),
        (504, Outcome.FAILURE),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status, BreakerPolicy()) is outcome


def test_classify_429_per_policy() -> None:
    assert classify_status(429, BreakerPolicy(count_429_as_failure=True)) is Outcome.FAILURE


def test_classify_exception() -> None:
    request = httpx.Request("GET", "https://registry.test/v2/")
    assert classify_exception(asyncio.CancelledError()) is Outcome.NEUTRAL
    assert classify_exception(KeyboardInterrupt()) is Outcome.NEUTRAL
    assert classify_exception(CircuitOpenError("h", 1.0, 1.0)) is Outcome.NEUTRAL
    assert classify_exception(httpx.ConnectError("refused", request=request)) is Outcome.FAILURE
    assert classify_exception(httpx.ReadTimeout("slow", request=request)) is Outcome.FAILURE
    assert classify_exception(TimeoutError()) is Outcome.FAILURE
    assert classify_exception(ConnectionResetError()) is Outcome.FAILURE
    assert classify_exception(requests.ConnectionError("down")) is Outcome.FAILURE
    assert classify_exception(requests.Timeout("slow")) is Outcome.FAILURE
    assert classify_exception(RuntimeError("unknown SDK error")) is Outcome.FAILURE
    for status, outcome in ((404, Outcome.SUCCESS), (503, Outcome.FAILURE)):
        response = httpx.Response(status, request=request)
        exc = httpx.HTTPStatusError("status", request=request, response=response)
        assert classify_exception(exc) is outcome
        r = requests.Response()
        r.status_code = status
        assert classify_exception(requests.HTTPError(response=r)) is outcome


# -- closed: trip on rates ---------------------------------------------------------------------


def test_needs_minimum_calls(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT, clock=clock)
    fail(breaker, 3)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN


def test_trips_at_the_failure_rate_not_below(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT.replace(failure_rate_threshold=0.5), clock=clock)
    succeed(breaker, 3)
    fail(breaker, 2)  # 2/5 = 40 %
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)  # 3/6 = 50 %
    assert breaker.state is BreakerState.OPEN


def test_count_window_forgets_old_calls(clock: ManualClock) -> None:
    policy = COUNT.replace(window_size=4, failure_rate_threshold=0.75)
    breaker = CircuitBreaker("h", policy, clock=clock)
    fail(breaker, 2)
    succeed(breaker, 2)
    succeed(breaker, 2)  # the two failures left the window
    assert breaker.rates() == (4, 0.0, 0.0)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED  # 2/4
    fail(breaker)
    assert breaker.state is BreakerState.OPEN  # 3/4


def test_time_window_forgets_old_calls(clock: ManualClock) -> None:
    policy = BreakerPolicy(window="time", window_size=10, time_buckets=10, minimum_calls=4)
    breaker = CircuitBreaker("h", policy, clock=clock)
    fail(breaker, 3)
    clock.advance(10.0)
    assert breaker.rates() == (0, 0.0, 0.0)
    fail(breaker)
    assert breaker.state is BreakerState.CLOSED
    clock.advance(5.0)
    fail(breaker, 3)
    assert breaker.state is BreakerState.OPEN


def test_trips_on_slow_call_rate(clock: ManualClock) -> None:
    bus = EventBus()
    seen = events_of(bus)
    policy = COUNT.replace(slow_call_duration=2.0, slow_call_rate_threshold=0.75)
    breaker = CircuitBreaker("h", policy, clock=clock, events=bus)
    succeed(breaker, 1, duration=0.1)
    succeed(breaker, 2, duration=5.0)
    assert breaker.state is BreakerState.CLOSED
    succeed(breaker, 1, duration=2.0)  # 3 of 4 slow
    assert breaker.state is BreakerState.OPEN
    changed = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert changed[-1].reason == "slow_call_rate"
    assert changed[-1].slow_rate == 0.75


def test_slow_detection_can_be_disabled(clock: ManualClock) -> None:
    for off in (None, float("inf")):
        breaker = CircuitBreaker("h", COUNT.replace(slow_call_duration=off), clock=clock)
        succeed(breaker, 10, duration=1e300)
        assert breaker.state is BreakerState.CLOSED
    tomlish = BreakerPolicy.from_dict({"slow_call_duration": float("inf")})
    assert tomlish.slow_call_duration == float("inf")


# -- open: duration, backoff, jitter, rejection --------------------------------------------------


def test_open_rejects_with_host_and_retry_time(clock: ManualClock) -> None:
    bus = EventBus()
    seen = events_of(bus)
    breaker = CircuitBreaker("registry.test:443", COUNT, clock=clock, events=bus)
    fail(breaker, 4)
    clock.advance(4.0)
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    err = info.value
    assert isinstance(err, SeawallError)
    assert isinstance(err, aiobreaker.CircuitBreakerError)
    assert err.name == "registry.test:443"
    assert err.retry_in == pytest.approx(6.0)
    assert err.retry_at == pytest.approx(clock.now() + 6.0)
    assert "registry.test:443" in str(err)
    assert "6.0s" in str(err)
    rejected = [e for e in seen if isinstance(e, BreakerRejected)]
    assert rejected[-1].retry_in == pytest.approx(6.0)
    assert str(err) == (
        "circuit breaker for 'registry.test:443' is open; the upstream is not called. "
        "Next probe in 6.0s"
    )
    assert err.message == str(err)  # what aiobreaker's handlers read
    again = pickle.loads(pickle.dumps(err))  # crosses process pools whole
    assert (again.name, again.retry_at, again.retry_in, again.state, str(again)) == (
        err.name,
        err.retry_at,
        err.retry_in,
        BreakerState.OPEN,
        str(err),
    )


def test_open_duration_backs_off_on_repeated_trips_and_resets_on_close(clock: ManualClock) -> None:
    policy = COUNT.replace(open_duration=10.0, backoff_multiplier=2.0, max_open_duration=30.0)
    breaker = CircuitBreaker("h", policy, clock=clock)
    fail(breaker, 4)
    periods = []
    for _ in range(4):
        retry_at = breaker.retry_at
        assert retry_at is not None
        periods.append(retry_at - clock.now())
        clock.advance(periods[-1])
        fail(breaker)  # the probe fails: open again, longer
    assert periods == [10.0, 20.0, 30.0, 30.0]
    clock.advance(30.0)
    succeed(breaker, 3)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker, 4)
    assert breaker.retry_at == clock.now() + 10.0


def test_jitter_stays_within_bounds(clock: ManualClock) -> None:
    policy = COUNT.replace(jitter=0.2, open_duration=10.0)
    for u, expected in ((0.0, 8.0), (0.5, 10.0), (0.999999, 12.0)):
        breaker = CircuitBreaker("h", policy, clock=clock, rng=lambda u=u: u)
        fail(breaker, 4)
        assert breaker.retry_at == pytest.approx(clock.now() + expected)


# -- half-open: probes and generations ------------------------------------------------------------


def half_open(clock: ManualClock, probes: int = 3, **changes: object) -> CircuitBreaker:
    breaker = CircuitBreaker("h", COUNT.replace(half_open_probes=probes, **changes), clock=clock)
    fail(breaker, 4)
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    return breaker


def test_probe_failure_reopens_at_once(clock: ManualClock) -> None:
    breaker = half_open(clock)
    first = breaker.admit()
    second = breaker.admit()
    breaker.record(first, Outcome.SUCCESS, 0.01)
    breaker.record(second, Outcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    assert breaker.consecutive_trips == 2


def test_slow_probe_counts_as_failed(clock: ManualClock) -> None:
    breaker = half_open(clock, slow_call_duration=1.0)
    breaker.record(breaker.admit(), Outcome.SUCCESS, 3.0)
    assert breaker.state is BreakerState.OPEN


def test_late_success_from_before_the_trip_cannot_close(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT.replace(half_open_probes=1), clock=clock)
    late = breaker.admit()  # admitted while closed, answers after the trip
    fail(breaker, 4)
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(late, Outcome.SUCCESS, 12.0)
    assert breaker.state is BreakerState.HALF_OPEN


def test_stale_success_cannot_override_a_failed_probe(clock: ManualClock) -> None:
    breaker = half_open(clock, probes=2)
    a, b = breaker.admit(), breaker.admit()
    breaker.record(a, Outcome.FAILURE, 0.01)
    assert breaker.state is BreakerState.OPEN
    breaker.record(b, Outcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.OPEN
    clock.advance(20.0)  # the next half-open period does not count b either
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(a, Outcome.SUCCESS, 0.01)  # idempotent: a second record is ignored
    assert breaker.state is BreakerState.HALF_OPEN


def test_record_is_idempotent(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT, clock=clock)
    permit = breaker.admit()
    for _ in range(10):
        breaker.record(permit, Outcome.FAILURE, 0.01)
    assert breaker.rates()[0] == 1
    assert breaker.in_flight == 0
    assert permit.done


def test_permit_from_another_breaker_is_refused(clock: ManualClock) -> None:
    a = CircuitBreaker("a", COUNT, clock=clock)
    b = CircuitBreaker("b", COUNT, clock=clock)
    with pytest.raises(ValueError, match="not issued"):
        b.record(a.admit(), Outcome.SUCCESS, 0.0)


def test_lost_probe_times_out_instead_of_sticking_half_open(clock: ManualClock) -> None:
    breaker = half_open(clock, probes=1, probe_timeout=30.0)
    lost = breaker.admit()  # never recorded (a face forgot, a thread died)
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    assert info.value.state is BreakerState.HALF_OPEN
    assert info.value.retry_in == pytest.approx(10.0)  # min(open_duration, probe expiry)
    clock.advance(30.0)
    assert breaker.state is BreakerState.OPEN
    assert lost.generation != breaker.generation


async def test_call_cancelled_by_caller_timeout_is_neutral(clock: ManualClock) -> None:
    breaker = half_open(clock, probes=1)
    never = asyncio.Event()

    async def hang() -> None:
        await never.wait()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):  # caller-side timeout: the upstream proved nothing
            await breaker.call(hang)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.admit().probe


async def test_call_records_results(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT.replace(failure_rate_threshold=0.8), clock=clock)

    async def ok(x: int, *, y: int) -> int:
        clock.advance(0.5)
        return x + y

    async def boom() -> None:
        raise httpx.ConnectError("refused")

    assert await breaker.call(ok, 1, y=2) == 3
    for _ in range(3):
        with pytest.raises(httpx.ConnectError):
            await breaker.call(boom)
    assert breaker.rates()[:2] == (4, 0.75)
    assert breaker.state is BreakerState.CLOSED
    with pytest.raises(httpx.ConnectError):
        await breaker.call(boom)
    assert breaker.state is BreakerState.OPEN  # 4 of 5
    with pytest.raises(CircuitOpenError):
        await breaker.call(ok, 1, y=2)


def test_events_describe_each_transition(clock: ManualClock) -> None:
    bus = EventBus()
    seen = events_of(bus)
    breaker = half_open(clock, probes=1)
    breaker._bus = bus  # subscribe late: only what follows
    breaker.record(breaker.admit(), Outcome.SUCCESS, 0.01)
    fail(breaker, 4)
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert [(e.old, e.new, e.reason) for e in changes] == [
        (BreakerState.HALF_OPEN, BreakerState.CLOSED, "probes_succeeded"),
        (BreakerState.CLOSED, BreakerState.OPEN, "failure_rate"),
    ]
    assert changes[1].open_for == 10.0
    assert changes[1].failure_rate == 1.0
    assert changes[1].breaker == "h"
    assert changes[1].name == "breaker.state_changed"
    assert changes[1].generation == breaker.generation


def test_listener_may_read_the_breaker(clock: ManualClock) -> None:
    bus = EventBus()
    states: list[BreakerState] = []
    breaker = CircuitBreaker("h", COUNT, clock=clock, events=bus)
    bus.subscribe(lambda e: states.append(breaker.state))  # would deadlock under the lock
    fail(breaker, 4)
    assert states == [BreakerState.OPEN]


# -- threads -------------------------------------------------------------------------------------


def test_threads_hammering_one_breaker_keep_it_consistent(clock: ManualClock) -> None:
    bus = EventBus()
    seen = events_of(bus)
    policy = COUNT.replace(window_size=20, minimum_calls=20, failure_rate_threshold=1.0)
    breaker = CircuitBreaker("h", policy, clock=clock, events=bus)
    permits = [breaker.admit() for _ in range(400)]
    barrier = threading.Barrier(8)

    def worker(chunk: list[object]) -> None:
        barrier.wait()
        for permit in chunk:
            breaker.record(permit, Outcome.FAILURE, 0.01)  # type: ignore[arg-type]

    threads = [threading.Thread(target=worker, args=(permits[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    opens = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert len(opens) == 1
    assert breaker.in_flight == 0
    assert breaker.state is BreakerState.OPEN


def test_threads_racing_into_half_open_get_exactly_the_probes(clock: ManualClock) -> None:
    breaker = half_open(clock, probes=3)
    barrier = threading.Barrier(16)
    admitted: list[object] = []
    rejected: list[CircuitOpenError] = []

    def worker() -> None:
        barrier.wait()
        for _ in range(50):
            try:
                admitted.append(breaker.admit())
            except CircuitOpenError as exc:
                rejected.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 3
    assert len(rejected) == 16 * 50 - 3
    assert all(e.state is BreakerState.HALF_OPEN for e in rejected)


# -- registry ------------------------------------------------------------------------------------


def test_registry_shares_one_breaker_per_host(clock: ManualClock) -> None:
    registry = BreakerRegistry(COUNT, clock=clock)
    assert registry.get("a.test") is registry.get("a.test")
    assert registry.get("a.test") is not registry.get("b.test")
    assert registry.get("a.test").policy is COUNT
    assert len(registry) == 2


def test_registry_evicts_closed_idle_breakers_first(clock: ManualClock) -> None:
    registry = BreakerRegistry(COUNT, clock=clock, max_breakers=3)
    opened = registry.get("open.test")
    fail(opened, 4)
    busy = registry.get("busy.test")
    busy.admit()
    registry.get("idle.test")
    registry.get("new.test")
    assert "idle.test" not in registry
    assert registry.get("open.test") is opened
    assert registry.get("busy.test") is busy
    assert len(registry) == 3
    registry.get("newer.test")  # now only non-closed or busy are left besides new.test
    assert len(registry) == 3
    assert "open.test" in registry  # the open one holds information: it stays longest
    assert registry.snapshot()["open.test"] is BreakerState.OPEN


def test_registry_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        BreakerRegistry(max_breakers=0)


# -- hooks for state shared across processes (seawall.shared_breaker) -----------------------


def test_a_remote_open_or_close_is_taken_once_and_told_to_listeners() -> None:
    clock = ManualClock(start=100.0)
    bus = EventBus()
    seen = events_of(bus)
    heard: list[tuple[CircuitBreaker, BreakerStateChanged]] = []
    breaker = CircuitBreaker("up", COUNT, clock=clock, events=bus)
    breaker.add_listener(lambda b, e: heard.append((b, e)))
    assert breaker.apply_remote(BreakerState.OPEN, 10.0)
    opened = BreakerStateChanged(
        at=100.0,
        breaker="up",
        old=BreakerState.CLOSED,
        new=BreakerState.OPEN,
        generation=1,
        failure_rate=0.0,
        slow_rate=0.0,
        reason="remote_open",
        open_for=10.0,
    )
    assert seen == [opened]
    assert heard == [(breaker, opened)]
    assert (breaker.retry_at, breaker.opened_at, breaker.consecutive_trips) == (110.0, 100.0, 1)
    with pytest.raises(CircuitOpenError):
        breaker.admit()

    assert breaker.apply_remote(BreakerState.OPEN, 10.04) is False  # within 50 ms: the same
    assert breaker.retry_at == 110.0
    clock.advance(1.0)
    assert breaker.apply_remote(BreakerState.OPEN, 9.0) is False  # ends no later: nothing
    assert breaker.retry_at == 110.0
    assert breaker.apply_remote(BreakerState.OPEN, 9.2) is False  # later: no event, longer
    assert (breaker.retry_at, breaker.opened_at) == (110.2, 101.0)
    assert breaker.apply_remote(BreakerState.OPEN, 20.0) is False
    assert (breaker.retry_at, breaker.opened_at) == (121.0, 101.0)
    assert [type(e) for e in seen] == [BreakerStateChanged, BreakerRejected]

    assert breaker.apply_remote(BreakerState.CLOSED)
    assert breaker.state is BreakerState.CLOSED
    closed = seen[-1]
    assert isinstance(closed, BreakerStateChanged)
    assert (closed.at, closed.old, closed.new, closed.reason, closed.generation) == (
        101.0,
        BreakerState.OPEN,
        BreakerState.CLOSED,
        "remote_close",
        2,
    )
    assert closed.open_for is None
    assert breaker.consecutive_trips == 0
    assert breaker.apply_remote(BreakerState.CLOSED) is False  # already closed
    assert breaker.apply_remote(BreakerState.HALF_OPEN) is False  # not a state to take
    assert len(heard) == 2
    succeed(breaker)  # closed: calls go through


def test_a_remote_open_after_the_local_one_elapsed_reopens_from_half_open() -> None:
    clock = ManualClock(start=0.0)
    bus = EventBus()
    seen = events_of(bus)
    breaker = CircuitBreaker("up", COUNT, clock=clock, events=bus)
    fail(breaker, 4)
    assert breaker.consecutive_trips == 1
    clock.advance(COUNT.open_duration)
    assert breaker.apply_remote(BreakerState.OPEN, 5.0)
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert [(e.new, e.reason) for e in changes] == [
        (BreakerState.OPEN, "failure_rate"),
        (BreakerState.HALF_OPEN, "open_period_elapsed"),
        (BreakerState.OPEN, "remote_open"),
    ]
    assert breaker.consecutive_trips == 1  # a remote open is no new local trip
    assert breaker.retry_at == COUNT.open_duration + 5.0


def test_gated_probes_wait_for_a_grant_of_this_half_open_period() -> None:
    clock = ManualClock(start=0.0)
    policy = BreakerPolicy(
        window="count", window_size=10, minimum_calls=4, jitter=0.0, half_open_probes=2
    )
    breaker = CircuitBreaker("up", policy, clock=clock, events=EventBus())
    breaker.gate_probes()
    assert not breaker.grant_probes(breaker.generation, 2)  # closed: nothing to grant
    fail(breaker, 4)
    clock.advance(policy.open_duration)
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError) as refused:
        breaker.admit()  # another process may be probing
    assert refused.value.state is BreakerState.HALF_OPEN
    assert not breaker.grant_probes(breaker.generation - 1, 2)  # an older half-open period
    assert breaker.grant_probes(breaker.generation, 5)  # capped at half_open_probes
    probes = [breaker.admit(), breaker.admit()]
    assert all(p.probe for p in probes)
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    for p in probes:
        breaker.record(p, Outcome.SUCCESS, 0.01)
    assert breaker.state is BreakerState.CLOSED

    fail(breaker, 4)
    clock.advance(2 * policy.open_duration)
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.grant_probes(breaker.generation, 0)
    with pytest.raises(CircuitOpenError):
        breaker.admit()
    breaker.gate_probes(False)  # ungated: the policy's own probes, at once
    assert breaker.admit().probe


def test_a_registry_hands_its_listeners_and_gating_to_every_breaker() -> None:
    clock = ManualClock(start=0.0)
    heard: list[str] = []
    registry = BreakerRegistry(COUNT, clock=clock, events=EventBus())
    early = registry.get("early")
    registry.add_listener(lambda b, e: heard.append(f"{b.name}:{e.new.value}"))
    registry.gate_probes()
    late = registry.get("late")
    assert registry.peek("late") is late
    assert registry.peek("never") is None and "never" not in registry
    for breaker in (early, late):
        fail(breaker, 4)
    clock.advance(COUNT.open_duration)
    for breaker in (early, late):
        assert breaker.state is BreakerState.HALF_OPEN
        with pytest.raises(CircuitOpenError):
            breaker.admit()  # gated, both the one made before and the one made after
    assert heard == ["early:open", "late:open", "early:half_open", "late:half_open"]
    registry.gate_probes(False)
    assert early.admit().probe and late.admit().probe


def test_a_permit_from_another_breaker_is_refused_by_name() -> None:
    clock = ManualClock()
    one = CircuitBreaker("one", COUNT, clock=clock, events=EventBus())
    other = CircuitBreaker("other", COUNT, clock=clock, events=EventBus())
    permit = one.admit()
    with pytest.raises(ValueError) as wrong:
        other.record(permit, Outcome.SUCCESS, 0.01)
    assert str(wrong.value) == (
        "<Permit call #1 gen=0 of 'one'> was not issued by <CircuitBreaker 'other' closed gen=0>"
    )
    assert one.in_flight == 1 and other.in_flight == 0


def test_a_whole_cycle_is_told_by_its_state_changes() -> None:
    """Trip on failures, a slow probe and a failed probe re-open it (backing off), and the
    probes that succeed close it; each change carries its time, rates, reason and period."""
    clock = ManualClock(start=1000.0)
    bus = EventBus()
    seen = events_of(bus)
    policy = COUNT.replace(
        open_duration=10.0,
        backoff_multiplier=2.0,
        max_open_duration=100.0,
        half_open_probes=2,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.5,
    )
    breaker = CircuitBreaker("up", policy, clock=clock, events=bus)
    succeed(breaker, 1, duration=2.0)  # slow, and a success
    fail(breaker, 3)  # 4 calls: 75% failed, 25% slow
    clock.advance(10.0)
    assert breaker.state is BreakerState.HALF_OPEN
    breaker.record(breaker.admit(), Outcome.SUCCESS, 1.5)  # a slow probe
    clock.advance(20.0)
    breaker.record(breaker.admit(), Outcome.FAILURE, 0.1)
    clock.advance(40.0)
    probes = [breaker.admit(), breaker.admit()]
    for p in probes:
        breaker.record(p, Outcome.SUCCESS, 0.1)
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]

    def change(
        at: float,
        old: str,
        new: str,
        gen: int,
        fr: float,
        sr: float,
        why: str,
        open_for: float | None = None,
    ) -> BreakerStateChanged:
        return BreakerStateChanged(
            at=at, breaker="up", old=BreakerState(old), new=BreakerState(new), generation=gen,
            failure_rate=fr, slow_rate=sr, reason=why, open_for=open_for,
        )  # fmt: skip

    assert changes == [
        change(1000.0, "closed", "open", 1, 0.75, 0.25, "failure_rate", 10.0),
        change(1010.0, "open", "half_open", 2, 0.0, 0.0, "open_period_elapsed"),
        change(1010.0, "half_open", "open", 3, 0.0, 1.0, "probe_slow", 20.0),
        change(1030.0, "open", "half_open", 4, 0.0, 0.0, "open_period_elapsed"),
        change(1030.0, "half_open", "open", 5, 1.0, 0.0, "probe_failed", 40.0),
        change(1070.0, "open", "half_open", 6, 0.0, 0.0, "open_period_elapsed"),
        change(1070.0, "half_open", "closed", 7, 0.0, 0.0, "probes_succeeded"),
    ]
    assert breaker.consecutive_trips == 0
    assert breaker.rates() == (0, 0.0, 0.0)  # the new closed period starts clean


def test_a_slow_failed_probe_and_slow_calls_are_reported_as_slow() -> None:
    clock = ManualClock(start=0.0)
    bus = EventBus()
    seen = events_of(bus)
    policy = COUNT.replace(
        slow_call_duration=1.0, slow_call_rate_threshold=0.5, failure_rate_threshold=0.9
    )
    breaker = CircuitBreaker("up", policy, clock=clock, events=bus)
    succeed(breaker, 2, duration=0.1)
    succeed(breaker, 2, duration=3.0)
    assert breaker.state is BreakerState.OPEN
    clock.advance(policy.open_duration)
    breaker.record(breaker.admit(), Outcome.FAILURE, 5.0)
    changes = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert [(e.reason, e.failure_rate, e.slow_rate) for e in changes if e.new.value == "open"] == [
        ("slow_call_rate", 0.0, 0.5),
        ("probe_failed", 1.0, 1.0),
    ]


def test_the_count_window_forgets_the_oldest_outcome_and_its_slowness() -> None:
    clock = ManualClock(start=0.0)
    policy = BreakerPolicy(
        window="count", window_size=4, minimum_calls=4, jitter=0.0, slow_call_duration=1.0
    )
    breaker = CircuitBreaker("up", policy, clock=clock, events=EventBus())
    succeed(breaker, 1, duration=2.0)
    fail(breaker, 1)
    assert breaker.rates() == (2, 0.5, 0.5)
    succeed(breaker, 3)  # the slow success leaves the window of 4
    assert breaker.rates() == (4, 0.25, 0.0)
    succeed(breaker, 1)  # and then the failure
    assert breaker.rates() == (4, 0.0, 0.0)
    succeed(breaker, 2, duration=2.0)
    assert breaker.rates() == (4, 0.0, 0.5)
    assert breaker.state is BreakerState.CLOSED


def test_probes_are_counted_one_by_one_and_a_cancelled_one_frees_one_slot() -> None:
    clock = ManualClock(start=0.0)
    policy = COUNT.replace(half_open_probes=2, probe_timeout=5.0)
    bus = EventBus()
    seen = events_of(bus)
    breaker = CircuitBreaker("up", policy, clock=clock, events=bus)
    fail(breaker, 4)
    clock.advance(policy.open_duration)
    first, second = breaker.admit(), breaker.admit()
    assert breaker.in_flight == 2
    with pytest.raises(CircuitOpenError) as full:
        breaker.admit()
    assert "is half-open with every probe in flight" in str(full.value)
    clock.advance(3.0)
    breaker.record(first, Outcome.NEUTRAL, 0.0)  # cancelled: proved nothing
    third = breaker.admit()
    with pytest.raises(CircuitOpenError):
        breaker.admit()  # exactly one slot came back
    assert breaker.in_flight == 2
    breaker.record(second, Outcome.SUCCESS, 0.1)  # one success of the two needed
    clock.advance(3.0)  # 6 s since the first two probes, 3 s since the third
    assert breaker.state is BreakerState.HALF_OPEN  # the answered probes are not timing out
    with pytest.raises(CircuitOpenError) as busy:
        breaker.admit()  # the third probe decides within 2 s, before the open period
    assert (busy.value.retry_at, busy.value.retry_in) == (18.0, 2.0)
    rejected = [e for e in seen if isinstance(e, BreakerRejected)][-1]
    assert rejected == BreakerRejected(
        at=16.0, breaker="up", state=BreakerState.HALF_OPEN, retry_in=2.0
    )
    clock.advance(2.0)  # the third probe has been out for the probe timeout
    assert breaker.state is BreakerState.OPEN
    timed_out = [e for e in seen if isinstance(e, BreakerStateChanged)][-1]
    assert (timed_out.at, timed_out.reason, timed_out.failure_rate, timed_out.slow_rate) == (
        18.0,
        "probe_timeout",
        1.0,
        0.0,
    )
    clock.advance(timed_out.open_for - 0.25)
    with pytest.raises(CircuitOpenError) as soon:
        breaker.admit()
    assert soon.value.retry_in == pytest.approx(0.25)
    assert breaker.in_flight == 1  # its permit is still out; its outcome will be ignored
    breaker.record(third, Outcome.SUCCESS, 0.1)
    assert breaker.state is BreakerState.OPEN and breaker.in_flight == 0


async def test_call_measures_each_call_on_the_breakers_clock() -> None:
    clock = ManualClock(start=5000.0)
    policy = COUNT.replace(slow_call_duration=1.0, slow_call_rate_threshold=0.5)
    breaker = CircuitBreaker("up", policy, clock=clock, events=EventBus())

    async def quick() -> str:
        await clock.sleep(0.5)
        return "ok"

    async def slow_429() -> None:
        await clock.sleep(0.5)
        request = httpx.Request("GET", "https://up/")
        raise httpx.HTTPStatusError("429", request=request, response=httpx.Response(429))

    for _ in range(3):
        assert await breaker.call(quick) == "ok"
    with pytest.raises(httpx.HTTPStatusError):
        await breaker.call(slow_429)
    assert breaker.rates() == (4, 0.0, 0.0)  # half-second calls; a 429 is no failure
    counting = CircuitBreaker(
        "up", policy.replace(count_429_as_failure=True), clock=clock, events=EventBus()
    )
    for _ in range(4):
        with pytest.raises(httpx.HTTPStatusError):
            await counting.call(slow_429)
    assert counting.state is BreakerState.OPEN  # the policy's own classification


def test_a_registry_builds_its_breakers_from_its_own_policy_clock_and_rng() -> None:
    clock = ManualClock(start=0.0)
    policy = COUNT.replace(open_duration=10.0, jitter=0.5)
    registry = BreakerRegistry(policy, clock=clock, events=EventBus(), rng=lambda: 1.0)
    breaker = registry.get("up")
    assert breaker.policy is policy
    fail(breaker, 4)
    assert breaker.retry_at == 15.0  # 10 s x (1 + 0.5 x (2 x 1.0 - 1)), on the driven clock
    assert len(BreakerRegistry(max_breakers=1)) == 0
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="max_breakers must be a whole number"):
            BreakerRegistry(max_breakers=bad)  # type: ignore[arg-type]


def test_a_default_breaker_and_a_failing_listener(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = CircuitBreaker(clock=clock, events=EventBus())
    assert (breaker.name, breaker.policy, breaker.opened_at) == ("default", BreakerPolicy(), None)
    heard: list[str] = []

    def broken(b: CircuitBreaker, e: BreakerStateChanged) -> None:
        raise RuntimeError("exporter down")

    breaker.add_listener(broken)
    breaker.add_listener(lambda b, e: heard.append(e.reason))
    assert breaker.apply_remote(BreakerState.OPEN, 5.0) is True  # the failure breaks nothing
    assert heard == ["remote_open"]
    assert [r.getMessage() for r in caplog.records] == [f"breaker listener {broken!r} failed"]


def test_a_remote_open_and_close_start_a_clean_window() -> None:
    clock = ManualClock(start=0.0)
    breaker = CircuitBreaker("up", COUNT, clock=clock, events=EventBus())
    fail(breaker, 3)  # one short of the minimum calls
    assert breaker.apply_remote(BreakerState.OPEN, 5.0) is True
    assert breaker.apply_remote(BreakerState.CLOSED) is True
    fail(breaker, 1)  # the failures from before the remote open are forgotten
    assert breaker.state is BreakerState.CLOSED
    assert breaker.rates() == (1, 1.0, 0.0)


def test_the_time_window_trips_on_slow_calls_too(clock: ManualClock) -> None:
    """The default window kind counts slow calls like the count window does."""
    bus = EventBus()
    seen = events_of(bus)
    policy = BreakerPolicy(
        window="time", minimum_calls=4, slow_call_duration=2.0, slow_call_rate_threshold=0.75
    )
    breaker = CircuitBreaker("h", policy, clock=clock, events=bus, rng=lambda: 0.5)
    succeed(breaker, 1, duration=0.1)
    succeed(breaker, 2, duration=5.0)
    assert breaker.rates() == (3, 0.0, 2 / 3)
    succeed(breaker, 1, duration=2.0)  # 3 of 4 slow
    assert breaker.state is BreakerState.OPEN
    changed = [e for e in seen if isinstance(e, BreakerStateChanged)]
    assert [(e.reason, e.failure_rate, e.slow_rate) for e in changed] == [
        ("slow_call_rate", 0.0, 0.75)
    ]


def test_a_busy_half_open_refusal_says_so_and_crosses_processes_whole(
    clock: ManualClock,
) -> None:
    breaker = half_open(clock, probes=1)
    breaker.admit()
    with pytest.raises(CircuitOpenError) as info:
        breaker.admit()
    err = info.value
    assert err.state is BreakerState.HALF_OPEN
    assert str(err) == (
        "circuit breaker for 'h' is half-open with every probe in flight; "
        "the upstream is not called. Next probe in 10.0s"
    )
    again = pickle.loads(pickle.dumps(err))
    assert (again.name, again.retry_at, again.retry_in, again.state, str(again)) == (
        "h",
        err.retry_at,
        err.retry_in,
        BreakerState.HALF_OPEN,
        str(err),
    )


def test_a_permit_tells_whether_it_is_done_and_what_it_is(clock: ManualClock) -> None:
    breaker = CircuitBreaker("h", COUNT, clock=clock)
    first, second = breaker.admit(), breaker.admit()
    assert first.done is False and first.probe is False
    assert repr(first) != repr(second)  # two calls in flight are told apart in a log
    breaker.record(first, Outcome.SUCCESS, 0.01)
    assert first.done is True and second.done is False
    breaker.record(second, Outcome.SUCCESS, 0.01)
    probing = half_open(clock, probes=2)
    probe = probing.admit()
    assert probe.probe is True
    assert repr(probe) == f"<Permit probe #{probe._id} gen={probe.generation} of 'h'>"


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(499, Outcome.SUCCESS), (599, Outcome.FAILURE), (600, Outcome.SUCCESS)],
)
def test_every_5xx_and_only_5xx_is_a_failure(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_without_a_policy_a_429_is_judged_by_the_default_one() -> None:
    assert classify_status(429) is Outcome.SUCCESS  # BreakerPolicy().count_429_as_failure
    assert classify_status(429, None) is classify_status(429, BreakerPolicy())


def test_an_error_carrying_a_status_attribute_is_judged_by_it() -> None:
    """aiohttp's ClientResponseError carries ``status``; some SDKs put a response with
    ``status`` on their errors."""

    class ClientResponseError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"{status}")
            self.status = status

    class SdkError(Exception):
        def __init__(self, status: int) -> None:
            super().__init__(f"{status}")
            self.response = type("Answer", (), {"status": status})()

    for make in (ClientResponseError, SdkError):
        assert classify_exception(make(404)) is Outcome.SUCCESS
        assert classify_exception(make(503)) is Outcome.FAILURE


def test_a_registry_without_a_policy_reports_the_default_one(clock: ManualClock) -> None:
    registry = BreakerRegistry(clock=clock)
    assert registry.policy == BreakerPolicy()  # what shared state reads (open periods, probes)
    assert registry.get("h").policy == registry.policy


def test_a_registry_holds_ten_thousand_breakers_by_default(clock: ManualClock) -> None:
    registry = BreakerRegistry(COUNT.replace(window_size=1, minimum_calls=1), clock=clock)
    for n in range(10_001):
        registry.get(f"host{n}.test")
    assert len(registry) == 10_000 and "host0.test" not in registry


def test_a_full_registry_evicts_idle_before_busy_and_the_least_recent_first(
    clock: ManualClock,
) -> None:
    registry = BreakerRegistry(COUNT, clock=clock, max_breakers=2)
    for host in ("a.test", "b.test"):
        fail(registry.get(host), 4)  # both open and idle: they hold information
    registry.get("c.test")
    assert "a.test" not in registry and "b.test" in registry  # the least recently used

    busy = BreakerRegistry(COUNT, clock=clock, max_breakers=2)
    busy.get("a.test").admit()  # least recently used, but a call is in flight
    fail(busy.get("b.test"), 4)  # open and idle
    busy.get("c.test")
    assert "a.test" in busy and "b.test" not in busy  # idle goes before busy

    every = BreakerRegistry(COUNT, clock=clock, max_breakers=2)
    for host in ("a.test", "b.test", "c.test"):
        every.get(host).admit()  # everything is busy: the least recently used goes
    assert len(every) == 2 and "a.test" not in every
