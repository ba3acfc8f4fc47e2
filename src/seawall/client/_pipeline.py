"""The client decision logic, once, for every face (httpx async/sync, requests, call).

A face turns its own request/response types into a few facts (method, host, headers,
status) and asks :class:`ClientCore` what to do: may this method be retried, is this
outcome retryable, which breaker / budget / pacer / bulkhead belongs to this host. The
faces are then thin loops: fast path first attempt, then :class:`~seawall.retry.RetryCall`.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from seawall.breaker import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
    classify_exception,
    classify_status,
)
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import SeawallError
from seawall.events import DEFAULT_BUS, EventBus
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.retry import ClientPolicy
from seawall.retry import FINAL, RetryBudget, RetryCall, Verdict, parse_retry_after

__all__ = [
    "Admission",
    "BulkheadTimeout",
    "ClientCore",
    "CoreAccess",
    "FaceHooks",
    "HostPacer",
    "RateLimitWaitTooLong",
    "is_immutable_url",
]

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")  # what an attempt returns
Q = TypeVar("Q")  # what a face sends (httpx.Request, PreparedRequest, None for a callable)

_DIGEST = re.compile(r"sha256(?::|%3[aA]|/|=|-)[0-9a-fA-F]{64}")


_DIGEST_BYTES = re.compile(_DIGEST.pattern.encode())


def is_immutable_url(url: str | bytes) -> bool:
    """True when the URL names content by its sha256 digest (an OCI blob, a pinned file)."""
    if isinstance(url, bytes):
        return b"sha256" in url and _DIGEST_BYTES.search(url) is not None
    return "sha256" in url and _DIGEST.search(url) is not None


class RateLimitWaitTooLong(SeawallError):
    """The client-side rate limit would delay this call past its deadline."""

    def __init__(self, host: str, wait: float) -> None:
        self.host = host
        self.wait = wait
        super().__init__(
            f"client rate limit for {host} needs a wait of {wait:.3f}s, past the deadline"
        )


class BulkheadTimeout(SeawallError):
    """No concurrency slot for the host freed up within the time left (a local condition)."""

    def __init__(self, host: str, waited: float | None) -> None:
        self.host = host
        self.waited = waited
        super().__init__(f"no free slot for {host} (max_concurrency) within {waited}s")


class HostPacer:
    """GCRA (a token bucket kept as one timestamp) on our clock: a client-side rate limit.

    The rate string is parsed by ``limits`` (``"50/second"``, ``"1000 per minute"``); the
    limiting itself is local because ``limits``' memory storage reads the wall clock and a
    client should *wait* for its slot rather than be refused.
    """

    __slots__ = ("_clock", "_interval", "_lock", "_tat", "_tolerance")

    def __init__(self, rate: str, clock: Clock = SYSTEM_CLOCK) -> None:
        from limits import parse

        item = parse(rate)
        self._interval = item.get_expiry() / item.amount
        self._tolerance = item.get_expiry() - self._interval  # a full window's burst
        self._tat = -float("inf")
        self._clock = clock
        self._lock = threading.Lock()

    def reserve(self, max_wait: float) -> float:
        """Seconds to wait before sending; reserves the slot only if that is <= ``max_wait``."""
        with self._lock:
            now = self._clock.now()
            tat = max(self._tat, now)
            wait = max(0.0, tat - self._tolerance - now)
            if wait > max_wait:
                return -wait
            self._tat = tat + self._interval
            return wait


class _LRU(Generic[K, V]):
    """A bounded map of per-host state; the least recently used host is forgotten."""

    __slots__ = ("_data", "_factory", "_lock", "_max")

    def __init__(self, factory: Callable[[K], V], max_size: int) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._factory = factory
        self._max = max_size
        self._lock = threading.Lock()

    def get(self, key: K) -> V:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                value = self._data[key] = self._factory(key)
                if len(self._data) > self._max:
                    self._data.popitem(last=False)
            else:
                self._data.move_to_end(key)
            return value


class ClientCore:
    """Shared per-client state and decisions. One per transport / adapter / wrapper."""

    __slots__ = (
        "_async_slots",
        "_pacers",
        "_sync_slots",
        "breakers",
        "budget",
        "bus",
        "clock",
        "limited",
        "policy",
    )

    def __init__(
        self,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        breakers: BreakerRegistry | None = None,
        budgets: RetryBudget | None = None,
    ) -> None:
        self.policy = policy if policy is not None else ClientPolicy()
        self.clock = clock
        self.bus = events if events is not None else DEFAULT_BUS
        p = self.policy
        if breakers is None and p.breaker is not None:
            breakers = BreakerRegistry(p.breaker, clock=clock, events=self.bus)
        self.breakers = breakers if p.breaker is not None else None
        self.budget = (
            budgets
            if budgets is not None
            else RetryBudget.from_policy(p.retry, clock=clock, max_hosts=p.max_hosts)
        )
        rate = p.rate_limit
        self._pacers: _LRU[str, HostPacer] | None = (
            _LRU(lambda _h: HostPacer(rate, clock), p.max_hosts) if rate is not None else None
        )
        cap = p.max_concurrency
        self._async_slots: _LRU[str, asyncio.Semaphore] | None = None
        self._sync_slots: _LRU[str, threading.BoundedSemaphore] | None = None
        if cap is not None:
            self._async_slots = _LRU(lambda _h: asyncio.Semaphore(cap), p.max_hosts)
            self._sync_slots = _LRU(lambda _h: threading.BoundedSemaphore(cap), p.max_hosts)
        # With neither a rate limit nor a bulkhead an attempt never waits to start: a hot
        # path may then skip :meth:`Admission.wait` (and its coroutine) for the timeout alone.
        self.limited = rate is not None or cap is not None

    # ---- per call

    def start(self, host: str) -> float:
        """Count a logical call's first attempt; returns its deadline on our clock."""
        self.budget.record_attempt(host)
        return self.clock.now() + self.policy.retry.deadline

    def may_retry(self, method: str, headers: Mapping[str, str] | None) -> bool:
        """Safe methods, or any method when opted in or carrying an idempotency key."""
        r = self.policy.retry
        if method.upper() in r.retry_methods or r.retry_unsafe:
            return True
        return headers is not None and bool(headers.get(r.idempotency_header))

    def judge_response(self, status: int, headers: Mapping[str, str]) -> Verdict:
        """:meth:`judge_status` for an HTTP response; the common, final case reads no header."""
        if status not in self.policy.retry.retry_statuses:
            return FINAL
        return self.judge_status(status, headers.get("retry-after"))

    def judge_status(self, status: int, retry_after: str | bytes | None) -> Verdict:
        """Retryable statuses (429, 502, 503, 504 by default) with any Retry-After."""
        r = self.policy.retry
        if status not in r.retry_statuses:
            return FINAL
        after = parse_retry_after(retry_after, self.clock.wall()) if retry_after else None
        return Verdict(True, f"status {status}", after)

    def retry_call(
        self,
        host: str,
        deadline_at: float,
        judge_result: Callable[[R], Verdict],
        judge_exception: Callable[[BaseException], Verdict],
    ) -> RetryCall[R]:
        """The retries of one logical call (entered only after a retryable first attempt),
        with this client's policy, budget, clock and event bus; the face judges outcomes."""
        return RetryCall(
            host=host,
            policy=self.policy.retry,
            deadline_at=deadline_at,
            budget=self.budget,
            judge_result=judge_result,
            judge_exception=judge_exception,
            clock=self.clock,
            events=self.bus,
        )

    def attempt_timeout(self, deadline_at: float) -> float | None:
        """The per-attempt timeout: the policy's, never beyond the call's deadline."""
        # max()/min() spelled out: this runs on every attempt and the builtins cost more.
        remaining = deadline_at - self.clock.now()
        if not remaining > 0.0:
            remaining = 0.0
        t = self.policy.attempt_timeout
        return remaining if t is None or remaining < t else t

    # ---- per host mechanisms

    def breaker(self, host: str) -> CircuitBreaker | None:
        return self.breakers.get(host) if self.breakers is not None else None

    def breaker_outcome_exception(self, exc: BaseException) -> Outcome:
        """Follow the user's breaker policy (e.g. a 429 carried by an exception)."""
        return classify_exception(exc, self.policy.breaker)

    def pace(self, host: str, deadline_at: float) -> float:
        """Seconds to wait for the host's rate limit (0 without one); raises past the deadline."""
        if self._pacers is None:
            return 0.0
        max_wait = max(0.0, deadline_at - self.clock.now())
        wait = self._pacers.get(host).reserve(max_wait)
        if wait < 0:
            raise RateLimitWaitTooLong(host, -wait)
        return wait

    def async_slot(self, host: str) -> asyncio.Semaphore | None:
        return self._async_slots.get(host) if self._async_slots is not None else None

    def sync_slot(self, host: str) -> threading.BoundedSemaphore | None:
        return self._sync_slots.get(host) if self._sync_slots is not None else None


