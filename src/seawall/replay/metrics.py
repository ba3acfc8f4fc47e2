"""What a replay measured, as ratios to the best any system could have done.

:class:`Recorder` collects raw observations while a scenario runs (logical requests, build
steps, requests that left the clients, server samples, event-loop lag, seawall's decision
events); :func:`summarize` turns them into a :class:`ScenarioResult` with the headline
numbers and per-second series for the plots. Definitions are in docs/replay.md; in short:

- ``goodput_ratio``: useful responses / ideal, where the ideal each second is
  ``S + min(U, U * slots / work(U))`` = ``min(offered, capacity + cache-servable)`` (S the
  cache-servable requests, U the rest). A response is *useful* when it is correct, arrived
  in time, and (for image pulls) its build step succeeded: a layer of a failed step is work
  nobody could use.
- ``build_step_success_bound``: ``sum(ideal) / sum(offered)`` = ``min(1, (S + C) / D)``:
  a step needs every one of its fetches, so at most that fraction of whole steps can
  succeed however the served requests are spread.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from seawall.events import Event

__all__ = [
    "GOALS",
    "LAG_LIMIT_MS",
    "Recorder",
    "ScenarioResult",
    "Verdict",
    "percentile",
    "summarize",
    "verdicts",
]

LAG_LIMIT_MS = 50.0
"""p99 event-loop lag above this means the machine, not the simulator, was the bottleneck."""

STALL_LIMIT = 0.05
"""... and so does a loop stalled (lags over STALL_MIN_MS, summed) for more than 5% of the run."""

STALL_MIN_MS = 50.0
"""Lags shorter than this are timer granularity on a busy machine, not stalls."""

RECOVERY_RATIO = 0.99
RELAPSE_RATIO = 0.9
RECOVERY_WINDOW = 3


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


class Recorder:
    """Raw observations of one scenario, in simulated seconds since its start."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.now = 0.0  # updated by the runner's sampler; used to bucket upstream and events
        self.requests: list[tuple[str, float, bool, bool, float | None]] = []
        self.steps: list[tuple[float, float, bool, str]] = []
        self.upstream_by_second: Counter[int] = Counter()
        self.upstream_errors_by_second: Counter[int] = Counter()
        self.upstream_total = 0
        self.statuses: Counter[str] = Counter()
        self.samples: list[Sample] = []
        self.lags: list[tuple[float, float]] = []
        self.events_by_second: dict[str, Counter[int]] = {}
        self.breaker_state: list[tuple[float, str, int]] = []  # (t, new state, not closed)
        self._breakers: dict[str, str] = {}

    # -- from the load generator

    def request(
        self, kind: str, at: float, *, ok: bool, useful: bool, latency: float | None
    ) -> None:
        self.requests.append((kind, at, ok, useful, latency))

    def step(self, started: float, ended: float, ok: bool, reason: str) -> None:
        self.steps.append((started, ended, ok, reason))

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


@dataclass(slots=True)
class ScenarioResult:
    """The headline numbers of one scenario (``--json``) plus series for the plots."""

    scenario: str
    description: str
    mechanisms: list[str]
    goodput_ratio: float
    goodput_ratio_surge: float
    build_step_success_ratio: float
    build_step_success_ratio_surge: float
    build_step_success_bound: float
    build_step_success_bound_surge: float
    failed_build_steps: int
    build_steps: int
    retry_amplification: float
    upstream_requests: int
    logical_requests: int
    p50_ms: float
    p99_ms: float
    wasted_work_ratio: float
    server_utilization_surge: float
    crashes: int
    recovery_seconds: float | None
    webhooks_lost: int
    webhooks_deferred: int
    webhooks_duplicated: int
    valid: bool
    loop_lag_p99_ms: float
    loop_lag_max_ms: float
    loop_stall_fraction: float
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


