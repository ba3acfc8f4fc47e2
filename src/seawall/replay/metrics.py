"""What a replay measured, as ratios to the best any system could have done.

:class:`ObservationLog` collects raw observations while a scenario runs (logical requests,
build steps, deliveries, requests that left the clients, server samples, event-loop lag,
arrival drift, seawall's decision events); :func:`summarize` turns them into a
:class:`ScenarioResult`; :func:`judge_validity` says whether the harness, not the simulated
server, was the bottleneck; :func:`check_goals` checks the issue's goals and
:func:`aggregate` gives median and spread over seeds. Definitions are in docs/replay.md; in
short:

- ``goodput_ratio``: useful responses / the *cache-credited* ideal, where the ideal each
  second is ``S + min(U, U * slots / work(U))`` (S the requests a shared verified cache
  could serve, U the rest); ``goodput_ratio_raw``: useful responses / the *raw-capacity*
  ideal ``min(D, D * slots / work(D))`` (no cache credit: above 1 means caches helped). A
  response is *useful* when it is correct, on time, and (for image pulls) its build step
  succeeded on time.
- ``build_step_success_bound``: ``sum(ideal) / sum(offered)``: a step needs every one of
  its fetches, so at most that fraction of whole steps can succeed.
- ``retry_amplification``: requests that left the clients / every planned request.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from seawall.events import Event

__all__ = [
    "GOALS",
    "VALIDITY_LIMITS",
    "GoalCheck",
    "ObservationLog",
    "Sample",
    "ScenarioResult",
    "Validity",
    "aggregate",
    "check_goals",
    "judge_validity",
    "percentile",
    "summarize",
]

RECOVERY_WINDOW = 5
"""Recovery: the first window of this many seconds after the surge ..."""
RECOVERY_RATIO = 0.99
"""... in which at least this fraction of the build steps planned succeeded on time."""


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class Sample:
    t: float
    queue: int
    busy: int
    slots: int
    memory_mib: float
    down: bool


class ObservationLog:
    """Raw observations of one scenario, in seconds since its start."""

    def __init__(self) -> None:
        self.now = 0.0  # updated by the runner's sampler; buckets upstream requests and events
        self.requests: list[tuple[str, float, bool, bool, float | None]] = []
        self.steps: list[tuple[float, float, str, str]] = []  # (planned, ended, outcome, why)
        self.deliveries: Counter[tuple[str, str]] = Counter()  # (kind, outcome)
        self.upstream_by_second: Counter[int] = Counter()
        self.upstream_errors_by_second: Counter[int] = Counter()
        self.upstream_total = 0
        self.statuses: Counter[str] = Counter()
        self.samples: list[Sample] = []
        self.lags: list[tuple[float, float]] = []
        self.drifts: list[float] = []
        self.events_by_second: dict[str, Counter[int]] = {}
        self.breaker_state: list[tuple[float, str, int]] = []  # (t, new state, not closed)
        self._breakers: dict[str, str] = {}

    # -- from the load generator

    def request(
        self, kind: str, at: float, *, ok: bool, useful: bool, latency: float | None
    ) -> None:
        self.requests.append((kind, at, ok, useful, latency))

    def step(self, planned: float, ended: float, outcome: str, reason: str) -> None:
        """``outcome`` is ``on_time``, ``late`` or ``failed``."""
        self.steps.append((planned, ended, outcome, reason))

    def delivery(self, kind: str, outcome: str) -> None:
        """A webhook or upload ended ``on_time``, ``late`` (redelivered) or ``lost``."""
        self.deliveries[(kind, outcome)] += 1

    def drift(self, seconds: float) -> None:
        """How late the generator sent an arrival against its plan."""
        self.drifts.append(seconds)

    def upstream_sent(self) -> None:
        self.upstream_total += 1
        self.upstream_by_second[int(self.now)] += 1

    def upstream_answered(self, status: int | None) -> None:
        key = "error" if status is None else f"{status // 100}xx" if status < 400 else str(status)
        self.statuses[key] += 1
        if status is None or status >= 500 or status == 429:
            self.upstream_errors_by_second[int(self.now)] += 1

    def reset_upstream(self) -> None:
        """Forget warm-up traffic."""
        self.upstream_total = 0
        self.upstream_by_second.clear()
        self.upstream_errors_by_second.clear()
        self.statuses.clear()

    # -- from the runner

    def sample(self, sample: Sample) -> None:
        self.now = sample.t
        self.samples.append(sample)

    def lag(self, t: float, lag: float) -> None:
        self.lags.append((t, lag))

    def on_event(self, event: Event) -> None:
        """EventBus listener: counts seawall's decisions per second, tracks breaker state."""
        name = event.name
        self.events_by_second.setdefault(name, Counter())[int(self.now)] += 1
        if name == "breaker.state_changed":
            new = getattr(event, "new", None)
            label = str(getattr(new, "value", new))
            self._breakers[str(getattr(event, "breaker", "?"))] = label
            opened = sum(1 for v in self._breakers.values() if v != "closed")
            self.breaker_state.append((self.now, label, opened))


