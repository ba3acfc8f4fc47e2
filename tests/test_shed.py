"""Sans-IO shedding: exact admission, the controller, priorities, LIFO, Retry-After."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from seawall.clock import ManualClock
from seawall.errors import PolicyError
from seawall.events import Event, EventBus
from seawall.policy.shed import RequestClass, ShedPolicy
from seawall.shed import (
    ConcurrencyLimitChanged,
    ConcurrencyLimiter,
    ConcurrencySlot,
    GradientController,
    Rejection,
    RequestShed,
    StepTracker,
    Waiter,
)

STATIC = ShedPolicy(
    adaptive=False, initial_limit=3, min_limit=1, classes=(), continuation_priority=20
)


def recorder() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return bus, seen


# -- policy --------------------------------------------------------------------------


NPM_ACCEPT = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("method", "path", "accept", "body", "expected"),
    [
        ("GET", "/healthz", "", 0, "health"),
        ("GET", f"/v2/library/ubuntu/blobs/{DIGEST}", "", 0, "blob"),
        ("HEAD", f"/v2/team/app/blobs/{DIGEST}", "", 0, "blob"),
        ("GET", "/packages/ab/cd/0123/requests-2.31.0-py3-none-any.whl", "", 0, "blob"),
        ("GET", "/packages/ab/cd/0123/numpy-1.26.0.tar.gz", "", 0, "blob"),
        ("GET", "/express/-/express-4.18.2.tgz", "", 0, "blob"),
        ("GET", "/@types/node/-/node-20.1.0.tgz", "", 0, "blob"),
        ("GET", f"/v2/library/ubuntu/manifests/{DIGEST}", "", 0, "manifest-by-digest"),
        ("POST", "/hooks/build", "", 2_000, "small-write"),
        ("DELETE", "/v2/team/app/manifests/v1", "", 0, "small-write"),
        ("GET", "/v2/", "", 0, "index"),
        ("GET", "/v2/library/ubuntu/manifests/22.04", "", 0, "index"),
        ("GET", "/v2/library/ubuntu/tags/list", "", 0, "index"),
        ("GET", "/simple/", "", 0, "index"),
        ("GET", "/simple/requests/", "", 0, "index"),
        ("GET", "/express", NPM_ACCEPT, 0, "packument"),
        ("GET", "/@types/node", NPM_ACCEPT, 0, "packument"),
        ("PATCH", "/v2/team/app/blobs/uploads/123", "", None, "upload"),
        ("PUT", "/v2/team/app/blobs/uploads/123", "", 50_000_000, "upload"),
        # narrowed: what a class names, and nothing else
        ("GET", "/slow", "", 0, None),
        ("GET", "/express", "application/json", 0, None),
        ("GET", "/api/status", NPM_ACCEPT, 0, None),
        ("GET", "/v2/library/ubuntu/blobs/uploads/123", "", 0, None),
        ("GET", "/v2/library/ubuntu/manifests/x/y", "", 0, None),
        ("GET", "/packages/readme.txt", "", 0, None),
        ("POST", "/v2/team/app/blobs/uploads/", "", None, "upload"),
    ],
)
def test_default_classes_name_artifact_traffic_and_nothing_else(
    method: str, path: str, accept: str, body: int | None, expected: str | None
) -> None:
    cls = ShedPolicy().classify(method, path, accept, body)
    assert (cls.name if cls is not None else None) == expected


def test_default_ranking_finishes_started_steps_before_new_work() -> None:
    p = ShedPolicy()
    rank = {c.name: c.priority for c in p.classes}
    assert p.adaptive and p.min_limit <= p.initial_limit <= p.max_limit
    assert [c.name for c in p.classes if c.never_shed] == ["health"]
    # continuing a step (a fetch by digest) > small writes > starting new work > other > uploads
    assert rank["blob"] == rank["manifest-by-digest"] == p.continuation_priority
    assert p.continuation_priority > rank["small-write"] > rank["index"] == rank["packument"]
    assert rank["index"] > p.default_priority > rank["upload"]
    streams = {c.name for c in p.classes if c.stream}
    assert streams == {"blob", "upload"}


def test_small_writes_are_told_from_large_uploads_by_declared_size() -> None:
    p = ShedPolicy()
    small = p.classify("POST", "/events", "", 1024)
    large = p.classify("POST", "/events", "", 10 * 1024 * 1024)
    unknown = p.classify("POST", "/events", "", None)  # streamed: size unknown
    assert small is not None and large is not None and unknown is not None
    assert small.name == "small-write" and large.name == unknown.name == "upload"
    assert small.priority > large.priority


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": 50, "max_limit": 10, "initial_limit": 10}, "max_limit"),
        ({"initial_limit": 2000}, "initial_limit"),
        ({"queue_target": 0}, "queue_target"),
        ({"queue_interval": 0.001}, "queue_interval"),
        ({"max_queue_length": -1}, "max_queue_length"),
        ({"tolerance": 0.5}, "tolerance"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"priority_reserve": 0.9}, "priority_reserve"),
        ({"retry_after_min": 0}, "retry_after_min"),
        ({"retry_after_max": 0.5}, "retry_after_max"),
        ({"adaptive": "yes"}, "adaptive"),
        ({"overload_after": 0.01}, "overload_after"),
        ({"max_streams": 0}, "max_streams"),
        ({"body_timeout": 0}, "body_timeout"),
        ({"step_idle": -1}, "step_idle"),
        ({"step_memory": -1}, "step_memory"),
        ({"continuation_priority": 1.5}, "continuation_priority"),
    ],
)
def test_policy_rejects_bad_values(changes: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        ShedPolicy().replace(**changes)
    assert info.value.field == field


def test_request_class_validation_and_from_dict() -> None:
    with pytest.raises(PolicyError, match="path"):
        RequestClass("bad", path="(")
    with pytest.raises(PolicyError, match="methods"):
        RequestClass("bad", methods="GET")  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="duplicate"):
        ShedPolicy(classes=(RequestClass("a"), RequestClass("a")))
    with pytest.raises(PolicyError, match="accept"):
        RequestClass("bad", accept="[")
    with pytest.raises(PolicyError, match="max_body"):
        RequestClass("bad", max_body=-1)
    with pytest.raises(PolicyError, match="stream"):
        RequestClass("bad", stream="yes")  # type: ignore[arg-type]
    p = ShedPolicy.from_dict(
        {
            "initial_limit": 8,
            "classes": [
                {"name": "ping", "path": "^/ping$", "never_shed": True},
                {"name": "pull", "methods": ["get"], "path": "^/v2/", "priority": 5},
            ],
        }
    )
    assert [c.name for c in p.classes] == ["ping", "pull"]
    pull = p.classify("GET", "/v2/x/blobs/y")
    assert pull is not None and pull.priority == 5
    assert p.classify("POST", "/v2/x/blobs/y") is None
    assert ShedPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(PolicyError, match="is not a setting"):
        ShedPolicy.from_dict({"limit": 5})


# -- exact admission -----------------------------------------------------------------


def test_static_limit_admits_exactly_the_limit_then_queues_then_rejects(
    clock: ManualClock,
) -> None:
    lim = ConcurrencyLimiter(STATIC.replace(max_queue_length=2), clock=clock)
    outcomes = [lim.try_acquire() for _ in range(6)]
    permits = [o for o in outcomes if isinstance(o, ConcurrencySlot)]
    waiters = [o for o in outcomes if isinstance(o, Waiter)]
    rejected = [o for o in outcomes if isinstance(o, Rejection)]
    assert (len(permits), len(waiters), len(rejected)) == (3, 2, 1)
    assert lim.in_flight == 3 and lim.queued == 2
    assert rejected[0].reason == "queue_full"
    lim.release(permits[0])
    # the freed slot went straight to the oldest waiter: in flight never dipped below 3
    assert lim.in_flight == 3 and lim.queued == 1
    assert isinstance(waiters[0].result, ConcurrencySlot) and waiters[1].pending
    lim.release(permits[0])  # a second release of the same permit is a no-op
    assert lim.in_flight == 3


async def test_admission_is_exact_under_asyncio_concurrency(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=4, max_queue_length=1000)
    lim = ConcurrencyLimiter(policy, clock=clock)
    rng = random.Random(7)
    running = 0
    peak = 0
    outcomes: list[str] = []

    async def request() -> None:
        nonlocal running, peak
        got = await lim.acquire()
        if isinstance(got, Rejection):
            outcomes.append("shed")
            return
        running += 1
        peak = max(peak, running)
        assert lim.in_flight <= policy.initial_limit
        try:
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
        finally:
            running -= 1
            lim.release(got, latency=0.01)
        outcomes.append("ok")

    await asyncio.gather(*(request() for _ in range(200)))
    assert peak == 4  # saturated, never above
    assert outcomes.count("ok") == 200
    assert lim.in_flight == 0 and lim.queued == 0


async def test_cancelled_waiter_frees_its_place_and_never_leaks_a_permit(
    clock: ManualClock,
) -> None:
    lim = ConcurrencyLimiter(STATIC.replace(initial_limit=1), clock=clock)
    held = lim.try_acquire()
    assert isinstance(held, ConcurrencySlot)
    task = asyncio.ensure_future(lim.acquire())
    await asyncio.sleep(0)
    assert lim.queued == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lim.queued == 0
    # granted but cancelled before it resumed: the permit must come back
    waiter = lim.try_acquire()
    assert isinstance(waiter, Waiter)
    lim.release(held)
    assert isinstance(waiter.result, ConcurrencySlot) and lim.in_flight == 1
    lim.cancel(waiter)
    assert lim.in_flight == 0


def test_a_burst_waits_its_turn_however_long_it_drains(clock: ManualClock) -> None:
    """No per-waiter timeout: at half capacity a burst is served, not expired."""
    bus, seen = recorder()
    lim = ConcurrencyLimiter(STATIC.replace(initial_limit=2), clock=clock, events=bus)
    held = [lim.try_acquire(), lim.try_acquire()]
    burst = [lim.try_acquire() for _ in range(30)]
    assert all(isinstance(w, Waiter) for w in burst)
    waiters = [w for w in burst if isinstance(w, Waiter)]
    assert math.isinf(lim.time_left(waiters[0])) and lim.wake_in(waiters[0]) is None
    served = 0
    slots = [h for h in held if isinstance(h, ConcurrencySlot)]
    while slots:
        clock.advance(0.02)  # 20 ms per request, two at a time: the burst takes 0.3 s
        lim.release(slots.pop(0), latency=0.02)
        lim.expire()
        granted = [w.result for w in waiters if isinstance(w.result, ConcurrencySlot)]
        slots.extend(g for g in granted if g is not None and not g.released and g not in slots)
        served = len(granted)
    assert served == 30
    assert not [e for e in seen if isinstance(e, RequestShed)]
    assert lim.in_flight == 0 and lim.queued == 0


def test_only_a_queue_standing_for_overload_after_is_overload(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=1, overload_after=0.2)
    lim = ConcurrencyLimiter(policy, clock=clock)
    held = lim.try_acquire()
    first = lim.try_acquire()
    assert isinstance(held, ConcurrencySlot) and isinstance(first, Waiter)
    clock.advance(0.01)  # the oldest wait passes the 5 ms target: standing, newest-first
    lim.expire()
    assert lim.standing and not lim.overloaded
    clock.advance(0.1)
    late = lim.try_acquire()
    assert isinstance(late, Waiter) and not lim.overloaded and first.pending
    clock.advance(0.1)  # standing for 0.2 s: overload; the queue is cut to what drains
    lim.expire()
    assert lim.overloaded
    assert isinstance(first.result, Rejection) and first.result.reason == "expired"
    lim.release(held, latency=0.3)


def test_a_queue_that_empties_is_not_standing(clock: ManualClock) -> None:
    """CoDel resets when the queue drains: bursts near capacity never add up to overload."""
    policy = STATIC.replace(initial_limit=1, overload_after=0.2)
    lim = ConcurrencyLimiter(policy, clock=clock)
    held = lim.try_acquire()
    assert isinstance(held, ConcurrencySlot)
    for _ in range(10):  # 10 bursts of 0.1 s each, with the queue emptied in between
        w = lim.try_acquire()
        assert isinstance(w, Waiter)
        clock.advance(0.1)
        lim.release(held, latency=0.1)
        assert isinstance(w.result, ConcurrencySlot)
        held = w.result
        assert not lim.standing
    assert not lim.overloaded
    lim.release(held)


def test_priorities_are_shed_lowest_first_and_served_highest_first(clock: ManualClock) -> None:
    bus, seen = recorder()
    lim = ConcurrencyLimiter(
        STATIC.replace(initial_limit=1, max_queue_length=3), clock=clock, events=bus
    )
    held = lim.try_acquire(20)
    assert isinstance(held, ConcurrencySlot)
    low1, low2, mid = lim.try_acquire(10), lim.try_acquire(10), lim.try_acquire(20)
    assert all(isinstance(w, Waiter) for w in (low1, low2, mid))
    high = lim.try_acquire(30)  # queue full: the oldest of the lowest class makes room
    assert isinstance(high, Waiter)
    assert isinstance(low1, Waiter) and isinstance(low1.result, Rejection)
    assert low1.result.reason == "displaced"
    lowest = lim.try_acquire(5)  # nobody below it: refused at the door
    assert isinstance(lowest, Rejection) and lowest.reason == "queue_full"
    order = []
    permit: ConcurrencySlot = held
    for _ in range(3):
        lim.release(permit)
        granted = next(
            w
            for w in (high, mid, low2)
            if isinstance(w, Waiter) and isinstance(w.result, ConcurrencySlot) and w not in order
        )
        order.append(granted)
        assert isinstance(granted.result, ConcurrencySlot)
        permit = granted.result
    assert order == [high, mid, low2]
    assert [(e.reason, e.priority) for e in seen if isinstance(e, RequestShed)] == [
        ("displaced", 10),
        ("queue_full", 5),
    ]


def _overload(lim: ConcurrencyLimiter, clock: ManualClock, limit: int) -> list[ConcurrencySlot]:
    """Drive a static limiter into overload: a queue standing for ``overload_after``."""
    permits = [lim.try_acquire() for _ in range(limit)]
    assert all(isinstance(p, ConcurrencySlot) for p in permits)
    held: list[ConcurrencySlot] = [p for p in permits if isinstance(p, ConcurrencySlot)]
    backlog = [lim.try_acquire() for _ in range(3)]  # never served: the oldest waits on
    assert all(isinstance(w, Waiter) for w in backlog)
    while not lim.overloaded:
        assert clock.now() < 1_010.0
        w = lim.try_acquire()
        assert isinstance(w, Waiter)
        clock.advance(0.03)
        lim.release(held.pop(0), latency=0.03)  # newest-first: the backlog keeps waiting
        if isinstance(w.result, ConcurrencySlot):
            held.append(w.result)
        else:  # overload declared as it was released: the reserve keeps its slot
            assert lim.overloaded
            lim.cancel(w)
    for w in backlog:  # what the cut kept has the overload deadline now
        assert isinstance(w, Waiter)
        if w.pending:
            lim.cancel(w)
    return held


def test_sustained_overload_serves_newest_first_and_short_queue(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=40, overload_after=0.3)
    lim = ConcurrencyLimiter(policy, clock=clock)
    held = _overload(lim, clock, 40)
    room = lim.capacity()
    assert 0 < room < 10  # cut to a hand-off buffer: what drains in half an interval
    waiters = [lim.try_acquire() for _ in range(room)]
    newest = lim.try_acquire()  # the buffer is full: the newcomer takes the oldest's place
    assert all(isinstance(w, Waiter) for w in (*waiters, newest))
    oldest = waiters[0]
    assert isinstance(oldest, Waiter) and isinstance(oldest.result, Rejection)
    assert oldest.result.reason == "displaced"
    lim.release(held.pop())
    assert isinstance(newest, Waiter) and isinstance(newest.result, ConcurrencySlot)
    assert all(isinstance(w, Waiter) and w.pending for w in waiters[1:])  # newest first


def test_overload_ends_when_a_slot_stays_free(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=40, overload_after=0.3)
    lim = ConcurrencyLimiter(policy, clock=clock)
    held = _overload(lim, clock, 40)
    assert lim.overloaded
    lim.release(held.pop(), latency=0.03)  # a slot is free and nobody waits for it
    rate = lim.drain_rate()
    assert rate is not None
    clock.advance(1.5 * lim.limit / rate)  # longer than a hold time
    extra = lim.try_acquire()
    assert isinstance(extra, ConcurrencySlot) and not lim.overloaded
    for slot in [*held, extra]:
        lim.release(slot)


def test_without_overload_the_queue_is_fifo(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(STATIC.replace(initial_limit=1), clock=clock)
    held = lim.try_acquire()
    a, b = lim.try_acquire(), lim.try_acquire()
    assert isinstance(held, ConcurrencySlot) and isinstance(a, Waiter) and isinstance(b, Waiter)
    lim.release(held)
    assert isinstance(a.result, ConcurrencySlot) and b.pending
    assert not lim.overloaded


def test_priority_reserve_under_overload_refuses_lower_classes_first(clock: ManualClock) -> None:
    classes = (RequestClass("hi", priority=30), RequestClass("lo", priority=10))
    policy = ShedPolicy(
        adaptive=False,
        initial_limit=40,
        min_limit=1,
        overload_after=0.3,
        classes=classes,
        default_priority=20,
        continuation_priority=30,
    )
    lim = ConcurrencyLimiter(policy, clock=clock)
    assert lim.admit_limit(10) == 40  # not overloaded: everyone may use the whole limit
    _overload(lim, clock, 40)
    assert lim.admit_limit(30) == 40
    assert lim.admit_limit(20) == 36  # one class above it: 10% of 40 reserved
    assert lim.admit_limit(10) == 32


def _drive(
    lim: ConcurrencyLimiter, clock: ManualClock, latency_of: object, rounds: int
) -> list[int]:
    """Closed loop: keep the limit full; each request's latency comes from the synthetic
    server (given the number in flight when it starts); release in completion order.
    Returns the limit after each batch of one limit's worth of completions."""
    assert callable(latency_of)
    running: list[tuple[float, int, ConcurrencySlot, float]] = []
    seq = 0
    limits = []
    for _ in range(rounds):
        for _ in range(max(1, lim.limit)):
            while True:
                got = lim.try_acquire()
                if not isinstance(got, ConcurrencySlot):
                    if isinstance(got, Waiter):
                        lim.cancel(got)
                    break
                latency = latency_of(lim.in_flight)
                seq += 1
                running.append((clock.now() + latency, seq, got, latency))
            running.sort(key=lambda r: (r[0], r[1]))
            done, _, permit, latency = running.pop(0)
            clock.advance(max(0.0, done - clock.now()))
            lim.release(permit, latency=latency)
        limits.append(lim.limit)
    for done, _, permit, latency in sorted(running, key=lambda r: (r[0], r[1])):
        clock.advance(max(0.0, done - clock.now()))
        lim.release(permit, latency=latency)
    return limits


