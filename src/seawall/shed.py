"""Load shedding, sans-IO: an adaptive concurrency limit in front of a priority queue.

Why: a server that accepts everything queues everything, and past its capacity every
request waits longer than its client does, so all the work is wasted (goodput -> 0 at
100% CPU). :class:`ConcurrencyLimiter` keeps at most ``limit`` requests working, lets the
rest wait their turn, and only when the wait has become a *standing* queue (CoDel) that a
higher limit would not drain cuts the queue to a hand-off buffer served newest-first and
refuses the rest at once, which costs microseconds instead of a queue slot.
:class:`GradientController` finds ``limit`` from latency, so a server needs no capacity
figure; :class:`StepTracker` remembers which build steps were started, so a server can
finish them before it starts new ones. Everything here is a plain object driven by the
injected clock; the only asyncio is the future a waiting request awaits itself (no
background task), see :meth:`ConcurrencyLimiter.wait`.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

from mypy_extensions import mypyc_attr

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.shed import ShedPolicy

QUEUE_FILL_OVERLOADED = 0.5
"""Under overload the queue holds what the drain rate serves in this part of the interval."""
BASELINE_SMOOTHING = 0.2
"""Weight of one spare-concurrency window in the no-load latency estimate."""
SPARE = 0.5
"""A window whose mean concurrency stayed below this share of the limit had spare room:
nothing queued inside the app on our account, so its latency is the no-load latency."""
STUCK_WINDOWS = 5
"""Windows at ``min_limit`` after which the baseline is re-learned (the service got slower)."""
MAX_GROWTH = 1.5
"""The most one window may multiply the limit by (before smoothing)."""

__all__ = [
    "ConcurrencyLimitChanged",
    "ConcurrencyLimiter",
    "ConcurrencySlot",
    "GradientController",
    "Rejection",
    "RequestShed",
    "StepTracker",
    "Waiter",
]


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestShed(Event):
    """A request was refused: ``queue_full``, ``expired``, ``displaced`` or ``streams``."""

    name: ClassVar[str] = "shed.shed"
    reason: str
    priority: int
    retry_after: float


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class ConcurrencyLimitChanged(Event):
    """The effective concurrency limit moved (one controller update)."""

    name: ClassVar[str] = "shed.limit_changed"
    old: int
    new: int


@dataclass(frozen=True)  # no slots=True: mypyc rejects it (compiled fields are fixed anyway)
class Rejection:
    """The answer for a shed request; ``retry_after`` seconds is never below the policy floor."""

    reason: str
    priority: int
    retry_after: float


class ConcurrencySlot:
    """One of the ``limit`` places for work, held by one admitted request.

    Give it back with :meth:`ConcurrencyLimiter.release` when the work is done (the
    response started), exactly once; a second release is a no-op.
    """

    __slots__ = ("in_flight", "priority", "released", "started")

    def __init__(self, started: float, priority: int, in_flight: int) -> None:
        self.started = started
        self.priority = priority
        self.in_flight = in_flight  # requests working when this one was admitted (itself too)
        self.released = False


class Waiter:
    """A queued request; ``result`` is set exactly once (a slot or a Rejection)."""

    __slots__ = ("_future", "deadline", "enqueued", "priority", "result")

    def __init__(self, enqueued: float, priority: int, deadline: float) -> None:
        self.enqueued = enqueued
        self.deadline = deadline
        self.priority = priority
        self.result: ConcurrencySlot | Rejection | None = None
        self._future: asyncio.Future[ConcurrencySlot | Rejection] | None = None

    @property
    def pending(self) -> bool:
        return self.result is None

    def future(self) -> asyncio.Future[ConcurrencySlot | Rejection]:
        """The future the waiting request awaits (created on first use, in the running loop)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
            if self.result is not None:
                self._future.set_result(self.result)
        return self._future

    def _resolve(self, result: ConcurrencySlot | Rejection) -> None:
        self.result = result
        fut = self._future
        if fut is not None and not fut.done():
            fut.set_result(result)