# --------------------------------------------------------------------------- validity


VALIDITY_LIMITS: dict[str, float] = {
    "loop_lag_p99_ms": 20.0,
    "loop_stall_fraction": 0.02,
    "cpu_ratio": 0.85,
    "arrival_drift_p99_ms": 20.0,
    "arrival_drift_max_ms": 500.0,
}
"""Past any of these the harness, not the simulated server, was the bottleneck.

A 20 ms p99 lag is a fifth of a manifest's 100 ms service time (the shortest job is a
1 KiB blob, 52 ms); a stall is a lag over ``STALL_MIN_MS``; ``cpu_ratio`` is the process's
CPU time over wall time: an event loop busy 85% of the time is saturated; arrival drift is
how late the generator sent requests against the plan."""

STALL_MIN_MS = 50.0


@dataclass(frozen=True, slots=True)
class Validity:
    """Whether a run measured the simulated server, and if not, why not."""

    valid: bool
    reasons: tuple[str, ...]
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    loop_stall_fraction: float
    cpu_ratio: float
    arrival_drift_p99_ms: float
    arrival_drift_max_ms: float


def judge_validity(
    *,
    lags: Iterable[float],
    drifts: Iterable[float],
    cpu_seconds: float,
    wall_seconds: float,
    limits: Mapping[str, float] | None = None,
) -> Validity:
    """Judge a run from its measurements (seconds); pure, so tests inject them."""
    lim = {**VALIDITY_LIMITS, **(limits or {})}
    lags_ms = [x * 1000 for x in lags]
    drift_ms = [max(0.0, x) * 1000 for x in drifts]
    lag_p99 = percentile(lags_ms, 99) if lags_ms else 0.0
    stall = sum(x for x in lags_ms if x > STALL_MIN_MS) / 1000
    stall_fraction = stall / wall_seconds if wall_seconds > 0 else 0.0
    cpu = cpu_seconds / wall_seconds if wall_seconds > 0 else 0.0
    d99 = percentile(drift_ms, 99) if drift_ms else 0.0
    dmax = max(drift_ms) if drift_ms else 0.0
    measured = {
        "loop_lag_p99_ms": lag_p99,
        "loop_stall_fraction": stall_fraction,
        "cpu_ratio": cpu,
        "arrival_drift_p99_ms": d99,
        "arrival_drift_max_ms": dmax,
    }
    units = {"loop_stall_fraction": "{:.1%}", "cpu_ratio": "{:.0%}"}
    reasons = tuple(
        f"{name} {units.get(name, '{:.0f}').format(value)} > "
        f"{units.get(name, '{:.0f}').format(lim[name])}"
        for name, value in measured.items()
        if value > lim[name]
    )
    if not lags_ms:
        reasons += ("no event-loop lag measured",)
    return Validity(
        valid=not reasons,
        reasons=reasons,
        loop_lag_p99_ms=lag_p99,
        loop_lag_max_ms=max(lags_ms) if lags_ms else 0.0,
        loop_stall_fraction=stall_fraction,
        cpu_ratio=cpu,
        arrival_drift_p99_ms=d99,
        arrival_drift_max_ms=dmax,
    )


# --------------------------------------------------------------------------- results


