"""``seawall check``: find the settings that turn an overload into an outage, before one does.

Why: the December 2022 artifact-manager outage was "abnormally high load and
misconfiguration of rate limiting and circuit breaking", and no resilience library tells
its users that a configuration is dangerous. Each rule here reads one or two settings of
a :class:`~seawall.policy.Policies` (what ``load_policies`` reads from ``seawall.toml``)
and, where it needs them, the upstream's declared capacity and the number of clients.

Every threshold is derived from what the setting means (retries that alone fill the
upstream, a breaker window that cannot gather its evidence, an open period shorter than
the backoff it should outlast...), never from today's default values, so changing a
default can neither silence a rule nor make the defaults fail it by accident.

This module is in the cli layer: it reads policies and mechanisms' pure helpers; it
runs nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from seawall.policy import (
    CachePolicy,
    ClientPolicy,
    LimitRule,
    Policies,
    RateLimitPolicy,
    RetryPolicy,
)
from seawall.retry import full_jitter_backoff

__all__ = [
    "IDEMPOTENT_METHODS",
    "PROBE_PATHS",
    "RULES",
    "RULE_IDS",
    "Deployment",
    "Finding",
    "Rule",
    "Severity",
    "check_policies",
    "exit_code",
    "report_dict",
    "summary",
]

Severity = Literal["error", "warning", "info"]
SEVERITIES: tuple[Severity, ...] = ("error", "warning", "info")

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
"""RFC 9110 section 9.2.2: sending these twice has the effect of sending them once."""

PROBE_PATHS: tuple[str, ...] = ("/healthz", "/readyz", "/livez", "/health", "/ready", "/ping")
"""Conventional liveness/readiness probe paths, used when a policy declares none."""

# What each finding leads to, in the words of the December 2022 report.
LOAD = "December 2022: abnormally high load"
RATE_LIMITING = "December 2022: misconfigured rate limiting"
CIRCUIT_BREAKING = "December 2022: misconfigured circuit breaking"
RESTART = "December 2022: the restart that caused downtime"
BUILD_STEPS = "December 2022: failed build steps (no copy to serve)"
LOST_WRITES = "December 2022: missing webhooks and uploads"


@dataclass(frozen=True, slots=True)
class Deployment:
    """What the policy file cannot say: the upstream's capacity and how many call it.

    ``capacity`` is the requests per second the protected upstream serves at best;
    ``clients`` the number of distinct clients (processes, runners, rate-limit keys).
    Rules that need an unknown figure are skipped and listed in a ``needs-deployment``
    finding.
    """

    capacity: float | None = None
    clients: int | None = None

    def __post_init__(self) -> None:
        if self.capacity is not None and not (0 < self.capacity < math.inf):
            raise ValueError("capacity must be a finite number of requests per second > 0")
        if self.clients is not None and self.clients < 1:
            raise ValueError("clients must be at least 1")


@dataclass(frozen=True, slots=True)
class Finding:
    """One dangerous setting: which rule, how bad, where, why (one line) and what instead."""

    rule: str
    severity: Severity
    field: str
    message: str
    suggestion: str
    cause: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


Check = Callable[[Policies, Deployment], Iterator[Finding]]


@dataclass(frozen=True, slots=True)
class Rule:
    """A check with its id, the worst severity it reports and a one-line summary."""

    id: str
    severity: Severity
    summary: str
    check: Check = field(repr=False)
    needs: tuple[str, ...] = ()
    applies: Callable[[Policies], bool] = field(default=lambda p: True, repr=False)


# --------------------------------------------------------------------------- formatting


def _num(x: float) -> str:
    """A figure for a message: integers plain, others with two significant digits."""
    if x == math.inf:
        return "unbounded"
    if abs(x - round(x)) < 1e-9 and abs(x) < 1e15:
        return f"{round(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.2g}" if abs(x) < 1 else f"{x:.3g}"


def _floor2(x: float) -> float:
    """``x`` rounded down to two significant digits (a suggested upper bound stays under it)."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.floor(x / scale + 1e-9) * scale


def _ceil2(x: float) -> float:
    """``x`` rounded up to two significant digits (a suggested lower bound stays above it)."""
    if x <= 0:
        return 0.0
    scale = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / scale - 1e-9) * scale


