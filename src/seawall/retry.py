"""Budgeted, deadline-bound retries: sans-IO pieces shared by every client face.

The client core (:mod:`seawall.client.core`) runs the first attempt itself (the fast
path) and only on a retryable failure builds :class:`Retries`: tenacity's ``Retrying``
with the strategies below, asked what to do next one outcome at a time, while the waiting
and the attempts stay with the driver of each face, async or sync. Time comes from the
injected :class:`~seawall.clock.Clock` (tenacity's own ``stop_after_delay`` reads
``time.monotonic``, so the deadline stop here reads our clock instead).

What bounds retry amplification is :class:`RetryBudget`: per upstream host, retries may add
at most ``ratio`` x first attempts over a sliding window (or a small minimum rate, so a
quiet client can still retry once in a while). When it is spent the call fails at once with
the upstream's own last answer.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import tenacity
from tenacity import DoSleep, RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.lru import BoundedMap
from seawall.policy.retry import RetryPolicy
from seawall.window import SlidingCounts

__all__ = [
    "FINAL",
    "MAX_RETRY_AFTER",
    "Retries",
    "RetriesExhausted",
    "RetryAfterHonoured",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryScheduled",
    "StopAtDeadline",
    "StopWhenBudgetSpent",
    "Verdict",
    "WaitRetryAfterOrBackoff",
    "full_jitter_backoff",
    "parse_retry_after",
    "retry_if_retryable",
]

T = TypeVar("T")

MAX_RETRY_AFTER = 86_400.0
"""Longest Retry-After we believe (one day); larger values are clamped to it."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryScheduled(Event):
    """A retry will be sent after ``wait`` seconds (``attempt`` is the one that failed)."""

    name: ClassVar[str] = "retry.scheduled"
    host: str
    attempt: int
    wait: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryAfterHonoured(Event):
    """The server's Retry-After made the wait longer than our own backoff."""

    name: ClassVar[str] = "retry.retry_after_honoured"
    host: str
    retry_after: float
    wait: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryBudgetExhausted(Event):
    """A retry was refused because the host's retry budget is spent; the call fails now."""

    name: ClassVar[str] = "retry.budget_exhausted"
    host: str
    attempt: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RetriesExhausted(Event):
    """A call gave up: ``why`` is ``attempts``, ``deadline`` or ``budget``."""

    name: ClassVar[str] = "retry.exhausted"
    host: str
    attempts: int
    why: str
    reason: str


# --------------------------------------------------------------------------- Retry-After

