"""The one table that says what each seawall event means to metrics, spans and logs.

Why one table: events are typed (one class per decision, defined next to its mechanism)
and their names or fields may change as mechanisms evolve. Every exporter (Prometheus,
OpenTelemetry, logging) reads :data:`SIGNALS`, keyed by the event *class*, so a renamed
or new event is one row to edit here and nowhere else.

Labels are bounded by construction: a row's ``labels`` function may only return values
drawn from the policy (rule names, priorities, states, reasons) or from a small vocabulary
(:func:`reason_kind`), never a client address, a rate-limit key, a URL or a token. Values
that come from the outside world but are normally few (upstream hosts, store names) go
through a :class:`LabelLimiter` in every exporter, which folds values past a per-label
cap into ``"other"``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from seawall.asgi.shed import RequestBodyStalled
from seawall.breaker import BreakerRejected, BreakerState, BreakerStateChanged
from seawall.cache.fallback import CacheCorrupt, CacheRejected, CacheServed, CacheStored
from seawall.cache.store import CacheEvicted, CacheWritesDisabled
from seawall.client.core import AttemptStarted, RequestCoalesced
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.ratelimit import RateLimitAdmitted, RateLimited, RateLimitStorageFailed
from seawall.retry import RetriesExhausted, RetryAfterHonoured, RetryBudgetExhausted, RetryScheduled
from seawall.shed import ConcurrencyLimitChanged, RequestShed

__all__ = [
    "BREAKER_STATE_VALUES",
    "OTHER",
    "SIGNALS",
    "LabelLimiter",
    "LogLine",
    "Metric",
    "Signal",
    "reason_kind",
    "signal_for",
]

OTHER = "other"
"""The label value that stands for every value past a label's cap."""

BREAKER_STATE_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
"""``seawall_breaker_state``: 0 closed, 1 half-open, 2 open (alert on ``== 2``)."""

_STATUS = re.compile(r"^status [1-5][0-9][0-9]$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z_ -]*")


def reason_kind(reason: str) -> str:
    """A reason as a bounded label: ``status 503`` and ``ConnectError`` stay, numbers and
    free text after them go (``size 12 != recorded 13`` -> ``size``)."""
    if _STATUS.match(reason):
        return reason
    m = _WORDS.match(reason)
    if m is None:
        return OTHER
    kind = m.group(0).strip(" -")
    return kind[:40] if kind else OTHER


class LabelLimiter:
    """Caps the distinct values each label name may take; the rest become ``"other"``.

    Why: even "few" values (upstream hosts) are unbounded for a proxy that fetches from
    hosts its users name. Prometheus keeps a series per label combination for ever.
    """

    __slots__ = ("_max", "_seen")

    def __init__(self, max_values: int = 100) -> None:
        if max_values < 1:
            raise ValueError("max_values must be at least 1")
        self._max = max_values
        self._seen: dict[str, set[str]] = {}

    def __call__(self, name: str, value: str) -> str:
        seen = self._seen.get(name)
        if seen is None:
            seen = self._seen[name] = set()
        if value in seen:
            return value
        if len(seen) < self._max:
            seen.add(value)
            return value
        return OTHER

    def values(self, names: tuple[str, ...], raw: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self(n, v) for n, v in zip(names, raw, strict=True))


MetricKind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True, slots=True)
class Metric:
    """One instrument fed by an event.

    ``name`` is the Prometheus name in base units (``_seconds``, ``_bytes``), without the
    ``_total`` that counters get on exposition; the OpenTelemetry name is derived from it
    (:meth:`otel_name`). ``labels`` is a subset of the signal's label names. ``value``
    gives the amount to add (counter, default 1), to observe (histogram) or to set (gauge).
    """

    kind: MetricKind
    name: str
    help: str
    labels: tuple[str, ...] = ()
    value: Callable[[Any], float] | None = None
    buckets: tuple[float, ...] | None = None

    @property
    def unit(self) -> str:
        """UCUM unit for OpenTelemetry (``s``, ``By``, or ``1``)."""
        if self.name.endswith("_seconds"):
            return "s"
        if self.name.endswith("_bytes"):
            return "By"
        return "1"

    @property
    def otel_name(self) -> str:
        """``seawall_retry_wait_seconds`` -> ``seawall.retry.wait`` (unit goes in ``unit``)."""
        base = self.name.removesuffix("_seconds").removesuffix("_bytes")
        return base.replace("_", ".", 2)