class GradientController:
    """Concurrency limit from latency: slow start, then Netflix's gradient, with no probe.

    Samples are averaged per window (``window_samples`` or ``window_max`` seconds).

    - **Slow start** (from ``initial_limit``): every sample within ``tolerance * baseline``
      taken while the limit was in use adds one to the limit, which doubles it per round
      trip (TCP's slow start). An I/O-bound app reaches its real concurrency in a few
      round trips. It ends at the first window whose mean is above the tolerance.
    - **Avoidance**: a window above ``tolerance * baseline`` multiplies the limit by that
      ratio (at least 0.5); a window within it grows the limit by ``sqrt(limit)`` if the
      limit was in use for at least half the window's samples. Steps are smoothed. A
      window with a queue and latency within ``sqrt(tolerance)`` returns to slow start:
      demand is waiting and the app shows no queueing of its own.
    - **Baseline** (the no-load latency): the first window sets it; a window whose mean
      is lower lowers it; a window whose concurrency stayed below half the limit (the
      app had room, nothing of ours queued inside it) moves it towards its mean, up or
      down; and ``STUCK_WINDOWS`` windows in a row at ``min_limit`` re-learn it (the
      service got slower). No window is ever run at reduced concurrency to measure it:
      that probe sheds healthy traffic (Envoy's minRTT recalculation is known to).
    """

    __slots__ = (
        "_baseline",
        "_limit",
        "_policy",
        "_slow_start",
        "_stuck",
        "_win_count",
        "_win_in_flight",
        "_win_queued",
        "_win_saturated",
        "_win_start",
        "_win_sum",
    )

    def __init__(self, policy: ShedPolicy, now: float) -> None:
        self._policy = policy
        self._limit = float(policy.initial_limit)
        self._baseline: float | None = None
        self._slow_start = True
        self._stuck = 0
        self._win_count = 0
        self._win_sum = 0.0
        self._win_start: float | None = None
        self._win_saturated = 0
        self._win_queued = 0
        self._win_in_flight = 0

    @property
    def limit(self) -> int:
        """The limit to enforce now."""
        return int(self._limit)

    @property
    def slow_start(self) -> bool:
        """True while the limit grows per sample: a queue now is the limit's, not overload."""
        return self._slow_start

    @property
    def baseline(self) -> float | None:
        """The estimated no-load latency, or None before the first window."""
        return self._baseline

    def on_sample(
        self,
        rtt: float,
        *,
        now: float,
        saturated: bool,
        queued: bool = False,
        in_flight: int = 1,
    ) -> None:
        """Feed one latency sample.

        ``saturated``: the limit was reached (or requests waited) when it completed;
        ``queued``: requests were waiting; ``in_flight``: how many worked when it started.
        """
        p = self._policy
        rtt = max(rtt, 0.0)
        # a window spans at least one round trip's completions (``limit`` of them when
        # saturated): a limit change must show in latency before the next one is decided
        size = max(p.window_samples, self._limit)
        if self._win_start is None:
            self._win_start = now
        self._win_count += 1
        self._win_sum += rtt
        self._win_saturated += saturated
        self._win_queued += queued
        self._win_in_flight += in_flight
        baseline = self._baseline
        if baseline is None:  # until the first window ends: its running mean
            baseline = self._win_sum / self._win_count
        if (
            self._slow_start
            and saturated
            and rtt * rtt <= p.tolerance * baseline * baseline  # flat: within sqrt(tolerance)
        ):
            self._limit = min(float(p.max_limit), self._limit + 1.0)
            if self._limit >= p.max_limit:
                self._slow_start = False  # nothing left to grow into
        if self._win_count < size and now - self._win_start < p.window_max:
            return
        count = self._win_count
        rtt_mean = self._win_sum / count
        grow = 2 * self._win_saturated >= count  # at the limit most of the window
        waiting = 2 * self._win_queued >= count
        spare = self._win_in_flight / count <= SPARE * self._limit and not grow
        self._win_count = 0
        self._win_sum = 0.0
        self._win_start = None
        self._win_saturated = 0
        self._win_queued = 0
        self._win_in_flight = 0
        self._end_window(rtt_mean, grow=grow, waiting=waiting, spare=spare)

    def _end_window(self, rtt: float, *, grow: bool, waiting: bool, spare: bool) -> None:
        if rtt <= 0.0:
            return  # a clock too coarse to time a request: the window says nothing at all
        p = self._policy
        baseline = self._baseline
        if baseline is None:
            baseline = rtt
        elif rtt < baseline or spare:
            # smoothed both ways: the mean of a window of mixed blobs and manifests is
            # noisy, and a running minimum of noisy means sits far below the real one
            baseline += BASELINE_SMOOTHING * (rtt - baseline)
        elif self._stuck >= STUCK_WINDOWS:
            baseline = rtt  # pinned at min_limit: nothing of ours queues, re-learn
            self._stuck = 0
        self._baseline = baseline
        ratio = p.tolerance * baseline / rtt
        flat = rtt * rtt <= p.tolerance * baseline * baseline
        if not flat or not grow:
            # latency left the flat band, or demand stayed below the limit: either way
            # doubling is over; a later surge with flat latency starts it again
            self._slow_start = False
        if ratio < 1.0:
            gradient = max(0.5, ratio)
            target = self._limit * gradient  # latency grew: shrink in proportion
        elif self._slow_start:
            return  # growing per sample already
        elif waiting and flat:
            self._slow_start = True  # demand waits and the app shows no queue of its own
            return
        elif grow:
            # flat and used: grow in proportion to the room left below the tolerance,
            # which settles at latency = tolerance * baseline instead of sawing above it
            target = self._limit * min(ratio, MAX_GROWTH)
        else:
            return  # app-limited: leave it
        smoothed = (1 - p.smoothing) * self._limit + p.smoothing * target
        self._limit = min(float(p.max_limit), max(float(p.min_limit), smoothed))
        if int(self._limit) <= p.min_limit:
            self._stuck += 1
        else:
            self._stuck = 0


