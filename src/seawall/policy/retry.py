"""Retry and client-pipeline policies, tuned for fetching artifacts from a busy registry.

Why these defaults: an artifact fetch (a manifest, a layer by digest, an index page) is
idempotent when it is a GET, is usually retried by CI anyway, and is most often issued by
thousands of runners at once. So retries are few (4 attempts), jittered, capped by one
overall deadline, and above all *budgeted*: retries may add at most 10% to the first
attempts a process sends to one host, which is what bounds retry amplification in an outage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from seawall.errors import PolicyError
from seawall.policy.base import (
    MAX_WINDOW,
    PolicyBase,
    check_fraction,
    check_int_at_least,
    check_non_negative,
    check_positive,
    check_statuses,
)
from seawall.policy.breaker import BreakerPolicy

__all__ = ["ClientPolicy", "RetryPolicy"]

_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def _check_header_name(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or not set(value) <= _TOKEN_CHARS:
        raise PolicyError(name, value, "is not an HTTP header name")


@dataclass(frozen=True, slots=True)
class RetryPolicy(PolicyBase):
    """When and how often a failed call is tried again.

    ``attempts`` counts the first try. ``deadline`` bounds the whole call (all attempts
    and waits): no retry is scheduled that could not start before it. Waits use full
    jitter (uniform in ``[0, min(cap, base * 2**n)]``) so that clients failing together
    do not come back together. ``Retry-After`` from the server wins over a shorter
    backoff but never over the deadline.
    """

    attempts: int = 4
    deadline: float = 30.0
    backoff_base: float = 0.5
    backoff_cap: float = 10.0
    retry_methods: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS"})
    retry_unsafe: bool = False
    idempotency_header: str = "Idempotency-Key"
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})
    honor_retry_after: bool = True
    budget_ratio: float = 0.1
    budget_min_retries_per_second: float = 0.5
    budget_window: float = 10.0

    def __post_init__(self) -> None:
        check_int_at_least("attempts", self.attempts, 1)
        check_positive("deadline", self.deadline)
        check_positive("backoff_base", self.backoff_base)
        check_positive("backoff_cap", self.backoff_cap)
        if self.backoff_cap < self.backoff_base:
            raise PolicyError(
                "backoff_cap",
                self.backoff_cap,
                f"must be at least backoff_base ({self.backoff_base})",
            )
        methods = self.retry_methods
        if isinstance(methods, str) or not isinstance(methods, set | frozenset | list | tuple):
            raise PolicyError("retry_methods", methods, "must be a list of HTTP method names")
        if not all(isinstance(m, str) and m for m in methods):
            raise PolicyError("retry_methods", methods, "must be a set of HTTP method names")
        object.__setattr__(self, "retry_methods", frozenset(m.upper() for m in methods))
        if not isinstance(self.retry_unsafe, bool):
            raise PolicyError("retry_unsafe", self.retry_unsafe, "must be true or false")
        _check_header_name("idempotency_header", self.idempotency_header)
        statuses = check_statuses("retry_statuses", self.retry_statuses, 100, 599)
        if any(200 <= s < 400 for s in statuses):
            raise PolicyError("retry_statuses", sorted(statuses), "must not contain 2xx/3xx")
        object.__setattr__(self, "retry_statuses", statuses)
        if not isinstance(self.honor_retry_after, bool):
            raise PolicyError("honor_retry_after", self.honor_retry_after, "must be true or false")
        check_fraction("budget_ratio", self.budget_ratio)
        check_non_negative("budget_min_retries_per_second", self.budget_min_retries_per_second)
        check_positive("budget_window", self.budget_window)


@dataclass(frozen=True, slots=True)
class ClientPolicy(PolicyBase):
    """The whole client pipeline, outermost first.

    retry (deadline, budget) -> circuit breaker -> rate limit / bulkhead -> per-attempt
    timeout -> the wrapped transport. ``breaker=None`` disables the breaker;
    ``rate_limit`` is a ``limits`` rate string per upstream host (``"50/second"``);
    ``max_concurrency`` caps in-flight requests per host (a bulkhead); ``coalesce`` makes
    concurrent GETs of the same content-addressed URL (one with a sha256 digest) share one
    upstream fetch.
    """

    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy | None = field(default_factory=BreakerPolicy)
    attempt_timeout: float | None = 10.0
    rate_limit: str | None = None
    max_concurrency: int | None = None
    coalesce: bool = True
    max_hosts: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.retry, RetryPolicy):
            raise PolicyError("retry", self.retry, "must be a RetryPolicy")
        if self.breaker is not None and not isinstance(self.breaker, BreakerPolicy):
            raise PolicyError("breaker", self.breaker, "must be a BreakerPolicy or None")
        if self.attempt_timeout is not None:
            check_positive("attempt_timeout", self.attempt_timeout)
        if self.rate_limit is not None:
            from limits import parse

            try:
                item = parse(self.rate_limit)
            except Exception:
                raise PolicyError(
                    "rate_limit", self.rate_limit, "is not a rate like '100/second'"
                ) from None
            if item.amount < 1 or not 0 < item.get_expiry() <= MAX_WINDOW:
                raise PolicyError(  # "0/second" used to divide by zero on the first call
                    "rate_limit",
                    self.rate_limit,
                    "must allow at least 1 call per window of at most 10 years",
                )
        if self.max_concurrency is not None:
            check_int_at_least("max_concurrency", self.max_concurrency, 1)
        if not isinstance(self.coalesce, bool):
            raise PolicyError("coalesce", self.coalesce, "must be true or false")
        check_int_at_least("max_hosts", self.max_hosts, 1)
