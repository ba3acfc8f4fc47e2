"""Storage: bounded memory storage semantics, 10^6 keys bounded and reclaimed, Redis modes."""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from limits import parse
from limits.aio.storage import MemoryStorage as LimitsAsyncMemory
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.clock import SYSTEM_CLOCK, ManualClock
from seawall.events import Event, EventBus
from seawall.policy.ratelimit import RateLimitPolicy
from seawall.ratelimit import (
    Decision,
    RateLimitAdmitted,
    RateLimited,
    RateLimiter,
    RateLimitStorageFailed,
)
from seawall.storage import BoundedMemoryStorage, storage_from_uri


async def test_moving_window_matches_limits_semantics(clock: ManualClock) -> None:
    storage = BoundedMemoryStorage(clock=clock)
    strategy = MovingWindowRateLimiter(storage)
    item = parse("3/minute")
    assert [await strategy.hit(item, "k") for _ in range(4)] == [True, True, True, False]
    stats = await strategy.get_window_stats(item, "k")
    assert stats.remaining == 0
    assert stats.reset_time == pytest.approx(clock.wall() + 60)
    clock.advance(59.9)
    assert not await strategy.hit(item, "k")
    clock.advance(0.2)  # the first three entries left the window, without any sleep
    assert await strategy.hit(item, "k")
    assert (await strategy.get_window_stats(item, "k")).remaining == 2
    assert not await strategy.hit(item, "k", cost=3)
    assert await strategy.test(item, "k", cost=2)


async def test_fixed_and_sliding_window_strategies_run_on_it(clock: ManualClock) -> None:
    storage = BoundedMemoryStorage(clock=clock)
    fixed = FixedWindowRateLimiter(storage)
    item = parse("2/second")
    assert [await fixed.hit(item, "f") for _ in range(3)] == [True, True, False]
    clock.advance(1.0)
    assert await fixed.hit(item, "f")
    sliding = SlidingWindowCounterRateLimiter(storage)
    item = parse("10/minute")
    assert sum([await sliding.hit(item, "s") for _ in range(15)]) == 10
    clock.advance(90)  # half of the previous window still weighs in
    stats = await sliding.get_window_stats(item, "s")
    assert 0 < stats.remaining < 10
    clock.advance(120)
    assert (await sliding.get_window_stats(item, "s")).remaining == 10
    await sliding.clear(item, "s")
    assert await storage.check()
    assert await storage.reset() is not None
    assert len(storage) == 0


async def test_eviction_forgets_the_cheapest_keys_first(clock: ManualClock) -> None:
    storage = BoundedMemoryStorage(clock=clock, max_keys=3)
    assert storage.acquire_moving("heavy", 4, 60)[0]
    assert storage.acquire_moving("heavy", 4, 60)[0]  # half its limit: protected
    for key in "ab":
        assert storage.acquire_moving(key, 4, 60)[0]  # a quarter: light
    storage.acquire_moving("a", 4, 60)  # "a" is now at half its limit too
    assert storage.acquire_moving("d", 4, 60)[0]
    assert len(storage) == 3
    assert storage.evicted == 1
    assert storage.moving_window("b", 60)[1] == 0  # the only light key was forgotten
    assert storage.moving_window("heavy", 60)[1] == 2  # older, but heavier: kept
    assert storage.moving_window("a", 60)[1] == 2


def test_a_moving_window_key_whose_entries_left_the_window_is_light_again(
    clock: ManualClock,
) -> None:
    """Found by mutation testing: a key re-tiered only upwards, so a client that was busy
    an hour ago stayed protected, and a full table sent newcomers to the shared overflow
    counter instead of forgetting it."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    for _ in range(8):
        assert storage.acquire_moving("was-busy", 8, 60)[0]  # at its limit: protected
    assert storage.acquire_moving("busy", 1, 60)[0]  # at its limit: protected
    clock.advance(61)
    assert storage.acquire_moving("busy", 1, 60)[0]  # a new window, at its limit again
    assert storage.acquire_moving("was-busy", 8, 60)[0]  # one entry of eight: light now
    assert storage.acquire_moving("new", 8, 60)[0]
    assert storage.overflowed == 0 and storage.evicted == 1
    assert storage.moving_window("was-busy", 60)[1] == 0  # the light key was forgotten
    assert storage.moving_window("busy", 60)[1] == 1 and storage.moving_window("new", 60)[1] == 1


def test_eviction_never_resets_a_limited_client_within_its_window() -> None:
    """Issue 13: 100,000 distinct /64s evicted a limited client's counter, which then got 5
    more 200s in the same minute at 5/minute. Now the flood shares the table's light end
    and the victim keeps its count until its window ends; memory stays bounded."""
    clock = ManualClock()
    policy = RateLimitPolicy(limit="5/minute", max_tracked_keys=1000)
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    victim = ("ip:192.0.2.7",)
    assert all(limiter.hit_now(victim).admitted for _ in range(5))
    for i in range(100_000):
        limiter.hit_now((f"ip:2001:db8:{i >> 16:x}:{i & 0xFFFF:x}::~64",))
        if i % 10_000 == 0:
            clock.advance(0.1)
    storage = limiter.storage
    assert isinstance(storage, BoundedMemoryStorage)
    assert len(storage) <= 1000
    assert storage.evicted >= 99_000
    assert sum(limiter.hit_now(victim).admitted for _ in range(5)) == 0
    clock.advance(60)  # the window ended: now it may go
    assert limiter.hit_now(victim).admitted


def test_a_table_full_of_limited_clients_makes_newcomers_share_one_counter(
    clock: ManualClock,
) -> None:
    """When every tracked key is at its limit, new keys share an overflow counter per
    rate: bounded memory, nobody's counter reset, and the error is towards limiting."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=10)
    for i in range(10):
        assert storage.acquire_moving(f"k{i}", 1, 60)[0]  # each at its limit
    admitted = [storage.acquire_moving(f"new{i}", 1, 60)[0] for i in range(5)]
    assert admitted == [True, False, False, False, False]
    assert storage.overflowed == 5
    assert len(storage) == 10
    assert not storage.acquire_moving("k3", 1, 60)[0]  # still limited
    clock.advance(61)  # windows over: expired keys make room again
    assert storage.acquire_moving("late", 1, 60)[0]
    assert storage.moving_window("late", 60)[1] == 1
    storage.sweep()
    assert len(storage._records) == len(storage) == 1  # the overflow counter expired too


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
)
def test_newcomers_in_a_full_table_share_the_overflow_counter_in_every_strategy(
    clock: ManualClock, strategy: str
) -> None:
    policy = RateLimitPolicy(limit="2/minute", strategy=strategy, max_tracked_keys=5)  # type: ignore[arg-type]
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    for i in range(5):
        assert limiter.hit_now((f"ip:10.0.0.{i}",)).admitted  # half of 2: protected
    newcomers = [limiter.hit_now((f"ip:10.1.0.{i}",)).admitted for i in range(4)]
    assert newcomers == [True, True, False, False]
    storage = limiter.storage
    assert isinstance(storage, BoundedMemoryStorage)
    assert len(storage) == 5
    assert limiter.hit_now(("ip:10.0.0.1",)).admitted  # its own second request


