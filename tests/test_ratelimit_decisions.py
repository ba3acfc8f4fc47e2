"""RateLimiter decisions: every strategy on every kind of store, failures, events, resets.

A caller's ``limits`` store stands in for a shared store (no Redis here): seawall's memory
storage and limits' own must agree, and a store that fails, times out or hangs must be
decided by the policy, on the driven clock.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from limits.aio.storage import MemoryStorage as LimitsAsyncMemory

from seawall.breaker import BreakerState, BreakerStateChanged
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.ratelimit import STORAGE_BREAKER, RateLimitPolicy
from seawall.ratelimit import (
    Decision,
    RateLimitAdmitted,
    RateLimited,
    RateLimiter,
    RateLimitStorageFailed,
)
from seawall.storage import BoundedMemoryStorage


@pytest.fixture
def limits_on_our_clock(clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    """limits' memory storage reads time.time(): make it read the driven wall clock."""
    import limits.aio.storage.memory as limits_memory

    fake_time = type("FakeTime", (), {"time": staticmethod(clock.wall)})
    monkeypatch.setattr(limits_memory, "time", fake_time)
    return clock


def _recorder() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    return bus, seen


def _whole(d: Decision) -> tuple[object, ...]:
    """A decision with its waits rounded to the microsecond (the stores' float noise)."""
    return (*d[:5], round(d.reset_after, 6), round(d.retry_after, 6), *d[7:])


class _DownStore(LimitsAsyncMemory):
    """A shared store that raises ``error`` on every call while it is set."""

    error: BaseException | None = None

    async def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
        if self.error is not None:
            raise self.error
        return await super().acquire_entry(*args, **kwargs)

    async def get_moving_window(self, *args: Any, **kwargs: Any) -> Any:
        if self.error is not None:
            raise self.error
        return await super().get_moving_window(*args, **kwargs)


# ---------------------------------------------------------------- the same decision on every store


async def test_a_limits_store_counts_the_sliding_window_like_seawalls_memory(
    limits_on_our_clock: ManualClock,
) -> None:
    """Remaining, reset and retry waits of the sliding window counter (weighted previous
    window, the sooner of its two resets, waits under a second) are the same on a caller's
    limits store as on memory://, under the driven clock (limits' own stats read time.time())."""
    clock = limits_on_our_clock
    policy = RateLimitPolicy(limit="4/minute", strategy="sliding-window-counter")
    on_limits = RateLimiter(policy, storage=LimitsAsyncMemory(), clock=clock, events=EventBus())
    on_memory = RateLimiter(policy, clock=clock, events=EventBus())
    # the driven wall clock starts 20 s into a 60 s window of limits' (wall-aligned) windows
    steps = [
        (0.0, "a", 1, (True, 3, 40.0)),  # the current window ends in 40 s
        (0.0, "a", 1, (True, 2, 40.0)),
        (39.5, "a", 1, (True, 1, 0.5)),  # half a second before it ends
        (5.5, "a", 1, (True, 1, 15.0)),  # 3 of the previous window weigh 2.75; 55 % 20 s
        (0.0, "a", 2, (False, 1, 15.0)),  # refused: the same wait
        (0.0, "a", 4, (False, 1, 15.0)),  # the whole rate: it may go once the counts age
        (0.0, "z", 5, (False, 4, 60.0)),  # more than the whole rate: never, say the window
        (70.0, "a", 1, (True, 3, 45.0)),
        (0.0, "a", 3, (True, 0, 45.0)),
    ]
    for advance, who, cost, (admitted, remaining, wait) in steps:
        clock.advance(advance)
        expected = (
            admitted,
            "default",
            4,
            60,
            remaining,
            wait,
            0.0 if admitted else wait,
            True,
            False,
        )
        assert _whole(await on_limits.hit((who,), cost)) == expected
        assert _whole(await on_memory.hit((who,), cost)) == expected


@pytest.mark.parametrize("store", ["memory", "limits"])
async def test_a_window_of_several_units_is_that_long_on_every_store(
    limits_on_our_clock: ManualClock, store: str
) -> None:
    clock = limits_on_our_clock
    policy = RateLimitPolicy(limit="1 per 2 minutes", strategy="fixed-window")
    storage = LimitsAsyncMemory() if store == "limits" else None
    limiter = RateLimiter(policy, storage=storage, clock=clock, events=EventBus())
    assert (await limiter.hit(("ip:1",))).window == 120
    clock.advance(61)
    refused = await limiter.hit(("ip:1",))
    assert (refused.admitted, refused.window) == (False, 120)
    assert round(refused.retry_after, 6) == 59.0
    clock.advance(60)
    assert (await limiter.hit(("ip:1",))).admitted


