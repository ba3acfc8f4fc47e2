"""The bounded memory storage against simple reference models, step by step (hypothesis).

* ``decide`` (every strategy, several rates at once, any cost) against a model that keeps
  each strategy's state the plain way: a fixed window's (end, count), a moving window's
  timestamps, a sliding window's count per window index, a token bucket's tokens, all in
  exact fractions. Times are multiples of 1/4 s and windows powers of two, so every
  boundary (a window that ends exactly now, an entry exactly ``window`` old, a bucket
  exactly full) is met exactly, and the storage must decide on it as documented: a window
  ends at its start plus its length, an entry counts while ``now - window <= t``.
* ``limits``' own strategies (fixed, moving, sliding window counter) on this storage against
  the same strategies on ``limits``' ``MemoryStorage``, on the same driven clock: hits,
  tests, window stats and clears answer the same.
"""

from __future__ import annotations

import asyncio
import os
from fractions import Fraction
from math import floor
from typing import Any

import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from limits import RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage as LimitsAsyncMemory
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from seawall.clock import ManualClock
from seawall.storage import BoundedMemoryStorage, gcra

F = Fraction
QUARTER = F(1, 4)


class Reference:
    """Each strategy's promise, written the plain way (unbounded, exact)."""

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.fixed: dict[str, tuple[F, int]] = {}  # key -> (window end, count)
        self.moving: dict[str, list[F]] = {}  # key -> timestamps of admitted units
        self.sliding: dict[tuple[str, int], int] = {}  # (key, window index) -> count
        self.bucket: dict[str, tuple[F, F]] = {}  # key -> (tokens, when they were counted)

    # -- each strategy: (admits?, state if refused), and the hit's state --------------------

    def _fixed(self, key: str, limit: int, w: F, cost: int, now: F) -> tuple[bool, Any]:
        end, count = self.fixed.get(key, (now, 0))
        if end <= now:  # the window ended exactly at its start plus its length
            return cost <= limit, (limit, w)
        return count + cost <= limit, (max(0, limit - count), end - now)

    def _fixed_hit(self, key: str, limit: int, w: F, cost: int, now: F) -> Any:
        end, count = self.fixed.get(key, (now, 0))
        if end <= now:
            end, count = now + w, 0
        self.fixed[key] = (end, count + cost)
        return max(0, limit - count - cost), end - now

    def _live(self, key: str, w: F, now: F) -> list[F]:
        return [t for t in self.moving.get(key, []) if t >= now - w]  # counts while now-w <= t

    def _moving(self, key: str, limit: int, w: F, cost: int, now: F) -> tuple[bool, Any]:
        live = self._live(key, w, now)
        start = live[0] if live else now
        return len(live) + cost <= limit, (max(0, limit - len(live)), start + w - now)

    def _moving_hit(self, key: str, limit: int, w: F, cost: int, now: F) -> Any:
        live = self._live(key, w, now) + [now] * cost
        self.moving[key] = live
        return max(0, limit - len(live)), live[0] + w - now

    def _sliding_state(self, key: str, limit: int, w: F, now: F) -> tuple[F, Any]:
        index = floor(now / w)
        prev = self.sliding.get((key, index - 1), 0)
        cur = self.sliding.get((key, index), 0)
        left_in_window = (index + 1) * w - now
        weighted = prev * left_in_window / w + cur
        remaining = max(0, limit - floor(weighted))
        if not (prev or cur):
            return weighted, (remaining, F(0))
        # capacity comes back when the previous window's weight drops by one more unit,
        # or, with nothing from the previous window, when the current window ends
        reset = left_in_window % (w / prev) if prev else left_in_window
        if prev and reset == 0 and F(float(w / prev)) != w / prev:
            # on the instant a unit leaves, the storage's float ``%`` by an inexact step
            # reads 0 or nearly one step: either is fine, nothing to compare
            return weighted, (remaining, None)
        return weighted, (remaining, reset)

    def _sliding(self, key: str, limit: int, w: F, cost: int, now: F) -> tuple[bool, Any]:
        weighted, state = self._sliding_state(key, limit, w, now)
        if cost > limit:  # can never go: the whole window
            return False, (state[0], w)
        return floor(weighted) + cost <= limit, state

    def _sliding_hit(self, key: str, limit: int, w: F, cost: int, now: F) -> Any:
        index = (key, floor(now / w))
        self.sliding[index] = self.sliding.get(index, 0) + cost
        return self._sliding_state(key, limit, w, now)[1]

    def _tokens(self, key: str, limit: int, w: F, now: F) -> F:
        tokens, at = self.bucket.get(key, (F(limit), now))
        return min(F(limit), tokens + (now - at) * limit / w)

    def _bucket(self, key: str, limit: int, w: F, cost: int, now: F) -> tuple[bool, Any]:
        tokens = self._tokens(key, limit, w, now)
        # refused: what is left, and the wait until ``cost`` tokens are back
        return tokens >= cost, (floor(tokens), (cost - tokens) * w / limit)

    def _bucket_hit(self, key: str, limit: int, w: F, cost: int, now: F) -> Any:
        tokens = self._tokens(key, limit, w, now) - cost
        self.bucket[key] = (tokens, now)
        return floor(tokens), (limit - tokens) * w / limit  # until the bucket is full again

    def decide(
        self, keys: list[str], limits: list[int], windows: list[F], cost: int, now: F
    ) -> tuple[bool, int, list[Any]]:
        name = {
            "fixed-window": "_fixed",
            "moving-window": "_moving",
            "sliding-window-counter": "_sliding",
            "token-bucket": "_bucket",
        }[self.strategy]
        test, hit = getattr(self, name), getattr(self, name + "_hit")
        for i, key in enumerate(keys):
            ok, state = test(key, limits[i], windows[i], cost, now)
            if not ok:
                return False, i, [state]
        return True, -1, [hit(key, limits[i], windows[i], cost, now) for i, key in enumerate(keys)]


