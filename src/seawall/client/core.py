"""The client side's decisions, written once for every face (sans-IO).

A face (httpx async or sync, requests, a decorated callable) says how to read its own
request and response types (:class:`Face`) and how to send once, close, and wrap a body
in its colour (the driver's part, in ``seawall/client/_async/``). Everything that is
decided lives here and does no I/O: which breaker, pacer and bulkhead belong to a host,
what an answer or an error means to the breaker, whether and when to try again
(:class:`Call`, with tenacity deciding through :class:`~seawall.retry.Retries`), and
which identical requests may share one fetch.

So every face takes the same decisions from the same code, and the parity tests
(``tests/test_client_parity.py``) hold them to it.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import ClassVar, Generic, Protocol, TypeVar

from seawall.breaker import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
    Permit,
    classify_exception,
    classify_status,
)
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.lru import BoundedMap
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.retry import FINAL, Retries, RetryBudget, Verdict, parse_retry_after

__all__ = [
    "BUILD_STEP",
    "CALL_TIME_LIMIT",
    "AttemptStarted",
    "BulkheadTimeout",
    "Call",
    "ClientCore",
    "CoreAccess",
    "Face",
    "HostPacer",
    "RateLimitWaitTooLong",
    "RequestCoalesced",
    "build_step",
    "http_may_repeat",
    "is_immutable_url",
]

Req = TypeVar("Req")  # what a face sends (httpx.Request, PreparedRequest, a call's arguments)
Resp = TypeVar("Resp")  # what it gets back
Req_contra = TypeVar("Req_contra", contravariant=True)
Resp_contra = TypeVar("Resp_contra", contravariant=True)

_SEP = r"(?::|%3[aA]|/|=|-)"
_DIGEST = re.compile(rf"sha(?:256{_SEP}[0-9a-fA-F]{{64}}|512{_SEP}[0-9a-fA-F]{{128}})")
_DIGEST_BYTES = re.compile(_DIGEST.pattern.encode())


def is_immutable_url(url: str | bytes) -> bool:
    """True when the URL names content by a digest (an OCI blob, a pinned file)."""
    if isinstance(url, bytes):
        return b"sha" in url and _DIGEST_BYTES.search(url) is not None
    return "sha" in url and _DIGEST.search(url) is not None


BUILD_STEP: ContextVar[str | None] = ContextVar("seawall_build_step", default=None)
"""The unit of work (a build step) the current requests belong to; see :func:`build_step`."""


class build_step:
    """Mark every request made inside the block as one build step (``x-seawall-step``).

    A seawall server finishes steps it has started before it admits new ones under a
    surge; this tells it which requests belong together (a manifest, then its layers)::

        with build_step():                # or build_step("pipeline-42/step-3")
            pull_image(client, "app:1.2")

    ``async with`` works too. It is a context variable, so tasks started inside inherit
    it; a thread started inside does not.
    """

    __slots__ = ("_token", "step")

    def __init__(self, step: str | None = None) -> None:
        self.step = step or uuid.uuid4().hex
        self._token: Token[str | None] | None = None

    def __enter__(self) -> str:
        self._token = BUILD_STEP.set(self.step)
        return self.step

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            BUILD_STEP.reset(self._token)
            self._token = None

    async def __aenter__(self) -> str:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()


CALL_TIME_LIMIT: ContextVar[float | None] = ContextVar("seawall_call_time_limit", default=None)
"""Seconds that an outer layer allows the calls made inside it, when shorter than their
deadline: the fallback cache sets it when it holds a copy that can answer instead."""


# --------------------------------------------------------------------------- events, errors


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptStarted(Event):
    """An attempt is about to be sent (after breaker, pacing and bulkhead let it through)."""

    name: ClassVar[str] = "client.attempt_started"
    host: str
    attempt: int
    timeout: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCoalesced(Event):
    """``followers`` concurrent identical GETs shared one upstream fetch."""

    name: ClassVar[str] = "client.coalesced"
    host: str
    followers: int


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


# --------------------------------------------------------------------------- per host state


class HostPacer:
    """GCRA (a token bucket kept as one timestamp) on our clock: a client-side rate limit.

    The rate string is parsed by ``limits`` (``"50/second"``, ``"1000 per minute"``); the
    limiting itself is local because ``limits``' memory storage reads the wall clock and a
    client should *wait* for its slot rather than be refused. A caller that reserved a
    slot and then gave up (cancelled while waiting for it) hands it back with
    :meth:`cancel`, so the next caller does not wait for a slot nobody used.
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
        """Seconds to wait before sending; reserves the slot only if that wait is shorter
        than ``max_wait`` (or none at all): a wait that ends when the time allowed does
        leaves the request no time to be sent. A negative result is the wait that was too
        long; nothing is reserved."""
        with self._lock:
            now = self._clock.now()
            tat = max(self._tat, now)
            wait = max(0.0, tat - self._tolerance - now)
            if wait > 0.0 and wait >= max_wait:
                return -wait
            self._tat = tat + self._interval
            return wait

    def busy(self) -> bool:
        """Slots are reserved ahead: forgetting this pacer would grant a fresh burst."""
        return self._tat > self._clock.now()

    def cancel(self) -> None:
        """Give back one reserved slot that was never used."""
        with self._lock:
            self._tat = max(self._tat - self._interval, self._clock.now())


