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
from typing import Generic, TypeVar

from seawall.breaker import (
    BreakerRegistry,
    CircuitBreaker,
    Outcome,
    classify_exception,
    classify_status,
)
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import SeawallError
from seawall.events import DEFAULT_BUS, EventBus
from seawall.policy.retry import ClientPolicy
from seawall.retry import FINAL, RetryBudget, Verdict, parse_retry_after

__all__ = [
    "BulkheadTimeout",
    "ClientCore",
    "HostPacer",
    "RateLimitWaitTooLong",
    "is_immutable_url",
]

K = TypeVar("K")
V = TypeVar("V")

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

    def judge_status(self, status: int, retry_after: str | bytes | None) -> Verdict:
        """Retryable statuses (429, 502, 503, 504 by default) with any Retry-After."""
        r = self.policy.retry
        if status not in r.retry_statuses:
            return FINAL
        after = parse_retry_after(retry_after, self.clock.wall()) if retry_after else None
        return Verdict(True, f"status {status}", after)

    def attempt_timeout(self, deadline_at: float) -> float | None:
        """The per-attempt timeout: the policy's, never beyond the call's deadline."""
        remaining = max(0.0, deadline_at - self.clock.now())
        t = self.policy.attempt_timeout
        return remaining if t is None else min(t, remaining)

    # ---- per host mechanisms

    def breaker(self, host: str) -> CircuitBreaker | None:
        return self.breakers.get(host) if self.breakers is not None else None

    def breaker_outcome_status(self, status: int) -> Outcome:
        bp = self.policy.breaker
        assert bp is not None
        return classify_status(status, bp)

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
