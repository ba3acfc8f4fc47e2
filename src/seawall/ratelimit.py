"""The rate-limiting mechanism, without HTTP: keys and a cost in, a decision out.

:class:`RateLimiter` applies every rule of a :class:`~seawall.policy.ratelimit.RateLimitPolicy`
(each rule may hold several rates) and turns the outcome into a :class:`Decision` plus
typed events.

Several limits at once are decided *atomically*: every rate is tested, and all are hit
only when all admit, so a request refused by one rate consumes none of the others. With
``memory://`` the decision runs without an ``await`` (atomic on the event loop, every
strategy); with Redis it is one Lua script, one round trip
(:class:`~seawall.redis_storage.RedisLimitStorage`). A ``limits`` storage injected by the
caller goes through the ``limits`` strategies (test, then hit; not atomic across rates,
erring towards limiting).

Storage failures never escape. A breaker guards the shared store: after repeated failures
or timeouts it stops asking for a while (``policy.storage_breaker``) and every request is
decided at once by the policy: *fail open* decides with in-process limits (the same rates,
counted per process), *fail closed* refuses with ``storage_failed=True`` (the middleware
answers 503 + Retry-After). A single probe finds out when the store is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from math import floor, inf
from typing import ClassVar, NamedTuple

from limits import RateLimitItem
from limits.aio.storage import SlidingWindowCounterSupport, Storage
from limits.aio.strategies import STRATEGIES
from limits.aio.strategies import RateLimiter as LimitsRateLimiter
from mypy_extensions import mypyc_attr

from seawall.breaker import CircuitBreaker, CircuitOpenError, Outcome
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.redis_storage import RedisLimitStorage
from seawall.storage import BoundedMemoryStorage, RateState, storage_from_uri

__all__ = [
    "Decision",
    "RateLimitAdmitted",
    "RateLimitStorageFailed",
    "RateLimited",
    "RateLimiter",
]

log = logging.getLogger("seawall.ratelimit")

NAMESPACE = "seawall"

QUEUE_TIMEOUT_FACTOR = 4
"""A burst waits at most this many storage timeouts for a free Redis connection."""


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitAdmitted(Event):
    """A request fit every rate (built only when somebody listens)."""

    name: ClassVar[str] = "ratelimit.admitted"
    rule: str
    key: str
    cost: int
    remaining: int


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimited(Event):
    """A request was refused by ``rule`` (the first rate it did not fit)."""

    name: ClassVar[str] = "ratelimit.limited"
    rule: str
    key: str
    cost: int
    limit: int
    window: int
    retry_after: float


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitStorageFailed(Event):
    """The counter storage failed; ``fail_open`` says whether the request was admitted."""

    name: ClassVar[str] = "ratelimit.storage_failed"
    error: str
    fail_open: bool


class Decision(NamedTuple):
    """The outcome for one request (a tuple: cheap to build on the hot path).

    ``rule`` names the rate that decided: the one that refused, or when admitted the one
    with the fewest requests left. ``reset_after`` is seconds until that rate frees
    capacity; ``retry_after`` is the same for a refused request and 0 when admitted.
    ``known`` is False when the storage failed and nothing is known about the window.
    """

    admitted: bool
    rule: str
    limit: int
    window: int
    remaining: int
    reset_after: float
    retry_after: float
    known: bool = True
    storage_failed: bool = False


class _Entry:
    """One rate of one rule, with precomputed storage-key parts and header label."""

    __slots__ = (
        "amount",
        "expiry",
        "index",
        "item",
        "label",
        "prefix",
        "redis_prefix",
        "rule_name",
        "suffix",
    )

    def __init__(
        self, index: int, label: str, rule_name: str, item: RateLimitItem, strategy: str
    ) -> None:
        self.index = index  # which key (rule) it uses
        self.label = label
        self.rule_name = rule_name
        self.item = type(item)(item.amount, item.multiples, namespace=NAMESPACE)
        self.amount = int(item.amount)
        self.expiry = int(item.get_expiry())
        # In memory: like RateLimitItem.key_for(rule_name, key), plus the strategy, whose
        # data would not fit another strategy's; without key_for's per-call work.
        self.prefix = f"{NAMESPACE}/{strategy}/{rule_name}/"
        self.suffix = f"/{item.amount}/{item.multiples}/{item.GRANULARITY.name}"
        # On Redis: the client key is the hash tag (RedisLimitStorage.key).
        self.redis_prefix = RedisLimitStorage.key(
            strategy, rule_name, self.amount, self.expiry, ""
        )[:-1]


def _entries(rules: Sequence[LimitRule], strategy: str) -> tuple[_Entry, ...]:
    out: list[_Entry] = []
    for index, rule in enumerate(rules):
        items = rule.items
        for item in items:
            label = rule.name if len(items) == 1 else f"{rule.name}-{item.get_expiry()}s"
            out.append(_Entry(index, label, rule.name, item, strategy))
    return tuple(out)


_new_tuple = tuple.__new__


def _no_fast_path(
    key: str, limit: int, expiry: float, amount: int
) -> tuple[bool, float, int, float]:
    raise RuntimeError("hit_now needs the bounded memory storage and the moving window")


def _decide(entry: _Entry, ok: bool, start: float, count: int, now: float) -> Decision:
    reset_after = start + entry.expiry - now
    if reset_after < 0.0:
        reset_after = 0.0
    remaining = entry.amount - count
    if remaining < 0:
        remaining = 0
    # tuple.__new__ skips NamedTuple's keyword/default handling: a third of the cost.
    return _new_tuple(
        Decision,
        (
            ok,
            entry.label,
            entry.amount,
            entry.expiry,
            remaining,
            reset_after,
            0.0 if ok else reset_after,
            True,
            False,
        ),
    )


class RateLimiter:
    """Apply a policy's rates to keys. One key per rule, in ``policy.all_rules()`` order.

    ``storage``: a :class:`~seawall.storage.BoundedMemoryStorage`, a
    :class:`~seawall.redis_storage.RedisLimitStorage`, or any ``limits.aio`` storage; by
    default built from ``policy.storage``. Call :meth:`aclose` (the middleware does it on
    lifespan shutdown) to close the store's connections.
    """

    def __init__(
        self,
        policy: RateLimitPolicy | None = None,
        *,
        storage: Storage | RedisLimitStorage | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.policy = policy = policy if policy is not None else RateLimitPolicy()
        self.clock = clock
        self.events = events if events is not None else DEFAULT_BUS
        if storage is None:
            storage = storage_from_uri(
                policy.storage,
                clock=clock,
                max_tracked_keys=policy.max_tracked_keys,
                timeout=policy.storage_timeout,
            )
        self.storage = storage
        self._strategy_name = strategy = policy.strategy
        self.rules = policy.all_rules()
        self.entries = entries = _entries(self.rules, strategy)
        self._amounts = [e.amount for e in entries]
        self._windows = [float(e.expiry) for e in entries]
        self._memory = isinstance(storage, BoundedMemoryStorage)
        self._redis = storage if isinstance(storage, RedisLimitStorage) else None
        self.strategy: LimitsRateLimiter | None = None
        if not isinstance(storage, BoundedMemoryStorage | RedisLimitStorage):
            if strategy not in STRATEGIES:
                raise ValueError(
                    f"strategy {strategy!r} needs seawall's memory:// or redis:// storage, "
                    f"not {type(storage).__name__}"
                )
            self.strategy = STRATEGIES[strategy](storage)  # type: ignore[abstract]
        self._fast = self._memory
        self._moving_fast = self._memory and strategy == "moving-window"
        self._acquire = (
            storage.acquire_moving if isinstance(storage, BoundedMemoryStorage) else _no_fast_path
        )
        self._sliding = strategy == "sliding-window-counter"
        self._single = entries[0] if len(entries) == 1 else None
        self._fail_open = policy.on_storage_error == "open"
        self._timeout = policy.storage_timeout
        self._queue_timeout = QUEUE_TIMEOUT_FACTOR * policy.storage_timeout
        self._last_log = -float("inf")
        self._suppressed = 0
        self.storage_failures = 0
        self.storage_skipped = 0
        # The shared store's own breaker, and the in-process limits used while it is out.
        self.storage_breaker: CircuitBreaker | None = None
        self.local: BoundedMemoryStorage | None = None
        if not self._memory:
            self.storage_breaker = CircuitBreaker(
                f"ratelimit-storage:{policy.name}",
                policy.storage_breaker,
                clock=clock,
                events=self.events,
            )
            self.local = BoundedMemoryStorage(clock=clock, max_keys=policy.max_tracked_keys)

    # -- the decision --------------------------------------------------------------------

    @property
    def decides_without_io(self) -> bool:
        """True when :meth:`hit_now` can decide (the bounded memory storage, any strategy)."""
        return self._fast

    async def hit(self, keys: Sequence[str], cost: int = 1) -> Decision:
        """Count one request of ``cost`` against every rate; never raises on storage errors."""
        if self._fast:
            return self.hit_now(keys, cost)
        redis = self._redis
        if redis is None:
            return await self._guarded(keys, cost)
        # A burst queues for one of the store's connections, for a bounded time. The wait
        # says nothing about Redis (this process may be busy), so it is no breaker outcome;
        # the breaker is asked after it, so a queue that waited out an outage fails fast.
        try:
            async with asyncio.timeout(self._queue_timeout):
                await redis.slots.acquire()
        except TimeoutError:
            busy = TimeoutError(f"no free Redis connection within {self._queue_timeout:g} s")
            return self._degraded(keys, cost, busy)
        try:
            return await self._guarded(keys, cost)
        finally:
            redis.slots.release()

    async def _guarded(self, keys: Sequence[str], cost: int) -> Decision:
        """One decision on the shared store, behind its breaker, within ``storage_timeout``."""
        breaker = self.storage_breaker
        assert breaker is not None
        try:
            permit = breaker.admit()
        except CircuitOpenError:
            self.storage_skipped += 1
            return self._degraded(keys, cost, None)
        clock = self.clock
        started = clock.now()
        try:
            async with asyncio.timeout(self._timeout):
                if self._redis is not None:
                    decision = await self._hit_redis(self._redis, keys, cost)
                else:
                    decision = await self._hit_strategy(keys, cost)
        except asyncio.CancelledError:
            breaker.record(permit, Outcome.NEUTRAL, clock.now() - started)
            raise
        except TimeoutError:
            breaker.record(permit, Outcome.FAILURE, clock.now() - started)
            late = TimeoutError(f"no answer within storage_timeout ({self._timeout:g} s)")
            return self._degraded(keys, cost, late)
        except Exception as exc:
            breaker.record(permit, Outcome.FAILURE, clock.now() - started)
            return self._degraded(keys, cost, exc)
        breaker.record(permit, Outcome.SUCCESS, clock.now() - started)
        bus = self.events
        if bus.active:
            self._emit(bus, decision, keys, cost)
        return decision

    def hit_now(self, keys: Sequence[str], cost: int = 1) -> Decision:
        """:meth:`hit` without an await, for :attr:`decides_without_io` limiters (hot path)."""
        if not self._fast:
            raise RuntimeError("hit_now needs seawall's bounded memory storage (memory://)")
        try:
            single = self._single
            if single is not None and self._moving_fast:  # one combined hit-and-read
                ok, start, count, now = self._acquire(
                    single.prefix + keys[single.index] + single.suffix,
                    single.amount,
                    single.expiry,
                    cost,
                )
                decision = _decide(single, ok, start, count, now)
            else:
                storage = self.storage
                assert isinstance(storage, BoundedMemoryStorage)
                decision = self._decide_in(storage, keys, cost)
        except Exception as exc:
            return self._failed(exc)
        bus = self.events
        if bus.active:
            self._emit(bus, decision, keys, cost)
        return decision

    def _decide_in(
        self, storage: BoundedMemoryStorage, keys: Sequence[str], cost: int, failed: bool = False
    ) -> Decision:
        """Every rate at once on an in-process storage (no await in between: atomic)."""
        entries = self.entries
        skeys = [e.prefix + keys[e.index] + e.suffix for e in entries]
        ok, index, states = storage.decide(
            self._strategy_name, skeys, self._amounts, self._windows, cost
        )
        return self._decision(ok, index, states, failed)

    async def _hit_redis(
        self, redis: RedisLimitStorage, keys: Sequence[str], cost: int
    ) -> Decision:
        """Every rate at once in one Lua script: one round trip, atomic on Redis."""
        rkeys = [e.redis_prefix + keys[e.index] + "}" for e in self.entries]
        ok, index, states = await redis.decide(
            self._strategy_name, rkeys, self._amounts, self._windows, cost
        )
        return self._decision(ok, index, states)

    def _decision(
        self, ok: bool, index: int, states: list[RateState], failed: bool = False
    ) -> Decision:
        entries = self.entries
        if not ok:
            entry = entries[index]
            remaining, wait = states[0]
            return Decision(
                False, entry.label, entry.amount, entry.expiry, remaining, wait, wait, True, failed
            )
        best = 0
        for i in range(1, len(states)):
            if states[i][0] < states[best][0]:
                best = i
        entry = entries[best]
        remaining, reset_after = states[best]
        return Decision(
            True, entry.label, entry.amount, entry.expiry, remaining, reset_after, 0.0, True, failed
        )

    async def _hit_strategy(self, keys: Sequence[str], cost: int) -> Decision:
        """A ``limits`` storage supplied by the caller: test every rate, then hit every rate."""
        strategy = self.strategy
        assert strategy is not None
        entries = self.entries
        ids = [(e.rule_name, keys[e.index]) for e in entries]
        if len(entries) > 1:
            for entry, (rule_name, key) in zip(entries, ids, strict=True):
                if not await strategy.test(entry.item, rule_name, key, cost=cost):
                    return await self._stats(entry, rule_name, key, False, cost)
        best: Decision | None = None
        for entry, (rule_name, key) in zip(entries, ids, strict=True):
            ok = await strategy.hit(entry.item, rule_name, key, cost=cost)
            decision = await self._stats(entry, rule_name, key, ok, cost)
            if not ok:
                return decision
            if best is None or decision.remaining < best.remaining:
                best = decision
        assert best is not None
        return best

    async def _stats(
        self, entry: _Entry, rule_name: str, key: str, ok: bool, cost: int
    ) -> Decision:
        strategy = self.strategy
        assert strategy is not None
        if self._sliding:
            reset_after, remaining = await self._sliding_stats(entry, rule_name, key)
            if not ok and cost > entry.amount:  # never admitted: the window, as on memory
                reset_after = float(entry.expiry)
        else:
            stats = await strategy.get_window_stats(entry.item, rule_name, key)
            reset_after = max(0.0, float(stats.reset_time) - self.clock.wall())
            remaining = max(0, int(stats.remaining))
        return Decision(
            ok,
            entry.label,
            entry.amount,
            entry.expiry,
            remaining,
            reset_after,
            0.0 if ok else reset_after,
        )

    async def _sliding_stats(self, entry: _Entry, rule_name: str, key: str) -> tuple[float, int]:
        """limits' sliding-window-counter stats, relative to now.

        ``SlidingWindowCounterRateLimiter.get_window_stats`` adds ``time.time()`` to the
        reset; the storage's own answer is relative already, so this reads it directly and
        stays right under an injected clock.
        """
        storage: SlidingWindowCounterSupport = self.storage  # type: ignore[assignment]
        expiry = entry.expiry
        prev_count, prev_ttl, cur_count, cur_ttl = await storage.get_sliding_window(
            entry.item.key_for(rule_name, key), expiry
        )
        weighted = prev_count * prev_ttl / expiry + cur_count
        remaining = max(0, entry.amount - floor(weighted))
        if not (prev_count or cur_count):
            return 0.0, remaining
        prev_reset = prev_ttl % (expiry / prev_count) if prev_count else inf
        cur_reset = cur_ttl % expiry if cur_count else inf
        return max(0.0, min(prev_reset, cur_reset)), remaining

    # -- failures and events -------------------------------------------------------------

    def _degraded(self, keys: Sequence[str], cost: int, exc: Exception | None) -> Decision:
        """The shared store failed (``exc``) or its breaker is open (None): the policy decides.

        Fail open: the same rates, counted in this process. Fail closed: refuse at once.
        """
        local = self.local
        if exc is not None:
            decision = self._failed(exc)
        else:
            decision = self._refused_closed()
            bus = self.events
            if bus.active:
                breaker = self.storage_breaker
                bus.emit(
                    RateLimitStorageFailed(
                        at=self.clock.now(),
                        error=f"not asked: {breaker.name if breaker else 'storage'} is open",
                        fail_open=self._fail_open,
                    )
                )
        if not self._fail_open or local is None:
            return decision
        try:
            decision = self._decide_in(local, keys, cost, failed=True)
        except Exception:  # pragma: no cover - the in-process twin has no I/O to fail
            log.exception("in-process rate-limit fallback failed")
            return decision
        bus = self.events
        if bus.active:
            self._emit(bus, decision, keys, cost)
        return decision

    def _refused_closed(self) -> Decision:
        entry = self.entries[0]
        wait = 0.0 if self._fail_open else self.policy.closed_retry_after
        return Decision(
            self._fail_open, entry.label, entry.amount, entry.expiry, 0, wait, wait, False, True
        )

    def _failed(self, exc: Exception) -> Decision:
        self.storage_failures += 1
        now = self.clock.now()
        fail_open = self._fail_open
        if now - self._last_log >= self.policy.log_interval:
            log.warning(
                "rate-limit storage %s failed (%s: %s); failing %s%s",
                self.policy.storage,
                type(exc).__name__,
                exc,
                "open (in-process limits)" if fail_open else "closed (refusing with 503)",
                f"; {self._suppressed} more failures since the last report"
                if self._suppressed
                else "",
            )
            self._last_log = now
            self._suppressed = 0
        else:
            self._suppressed += 1
        bus = self.events
        if bus.active:
            bus.emit(
                RateLimitStorageFailed(
                    at=now, error=f"{type(exc).__name__}: {exc}", fail_open=fail_open
                )
            )
        return self._refused_closed()

    def _emit(self, bus: EventBus, d: Decision, keys: Sequence[str], cost: int) -> None:
        key = keys[0] if keys else ""
        for entry in self.entries:
            if entry.label == d.rule:
                key = keys[entry.index]
                break
        if d.admitted:
            bus.emit(
                RateLimitAdmitted(
                    at=self.clock.now(), rule=d.rule, key=key, cost=cost, remaining=d.remaining
                )
            )
        else:
            bus.emit(
                RateLimited(
                    at=self.clock.now(),
                    rule=d.rule,
                    key=key,
                    cost=cost,
                    limit=d.limit,
                    window=d.window,
                    retry_after=d.retry_after,
                )
            )

    # -- housekeeping --------------------------------------------------------------------

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the counters of ``keys`` (one per rule): an operator's reset."""
        entries = self.entries
        if self._redis is not None:
            await self._redis.clear([e.redis_prefix + keys[e.index] + "}" for e in entries])
        elif self.strategy is not None:
            for entry in entries:
                await self.strategy.clear(entry.item, entry.rule_name, keys[entry.index])
        for storage in (self.storage, self.local):
            if isinstance(storage, BoundedMemoryStorage):
                for entry in entries:
                    await storage.clear(entry.prefix + keys[entry.index] + entry.suffix)

    async def aclose(self) -> None:
        """Close the shared store's connections (idempotent)."""
        if self._redis is not None:
            await self._redis.aclose()
