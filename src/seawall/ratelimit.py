"""The rate-limiting mechanism, without HTTP: keys and a cost in, a decision out.

:class:`RateLimiter` applies every rule of a :class:`~seawall.policy.ratelimit.RateLimitPolicy`
(each rule may hold several rates) through a ``limits`` strategy and storage, and turns
the outcome into a :class:`Decision` plus typed events.

Several limits at once: *test, then hit*. When a request is subject to more than one
rate, every rate is first tested; only when all would admit are they hit. A request
rejected by the second rate therefore does not consume the first one. With the bounded
memory storage and the moving window (the default) the test and the hits run without an
``await`` in between, so the whole decision is atomic on the event loop. With other
storages (Redis) another request can slip in between test and hit; then a hit may still
be refused after earlier hits of the same request were consumed. That errs towards
limiting, never towards admitting more than a limit.

Storage failures never escape: the policy decides between *fail open* (admit, emit
:class:`RateLimitStorageFailed`, log at most once per ``log_interval``) and *fail closed*
(refuse with ``storage_failed=True``; the middleware answers 503).
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

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.storage import BoundedMemoryStorage, storage_from_uri

__all__ = [
    "Decision",
    "RateLimitAdmitted",
    "RateLimitStorageFailed",
    "RateLimited",
    "RateLimiter",
]

log = logging.getLogger("seawall.ratelimit")

NAMESPACE = "seawall"


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitAdmitted(Event):
    """A request fit every rate (built only when somebody listens)."""

    name: ClassVar[str] = "ratelimit.admitted"
    rule: str
    key: str
    cost: int
    remaining: int


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

    __slots__ = ("amount", "expiry", "index", "item", "label", "prefix", "rule_name", "suffix")

    def __init__(self, index: int, label: str, rule_name: str, item: RateLimitItem) -> None:
        self.index = index  # which key (rule) it uses
        self.label = label
        self.rule_name = rule_name
        self.item = type(item)(item.amount, item.multiples, namespace=NAMESPACE)
        self.amount = int(item.amount)
        self.expiry = int(item.get_expiry())
        # Same layout as RateLimitItem.key_for(rule_name, key), without its per-call work.
        self.prefix = f"{NAMESPACE}/{rule_name}/"
        self.suffix = f"/{item.amount}/{item.multiples}/{item.GRANULARITY.name}"


def _entries(rules: Sequence[LimitRule]) -> tuple[_Entry, ...]:
    out: list[_Entry] = []
    for index, rule in enumerate(rules):
        items = rule.items
        for item in items:
            label = rule.name if len(items) == 1 else f"{rule.name}-{item.get_expiry()}s"
            out.append(_Entry(index, label, rule.name, item))
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
    """Apply a policy's rates to keys. One key per rule, in ``policy.all_rules()`` order."""

    def __init__(
        self,
        policy: RateLimitPolicy | None = None,
        *,
        storage: Storage | None = None,
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
        self.strategy: LimitsRateLimiter = STRATEGIES[policy.strategy](storage)  # type: ignore[abstract]
        self.rules = policy.all_rules()
        self.entries = _entries(self.rules)
        self._fast = (
            isinstance(storage, BoundedMemoryStorage) and policy.strategy == "moving-window"
        )
        self._acquire = (
            storage.acquire_moving if isinstance(storage, BoundedMemoryStorage) else _no_fast_path
        )
        self._memory = isinstance(storage, BoundedMemoryStorage)
        self._sliding = policy.strategy == "sliding-window-counter"
        self._single = self.entries[0] if len(self.entries) == 1 else None
        self._fail_open = policy.on_storage_error == "open"
        self._timeout = policy.storage_timeout * 4
        self._last_log = -float("inf")
        self._suppressed = 0
        self.storage_failures = 0

    # -- the decision --------------------------------------------------------------------

    @property
    def decides_without_io(self) -> bool:
        """True when :meth:`hit_now` can decide (bounded memory storage, moving window)."""
        return self._fast

    async def hit(self, keys: Sequence[str], cost: int = 1) -> Decision:
        """Count one request of ``cost`` against every rate; never raises on storage errors."""
        if self._fast:
            return self.hit_now(keys, cost)
        try:
            if self._memory:
                decision = await self._hit_strategy(keys, cost)
            else:
                async with asyncio.timeout(self._timeout):
                    decision = await self._hit_strategy(keys, cost)
        except Exception as exc:
            return self._failed(exc)
        bus = self.events
        if bus.active:
            self._emit(bus, decision, keys, cost)
        return decision

    def hit_now(self, keys: Sequence[str], cost: int = 1) -> Decision:
        """:meth:`hit` without an await, for :attr:`decides_without_io` limiters (hot path)."""
        if not self._fast:
            raise RuntimeError("hit_now needs the bounded memory storage and the moving window")
        try:
            single = self._single
            if single is not None:  # one rate: one combined hit-and-read
                ok, start, count, now = self._acquire(
                    single.prefix + keys[single.index] + single.suffix,
                    single.amount,
                    single.expiry,
                    cost,
                )
                decision = _decide(single, ok, start, count, now)
            else:
                decision = self._hit_memory_many(keys, cost)
        except Exception as exc:
            return self._failed(exc)
        bus = self.events
        if bus.active:
            self._emit(bus, decision, keys, cost)
        return decision

    def _hit_memory_many(self, keys: Sequence[str], cost: int) -> Decision:
        """Several rates: test all, then hit all; nothing awaits in between (atomic)."""
        storage = self.storage
        assert isinstance(storage, BoundedMemoryStorage)
        entries = self.entries
        skeys = [e.prefix + keys[e.index] + e.suffix for e in entries]
        for entry, key in zip(entries, skeys, strict=True):
            start, count = storage.moving_window(key, entry.expiry)
            if count + cost > entry.amount:
                return _decide(entry, False, start, count, self.clock.wall())
        best: Decision | None = None
        for entry, key in zip(entries, skeys, strict=True):
            ok, start, count, now = storage.acquire_moving(key, entry.amount, entry.expiry, cost)
            decision = _decide(entry, ok, start, count, now)
            if not ok:  # pragma: no cover - impossible without an await in between
                return decision
            if best is None or decision.remaining < best.remaining:
                best = decision
        assert best is not None
        return best

    async def _hit_strategy(self, keys: Sequence[str], cost: int) -> Decision:
        strategy = self.strategy
        entries = self.entries
        ids = [(e.rule_name, keys[e.index]) for e in entries]
        if len(entries) > 1:
            for entry, (rule_name, key) in zip(entries, ids, strict=True):
                if not await strategy.test(entry.item, rule_name, key, cost=cost):
                    return await self._stats(entry, rule_name, key, False)
        best: Decision | None = None
        for entry, (rule_name, key) in zip(entries, ids, strict=True):
            ok = await strategy.hit(entry.item, rule_name, key, cost=cost)
            decision = await self._stats(entry, rule_name, key, ok)
            if not ok:
                return decision
            if best is None or decision.remaining < best.remaining:
                best = decision
        assert best is not None
        return best

    async def _stats(self, entry: _Entry, rule_name: str, key: str, ok: bool) -> Decision:
        if self._sliding:
            reset_after, remaining = await self._sliding_stats(entry, rule_name, key)
        else:
            stats = await self.strategy.get_window_stats(entry.item, rule_name, key)
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
                "open (admitting)" if fail_open else "closed (refusing with 503)",
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
        entry = self.entries[0]
        wait = 0.0 if fail_open else self.policy.closed_retry_after
        return Decision(
            fail_open, entry.label, entry.amount, entry.expiry, 0, wait, wait, False, True
        )

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

    async def clear(self, keys: Sequence[str]) -> None:
        """Forget the counters of ``keys`` (one per rule): an operator's reset."""
        for entry in self.entries:
            await self.strategy.clear(entry.item, entry.rule_name, keys[entry.index])