def test_a_million_distinct_keys_stay_bounded_and_are_reclaimed() -> None:
    """10^6 client addresses against a 50,000-key table: at most 50,000 keys, ever."""
    clock = ManualClock()
    cap = 50_000
    storage = BoundedMemoryStorage(clock=clock, max_keys=cap)
    proc = psutil.Process()
    gc.collect()
    rss_before = proc.memory_info().rss
    acquire = storage.acquire_moving
    peak = 0
    for i in range(1_000_000):
        acquire(f"seawall/default/ip:10.{i >> 16}.{(i >> 8) & 255}.{i & 255}/100/1/minute", 100, 60)
        if i % 50_000 == 0:
            clock.advance(0.5)  # the flood lasts 10 s of driven time
            peak = max(peak, len(storage))
    peak = max(peak, len(storage))
    assert peak <= cap
    assert storage.evicted >= 1_000_000 - cap
    gc.collect()
    growth = proc.memory_info().rss - rss_before
    assert growth < 64 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    # After the window, new traffic reclaims the expired keys a few at a time...
    clock.advance(61)
    before = storage.reclaimed
    for i in range(1000):
        acquire(f"late-{i}", 100, 60)
    assert storage.reclaimed - before >= 1000
    # ...and an explicit sweep drops all the rest at once.
    storage.sweep()
    assert len(storage) == 1000


async def test_limits_memory_storage_shortfall() -> None:
    """Why seawall has its own: limits' async MemoryStorage spawns an unowned task, keeps
    one lock per key, has no key cap and holds expired moving-window keys until a sweep."""
    storage = LimitsAsyncMemory()
    strategy = MovingWindowRateLimiter(storage)
    item = parse("1/second")
    for i in range(500):
        await strategy.hit(item, f"k{i}")
    timer = storage.timer
    assert isinstance(timer, asyncio.Task)  # a background task nobody awaits
    assert len(storage.events) == 500  # no bound on keys
    assert len(storage.locks) >= 1
    await asyncio.sleep(0)  # let its sweep start; the keys are not expired yet
    assert len(storage.events) == 500
    timer.cancel()


def test_storage_from_uri() -> None:
    clock = ManualClock()
    memory = storage_from_uri("memory://", clock=clock, max_tracked_keys=7)
    assert isinstance(memory, BoundedMemoryStorage)
    assert memory.max_keys == 7
    assert memory.clock is clock
    with pytest.raises(ValueError, match="unsupported"):
        storage_from_uri("memcached://localhost:11211")
    with pytest.raises(ValueError):
        BoundedMemoryStorage(max_keys=0)


# --- Redis ---------------------------------------------------------------------------------


def _name() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.mark.redis
@pytest.mark.parametrize("scheme", ["redis://", "async+redis://"])
async def test_redis_backed_limit(redis_url: str, scheme: str) -> None:
    uri = scheme + redis_url.split("://", 1)[1]
    policy = RateLimitPolicy(limit="5/minute", storage=uri, name=_name())
    limiter = RateLimiter(policy, clock=SYSTEM_CLOCK, events=EventBus())
    results = [await limiter.hit(("ip:10.0.0.1",)) for _ in range(7)]
    assert [d.admitted for d in results] == [True] * 5 + [False] * 2
    assert results[4].remaining == 0
    assert 0 < results[5].retry_after <= 60
    other = await limiter.hit(("ip:10.0.0.2",))
    assert other.admitted
    assert limiter.storage_failures == 0


@pytest.mark.redis
async def test_redis_several_rules_test_then_hit(redis_url: str) -> None:
    from seawall.policy.ratelimit import LimitRule

    policy = RateLimitPolicy(
        limit="3/minute",
        key="header:x-tenant",
        header_keys_verified=True,
        storage=redis_url,
        name=_name(),
        rules=(LimitRule("4/minute", key="global", name=_name()),),
    )
    limiter = RateLimiter(policy, events=EventBus())
    a = [(await limiter.hit(("h:a", "*"))).admitted for _ in range(4)]
    b = [(await limiter.hit(("h:b", "*"))).admitted for _ in range(2)]
    assert a == [True, True, True, False]
    assert b == [True, False]  # the global cap (4) is full after a:3 + b:1
    await limiter.aclose()