@dataclass(slots=True)
class ScenarioResult:
    """The headline numbers of one scenario (``--json``) plus series for the plots."""

    scenario: str
    description: str
    mechanisms: list[str]
    goodput_ratio: float
    goodput_ratio_surge: float
    goodput_ratio_raw: float
    goodput_ratio_raw_surge: float
    build_step_success_ratio: float
    build_step_success_ratio_surge: float
    build_step_success_bound: float
    build_step_success_bound_surge: float
    build_steps: int
    failed_build_steps: int
    late_build_steps: int
    retry_amplification: float
    upstream_requests: int
    origin_requests: int
    planned_requests: int
    logical_requests: int
    p50_ms: float
    p99_ms: float
    wasted_work_ratio: float
    server_utilization_surge: float
    crashes: int
    recovery_seconds: float | None
    webhooks_lost: int
    webhooks_late: int
    webhooks_duplicated: int
    uploads_lost: int
    valid: bool
    invalid_reasons: list[str]
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    loop_stall_fraction: float
    cpu_ratio: float
    arrival_drift_p99_ms: float
    arrival_drift_max_ms: float
    wall_seconds: float
    statuses: dict[str, int] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> dict[str, Any]:
        """Everything except the per-second series (what the JSON summary and table show)."""
        out = asdict(self)
        out.pop("series")
        return out


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def recovery_after(
    steps: Iterable[tuple[float, float, str, str]], surge_end: float, run_end: float
) -> float | None:
    """Seconds from the surge's end to the start of the first ``RECOVERY_WINDOW``-second
    window whose planned steps succeeded on time at ``RECOVERY_RATIO`` or better; None if
    no window did before the run ended (a window with no step planned proves nothing and
    is skipped)."""
    by_second: dict[int, list[bool]] = {}
    for planned, _ended, outcome, _why in steps:
        if planned >= surge_end:
            by_second.setdefault(int(planned - surge_end), []).append(outcome == "on_time")
    last = int(run_end - surge_end) - RECOVERY_WINDOW
    for start in range(0, last + 1):
        window = [ok for s in range(start, start + RECOVERY_WINDOW) for ok in by_second.get(s, ())]
        if window and sum(window) / len(window) >= RECOVERY_RATIO:
            return float(start)
    return None