@dataclass(frozen=True, slots=True)
class LogLine:
    """How an event reads in the ``seawall`` logs.

    ``every``: a state change, logged each time (breaker transitions, a store that stops
    writing). Otherwise the line is rate-limited per ``key`` (bounded labels): the first
    one in an interval is logged, later ones are counted into the next line, so an
    outage logs once per interval, not once per request.
    """

    logger: str
    level: int
    message: Callable[[Any], str]
    every: bool = False
    key: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Signal:
    """What one event class means: its bounded labels, metrics, log line and span event."""

    event: type[Event]
    label_names: tuple[str, ...]
    labels: Callable[[Any], tuple[str, ...]]
    metrics: tuple[Metric, ...] = ()
    log: LogLine | None = None
    span_event: str | None = None
    span_attributes: Callable[[Any], dict[str, str | float | int | bool]] | None = field(
        default=None
    )


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_AGE_BUCKETS = (1, 10, 60, 300, 900, 3600, 4 * 3600, 86400, 7 * 86400, 30 * 86400)


def _no_labels(_e: Any) -> tuple[str, ...]:
    return ()


SIGNALS: tuple[Signal, ...] = (
    # -- rate limiting (server face) ------------------------------------------------------
    Signal(
        RateLimitAdmitted,
        ("policy",),
        lambda e: (e.rule,),
        (
            Metric(
                "counter",
                "seawall_ratelimit_admitted_requests",
                "Requests that fit every rate of a rate-limit policy",
                ("policy",),
            ),
        ),
    ),
    Signal(
        RateLimited,
        ("policy",),
        lambda e: (e.rule,),
        (
            Metric(
                "counter",
                "seawall_ratelimit_limited_requests",
                "Requests refused with 429 by a rate-limit rule",
                ("policy",),
            ),
            Metric(
                "histogram",
                "seawall_ratelimit_retry_after_seconds",
                "Retry-After given to rate-limited requests",
                ("policy",),
                lambda e: e.retry_after,
                _LATENCY_BUCKETS,
            ),
        ),
        LogLine(
            "seawall.ratelimit",
            logging.INFO,
            lambda e: (
                f"rate limit {e.rule!r} is refusing requests (retry after {e.retry_after:.0f} s)"
            ),
            key=("policy",),
        ),
        "seawall.rate_limited",
        lambda e: {"seawall.policy": e.rule, "seawall.retry_after": e.retry_after},
    ),
    Signal(
        RateLimitStorageFailed,
        ("mode",),
        lambda e: ("open" if e.fail_open else "closed",),
        (
            Metric(
                "counter",
                "seawall_ratelimit_storage_failures",
                "Rate-limit storage failures; mode says whether the request was admitted",
                ("mode",),
            ),
        ),
        # No log line: seawall.ratelimit logs storage failures itself, once per log_interval.
    ),
    # -- load shedding (server face) ------------------------------------------------------
    Signal(
        RequestShed,
        ("reason", "priority"),
        lambda e: (e.reason, str(e.priority)),
        (
            Metric(
                "counter",
                "seawall_shed_requests",
                "Requests refused with 503 by the load shedder, by reason and priority",
                ("reason", "priority"),
            ),
        ),
        LogLine(
            "seawall.shed",
            logging.WARNING,
            lambda e: (
                f"shedding load: refusing priority {e.priority} requests ({e.reason}, "
                f"retry after {e.retry_after:.0f} s)"
            ),
            key=("priority",),
        ),
        "seawall.shed",
        lambda e: {
            "seawall.reason": e.reason,
            "seawall.priority": e.priority,
            "seawall.retry_after": e.retry_after,
        },
    ),
    Signal(
        RequestBodyStalled,
        (),
        _no_labels,  # never the path: it is the client's to choose
        (
            Metric(
                "counter",
                "seawall_shed_stalled_bodies",
                "Request bodies that sent nothing for body_timeout: answered 408",
                (),
            ),
        ),
        LogLine(
            "seawall.shed",
            logging.WARNING,
            lambda e: f"request bodies are stalling: {e.seconds:.0f} s without a byte (408)",
            key=(),
        ),
    ),
    Signal(
        ConcurrencyLimitChanged,
        (),
        _no_labels,
        (
            Metric(
                "gauge",
                "seawall_shed_concurrency_limit",
                "The load shedder's current concurrency limit",
                value=lambda e: e.new,
            ),
            Metric(
                "counter",
                "seawall_shed_concurrency_limit_changes",
                "Times the adaptive concurrency limit moved",
            ),
        ),
        LogLine(
            "seawall.shed",
            logging.DEBUG,
            lambda e: f"concurrency limit {e.old} -> {e.new}",
        ),
    ),
    # -- circuit breaking (client face) ---------------------------------------------------
    Signal(
        BreakerStateChanged,
        ("upstream", "from_state", "to_state"),
        lambda e: (e.breaker, e.old.value, e.new.value),
        (
            Metric(
                "counter",
                "seawall_breaker_transitions",
                "Circuit-breaker state transitions per upstream",
                ("upstream", "from_state", "to_state"),
            ),
            Metric(
                "gauge",
                "seawall_breaker_state",
                "Circuit-breaker state per upstream: 0 closed, 1 half-open, 2 open",
                ("upstream",),
                lambda e: BREAKER_STATE_VALUES[e.new],
            ),
        ),
        LogLine(
            "seawall.breaker",
            logging.INFO,
            lambda e: (
                f"breaker {e.breaker} {e.old.value} -> {e.new.value}: {e.reason}"
                + (f" (open for {e.open_for:.1f} s)" if e.open_for is not None else "")
            ),
            every=True,
        ),
    ),
    Signal(
        BreakerRejected,
        ("upstream", "state"),
        lambda e: (e.breaker, e.state.value),
        (
            Metric(
                "counter",
                "seawall_breaker_rejected_calls",
                "Calls refused by a circuit breaker without reaching the upstream",
                ("upstream", "state"),
            ),
        ),
        LogLine(
            "seawall.breaker",
            logging.INFO,
            lambda e: (
                f"breaker {e.breaker} is {e.state.value}: refusing calls "
                f"(next probe in {e.retry_in:.1f} s)"
            ),
            key=("upstream",),
        ),
        "seawall.short_circuited",
        lambda e: {"seawall.upstream": e.breaker, "seawall.retry_in": e.retry_in},
    ),
    # -- retries (client face) ------------------------------------------------------------
    Signal(
        RetryScheduled,
        ("upstream", "reason"),
        lambda e: (e.host, reason_kind(e.reason)),
        (
            Metric(
                "counter",
                "seawall_retry_scheduled",
                "Retries scheduled, by upstream and what failed",
                ("upstream", "reason"),
            ),
            Metric(
                "histogram",
                "seawall_retry_wait_seconds",
                "Wait before a scheduled retry",
                ("upstream",),
                lambda e: e.wait,
                _LATENCY_BUCKETS,
            ),
        ),
        LogLine(
            "seawall.retry",
            logging.INFO,
            lambda e: (
                f"retrying {e.host} after {e.reason} (attempt {e.attempt} failed, "
                f"waiting {e.wait:.2f} s)"
            ),
            key=("upstream",),
        ),
        "seawall.retry",
        lambda e: {
            "seawall.upstream": e.host,
            "seawall.attempt": e.attempt,
            "seawall.wait": e.wait,
            "seawall.reason": reason_kind(e.reason),
        },
    ),
    Signal(
        RetryAfterHonoured,
        ("upstream",),
        lambda e: (e.host,),
        (
            Metric(
                "counter",
                "seawall_retry_honoured_retry_after",
                "Retries that waited for the upstream's Retry-After",
                ("upstream",),
            ),
        ),
    ),
    Signal(
        RetryBudgetExhausted,
        ("upstream",),
        lambda e: (e.host,),
        (
            Metric(
                "counter",
                "seawall_retry_budget_refused",
                "Retries not sent because the upstream's retry budget was spent",
                ("upstream",),
            ),
        ),
        LogLine(
            "seawall.retry",
            logging.WARNING,
            lambda e: (
                f"retry budget for {e.host} spent: failing calls without retrying ({e.reason})"
            ),
            key=("upstream",),
        ),
    ),
    Signal(
        RetriesExhausted,
        ("upstream", "why"),
        lambda e: (e.host, e.why),
        (
            Metric(
                "counter",
                "seawall_retry_exhausted_calls",
                "Calls that gave up: why is attempts, deadline or budget",
                ("upstream", "why"),
            ),
        ),
        LogLine(
            "seawall.retry",
            logging.WARNING,
            lambda e: (
                f"calls to {e.host} are failing: gave up after {e.attempts} attempts "
                f"({e.why}; last: {e.reason})"
            ),
            key=("upstream", "why"),
        ),
    ),
    Signal(
        AttemptStarted,
        ("upstream",),
        lambda e: (e.host,),
        (
            Metric(
                "counter",
                "seawall_client_attempts",
                "Attempts sent upstream (first attempts and retries), after admission",
                ("upstream",),
            ),
        ),
    ),
    Signal(
        RequestCoalesced,
        ("upstream",),
        lambda e: (e.host,),
        (
            Metric(
                "counter",
                "seawall_client_coalesced_requests",
                "Requests answered by another identical in-flight fetch",
                ("upstream",),
                lambda e: e.followers,
            ),
        ),
    ),
    # -- fallback cache (both faces) ------------------------------------------------------
    Signal(
        CacheServed,
        ("state", "reason"),
        lambda e: (e.state, reason_kind(e.reason)),
        (
            Metric(
                "counter",
                "seawall_cache_served_responses",
                "Answers from the fallback cache: state is hit, stale or verified",
                ("state", "reason"),
            ),
            Metric(
                "histogram",
                "seawall_cache_served_age_seconds",
                "Age of the copies the cache served",
                ("state",),
                lambda e: e.age,
                _AGE_BUCKETS,
            ),
        ),
        LogLine(
            "seawall.cache",
            logging.WARNING,
            lambda e: f"serving {e.state} copies from the cache ({e.reason})",
            key=("state",),
        ),
        "seawall.cache_served",
        lambda e: {"seawall.state": e.state, "seawall.age": e.age},
    ),
    Signal(
        CacheStored,
        (),
        _no_labels,
        (
            Metric("counter", "seawall_cache_stored_responses", "Responses the cache recorded"),
            Metric(
                "counter",
                "seawall_cache_stored_bytes",
                "Body bytes the cache recorded",
                value=lambda e: e.size,
            ),
        ),
    ),
    Signal(
        CacheRejected,
        ("reason",),
        lambda e: (reason_kind(e.reason),),
        (
            Metric(
                "counter",
                "seawall_cache_rejected_responses",
                "Recordings dropped: incomplete, or bytes that do not match their digest",
                ("reason",),
            ),
        ),
        LogLine(
            "seawall.cache",
            logging.WARNING,
            lambda e: f"not caching a response: {e.reason}",
            key=("reason",),
        ),
    ),
    Signal(
        CacheCorrupt,
        ("reason",),
        lambda e: (reason_kind(e.reason),),
        (
            Metric(
                "counter",
                "seawall_cache_verification_failures",
                "Stored entries that failed verification when read (evicted, not served)",
                ("reason",),
            ),
        ),
        LogLine(
            "seawall.cache",
            logging.WARNING,
            lambda e: f"evicted a cache entry that failed verification: {e.reason}",
            key=("reason",),
        ),
    ),
    Signal(
        CacheEvicted,
        ("store",),
        lambda e: (e.store,),
        (
            Metric(
                "counter",
                "seawall_cache_evicted_entries",
                "Entries evicted to keep a store within its byte bound",
                ("store",),
            ),
            Metric(
                "counter",
                "seawall_cache_evicted_bytes",
                "Bytes evicted to keep a store within its byte bound",
                ("store",),
                lambda e: e.size,
            ),
        ),
    ),
    Signal(
        CacheWritesDisabled,
        ("store",),
        lambda e: (e.store,),
        (
            Metric(
                "counter",
                "seawall_cache_writes_disabled",
                "Times a store stopped accepting writes (full or unwritable); reads go on",
                ("store",),
            ),
        ),
        LogLine(
            "seawall.cache",
            logging.ERROR,
            lambda e: f"cache store {e.store} stopped writing: {e.error}",
            every=True,
        ),
    ),
)
"""Every event seawall emits that telemetry reports, keyed by class (see module doc)."""