class StepTracker:
    """Which build steps were admitted recently, per tenant: bounded and expiring.

    A key is ``(tenant, step)``; it counts as started for ``idle`` seconds after its last
    admission. At most ``capacity`` keys are kept (least recently admitted dropped first),
    so a flood of clients cannot grow it, and a key carries its tenant, so one tenant's
    steps never make another's requests look like continuations.
    """

    __slots__ = ("_capacity", "_idle", "_seen", "_swept")

    def __init__(self, idle: float, capacity: int) -> None:
        self._idle = idle
        self._capacity = capacity
        self._seen: dict[Hashable, float] = {}  # in admission order, oldest first
        self._swept = -math.inf

    def __len__(self) -> int:
        return len(self._seen)

    def started(self, key: Hashable, now: float) -> bool:
        """True when ``key`` was admitted within the last ``idle`` seconds."""
        at = self._seen.get(key)
        return at is not None and now - at <= self._idle

    def admitted(self, key: Hashable, now: float) -> None:
        """Record an admission of ``key`` at ``now``.

        Keys idle for longer than ``idle`` are forgotten once per ``idle`` period, not on
        every admission: ``started`` reads each key's own time, so a stale key that is
        still kept never counts, and an admission costs no scan.
        """
        if self._capacity == 0:
            return
        seen = self._seen
        seen.pop(key, None)  # inserted again: last in admission order
        seen[key] = now
        if len(seen) > self._capacity:
            del seen[next(iter(seen))]
        if now - self._swept >= self._idle:
            self._swept = now
            idle = self._idle
            stale = []
            for old, at in seen.items():
                if now - at <= idle:
                    break
                stale.append(old)
            for old in stale:
                del seen[old]


