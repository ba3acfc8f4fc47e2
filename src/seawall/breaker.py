"""Per-host circuit breakers that trip on failure *rate*, probe carefully, and never race.

The state machine is sans-IO: a plain object driven by a :class:`~seawall.clock.Clock`
and by outcomes that callers report. The async face (:meth:`CircuitBreaker.call`) and the
sync client faces (requests adapter, sync httpx transport) share it through
:meth:`CircuitBreaker.admit` and :meth:`CircuitBreaker.record`.

Why not plain aiobreaker 1.2.0 (see ``docs/breaker.md`` and ``tests/test_aiobreaker_gaps.py``):
it counts consecutive failures only, lets every concurrent call through in half-open,
re-opens once per concurrent failure (resetting ``opened_at``), closes on one success,
counts excluded exceptions as successes, ignores cancellation, and mixes
``datetime.utcnow()`` with ``datetime.now()``. Its decisions live in its state classes,
so neither a custom storage nor a listener can change them; seawall keeps aiobreaker's
vocabulary and its exception type (:class:`CircuitOpenError` is an
``aiobreaker.CircuitBreakerError``) and owns the decisions.

Atomicity: every check-and-update runs under one ``threading.Lock`` with no ``await``
inside, so it is atomic for coroutines and threads alike. Every admitted call gets a
:class:`Permit` tagged with the state *generation* that admitted it; an outcome from an
older generation is ignored, which is what makes "many concurrent failures open it once"
and "a late success cannot close a re-opened breaker" hold. Events are emitted after the
lock is released, so a listener may read the breaker.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, ParamSpec, TypeVar

from aiobreaker import CircuitBreakerError as _AiobreakerError

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.breaker import BreakerPolicy
from seawall.window import SlidingCounts

__all__ = [
    "BreakerRegistry",
    "BreakerRejected",
    "BreakerState",
    "BreakerStateChanged",
    "CircuitBreaker",
    "CircuitOpenError",
    "Outcome",
    "Permit",
    "classify_exception",
    "classify_status",
]

_log = logging.getLogger("seawall.breaker")

P = ParamSpec("P")
T = TypeVar("T")

_DEFAULT_POLICY = BreakerPolicy()


class BreakerState(enum.Enum):
    """The three classic states."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(enum.Enum):
    """What one call says about the upstream's health."""

    SUCCESS = "success"
    FAILURE = "failure"
    NEUTRAL = "neutral"
    """Says nothing (cancelled, caller gave up): not counted, frees a half-open probe slot."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerStateChanged(Event):
    """A breaker moved from ``old`` to ``new``; ``reason`` says why.

    The breaker's name is in ``breaker`` (``name`` is the event type, as on every Event).
    ``open_for`` is the (jittered) open period when ``new`` is OPEN, else None. The rates
    are those that decided the transition (window rates for a trip from CLOSED).
    """

    name: ClassVar[str] = "breaker.state_changed"
    breaker: str
    old: BreakerState
    new: BreakerState
    generation: int
    failure_rate: float
    slow_rate: float
    reason: str
    open_for: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerRejected(Event):
    """A call was refused without reaching the upstream (open, or probes all in flight)."""

    name: ClassVar[str] = "breaker.rejected"
    breaker: str
    state: BreakerState
    retry_in: float


class CircuitOpenError(SeawallError, _AiobreakerError):  # type: ignore[misc]
    """The breaker for ``name`` refused the call; it will probe again in ``retry_in`` s.

    ``retry_at`` is on the breaker's monotonic clock. It is also an
    ``aiobreaker.CircuitBreakerError`` so code written for aiobreaker keeps catching it;
    its ``reopen_time`` is a naive *local* datetime, as aiobreaker's ``time_remaining``
    compares it with ``datetime.now()``.
    """

    def __init__(
        self,
        name: str,
        retry_at: float,
        retry_in: float,
        *,
        state: BreakerState = BreakerState.OPEN,
        wall: float | None = None,
    ) -> None:
        self.name = name
        self.retry_at = retry_at
        self.retry_in = retry_in
        self.state = state
        if state is BreakerState.HALF_OPEN:
            why = "is half-open with every probe in flight"
        else:
            why = "is open"
        message = (
            f"circuit breaker for {name!r} {why}; the upstream is not called. "
            f"Next probe in {retry_in:.1f}s"
        )
        reopen = datetime.fromtimestamp(wall + retry_in) if wall is not None else None
        _AiobreakerError.__init__(self, message, reopen)
        Exception.__init__(self, message)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_open_error,
            (self.name, self.retry_at, self.retry_in, self.state.value),
        )


def _rebuild_open_error(
    name: str, retry_at: float, retry_in: float, state: str
) -> CircuitOpenError:
    return CircuitOpenError(name, retry_at, retry_in, state=BreakerState(state))


class Permit:
    """An admission ticket; report its outcome once with :meth:`CircuitBreaker.record`.

    Opaque on purpose: it remembers the breaker and the state generation that admitted
    it, so its outcome is ignored once the breaker has moved on. ``probe`` is True for a
    half-open probe; ``admitted_at`` (monotonic) lets a face measure the call duration.
    """

    __slots__ = ("_breaker", "_done", "_generation", "_id", "admitted_at", "probe")

    def __init__(
        self, breaker: CircuitBreaker, generation: int, ident: int, probe: bool, at: float
    ) -> None:
        self._breaker = breaker
        self._generation = generation
        self._id = ident
        self._done = False
        self.probe = probe
        self.admitted_at = at

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def done(self) -> bool:
        """True once an outcome was recorded."""
        return self._done

    def __repr__(self) -> str:
        kind = "probe" if self.probe else "call"
        return f"<Permit {kind} #{self._id} gen={self._generation} of {self._breaker.name!r}>"


class _CountWindow:
    """The last ``size`` outcomes, with running totals (O(1) per call)."""

    __slots__ = ("_calls", "_failures", "_pos", "_ring", "_slow")

    def __init__(self, size: int) -> None:
        self._ring = bytearray(size)  # bit 0 present, bit 1 failed, bit 2 slow
        self._pos = 0
        self._calls = self._failures = self._slow = 0

    def add(self, now: float, failed: bool, slow: bool) -> tuple[int, int, int]:
        old = self._ring[self._pos]
        if old & 1:
            self._calls -= 1
            self._failures -= (old >> 1) & 1
            self._slow -= (old >> 2) & 1
        self._ring[self._pos] = 1 | (2 if failed else 0) | (4 if slow else 0)
        self._pos = (self._pos + 1) % len(self._ring)
        self._calls += 1
        self._failures += failed
        self._slow += slow
        return self._calls, self._failures, self._slow

    def totals(self, now: float) -> tuple[int, int, int]:
        return self._calls, self._failures, self._slow

    def clear(self) -> None:
        self._ring = bytearray(len(self._ring))
        self._pos = 0
        self._calls = self._failures = self._slow = 0


class _TimeWindow(SlidingCounts):
    """Calls, failures and slow calls of the last ``size`` seconds (see seawall.window)."""

    __slots__ = ()

    def __init__(self, size: float, buckets: int) -> None:
        super().__init__(size, buckets, fields=3)

    def add(self, now: float, failed: bool, slow: bool) -> tuple[int, ...]:  # type: ignore[override]
        return super().add(now, 1, failed, slow)


class CircuitBreaker:
    """A circuit breaker for one upstream (usually one host), safe across tasks and threads.

    Use :meth:`call` for coroutines, or :meth:`admit` then :meth:`record` from any face.
    ``rng`` returns floats in ``[0, 1)`` for the open-period jitter (tests pin it).
    """

    def __init__(
        self,
        name: str = "default",
        policy: BreakerPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        rng: Callable[[], float] | None = None,
    ) -> None:
        self._name = name
        self._policy = policy if policy is not None else _DEFAULT_POLICY
        self._clock = clock
        self._bus = events if events is not None else DEFAULT_BUS
        self._rng = rng if rng is not None else random.random
        self._lock = threading.Lock()
        p = self._policy
        self._window: _CountWindow | _TimeWindow = (
            _CountWindow(int(p.window_size))
            if p.window == "count"
            else _TimeWindow(p.window_size, p.time_buckets)
        )
        self._slow_after = math.inf if p.slow_call_duration is None else p.slow_call_duration
        self._minimum_calls = p.minimum_calls
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._trips = 0  # consecutive trips without a close in between
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._probes: dict[int, float] = {}  # outstanding probe id -> admitted at
        self._probe_slots = 0  # probes admitted in this half-open period, minus released
        self._probe_successes = 0
        self._in_flight = 0
        self._next_id = 0
        # Hooks for state shared across processes (seawall.shared_breaker); unused alone.
        self._listeners: tuple[Callable[[CircuitBreaker, BreakerStateChanged], None], ...] = ()
        self._probes_gated = False
        self._probe_quota = self._policy.half_open_probes

    # -- read-only views ------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def policy(self) -> BreakerPolicy:
        return self._policy

    @property
    def state(self) -> BreakerState:
        """The current state; an elapsed open period turns into HALF_OPEN here, lazily."""
        events: list[Event] = []
        with self._lock:
            self._refresh(self._clock.now(), events)
            state = self._state
        self._emit(events)
        return state

    @property
    def generation(self) -> int:
        """Increases on every state change; permits of older generations are ignored."""
        return self._generation

    @property
    def opened_at(self) -> float | None:
        """Monotonic time of the last trip, or None if it never tripped."""
        return self._opened_at

    @property
    def retry_at(self) -> float | None:
        """Monotonic time at which an OPEN breaker will admit probes, else None."""
        with self._lock:
            return self._open_until if self._state is BreakerState.OPEN else None

    @property
    def in_flight(self) -> int:
        """Admitted calls whose outcome is not recorded yet."""
        return self._in_flight

    @property
    def consecutive_trips(self) -> int:
        return self._trips

    def rates(self) -> tuple[int, float, float]:
        """``(calls, failure_rate, slow_rate)`` of the current CLOSED window."""
        with self._lock:
            calls, failures, slow = self._window.totals(self._clock.now())
        if not calls:
            return 0, 0.0, 0.0
        return calls, failures / calls, slow / calls

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self._name!r} {self._state.value} gen={self._generation}>"

    # -- the two primitives -----------------------------------------------------------

    def admit(self) -> Permit:
        """Admit one call or raise :class:`CircuitOpenError`; never blocks, never awaits."""
        events: list[Event] = []
        error: CircuitOpenError | None = None
        with self._lock:
            now = self._clock.now()
            if self._state is not BreakerState.CLOSED:
                self._refresh(now, events)
            state = self._state
            if state is BreakerState.CLOSED:
                self._next_id += 1
                self._in_flight += 1
                permit = Permit(self, self._generation, self._next_id, False, now)
            elif state is BreakerState.HALF_OPEN and self._probe_slots < self._probe_quota:
                permit = self._new_permit(True, now)
                self._probe_slots += 1
                self._probes[permit._id] = now
            else:
                if state is BreakerState.OPEN:
                    retry_at = self._open_until
                else:  # half-open, every probe slot taken: the probes decide soon
                    retry_at = min(
                        now + self._policy.open_duration,
                        min(self._probes.values(), default=now) + self._policy.probe_timeout,
                    )
                retry_in = max(0.0, retry_at - now)
                error = CircuitOpenError(
                    self._name, retry_at, retry_in, state=state, wall=self._clock.wall()
                )
        if events:
            self._emit(events)
        if error is not None:
            if self._bus.active:
                self._bus.emit(
                    BreakerRejected(
                        at=now, breaker=self._name, state=error.state, retry_in=error.retry_in
                    )
                )
            raise error
        return permit

    def record(self, permit: Permit, outcome: Outcome, duration: float) -> None:
        """Report how an admitted call went; ``duration`` in seconds (to response headers).

        Idempotent per permit; an outcome from a generation the breaker has left is
        ignored (it describes the upstream as it was before the last state change).
        """
        if permit._breaker is not self:
            raise ValueError(f"{permit!r} was not issued by {self!r}")
        events: list[Event] = []
        with self._lock:
            if permit._done:
                return
            permit._done = True
            self._in_flight -= 1
            now = self._clock.now()
            if self._state is not BreakerState.CLOSED:
                self._refresh(now, events)
            if permit._generation == self._generation:
                slow = duration >= self._slow_after
                if permit.probe:
                    self._record_probe(permit, outcome, slow, now, events)
                elif outcome is not Outcome.NEUTRAL:
                    calls, failures, slows = self._window.add(now, outcome is Outcome.FAILURE, slow)
                    if calls >= self._minimum_calls and (failures or slows):
                        self._judge(calls, failures, slows, now, events)
        if events:
            self._emit(events)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Admit, await ``fn``, record: exceptions by :func:`classify_exception`.

        Cancellation is NEUTRAL: it frees a half-open probe slot and is re-raised.
        """
        permit = self.admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            outcome = classify_exception(exc, self._policy)
            self.record(permit, outcome, self._clock.now() - permit.admitted_at)
            raise
        self.record(permit, Outcome.SUCCESS, self._clock.now() - permit.admitted_at)
        return result

    # -- internals (called with the lock held) -----------------------------------------

    def _new_permit(self, probe: bool, now: float) -> Permit:
        self._next_id += 1
        self._in_flight += 1
        return Permit(self, self._generation, self._next_id, probe, now)

    def _refresh(self, now: float, events: list[Event]) -> None:
        if self._state is BreakerState.OPEN:
            if now >= self._open_until:
                self._change(BreakerState.HALF_OPEN, now, events, "open_period_elapsed")
        elif self._state is BreakerState.HALF_OPEN and self._probes:
            oldest = min(self._probes.values())
            if now - oldest >= self._policy.probe_timeout:
                self._trip(now, events, "probe_timeout", 1.0, 0.0)

    def _judge(
        self, calls: int, failures: int, slows: int, now: float, events: list[Event]
    ) -> None:
        failure_rate = failures / calls
        slow_rate = slows / calls
        if failure_rate >= self._policy.failure_rate_threshold:
            self._trip(now, events, "failure_rate", failure_rate, slow_rate)
        elif slows and slow_rate >= self._policy.slow_call_rate_threshold:
            self._trip(now, events, "slow_call_rate", failure_rate, slow_rate)

    def _record_probe(
        self, permit: Permit, outcome: Outcome, slow: bool, now: float, events: list[Event]
    ) -> None:
        self._probes.pop(permit._id, None)
        if outcome is Outcome.NEUTRAL:
            self._probe_slots -= 1  # a cancelled probe proved nothing: let another one try
        elif outcome is Outcome.FAILURE:
            self._trip(now, events, "probe_failed", 1.0, 1.0 if slow else 0.0)
        elif slow:
            self._trip(now, events, "probe_slow", 0.0, 1.0)
        else:
            self._probe_successes += 1
            if self._probe_successes >= self._policy.half_open_probes:
                self._change(BreakerState.CLOSED, now, events, "probes_succeeded")

    def _trip(
        self, now: float, events: list[Event], reason: str, failure_rate: float, slow_rate: float
    ) -> None:
        self._trips += 1
        base = self._policy.open_duration_for(self._trips)
        jitter = self._policy.jitter
        open_for = base * (1.0 + jitter * (2.0 * self._rng() - 1.0)) if jitter else base
        self._opened_at = now
        self._open_until = now + open_for
        self._change(
            BreakerState.OPEN, now, events, reason, failure_rate, slow_rate, open_for=open_for
        )

    def _change(
        self,
        new: BreakerState,
        now: float,
        events: list[Event],
        reason: str,
        failure_rate: float = 0.0,
        slow_rate: float = 0.0,
        *,
        open_for: float | None = None,
    ) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        self._probes.clear()
        self._probe_slots = 0
        self._probe_successes = 0
        if new is BreakerState.CLOSED:
            self._trips = 0
        if new is not BreakerState.HALF_OPEN:
            self._window.clear()  # a new CLOSED period starts from a clean slate
        self._probe_quota = 0 if self._probes_gated else self._policy.half_open_probes
        if self._bus.active or self._listeners:
            events.append(
                BreakerStateChanged(
                    at=now,
                    breaker=self._name,
                    old=old,
                    new=new,
                    generation=self._generation,
                    failure_rate=failure_rate,
                    slow_rate=slow_rate,
                    reason=reason,
                    open_for=open_for,
                )
            )

    def _emit(self, events: list[Event]) -> None:
        bus_active = self._bus.active
        for event in events:
            if bus_active:
                self._bus.emit(event)
            if self._listeners and isinstance(event, BreakerStateChanged):
                for listener in self._listeners:
                    try:
                        listener(self, event)
                    except Exception:
                        _log.exception("breaker listener %r failed", listener)

    # -- hooks for shared state (seawall.shared_breaker) --------------------------------

    def add_listener(self, listener: Callable[[CircuitBreaker, BreakerStateChanged], None]) -> None:
        """Call ``listener(breaker, event)`` on every state change, after the lock is released.

        It runs on the thread that caused the change: it must only hand the event on.
        """
        self._listeners = (*self._listeners, listener)

    def gate_probes(self, gated: bool = True) -> None:
        """Gated: a HALF_OPEN breaker admits no probe until :meth:`grant_probes` (the
        probes are shared with other processes, and another one may be probing)."""
        with self._lock:
            self._probes_gated = gated
            if not gated:
                self._probe_quota = self._policy.half_open_probes

    def grant_probes(self, generation: int, probes: int) -> bool:
        """Let this HALF_OPEN period (``generation``) admit up to ``probes`` probes."""
        with self._lock:
            if generation != self._generation or self._state is not BreakerState.HALF_OPEN:
                return False
            self._probe_quota = max(0, min(probes, self._policy.half_open_probes))
            return True

    def apply_remote(self, state: BreakerState, open_for: float = 0.0) -> bool:
        """Take a state another process decided: OPEN for ``open_for`` s, or CLOSED.

        Emits ``BreakerStateChanged`` with reason ``remote_open`` / ``remote_close`` (a
        listener that shares state must not share these back). Returns False when it
        changed nothing (already there, or an OPEN that ends later than asked).
        """
        events: list[Event] = []
        with self._lock:
            now = self._clock.now()
            self._refresh(now, events)
            if state is BreakerState.OPEN:
                until = now + open_for
                if self._state is BreakerState.OPEN and self._open_until >= until - 0.05:
                    changed = False
                else:
                    self._trips = max(self._trips, 1)
                    self._opened_at = now
                    self._open_until = until
                    if self._state is BreakerState.OPEN:
                        changed = False  # same state, later end: no event
                    else:
                        self._change(
                            BreakerState.OPEN, now, events, "remote_open", open_for=open_for
                        )
                        changed = True
            elif state is BreakerState.CLOSED and self._state is not BreakerState.CLOSED:
                self._change(BreakerState.CLOSED, now, events, "remote_close")
                changed = True
            else:
                changed = False
        if events:
            self._emit(events)
        return changed

    def _evictable(self) -> int:
        """0: closed and idle; 1: idle; 2: calls in flight (for the registry's LRU)."""
        with self._lock:
            if self._in_flight:
                return 2
            return 0 if self._state is BreakerState.CLOSED else 1