def test_one_fixed_window_rate_on_memory_is_a_fixed_window(clock: ManualClock) -> None:
    """One rate on memory:// takes a shortcut for the moving window only: a fixed window
    still forgets all it counted when it ends, where a moving window forgets one by one."""
    fixed = RateLimiter(
        RateLimitPolicy(limit="2/minute", strategy="fixed-window"), clock=clock, events=EventBus()
    )
    moving = RateLimiter(
        RateLimitPolicy(limit="2/minute", strategy="moving-window"), clock=clock, events=EventBus()
    )
    for limiter in (fixed, moving):
        assert limiter.hit_now(("ip:1",)).admitted
    clock.advance(30)
    for limiter in (fixed, moving):
        assert limiter.hit_now(("ip:1",)).admitted
    clock.advance(31)  # the first window has ended; the 2nd request is 31 s old
    assert [fixed.hit_now(("ip:1",)).admitted for _ in range(3)] == [True, True, False]
    assert [moving.hit_now(("ip:1",)).admitted for _ in range(2)] == [True, False]


def test_the_rate_with_fewest_left_names_an_admitted_decision_wherever_it_is(
    clock: ManualClock,
) -> None:
    """Three rates in one rule: the tightest is the middle one, not the one whose window
    resets first and not the first."""
    policy = RateLimitPolicy(limit="100/hour;3/minute;50/second")
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    assert limiter.hit_now(("ip:1",)) == Decision(True, "default-60s", 3, 60, 2, 60.0, 0.0)
    clock.advance(1)
    assert limiter.hit_now(("ip:1",), cost=2) == Decision(True, "default-60s", 3, 60, 0, 59.0, 0.0)
    refused = limiter.hit_now(("ip:1",))
    assert refused == Decision(False, "default-60s", 3, 60, 0, 59.0, 59.0)


@pytest.mark.parametrize("store", ["memory", "limits"])
async def test_two_rules_with_one_rate_keep_their_own_counters_when_their_keys_coincide(
    limits_on_our_clock: ManualClock, store: str
) -> None:
    """A user and a tenant both called acme (``h:acme`` for either header) each get the
    whole rate: a rule's name namespaces its counters, so two rules never share one."""
    clock = limits_on_our_clock
    policy = RateLimitPolicy.from_dict(
        {
            "limit": "2/minute",
            "key": "header:x-user",
            "rules": [{"limit": "2/minute", "key": "header:x-tenant", "name": "tenant"}],
            "header_keys_verified": True,
        }
    )
    storage = LimitsAsyncMemory() if store == "limits" else None
    limiter = RateLimiter(policy, storage=storage, clock=clock, events=EventBus())
    decisions = [await limiter.hit(("h:acme", "h:acme")) for _ in range(3)]
    assert [(d.admitted, d.remaining) for d in decisions] == [(True, 1), (True, 0), (False, 0)]


async def test_limiters_of_different_strategies_can_share_one_memory_storage(
    clock: ManualClock,
) -> None:
    """One bounded table for the process: each strategy keeps its own counters in it."""
    storage = BoundedMemoryStorage(clock=clock)
    limiters = {
        strategy: RateLimiter(
            RateLimitPolicy(limit="2/minute", strategy=strategy),
            storage=storage,
            clock=clock,
            events=EventBus(),
        )
        for strategy in ("fixed-window", "moving-window", "sliding-window-counter", "token-bucket")
    }
    for strategy, limiter in limiters.items():
        got = [limiter.hit_now(("ip:1",)) for _ in range(3)]
        assert [(d.admitted, d.remaining, d.storage_failed) for d in got] == [
            (True, 1, False),
            (True, 0, False),
            (False, 0, False),
        ], strategy


# ---------------------------------------------------------------- several rates on a limits store