_DELTA = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | bytes | None, now_wall: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when it is absent or malformed.

    Accepts delta-seconds (and, leniently, a decimal or negative number) and an HTTP-date
    (compared with ``now_wall``, Unix seconds). Never raises: a server bug must not turn a
    503 into a crash. A value longer than 64 characters is ignored unparsed. The result is
    clamped to ``[0, MAX_RETRY_AFTER]``.
    """
    try:
        if value is None:
            return None
        if isinstance(value, bytes | bytearray):
            value = bytes(value).decode("latin-1")
        if not isinstance(value, str):
            return None
        text = value.strip()
        if not text or len(text) > 64:
            return None
        if _DELTA.fullmatch(text):
            seconds = float(text)
        else:
            when = email.utils.parsedate_to_datetime(text)
            if when.tzinfo is None:  # RFC 9110 dates are GMT; obsolete forms may lack a zone
                from datetime import UTC

                when = when.replace(tzinfo=UTC)
            seconds = when.timestamp() - float(now_wall)
        if not math.isfinite(seconds):
            return None
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)
    except Exception:
        return None


# --------------------------------------------------------------------------- backoff


def full_jitter_backoff(
    retry_number: int, base: float, cap: float, rng: Callable[[], float] = random.random
) -> float:
    """Wait before retry number ``retry_number`` (1 = first retry): uniform in [0, ceiling].

    Full jitter (AWS architecture blog, "Exponential Backoff and Jitter") spreads clients
    that failed together, which equal or "decorrelated" waits do less well.
    """
    exponent = min(max(retry_number - 1, 0), 62)
    ceiling = min(cap, base * (2.0**exponent))
    return ceiling * rng()


# --------------------------------------------------------------------------- budget


class RetryBudget:
    """Per-host allowance of retries: ``max(ratio x first attempts, min_rate x window)``.

    A token-bucket-free sliding window (``buckets`` slices of ``window`` seconds). The
    larger-of rule (not a sum) keeps the amplification bound exact, ``1 + ratio``, as soon
    as a host sees more than ``min_rate / ratio`` first attempts per second, while a quiet
    client still gets ``min_rate x window`` retries per window. Thread-safe (one lock, held
    for a few dictionary operations); at most ``max_hosts`` hosts are tracked (least
    recently used forgotten), so a crawler of many hosts cannot grow it without bound.
    """

    __slots__ = ("_buckets", "_clock", "_hosts", "_lock", "_min", "_ratio", "window")

    def __init__(
        self,
        ratio: float = 0.1,
        min_retries_per_second: float = 0.5,
        window: float = 10.0,
        *,
        clock: Clock = SYSTEM_CLOCK,
        buckets: int = 10,
        max_hosts: int = 1024,
    ) -> None:
        if not (0 <= ratio <= 1) or min_retries_per_second < 0 or window <= 0 or buckets < 1:
            raise ValueError("ratio in [0, 1], min rate >= 0, window > 0, buckets >= 1")
        self._ratio = float(ratio)
        self._min = float(min_retries_per_second) * float(window)
        self.window = float(window)
        self._buckets = int(buckets)
        self._clock = clock
        # per host: first attempts (field 0) and retries (field 1) over the window
        self._hosts: BoundedMap[str, SlidingCounts] = BoundedMap(
            lambda _host: SlidingCounts(self.window, self._buckets, fields=2), max_hosts
        )
        self._lock = threading.Lock()

    @classmethod
    def from_policy(
        cls, policy: RetryPolicy, *, clock: Clock = SYSTEM_CLOCK, max_hosts: int = 1024
    ) -> RetryBudget:
        return cls(
            policy.budget_ratio,
            policy.budget_min_retries_per_second,
            policy.budget_window,
            clock=clock,
            max_hosts=max_hosts,
        )

    def record_attempt(self, host: str) -> None:
        """Count one first attempt (every logical call counts once)."""
        counts = self._hosts.get(host)
        with self._lock:
            counts.add(self._clock.now(), 1, 0)

    def try_spend(self, host: str) -> bool:
        """Take one retry from the host's allowance; False (and nothing taken) when spent."""
        counts = self._hosts.get(host)
        with self._lock:
            now = self._clock.now()
            firsts, retries = counts.totals(now)
            if retries + 1 > max(self._ratio * firsts, self._min):
                return False
            counts.add(now, 0, 1)
            return True

    def available(self, host: str) -> float:
        """Retries the host could still take now (for tests and dashboards)."""
        counts = self._hosts.get(host)
        with self._lock:
            firsts, retries = counts.totals(self._clock.now())
        return max(0.0, max(self._ratio * firsts, self._min) - retries)

    def __len__(self) -> int:
        return len(self._hosts)


# --------------------------------------------------------------------------- tenacity strategies


@dataclass(frozen=True, slots=True)
class Verdict:
    """How a face judges one attempt's outcome: retry it or not, and why."""

    retryable: bool
    reason: str = ""
    retry_after: float | None = None


FINAL = Verdict(False)