def classify_status(status: int, policy: BreakerPolicy | None = None) -> Outcome:
    """What an HTTP status says about the upstream's health.

    5xx are failures except 501 (a permanent "not implemented", not overload); 429 is a
    failure only when ``policy.count_429_as_failure``; every other status (2xx, 3xx,
    other 4xx) is a *success of the upstream*: it answered, correctly, on time.
    """
    if 500 <= status <= 599:
        return Outcome.SUCCESS if status == 501 else Outcome.FAILURE
    if status == 429:
        p = policy if policy is not None else _DEFAULT_POLICY
        return Outcome.FAILURE if p.count_429_as_failure else Outcome.SUCCESS
    return Outcome.SUCCESS


def classify_exception(exc: BaseException, policy: BreakerPolicy | None = None) -> Outcome:
    """What an exception raised by a guarded call says about the upstream.

    * ``asyncio.CancelledError`` (the caller gave up, or a caller-side timeout) and other
      non-``Exception`` exits (KeyboardInterrupt, SystemExit, GeneratorExit): NEUTRAL.
    * :class:`CircuitOpenError` from a nested breaker: NEUTRAL (nothing reached upstream).
    * An exception that carries an HTTP status (:func:`status_of_exception`: an SDK's
      own error, ``httpx.HTTPStatusError``, ``requests.HTTPError``): the status decides,
      by :func:`classify_status`.
    * Everything else is a FAILURE: timeouts, connection errors (``httpx.TransportError``,
      ``OSError``, ``TimeoutError``, ``requests.ConnectionError``/``Timeout``) and, on
      purpose, unknown exceptions: an SDK's own error types usually wrap a failed fetch,
      and a breaker that treats what it cannot read as health would never protect the
      upstream (aiobreaker does the same, minus its excluded exceptions).
    """
    if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
        return Outcome.NEUTRAL
    if isinstance(exc, CircuitOpenError):
        return Outcome.NEUTRAL
    status = status_of_exception(exc)
    if status is not None:
        return classify_status(status, policy)
    return Outcome.FAILURE