def test_slow_start_reaches_an_io_bound_apps_concurrency_in_a_few_round_trips(
    clock: ManualClock,
) -> None:
    """Latency flat (an I/O-bound app): the limit doubles per round trip, no probe."""
    bus, seen = recorder()
    policy = ShedPolicy(max_limit=500)
    lim = ConcurrencyLimiter(policy, clock=clock, events=bus)
    assert lim.limit == policy.initial_limit  # no window at reduced concurrency first
    t0 = clock.now()
    _drive(lim, clock, lambda n: 0.2, 6)
    controller = lim.controller
    assert controller is not None and controller.baseline == pytest.approx(0.2)
    assert lim.limit >= 300  # 10 -> 300+ within about a second of 200 ms round trips
    assert clock.now() - t0 <= 1.5
    changes = [e for e in seen if isinstance(e, ConcurrencyLimitChanged)]
    assert changes and all(e.new > e.old for e in changes)  # never dropped to probe


def test_controller_falls_when_the_servers_capacity_drops(clock: ManualClock) -> None:
    """32 slots, then 8 (a storage backend lost three quarters of its throughput)."""
    policy = ShedPolicy(window_samples=10)
    lim = ConcurrencyLimiter(policy, clock=clock)
    _drive(lim, clock, lambda n: 0.02 * max(1.0, n / 32), 100)
    start = lim.limit
    assert start >= 32
    limits = _drive(lim, clock, lambda n: 0.02 * max(1.0, n / 8), 100)
    assert limits[-1] < start / 2 and max(limits[-20:]) <= 8 * policy.tolerance + 2
    assert min(limits) >= policy.min_limit