_BY_CLASS: dict[type[Event], Signal] = {s.event: s for s in SIGNALS}


def signal_for(event_class: type[Event]) -> Signal | None:
    """The row for an event class (or its nearest listed base class), None if unlisted."""
    signal = _BY_CLASS.get(event_class)
    if signal is None:
        for base in event_class.__mro__[1:]:
            signal = _BY_CLASS.get(base)
            if signal is not None:
                break
    return signal


Handler = Callable[[Event], None]


class SignalListener:
    """A bus listener that builds one handler per event class on first sight.

    After the first event of a class, dispatch is one dictionary lookup; classes with no
    signal (or none this listener records) map to ``None`` and cost only that lookup.
    Exporters implement :meth:`_handler`.
    """

    def __init__(self, signals: Sequence[Signal]) -> None:
        self._recorded = frozenset(s.event for s in signals)
        self._handlers: dict[type[Event], Handler | None] = {}

    def attach(self, bus: EventBus = DEFAULT_BUS) -> Callable[[], None]:
        """Subscribe to ``bus``; returns the function that unsubscribes."""
        return bus.subscribe(self)

    def __call__(self, event: Event) -> None:
        cls = type(event)
        handler = self._handlers[cls] if cls in self._handlers else self._compile(cls)
        if handler is not None:
            handler(event)

    def _compile(self, cls: type[Event]) -> Handler | None:
        signal = signal_for(cls)
        found = None
        if signal is not None and signal.event in self._recorded:
            found = self._handler(signal)
        self._handlers[cls] = found
        return found

    def _handler(self, signal: Signal) -> Handler:
        raise NotImplementedError
