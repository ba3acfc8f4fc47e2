"""Load shedding, sans-IO: an adaptive concurrency limit in front of a short priority queue.

Why: a server that accepts everything queues everything, and past its capacity every
request waits longer than its client does, so all the work is wasted (goodput -> 0 at
100% CPU). :class:`ConcurrencyLimiter` keeps at most ``limit`` requests running, lets a
few wait briefly (CoDel: a standing queue is cut to a hand-off buffer served newest-first),
and rejects the rest at once, which costs microseconds instead of a queue slot.
:class:`GradientController` finds ``limit`` from latency, so a server needs no capacity
figure. Everything here is a plain object driven by the injected clock; the only asyncio
is the future a waiting request awaits itself (no background task), see :meth:`wait`.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.shed import ShedPolicy

QUEUE_FILL = 0.5
"""Fraction of the allowed wait that the queue is sized to drain in (see ``capacity``)."""
QUEUE_FILL_OVERLOADED = 0.25
"""The same under sustained overload, where an expired waiter is the likely outcome."""

__all__ = [
    "ConcurrencyLimitChanged",
    "ConcurrencyLimiter",
    "GradientController",
    "Permit",
    "Rejection",
    "RequestShed",
    "Waiter",
]

@dataclass(frozen=True, slots=True, kw_only=True)
class RequestShed(Event):
    """A request was refused: ``queue_full``, ``expired`` (waited too long) or ``displaced``."""

    name: ClassVar[str] = "shed.shed"
    reason: str
    priority: int
    retry_after: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencyLimitChanged(Event):
    """The effective concurrency limit moved (controller step or min-RTT probe)."""

    name: ClassVar[str] = "shed.limit_changed"
    old: int
    new: int


@dataclass(frozen=True, slots=True)
class Rejection:
    """The answer for a shed request; ``retry_after`` seconds is never below the policy floor."""

    reason: str
    priority: int
    retry_after: float


class Permit:
    """One admitted request's slot; give it back with :meth:`ConcurrencyLimiter.release`."""

    __slots__ = ("priority", "released", "started")

    def __init__(self, started: float, priority: int) -> None:
        self.started = started
        self.priority = priority
        self.released = False