def approx(x: float) -> Any:
    """Equal to a microsecond: epoch seconds are near 1.7e9, so no relative tolerance."""
    return pytest.approx(x, rel=0, abs=1e-6)


def _same(got: tuple[bool, int, list[Any]], want: tuple[bool, int, list[Any]]) -> bool:
    if got[:2] != want[:2] or len(got[2]) != len(want[2]):
        return False
    return all(
        g[0] == w[0] and (w[1] is None or g[1] == approx(float(w[1])))
        for g, w in zip(got[2], want[2], strict=True)
    )


class DecideMachine(RuleBasedStateMachine):
    """``decide`` on several rates, step by step, against :class:`Reference`."""

    strategy = "fixed-window"

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.storage = BoundedMemoryStorage(clock=self.clock)
        self.now = F(self.clock.wall())
        self.last: tuple[list[str], int, F] | None = None
        self.model = Reference(self.strategy)

    @initialize(
        rates=st.lists(
            st.tuples(st.sampled_from([1, 2, 3, 4, 5, 8]), st.sampled_from([1, 2, 4, 8])),
            min_size=1,
            max_size=3,
        ),
    )
    def setup(self, rates: list[tuple[int, int]]) -> None:
        if self.strategy == "token-bucket":  # window / limit stays a power of two: exact
            rates = [(limit if limit in (1, 2, 4, 8) else 4, w) for limit, w in rates]
        self.limits = [limit for limit, _ in rates]
        self.windows = [F(w) for _, w in rates]

    def _advance(self, by: F) -> None:
        self.clock.advance(float(by))
        self.now += by

    @rule(windows=st.integers(1, 3))
    def a_long_pause(self, windows: int) -> None:
        self._advance(windows * max(self.windows))

    @precondition(lambda self: self.last is not None)
    @rule()
    def retry_at_the_reset(self) -> None:
        """A client that waits exactly the announced time and asks again: lands on the
        instant a window ends, an entry leaves or the bucket refills."""
        clients, cost, reset = self.last
        if (reset / QUARTER).denominator == 1:
            self._advance(reset)
        self.decide(0, clients, cost)

    @rule(
        quarters=st.integers(0, 6),
        clients=st.lists(st.sampled_from("ab"), min_size=3, max_size=3),
        cost=st.integers(1, 4),
    )
    def decide(self, quarters: int, clients: list[str], cost: int) -> None:
        self._advance(quarters * QUARTER)
        n = len(self.limits)
        keys = [f"rate{i}/{clients[i]}" for i in range(n)]
        got = self.storage.decide(
            self.strategy, keys, self.limits, [float(w) for w in self.windows], cost
        )
        want = self.model.decide(keys, self.limits, self.windows, cost, self.now)
        assert _same(got, want), (got, want)
        # the wait of the rate that refused, or the reset of the rate with the fewest left
        state = min(got[2], key=lambda s: s[0])
        self.last = clients, cost, F(state[1]).limit_denominator(1 << 20)

    @invariant()
    def clock_agrees(self) -> None:
        assert F(self.clock.wall()) == self.now


# Under ``make mutate`` a failure needs no shrinking: it only has to be found, fast.
FIND_ONLY = os.environ.get("SEAWALL_HYPOTHESIS_PROFILE") == "mutate"
PHASES = (Phase.explicit, Phase.reuse, Phase.generate) if FIND_ONLY else tuple(Phase)
MACHINE_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None, phases=PHASES)


def _machine(strategy: str) -> Any:
    machine = type(f"Decide_{strategy}", (DecideMachine,), {"strategy": strategy})
    case = machine.TestCase
    case.settings = MACHINE_SETTINGS
    return case