def _toml(x: float) -> str:
    """A number as a TOML value (``0.04``, ``12``, ``12.5``)."""
    if abs(x - round(x)) < 1e-9:
        return str(round(x))
    return f"{x:.6g}"


def _rate(rule: LimitRule | RateLimitPolicy) -> float:
    """The sustained rate a limit allows, in requests per second (the tightest of its rates)."""
    return min(item.amount / item.get_expiry() for item in rule.items)


def _is_per_key(key: object) -> bool:
    return key != "global"


# --------------------------------------------------------------------------- client rules


def _retry_amplification(p: Policies, d: Deployment) -> Iterator[Finding]:
    """Retries that can, on their own, keep the upstream at capacity (metastable overload).

    With the fleet offering the upstream its whole capacity C in first attempts, each
    client's budget allows ``max(ratio x its first attempts, floor)`` retries per second,
    so the fleet may add ``ratio x C + clients x floor`` (never more than ``attempts - 1``
    per call). Once that reaches C, retries alone hold the upstream at capacity after
    the trigger is gone: an error. A floor that alone exceeds ``ratio x C`` breaks the
    budget's own promise (at most ``ratio`` extra): a warning.
    """
    assert p.client is not None and d.capacity is not None and d.clients is not None
    r = p.client.retry
    if r.attempts < 2:
        return
    c, n = d.capacity, d.clients
    without = (r.attempts - 1) * c
    floor_total = n * r.budget_min_retries_per_second
    with_budget = min(without, r.budget_ratio * c + floor_total)
    numbers = (
        f"at capacity, retries may add {_num(with_budget)} req/s with the budget "
        f"({_num(1 + with_budget / c)}x the load) and {_num(without)} req/s without it "
        f"({r.attempts}x: {r.attempts} attempts x {_num(n)} clients = "
        f"{_num(r.attempts * n)} requests for one failing call each)"
    )
    floor_ok = _floor2(r.budget_ratio * c / n)
    if with_budget >= c:
        where = (
            "client.retry.budget_min_retries_per_second"
            if floor_total >= r.budget_ratio * c
            else "client.retry.budget_ratio"
        )
        # Keep both terms under half of capacity: ratio x C and clients x floor.
        ratio = r.budget_ratio
        if ratio >= 0.5:
            usual = RetryPolicy().budget_ratio  # the library's choice, when it is tighter
            ratio = usual if usual < 0.5 else _floor2(ratio / 2)
        floor = _floor2(ratio * c / n)
        parts = [] if ratio == r.budget_ratio else [f"budget_ratio = {_toml(ratio)}"]
        if floor < r.budget_min_retries_per_second:
            parts.append(f"budget_min_retries_per_second = {_toml(floor)}")
        suggestion = ", ".join(parts)
        yield Finding(
            "retry-amplification",
            "error",
            where,
            f"{numbers}: retries alone can hold the {_num(c)} req/s upstream at capacity",
            suggestion,
            LOAD,
        )
    elif floor_total > r.budget_ratio * c:
        yield Finding(
            "retry-amplification",
            "warning",
            "client.retry.budget_min_retries_per_second",
            f"{numbers}: the per-client floor ({_num(n)} x "
            f"{_num(r.budget_min_retries_per_second)}/s) exceeds budget_ratio "
            f"({_num(r.budget_ratio)}) of capacity",
            f"budget_min_retries_per_second = {_toml(floor_ok)}",
            LOAD,
        )


def _longest_backoff(r: RetryPolicy) -> float:
    """The longest wait the retry schedule can choose between two attempts."""
    return max(
        full_jitter_backoff(k, r.backoff_base, r.backoff_cap, lambda: 1.0)
        for k in range(1, r.attempts)
    )