def summarize(
    *,
    scenario: str,
    description: str,
    mechanisms: list[str],
    recorder: Recorder,
    ideal: Sequence[float],
    offered: Sequence[float],
    planned_steps: int,
    planned_webhooks: int,
    surge: tuple[float, float],
    server_stats: dict[str, Any],
    webhooks_deferred: int,
    wall_seconds: float,
    clock_labels: Sequence[str] = (),
) -> ScenarioResult:
    n = len(ideal)
    useful = [0.0] * n
    recorded = [0.0] * n
    lat_by_second: list[list[float]] = [[] for _ in range(n)]
    latencies: list[float] = []
    for _kind, at, _ok, is_useful, latency in recorder.requests:
        b = min(n - 1, max(0, int(at)))
        recorded[b] += 1
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
    ok_steps = [s for s in recorder.steps if s[2]]
    surge_steps = [s for s in recorder.steps if surge[0] <= s[0] < surge[1]]
    surge_ok = sum(1 for s in surge_steps if s[2])

    # recovery: the first second after the surge from which a RECOVERY_WINDOW-second
    # window has >= 99% of its offered requests usefully served, for good: a later window
    # below RELAPSE_RATIO (a relapse, as in a metastable collapse) resets it
    width = max(1, min(RECOVERY_WINDOW, n - s1))  # a short tail: one shorter window
    windows = {b: ratio(useful, offered, range(b, b + width)) for b in range(s1, n - width + 1)}
    relapses = [b for b, w in windows.items() if w < RELAPSE_RATIO]
    start = relapses[-1] + 1 if relapses else s1
    recovery: float | None = None
    for b in range(start, n - width + 1):
        if windows[b] >= RECOVERY_RATIO:
            recovery = max(0.0, b - surge[1])
            break

    lags_ms = [lag * 1000 for _, lag in recorder.lags]
    lag_p99 = percentile(lags_ms, 99) if lags_ms else 0.0
    stalled = sum(x for x in lags_ms if x > STALL_MIN_MS) / 1000
    stall = stalled / wall_seconds if wall_seconds > 0 else 0.0
    delivered = server_stats.get("hooks_delivered", 0)
    work = server_stats.get("work_done", 0.0)
    logical = len(recorder.requests)

    queue_max = [0] * n
    memory_max = [0.0] * n
    down = [0.0] * n
    slots = [0] * n
    counts = [0] * n
    for s in recorder.samples:
        b = min(n - 1, max(0, int(s.t)))
        queue_max[b] = max(queue_max[b], s.queue)
        memory_max[b] = max(memory_max[b], s.memory_mib)
        down[b] += 1.0 if s.down else 0.0
        slots[b] = max(slots[b], s.slots)
        counts[b] += 1
    down = [d / c if c else 0.0 for d, c in zip(down, counts, strict=True)]
    in_surge = [s for s in recorder.samples if surge[0] <= s.t < surge[1]]
    utilization = (
        sum(min(1.0, s.busy / s.slots) for s in in_surge) / len(in_surge) if in_surge else math.nan
    )
    lag_max = [0.0] * n
    for t, lag in recorder.lags:
        b = min(n - 1, max(0, int(t)))
        lag_max[b] = max(lag_max[b], lag * 1000)

    series: dict[str, Any] = {
        "t": list(range(n)),
        "clock": list(clock_labels),
        "ideal": list(ideal),
        "offered": list(offered),
        "useful": useful,
        "success_ratio": [u / o if o else None for u, o in zip(useful, offered, strict=True)],
        "p50_ms": [_finite(percentile(v, 50) * 1000) if v else None for v in lat_by_second],
        "p99_ms": [_finite(percentile(v, 99) * 1000) if v else None for v in lat_by_second],
        "queue_max": queue_max,
        "memory_max_mib": memory_max,
        "down_fraction": down,
        "slots": slots,
        "upstream": [recorder.upstream_by_second.get(b, 0) for b in range(n)],
        "upstream_errors": [recorder.upstream_errors_by_second.get(b, 0) for b in range(n)],
        "loop_lag_max_ms": lag_max,
        "events": {
            name: [c.get(b, 0) for b in range(n)]
            for name, c in sorted(recorder.events_by_second.items())
        },
        "breaker_state": recorder.breaker_state,
        "crash_times": server_stats.get("crash_times", []),
    }
    return ScenarioResult(
        scenario=scenario,
        description=description,
        mechanisms=mechanisms,
        goodput_ratio=ratio(useful, ideal, whole),
        goodput_ratio_surge=ratio(useful, ideal, surge_range),
        build_step_success_ratio=len(ok_steps) / planned_steps if planned_steps else math.nan,
        build_step_success_ratio_surge=surge_ok / len(surge_steps) if surge_steps else math.nan,
        build_step_success_bound=min(1.0, ratio(ideal, offered, whole)),
        build_step_success_bound_surge=min(1.0, ratio(ideal, offered, surge_range)),
        failed_build_steps=planned_steps - len(ok_steps),
        build_steps=planned_steps,
        retry_amplification=recorder.upstream_total / logical if logical else math.nan,
        upstream_requests=recorder.upstream_total,
        logical_requests=logical,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        wasted_work_ratio=server_stats.get("wasted_work", 0.0) / work if work else 0.0,
        server_utilization_surge=utilization,
        crashes=int(server_stats.get("crashes", 0)),
        recovery_seconds=recovery,
        webhooks_lost=planned_webhooks - delivered,
        webhooks_deferred=webhooks_deferred,
        webhooks_duplicated=int(server_stats.get("hooks_duplicated", 0)),
        valid=lag_p99 <= LAG_LIMIT_MS and stall <= STALL_LIMIT,
        loop_lag_p99_ms=lag_p99,
        loop_lag_max_ms=max(lags_ms) if lags_ms else 0.0,
        loop_stall_fraction=stall,
        wall_seconds=wall_seconds,
        statuses=dict(recorder.statuses),
        series=series,
    )