async def test_a_limits_store_charges_nothing_for_a_costly_refused_request(
    limits_on_our_clock: ManualClock,
) -> None:
    """Every rate is tested at the request's cost before any is charged; on a tie the
    first rate names the decision."""
    clock = limits_on_our_clock
    policy = RateLimitPolicy.from_dict(
        {"limit": "3/minute", "rules": [{"limit": "3/minute", "key": "global", "name": "global"}]}
    )
    limiter = RateLimiter(policy, storage=LimitsAsyncMemory(), clock=clock, events=EventBus())

    async def hit(who: str, cost: int = 1) -> tuple[object, ...]:
        d = await limiter.hit((who, "*"), cost)
        return d.admitted, d.rule, d.remaining

    assert await hit("a") == (True, "default", 2)  # a tie: 2 left of both
    assert await hit("b") == (True, "global", 1)
    assert await hit("c", cost=2) == (False, "global", 1)  # c's own rate took nothing
    assert await hit("c") == (True, "global", 0)  # c has 2 of its own 3 left


# ---------------------------------------------------------------- construction and housekeeping


def test_a_limiter_without_a_policy_applies_the_default_policy(clock: ManualClock) -> None:
    limiter = RateLimiter(clock=clock, events=EventBus())
    default = RateLimitPolicy()
    assert limiter.policy == default
    ((item,),) = [rule.items for rule in default.all_rules()]
    d = limiter.hit_now(("ip:1",))
    assert (d.admitted, d.rule, d.limit, d.window) == (
        True,
        default.name,
        item.amount,
        item.get_expiry(),
    )


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
)
async def test_an_operators_reset_frees_a_key_on_memory(clock: ManualClock, strategy: str) -> None:
    """Every strategy (a review found the sliding window's counts kept under other keys)."""
    policy = RateLimitPolicy(limit="2/minute", strategy=strategy)  # type: ignore[arg-type]
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    for _ in range(3):
        limiter.hit_now(("ip:1",))
    limiter.hit_now(("ip:2",))
    assert not limiter.hit_now(("ip:1",)).admitted
    await limiter.clear(("ip:1",))
    assert limiter.hit_now(("ip:1",)).admitted
    if strategy == "moving-window":
        assert limiter.hit_now(("ip:3",)) == Decision(True, "default", 2, 60, 1, 60.0, 0.0)
    assert limiter.hit_now(("ip:2",)).remaining == 0  # the other key kept its count


async def test_storages_without_a_strategy_or_a_fast_path_say_so() -> None:
    with pytest.raises(ValueError) as refused:
        RateLimiter(RateLimitPolicy(strategy="token-bucket"), storage=LimitsAsyncMemory())
    assert str(refused.value) == (
        "strategy 'token-bucket' needs seawall's memory:// or redis:// storage, not MemoryStorage"
    )
    limiter = RateLimiter(RateLimitPolicy(), storage=LimitsAsyncMemory(), events=EventBus())
    assert not limiter.decides_without_io
    with pytest.raises(RuntimeError) as no_fast_path:
        limiter.hit_now(("ip:1",))
    assert str(no_fast_path.value) == "hit_now needs seawall's bounded memory storage (memory://)"


# ---------------------------------------------------------------- failures