TestFixedWindowMatchesTheReference = _machine("fixed-window")
TestMovingWindowMatchesTheReference = _machine("moving-window")
TestSlidingWindowMatchesTheReference = _machine("sliding-window-counter")
TestTokenBucketMatchesTheReference = _machine("token-bucket")


# --------------------------------------------------------- limits' strategies, both storages

LIMITERS = {
    "fixed": FixedWindowRateLimiter,
    "moving": MovingWindowRateLimiter,
    "sliding": SlidingWindowCounterRateLimiter,
}
ITEMS = [RateLimitItemPerSecond(2, 1), RateLimitItemPerSecond(3, 2), RateLimitItemPerSecond(5, 4)]

step = st.tuples(
    st.integers(0, 12),  # quarters of a second to advance first
    st.sampled_from(["hit", "test", "stats", "clear"]),
    st.sampled_from(sorted(LIMITERS)),
    st.integers(0, len(ITEMS) - 1),
    st.sampled_from("xy"),
    st.integers(1, 4),  # cost, sometimes above the limit
)


async def _no_background_expiry() -> None:
    return None


@settings(max_examples=40, deadline=None, phases=PHASES)
@given(steps=st.lists(step, min_size=1, max_size=40))
def test_limits_strategies_answer_the_same_on_both_storages(
    steps: list[tuple[int, str, str, int, str, int]],
) -> None:
    import limits.aio.storage.memory as limits_memory
    import limits.aio.strategies as limits_strategies

    clock = ManualClock()

    async def run() -> None:
        ours = BoundedMemoryStorage(clock=clock)
        theirs = LimitsAsyncMemory()
        # limits' storage also drops expired entries from a background task (in a thread),
        # whenever the loop lets it run: at a window's exact end its answer would depend on
        # that timing. Without it, its own lazy checks answer, as ours do.
        theirs._MemoryStorage__schedule_expiry = _no_background_expiry  # type: ignore[attr-defined]
        try:
            for quarters, op, name, item_index, who, cost in steps:
                # a millisecond past the quarter: no query lands exactly one window after a
                # hit, where limits' own storage disagrees with itself (its moving window
                # counts such an entry when acquiring, not in its stats or test)
                clock.advance(quarters / 4 + 0.001)
                item = ITEMS[item_index]
                a, b = LIMITERS[name](ours), LIMITERS[name](theirs)
                # one key per strategy: limits' storage keeps a counter and a moving window of
                # one key apart, ours keeps one record per key (a limiter uses one strategy)
                who = f"{who}-{name}"
                if op == "hit":
                    got = await a.hit(item, who, cost=cost), await b.hit(item, who, cost=cost)
                elif op == "test":
                    got = await a.test(item, who, cost=cost), await b.test(item, who, cost=cost)
                elif op == "stats":
                    x, y = await a.get_window_stats(item, who), await b.get_window_stats(item, who)
                    got = (x.remaining, x.reset_time), (y.remaining, approx(y.reset_time))
                    if name == "moving" and y.remaining == item.amount:
                        # an empty window: limits reads its reset from an entry that only its
                        # background task removes (off here), so only the count is compared
                        got = x.remaining, y.remaining
                else:
                    await a.clear(item, who)
                    await b.clear(item, who)
                    got = (None, None)
                assert got[0] == got[1], (op, name, item, who, cost)
        finally:
            timer = theirs.timer
            if timer is not None:
                timer.cancel()

    saved = limits_memory.time, limits_strategies.time
    fake = type("FakeTime", (), {"time": staticmethod(clock.wall)})
    limits_memory.time = limits_strategies.time = fake  # type: ignore[assignment]
    try:
        asyncio.run(run())
    finally:
        limits_memory.time, limits_strategies.time = saved


@settings(max_examples=60, deadline=None, phases=PHASES)
@given(
    limit=st.sampled_from([1, 2, 4, 8]),
    window=st.sampled_from([1, 2, 4, 8]),
    empty_eighths=st.integers(0, 64),
    cost=st.integers(1, 9),
)
def test_the_gcra_test_answers_like_a_bucket_of_tokens(
    limit: int, window: int, empty_eighths: int, cost: int
) -> None:
    """``gcra`` (the token bucket's test): admitted -> the tokens left after this request
    and the time until the bucket is full again; refused -> the tokens there are and the
    wait until ``cost`` are."""
    now = 1_700_000_000.0
    empty = min(F(empty_eighths, 8), F(window))  # how far from full, in seconds of refill
    tokens = (window - empty) * F(limit, window)
    ok, left, wait = gcra(now + float(empty), now, limit, float(window), cost)
    assert ok is (tokens >= cost)
    if ok:
        assert (left, wait) == (floor(tokens - cost), approx(empty + cost * F(window, limit)))
    else:
        assert (left, wait) == (floor(tokens), approx((cost - tokens) * F(window, limit)))