class Retries(Generic[T]):
    """The retries of one logical call, decided by tenacity and driven from outside.

    Sans-IO: a face makes the first attempt itself (the fast path never builds any of
    this) and, when it failed in a retryable way, feeds each outcome to
    :meth:`after_result` / :meth:`after_exception`. They answer how long to wait before
    the next attempt, or that the call is over (None, or the exception raised again).
    tenacity's ``Retrying.iter`` takes the decision with seawall's stop, wait and retry
    strategies below; the waiting and the next attempt are the driver's, in its colour.
    ``judge_result`` and ``judge_exception`` are the face's classification.
    """

    __slots__ = (
        "_retrying",
        "_state",
        "budget",
        "bus",
        "clock",
        "deadline_at",
        "honoured",
        "host",
        "judge_exception",
        "judge_result",
        "last",
        "policy",
        "rng",
        "stopped_by",
    )

    def __init__(
        self,
        *,
        host: str,
        policy: RetryPolicy,
        deadline_at: float,
        budget: RetryBudget | None,
        judge_result: Callable[[T], Verdict],
        judge_exception: Callable[[BaseException], Verdict],
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.host = host
        self.policy = policy
        self.deadline_at = deadline_at
        self.budget = budget
        self.judge_result = judge_result
        self.judge_exception = judge_exception
        self.clock = clock
        self.bus = events if events is not None else DEFAULT_BUS
        self.rng = rng
        self.last: Verdict = FINAL
        self.stopped_by = ""
        self.honoured: float | None = None
        self._retrying: tenacity.Retrying | None = None
        self._state: RetryCallState | None = None

    def judge(self, rs: RetryCallState) -> Verdict:
        outcome = rs.outcome
        if outcome is None:
            return FINAL
        if outcome.failed:
            exc = outcome.exception()
            # Cancellation (and KeyboardInterrupt, SystemExit) is never retried.
            if exc is None or not isinstance(exc, Exception):
                return FINAL
            return self.judge_exception(exc)
        return self.judge_result(outcome.result())

    # ---- the strategies (tenacity objects, composable with | and &)

    def retry_strategy(self) -> retry_base:
        return _RetryIfRetryable(self)

    def stop_strategy(self) -> stop_base:
        return _StopAfterAttempts(self) | StopAtDeadline(self) | StopWhenBudgetSpent(self)

    def wait_strategy(self) -> wait_base:
        return WaitRetryAfterOrBackoff(self)

    def _before_sleep(self, rs: RetryCallState) -> None:
        if self.bus.active:
            if self.honoured is not None:  # emitted only once the retry is really scheduled
                self.bus.emit(
                    RetryAfterHonoured(
                        at=self.clock.now(),
                        host=self.host,
                        retry_after=self.honoured,
                        wait=rs.upcoming_sleep,
                    )
                )
            self.bus.emit(
                RetryScheduled(
                    at=self.clock.now(),
                    host=self.host,
                    attempt=rs.attempt_number,
                    wait=rs.upcoming_sleep,
                    reason=self.last.reason,
                )
            )

    def _give_up(self, rs: RetryCallState) -> Any:
        if self.bus.active:
            self.bus.emit(
                RetriesExhausted(
                    at=self.clock.now(),
                    host=self.host,
                    attempts=rs.attempt_number,
                    why=self.stopped_by or "attempts",
                    reason=self.last.reason,
                )
            )
        assert rs.outcome is not None
        return rs.outcome.result()  # the upstream's own last answer or error

    # ---- driving

    def after_result(self, result: T) -> float | None:
        """Seconds to wait before the next attempt, or None: ``result`` is the answer."""
        return self._after(result, None)

    def after_exception(self, exc: BaseException) -> float:
        """Seconds to wait before the next attempt; raises ``exc`` when the call is over."""
        wait = self._after(None, exc)
        assert wait is not None  # tenacity re-raises a failed outcome it will not retry
        return wait

    def _after(self, result: T | None, exc: BaseException | None) -> float | None:
        state = self._state
        if state is None:
            if not self._may_start(result, exc):
                if exc is not None:
                    raise exc
                return None
            self._retrying = tenacity.Retrying(
                stop=self.stop_strategy(),
                wait=self.wait_strategy(),
                retry=self.retry_strategy(),
                before_sleep=self._before_sleep,
                retry_error_callback=self._give_up,
            )
            self._retrying.begin()
            state = self._state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        assert self._retrying is not None
        if exc is not None:
            state.set_exception((type(exc), exc, exc.__traceback__))
        else:
            state.set_result(result)
        action = self._retrying.iter(state)  # may raise the failed outcome: the call is over
        if isinstance(action, DoSleep):
            state.prepare_for_next_attempt()
            return float(action)
        return None

    def _may_start(self, result: T | None, exc: BaseException | None) -> bool:
        """Skip building tenacity when no retry is possible (one attempt, or an empty
        budget: the common case in an outage, where CPU matters too)."""
        why = ""
        if self.policy.attempts <= 1:
            why = "attempts"
        elif self.budget is not None and self.budget.available(self.host) < 1:
            why = "budget"
        if not why:
            return True
        self.stopped_by = why
        if self.bus.active:
            self.last = (
                self.judge_exception(exc) if exc is not None else self.judge_result(result)  # type: ignore[arg-type]
            )
            now = self.clock.now()
            if why == "budget":
                self.bus.emit(
                    RetryBudgetExhausted(at=now, host=self.host, attempt=1, reason=self.last.reason)
                )
            self.bus.emit(
                RetriesExhausted(
                    at=now, host=self.host, attempts=1, why=why, reason=self.last.reason
                )
            )
        return False


class _RetryIfRetryable(retry_base):
    """Retry when the face judges the outcome retryable; never on cancellation."""

    def __init__(self, call: Retries[Any]) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> bool:
        verdict = self.call.judge(retry_state)
        self.call.last = verdict
        return verdict.retryable


def retry_if_retryable(call: Retries[Any]) -> retry_base:
    """The retry predicate of ``call`` as a tenacity object (composable with ``&``)."""
    return _RetryIfRetryable(call)


class _StopAfterAttempts(stop_base):
    def __init__(self, call: Retries[Any]) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> bool:
        if retry_state.attempt_number >= self.call.policy.attempts:
            self.call.stopped_by = "attempts"
            return True
        return False


class StopAtDeadline(stop_base):
    """Stop when the next attempt could not start before the call's deadline (our clock)."""

    def __init__(self, call: Retries[Any]) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> bool:
        c = self.call
        if c.clock.now() + retry_state.upcoming_sleep >= c.deadline_at:
            c.stopped_by = "deadline"
            return True
        return False


class StopWhenBudgetSpent(stop_base):
    """Spend one retry from the host's budget, or stop. Listed last in the stop so a retry
    that another stop would refuse does not spend budget."""

    def __init__(self, call: Retries[Any]) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> bool:
        c = self.call
        if c.budget is None or c.budget.try_spend(c.host):
            return False
        c.stopped_by = "budget"
        if c.bus.active:
            c.bus.emit(
                RetryBudgetExhausted(
                    at=c.clock.now(),
                    host=c.host,
                    attempt=retry_state.attempt_number,
                    reason=c.last.reason,
                )
            )
        return True


class WaitRetryAfterOrBackoff(wait_base):
    """``max(Retry-After, full-jitter backoff)``, capped by the time left to the deadline."""

    def __init__(self, call: Retries[Any]) -> None:
        self.call = call

    def __call__(self, retry_state: RetryCallState) -> float:
        c = self.call
        p = c.policy
        backoff = full_jitter_backoff(
            retry_state.attempt_number, p.backoff_base, p.backoff_cap, c.rng
        )
        wait = backoff
        retry_after = c.last.retry_after if p.honor_retry_after else None
        if retry_after is not None and retry_after > backoff:
            wait = retry_after
        remaining = max(0.0, c.deadline_at - c.clock.now())
        wait = min(wait, remaining)
        c.honoured = retry_after if retry_after is not None and wait == retry_after else None
        return wait