def _breaker_open_vs_backoff(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    b, r = p.client.breaker, p.client.retry
    if b is None or r.attempts < 2:
        return
    longest = _longest_backoff(r)
    shortest_open = b.open_duration * (1 - b.jitter)
    if shortest_open < longest:
        yield Finding(
            "breaker-open-shorter-than-backoff",
            "warning",
            "client.breaker.open_duration",
            f"an open breaker may close again after {_num(shortest_open)} s, before the "
            f"{_num(longest)} s retry backoff it should outlast: it stops nothing the "
            "backoff was not already stopping",
            f"open_duration = {_toml(_ceil2(longest / (1 - b.jitter)))}",
            CIRCUIT_BREAKING,
        )


def _breaker_window(p: Policies, d: Deployment) -> Iterator[Finding]:
    """A time window that cannot hold ``minimum_calls`` at the rate one client sends."""
    assert p.client is not None and d.capacity is not None and d.clients is not None
    b = p.client.breaker
    if b is None or b.window != "time":
        return
    per_client = d.capacity / d.clients  # each client's share when the fleet runs at capacity
    calls = per_client * b.window_size
    if calls < b.minimum_calls:
        yield Finding(
            "breaker-window-never-fills",
            "error",
            "client.breaker.minimum_calls",
            f"at {_num(per_client)} req/s per client ({_num(d.capacity)} req/s over "
            f"{_num(d.clients)} clients) a {_num(b.window_size)} s window holds "
            f"{_num(calls)} calls, fewer than minimum_calls = {b.minimum_calls}: "
            "the breaker can never trip",
            f"window_size = {_toml(_ceil2(b.minimum_calls / per_client))}"
            + (f" or minimum_calls = {math.floor(calls)}" if calls >= 2 else ""),
            CIRCUIT_BREAKING,
        )


def _breaker_429(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    b = p.client.breaker
    if b is not None and b.count_429_as_failure:
        yield Finding(
            "breaker-trips-on-429",
            "warning",
            "client.breaker.count_429_as_failure",
            "a 429 is one credential's quota, not a failing host: one busy token can open "
            "the per-host breaker for every caller",
            "count_429_as_failure = false",
            CIRCUIT_BREAKING,
        )


def _breaker_absent(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    if p.client.breaker is None:
        yield Finding(
            "breaker-absent",
            "warning",
            "client.breaker",
            "no circuit breaker: during an outage every call still reaches the upstream "
            "(and waits for its timeout) instead of failing fast",
            "a [client.breaker] table",
            CIRCUIT_BREAKING,
        )


def _retry_non_idempotent(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    r = p.client.retry
    unsafe = sorted(r.retry_methods - IDEMPOTENT_METHODS)
    if r.retry_unsafe:
        yield Finding(
            "retry-non-idempotent",
            "error",
            "client.retry.retry_unsafe",
            "every method is retried, so a POST that timed out after the server acted on "
            "it is sent again: duplicated writes",
            f"retry_unsafe = false (send an {r.idempotency_header} header on writes instead)",
            LOST_WRITES,
        )
    if unsafe:
        keep = sorted(r.retry_methods & IDEMPOTENT_METHODS)
        yield Finding(
            "retry-non-idempotent",
            "error",
            "client.retry.retry_methods",
            f"{', '.join(unsafe)} {'is' if len(unsafe) == 1 else 'are'} retried without an "
            "idempotency key: a retried write can be applied twice",
            f"retry_methods = {keep!r} (writes are retried when they carry "
            f"{r.idempotency_header})".replace("'", '"'),
            LOST_WRITES,
        )


def _attempt_timeout(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    t, r = p.client.attempt_timeout, p.client.retry
    if t is not None and t < r.deadline:
        return
    what = "no attempt timeout" if t is None else f"attempt_timeout = {_num(t)} s"
    yield Finding(
        "attempt-timeout-exceeds-deadline",
        "warning",
        "client.attempt_timeout",
        f"{what} against a {_num(r.deadline)} s deadline: one hung attempt uses the whole "
        "call, leaving no time for a retry or a cached answer",
        f"attempt_timeout = {_toml(_floor2(r.deadline / r.attempts))}",
        LOAD,
    )


def _retry_after_ignored(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.client is not None
    r = p.client.retry
    asked = sorted(r.retry_statuses & {429, 503})
    if not r.honor_retry_after and asked:
        yield Finding(
            "retry-after-ignored",
            "warning",
            "client.retry.honor_retry_after",
            f"{', '.join(map(str, asked))} answers are retried without waiting for their "
            "Retry-After: clients return before an overloaded server asked them to",
            "honor_retry_after = true",
            RATE_LIMITING,
        )


# --------------------------------------------------------------------------- server rules


def _limit_field(index: int | None, name: str = "limit") -> str:
    return f"ratelimit.{name}" if index is None else f"ratelimit.rules[{index}].{name}"


def _numbered_rules(rl: RateLimitPolicy) -> list[tuple[int | None, LimitRule]]:
    main = rl.all_rules()[0]
    return [(None, main), *enumerate(rl.rules)]


def _ratelimit_capacity(p: Policies, d: Deployment) -> Iterator[Finding]:
    """Global limits above capacity, and per-client limits whose total nothing bounds."""
    assert p.ratelimit is not None and d.capacity is not None
    c = d.capacity
    bounded = p.shed is not None
    for index, rule in _numbered_rules(p.ratelimit):
        if _is_per_key(rule.key):
            continue
        rate = _rate(rule)
        if rate > c:
            yield Finding(
                "ratelimit-exceeds-capacity",
                "error",
                _limit_field(index),
                f"the global limit {rule.limit!r} allows {_num(rate)} req/s, above the "
                f"upstream's {_num(c)} req/s: it never refuses before the upstream "
                "is overloaded",
                f'limit = "{math.floor(c)}/second"',
                RATE_LIMITING,
            )
        else:
            bounded = True
    if d.clients is None or bounded:
        return
    for index, rule in _numbered_rules(p.ratelimit):
        if not _is_per_key(rule.key):
            continue
        total = _rate(rule) * d.clients
        if total > c:
            yield Finding(
                "ratelimit-exceeds-capacity",
                "error",
                _limit_field(index),
                f"{_num(d.clients)} clients x {rule.limit!r} = {_num(total)} req/s, above "
                f"the {_num(c)} req/s capacity, and nothing bounds the total "
                "(no global limit at or below capacity, no [shed])",
                f'a rule {{ key = "global", limit = "{math.floor(c)}/second" }} or a [shed] table',
                RATE_LIMITING,
            )


def _ratelimit_burst(p: Policies, d: Deployment) -> Iterator[Finding]:
    """A global limit over a long window lets the whole window's allowance come at once."""
    assert p.ratelimit is not None and d.capacity is not None
    c = d.capacity
    for index, rule in _numbered_rules(p.ratelimit):
        if _is_per_key(rule.key) or _rate(rule) > c:  # the latter is ratelimit-exceeds-capacity
            continue
        items = rule.items
        if any(item.get_expiry() <= 1 and item.amount <= c for item in items):
            continue  # a per-second rate caps the burst
        burst = min(item.amount for item in items)
        if burst > c:
            yield Finding(
                "ratelimit-burst",
                "warning",
                _limit_field(index),
                f"the global limit {rule.limit!r} lets {_num(burst)} requests arrive in one "
                f"second, {_num(burst / c)}x the upstream's {_num(c)} req/s",
                f'limit = "{math.floor(c)}/second;{rule.limit}"',
                RATE_LIMITING,
            )


def _ratelimit_fails_closed(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.ratelimit is not None
    if p.ratelimit.on_storage_error == "closed":
        yield Finding(
            "ratelimit-fails-closed",
            "warning",
            "ratelimit.on_storage_error",
            "when the counter storage fails every request is refused: the rate limiter "
            "becomes the outage",
            'on_storage_error = "open" (and a [shed] table to bound load meanwhile)',
            RATE_LIMITING,
        )


def _declared_probes(p: Policies) -> tuple[str, ...]:
    if p.ratelimit is not None:
        paths = tuple(sorted(x for x in p.ratelimit.exempt_paths if not x.endswith("*")))
        if paths:
            return paths
    return PROBE_PATHS


def _health_rate_limited(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.ratelimit is not None
    exempt = p.ratelimit.exempt_paths
    prefixes = tuple(x[:-1] for x in exempt if x.endswith("*"))
    if any(path in exempt or (prefixes and path.startswith(prefixes)) for path in PROBE_PATHS):
        return
    yield Finding(
        "health-check-rate-limited",
        "error",
        "ratelimit.exempt_paths",
        "no health probe path is exempt: a limited probe makes the orchestrator restart "
        "a busy but healthy instance",
        'exempt_paths = ["/healthz", "/readyz", "/livez"] (your probe paths)',
        RESTART,
    )


def _health_sheddable(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.shed is not None
    probes = _declared_probes(p)
    for path in probes:
        cls = p.shed.classify("GET", path)
        if cls is not None and cls.never_shed:
            return
    yield Finding(
        "health-check-sheddable",
        "error",
        "shed.classes",
        f"no class with never_shed matches a probe ({', '.join(probes)}): a shed probe "
        "makes the orchestrator restart a busy but healthy instance",
        'a class { name = "health", path = "^/healthz$", never_shed = true } first',
        RESTART,
    )


def _shedding_absent(p: Policies, d: Deployment) -> Iterator[Finding]:
    if p.shed is None:
        yield Finding(
            "shedding-absent",
            "warning",
            "shed",
            "a rate limit bounds each client, not the total: nothing refuses work past "
            "the server's capacity, so a surge of many clients queues until it collapses",
            "a [shed] table (the adaptive limit needs no capacity figure)",
            LOAD,
        )


def _client_wait(p: Policies) -> tuple[float | None, str]:
    """How long a client waits for an answer: the file's [client] or seawall's own client."""
    client = p.client if p.client is not None else ClientPolicy()
    source = "[client]" if p.client is not None else "seawall's client"
    return client.attempt_timeout, source


def _shed_queue(p: Policies, d: Deployment) -> Iterator[Finding]:
    """A queue that makes requests wait longer than their clients do serves nobody."""
    assert p.shed is not None
    s = p.shed
    if s.max_queue_length == 0:
        return
    waits, source = _client_wait(p)
    if waits is None or s.queue_interval < waits:
        return
    yield Finding(
        "shed-queue-unbounded",
        "warning",
        "shed.queue_interval",
        f"a queued request may wait {_num(s.queue_interval)} s, as long as its client "
        f"waits ({_num(waits)} s, {source} attempt_timeout): the server then works for "
        "clients that already left",
        f"queue_interval = {_toml(max(s.queue_target, _floor2(waits / 10)))}",
        LOAD,
    )


def _stale_off(p: Policies, d: Deployment) -> Iterator[Finding]:
    assert p.cache is not None
    c = p.cache
    if c.max_stale == 0:
        yield Finding(
            "stale-if-error-off",
            "warning",
            "cache.max_stale",
            "a manifest or index page past its freshness is never served when the upstream "
            "fails, so every build step needs a live upstream",
            "max_stale = 86400 (a day) or longer than the outages to ride out",
            BUILD_STEPS,
        )
    if not c.fallback_statuses:
        yield Finding(
            "stale-if-error-off",
            "warning",
            "cache.fallback_statuses",
            "no upstream status makes the cache answer: a 503 or 429 reaches the client "
            "even when a copy is stored",
            "fallback_statuses = [429, 500, 502, 503, 504]",
            BUILD_STEPS,
        )


def _blob_cache(p: Policies, d: Deployment) -> Iterator[Finding]:
    if p.cache is None:
        yield Finding(
            "no-blob-cache",
            "warning",
            "cache",
            "no fallback cache: a layer or wheel already fetched, immutable by its digest, "
            "is fetched again from the overloaded upstream and fails with it",
            "a [cache] table",
            BUILD_STEPS,
        )
    elif not p.cache.extractors:
        yield Finding(
            "no-blob-cache",
            "warning",
            "cache.extractors",
            "no digest extractor: blobs are not recognised as digest-addressed, so no "
            "copy is verified or served as immutable",
            "extractors = "
            + str(list(CachePolicy().extractors)).replace("'", '"'),  # what the library ships
            BUILD_STEPS,
        )


def _has_any(p: Policies) -> bool:
    return any(x is not None for x in (p.ratelimit, p.shed, p.client, p.cache))


RULES: tuple[Rule, ...] = (
    Rule(
        "retry-amplification",
        "error",
        "retries (attempts x clients, with and without the retry budget) against capacity",
        _retry_amplification,
        needs=("capacity", "clients"),
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "retry-non-idempotent",
        "error",
        "non-idempotent methods retried without idempotency keys",
        _retry_non_idempotent,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "attempt-timeout-exceeds-deadline",
        "warning",
        "no per-attempt timeout, or one as long as the call's overall deadline",
        _attempt_timeout,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "retry-after-ignored",
        "warning",
        "429/503 retried without waiting for the server's Retry-After",
        _retry_after_ignored,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "breaker-absent",
        "warning",
        "a client without a circuit breaker",
        _breaker_absent,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "breaker-open-shorter-than-backoff",
        "warning",
        "a breaker open for less time than the retry backoff it should outlast",
        _breaker_open_vs_backoff,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "breaker-window-never-fills",
        "error",
        "a time window that cannot hold minimum_calls at one client's share of capacity",
        _breaker_window,
        needs=("capacity", "clients"),
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "breaker-trips-on-429",
        "warning",
        "a per-host breaker opened by one credential's 429s",
        _breaker_429,
        applies=lambda p: p.client is not None,
    ),
    Rule(
        "ratelimit-exceeds-capacity",
        "error",
        "a global limit above capacity, or per-client limits whose total nothing bounds",
        _ratelimit_capacity,
        needs=("capacity",),
        applies=lambda p: p.ratelimit is not None,
    ),
    Rule(
        "ratelimit-burst",
        "warning",
        "a global limit whose window lets more than a second of capacity arrive at once",
        _ratelimit_burst,
        needs=("capacity",),
        applies=lambda p: p.ratelimit is not None,
    ),
    Rule(
        "ratelimit-fails-closed",
        "warning",
        "refusing every request when the counter storage fails",
        _ratelimit_fails_closed,
        applies=lambda p: p.ratelimit is not None,
    ),
    Rule(
        "health-check-rate-limited",
        "error",
        "health probes not exempt from rate limiting",
        _health_rate_limited,
        applies=lambda p: p.ratelimit is not None,
    ),
    Rule(
        "health-check-sheddable",
        "error",
        "health probes in no never_shed class",
        _health_sheddable,
        applies=lambda p: p.shed is not None,
    ),
    Rule(
        "shedding-absent",
        "warning",
        "a server policy that refuses nothing past capacity",
        _shedding_absent,
        applies=lambda p: p.ratelimit is not None,
    ),
    Rule(
        "shed-queue-unbounded",
        "warning",
        "a shed queue that holds requests as long as their clients wait",
        _shed_queue,
        applies=lambda p: p.shed is not None,
    ),
    Rule(
        "stale-if-error-off",
        "warning",
        "metadata never served stale when the upstream fails",
        _stale_off,
        applies=lambda p: p.cache is not None,
    ),
    Rule(
        "no-blob-cache",
        "warning",
        "no cache (or no digest extractor) for digest-addressed blobs",
        _blob_cache,
        applies=_has_any,
    ),
)
"""Every rule, in report order. ``needs-deployment`` (info) lists the rules skipped."""

_FLAG_VALUES = {"--capacity": "RPS", "--clients": "N"}

RULE_IDS = frozenset(r.id for r in RULES) | {"needs-deployment"}


def check_policies(
    policies: Policies,
    *,
    capacity: float | None = None,
    clients: int | None = None,
    rules: Sequence[Rule] = RULES,
) -> list[Finding]:
    """Run every rule that applies to ``policies``; errors first, then warnings, then info."""
    deployment = Deployment(capacity, clients)
    known = {"capacity": capacity, "clients": clients}
    findings: list[Finding] = []
    skipped: dict[str, list[str]] = {}
    for rule in rules:
        if not rule.applies(policies):
            continue
        missing = [n for n in rule.needs if known[n] is None]
        if missing:
            skipped.setdefault(" and ".join(f"--{m}" for m in missing), []).append(rule.id)
            continue
        findings.extend(rule.check(policies, deployment))
    for flags, ids in skipped.items():
        findings.append(
            Finding(
                "needs-deployment",
                "info",
                "",
                f"not checked without {flags}: {', '.join(ids)}",
                " ".join(f"{flag} {_FLAG_VALUES[flag]}" for flag in flags.split(" and ")),
                "",
            )
        )
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return findings


def exit_code(findings: Sequence[Finding]) -> int:
    """1 when any finding is an error (for CI), else 0."""
    return 1 if any(f.severity == "error" for f in findings) else 0


def summary(findings: Sequence[Finding]) -> dict[str, int]:
    """How many findings of each severity."""
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}


def report_dict(
    findings: Sequence[Finding], *, path: str, capacity: float | None, clients: int | None
) -> dict[str, Any]:
    """The ``--json`` document."""
    return {
        "file": path,
        "capacity": capacity,
        "clients": clients,
        "ok": exit_code(findings) == 0,
        "summary": summary(findings),
        "findings": [f.to_dict() for f in findings],
    }