def status_of_exception(exc: BaseException) -> int | None:
    """The HTTP status an exception carries: its own ``status_code`` / ``status`` (an
    SDK's error) or its ``response``'s (``httpx.HTTPStatusError``, ``requests.HTTPError``)."""
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


class BreakerRegistry:
    """One breaker per upstream host, shared by every face; bounded in size.

    When full, the least recently used breaker that is CLOSED with nothing in flight is
    evicted first (it holds the least information), then the least recently used idle
    one, then the least recently used. A face that still holds an evicted breaker keeps
    using it safely; it is just no longer shared.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        max_breakers: int = 10_000,
        rng: Callable[[], float] | None = None,
    ) -> None:
        if isinstance(max_breakers, bool) or not isinstance(max_breakers, int) or max_breakers < 1:
            raise ValueError(f"max_breakers must be a whole number of at least 1: {max_breakers!r}")
        self._policy = policy if policy is not None else _DEFAULT_POLICY
        self._clock = clock
        self._events = events
        self._rng = rng
        self._max = max_breakers
        self._lock = threading.Lock()
        self._breakers: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._listeners: tuple[Callable[[CircuitBreaker, BreakerStateChanged], None], ...] = ()
        self._probes_gated = False

    @property
    def policy(self) -> BreakerPolicy:
        return self._policy

    def get(self, name: str) -> CircuitBreaker:
        """The breaker for ``name`` (a host, ``host:port``), created on first use."""
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is not None:
                self._breakers.move_to_end(name)
                return breaker
            if len(self._breakers) >= self._max:
                self._evict_one()
            breaker = CircuitBreaker(
                name, self._policy, clock=self._clock, events=self._events, rng=self._rng
            )
            for listener in self._listeners:
                breaker.add_listener(listener)
            if self._probes_gated:
                breaker.gate_probes(True)
            self._breakers[name] = breaker
            return breaker

    def peek(self, name: str) -> CircuitBreaker | None:
        """The breaker for ``name`` if there is one (creates nothing, keeps the LRU order)."""
        with self._lock:
            return self._breakers.get(name)

    def add_listener(self, listener: Callable[[CircuitBreaker, BreakerStateChanged], None]) -> None:
        """:meth:`CircuitBreaker.add_listener` on every breaker, now and later."""
        with self._lock:
            self._listeners = (*self._listeners, listener)
            breakers = list(self._breakers.values())
        for breaker in breakers:
            breaker.add_listener(listener)

    def gate_probes(self, gated: bool = True) -> None:
        """:meth:`CircuitBreaker.gate_probes` on every breaker, now and later."""
        with self._lock:
            self._probes_gated = gated
            breakers = list(self._breakers.values())
        for breaker in breakers:
            breaker.gate_probes(gated)

    def _evict_one(self) -> None:
        best: str | None = None
        best_rank = 3
        for key, breaker in self._breakers.items():  # oldest first
            rank = breaker._evictable()
            if rank < best_rank:
                best, best_rank = key, rank
                if rank == 0:
                    break
        if best is not None:
            del self._breakers[best]

    def __len__(self) -> int:
        return len(self._breakers)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def snapshot(self) -> dict[str, BreakerState]:
        """Each known breaker's state (for status pages and tests)."""
        with self._lock:
            breakers = list(self._breakers.values())
        return {b.name: b.state for b in breakers}