def summarize(
    *,
    scenario: str,
    description: str,
    mechanisms: list[str],
    log: ObservationLog,
    ideal: Sequence[float],
    ideal_raw: Sequence[float],
    offered: Sequence[float],
    planned_steps: int,
    planned_webhooks: int,
    surge: tuple[float, float],
    server_stats: Mapping[str, Any],
    validity: Validity,
    wall_seconds: float,
    clock_labels: Sequence[str] = (),
) -> ScenarioResult:
    n = len(ideal)
    useful = [0.0] * n
    lat_by_second: list[list[float]] = [[] for _ in range(n)]
    latencies: list[float] = []
    for _kind, at, _ok, is_useful, latency in log.requests:
        b = min(n - 1, max(0, int(at)))
        if is_useful:
            useful[b] += 1
        if latency is not None:
            latencies.append(latency)
            lat_by_second[b].append(latency)
    s0, s1 = int(surge[0]), max(int(surge[0]) + 1, math.ceil(surge[1]))
    surge_range = range(s0, min(n, s1))

    def ratio(num: Sequence[float], den: Sequence[float], rng: range) -> float:
        d = sum(den[b] for b in rng)
        return sum(num[b] for b in rng) / d if d > 0 else math.nan

    whole = range(n)
    on_time = sum(1 for s in log.steps if s[2] == "on_time")
    late = sum(1 for s in log.steps if s[2] == "late")
    surge_steps = [s for s in log.steps if surge[0] <= s[0] < surge[1]]
    surge_ok = sum(1 for s in surge_steps if s[2] == "on_time")
    planned_requests = round(sum(offered))

    queue_max = [0] * n
    memory_max = [0.0] * n
    down = [0.0] * n
    slots = [0] * n
    counts = [0] * n
    for s in log.samples:
        b = min(n - 1, max(0, int(s.t)))
        queue_max[b] = max(queue_max[b], s.queue)
        memory_max[b] = max(memory_max[b], s.memory_mib)
        down[b] += 1.0 if s.down else 0.0
        slots[b] = max(slots[b], s.slots)
        counts[b] += 1
    down = [d / c if c else 0.0 for d, c in zip(down, counts, strict=True)]
    in_surge = [s for s in log.samples if surge[0] <= s.t < surge[1]]
    utilization = (
        sum(min(1.0, s.busy / s.slots) for s in in_surge) / len(in_surge) if in_surge else math.nan
    )
    lag_max = [0.0] * n
    for t, lag in log.lags:
        b = min(n - 1, max(0, int(t)))
        lag_max[b] = max(lag_max[b], lag * 1000)
    work = float(server_stats.get("work_done", 0.0))

    series: dict[str, Any] = {
        "t": list(range(n)),
        "clock": list(clock_labels),
        "ideal": list(ideal),
        "ideal_raw": list(ideal_raw),
        "offered": list(offered),
        "useful": useful,
        "success_ratio": [u / o if o else None for u, o in zip(useful, offered, strict=True)],
        "p50_ms": [_finite(percentile(v, 50) * 1000) if v else None for v in lat_by_second],
        "p99_ms": [_finite(percentile(v, 99) * 1000) if v else None for v in lat_by_second],
        "queue_max": queue_max,
        "memory_max_mib": memory_max,
        "down_fraction": down,
        "slots": slots,
        "upstream": [log.upstream_by_second.get(b, 0) for b in range(n)],
        "upstream_errors": [log.upstream_errors_by_second.get(b, 0) for b in range(n)],
        "loop_lag_max_ms": lag_max,
        "events": {
            name: [c.get(b, 0) for b in range(n)]
            for name, c in sorted(log.events_by_second.items())
        },
        "breaker_state": log.breaker_state,
        "crash_times": list(server_stats.get("crash_times", [])),
    }
    return ScenarioResult(
        scenario=scenario,
        description=description,
        mechanisms=mechanisms,
        goodput_ratio=ratio(useful, ideal, whole),
        goodput_ratio_surge=ratio(useful, ideal, surge_range),
        goodput_ratio_raw=ratio(useful, ideal_raw, whole),
        goodput_ratio_raw_surge=ratio(useful, ideal_raw, surge_range),
        build_step_success_ratio=on_time / planned_steps if planned_steps else math.nan,
        build_step_success_ratio_surge=surge_ok / len(surge_steps) if surge_steps else math.nan,
        build_step_success_bound=min(1.0, ratio(ideal, offered, whole)),
        build_step_success_bound_surge=min(1.0, ratio(ideal, offered, surge_range)),
        build_steps=planned_steps,
        failed_build_steps=planned_steps - on_time - late,
        late_build_steps=late,
        retry_amplification=log.upstream_total / planned_requests if planned_requests else math.nan,
        upstream_requests=log.upstream_total,
        origin_requests=int(server_stats.get("origin_requests", 0)),
        planned_requests=planned_requests,
        logical_requests=len(log.requests),
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        wasted_work_ratio=float(server_stats.get("wasted_work", 0.0)) / work if work else 0.0,
        server_utilization_surge=utilization,
        crashes=int(server_stats.get("crashes", 0)),
        recovery_seconds=recovery_after(log.steps, surge[1], float(n)),
        webhooks_lost=planned_webhooks - int(server_stats.get("hooks_delivered", 0)),
        webhooks_late=log.deliveries[("webhook", "late")],
        webhooks_duplicated=int(server_stats.get("hooks_duplicated", 0)),
        uploads_lost=log.deliveries[("upload", "lost")],
        valid=validity.valid,
        invalid_reasons=list(validity.reasons),
        loop_lag_p99_ms=validity.loop_lag_p99_ms,
        loop_lag_max_ms=validity.loop_lag_max_ms,
        loop_stall_fraction=validity.loop_stall_fraction,
        cpu_ratio=validity.cpu_ratio,
        arrival_drift_p99_ms=validity.arrival_drift_p99_ms,
        arrival_drift_max_ms=validity.arrival_drift_max_ms,
        wall_seconds=wall_seconds,
        statuses=dict(log.statuses),
        series=series,
    )


# --------------------------------------------------------------------------- goals


GOALS: dict[str, float] = {
    "seawall_surge_goodput_min": 0.9,
    "seawall_vs_conventional_min": 1.5,
    "seawall_step_success_of_bound_min": 0.95,
    "seawall_webhooks_lost_max": 0,
    "seawall_amplification_max": 1.1,
    "seawall_crashes_max": 0,
    "seawall_recovery_max": 5.0,
}
"""The issue's goals for seawall's defaults on the full December replay (5 seeds); a
profile's ``[goals]`` overrides them. Conventional and unprotected have none: their
figures are reported as they come."""