def test_controller_finds_the_capacity_of_a_queueing_server(clock: ManualClock) -> None:
    """8 slots of 20 ms: above 8 in flight, latency grows linearly (an internal queue)."""
    policy = ShedPolicy(window_samples=10)
    lim = ConcurrencyLimiter(policy, clock=clock)
    limits = _drive(lim, clock, lambda n: 0.02 * max(1.0, n / 8), 300)
    tail = limits[-50:]
    # near, above capacity; without a probe, a first window run above capacity (10 in
    # flight on 8 slots) leaves the baseline high by up to initial_limit / capacity
    assert min(tail) >= 8 and max(tail) <= 8 * policy.tolerance * 10 / 8 + 1


def test_no_probe_sheds_a_healthy_server(clock: ManualClock) -> None:
    """Minutes of steady traffic below capacity: the limit never drops below demand."""
    policy = ShedPolicy(window_samples=10)
    lim = ConcurrencyLimiter(policy, clock=clock)
    lowest = math.inf
    for _ in range(60 * 100):  # 60 s at 100 requests/s, 4 in flight on an 8-slot server
        slots = [lim.try_acquire() for _ in range(4)]
        assert all(isinstance(s, ConcurrencySlot) for s in slots)
        clock.advance(0.04)
        for slot in slots:
            assert isinstance(slot, ConcurrencySlot)
            lim.release(slot, latency=0.02)
        lowest = min(lowest, lim.limit)
    assert lowest >= 4