class _BrokenMemory(BoundedMemoryStorage):
    def acquire_moving(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("table on fire")


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_failing_memory_storage_is_decided_by_the_policy(clock: ManualClock, mode: str) -> None:
    """Nothing is known: fail open admits with no wait, fail closed refuses for
    closed_retry_after; the event says what failed."""
    bus, seen = _recorder()
    policy = RateLimitPolicy(limit="3/minute", on_storage_error=mode, closed_retry_after=2.5)
    limiter = RateLimiter(policy, storage=_BrokenMemory(clock=clock), clock=clock, events=bus)
    wait = 0.0 if mode == "open" else 2.5
    expected = Decision(mode == "open", "default", 3, 60, 0, wait, wait, False, True)
    assert limiter.hit_now(("ip:1",)) == expected
    assert seen == [
        RateLimitStorageFailed(
            at=clock.now(), error="RuntimeError: table on fire", fail_open=mode == "open"
        )
    ]


def test_warnings_count_every_failure_they_held_back(
    clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RateLimitPolicy(limit="3/minute", log_interval=30.0)
    limiter = RateLimiter(
        policy, storage=_BrokenMemory(clock=clock), clock=clock, events=EventBus()
    )
    with caplog.at_level(logging.WARNING, logger="seawall.ratelimit"):
        for _ in range(4):
            limiter.hit_now(("ip:1",))
            clock.advance(5)
        clock.advance(30)
        limiter.hit_now(("ip:1",))
    reports = [r.getMessage() for r in caplog.records]
    first = (
        "rate-limit storage memory:// failed (RuntimeError: table on fire); "
        "failing open (in-process limits)"
    )
    assert reports == [first, first + "; 3 more failures since the last report"]
    assert limiter.storage_failures == 5


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (TimeoutError(), "TimeoutError: no answer within storage_timeout (0.2 s)"),
        (ConnectionError("refused"), "ConnectionError: refused"),
    ],
)
@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_store_that_fails_or_times_out_is_decided_by_the_policy(
    limits_on_our_clock: ManualClock, mode: str, error: Exception, said: str
) -> None:
    """A store that refuses, or answers TimeoutError (its own socket timeout), fails: the
    policy decides with in-process limits on the driven clock, events carry the
    request's cost, and repeated timeouts open the store's breaker (the limiter's bus
    hears it). A store failing at once is no slow call."""
    clock = limits_on_our_clock
    clock.advance(500)
    bus, seen = _recorder()
    policy = RateLimitPolicy(
        limit="2/minute",
        name="shared",
        on_storage_error=mode,
        closed_retry_after=2.5,
        storage_timeout=0.2,
        storage_breaker=STORAGE_BREAKER.replace(slow_call_duration=0.5, jitter=0.0),
    )
    store = _DownStore()
    limiter = RateLimiter(policy, storage=store, clock=clock, events=bus)
    ok = await limiter.hit(("ip:1",), cost=1)
    assert seen == [
        RateLimitAdmitted(at=clock.now(), rule="shared", key="ip:1", cost=1, remaining=1)
    ]
    assert (ok.admitted, ok.remaining) == (True, 1)
    store.error = error
    seen.clear()
    down = [await limiter.hit(("ip:1",), cost=1) for _ in range(2)]
    breaker = limiter.storage_breaker
    assert breaker is not None
    assert breaker.state is BreakerState.OPEN
    failed = RateLimitStorageFailed(
        at=clock.now(),
        error=said,
        fail_open=mode == "open",
    )
    opened = [e for e in seen if isinstance(e, BreakerStateChanged)]
    # two failures of three calls, and no slow call among them
    assert [(e.breaker, e.new, e.failure_rate, e.slow_rate) for e in opened] == [
        ("ratelimit-storage:shared", BreakerState.OPEN, 2 / 3, 0.0)
    ]
    if mode == "closed":
        assert down == [Decision(False, "shared", 2, 60, 0, 2.5, 2.5, False, True)] * 2
        assert [e for e in seen if not isinstance(e, BreakerStateChanged)] == [failed] * 2
        return
    # fail open: the same rate, counted in this process from the start of the outage
    assert [(d.admitted, d.remaining, d.storage_failed) for d in down] == [
        (True, 1, True),
        (True, 0, True),
    ]
    decided = [e for e in seen if isinstance(e, RateLimitAdmitted | RateLimited)]
    assert decided == [
        RateLimitAdmitted(at=clock.now(), rule="shared", key="ip:1", cost=1, remaining=r)
        for r in (1, 0)
    ]
    # while the breaker is open nobody asks the store; the in-process limits still count
    seen.clear()
    refused = await limiter.hit(("ip:1",))
    assert (refused.admitted, refused.storage_failed) == (False, True)
    assert [e for e in seen if isinstance(e, RateLimitStorageFailed | RateLimited)] == [
        RateLimitStorageFailed(
            at=clock.now(), error="not asked: ratelimit-storage:shared is open", fail_open=True
        ),
        RateLimited(
            at=clock.now(),
            rule="shared",
            key="ip:1",
            cost=1,
            limit=2,
            window=60,
            retry_after=refused.retry_after,
        ),
    ]
    clock.advance(61)  # a window later on the driven clock, the store still down
    back = await limiter.hit(("ip:1",), cost=2)
    assert (back.admitted, back.remaining, back.storage_failed) == (True, 0, True)