class ClientCore:
    """Shared per-client state and decisions. One per transport / adapter / wrapper."""

    __slots__ = (
        "_bulkheads",
        "_pacers",
        "breakers",
        "budget",
        "bus",
        "clock",
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
        self.policy = p = policy if policy is not None else ClientPolicy()
        self.clock = clock
        self.bus = events if events is not None else DEFAULT_BUS
        if breakers is None and p.breaker is not None:
            breakers = BreakerRegistry(p.breaker, clock=clock, events=self.bus)
        self.breakers = breakers  # a registry given is used whatever policy.breaker says
        self.budget = (
            budgets
            if budgets is not None
            else RetryBudget.from_policy(p.retry, clock=clock, max_hosts=p.max_hosts)
        )
        rate = p.rate_limit
        self._pacers: BoundedMap[str, HostPacer] | None = (
            BoundedMap(lambda _h: HostPacer(rate, clock), p.max_hosts, HostPacer.busy)
            if rate is not None
            else None
        )
        # One bulkhead map per colour of semaphore (async and sync faces may share a core).
        self._bulkheads: dict[type, BoundedMap[str, _Semaphore]] = {}

    def bulkhead(self, host: str, kind: type[S]) -> S | None:
        """The host's bulkhead semaphore of type ``kind`` (None without ``max_concurrency``)."""
        cap = self.policy.max_concurrency
        if cap is None:
            return None
        slots = self._bulkheads.get(kind)
        if slots is None:
            slots = self._bulkheads.setdefault(
                kind, BoundedMap(lambda _h: kind(cap), self.policy.max_hosts, _in_use)
            )
        return slots.get(host)  # type: ignore[return-value]

    def pacer(self, host: str) -> HostPacer | None:
        return self._pacers.get(host) if self._pacers is not None else None

    def judge_status(self, status: int, retry_after: str | bytes | None) -> Verdict:
        """Retryable statuses (429, 502, 503, 504 by default) with any Retry-After."""
        if status not in self.policy.retry.retry_statuses:
            return FINAL
        after = parse_retry_after(retry_after, self.clock.wall()) if retry_after else None
        return Verdict(True, f"status {status}", after)


class _Semaphore(Protocol):
    in_use: int

    def __init__(self, value: int) -> None: ...

    def release(self) -> None: ...


def _in_use(semaphore: _Semaphore) -> bool:
    return semaphore.in_use > 0


S = TypeVar("S", bound=_Semaphore)


class CoreAccess:
    """What every face shows of its :class:`ClientCore`: the state another face (or a
    :func:`~seawall.client.call.resilient` call) can share by being given it."""

    __slots__ = ()
    _core: ClientCore

    @property
    def policy(self) -> ClientPolicy:
        return self._core.policy

    @property
    def breakers(self) -> BreakerRegistry | None:
        return self._core.breakers

    @property
    def budgets(self) -> RetryBudget:
        return self._core.budget


# --------------------------------------------------------------------------- faces


def http_may_repeat(method: str, idempotency_key: str | None, policy: RetryPolicy) -> bool:
    """A safe method (GET, HEAD, OPTIONS by default), the opt-in ``retry_unsafe``, or a
    request that carries the policy's idempotency header."""
    return method.upper() in policy.retry_methods or policy.retry_unsafe or bool(idempotency_key)


class Face(Protocol[Req_contra, Resp_contra]):
    """How the core reads one face's requests, answers and errors (no I/O here)."""

    def host(self, request: Req_contra) -> str:
        """The upstream's name: the key of its breaker, budget, pacer and bulkhead."""
        ...

    def method(self, request: Req_contra) -> str:
        """The request method, upper-case."""
        ...

    def target(self, request: Req_contra) -> str | bytes:
        """The request's path and query, cheap to get: the hot path's digest test."""
        ...

    def header(self, request: Req_contra, name: str) -> str | None:
        """A request header (lower-case ``name``), or None."""
        ...

    def mark(self, request: Req_contra, name: str, value: str) -> None:
        """Set a request header in place (seawall's own, such as ``x-seawall-step``)."""
        ...

    def replayable(self, request: Req_contra) -> bool:
        """Whether the body can be sent again (judged before the first attempt: a
        transport may buffer a streamed body, which would wrongly make it look so)."""
        ...

    def may_repeat(self, request: Req_contra, policy: RetryPolicy) -> bool:
        """Whether sending it twice is harmless (for HTTP: :func:`http_may_repeat`)."""
        ...

    def status(self, response: Resp_contra) -> int:
        """The HTTP status of an answer; 200 for a face without statuses."""
        ...

    def response_header(self, response: Resp_contra, name: str) -> str | None: ...

    def finished(self, response: Resp_contra) -> bool:
        """True when the answer's body is already read and closed (nothing will close it)."""
        ...

    def judge_exception(self, exc: BaseException) -> Verdict:
        """Whether the same request may well succeed after this error."""
        ...

    def refused(self, exc: BaseException) -> bool:
        """Whether the error carries seawall's refusal (``x-seawall-refused``): the
        application never ran, so it is neutral for the breaker and may be sent again."""
        ...

    def breaker_outcome(self, exc: BaseException, policy_outcome: Outcome) -> Outcome:
        """What this error says about the host (``policy_outcome``: the breaker policy's
        reading, for errors the face has no opinion on)."""
        ...

    def open_error(self, cause: CircuitOpenError, request: Req_contra) -> BaseException:
        """The breaker is open: the error this face's users catch."""
        ...

    def no_slot_error(self, host: str, waited: float | None, request: Req_contra) -> BaseException:
        """The bulkhead stayed full: a local error, never retried."""
        ...


# --------------------------------------------------------------------------- one call


class Attempt:
    """One attempt's breaker permit and bulkhead slot: each settled exactly once."""

    __slots__ = ("_breaker", "_local", "_permit", "_release", "_started", "number", "pace", "pacer")

    def __init__(
        self, number: int, breaker: CircuitBreaker | None, permit: Permit | None, started: float
    ) -> None:
        self.number = number
        self._breaker = breaker
        self._permit = permit
        self._started = started
        self.pacer: HostPacer | None = None  # set while a pacing reservation is unused
        self.pace = 0.0  # seconds to wait for the pacing slot
        self._release: Callable[[], None] | None = None
        self._local = False  # ended by a local condition (full bulkhead): never retried

    def hold(self, release: Callable[[], None]) -> None:
        """The attempt took a bulkhead slot; ``release`` frees it."""
        self._release = release
        self.pacer = None

    def sent(self, now: float) -> None:
        """The attempt goes out now: its pacing reservation is used, its clock starts."""
        self.pacer = None
        self._started = now

    def hand_over(self) -> Callable[[], None] | None:
        """The slot's release, now owned by a response body (freed when it is closed)."""
        release, self._release = self._release, None
        return release

    def settle(self, outcome: Outcome | None, now: float) -> None:
        """Record ``outcome`` with the breaker (None: nothing) and free what is held."""
        permit, self._permit = self._permit, None
        if permit is not None and outcome is not None:
            assert self._breaker is not None
            self._breaker.record(permit, outcome, now - self._started)
        pacer, self.pacer = self.pacer, None
        if pacer is not None:
            pacer.cancel()  # reserved, never sent: the slot goes back
        release, self._release = self._release, None
        if release is not None:
            release()


class Call(Generic[Req, Resp]):
    """One logical call: its deadline, its attempts and the decisions between them.

    The driver's loop, whatever its colour::

        call = Call(core, face, request)
        while True:
            attempt = call.admit()                    # breaker, pacing reservation
            ... sleep attempt's pace; take the bulkhead slot; send with call.timeout()
            on error:   wait = call.failed(attempt, exc)       (raises when final)
            on answer:  wait = call.answered(attempt, resp)    (None: it is the answer)
            ... close the answer being retried; sleep ``wait``
    """

    __slots__ = (
        "_replayable",
        "_retries",
        "attempts",
        "core",
        "deadline_at",
        "face",
        "host",
        "request",
    )

    def __init__(self, core: ClientCore, face: Face[Req, Resp], request: Req) -> None:
        self.core = core
        self.face = face
        self.request = request
        self.host = face.host(request)
        limit = CALL_TIME_LIMIT.get()
        deadline = core.policy.retry.deadline
        self.deadline_at = core.clock.now() + (
            deadline if limit is None or limit > deadline else limit
        )
        self._replayable: bool | None = None
        self._retries: Retries[Resp] | None = None
        self.attempts = 0

    def replayable(self) -> bool:
        """Judged once, before the first attempt sends the body."""
        if self._replayable is None:
            self._replayable = self.face.replayable(self.request)
        return self._replayable

    # ---- before an attempt

    def admit(self) -> Attempt:
        """Let the next attempt through the breaker and reserve its pacing slot.

        Raises the face's open error when the breaker refuses, and
        :class:`RateLimitWaitTooLong` when pacing would pass the deadline.
        """
        core = self.core
        self.replayable()  # judged before anything is sent
        self.attempts += 1
        host = self.host
        breakers = core.breakers
        breaker = breakers.get(host) if breakers is not None else None
        permit = None
        if breaker is not None:
            try:
                permit = breaker.admit()
            except CircuitOpenError as exc:
                raise self.face.open_error(exc, self.request) from exc
        now = core.clock.now()
        attempt = Attempt(self.attempts, breaker, permit, now)
        pacer = core.pacer(host)
        if pacer is not None:
            wait = pacer.reserve(max(0.0, self.deadline_at - now))
            if wait < 0:
                attempt.settle(Outcome.NEUTRAL, now)  # a local condition: nothing was sent
                raise RateLimitWaitTooLong(host, -wait)
            attempt.pacer = pacer
            attempt.pace = wait
        return attempt

    def timeout(self) -> float | None:
        """The per-attempt timeout: the policy's, never beyond the call's deadline."""
        remaining = self.deadline_at - self.core.clock.now()
        if not remaining > 0.0:
            remaining = 0.0
        t = self.core.policy.attempt_timeout
        return remaining if t is None or remaining < t else t

    def no_slot(self, attempt: Attempt, waited: float | None) -> BaseException:
        """The bulkhead stayed full: settle the attempt (neutral) and build the error."""
        attempt.settle(Outcome.NEUTRAL, self.core.clock.now())
        attempt._local = True
        return self.face.no_slot_error(self.host, waited, self.request)

    def started(self, attempt: Attempt, timeout: float | None) -> None:
        """The attempt is about to be sent: its duration, for the breaker, starts now
        (waiting for a pacing slot or a bulkhead is not the upstream's slowness)."""
        now = self.core.clock.now()
        attempt.sent(now)
        if attempt.number == 1:  # a logical call counts for the budget once it is sent
            self.core.budget.record_attempt(self.host)
        bus = self.core.bus
        if bus.active:
            number = attempt.number
            bus.emit(AttemptStarted(at=now, host=self.host, attempt=number, timeout=timeout))

    # ---- after an attempt

    def answered(self, attempt: Attempt, response: Resp) -> float | None:
        """Record the answer; seconds to wait before trying again, or None: it is final.

        A final answer keeps the attempt's bulkhead slot: the face hands it to the body
        (:meth:`Attempt.hand_over`) and frees it when the body is closed.
        """
        core = self.core
        face = self.face
        status = face.status(response)
        refused = face.response_header(response, REFUSED_HEADER) is not None
        permit = attempt._permit
        if permit is not None:  # inlined settle(): this is every answer's path
            attempt._permit = None
            assert attempt._breaker is not None
            policy = attempt._breaker.policy  # a shared registry's breakers have their own
            outcome = Outcome.NEUTRAL if refused else classify_status(status, policy)
            attempt._breaker.record(permit, outcome, core.clock.now() - attempt._started)
        if status not in core.policy.retry.retry_statuses or not self._may_retry(refused):
            return None  # the fast path: no tenacity on success
        retries = self._retries or self._start_retries()
        wait = retries.after_result(response)
        if wait is not None:
            attempt.settle(None, core.clock.now())  # the answer is discarded: free the slot
        return wait

    def failed(self, attempt: Attempt, exc: Exception) -> float:
        """Record the error; seconds to wait before trying again, or raises ``exc``."""
        core = self.core
        face = self.face
        if attempt._local:
            raise exc
        refused = face.refused(exc)
        breaker = attempt._breaker
        outcome = None
        if breaker is not None:
            outcome = (
                Outcome.NEUTRAL
                if refused
                else face.breaker_outcome(exc, classify_exception(exc, breaker.policy))
            )
        attempt.settle(outcome, core.clock.now())
        if isinstance(exc, SeawallError) or not face.judge_exception(exc).retryable:
            raise exc
        if not self._may_retry(refused):
            raise exc
        retries = self._retries or self._start_retries()
        return retries.after_exception(exc)

    def abandoned(self, attempt: Attempt) -> None:
        """The caller gave up (cancellation): neutral for the breaker, slot freed."""
        attempt.settle(Outcome.NEUTRAL, self.core.clock.now())

    # ---- decisions

    def _may_retry(self, refused: bool) -> bool:
        """A body that can be sent again, and a safe method (or an idempotency key, or the
        opt-in), or an answer seawall gave before the application ran (``refused``)."""
        if not self.replayable():
            return False
        return refused or self.face.may_repeat(self.request, self.core.policy.retry)

    def _start_retries(self) -> Retries[Resp]:
        core = self.core
        face = self.face
        self._retries = Retries(
            host=self.host,
            policy=core.policy.retry,
            deadline_at=self.deadline_at,
            budget=core.budget,
            judge_result=self._judge_response,
            judge_exception=face.judge_exception,
            clock=core.clock,
            events=core.bus,
        )
        return self._retries

    def _judge_response(self, response: Resp) -> Verdict:
        status = self.face.status(response)
        if status not in self.core.policy.retry.retry_statuses:
            return FINAL
        return self.core.judge_status(status, self.face.response_header(response, "retry-after"))