def test_baseline_is_relearned_when_the_service_gets_slower(clock: ManualClock) -> None:
    """The storage got twice as slow: without a probe, the limit pinned at min_limit
    re-learns the baseline and comes back above the server's concurrency."""
    policy = ShedPolicy(initial_limit=20, window_samples=10)
    lim = ConcurrencyLimiter(policy, clock=clock)
    _drive(lim, clock, lambda n: 0.02 * max(1.0, n / 8), 100)
    limits = _drive(lim, clock, lambda n: 0.04 * max(1.0, n / 8), 400)
    controller = lim.controller
    assert controller is not None and controller.baseline is not None
    assert controller.baseline >= 0.035
    assert min(limits[-50:]) >= 8


def test_baseline_is_not_dragged_down_by_mixed_service_times(clock: ManualClock) -> None:
    """Exponential service (manifests and blobs): noisy window means must not collapse
    the limit of an app that is not overloaded."""
    rng = random.Random(3)
    policy = ShedPolicy()
    lim = ConcurrencyLimiter(policy, clock=clock)
    limits = _drive(lim, clock, lambda n: rng.expovariate(1 / 0.02) * max(1.0, n / 8), 400)
    assert min(limits[-100:]) >= 8


def test_controller_does_not_grow_an_unused_limit() -> None:
    policy = ShedPolicy(initial_limit=10, window_samples=5)
    c = GradientController(policy, now=0.0)
    for i in range(50):
        c.on_sample(0.02, now=1.0 + 0.01 * i, saturated=False, in_flight=2)
    assert c.limit == policy.initial_limit and not c.slow_start


# -- Retry-After ---------------------------------------------------------------------


def test_retry_after_is_never_zero_and_follows_the_backlog(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=2, max_queue_length=50, retry_after_max=60.0)
    lim = ConcurrencyLimiter(policy, clock=clock)
    assert lim.retry_after() == policy.retry_after_min  # nothing known yet
    permits = [lim.try_acquire(), lim.try_acquire()]
    clock.advance(2.0)  # slow requests: 2 s each
    for p in permits:
        assert isinstance(p, ConcurrencySlot)
        lim.release(p, latency=2.0)
    short = lim.retry_after()
    permits = [lim.try_acquire(), lim.try_acquire()]
    for _ in range(30):
        lim.try_acquire()
    long = lim.retry_after()
    assert policy.retry_after_min <= short < long <= policy.retry_after_max
    rate = lim.drain_rate()
    assert rate is not None and rate == pytest.approx(1.0)  # 2 slots / 2 s
    assert long == pytest.approx((lim.in_flight + lim.queued + 1) / rate)
    rejected = ConcurrencyLimiter(STATIC.replace(max_queue_length=0), clock=clock)
    for _ in range(3):
        rejected.try_acquire()
    r = rejected.try_acquire()
    assert isinstance(r, Rejection) and r.retry_after >= 1.0


# -- hypothesis: the limiter's invariants under any interleaving -----------------------