class CoreAccess:
    """What every face shows of its :class:`ClientCore`: the state another face (or a
    :func:`~seawall.client.call.resilient` call) can share by being given it."""

    __slots__ = ()
    _core: ClientCore

    @property
    def breakers(self) -> BreakerRegistry | None:
        return self._core.breakers

    @property
    def budgets(self) -> RetryBudget:
        return self._core.budget


@dataclass(frozen=True, slots=True)
class FaceHooks(Generic[Q]):
    """What a face tells :class:`Admission` (one constant per face, not built per call).

    ``on_open`` wraps the breaker's :class:`~seawall.breaker.CircuitOpenError` in the
    face's error type (None: raised as is); ``on_no_slot`` builds the error for a full
    bulkhead (None: :class:`BulkheadTimeout`); ``outcome_of`` says what an exception means
    to the breaker (None: a rate-limit wait or a slot never obtained is NEUTRAL, the rest
    follows the breaker policy).
    """

    on_open: Callable[[CircuitOpenError, Q], BaseException] | None = None
    on_no_slot: Callable[[str, float | None, Q], BaseException] | None = None
    outcome_of: Callable[[ClientCore, BaseException], Outcome] | None = None


_NO_HOOKS: FaceHooks[Any] = FaceHooks()  # every error as it is, the default judgement