GOALS: dict[str, float] = {
    "unprotected_surge_goodput_max": 0.25,
    "unprotected_crashes_min": 1,
    "seawall_surge_goodput_min": 0.9,
    "seawall_step_success_min": 0.95,
    "seawall_amplification_max": 1.1,
    "seawall_recovery_max": 60.0,
}
"""The issue's goals for the full December replay; a profile's ``[goals]`` overrides them."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One goal of the issue checked against one scenario's result."""

    scenario: str
    goal: str
    value: float | None
    ok: bool


def verdicts(
    results: Sequence[ScenarioResult], goals: Mapping[str, float] | None = None
) -> list[Verdict]:
    """The replay's goals: the unprotected system collapses, seawall degrades gracefully.

    ``unprotected``: goodput during the surge < 25% of ideal, at least one crash, still
    degraded when the surge ends. ``seawall`` (and ``policy``): goodput during the surge
    >= 90% of ideal, build steps >= 95% successful or >= 95% of the bound, retry
    amplification <= 1.1, no crash, recovery <= 60 s, no webhook lost. Every scenario:
    valid (the machine was not the bottleneck). ``goals`` overrides :data:`GOALS`.
    """
    g = {**GOALS, **(goals or {})}
    out: list[Verdict] = []
    for r in results:
        name = r.scenario

        def add(goal: str, value: float | None, ok: bool, _name: str = name) -> None:
            out.append(Verdict(_name, goal, value, bool(ok)))

        add("valid (event loop not the bottleneck)", r.loop_lag_p99_ms, r.valid)
        if name == "unprotected":
            gmax = g["unprotected_surge_goodput_max"]
            add(
                f"goodput during surge < {gmax:.0%} of ideal",
                r.goodput_ratio_surge,
                r.goodput_ratio_surge < gmax,
            )
            crashes = int(g["unprotected_crashes_min"])
            if crashes > 0:
                add(f"at least {crashes} crash(es)", r.crashes, r.crashes >= crashes)
            add(
                "still degraded after the surge",
                r.recovery_seconds,
                r.recovery_seconds is None or r.recovery_seconds > 0,
            )
            continue
        bound = r.build_step_success_bound
        smin = g["seawall_step_success_min"]
        steps_ok = r.build_step_success_ratio >= smin or (
            bound < 1 and r.build_step_success_ratio >= smin * bound
        )
        gmin = g["seawall_surge_goodput_min"]
        amax = g["seawall_amplification_max"]
        rmax = g["seawall_recovery_max"]
        add(
            f"goodput during surge >= {gmin:.0%} of ideal",
            r.goodput_ratio_surge,
            r.goodput_ratio_surge >= gmin,
        )
        add(
            f"build steps >= {smin:.0%} (or >= {smin:.0%} of bound)",
            r.build_step_success_ratio,
            steps_ok,
        )
        add(
            f"retry amplification <= {amax:g}", r.retry_amplification, r.retry_amplification <= amax
        )
        add("no crash", r.crashes, r.crashes == 0)
        add(
            f"recovery <= {rmax:g} s after the surge",
            r.recovery_seconds,
            r.recovery_seconds is not None and r.recovery_seconds <= rmax,
        )
        add("no webhook lost", r.webhooks_lost, r.webhooks_lost == 0)
    return out