class LimiterMachine(RuleBasedStateMachine):
    """Random acquire / release / cancel / time steps; the books must always balance."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.lim = ConcurrencyLimiter(STATIC, clock=self.clock)
        self.permits: list[ConcurrencySlot] = []
        self.waiters: list[Waiter] = []
        self.resolved: dict[int, object] = {}
        self.keep: list[Waiter] = []
        self.peak_ok = True
        self.adaptive = False

    @initialize(
        adaptive=st.booleans(),
        limit=st.integers(1, 6),
        queue=st.integers(0, 6),
    )
    def setup(self, adaptive: bool, limit: int, queue: int) -> None:
        classes = (RequestClass("hi", priority=30), RequestClass("lo", priority=10))
        policy = ShedPolicy(
            adaptive=adaptive,
            initial_limit=limit if not adaptive else max(limit, 2),
            min_limit=1,
            max_limit=8,
            max_queue_length=queue,
            window_samples=3,
            overload_after=0.08,
            queue_target=0.01,
            queue_interval=0.04,
            classes=classes,
        )
        self.adaptive = adaptive
        self.lim = ConcurrencyLimiter(policy, clock=self.clock)

    def _collect(self) -> None:
        for w in list(self.waiters):
            if not w.pending:
                self.waiters.remove(w)
                assert id(w) not in self.resolved
                self.resolved[id(w)] = w.result
                if isinstance(w.result, ConcurrencySlot):
                    self.permits.append(w.result)
                else:
                    assert isinstance(w.result, Rejection)
                    assert w.result.retry_after >= 1.0 or w.result.reason == "cancelled"

    def _check_grant(self) -> None:
        if self.lim.in_flight > self.lim.limit and not self.adaptive:
            self.peak_ok = False

    @rule(priority=st.sampled_from([10, 20, 30]))
    def acquire(self, priority: int) -> None:
        before = self.lim.in_flight
        got = self.lim.try_acquire(priority)
        if isinstance(got, ConcurrencySlot):
            assert before < self.lim.limit  # admitted only below the limit
            self.permits.append(got)
        elif isinstance(got, Waiter):
            self.waiters.append(got)
            self.keep.append(got)  # ids stay unique while we hold them
        else:
            assert got.retry_after >= 1.0
        self._collect()
        self._check_grant()

    @precondition(lambda self: bool(self.permits))
    @rule(data=st.data(), latency=st.floats(0.001, 0.2))
    def release(self, data: st.DataObject, latency: float) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        self.lim.release(permit, latency=latency)
        self._collect()
        self._check_grant()

    @precondition(lambda self: bool(self.waiters))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiter = self.waiters.pop(data.draw(st.integers(0, len(self.waiters) - 1)))
        self.lim.cancel(waiter)
        assert not waiter.pending
        self.resolved[id(waiter)] = waiter.result

    @rule(dt=st.floats(0.0, 0.1))
    def tick(self, dt: float) -> None:
        self.clock.advance(dt)
        self.lim.expire()
        self._collect()

    @invariant()
    def books_balance(self) -> None:
        assert self.lim.in_flight == len(self.permits)
        assert self.lim.queued == len(self.waiters)
        assert all(w.pending for w in self.waiters)
        assert self.lim.queued <= self.lim.policy.max_queue_length
        assert self.peak_ok
        if not self.adaptive:
            assert self.lim.in_flight <= self.lim.limit

    @invariant()
    def work_conserving(self) -> None:
        # nobody waits while there is room for them (after the last dispatch)
        if self.waiters:
            top = max(w.priority for w in self.waiters)
            assert self.lim.in_flight >= self.lim.admit_limit(top)


LimiterMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLimiterMachine = LimiterMachine.TestCase


@settings(max_examples=40, deadline=None)
@given(latencies=st.lists(st.floats(0.001, 5.0), min_size=1, max_size=200))
def test_controller_stays_within_bounds(latencies: list[float]) -> None:
    policy = ShedPolicy(min_limit=3, max_limit=50, initial_limit=10, window_samples=3)
    c = GradientController(policy, now=0.0)
    t = 0.0
    for i, rtt in enumerate(latencies):
        t += 0.01
        c.on_sample(rtt, now=t, saturated=i % 3 != 0, queued=i % 2 == 0, in_flight=i % 9)
        assert policy.min_limit <= c.limit <= policy.max_limit


# -- the limiter's smaller promises ----------------------------------------------------


def test_streams_are_capped_and_counted_exactly(clock: ManualClock) -> None:
    bus, seen = recorder()
    lim = ConcurrencyLimiter(STATIC.replace(max_streams=2), clock=clock, events=bus)
    lim.open_stream()
    lim.open_stream()
    assert lim.streams == 2
    refused = lim.try_acquire(7, stream=True)
    assert isinstance(refused, Rejection)
    assert (refused.reason, refused.priority) == ("streams", 7)
    assert seen == [RequestShed(at=clock.now(), reason="streams", priority=7, retry_after=1.0)]
    assert isinstance(lim.try_acquire(7), ConcurrencySlot)  # only long transfers are capped
    lim.close_stream()
    assert lim.streams == 1
    assert isinstance(lim.try_acquire(7, stream=True), ConcurrencySlot)
    lim.close_stream()
    lim.close_stream()  # one close too many never makes room for an extra stream
    assert lim.streams == 0
    lim.open_stream()
    lim.open_stream()
    assert isinstance(lim.try_acquire(stream=True), Rejection)


def test_work_of_an_admitted_request_gets_a_slot_above_the_limit(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(STATIC, clock=clock)
    held = [lim.try_acquire() for _ in range(3)]
    assert all(isinstance(h, ConcurrencySlot) for h in held)
    extra = lim.acquire_now()
    assert (extra.priority, extra.in_flight, extra.started) == (
        STATIC.default_priority,
        4,
        clock.now(),
    )
    assert lim.in_flight == 4
    assert lim.acquire_now(priority=90).priority == 90
    lim.release(extra)
    assert lim.in_flight == 4


async def test_a_waiter_that_goes_away_frees_its_place_or_its_slot(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(STATIC.replace(initial_limit=1), clock=clock)
    slot = lim.try_acquire()
    first, second = lim.try_acquire(30), lim.try_acquire(30)
    assert isinstance(slot, ConcurrencySlot)
    assert isinstance(first, Waiter) and isinstance(second, Waiter)
    lim.cancel(first)
    assert first.result == Rejection("cancelled", 30, 0.0)
    assert lim.queued == 1
    assert (await first.future()) == first.result  # a late awaiter sees its answer
    lim.release(slot)  # the place goes to the second waiter
    got = second.result
    assert isinstance(got, ConcurrencySlot) and lim.in_flight == 1
    lim.cancel(second)  # it had its slot already: the slot comes back
    assert lim.in_flight == 0 and lim.queued == 0
    assert isinstance(lim.try_acquire(), ConcurrencySlot)


def test_waiters_have_no_deadline_until_overload(clock: ManualClock) -> None:
    policy = STATIC.replace(
        initial_limit=1, queue_target=0.01, queue_interval=0.5, overload_after=1.0
    )
    bus, seen = recorder()
    lim = ConcurrencyLimiter(policy, clock=clock, events=bus)
    first = lim.try_acquire()
    assert isinstance(first, ConcurrencySlot)
    clock.advance(0.05)
    lim.release(first, latency=0.05)  # a drain rate of 20 per second
    slot = lim.try_acquire()
    calm = lim.try_acquire()
    assert isinstance(slot, ConcurrencySlot) and isinstance(calm, Waiter)
    assert lim.wake_in(calm) is None and lim.time_left(calm) == math.inf
    for _ in range(12):  # the queue stands: overload, and deadlines, after overload_after
        clock.advance(0.1)
        lim.expire()
    assert lim.overloaded
    late = lim.try_acquire()
    assert isinstance(late, Waiter)
    assert late.deadline == clock.now() + 0.5
    assert lim.time_left(late) == 0.5 and lim.wake_in(late) == 0.5
    clock.advance(0.5)
    assert lim.time_left(late) == 0.0
    assert lim.wake_in(late) == 0.001  # wake at once, and at least a millisecond on
    lim.expire()  # the calm waiter got its deadline when overload was declared: passed
    assert calm.result == Rejection("expired", STATIC.default_priority, 1.0)
    assert late.pending and lim.queued == 1  # a deadline reached is not yet passed
    lim.expire(late)
    assert late.pending
    clock.advance(0.1)
    lim.expire(late)
    assert late.result == Rejection("expired", STATIC.default_priority, 1.0)
    assert lim.queued == 0
    shed = [e for e in seen if isinstance(e, RequestShed)]
    assert shed[-1] == RequestShed(at=clock.now(), reason="expired", priority=20, retry_after=1.0)
    assert shed[-2] == RequestShed(
        at=clock.now() - 0.1, reason="expired", priority=20, retry_after=1.0
    )


def test_retry_after_is_the_backlog_over_the_drain_rate(clock: ManualClock) -> None:
    policy = STATIC.replace(initial_limit=1, max_queue_length=50, retry_after_max=60.0)
    lim = ConcurrencyLimiter(policy, clock=clock)
    slot = lim.try_acquire()
    assert isinstance(slot, ConcurrencySlot)
    clock.advance(4.0)
    lim.release(slot, latency=4.0)
    assert lim.drain_rate() == 0.25  # one slot, held 4 s
    held = lim.try_acquire()
    for _ in range(2):
        lim.try_acquire()
    assert isinstance(held, ConcurrencySlot) and lim.queued == 2
    assert lim.retry_after() == 16.0  # (1 in flight + 2 queued + this one) / 0.25 per s


def _limiter_that_keeps_five(clock: ManualClock) -> tuple[ShedPolicy, ConcurrencyLimiter]:
    """One slot, a measured drain rate of 20 per second: under overload the queue keeps
    what drains in half the interval, 0.5 s x 20 x 0.5 = 5."""
    policy = STATIC.replace(
        initial_limit=1, queue_target=0.01, queue_interval=0.5, overload_after=1.0
    )
    lim = ConcurrencyLimiter(policy, clock=clock)
    first = lim.try_acquire()
    assert isinstance(first, ConcurrencySlot)
    clock.advance(0.05)
    lim.release(first, latency=0.05)
    return policy, lim


def test_overload_keeps_what_the_drain_rate_serves_and_cuts_the_oldest_lowest_first(
    clock: ManualClock,
) -> None:
    policy, lim = _limiter_that_keeps_five(clock)
    slot = lim.try_acquire()
    low = [lim.try_acquire(10) for _ in range(3)]
    high = [lim.try_acquire(20) for _ in range(2)]
    assert all(isinstance(w, Waiter) for w in low + high)
    clock.advance(0.1)
    assert lim.capacity() == policy.max_queue_length  # not overloaded yet: all may wait
    for _ in range(11):
        clock.advance(0.1)
        lim.expire()
        if lim.overloaded:
            break
    assert lim.overloaded and lim.capacity() == 5 and lim.queued == 5  # nobody cut yet
    declared = clock.now()
    assert all(w.pending for w in low + high)
    assert all(w.deadline == declared + 0.5 for w in low + high)  # nobody waits on
    more = [lim.try_acquire(10), lim.try_acquire(10)]  # queue full under overload:
    assert isinstance(more[0], Waiter) and isinstance(more[1], Waiter)
    displaced = [w for w in low if not w.pending]  # each newcomer displaces the oldest low
    assert [w.result for w in displaced] == [Rejection("displaced", 10, 1.0)] * 2
    assert displaced == low[:2] and lim.queued == 5
    assert isinstance(slot, ConcurrencySlot)
    lim.release(slot)  # under overload: the highest class, newest first
    assert isinstance(high[1].result, ConcurrencySlot) and high[0].pending


def test_declaring_overload_cuts_the_queue_to_what_drains_oldest_lowest_first(
    clock: ManualClock,
) -> None:
    _, lim = _limiter_that_keeps_five(clock)
    lim.try_acquire()
    low = [lim.try_acquire(10) for _ in range(3)]
    high = [lim.try_acquire(20) for _ in range(4)]
    for _ in range(12):
        clock.advance(0.1)
        lim.expire()
        if lim.overloaded:
            break
    assert lim.overloaded and lim.queued == 5
    assert [w.pending for w in low] == [False, False, True]
    assert all(w.pending for w in high)
    assert low[0].result == Rejection("expired", 10, 1.0)


# -- overload at exact times: when it is declared, what it keeps, when it ends ------------

TWO_CLASSES = (RequestClass("hi", priority=30), RequestClass("lo", priority=10))
EXACT = ShedPolicy(
    adaptive=False,
    initial_limit=4,
    min_limit=1,
    classes=TWO_CLASSES,
    default_priority=20,
    continuation_priority=30,
    queue_target=0.125,
    queue_interval=0.25,
    overload_after=0.5,
    max_queue_length=16,
)
"""Four slots; the admission limits under overload are 2, 3 and 4 for the classes 10, 20
and 30 (10% of 4 rounds to 0: one slot per class above). Times are binary fractions, so
every boundary below is met exactly."""


def _overloaded(
    clock: ManualClock, *, measured: bool = True, events: EventBus | None = None
) -> tuple[ConcurrencyLimiter, list[ConcurrencySlot], Waiter]:
    """Four slots held (class 30), one waiter of class 30, the queue declared overloaded
    at the clock's now. ``measured``: one slot was held 0.25 s and released with its
    latency, so 16 drain per second and the overloaded queue keeps 16 x 0.25 x 0.5 = 2."""
    lim = ConcurrencyLimiter(EXACT, clock=clock, events=events)
    held = [lim.try_acquire(30) for _ in range(4)]
    clock.advance(0.25)
    first = held.pop(0)
    assert isinstance(first, ConcurrencySlot)
    lim.release(first, latency=0.25 if measured else None)
    held.append(lim.try_acquire(30))
    slots = [h for h in held if isinstance(h, ConcurrencySlot)]
    assert len(slots) == 4
    waiter = lim.try_acquire(30)
    assert isinstance(waiter, Waiter)
    clock.advance(0.25)  # the oldest wait passed the target: standing, not overload
    lim.expire()
    assert lim.standing and not lim.overloaded
    clock.advance(0.25)  # stood for half of overload_after
    lim.expire()
    assert not lim.overloaded
    clock.advance(0.25)  # stood for overload_after exactly: overload
    lim.expire()
    assert lim.overloaded
    assert [lim.admit_limit(p) for p in (10, 20, 30)] == [2, 3, 4]
    return lim, slots, waiter


def test_overload_is_declared_when_the_queue_has_stood_for_overload_after(
    clock: ManualClock,
) -> None:
    lim, _, waiter = _overloaded(clock)
    assert lim.capacity() == 2  # what the drain rate serves in half the interval
    assert waiter.pending and waiter.deadline == clock.now() + EXACT.queue_interval


def test_overload_ends_once_nothing_was_refused_or_kept_waiting_for_overload_after(
    clock: ManualClock,
) -> None:
    lim, slots, waiter = _overloaded(clock)
    lim.cancel(waiter)
    assert not lim.standing  # the queue emptied
    clock.advance(0.25)
    assert lim.overloaded is True
    clock.advance(0.25)  # overload_after since the last pressure: over, at this instant
    lim.release(slots.pop())
    lim.release(slots.pop())
    low = lim.try_acquire(10)  # the lowest class may use the whole limit again
    assert isinstance(low, ConcurrencySlot) and low.priority == 10
    assert lim.overloaded is False and not lim.standing
    assert lim.admit_limit(10) == 4


def test_under_overload_each_class_keeps_its_reserve_on_admission_and_dispatch(
    clock: ManualClock,
) -> None:
    lim, slots, waiter = _overloaded(clock)
    lim.release(slots.pop())  # handed to the waiter at once
    assert isinstance(waiter.result, ConcurrencySlot) and waiter.result.priority == 30
    slots.append(waiter.result)
    lim.release(slots.pop())
    lim.release(slots.pop())  # two in flight
    low = lim.try_acquire(10)  # class 10 stops at 2 in flight: it waits
    assert isinstance(low, Waiter) and lim.in_flight == 2
    high = lim.try_acquire(30)  # ... while class 30's reserve is free: admitted at once
    assert isinstance(high, ConcurrencySlot) and high.priority == 30
    mid = lim.try_acquire(20)  # class 20 stops at 3 in flight
    assert isinstance(mid, Waiter) and lim.in_flight == 3
    lim.release(high)  # 2 in flight: room for class 20, not for class 10
    assert isinstance(mid.result, ConcurrencySlot) and mid.result.priority == 20
    assert low.pending and lim.in_flight == 3


def test_a_higher_class_with_room_never_waits_behind_lower_classes_held_by_their_reserve(
    clock: ManualClock,
) -> None:
    """Work conservation under overload (found by LimiterMachine with more examples): a
    class-30 arrival found class-10 waiters that their reserve holds back and was queued
    behind them, with its own slots free, until the next release."""
    lim, slots, waiter = _overloaded(clock)
    lim.cancel(waiter)
    lim.release(slots.pop())
    lim.release(slots.pop())
    lows = [lim.try_acquire(10), lim.try_acquire(10)]
    assert all(isinstance(w, Waiter) for w in lows) and lim.in_flight == 2
    high = lim.try_acquire(30)
    assert isinstance(high, ConcurrencySlot)
    assert lim.in_flight == 3 and lim.queued == 2
    assert lim.in_flight >= lim.admit_limit(10)


def test_refusals_under_overload_are_events_at_their_time(clock: ManualClock) -> None:
    bus, seen = recorder()
    lim, _, waiter = _overloaded(clock, events=bus)
    declared = clock.now()
    second = lim.try_acquire(30)
    assert isinstance(second, Waiter) and lim.queued == 2  # the buffer is full
    low = lim.try_acquire(10)  # nobody below it to displace: refused at the door
    assert isinstance(low, Rejection) and low.reason == "queue_full"
    newest = lim.try_acquire(30)  # takes the place of the oldest of its own class
    assert isinstance(newest, Waiter) and waiter.result == Rejection("displaced", 30, 1.0)
    assert lim.overloaded  # a refusal is pressure
    assert [e for e in seen if isinstance(e, RequestShed)] == [
        RequestShed(at=declared, reason="queue_full", priority=10, retry_after=1.0),
        RequestShed(at=declared, reason="displaced", priority=30, retry_after=1.0),
    ]


def test_waiters_past_their_overload_deadline_all_leave_the_queue(clock: ManualClock) -> None:
    lim, _, waiter = _overloaded(clock)
    other = lim.try_acquire(30)
    assert isinstance(other, Waiter) and lim.queued == 2
    clock.advance(0.375)  # past both deadlines
    lim.expire()
    assert waiter.result == Rejection("expired", 30, 1.0) == other.result
    assert lim.queued == 0


async def test_a_waiters_own_timer_expires_it_past_its_overload_deadline(
    clock: ManualClock,
) -> None:
    """Its deadline passed while the loop was stalled (long enough for overload to end):
    the waiter's timer still expires it; it was promised at most queue_interval."""
    lim, _, waiter = _overloaded(clock)
    clock.advance(1.0)
    assert lim.overloaded is False
    assert lim.wake_in(waiter) == 0.001
    got = await asyncio.wait_for(lim.wait(waiter), 0.5)
    assert got == Rejection("expired", 30, 1.0) and lim.queued == 0


