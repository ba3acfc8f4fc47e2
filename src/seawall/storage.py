"""Counter storage for rate limits, chosen by URI, with a bounded in-process default.

``storage_from_uri`` returns a :mod:`limits.aio` storage, so any ``limits`` strategy runs on
it and the Redis storages of ``limits`` work unchanged (the distributed mode of a later
issue plugs in here).

Why not ``limits.aio.storage.MemoryStorage`` for ``memory://``? Reading its source (limits
5.8) shows three properties that do not fit a process facing a flood of distinct keys:

* it keeps expired moving-window entries until a sweep, and the sweep is an
  ``asyncio.create_task`` that nobody owns, started again on every hit once the last one
  finished; it walks *every* key and hops to a thread (``asyncio.to_thread``) per key;
* it holds one ``asyncio.Lock`` per key in a ``defaultdict`` and has no cap on keys at all;
* it reads ``time.time()`` directly, so tests cannot drive its windows.

:class:`BoundedMemoryStorage` implements the same ``limits`` storage interfaces (counters,
moving window, sliding window counter) with a hard cap on tracked keys, least-recently
used eviction, amortized reclaim of expired keys on every new key (no background task),
and time read from an injected :class:`~seawall.clock.Clock` (its ``wall()``, the same
epoch time base that ``limits`` strategies and Redis use). Every operation runs without
an ``await`` in between, so on one event loop it is atomic without locks.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections import OrderedDict
from math import floor
from typing import Any

from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage import storage_from_string

from seawall.clock import SYSTEM_CLOCK, Clock

__all__ = ["BoundedMemoryStorage", "storage_from_uri"]

RECLAIM_PER_INSERT = 4
"""Expired keys examined (oldest first) each time a new key arrives: amortized reclaim."""


class _Record:
    """State of one storage key: a counter, its expiry, and moving-window timestamps.

    The timestamps are a plain sorted list, not a deque: a deque allocates a 64-slot block
    (~600 bytes) even for one entry, and a flood of one-request clients is the common case.
    """

    __slots__ = ("count", "events", "expires")

    def __init__(self) -> None:
        self.count = 0
        self.expires = 0.0
        self.events: list[float] | None = None


class BoundedMemoryStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """In-process ``limits`` storage with at most ``max_keys`` keys (see module doc).

    Memory bound: at most ``max_keys`` records; a record holds one counter, or, for the
    moving window, at most ``limit`` timestamps of its key. When the table is full the
    least recently used key is forgotten (``evicted`` counts them): under a flood of
    distinct keys the oldest clients get a fresh window, which errs towards admitting,
    never towards unbounded growth.
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
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self.evicted = 0
        self.reclaimed = 0

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def __len__(self) -> int:
        return len(self._records)

    @property
    def tracked_keys(self) -> int:
        """Keys currently held (expired ones included until reclaimed)."""
        return len(self._records)

    def _new(self, key: str, now: float) -> _Record:
        records = self._records
        for _ in range(RECLAIM_PER_INSERT):  # reclaim from the least recently used end
            if not records:
                break
            oldest_key = next(iter(records))
            if records[oldest_key].expires <= now:
                del records[oldest_key]
                self.reclaimed += 1
            else:
                break
        while len(records) >= self.max_keys:
            records.popitem(last=False)
            self.evicted += 1
        rec = _Record()
        records[key] = rec
        return rec

    def _touch(self, key: str, now: float) -> _Record:
        rec = self._records.get(key)
        if rec is None:
            return self._new(key, now)
        self._records.move_to_end(key)
        return rec

    def sweep(self) -> int:
        """Drop every expired key now (O(keys)); returns how many. Optional: inserts reclaim too."""
        now = self._time()
        dead = [k for k, r in self._records.items() if r.expires <= now]
        for k in dead:
            del self._records[k]
        self.reclaimed += len(dead)
        return len(dead)

    # -- counters (fixed window) ---------------------------------------------------------

    def _incr(self, key: str, expiry: float, amount: int, now: float) -> int:
        rec = self._touch(key, now)
        if rec.expires <= now:
            rec.count = 0
            rec.expires = now + expiry
        rec.count += amount
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
        n = len(self._records)
        self._records.clear()
        return n

    async def clear(self, key: str) -> None:
        self._records.pop(key, None)

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
            rec = self._new(key, now)
            events = rec.events = []
        else:
            self._records.move_to_end(key)
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
        rec.expires = now + expiry
        return True, events[0], len(events), now

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

    @staticmethod
    def _window_keys(key: str, expiry: float, at: float) -> tuple[str, str]:
        # Same naming as limits.storage.base.TimestampedSlidingWindow.
        return f"{key}/{int((at - expiry) / expiry)}", f"{key}/{int(at / expiry)}"

    def _sliding_info(self, key: str, expiry: float, now: float) -> tuple[int, float, int, float]:
        previous_key, current_key = self._window_keys(key, expiry, now)
        previous_count = self._get(previous_key, now)
        current_count = self._get(current_key, now)
        previous_ttl = 0.0
        if previous_count:
            previous_ttl = (1 - (((now - expiry) / expiry) % 1)) * expiry
        current_ttl = (1 - ((now / expiry) % 1)) * expiry + expiry
        return previous_count, previous_ttl, current_count, current_ttl

    async def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        if amount > limit:
            return False
        now = self._time()
        previous_count, previous_ttl, current_count, _ = self._sliding_info(key, expiry, now)
        weighted = previous_count * previous_ttl / expiry + current_count
        if floor(weighted) + amount > limit:
            return False
        _, current_key = self._window_keys(key, expiry, now)
        self._incr(current_key, 2 * expiry, amount, now)  # no await: no race to revert
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self._sliding_info(key, expiry, self._time())

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        for k in self._window_keys(key, expiry, self._time()):
            self._records.pop(k, None)


def storage_from_uri(
    uri: str = "memory://",
    *,
    clock: Clock = SYSTEM_CLOCK,
    max_tracked_keys: int = 100_000,
    timeout: float = 0.25,
) -> Storage:
    """A :mod:`limits.aio` storage for ``uri``.

    ``memory://`` -> :class:`BoundedMemoryStorage`. ``redis://`` and ``rediss://`` are
    served by the *async* Redis storage of ``limits`` (a sync client would block the event
    loop), using redis-py with short socket timeouts and no client-side retries: when
    Redis is down the rate limiter must decide (fail open or closed) in milliseconds,
    not after redis-py's default exponential back-off.
    """
    scheme = uri.split("://", 1)[0]
    if scheme in ("memory", "async+memory"):
        return BoundedMemoryStorage(clock=clock, max_keys=max_tracked_keys)
    if scheme in ("redis", "rediss"):
        uri = f"async+{uri}"
        scheme = f"async+{scheme}"
    if scheme in ("async+redis", "async+rediss"):
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        storage = storage_from_string(
            uri,
            implementation="redispy",
            wrap_exceptions=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),  # type: ignore[arg-type]
        )
        assert isinstance(storage, Storage)
        return storage
    raise ValueError(f"unsupported rate-limit storage URI {uri!r}")