class Waiter:
    """A queued request; ``result`` is set exactly once (a Permit or a Rejection)."""

    __slots__ = ("_future", "deadline", "enqueued", "priority", "result")

    def __init__(self, enqueued: float, priority: int, deadline: float) -> None:
        self.enqueued = enqueued
        self.deadline = deadline  # the wait allowed when it was queued is kept
        self.priority = priority
        self.result: Permit | Rejection | None = None
        self._future: asyncio.Future[Permit | Rejection] | None = None

    @property
    def pending(self) -> bool:
        return self.result is None

    def future(self) -> asyncio.Future[Permit | Rejection]:
        """The future the waiting request awaits (created on first use, in the running loop)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.result is not None:
                self._future.set_result(self.result)
        return self._future

    def _resolve(self, result: Permit | Rejection) -> None:
        self.result = result
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(result)


class GradientController:
    """Concurrency limit from latency: shrink by ``tolerance*baseline/rtt``, else grow by sqrt.

    Samples are averaged per window (``window_samples`` or ``window_max`` seconds). When
    the window's latency is above ``tolerance * baseline`` the limit is multiplied by that
    ratio (at least 0.5); when it is within, the limit grows by ``sqrt(limit)``, but only
    if the limit was in use for at least half the window's samples (an app-limited server
    must not grow a limit it does not use, and a momentary burst is not demand). Both
    steps are smoothed. ``baseline`` is the no-load latency: it
    is measured by a *probe*, one window run at ``min_limit`` (so nothing queues inside
    the app), at start and every ``probe_interval``; in between it only moves down. This
    is Netflix's gradient controller with a BBR-style min-RTT probe instead of a long-term
    average, which would drift upwards under a standing queue.
    """

    __slots__ = (
        "_baseline",
        "_limit",
        "_next_probe",
        "_policy",
        "_probe_started",
        "_probing",
        "_win_count",
        "_win_saturated",
        "_win_start",
        "_win_sum",
    )

    def __init__(self, policy: ShedPolicy, now: float) -> None:
        self._policy = policy
        self._limit = float(policy.initial_limit)
        self._baseline: float | None = None
        self._probing = True
        self._probe_started = now
        self._next_probe = now + policy.probe_interval
        self._win_count = 0
        self._win_sum = 0.0
        self._win_start: float | None = None
        self._win_saturated = 0

    @property
    def limit(self) -> int:
        """The limit to enforce now (``min_limit`` while probing)."""
        if self._probing:
            return min(self._policy.min_limit, int(self._limit))
        return int(self._limit)

    @property
    def probing(self) -> bool:
        return self._probing

    @property
    def baseline(self) -> float | None:
        """The measured no-load latency, or None before the first probe completed."""
        return self._baseline

    def on_sample(self, rtt: float, *, started: float, now: float, saturated: bool) -> None:
        """Feed one latency sample of a request admitted at ``started``."""
        p = self._policy
        if self._probing and started < self._probe_started:
            return  # admitted before the probe: it ran at the old concurrency
        if self._win_start is None:
            self._win_start = now
        self._win_count += 1
        self._win_sum += max(rtt, 0.0)
        self._win_saturated += saturated
        if self._win_count < p.window_samples and now - self._win_start < p.window_max:
            return
        rtt_mean = self._win_sum / self._win_count
        grow = 2 * self._win_saturated >= self._win_count  # at the limit most of the window
        self._win_count = 0
        self._win_sum = 0.0
        self._win_start = None
        self._win_saturated = 0
        if self._probing:
            self._baseline = rtt_mean
            self._probing = False
            self._next_probe = now + p.probe_interval
            return
        baseline = self._baseline if self._baseline is not None else rtt_mean
        if rtt_mean < baseline:
            baseline = rtt_mean
        self._baseline = baseline
        ratio = p.tolerance * baseline / rtt_mean if rtt_mean > 0 else 1.0
        gradient = max(0.5, min(1.0, ratio))
        if gradient < 1.0 or grow:
            if gradient < 1.0:
                target = self._limit * gradient  # latency grew: shrink in proportion
            else:
                target = self._limit + math.sqrt(self._limit)  # flat and used: grow
            smoothed = (1 - p.smoothing) * self._limit + p.smoothing * target
            self._limit = min(float(p.max_limit), max(float(p.min_limit), smoothed))
        if now >= self._next_probe:
            self._probing = True
            self._probe_started = now


class ConcurrencyLimiter:
    """At most ``limit`` permits out; a short priority queue; everything else rejected.

    Exact under asyncio concurrency because every decision is synchronous: a released
    permit is handed straight to the next waiter (``in_flight`` never dips and rises
    again in between), and a waiter that went away is removed before anyone is counted.
    """

    def __init__(
        self,
        policy: ShedPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.policy = policy if policy is not None else ShedPolicy()
        self._clock = clock
        self._bus = events if events is not None else DEFAULT_BUS
        now = clock.now()
        self._controller = GradientController(self.policy, now) if self.policy.adaptive else None
        known = {c.priority for c in self.policy.classes if not c.never_shed}
        self._known = sorted(known | {self.policy.default_priority})
        self._in_flight = 0
        self._queued = 0
        self._queues: dict[int, deque[Waiter]] = {}
        self._priorities: list[int] = []  # descending
        self._hold_ema: float | None = None
        self._overloaded = False
        self._first_above: float | None = None
        self._last_pressure = -math.inf

    # -- observation -------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The limit enforced right now."""
        if self._controller is None:
            return self.policy.initial_limit
        return self._controller.limit

    @property
    def controller(self) -> GradientController | None:
        return self._controller

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def overloaded(self) -> bool:
        """CoDel state: the queue's wait has stayed above target for an interval."""
        return self._is_overloaded(self._clock.now())

    def drain_rate(self) -> float | None:
        """Estimated permits released per second (Little's law), None before any sample."""
        if self._hold_ema is None or self._hold_ema <= 0:
            return None
        return max(1, self.limit) / self._hold_ema

    def retry_after(self) -> float:
        """Seconds until the current backlog (in flight + queued + one) is drained."""
        p = self.policy
        rate = self.drain_rate()
        if rate is None:
            return p.retry_after_min
        drain = (self._in_flight + self._queued + 1) / rate
        return min(p.retry_after_max, max(p.retry_after_min, drain))

    def capacity(self, now: float | None = None) -> int:
        """How many may wait now: what the drain rate serves within part of the wait.

        Half the interval normally, a quarter of the target under sustained overload, so
        that a queued request is almost always served rather than expired:
        an expired waiter has been kept for the whole wait and then refused anyway, while
        a refusal at the door costs microseconds. Under sustained overload the allowed
        wait is the target, so a slowly draining server keeps no queue at all (the
        adaptive limit's headroom keeps it busy) and a fast one a short LIFO hand-off.
        """
        p = self.policy
        if now is None:
            now = self._clock.now()
        rate = self.drain_rate()
        if self._is_overloaded(now):
            if rate is None:
                return 0
            return min(
                p.max_queue_length, math.floor(rate * p.queue_target * QUEUE_FILL_OVERLOADED)
            )
        if rate is None:
            return p.max_queue_length
        return min(p.max_queue_length, max(1, math.floor(rate * p.queue_interval * QUEUE_FILL)))

    def admit_limit(self, priority: int, now: float | None = None) -> int:
        """The in-flight count below which ``priority`` is admitted straight away.

        Under sustained overload each class above ``priority`` keeps ``priority_reserve``
        of the limit for itself, so lower classes are refused first even when no queue is
        kept; otherwise every class may use the whole limit.
        """
        limit = self.limit
        if now is None:
            now = self._clock.now()
        if not self._is_overloaded(now) or self.policy.priority_reserve == 0:
            return limit
        above = len(self._known) - bisect.bisect_right(self._known, priority)
        if above == 0:
            return limit
        step = max(1, round(limit * self.policy.priority_reserve))
        return max(1, limit - above * step)

    def time_left(self, waiter: Waiter) -> float:
        """Seconds until ``waiter`` may be expired (for the waiter's own timer)."""
        now = self._clock.now()
        return max(0.0, waiter.deadline - now)

    # -- decisions ---------------------------------------------------------------------

    def try_acquire(self, priority: int | None = None) -> Permit | Waiter | Rejection:
        """Admit now, queue, or reject now. A :class:`Waiter` must be waited on or cancelled.

        ``priority`` None means the policy's ``default_priority``; higher is shed later.
        """
        if priority is None:
            priority = self.policy.default_priority
        now = self._clock.now()
        if self._queued:
            self._expire(now)
            self._dispatch(now)
        if self._queued == 0 and self._in_flight < self.admit_limit(priority, now):
            self._in_flight += 1
            return Permit(now, priority)
        if self._queued >= self.capacity(now):
            victim = self._lowest_below(priority)
            if victim is None:
                self._pressure(now)
                return self._reject("queue_full", priority, now)
            self._remove(victim)
            victim._resolve(self._reject("displaced", victim.priority, now))
        waiter = Waiter(now, priority, now + self._max_wait(now))
        q = self._queues.get(priority)
        if q is None:
            q = self._queues[priority] = deque()
            self._priorities = sorted(self._queues, reverse=True)
        q.append(waiter)
        self._queued += 1
        return waiter

    def release(self, permit: Permit, *, latency: float | None = None) -> None:
        """Give a permit back (idempotent). ``latency`` feeds the controller when given."""
        if permit.released:
            return
        permit.released = True
        now = self._clock.now()
        saturated = self._queued > 0 or self._in_flight >= self.limit
        self._in_flight -= 1
        hold = max(now - permit.started, 0.0)
        self._hold_ema = hold if self._hold_ema is None else 0.9 * self._hold_ema + 0.1 * hold
        if latency is not None and self._controller is not None:
            old = self._controller.limit
            self._controller.on_sample(
                latency, started=permit.started, now=now, saturated=saturated
            )
            new = self._controller.limit
            if new != old and self._bus.active:
                self._bus.emit(ConcurrencyLimitChanged(at=now, old=old, new=new))
        if self._queued:
            self._expire(now)
            self._dispatch(now)

    def cancel(self, waiter: Waiter) -> None:
        """The waiting request went away: free its place, or give back a permit it got."""
        result = waiter.result
        if result is None:
            self._remove(waiter)
            waiter._resolve(Rejection("cancelled", waiter.priority, 0.0))
        elif isinstance(result, Permit):
            self.release(result)

    def expire(self, waiter: Waiter | None = None) -> None:
        """Shed waiters that waited too long (called by the waiters' own timers)."""
        if self._queued:
            now = self._clock.now()
            if waiter is not None and waiter.pending and now > waiter.deadline:
                self._remove(waiter)
                self._expired(waiter, now)
            self._expire(now)
            self._dispatch(now)

    async def wait(self, waiter: Waiter) -> Permit | Rejection:
        """Await a queued request's turn; cancelling the caller frees its place."""
        fut = waiter.future()
        try:
            while not fut.done():
                await asyncio.wait((fut,), timeout=max(self.time_left(waiter), 0.001))
                if not fut.done():
                    self.expire(waiter)
        except BaseException:
            self.cancel(waiter)
            raise
        return fut.result()

    async def acquire(self, priority: int | None = None) -> Permit | Rejection:
        """``try_acquire`` and, if queued, ``wait``."""
        outcome = self.try_acquire(priority)
        if isinstance(outcome, Waiter):
            return await self.wait(outcome)
        return outcome

    # -- internals ---------------------------------------------------------------------

    def _is_overloaded(self, now: float) -> bool:
        if self._overloaded and now - self._last_pressure >= self.policy.queue_interval:
            self._overloaded = False
            self._first_above = None
        return self._overloaded

    def _max_wait(self, now: float) -> float:
        p = self.policy
        return p.queue_target if self._is_overloaded(now) else p.queue_interval

    def _pressure(self, now: float) -> None:
        self._last_pressure = now

    def _note_sojourn(self, sojourn: float, now: float) -> None:
        p = self.policy
        if sojourn < p.queue_target:
            self._first_above = None
            return
        self._pressure(now)
        if self._first_above is None:
            self._first_above = now
        elif now - self._first_above >= p.queue_interval:
            self._overloaded = True

    def _reject(self, reason: str, priority: int, now: float) -> Rejection:
        retry_after = self.retry_after()
        if self._bus.active:
            self._bus.emit(
                RequestShed(at=now, reason=reason, priority=priority, retry_after=retry_after)
            )
        return Rejection(reason, priority, retry_after)

    def _expire(self, now: float) -> None:
        for q in self._queues.values():
            while q and now > q[0].deadline:
                waiter = q.popleft()
                self._queued -= 1
                self._expired(waiter, now)

    def _expired(self, waiter: Waiter, now: float) -> None:
        self._note_sojourn(now - waiter.enqueued, now)
        self._pressure(now)
        waiter._resolve(self._reject("expired", waiter.priority, now))

    def _dispatch(self, now: float) -> None:
        lifo = self.policy.lifo_under_overload and self._is_overloaded(now)
        while self._queued:
            for prio in self._priorities:
                q = self._queues[prio]
                if q:
                    break
            else:  # pragma: no cover - _queued counts exactly the queued waiters
                raise AssertionError("queued count out of sync")
            if self._in_flight >= self.admit_limit(prio, now):
                return  # lower classes have lower admission limits: none can go either
            waiter = q.pop() if lifo else q.popleft()
            self._queued -= 1
            self._note_sojourn(now - self._oldest(waiter.enqueued), now)
            self._in_flight += 1
            waiter._resolve(Permit(now, waiter.priority))

    def _oldest(self, enqueued: float) -> float:
        """Enqueue time of the oldest waiter still queued, or ``enqueued`` if none is older.

        CoDel judges the standing queue: with priorities, a high class served at once must
        not hide a low class that has been waiting all along.
        """
        oldest = enqueued
        for q in self._queues.values():
            if q and q[0].enqueued < oldest:
                oldest = q[0].enqueued
        return oldest

    def _lowest_below(self, priority: int) -> Waiter | None:
        for prio in reversed(self._priorities):
            if prio >= priority:
                return None
            q = self._queues[prio]
            if q:
                return q[0]
        return None

    def _remove(self, waiter: Waiter) -> None:
        q = self._queues.get(waiter.priority)
        if q is not None:
            try:
                q.remove(waiter)
            except ValueError:
                return
            self._queued -= 1