@pytest.mark.parametrize(("free_for", "still_overloaded"), [(0.125, True), (0.25, False)])
def test_overload_ends_when_a_slot_stays_free_for_a_whole_hold_time(
    clock: ManualClock, free_for: float, still_overloaded: bool
) -> None:
    """The hold time is 0.25 s (twice queue_target): a slot free for less is an arrival
    not yet come; free for all of it, the server caught up."""
    lim, slots, waiter = _overloaded(clock)
    lim.cancel(waiter)
    lim.release(slots.pop())  # free from now on
    clock.advance(0.125)
    lim.release(slots.pop())  # a second free slot does not restart the count
    clock.advance(free_for - 0.125)
    arrival = lim.try_acquire(30)
    assert isinstance(arrival, ConcurrencySlot)
    assert lim.overloaded is still_overloaded
    assert not lim.standing


def test_without_a_measured_hold_time_overload_keeps_no_buffer(clock: ManualClock) -> None:
    """Nothing says how fast the queue drains: the cut keeps nobody, arrivals are refused
    at the door, and a slot free for queue_target (the least hold time) ends it."""
    lim, slots, waiter = _overloaded(clock, measured=False)
    assert lim.drain_rate() is None and lim.capacity() == 0
    assert waiter.result == Rejection("expired", 30, 1.0)
    refused = lim.try_acquire(30)
    assert isinstance(refused, Rejection) and refused.reason == "queue_full"
    lim.release(slots.pop())
    clock.advance(EXACT.queue_target)
    assert isinstance(lim.try_acquire(30), ConcurrencySlot)
    assert lim.overloaded is False