class Admission(Generic[Q]):
    """One attempt's passage through breaker -> rate limit -> bulkhead, the same for every
    face, so that what counts against the breaker and when a slot is freed cannot drift
    apart between them. Constructing it starts the attempt: the host's breaker lets it
    through (or raises, see :class:`FaceHooks`) and its clock starts. Use::

        with Admission(core, host, deadline_at, request, HOOKS) as admission:
            timeout = admission.wait_sync()  # or: await admission.wait()
            response = send(request, timeout)
            admission.succeeded(response.status_code)

    Leaving the block with an exception records it with the breaker; leaving it at all
    frees the slot unless :meth:`streaming` handed it over (to a response body).
    """

    __slots__ = (
        "_breaker",
        "_core",
        "_deadline_at",
        "_hooks",
        "_host",
        "_permit",
        "_release",
        "_slot",
        "_started",
        "_subject",
    )

    def __init__(
        self,
        core: ClientCore,
        host: str,
        deadline_at: float,
        subject: Q,
        hooks: FaceHooks[Q] = _NO_HOOKS,
    ) -> None:
        breakers = core.breakers  # inline core.breaker(host): this is every attempt's path
        breaker = breakers.get(host) if breakers is not None else None
        permit = None
        if breaker is not None:
            try:
                permit = breaker.admit()
            except CircuitOpenError as exc:
                if hooks.on_open is None:
                    raise
                raise hooks.on_open(exc, subject) from exc
        self._core = core
        self._host = host
        self._deadline_at = deadline_at
        self._subject = subject
        self._hooks = hooks
        self._breaker = breaker
        self._permit = permit
        self._slot = False  # the host has a bulkhead (known once waited)
        self._release: Callable[[], None] | None = None  # set while we hold a slot
        self._started = core.clock.now()

    def __enter__(self) -> Admission[Q]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and self._permit is not None:
            self._record(self._failure_outcome(exc))
        release = self._release
        if release is not None:
            self._release = None
            release()

    def wait_sync(self) -> float | None:
        """Pace (sleeping on the clock) and take a bulkhead slot; returns the attempt timeout."""
        core = self._core
        slot = core.sync_slot(self._host)
        self._slot = slot is not None
        wait = core.pace(self._host, self._deadline_at)
        if wait > 0:
            core.clock.sleep_sync(wait)
        timeout = core.attempt_timeout(self._deadline_at)
        if slot is not None:
            if not slot.acquire(timeout=timeout):
                raise self._no_slot(timeout)
            self._release = slot.release
        return timeout

    async def wait(self) -> float | None:
        """The async :meth:`wait_sync`: nothing blocks the event loop."""
        core = self._core
        slot = core.async_slot(self._host)
        self._slot = slot is not None
        wait = core.pace(self._host, self._deadline_at)
        if wait > 0:
            await core.clock.sleep(wait)
        timeout = core.attempt_timeout(self._deadline_at)
        if slot is not None:
            try:
                async with asyncio.timeout(timeout):
                    await slot.acquire()
            except TimeoutError:
                raise self._no_slot(timeout) from None
            self._release = slot.release
        return timeout

    def succeeded(self, status: int | None = None, *, shed: bool = False) -> None:
        """Record a completed attempt: by its HTTP status, or a plain success without one.

        ``shed``: the answer carries seawall's refusal marker (``REFUSED_HEADER``). A server that
        sheds is alive and paces us with Retry-After, which the retry budget already
        honours; counting it as a failure would open client breakers in lockstep on a
        healthy server and keep them open after the surge (measured in the replay lab).
        """
        if self._permit is not None:
            self._record(
                Outcome.SUCCESS
                if status is None
                else _status_outcome(status, shed, self._core.policy.breaker)
            )

    def streaming(self, status: int, *, shed: bool = False) -> Callable[[], None] | None:
        """:meth:`succeeded` for a response whose body is still to be read: returns the
        slot's release (None without a slot), which the caller now owns, to call when the
        body is closed; the slot stays taken until then."""
        permit = self._permit
        if permit is not None:  # _record inlined: this is the async transport's fast path
            self._permit = None
            core = self._core
            assert self._breaker is not None
            outcome = _status_outcome(status, shed, core.policy.breaker)
            self._breaker.record(permit, outcome, core.clock.now() - self._started)
        release, self._release = self._release, None
        return release

    def _no_slot(self, timeout: float | None) -> BaseException:
        on_no_slot = self._hooks.on_no_slot
        if on_no_slot is None:
            return BulkheadTimeout(self._host, timeout)
        return on_no_slot(self._host, timeout, self._subject)

    def _failure_outcome(self, exc: BaseException) -> Outcome:
        outcome_of = self._hooks.outcome_of
        if outcome_of is not None:
            return outcome_of(self._core, exc)
        if isinstance(exc, RateLimitWaitTooLong) or (self._slot and self._release is None):
            return Outcome.NEUTRAL  # a local condition: nothing reached the host
        return self._core.breaker_outcome_exception(exc)

    def _record(self, outcome: Outcome) -> None:
        permit, self._permit = self._permit, None
        assert permit is not None and self._breaker is not None
        self._breaker.record(permit, outcome, self._core.clock.now() - self._started)


def _status_outcome(status: int, shed: bool, policy: BreakerPolicy | None) -> Outcome:
    """What an HTTP answer says about the host; seawall's own shed answer is neutral."""
    return Outcome.NEUTRAL if shed else classify_status(status, policy)
