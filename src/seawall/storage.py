"""Counter storage for rate limits, chosen by URI, with a bounded in-process default.

``storage_from_uri`` returns :class:`BoundedMemoryStorage` for ``memory://`` (a
:mod:`limits.aio` storage, so any ``limits`` strategy runs on it too) and
:class:`~seawall.redis_storage.RedisLimitStorage` for Redis. Both decide every rate of a
request in one atomic step (``decide``), for every strategy including the token bucket
(GCRA) that ``limits`` lacks.

Why not ``limits.aio.storage.MemoryStorage`` for ``memory://``? Reading its source (limits
5.8) shows three properties that do not fit a process facing a flood of distinct keys:

* it keeps expired moving-window entries until a sweep, and the sweep is an
  ``asyncio.create_task`` that nobody owns, started again on every hit once the last one
  finished; it walks *every* key and hops to a thread (``asyncio.to_thread``) per key;
* it holds one ``asyncio.Lock`` per key in a ``defaultdict`` and has no cap on keys at all;
* it reads ``time.time()`` directly, so tests cannot drive its windows.

:class:`BoundedMemoryStorage` implements the same ``limits`` storage interfaces (counters,
moving window, sliding window counter) with a hard cap on tracked keys, eviction of the
cheapest key to forget (never a key at or near its limit before its window ends),
amortized reclaim of expired keys on every new key (no background task),
and time read from an injected :class:`~seawall.clock.Clock` (its ``wall()``, the same
epoch time base that ``limits`` strategies and Redis use). Every operation runs without
an ``await`` in between, so on one event loop it is atomic without locks.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Sequence
from math import floor, inf, nextafter
from typing import Any

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.redis_storage import RedisLimitStorage

__all__ = ["STRATEGY_NAMES", "BoundedMemoryStorage", "RateState", "storage_from_uri"]

RECLAIM_PER_INSERT = 4
"""Expired keys examined (oldest first, per tier) each time a new key arrives: amortized reclaim."""

STRATEGY_NAMES: tuple[str, ...] = (
    "fixed-window",
    "moving-window",
    "sliding-window-counter",
    "token-bucket",
)
"""Every strategy a seawall storage decides by itself (``decide``), token bucket included."""

# Eviction tiers by how much of its limit a key has used: forgetting a key hands its
# client back what it used, so the lightest are forgotten first and the heaviest never
# before their window ends.
LIGHT, MIDDLE, PROTECTED, OVERFLOW = 0, 1, 2, 3
_OVERFLOW_PREFIX = "\x00overflow/"  # no client key starts with a NUL byte
_SLIDING = "\x00sliding"  # appended to a key: its sliding window's one record (both windows)


def _tier(used: float, limit: int) -> int:
    if used * 2 >= limit:
        return PROTECTED
    return MIDDLE if used * 4 >= limit else LIGHT


class _Record:
    """State of one storage key: a counter, its expiry, and moving-window timestamps.

    A sliding window keeps both of its windows in one record: ``start`` is the index of
    the window ``count`` belongs to and ``previous`` the count of the window before it, so
    a client entering a new window rolls its record forward instead of needing a second
    one (which, on a full table, could only be had by forgetting someone's count).

    The timestamps are a plain sorted list, not a deque: a deque allocates a 64-slot block
    (~600 bytes) even for one entry, and a flood of one-request clients is the common case.
    ``expires`` is when the record holds nothing any more (for the token bucket it is the
    theoretical arrival time itself); ``tier`` is the eviction tier.
    """

    __slots__ = ("count", "events", "expires", "previous", "start", "tier")

    def __init__(self) -> None:
        self.count = 0
        self.previous = 0
        self.expires = 0.0
        self.start = -inf  # no window: a sliding record rolls into its first one
        self.events: list[float] | None = None
        self.tier = LIGHT


RateState = tuple[int, float]
"""(remaining, seconds until the rate frees capacity) of one rate after a decision."""


class BoundedMemoryStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """In-process ``limits`` storage with at most ``max_keys`` keys (see module doc).

    Memory bound: at most ``max_keys`` records; a record holds one counter, or, for the
    moving window, at most ``limit`` timestamps of its key. When the table is full the
    cheapest key to forget goes first: expired keys, then the least recently used key that
    used under a quarter of its limit, then under half. A key that used half its limit or
    more is never forgotten before its window ends (forgetting it would hand its client a
    fresh quota); when only such keys are left, a new key shares one *overflow* counter
    per rate with every other newcomer (``overflowed`` counts them), which errs towards
    limiting, never towards resetting a limited client or growing without bound.
    """

    STORAGE_SCHEME = None  # not registered in limits' global scheme table

    def __init__(
        self,
        uri: str | None = None,
        wrap_exceptions: bool = False,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_keys: int = 100_000,
        **options: Any,
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self.clock = clock
        self._time = clock.wall
        self.max_keys = max_keys
        self._records: dict[str, _Record] = {}
        # One LRU order per eviction tier (keys only; the records live in _records), and
        # the overflow counters (one per rate), which are neither counted nor evicted.
        self._tiers: tuple[OrderedDict[str, None], ...] = (
            OrderedDict(),
            OrderedDict(),
            OrderedDict(),
            OrderedDict(),
        )
        self.evicted = 0
        self.reclaimed = 0
        self.overflowed = 0

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def __len__(self) -> int:
        return len(self._records) - len(self._tiers[OVERFLOW])

    @property
    def tracked_keys(self) -> int:
        """Keys currently held (expired ones included until reclaimed; overflow not counted)."""
        return len(self)

    def _drop(self, key: str) -> None:
        rec = self._records.pop(key)
        del self._tiers[rec.tier][key]

    def _full(self, now: float) -> bool:
        """True when a new key cannot be tracked: the table holds only protected live keys."""
        if len(self) < self.max_keys:
            return False
        light, middle, protected, _ = self._tiers
        if light or middle or not protected:
            return False
        return self._records[next(iter(protected))].expires > now

    def _resolve(self, key: str, limit: int, expiry: float, now: float) -> str:
        """``key``, or when it is new and the table is full, its rate's overflow key."""
        if key in self._records or not self._full(now) or key.startswith(_OVERFLOW_PREFIX):
            return key  # (an overflow key, resolved once already by decide: count it once)
        self.overflowed += 1
        return f"{_OVERFLOW_PREFIX}{limit}/{expiry:g}"

    def _new(self, key: str, now: float) -> _Record:
        """A record for a new key: reclaim expired keys, evict the cheapest if full."""
        records = self._records
        tiers = self._tiers
        if key.startswith(_OVERFLOW_PREFIX):
            rec = records[key] = _Record()
            rec.tier = OVERFLOW
            tiers[OVERFLOW][key] = None
            return rec
        for tier in tiers:  # amortized reclaim from each tier's least recently used end
            for _ in range(RECLAIM_PER_INSERT):
                if not tier:
                    break
                oldest = next(iter(tier))
                if records[oldest].expires <= now:
                    self._drop(oldest)
                    self.reclaimed += 1
                else:
                    break
        light, middle, protected, _ = tiers
        while len(self) >= self.max_keys and (light or middle):
            self._drop(next(iter(light or middle)))
            self.evicted += 1
        if len(self) >= self.max_keys and protected:
            # Only when a caller did not _resolve() first (limits' own storage interface).
            self._drop(next(iter(protected)))
            self.evicted += 1
        rec = _Record()
        records[key] = rec
        tiers[LIGHT][key] = None
        return rec

    def _get_record(self, key: str, now: float) -> _Record:
        rec = self._records.get(key)
        if rec is None:
            return self._new(key, now)
        self._tiers[rec.tier].move_to_end(key)
        return rec

    def _retier(self, key: str, rec: _Record, used: float, limit: int) -> None:
        if rec.tier == OVERFLOW:
            return
        tier = _tier(used, limit) if limit else (PROTECTED if used > 1 else LIGHT)
        if tier != rec.tier:
            del self._tiers[rec.tier][key]
            self._tiers[tier][key] = None
            rec.tier = tier

    def _touch(self, key: str, now: float) -> _Record:
        return self._get_record(self._resolve(key, 0, 0.0, now), now)

    def sweep(self) -> int:
        """Drop every expired key now (O(keys)); returns how many. Optional: inserts reclaim too."""
        now = self._time()
        dead = [k for k, r in self._records.items() if r.expires <= now]
        for k in dead:
            self._drop(k)
        self.reclaimed += len(dead)
        return len(dead)

    # -- counters (fixed window) ---------------------------------------------------------

    def _incr(self, key: str, expiry: float, amount: int, now: float) -> int:
        rec = self._touch(key, now)
        if rec.expires <= now:
            rec.count = 0
            rec.expires = now + expiry
        rec.count += amount
        self._retier(key, rec, rec.count, 0)
        return rec.count

    def _get(self, key: str, now: float) -> int:
        rec = self._records.get(key)
        if rec is None or rec.expires <= now:
            return 0
        return rec.count

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self._incr(key, expiry, amount, self._time())

    async def get(self, key: str) -> int:
        return self._get(key, self._time())

    async def get_expiry(self, key: str) -> float:
        now = self._time()
        rec = self._records.get(key)
        if rec is None or rec.expires <= now:
            return now
        return rec.expires

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        n = len(self)
        self._records.clear()
        for tier in self._tiers:
            tier.clear()
        return n

    async def clear(self, key: str) -> None:
        """Forget ``key`` whatever its strategy (a sliding window's record included)."""
        for k in (key, key + _SLIDING):
            if k in self._records:
                self._drop(k)

    # -- moving window -------------------------------------------------------------------

    def acquire_moving(
        self, key: str, limit: int, expiry: float, amount: int = 1
    ) -> tuple[bool, float, int, float]:
        """Hit a moving window and read its state in one step: (admitted, start, count, now).

        The same semantics as ``acquire_entry`` followed by ``get_moving_window`` (an
        entry counts while ``now - expiry <= t``), without two awaits: the rate limiter's
        fast path. ``now`` is the storage's clock reading, returned to save another.
        """
        now = self._time()
        rec = self._records.get(key)
        if rec is None:
            if amount > limit:
                return False, now, 0, now
            key = self._resolve(key, limit, expiry, now)
            rec = self._get_record(key, now)
            if rec.events is None:
                rec.events = []
            events = rec.events
        else:
            self._tiers[rec.tier].move_to_end(key)
            if rec.events is None:
                rec.events = []
            events = rec.events
        cutoff = now - expiry
        if events and events[0] < cutoff:  # drop what left the window, in one slice
            del events[: bisect_left(events, cutoff)]
        if len(events) + amount > limit:
            return False, (events[0] if events else now), len(events), now
        if amount == 1:
            events.append(now)
        else:
            events.extend(itertools.repeat(now, amount))
        # The entry still counts at exactly now + expiry: the record expires just after.
        rec.expires = nextafter(now + expiry, inf)
        n = len(events)
        if n * 4 >= limit or rec.tier != LIGHT:  # up as it fills, down as entries leave
            self._retier(key, rec, n, limit)
        return True, events[0], n, now

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return self.acquire_moving(key, limit, expiry, amount)[0]

    def moving_window(self, key: str, expiry: float) -> tuple[float, int]:
        """(start, count) of a moving window without awaiting: the fast path's test."""
        now = self._time()
        rec = self._records.get(key)
        if rec is None or not rec.events:
            return now, 0
        events = rec.events
        cutoff = now - expiry
        if events[0] < cutoff:
            del events[: bisect_left(events, cutoff)]
        if not events:
            return now, 0
        return events[0], len(events)

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.moving_window(key, expiry)

    # -- sliding window counter ----------------------------------------------------------

    def _sliding_info(self, key: str, expiry: float, now: float) -> tuple[int, float, int, float]:
        """(previous count, its weight's time left, current count, its time left): the
        ``limits`` interface's view, on windows aligned to the epoch as ``limits`` has them."""
        previous_count = current_count = 0
        rec = self._records.get(key + _SLIDING)
        if rec is not None:
            index = floor(now / expiry)
            if rec.start == index:
                previous_count, current_count = rec.previous, rec.count
            elif rec.start == index - 1:
                previous_count = rec.count
        previous_ttl = 0.0
        if previous_count:
            previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous_count, previous_ttl, current_count, current_ttl

    def _sliding_add(self, key: str, limit: int, expiry: float, amount: int, now: float) -> None:
        """Count ``amount`` in the current window, rolling the record into it if needed."""
        record_key = key + _SLIDING
        rec = self._get_record(record_key, now)
        index = floor(now / expiry)
        if rec.start != index:
            rec.previous = rec.count if rec.start == index - 1 else 0
            rec.count = 0
            rec.start = index
        rec.count += amount
        rec.expires = (index + 2) * expiry  # when this window stops weighing on the next
        # tiered by both windows' counts: above the weighted count, so it errs towards keeping
        self._retier(record_key, rec, rec.previous + rec.count, limit)

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        if amount > limit:
            return False
        now = self._time()
        key = self._resolve_sliding(key, limit, expiry, now)
        previous_count, previous_ttl, current_count, _ = self._sliding_info(key, expiry, now)
        weighted = previous_count * previous_ttl / expiry + current_count
        if floor(weighted) + amount > limit:
            return False
        self._sliding_add(key, limit, expiry, amount, now)  # no await: no race to revert
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self._sliding_info(key, expiry, self._time())

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        if key + _SLIDING in self._records:
            self._drop(key + _SLIDING)

    # -- every strategy, several rates, one synchronous step ------------------------------

    def decide(
        self,
        strategy: str,
        keys: Sequence[str],
        limits: Sequence[int],
        expiries: Sequence[float],
        cost: int = 1,
    ) -> tuple[bool, int, list[RateState]]:
        """Test every rate, and hit them all only when all admit: no await, so atomic.

        Returns ``(admitted, index, states)``: refused -> ``index`` is the first rate that
        refused and ``states`` holds only its state (remaining, retry after); admitted ->
        ``index`` is -1 and ``states`` holds every rate's (remaining, reset after).
        """
        now = self._time()
        resolve = self._resolve_sliding if strategy == "sliding-window-counter" else self._resolve
        keys = [resolve(key, limits[i], expiries[i], now) for i, key in enumerate(keys)]
        test = _TESTS[strategy]
        for i, key in enumerate(keys):
            ok, state = test(self, key, limits[i], expiries[i], cost, now)
            if not ok:
                return False, i, [state]
        hit = _HITS[strategy]
        return (
            True,
            -1,
            [hit(self, key, limits[i], expiries[i], cost, now) for i, key in enumerate(keys)],
        )

    def _resolve_sliding(self, key: str, limit: int, expiry: float, now: float) -> str:
        if key + _SLIDING in self._records or key.startswith(_OVERFLOW_PREFIX):
            return key  # (an overflow key, resolved once already by decide: count it once)
        if not self._full(now):
            return key
        self.overflowed += 1
        return f"{_OVERFLOW_PREFIX}{limit}/{expiry:g}"

    # fixed window: a counter that starts with the first hit and lasts ``expiry``
    def _fixed_test(
        self, key: str, limit: int, expiry: float, cost: int, now: float
    ) -> tuple[bool, RateState]:
        rec = self._records.get(key)
        if rec is None or rec.expires <= now:
            return cost <= limit, (limit, expiry)
        if rec.count + cost > limit:
            return False, (max(0, limit - rec.count), rec.expires - now)
        return True, (limit - rec.count, rec.expires - now)

    def _fixed_hit(self, key: str, limit: int, expiry: float, cost: int, now: float) -> RateState:
        rec = self._get_record(key, now)
        if rec.expires <= now:
            rec.count = 0
            rec.expires = now + expiry
        rec.count += cost
        self._retier(key, rec, rec.count, limit)
        return max(0, limit - rec.count), rec.expires - now

    # moving window: the timestamps of the last ``expiry`` seconds
    def _moving_test(
        self, key: str, limit: int, expiry: float, cost: int, now: float
    ) -> tuple[bool, RateState]:
        start, count = self.moving_window(key, expiry)
        reset = max(0.0, start + expiry - now)
        return count + cost <= limit, (max(0, limit - count), reset)

    def _moving_hit(self, key: str, limit: int, expiry: float, cost: int, now: float) -> RateState:
        _ok, start, count, now = self.acquire_moving(key, limit, expiry, cost)
        return max(0, limit - count), max(0.0, start + expiry - now)

    # sliding window counter: this window's count plus the previous one's, weighted
    def _sliding_state(
        self, key: str, limit: int, expiry: float, now: float
    ) -> tuple[float, RateState]:
        prev_count, prev_ttl, cur_count, cur_ttl = self._sliding_info(key, expiry, now)
        weighted = prev_count * prev_ttl / expiry + cur_count
        remaining = max(0, limit - floor(weighted))
        if not (prev_count or cur_count):
            return weighted, (remaining, 0.0)
        # The previous window's weight drops by one every expiry / prev_count seconds; the
        # current count stays until its window ends (cur_ttl is that plus one window).
        prev_reset = prev_ttl % (expiry / prev_count) if prev_count else inf
        cur_reset = cur_ttl - expiry if cur_count else inf
        return weighted, (remaining, max(0.0, min(prev_reset, cur_reset)))

    def _sliding_test(
        self, key: str, limit: int, expiry: float, cost: int, now: float
    ) -> tuple[bool, RateState]:
        weighted, state = self._sliding_state(key, limit, expiry, now)
        if cost > limit:  # never admitted: say the whole window, as fixed and moving do
            return False, (state[0], expiry)
        return floor(weighted) + cost <= limit, state

    def _sliding_hit(self, key: str, limit: int, expiry: float, cost: int, now: float) -> RateState:
        self._sliding_add(key, limit, expiry, cost, now)
        return self._sliding_state(key, limit, expiry, now)[1]

    # token bucket (GCRA): ``limit`` tokens, refilled at ``limit / expiry`` per second
    def _bucket_test(
        self, key: str, limit: int, expiry: float, cost: int, now: float
    ) -> tuple[bool, RateState]:
        rec = self._records.get(key)
        tat = rec.expires if rec is not None and rec.expires > now else now
        ok, remaining, wait = gcra(tat, now, limit, expiry, cost)
        return ok, (remaining, wait)

    def _bucket_hit(self, key: str, limit: int, expiry: float, cost: int, now: float) -> RateState:
        rec = self._get_record(key, now)
        tat = rec.expires if rec.expires > now else now
        new_tat = tat + cost * expiry / limit
        rec.expires = new_tat
        used = (new_tat - now) * limit / expiry
        self._retier(key, rec, used, limit)
        return max(0, floor(limit - used + 1e-6)), new_tat - now


def gcra(tat: float, now: float, limit: int, expiry: float, cost: int) -> tuple[bool, int, float]:
    """The GCRA test: (admitted, tokens left, seconds to wait or until the bucket is full).

    ``tat`` is the theoretical arrival time (never before ``now``): the bucket is full when
    ``tat == now`` and holds ``(expiry - (tat - now)) * limit / expiry`` tokens otherwise.
    Refused: the wait is until ``cost`` tokens are back. Admitted: until it is full again.
    """
    # Epoch seconds near 1.7e9 carry ~2e-7 s of rounding: compare with a microsecond slack.
    interval = expiry / limit
    new_tat = tat + cost * interval
    if new_tat - now > expiry + 1e-6:
        left = max(0, floor((expiry - (tat - now)) / interval + 1e-6))
        return False, left, new_tat - expiry - now
    return True, max(0, floor((expiry - (new_tat - now)) / interval + 1e-6)), new_tat - now


_Test = Callable[[BoundedMemoryStorage, str, int, float, int, float], tuple[bool, RateState]]
_Hit = Callable[[BoundedMemoryStorage, str, int, float, int, float], RateState]
_TESTS: dict[str, _Test] = {
    "fixed-window": BoundedMemoryStorage._fixed_test,
    "moving-window": BoundedMemoryStorage._moving_test,
    "sliding-window-counter": BoundedMemoryStorage._sliding_test,
    "token-bucket": BoundedMemoryStorage._bucket_test,
}
_HITS: dict[str, _Hit] = {
    "fixed-window": BoundedMemoryStorage._fixed_hit,
    "moving-window": BoundedMemoryStorage._moving_hit,
    "sliding-window-counter": BoundedMemoryStorage._sliding_hit,
    "token-bucket": BoundedMemoryStorage._bucket_hit,
}


def storage_from_uri(
    uri: str = "memory://",
    *,
    clock: Clock = SYSTEM_CLOCK,
    max_tracked_keys: int = 100_000,
    timeout: float = 0.25,
) -> Storage | RedisLimitStorage:
    """The rate-limit storage for ``uri``.

    ``memory://`` -> :class:`BoundedMemoryStorage`. ``redis://``, ``rediss://`` (and their
    ``async+`` spellings) -> :class:`~seawall.redis_storage.RedisLimitStorage`: one Lua
    script per decision, a blocking pool of connections with short timeouts and no
    client-side retries, because when Redis is down the rate limiter must decide (fail
    open or closed) in milliseconds, not after redis-py's default back-off. Time on Redis
    is Redis's own clock unless ``clock`` is a driven one (tests).
    """
    scheme = uri.split("://", 1)[0]
    if scheme in ("memory", "async+memory"):
        return BoundedMemoryStorage(clock=clock, max_keys=max_tracked_keys)
    if scheme in ("redis", "rediss", "async+redis", "async+rediss"):
        try:
            import redis  # noqa: F401
        except ImportError:  # pragma: no cover - depends on the installed extras
            raise ValueError(
                f"rate-limit storage {uri!r} needs the redis extra: pip install 'seawall[redis]'"
            ) from None
        return RedisLimitStorage(
            uri, timeout=timeout, clock=None if clock is SYSTEM_CLOCK else clock
        )
    raise ValueError(f"unsupported rate-limit storage URI {uri!r}")