async def test_a_store_that_never_answers_costs_at_most_storage_timeout(
    limits_on_our_clock: ManualClock,
) -> None:
    clock = limits_on_our_clock
    bus, seen = _recorder()
    policy = RateLimitPolicy(limit="2/minute", storage_timeout=0.01, on_storage_error="closed")

    class Hung(LimitsAsyncMemory):
        async def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
            await asyncio.Event().wait()
            return True

    limiter = RateLimiter(policy, storage=Hung(), clock=clock, events=bus)
    async with asyncio.timeout(2.0):  # a limiter that waited for ever fails here
        decision = await limiter.hit(("ip:1",))
    assert (decision.admitted, decision.storage_failed, decision.known) == (False, True, False)
    failed = [e for e in seen if isinstance(e, RateLimitStorageFailed)]
    assert [e.error for e in failed] == ["TimeoutError: no answer within storage_timeout (0.01 s)"]


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_burst_waits_a_bounded_time_for_a_redis_connection_then_the_policy_decides(
    clock: ManualClock, mode: str
) -> None:
    """Every connection busy: a request queues at most 4 storage timeouts, then is decided
    by the policy. The wait says nothing about Redis (this process may be busy): the
    store's breaker is not told. No Redis is needed: nothing ever connects."""
    pytest.importorskip("redis")
    bus, seen = _recorder()
    policy = RateLimitPolicy(
        limit="3/minute",
        storage="redis://127.0.0.1:1/0",
        storage_timeout=0.005,
        on_storage_error=mode,
        closed_retry_after=2.5,
    )
    limiter = RateLimiter(policy, clock=clock, events=bus)
    slots = limiter.storage.slots  # type: ignore[union-attr]
    while not slots.locked():  # a burst holds every connection
        await slots.acquire()
    async with asyncio.timeout(2.0):  # a request that queued for ever fails here
        decision = await limiter.hit(("ip:1",), cost=2)
    failed = RateLimitStorageFailed(
        at=clock.now(),
        error="TimeoutError: no free Redis connection within 0.02 s",
        fail_open=mode == "open",
    )
    if mode == "open":  # in-process limits decide, at the request's cost
        assert _whole(decision) == (True, "default", 3, 60, 1, 60.0, 0.0, True, True)
        admitted = RateLimitAdmitted(
            at=clock.now(), rule="default", key="ip:1", cost=2, remaining=1
        )
        assert seen == [failed, admitted]
    else:
        assert decision == Decision(False, "default", 3, 60, 0, 2.5, 2.5, False, True)
        assert seen == [failed]
    breaker = limiter.storage_breaker
    assert breaker is not None
    assert (breaker.in_flight, breaker.rates()) == (0, (0, 0.0, 0.0))
    assert limiter.storage_failures == 1
    await limiter.aclose()


async def test_in_process_limits_are_bounded_by_max_tracked_keys(
    limits_on_our_clock: ManualClock,
) -> None:
    """While the shared store is down, a flood of distinct clients cannot grow the process:
    once the in-process table is full of limited clients, newcomers share one counter."""
    clock = limits_on_our_clock
    policy = RateLimitPolicy(limit="1/minute", max_tracked_keys=2)
    store = _DownStore()
    store.error = ConnectionError("store is down")
    limiter = RateLimiter(policy, storage=store, clock=clock, events=EventBus())
    got = [await limiter.hit((f"ip:{i}",)) for i in range(4)]
    assert all(d.storage_failed for d in got)
    assert [d.admitted for d in got] == [True, True, True, False]


async def test_seawalls_counters_in_a_callers_limits_store_stay_apart_from_its_own(
    limits_on_our_clock: ManualClock,
) -> None:
    """An app that also counts its own ``limits`` in the store it gave seawall (limits'
    default namespace) shares no counter with seawall, even for the same name and key."""
    from limits import parse
    from limits.aio.strategies import MovingWindowRateLimiter

    clock = limits_on_our_clock
    store = LimitsAsyncMemory()
    own = MovingWindowRateLimiter(store)
    item = parse("2/minute")
    assert [await own.hit(item, "default", "ip:1") for _ in range(3)] == [True, True, False]
    limiter = RateLimiter(
        RateLimitPolicy(limit="2/minute"), storage=store, clock=clock, events=EventBus()
    )
    got = [await limiter.hit(("ip:1",)) for _ in range(3)]
    assert [(d.admitted, d.remaining) for d in got] == [(True, 1), (True, 0), (False, 0)]


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
)
def test_a_cost_above_the_whole_limit_is_refused_with_a_wait_of_a_window(
    clock: ManualClock, strategy: str
) -> None:
    """Such a request can never go; every strategy says so with a non-zero wait (the
    sliding window said 0 on an empty window: a client told to retry at once, forever)."""
    policy = RateLimitPolicy(limit="4/minute", strategy=strategy)  # type: ignore[arg-type]
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    refused = limiter.hit_now(("ip:1",), 5)
    assert not refused.admitted and refused.retry_after > 0
    if strategy != "token-bucket":  # a bucket says when it would hold 5 tokens: never
        assert refused.retry_after == 60