GOAL_SCENARIOS = ("seawall", "seawall-tuned", "policy")
"""The scenarios the goals are checked for (the ablations are diagnostics)."""


@dataclass(frozen=True, slots=True)
class GoalCheck:
    """One goal of the issue checked against one scenario's result."""

    scenario: str
    goal: str
    value: float | None
    ok: bool


def check_goals(
    results: Sequence[ScenarioResult], goals: Mapping[str, float] | None = None
) -> list[GoalCheck]:
    """The issue's goals for each seawall scenario in ``results`` (see :data:`GOALS`).

    The ratio to the conventional scenario is checked only when it ran.
    """
    g = {**GOALS, **(goals or {})}
    conventional = next((r for r in results if r.scenario == "conventional"), None)
    out: list[GoalCheck] = []
    for r in results:
        if r.scenario not in GOAL_SCENARIOS:
            continue

        def add(goal: str, value: float | None, ok: bool, _name: str = r.scenario) -> None:
            out.append(GoalCheck(_name, goal, value, bool(ok)))

        gmin = g["seawall_surge_goodput_min"]
        add(
            f"surge goodput >= {gmin:.0%} of the cache-credited ideal",
            r.goodput_ratio_surge,
            r.goodput_ratio_surge >= gmin,
        )
        if conventional is not None:
            times = g["seawall_vs_conventional_min"]
            base = conventional.goodput_ratio_surge
            value = r.goodput_ratio_surge / base if base > 0 else math.inf
            add(f"surge goodput >= {times:g}x conventional's", value, value >= times)
        smin = g["seawall_step_success_of_bound_min"]
        bound = r.build_step_success_bound
        of_bound = r.build_step_success_ratio / bound if bound > 0 else math.nan
        add(f"build steps on time >= {smin:.0%} of the bound", of_bound, of_bound >= smin)
        lost = g["seawall_webhooks_lost_max"]
        add(f"webhooks lost <= {lost:g}", r.webhooks_lost, r.webhooks_lost <= lost)
        amax = g["seawall_amplification_max"]
        add(
            f"retry amplification <= {amax:g} (of planned requests)",
            r.retry_amplification,
            r.retry_amplification <= amax,
        )
        cmax = g["seawall_crashes_max"]
        add(f"crashes <= {cmax:g}", r.crashes, r.crashes <= cmax)
        rmax = g["seawall_recovery_max"]
        add(
            f"recovery <= {rmax:g} s after the surge",
            r.recovery_seconds,
            r.recovery_seconds is not None and r.recovery_seconds <= rmax,
        )
    return out


# --------------------------------------------------------------------------- seeds


def aggregate(runs: Sequence[ScenarioResult]) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """One scenario over several seeds: the median of each number, and its [min, max].

    A recovery that never happened counts as infinitely long (so a median of "never" is
    reported as never). ``valid`` is true only if every run was valid.
    """
    heads = [r.headline() for r in runs]
    first = heads[0]
    median: dict[str, Any] = {}
    spread: dict[str, list[Any]] = {}
    for key, value in first.items():
        values = [h[key] for h in heads]
        if key == "recovery_seconds":
            nums = [math.inf if v is None else float(v) for v in values]
        elif isinstance(value, bool):
            median[key] = all(values)
            continue
        elif isinstance(value, int | float):
            nums = [float(v) for v in values]
        elif key == "invalid_reasons":
            median[key] = sorted({reason for v in values for reason in v})
            continue
        elif key == "statuses":
            median[key] = {k: sum(v.get(k, 0) for v in values) for k in set().union(*values)}
            continue
        else:
            median[key] = value
            continue
        finite = [x for x in nums if not math.isnan(x)]
        m = statistics.median(finite) if finite else math.nan
        lo, hi = (min(finite), max(finite)) if finite else (math.nan, math.nan)
        if key == "recovery_seconds":
            median[key] = None if math.isinf(m) else m
            spread[key] = [None if math.isinf(lo) else lo, None if math.isinf(hi) else hi]
        else:
            median[key] = m
            spread[key] = [lo, hi]
    median["seeds"] = len(runs)
    return median, spread