@pytest.mark.parametrize("way", ["handed to a waiter", "taken by an arrival", "above the limit"])
def test_a_slot_that_was_never_free_does_not_end_overload(clock: ManualClock, way: str) -> None:
    lim, slots, waiter = _overloaded(clock)
    if way == "handed to a waiter":
        lim.release(slots.pop())  # the waiter takes it in the same instant
        assert isinstance(waiter.result, ConcurrencySlot)
    else:
        lim.cancel(waiter)
        if way == "taken by an arrival":
            lim.release(slots.pop())
            assert isinstance(lim.try_acquire(30), ConcurrencySlot)
        else:  # work of an admitted request ran above the limit, then ended
            lim.release(lim.acquire_now(30))
    assert lim.in_flight == 4
    clock.advance(0.375)  # longer than a hold time, shorter than overload_after
    assert isinstance(lim.try_acquire(30), Waiter)
    assert lim.overloaded


def test_a_standing_queue_is_judged_by_its_oldest_wait(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(EXACT.replace(initial_limit=1), clock=clock)
    held = lim.try_acquire()
    old, new = lim.try_acquire(), lim.try_acquire()
    assert isinstance(held, ConcurrencySlot)
    assert isinstance(old, Waiter) and isinstance(new, Waiter)
    clock.advance(0.0625)  # below the target: not standing
    lim.expire()
    assert not lim.standing
    clock.advance(0.125)
    lim.expire()
    assert lim.standing
    lim.cancel(new)  # the oldest still waits above the target
    assert lim.standing
    lim.cancel(old)  # empty: not standing
    assert not lim.standing


async def test_acquire_queues_at_the_priority_asked_for(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(STATIC.replace(initial_limit=1), clock=clock)
    held = lim.try_acquire(7)
    assert isinstance(held, ConcurrencySlot) and held.priority == 7
    waiting = lim.try_acquire(25)
    task = asyncio.ensure_future(lim.acquire(30))
    await asyncio.sleep(0)
    assert lim.queued == 2
    lim.release(held)  # the higher class goes first
    assert isinstance(waiting, Waiter) and waiting.pending
    got = await asyncio.wait_for(task, 0.5)
    assert isinstance(got, ConcurrencySlot) and got.priority == 30


def test_a_limiter_without_a_policy_takes_the_defaults(clock: ManualClock) -> None:
    lim = ConcurrencyLimiter(clock=clock)
    assert lim.policy == ShedPolicy()
    assert lim.limit == ShedPolicy().initial_limit and lim.controller is not None


@pytest.mark.parametrize(
    ("limit", "classes", "reserve", "expected"),
    [
        # a never_shed class (never counted) keeps no reserve; every other class does
        (
            40,
            (
                RequestClass("health", priority=100, never_shed=True),
                RequestClass("top", priority=45),
                RequestClass("hi", priority=40),
                RequestClass("lo", priority=10),
            ),
            0.1,
            {45: 40, 40: 36, 30: 32, 20: 28, 10: 24},
        ),
        # 10% of 5 rounds to nothing: each class above still keeps one slot
        (5, TWO_CLASSES, 0.1, {30: 5, 20: 4, 10: 3}),
        # reserves that do not fit: a lower class still has one slot, never the whole limit
        (2, TWO_CLASSES, 0.1, {30: 2, 20: 1, 10: 1}),
        # no reserve: every class may use the whole limit, overloaded or not
        (5, TWO_CLASSES, 0.0, {30: 5, 20: 5, 10: 5}),
    ],
)
def test_priority_reserve_under_overload(
    clock: ManualClock,
    limit: int,
    classes: tuple[RequestClass, ...],
    reserve: float,
    expected: dict[int, int],
) -> None:
    policy = ShedPolicy(
        adaptive=False,
        initial_limit=limit,
        min_limit=1,
        overload_after=0.3,
        classes=classes,
        default_priority=20,
        continuation_priority=30,
        priority_reserve=reserve,
    )
    lim = ConcurrencyLimiter(policy, clock=clock)
    _overload(lim, clock, limit)
    assert lim.overloaded
    assert {p: lim.admit_limit(p) for p in expected} == expected


def test_limit_changes_are_events_at_their_time(clock: ManualClock) -> None:
    bus, seen = recorder()
    lim = ConcurrencyLimiter(ShedPolicy(initial_limit=2, min_limit=1), clock=clock, events=bus)
    slots = [lim.try_acquire(), lim.try_acquire()]
    clock.advance(0.0625)
    first = slots[0]
    assert isinstance(first, ConcurrencySlot)
    lim.release(first, latency=0.0625)  # at the limit, flat: slow start adds one
    assert seen == [ConcurrencyLimitChanged(at=clock.now(), old=2, new=3)]


def _adaptive_past_slow_start(clock: ManualClock) -> ConcurrencyLimiter:
    """An adaptive limit of 2 whose first window (2 samples) did not use it: slow start
    is over, the baseline is 0.0625 s."""
    policy = EXACT.replace(adaptive=True, initial_limit=2, max_limit=50, window_samples=2)
    lim = ConcurrencyLimiter(policy, clock=clock)
    for _ in range(2):
        slot = lim.try_acquire(30)
        assert isinstance(slot, ConcurrencySlot)
        clock.advance(0.0625)
        lim.release(slot, latency=0.0625)
    controller = lim.controller
    assert controller is not None and controller.slow_start is False
    assert controller.baseline == 0.0625 and lim.limit == 2
    return lim


def test_a_queue_behind_a_flat_latency_returns_the_limit_to_slow_start(
    clock: ManualClock,
) -> None:
    lim = _adaptive_past_slow_start(clock)
    held = [lim.try_acquire(30), lim.try_acquire(30)]
    waiters = [lim.try_acquire(30), lim.try_acquire(30)]
    assert all(isinstance(w, Waiter) for w in waiters)
    clock.advance(0.0625)
    for slot in held:  # a window of two samples, both with requests waiting
        assert isinstance(slot, ConcurrencySlot)
        lim.release(slot, latency=0.0625)
    controller = lim.controller
    assert controller is not None and controller.slow_start is True


def test_a_standing_queue_is_overload_only_once_the_limit_cannot_grow(
    clock: ManualClock,
) -> None:
    growing = ConcurrencyLimiter(EXACT.replace(adaptive=True, initial_limit=2), clock=clock)
    settled = _adaptive_past_slow_start(clock)
    for lim in (growing, settled):
        for _ in range(2):
            assert isinstance(lim.try_acquire(30), ConcurrencySlot)
        assert isinstance(lim.try_acquire(30), Waiter)
    for _ in range(4):
        clock.advance(0.25)
        growing.expire()
        settled.expire()
    assert settled.overloaded
    assert growing.standing and not growing.overloaded  # slow start: the limit's queue


def test_step_tracker_keeps_exactly_capacity_keys_for_exactly_idle_seconds() -> None:
    tracker = StepTracker(idle=10.0, capacity=3)
    for i, key in enumerate("abc"):
        tracker.admitted(key, 1000.0 + i)
    assert len(tracker) == 3 and all(tracker.started(k, 1002.0) for k in "abc")
    tracker.admitted("d", 1003.0)  # the least recently admitted makes room
    assert len(tracker) == 3 and not tracker.started("a", 1003.0)
    assert all(tracker.started(k, 1003.0) for k in "bcd")
    roomy = StepTracker(idle=10.0, capacity=5)
    roomy.admitted("a", 1000.0)
    roomy.admitted("b", 1010.0)  # "a" is exactly idle seconds old: still started
    assert roomy.started("a", 1010.0) and len(roomy) == 2
    assert not roomy.started("a", 1010.5)
    one = StepTracker(idle=10.0, capacity=1)
    one.admitted("x", 1000.0)
    one.admitted("y", 1001.0)
    assert one.started("y", 1001.0) and not one.started("x", 1001.0) and len(one) == 1