def _app(policy: RateLimitPolicy, bus: EventBus) -> Starlette:
    async def home(_request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", home)])
    app.add_middleware(RateLimitMiddleware, policy=policy, events=bus)
    return app


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_down_follows_the_policy(
    redis_process: Callable[[], Any], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_process()
    policy = RateLimitPolicy.from_dict(
        {"limit": "100/minute", "storage": server.url, "on_storage_error": mode, "name": _name()}
    )
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    transport = httpx.ASGITransport(app=_app(policy, bus))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        up = await client.get("/")
        assert up.status_code == 200
        assert up.headers["ratelimit"].endswith(";t=60")
        server.stop()
        down = [await client.get("/") for _ in range(5)]
    statuses = {r.status_code for r in down}
    failures = [e for e in seen if isinstance(e, RateLimitStorageFailed)]
    # With the success before, 2 failures of 3 calls open the store's breaker: 3 not asked.
    assert len(failures) == 5
    assert sum(e.error.startswith("not asked") for e in failures) == 3
    assert all(e.fail_open is (mode == "open") for e in failures)
    warnings = [r for r in caplog.records if "rate-limit storage" in r.getMessage()]
    assert len(warnings) == 1  # logged once per interval, not once per request
    if mode == "open":
        assert statuses == {200}
        # Decided by the in-process limits, whose window started with the outage.
        assert down[0].headers["ratelimit"].endswith("r=99;t=60")
    else:
        assert statuses == {503}
        assert int(down[0].headers["retry-after"]) >= 1
        assert down[0].headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    "strategy", ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
)
async def test_every_strategy_gives_a_driven_retry_after(clock: ManualClock, strategy: str) -> None:
    """Retry-After stays within the window under an injected clock, whatever the strategy
    (limits' sliding-window stats add time.time(); seawall reads the relative TTLs)."""
    policy = RateLimitPolicy.from_dict({"limit": "3/minute", "strategy": strategy})
    limiter = RateLimiter(policy, clock=clock, events=EventBus())
    clock.advance(7.0)
    decisions = [await limiter.hit(("ip:1",)) for _ in range(4)]
    assert [d.admitted for d in decisions] == [True, True, True, False]
    assert 0 < decisions[3].retry_after <= 60
    assert decisions[2].remaining == 0
    clock.advance(121)
    assert (await limiter.hit(("ip:1",))).admitted


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_hung_store_is_a_failure_not_a_hang(mode: str) -> None:
    """A Redis that accepts connections but never answers (overloaded) trips the socket
    timeout, and the policy decides; redis-py's default retries with back-off are off."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections queue in the backlog; nobody ever answers
        port = silent.getsockname()[1]
        policy = RateLimitPolicy.from_dict(
            {
                "storage": f"redis://127.0.0.1:{port}/0",
                "storage_timeout": 0.05,
                "on_storage_error": mode,
            }
        )
        limiter = RateLimiter(policy, events=EventBus())
        decision = await limiter.hit(("ip:1",))
    assert decision.storage_failed
    assert decision.admitted is (mode == "open")
    assert limiter.storage_failures == 1


def test_memory_decides_every_strategy_without_io(clock: ManualClock) -> None:
    for strategy in ("fixed-window", "moving-window", "sliding-window-counter", "token-bucket"):
        fast = RateLimiter(
            RateLimitPolicy(strategy=strategy, limit="2/minute"), clock=clock, events=EventBus()
        )
        assert fast.decides_without_io
        assert [fast.hit_now(("ip:1",)).admitted for _ in range(3)] == [True, True, False]


def test_only_seawall_storages_know_the_token_bucket() -> None:
    with pytest.raises(ValueError, match="token-bucket"):
        RateLimiter(RateLimitPolicy(strategy="token-bucket"), storage=LimitsAsyncMemory())
    other = RateLimiter(RateLimitPolicy(), storage=LimitsAsyncMemory(), events=EventBus())
    assert not other.decides_without_io
    with pytest.raises(RuntimeError, match="memory"):
        other.hit_now(("ip:1",))


@settings(max_examples=50, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=30, allow_nan=False), st.integers(1, 3)),
        min_size=1,
        max_size=40,
    )
)
def test_fast_path_decides_exactly_like_limits_own_moving_window(
    steps: list[tuple[float, int]],
) -> None:
    """seawall's no-await hit agrees with MovingWindowRateLimiter on limits' MemoryStorage,
    whose time source is pointed at the same driven clock."""
    import limits.aio.storage.memory as limits_memory

    clock = ManualClock()
    fake_time = type("FakeTime", (), {"time": staticmethod(clock.wall)})

    async def run() -> tuple[list[bool], list[bool]]:
        ours = RateLimiter(RateLimitPolicy(limit="5/minute"), clock=clock, events=EventBus())
        theirs = MovingWindowRateLimiter(LimitsAsyncMemory())
        item = parse("5/minute")
        a: list[bool] = []
        b: list[bool] = []
        for advance, cost in steps:
            clock.advance(advance)
            a.append(ours.hit_now(("k",), cost).admitted)
            b.append(await theirs.hit(item, "k", cost=cost))
        timer = theirs.storage.timer  # type: ignore[attr-defined]
        if timer is not None:
            timer.cancel()
        return a, b

    original = limits_memory.time
    limits_memory.time = fake_time  # type: ignore[assignment]
    try:
        ours, theirs = asyncio.run(run())
    finally:
        limits_memory.time = original
    assert ours == theirs


@settings(max_examples=80, deadline=None)
@given(
    limit=st.integers(1, 8),
    window=st.sampled_from([1, 10, 60]),
    steps=st.lists(
        st.tuples(st.floats(min_value=0, max_value=20, allow_nan=False), st.integers(1, 3)),
        min_size=1,
        max_size=60,
    ),
)
def test_token_bucket_never_exceeds_its_burst_plus_its_rate(
    limit: int, window: int, steps: list[tuple[float, int]]
) -> None:
    """GCRA's promise, checked against every admitted history: within any span of d
    seconds at most limit + d * limit / window tokens are spent; and a full bucket admits a
    burst of limit."""
    clock = ManualClock()
    storage = BoundedMemoryStorage(clock=clock)
    spent: list[tuple[float, int]] = []
    for advance, cost in steps:
        clock.advance(advance)
        if cost > limit:
            continue
        ok, _, _ = storage.decide("token-bucket", ["k"], [limit], [float(window)], cost)
        if ok:
            spent.append((clock.now(), cost))
    for i, (start, _) in enumerate(spent):
        total = 0
        for at, cost in spent[i:]:
            total += cost
            assert total <= limit + (at - start) * limit / window + 1e-6
    clock.advance(window)
    fresh = [
        storage.decide("token-bucket", ["k"], [limit], [float(window)])[0] for _ in range(limit + 1)
    ]
    assert fresh == [True] * limit + [False]


# ---------------------------------------------------------------- several rates, whole decisions

STRATEGIES = ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_several_rates_decide_whole_and_name_the_tightest(
    clock: ManualClock, strategy: str
) -> None:
    """Admitted: the rate with the fewest left names the decision (the first on a tie).
    Refused: the first rate that refuses, its wait, and nothing charged anywhere."""
    policy = RateLimitPolicy.from_dict(
        {
            "limit": "4/minute",
            "strategy": strategy,
            "rules": [{"limit": "8/minute", "key": "global", "name": "global"}],
        }
    )
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    limiter = RateLimiter(policy, clock=clock, events=bus)

    async def hit(who: str) -> tuple[object, ...]:
        d = await limiter.hit((who, "*"), cost=2)
        assert d.known and not d.storage_failed
        assert 0 < d.reset_after <= 60
        assert d.retry_after == (0.0 if d.admitted else d.reset_after)
        return d.admitted, d.rule, d.limit, d.window, d.remaining

    assert await hit("a") == (True, "default", 4, 60, 2)
    assert await hit("a") == (True, "default", 4, 60, 0)
    assert await hit("a") == (False, "default", 4, 60, 0)
    # a tie with the global 2 left: a's refused request took nothing from the global 8
    assert await hit("b") == (True, "default", 4, 60, 2)
    assert await hit("b") == (True, "default", 4, 60, 0)  # both at 0: the first rate
    assert await hit("c") == (False, "global", 8, 60, 0)
    # each event names the key of the rate that decided, not the first key
    first = RateLimitAdmitted(at=clock.now(), rule="default", key="a", cost=2, remaining=2)
    assert seen[0] == first
    refused = seen[-1]
    assert isinstance(refused, RateLimited)
    assert refused == RateLimited(
        at=clock.now(),
        rule="global",
        key="*",
        cost=2,
        limit=8,
        window=60,
        retry_after=refused.retry_after,
    )
    assert 0 < refused.retry_after <= 60
    clock.advance(121)  # two windows: every strategy has forgotten
    assert await hit("c") == (True, "default", 4, 60, 2)


class _FlakyLimitsStore(LimitsAsyncMemory):
    """limits' own memory storage, standing in for a shared store that can go down."""

    down = False


def _flaky(name: str) -> Any:
    original = getattr(LimitsAsyncMemory, name)

    async def method(self: _FlakyLimitsStore, *args: Any, **kwargs: Any) -> Any:
        if self.down:
            raise ConnectionError("store is down")
        return await original(self, *args, **kwargs)

    return method


for _name_ in (
    "incr",
    "get",
    "get_expiry",
    "acquire_entry",
    "get_moving_window",
    "acquire_sliding_window_entry",
    "get_sliding_window",
):
    setattr(_FlakyLimitsStore, _name_, _flaky(_name_))


@pytest.fixture
def limits_on_our_clock(clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    import limits.aio.storage.memory as limits_memory

    fake_time = type("FakeTime", (), {"time": staticmethod(clock.wall)})
    monkeypatch.setattr(limits_memory, "time", fake_time)
    return clock


@pytest.mark.parametrize("strategy", ["fixed-window", "moving-window", "sliding-window-counter"])
async def test_a_limits_store_tests_every_rate_before_it_charges_any(
    limits_on_our_clock: ManualClock, strategy: str
) -> None:
    clock = limits_on_our_clock
    policy = RateLimitPolicy.from_dict(
        {
            "limit": "3/hour",
            "strategy": strategy,
            "rules": [{"limit": "5/minute", "key": "global", "name": "global"}],
        }
    )
    store = _FlakyLimitsStore()
    limiter = RateLimiter(policy, storage=store, clock=clock, events=EventBus())

    async def hit(who: str) -> tuple[object, ...]:
        d = await limiter.hit((who, "*"))
        assert d.known and not d.storage_failed
        assert d.retry_after == (0.0 if d.admitted else d.reset_after)
        return d.admitted, d.rule, d.limit, d.window, d.remaining

    assert [await hit("a") for _ in range(4)] == [
        (True, "default", 3, 3600, 2),
        (True, "default", 3, 3600, 1),
        (True, "default", 3, 3600, 0),
        (False, "default", 3, 3600, 0),
    ]
    assert [await hit("b") for _ in range(3)] == [
        (True, "global", 5, 60, 1),  # a's refused 4th took nothing from the global 5
        (True, "global", 5, 60, 0),
        (False, "global", 5, 60, 0),
    ]
    clock.advance(61)  # b's refused 3rd took nothing from b's own 3 an hour
    assert [await hit("b") for _ in range(2)] == [
        (True, "default", 3, 3600, 0),
        (False, "default", 3, 3600, 0),
    ]
    await limiter.clear(("b", "*"))  # an operator's reset
    assert await hit("b") == (True, "default", 3, 3600, 2)


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_failing_shared_store_follows_the_policy_and_its_breaker(
    limits_on_our_clock: ManualClock, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = limits_on_our_clock
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    policy = RateLimitPolicy.from_dict(
        {
            "limit": "3/minute",
            "name": "shared",
            "on_storage_error": mode,
            "closed_retry_after": 2.5,
            "log_interval": 30.0,
        }
    )
    store = _FlakyLimitsStore()
    limiter = RateLimiter(policy, storage=store, clock=clock, events=bus)
    up = await limiter.hit(("ip:1",))
    assert (up.admitted, up.remaining, up.storage_failed) == (True, 2, False)
    store.down = True
    seen.clear()
    down = [await limiter.hit(("ip:1",)) for _ in range(5)]
    # 1 success then 2 failures of 3 calls open the store's breaker: 3 requests not asked
    assert limiter.storage_failures == 2
    assert limiter.storage_skipped == 3
    failed = [e for e in seen if isinstance(e, RateLimitStorageFailed)]
    assert failed[0] == RateLimitStorageFailed(
        at=clock.now(), error="ConnectionError: store is down", fail_open=mode == "open"
    )
    assert [e.error for e in failed[2:]] == ["not asked: ratelimit-storage:shared is open"] * 3
    assert all(e.fail_open is (mode == "open") for e in failed)
    assert all(d.storage_failed for d in down)
    if mode == "open":
        # the same rate, counted in this process from the start of the outage
        assert [(d.admitted, d.rule, d.remaining, d.known) for d in down] == [
            (True, "shared", 2, True),
            (True, "shared", 1, True),
            (True, "shared", 0, True),
            (False, "shared", 0, True),
            (False, "shared", 0, True),
        ]
        decided = [e for e in seen if isinstance(e, RateLimitAdmitted | RateLimited)]
        assert [type(e) for e in decided] == [RateLimitAdmitted] * 3 + [RateLimited] * 2
    else:
        assert set(down) == {
            Decision(False, "shared", 3, 60, 0, 2.5, 2.5, known=False, storage_failed=True)
        }
        assert len(failed) == 5
    warnings = [r.getMessage() for r in caplog.records if "rate-limit storage" in r.getMessage()]
    assert len(warnings) == 1  # once per log_interval
    assert warnings[0] == (
        "rate-limit storage memory:// failed (ConnectionError: store is down); failing "
        + ("open (in-process limits)" if mode == "open" else "closed (refusing with 503)")
    )

    # The breaker lets one probe through after its open time; the store is back.
    store.down = False
    clock.advance(31.0)
    back = await limiter.hit(("ip:9",))
    assert (back.admitted, back.storage_failed, back.known) == (True, False, True)
    assert limiter.storage_breaker is not None
    assert limiter.storage_breaker.state.value == "closed"
    # Down again after the log interval: one more warning, counting what it held back.
    store.down = True
    caplog.clear()
    for _ in range(2):
        await limiter.hit(("ip:9",))
    clock.advance(31.0)
    await limiter.hit(("ip:9",))
    reports = [r.getMessage() for r in caplog.records if "rate-limit storage" in r.getMessage()]
    assert reports == [warnings[0] + "; 1 more failures since the last report"] * 2


async def test_a_shared_store_call_is_timed_on_the_clock_and_cancelling_it_proves_nothing(
    limits_on_our_clock: ManualClock,
) -> None:
    from seawall.breaker import BreakerState
    from seawall.policy.ratelimit import STORAGE_BREAKER

    clock = limits_on_our_clock
    policy = RateLimitPolicy(
        limit="100/minute",
        storage_breaker=STORAGE_BREAKER.replace(slow_call_duration=0.5),
    )
    store = _FlakyLimitsStore()
    limiter = RateLimiter(policy, storage=store, clock=clock, events=EventBus())
    for _ in range(5):  # answers take no driven time: never slow, whatever the clock reads
        assert (await limiter.hit(("ip:1",))).admitted
    breaker = limiter.storage_breaker
    assert breaker is not None
    assert breaker.rates() == (5, 0.0, 0.0)

    entered = asyncio.Event()

    class Stuck(_FlakyLimitsStore):
        async def acquire_entry(self, *args: Any, **kwargs: Any) -> bool:
            entered.set()
            await asyncio.Event().wait()
            return True

    stuck = RateLimiter(
        RateLimitPolicy(limit="100/minute", storage_timeout=30.0),
        storage=Stuck(),
        clock=clock,
        events=EventBus(),
    )
    task = asyncio.create_task(stuck.hit(("ip:1",)))
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stuck.storage_breaker is not None
    assert stuck.storage_breaker.in_flight == 0  # its permit came back, as NEUTRAL
    assert stuck.storage_breaker.rates() == (0, 0.0, 0.0)
    assert stuck.storage_failures == 0
    assert stuck.storage_breaker.state is BreakerState.CLOSED


@pytest.mark.parametrize("store", ["memory", "limits"])
async def test_one_rate_decides_whole_to_the_last_half_second(
    limits_on_our_clock: ManualClock, store: str
) -> None:
    clock = limits_on_our_clock
    policy = RateLimitPolicy(limit="3/minute")  # moving window: one combined hit and read
    storage = _FlakyLimitsStore() if store == "limits" else None
    limiter = RateLimiter(policy, storage=storage, clock=clock, events=EventBus())
    assert await limiter.hit(("ip:1",), cost=2) == Decision(True, "default", 3, 60, 1, 60.0, 0.0)
    clock.advance(59.5)
    refused = await limiter.hit(("ip:1",), cost=2)
    assert refused == Decision(False, "default", 3, 60, 1, 0.5, 0.5)
    clock.advance(0.51)
    assert (await limiter.hit(("ip:1",), cost=3)).admitted  # the first two have left


# ------------------------------------------------- edges of the bounded table and its windows


def test_a_cost_above_the_limit_is_refused_and_still_reads_the_window(clock: ManualClock) -> None:
    limiter = RateLimiter(RateLimitPolicy(limit="3/minute"), clock=clock, events=EventBus())
    # a fresh client: nothing counted, the whole window ahead
    assert limiter.hit_now(("ip:1",), cost=4) == Decision(False, "default", 3, 60, 3, 60.0, 60.0)
    assert limiter.hit_now(("ip:1",)).admitted
    clock.advance(10)
    assert limiter.hit_now(("ip:1",), cost=4) == Decision(False, "default", 3, 60, 2, 50.0, 50.0)
    clock.advance(61)  # its entry left the window: the record is there, empty
    assert limiter.hit_now(("ip:1",), cost=4) == Decision(False, "default", 3, 60, 3, 60.0, 60.0)
    assert limiter.hit_now(("ip:1",), cost=3).admitted


def test_an_entry_exactly_one_window_old_still_counts_whatever_else_arrives(
    clock: ManualClock,
) -> None:
    """An entry counts while ``now - window <= t``: at that very instant a newcomer's
    reclaim and a sweep must not forget it (they did: the record expired at t + window)."""
    storage = BoundedMemoryStorage(clock=clock)
    assert storage.acquire_moving("a", 1, 1.0)[0]
    clock.advance(1.0)
    assert storage.acquire_moving("b", 1, 1.0)[0]  # a new key reclaims what has expired
    assert storage.sweep() == 0
    assert not storage.acquire_moving("a", 1, 1.0)[0]
    assert storage.decide("moving-window", ["a"], [1], [1.0]) == (False, 0, [(0, 0.0)])
    clock.advance(0.25)
    assert storage.acquire_moving("a", 1, 1.0)[0]


def test_a_fixed_window_ends_exactly_at_its_start_plus_its_length(clock: ManualClock) -> None:
    """At that instant the table's limited clients are expired: a newcomer reclaims one and
    gets a counter of its own, and a sweep drops the rest."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=3)
    for key in "abc":
        assert storage.decide("fixed-window", [key], [2], [60.0], 2)[0]  # each at its limit
    clock.advance(60)
    assert storage.decide("fixed-window", ["new"], [2], [60.0], 2) == (True, -1, [(0, 60.0)])
    assert (storage.overflowed, storage.reclaimed, len(storage)) == (0, 3, 1)
    assert storage.decide("fixed-window", ["a"], [2], [60.0], 2)[0]  # a new window for a too
    clock.advance(60)
    assert storage.sweep() == 2
    assert (storage.reclaimed, len(storage)) == (5, 0)


async def test_eviction_forgets_under_a_quarter_then_under_half_then_nothing(
    clock: ManualClock,
) -> None:
    """The eviction order the class promises: least recently used under a quarter of its
    limit first, then under half; exactly a quarter is not under a quarter, a third is
    under half; half or more never goes before its window ends."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=3)

    def hit(key: str, limit: int, cost: int = 1) -> None:
        assert storage.decide("fixed-window", [key], [limit], [60.0], cost)[0]

    hit("third", 6, 2)  # under half
    hit("quarter", 4)  # exactly a quarter
    hit("fifth", 5)  # under a quarter: the cheapest, though the most recent
    hit("heavy", 2)  # half of 2
    assert [await storage.get(k) for k in ("third", "quarter", "fifth", "heavy")] == [2, 1, 0, 1]
    hit("heavier", 2)  # no light key left: the least recently used under half goes
    assert [await storage.get(k) for k in ("third", "quarter", "heavy")] == [0, 1, 1]
    hit("heaviest", 2)
    assert [await storage.get(k) for k in ("quarter", "heavy", "heavier")] == [0, 1, 1]
    assert storage.evicted == 3
    hit("late", 2)  # only keys at half or more: the newcomer shares the overflow counter
    assert (storage.evicted, storage.overflowed, len(storage)) == (3, 1, 3)
    assert [await storage.get(k) for k in ("heavy", "heavier", "heaviest")] == [1, 1, 1]


def test_a_moving_window_at_exactly_a_quarter_outlasts_a_lighter_newer_key(
    clock: ManualClock,
) -> None:
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    assert storage.acquire_moving("quarter", 4, 60)[0]
    assert storage.acquire_moving("eighth", 8, 60)[0]
    assert storage.acquire_moving("new", 8, 60)[0]
    assert storage.moving_window("quarter", 60)[1] == 1
    assert storage.moving_window("eighth", 60)[1] == 0


async def test_limits_counters_forget_one_hit_keys_first_and_overflow_when_all_are_heavier(
    clock: ManualClock,
) -> None:
    """Through limits' own fixed window the storage does not know the limit: a key hit
    once is the cheapest to forget, a key hit twice is kept until its window ends."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    fixed = FixedWindowRateLimiter(storage)
    item = parse("2/minute")
    assert await fixed.hit(item, "one")
    assert [await fixed.hit(item, "two") for _ in range(2)] == [True, True]
    assert await fixed.hit(item, "three")  # "one" goes, though "two" is older
    assert (await fixed.get_window_stats(item, "one")).remaining == 2
    assert (await fixed.get_window_stats(item, "two")).remaining == 0
    assert await fixed.hit(item, "four")  # "three" goes, "two" stays
    assert (await fixed.get_window_stats(item, "three")).remaining == 2
    assert not await fixed.hit(item, "two")
    assert await fixed.hit(item, "four")  # now both held keys are at their limit...
    newcomers = [await fixed.hit(item, f"new{i}") for i in range(3)]
    assert newcomers == [True, True, False]  # ...so newcomers share one overflow counter
    assert (storage.evicted, storage.overflowed, len(storage)) == (2, 3, 2)


def test_newcomers_at_each_rate_get_that_rate_s_own_overflow_counter(clock: ManualClock) -> None:
    """One overflow counter per rate: a rate's newcomers are not refused because another
    rate of the same window filled its own."""
    for strategy in ("fixed-window", "moving-window"):
        storage = BoundedMemoryStorage(clock=clock, max_keys=1)
        assert storage.decide(strategy, ["held"], [1], [60.0])[0]  # at its limit
        five = [storage.decide(strategy, [f"a{i}"], [5], [60.0])[0] for i in range(6)]
        assert five == [True] * 5 + [False]
        assert storage.decide(strategy, ["b"], [1], [60.0])[0]
        assert not storage.decide(strategy, ["c"], [1], [60.0])[0]
        assert storage.overflowed == 8
    storage = BoundedMemoryStorage(clock=clock, max_keys=1)
    assert storage.acquire_moving("held", 1, 60)[0]
    assert [storage.acquire_moving(f"a{i}", 5, 60)[0] for i in range(6)] == [True] * 5 + [False]
    assert storage.acquire_moving("b", 1, 60)[0]
    assert not storage.acquire_moving("c", 1, 60)[0]
    assert storage.overflowed == 8


def test_sliding_window_records_are_bounded_and_last_two_windows(clock: ManualClock) -> None:
    """A sliding window needs this window's count and the previous one's, both in one
    record per client that lasts until its window stops weighing on the next; then the
    table takes newcomers again. A tracked client entering a new window rolls its record
    forward: on a full table it forgets nobody's count, its own included (found by
    mutation testing: with one record per window, entering a new window evicted the
    oldest protected record, here a's own previous count, and a got one request past its
    limit)."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    sliding = "sliding-window-counter"
    for key in "ab":
        assert storage.decide(sliding, [key], [2], [4.0], 2)[0]  # at the limit: protected
    assert not storage.decide(sliding, ["c"], [2], [4.0], 3)[0]
    assert storage.decide(sliding, ["c"], [2], [4.0], 2)[0]  # the shared overflow counter
    assert not storage.decide(sliding, ["d"], [2], [4.0])[0]
    assert (storage.overflowed, len(storage)) == (3, 2)
    clock.advance(4)  # a's previous window weighs in whole
    assert not storage.decide(sliding, ["a"], [2], [4.0])[0]
    clock.advance(2)  # half of it: room for one
    assert storage.decide(sliding, ["a"], [2], [4.0])[0]
    assert not storage.decide(sliding, ["a"], [2], [4.0])[0]  # and no more
    assert storage.decide(sliding, ["b"], [2], [4.0])[0]
    assert (len(storage), storage.evicted, storage.overflowed) == (2, 0, 3)
    clock.advance(6)  # the window after a's and b's last hits is over: nothing weighs
    for key in "xy":
        assert storage.decide(sliding, [key], [2], [4.0], 2)[0]
    assert (storage.overflowed, len(storage)) == (3, 2)


async def test_limits_sliding_window_records_last_two_windows(clock: ManualClock) -> None:
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    sliding = SlidingWindowCounterRateLimiter(storage)
    item = parse("2/4 seconds")
    for key in "ab":
        assert [await sliding.hit(item, key) for _ in range(2)] == [True, True]
    assert await sliding.hit(item, "c")
    assert storage.overflowed == 1
    clock.advance(8)  # two windows: both records are done, newcomers get their own
    assert await sliding.hit(item, "d")
    assert await sliding.hit(item, "d")
    assert (storage.overflowed, len(storage)) == (1, 1)
    await sliding.clear(item, "d")
    assert len(storage) == 0


async def test_the_limits_interface_counts_one_by_default(clock: ManualClock) -> None:
    """limits' storage interface: ``amount`` is 1 unless given."""
    storage = BoundedMemoryStorage(clock=clock)
    assert await storage.incr("k", 60) == 1
    assert await storage.get("k") == 1
    assert await storage.acquire_entry("m", 1, 60)
    assert await storage.acquire_sliding_window_entry("s", 1, 60)
    await storage.clear("k")
    assert await storage.get("k") == 0


async def test_one_key_through_two_limits_strategies(clock: ManualClock) -> None:
    """limits names a key by its rate, not its strategy: a fixed window's counter and a
    moving window's entries under one key must not trip each other up."""
    storage = BoundedMemoryStorage(clock=clock)
    item = parse("2/minute")
    assert await FixedWindowRateLimiter(storage).hit(item, "k")
    assert await MovingWindowRateLimiter(storage).hit(item, "k")
    assert (await MovingWindowRateLimiter(storage).get_window_stats(item, "k")).remaining == 1


async def test_storage_from_uri_schemes_and_defaults() -> None:
    """Every spelling the docstring lists, the caller's clock and timeout passed on, and
    without arguments what the default policy builds."""
    from seawall.redis_storage import RedisLimitStorage

    clock = ManualClock()
    default = RateLimitPolicy()
    for uri in ("memory://", "async+memory://"):
        assert isinstance(storage_from_uri(uri), BoundedMemoryStorage)
    plain = storage_from_uri()
    assert isinstance(plain, BoundedMemoryStorage)
    assert plain.max_keys == BoundedMemoryStorage().max_keys == default.max_tracked_keys
    for scheme in ("redis", "rediss", "async+redis", "async+rediss"):
        driven = storage_from_uri(f"{scheme}://localhost:6380/0", clock=clock, timeout=0.1)
        assert isinstance(driven, RedisLimitStorage)
        assert driven.clock is clock
        assert driven.client.connection_pool.timeout == 0.1  # type: ignore[attr-defined]
        await driven.client.aclose()
    shared = storage_from_uri("redis://localhost:6380/0")
    assert isinstance(shared, RedisLimitStorage)
    assert shared.clock is None  # the system clock: Redis's own time
    assert shared.client.connection_pool.timeout == default.storage_timeout  # type: ignore[attr-defined]
    await shared.client.aclose()
    with pytest.raises(ValueError, match=r"^max_keys must be at least 1$"):
        BoundedMemoryStorage(max_keys=0)


def test_a_redis_uri_without_the_redis_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    with pytest.raises(ValueError, match=r"needs the redis extra: pip install 'seawall\[redis\]'"):
        storage_from_uri("redis://localhost:6380/0")
    assert isinstance(storage_from_uri("memory://"), BoundedMemoryStorage)


async def test_limits_sliding_window_weighs_the_previous_window_by_what_is_left_of_it(
    clock: ManualClock,
) -> None:
    storage = BoundedMemoryStorage(clock=clock)
    sliding = SlidingWindowCounterRateLimiter(storage)
    item = parse("4/4 seconds")
    assert [await sliding.hit(item, "k") for _ in range(5)] == [True] * 4 + [False]
    clock.advance(6)  # half of the next window: the previous 4 weigh 2
    assert [await sliding.hit(item, "k") for _ in range(3)] == [True, True, False]


async def test_limits_fixed_window_ends_exactly_at_its_start_plus_its_length(
    clock: ManualClock,
) -> None:
    storage = BoundedMemoryStorage(clock=clock)
    fixed = FixedWindowRateLimiter(storage)
    item = parse("2/minute")
    assert await fixed.hit(item, "k", cost=2)
    stats = await fixed.get_window_stats(item, "k")
    assert (stats.remaining, stats.reset_time) == (0, clock.wall() + 60)
    clock.advance(60)
    stats = await fixed.get_window_stats(item, "k")
    assert (stats.remaining, stats.reset_time) == (2, clock.wall())
    assert await fixed.hit(item, "k", cost=2)


async def test_limits_sliding_entries_are_tiered_and_overflowed_by_their_own_rate(
    clock: ManualClock,
) -> None:
    """Through ``limits``' interface, a sliding-window key is tiered by its own limit (two
    of eight used is evictable) and a newcomer to a full table shares the overflow counter
    of its own rate, not another's."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    for key in "ab":
        assert await storage.acquire_sliding_window_entry(key, 8, 60, 2)
    assert await storage.acquire_sliding_window_entry("c", 8, 60)
    assert (storage.evicted, storage.overflowed) == (1, 0)  # a light key made room

    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    for key in "ab":
        assert await storage.acquire_sliding_window_entry(key, 2, 60, 2)  # at the limit
    assert await storage.acquire_sliding_window_entry("c", 2, 60, 2)
    assert await storage.acquire_sliding_window_entry("d", 3, 60, 3)  # its own rate's counter
    assert not await storage.acquire_sliding_window_entry("e", 3, 60)
    assert (storage.evicted, storage.overflowed) == (0, 3)


def test_a_record_taken_without_resolving_first_still_keeps_the_table_bounded(
    clock: ManualClock,
) -> None:
    """Every path resolves a new key first (a full table of limited keys sends it to the
    overflow counter); the eviction of a protected key in ``_new`` is the bound's backstop
    for a caller that does not, and it must hold: one out, one in, counted."""
    storage = BoundedMemoryStorage(clock=clock, max_keys=2)
    assert storage.acquire_moving("light", 4, 60)[0]
    for key in "ab":
        assert storage.acquire_moving(key, 1, 60)[0]  # at the limit: protected
    assert storage.evicted == 1  # "light" made room for "b"
    storage._get_record("c", clock.wall())
    assert (len(storage), storage.evicted, storage.overflowed) == (2, 2, 0)
    assert storage.moving_window("a", 60)[1] == 0  # the least recently used went
    assert storage.moving_window("b", 60)[1] == 1