class ConcurrencyLimiter:
    """At most ``limit`` slots out; a priority queue; a cap on streams; the rest rejected.

    Exact under asyncio concurrency because every decision is synchronous: a released
    slot is handed straight to the next waiter (``in_flight`` never dips and rises
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
        known |= {self.policy.default_priority, self.policy.continuation_priority}
        self._known = sorted(known)
        self._in_flight = 0
        self._queued = 0
        self._streams = 0
        self._queues: dict[int, deque[Waiter]] = {}
        self._priorities: list[int] = []  # descending
        self._hold_ema: float | None = None
        self._overloaded = False
        self._first_above: float | None = None  # the oldest wait went above target then
        self._last_pressure = -math.inf
        self._free_since: float | None = None  # a slot has been free (and nobody waiting)

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
    def streams(self) -> int:
        """Long transfers in progress (responses streaming out, request bodies streaming in)."""
        return self._streams

    @property
    def overloaded(self) -> bool:
        """A queue standing for ``overload_after`` that the limit cannot drain."""
        return self._is_overloaded(self._clock.now())

    @property
    def standing(self) -> bool:
        """CoDel state: the oldest wait has been above target for a whole interval."""
        return self._is_standing(self._clock.now())

    def drain_rate(self) -> float | None:
        """Estimated slots released per second (Little's law), None before any sample."""
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
        """How many may wait now.

        Normally ``max_queue_length``: a burst waits its turn, however long it takes to
        drain, until the queue is found standing for ``overload_after``. Under overload,
        what the drain rate serves within ``queue_interval`` (served newest-first): enough
        to keep the app busy between bursts, too little to build a standing wait.
        """
        p = self.policy
        if now is None:
            now = self._clock.now()
        if not self._is_overloaded(now):
            return p.max_queue_length
        rate = self.drain_rate()
        if rate is None:
            return 0
        return min(p.max_queue_length, math.floor(rate * p.queue_interval * QUEUE_FILL_OVERLOADED))

    def admit_limit(self, priority: int, now: float | None = None, limit: int | None = None) -> int:
        """The in-flight count below which ``priority`` is admitted straight away.

        Under sustained overload each class above ``priority`` keeps ``priority_reserve``
        of the limit for itself, so lower classes are refused first even when no queue is
        kept; otherwise every class may use the whole limit.
        """
        if limit is None:
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
        """Seconds until ``waiter`` may be expired (for the waiter's own timer; inf normally)."""
        return max(0.0, waiter.deadline - self._clock.now())

    # -- decisions ---------------------------------------------------------------------

    def try_acquire(
        self, priority: int | None = None, *, stream: bool = False, now: float | None = None
    ) -> ConcurrencySlot | Waiter | Rejection:
        """Admit now, queue, or reject now. A :class:`Waiter` must be waited on or cancelled.

        ``priority`` None means the policy's ``default_priority``; higher is shed later.
        ``stream``: the request is a long transfer, refused while ``max_streams`` run.
        ``now``: the clock's reading, when the caller has just taken it.
        """
        if priority is None:
            priority = self.policy.default_priority
        if now is None:
            now = self._clock.now()
        if stream and self._streams >= self.policy.max_streams:
            return self._reject("streams", priority, now)
        if self._queued:
            self._expire(now)
            self._dispatch(now)
        if self._queued == 0:
            self._spare(now)
        controller = self._controller
        limit = self.policy.initial_limit if controller is None else int(controller._limit)
        # whoever still waits after the dispatch above is held back by its class's admission
        # limit: only a higher class, whose limit is higher, can have room; it goes now
        if self._in_flight < self.admit_limit(priority, now, limit):
            self._in_flight += 1
            if self._in_flight >= limit:
                self._free_since = None
            return ConcurrencySlot(now, priority, self._in_flight)
        self._free_since = None
        if self._queued:
            self._note_sojourn(now - self._oldest(now), now)
        if self._queued >= self.capacity(now):
            victim = self._lowest_below(priority, same=self._overloaded or self._is_standing(now))
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

    def acquire_now(self, priority: int | None = None) -> ConcurrencySlot:
        """A slot even above the limit, for work of a request admitted earlier.

        An upload's body streams without a slot; when it is complete, the work that
        follows (verify, commit) is not refused: the request was admitted at the door and
        the client has sent everything. ``max_streams`` bounds how far this goes over.
        """
        if priority is None:
            priority = self.policy.default_priority
        self._in_flight += 1
        return ConcurrencySlot(self._clock.now(), priority, self._in_flight)

    def release(
        self, slot: ConcurrencySlot, *, latency: float | None = None, now: float | None = None
    ) -> None:
        """Give a slot back (idempotent). ``latency`` feeds the controller when given;
        ``now``: the clock's reading, when the caller has just taken it."""
        if slot.released:
            return
        slot.released = True
        if now is None:
            now = self._clock.now()
        queued = self._queued > 0
        controller = self._controller
        limit = self.policy.initial_limit if controller is None else int(controller._limit)
        saturated = queued or self._in_flight >= limit
        self._in_flight -= 1
        if not queued and self._free_since is None and self._in_flight < limit:
            self._free_since = now
        if latency is not None:
            hold = now - slot.started
            if hold < 0.0:
                hold = 0.0
            ema = self._hold_ema
            self._hold_ema = hold if ema is None else 0.9 * ema + 0.1 * hold
            if controller is not None:
                controller.on_sample(
                    latency, now=now, saturated=saturated, queued=queued, in_flight=slot.in_flight
                )
                new = int(controller._limit)
                if new != limit and self._bus.active:
                    self._bus.emit(ConcurrencyLimitChanged(at=now, old=limit, new=new))
        if self._queued:
            self._expire(now)
            self._dispatch(now)

    def open_stream(self) -> None:
        """A long transfer started (count it against ``max_streams``)."""
        self._streams += 1

    def close_stream(self) -> None:
        """A long transfer ended."""
        self._streams = max(0, self._streams - 1)

    def cancel(self, waiter: Waiter) -> None:
        """The waiting request went away: free its place, or give back a slot it got."""
        result = waiter.result
        if result is None:
            self._remove(waiter)
            waiter._resolve(Rejection("cancelled", waiter.priority, 0.0))
        elif isinstance(result, ConcurrencySlot):
            self.release(result)

    def expire(self, waiter: Waiter | None = None) -> None:
        """Shed waiters that waited too long under overload (called by their own timers)."""
        if self._queued:
            now = self._clock.now()
            if waiter is not None and waiter.pending and now > waiter.deadline:
                self._remove(waiter)
                self._expired(waiter, now)
            self._note_sojourn(now - self._oldest(now), now)
            self._expire(now)
            self._dispatch(now)

    async def wait(self, waiter: Waiter) -> ConcurrencySlot | Rejection:
        """Await a queued request's turn; cancelling the caller frees its place."""
        fut = waiter.future()
        try:
            while not fut.done():
                await asyncio.wait((fut,), timeout=self.wake_in(waiter))
                if not fut.done():
                    self.expire(waiter)
        except BaseException:
            self.cancel(waiter)
            raise
        return fut.result()

    def wake_in(self, waiter: Waiter) -> float | None:
        """Seconds until a waiter should look at the clock again (None: only when called).

        Normally a waiter has no deadline: it waits its turn, and a standing queue is
        noticed by the next arrival or release. Under overload it has one.
        """
        left = self.time_left(waiter)
        return None if math.isinf(left) else max(0.001, left)

    async def acquire(self, priority: int | None = None) -> ConcurrencySlot | Rejection:
        """``try_acquire`` and, if queued, ``wait``."""
        outcome = self.try_acquire(priority)
        if isinstance(outcome, Waiter):
            return await self.wait(outcome)
        return outcome

    # -- internals ---------------------------------------------------------------------

    def _is_overloaded(self, now: float) -> bool:
        if self._overloaded and now - self._last_pressure >= self.policy.overload_after:
            self._overloaded = False  # nobody refused or kept waiting for that long
            self._first_above = None
        return self._overloaded

    def _is_standing(self, now: float) -> bool:
        return self._first_above is not None

    def _spare(self, now: float) -> None:
        """A slot stayed free for a whole hold time: the server caught up, whatever came
        before. (Under overload an arrival takes a freed slot within a fraction of that.)"""
        free = self._free_since
        if (
            self._overloaded
            and free is not None
            and now - free >= max(self.policy.queue_target, self._hold_ema or 0.0)
        ):
            self._overloaded = False
            self._first_above = None

    def _max_wait(self, now: float) -> float:
        return self.policy.queue_interval if self._is_overloaded(now) else math.inf

    def _pressure(self, now: float) -> None:
        self._last_pressure = now

    def _note_sojourn(self, sojourn: float, now: float) -> None:
        """CoDel: the oldest wait above target for a whole interval is a standing queue.

        A standing queue is served newest-first. It is overload only when it has stood
        for ``overload_after`` and the limit cannot grow: during slow start the queue is
        the limit's own (it doubles per round trip), not the server's; and a burst near
        capacity can keep a queue standing for a second while every request is served.
        """
        p = self.policy
        if sojourn < p.queue_target:
            self._first_above = None
            return
        self._pressure(now)
        if self._first_above is None:
            self._first_above = now
        elif (
            not self._overloaded
            and now - self._first_above >= p.overload_after
            and (self._controller is None or not self._controller.slow_start)
        ):
            self._overloaded = True
            self._cut(now)

    def _cut(self, now: float) -> None:
        """Overload declared: keep what the drain rate serves soon, shed the rest.

        The oldest and the lowest classes go first; the waiters kept get the overload
        deadline, so nobody left over from the burst waits on.
        """
        keep = self.capacity(now)
        deadline = now + self.policy.queue_interval
        for prio in reversed(self._priorities):  # lowest class first
            q = self._queues[prio]
            while q and self._queued > keep:
                waiter = q.popleft()  # oldest first
                self._queued -= 1
                self._expired(waiter, now)
        for q in self._queues.values():
            for waiter in q:
                waiter.deadline = min(waiter.deadline, deadline)

    def _reject(self, reason: str, priority: int, now: float) -> Rejection:
        retry_after = self.retry_after()
        if self._bus.active:
            self._bus.emit(
                RequestShed(at=now, reason=reason, priority=priority, retry_after=retry_after)
            )
        return Rejection(reason, priority, retry_after)

    def _expire(self, now: float) -> None:
        if not self._overloaded:
            return  # only overload gives waiters a deadline
        for q in self._queues.values():
            while q and now > q[0].deadline:
                waiter = q.popleft()
                self._queued -= 1
                self._expired(waiter, now)

    def _expired(self, waiter: Waiter, now: float) -> None:
        self._pressure(now)
        waiter._resolve(self._reject("expired", waiter.priority, now))

    def _dispatch(self, now: float) -> None:
        lifo = self.policy.lifo_under_overload and (
            self._is_overloaded(now) or self._is_standing(now)
        )
        while self._queued:
            for prio in self._priorities:
                q = self._queues[prio]
                if q:
                    break
            else:  # pragma: no cover - _queued counts exactly the queued waiters
                raise AssertionError("queued count out of sync")
            if self._in_flight >= self.admit_limit(prio, now):
                return  # lower classes have lower admission limits: none can go either
            if not self._overloaded:
                self._note_sojourn(now - self._oldest(now), now)
                if self.policy.lifo_under_overload and self._is_standing(now):
                    lifo = True
                if self._overloaded:  # declared just now: the queue was cut, look again
                    continue
            waiter = q.pop() if lifo else q.popleft()
            self._queued -= 1
            self._in_flight += 1
            waiter._resolve(ConcurrencySlot(now, waiter.priority, self._in_flight))
        self._first_above = None  # the queue emptied: it was not standing

    def _oldest(self, now: float) -> float:
        """Enqueue time of the oldest waiter still queued (``now`` if none).

        CoDel judges the standing queue: with priorities, a high class served at once must
        not hide a low class that has been waiting all along.
        """
        oldest = now
        for q in self._queues.values():
            if q and q[0].enqueued < oldest:
                oldest = q[0].enqueued
        return oldest

    def _lowest_below(self, priority: int, *, same: bool = False) -> Waiter | None:
        """The oldest waiter of the lowest class below ``priority`` (or of ``priority``
        itself when ``same``: under overload the oldest is served last, so a newcomer
        takes its place rather than bouncing off a queue of ageing waiters)."""
        for prio in reversed(self._priorities):
            if prio > priority or (prio == priority and not same):
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
            if self._queued == 0:
                self._first_above = None
