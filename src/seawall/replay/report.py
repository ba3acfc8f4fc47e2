"""The replay's outputs: a JSON summary, a Markdown report and PNG charts (matplotlib Agg).

One or several seeds: each scenario's numbers are the median over the seeds, with their
[min, max] spread (one seed: the spread is the value itself). Charts, from the first seed:
``goodput.png`` (useful responses per second against both ideals), ``latency.png``,
``queue.png`` (server queue depth, crashes and downtime), ``decisions.png`` (seawall's
decisions per second) and ``scenarios.png`` (surge goodput and on-time build steps of every
scenario, median and spread over the seeds: the ablations at a glance).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seawall.replay.metrics import GoalCheck, ScenarioResult, aggregate, check_goals
from seawall.replay.runner import ReplayResult, time_constants
from seawall.replay.simulator import SimConfig

__all__ = [
    "TABLE_ROWS",
    "Summary",
    "format_cell",
    "summarize_seeds",
    "summary_dict",
    "write_json",
    "write_report",
]

_COLORS = {
    "unprotected": "#d62728",
    "conventional": "#ff7f0e",
    "seawall": "#1f77b4",
    "seawall-tuned": "#2ca02c",
    "policy": "#9467bd",
}
_CHARTED = ("unprotected", "conventional", "seawall", "seawall-tuned", "policy")

TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("goodput, surge (cache-credited ideal)", "goodput_ratio_surge", "{:.0%}"),
    ("goodput, surge (raw capacity)", "goodput_ratio_raw_surge", "{:.0%}"),
    ("goodput, run (cache-credited ideal)", "goodput_ratio", "{:.0%}"),
    ("build steps on time", "build_step_success_ratio", "{:.1%}"),
    ("  bound", "build_step_success_bound", "{:.1%}"),
    ("build steps late", "late_build_steps", "{:.0f}"),
    ("build steps failed", "failed_build_steps", "{:.0f}"),
    ("amplification (of planned)", "retry_amplification", "{:.2f}"),
    ("requests reaching the server", "origin_requests", "{:.0f}"),
    ("p50 / p99 ms", "p50_ms", "{:.0f}"),
    ("wasted work", "wasted_work_ratio", "{:.0%}"),
    ("crashes", "crashes", "{:.0f}"),
    ("recovery s", "recovery_seconds", "{:.0f}"),
    ("webhooks lost", "webhooks_lost", "{:.0f}"),
    ("webhooks late (redelivered)", "webhooks_late", "{:.0f}"),
    ("uploads lost", "uploads_lost", "{:.0f}"),
    ("valid", "valid", "{}"),
)
"""The rows of the console and Markdown tables: (label, field, format)."""


@dataclasses.dataclass(slots=True)
class Summary:
    """Several seeds of the same scenarios, reduced to median and spread."""

    runs: list[ReplayResult]
    medians: dict[str, dict[str, Any]]
    spreads: dict[str, dict[str, list[Any]]]
    checks: list[GoalCheck]

    @property
    def first(self) -> ReplayResult:
        return self.runs[0]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.runs)

    def invalid(self) -> list[dict[str, Any]]:
        """Each invalid run: seed, scenario and why."""
        return [
            {"seed": run.seed, "scenario": r.scenario, "reasons": r.invalid_reasons}
            for run in self.runs
            for r in run.results
            if not r.valid
        ]

    def scenario_names(self) -> list[str]:
        return [r.scenario for r in self.first.results]


def _as_result(median: dict[str, Any]) -> ScenarioResult:
    names = {f.name for f in dataclasses.fields(ScenarioResult)}
    return ScenarioResult(**{k: v for k, v in median.items() if k in names})


def summarize_seeds(runs: Sequence[ReplayResult]) -> Summary:
    """Median and spread per scenario over ``runs`` (one per seed); goals are checked on
    the medians. An invalid run has no verdict: a scenario's goals are checked only when
    every run of it, and of the conventional scenario its ratio reads, was valid."""
    medians: dict[str, dict[str, Any]] = {}
    spreads: dict[str, dict[str, list[Any]]] = {}
    for name in [r.scenario for r in runs[0].results]:
        per_seed = [next(r for r in run.results if r.scenario == name) for run in runs]
        medians[name], spreads[name] = aggregate(per_seed)
    conventional_valid = medians.get("conventional", {"valid": True})["valid"]
    results = [_as_result(m) for m in medians.values()]
    checks = [
        c
        for c in check_goals(results, runs[0].profile.goals)
        if medians[c.scenario]["valid"] and conventional_valid
    ]
    return Summary(list(runs), medians, spreads, checks)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _sim_config(run: ReplayResult) -> SimConfig:
    from seawall.replay.profile import sim_config_from

    config: SimConfig = sim_config_from(run.profile.server)
    return config


def summary_dict(summary: Summary, *, series: bool = False) -> dict[str, Any]:
    """What ``--json`` writes: the run's parameters and each scenario's numbers."""
    from seawall.replay.load import LoadConfig

    first = summary.first
    sched = first.schedule
    scenarios: dict[str, Any] = {}
    for name, median in summary.medians.items():
        doc = dict(median)
        doc["spread"] = summary.spreads[name]
        scenarios[name] = doc
    out: dict[str, Any] = {
        "profile": first.profile.name,
        "quick": first.quick,
        "seed": first.seed,
        "seeds": summary.seeds,
        "sockets": first.sockets,
        "simulated_seconds": sched.duration,
        "seconds_per_hour": sched.seconds_per_hour,
        "compressed": False,
        "surge_seconds": list(sched.surge),
        "planned": {
            "build_steps": first.plan.steps,
            "webhooks": first.plan.webhooks,
            "uploads": first.plan.uploads,
            "requests": first.plan.requests,
        },
        "valid": summary.valid,
        "invalid": summary.invalid(),
        "scenarios": scenarios,
        "verdicts": [dataclasses.asdict(c) for c in summary.checks],
        "time_constants": time_constants(_sim_config(first), LoadConfig()),
        "runs": [
            {
                "seed": run.seed,
                "planned": {"build_steps": run.plan.steps, "requests": run.plan.requests},
                "scenarios": {
                    r.scenario: {**r.headline(), **({"series": r.series} if series else {})}
                    for r in run.results
                },
            }
            for run in summary.runs
        ],
    }
    return _clean(out)  # type: ignore[no-any-return]


def write_json(summary: Summary, path: str | Path, *, series: bool = False) -> Path:
    """The summary as JSON; ``series`` adds the per-second series (report directories)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = summary_dict(summary, series=series)
    p.write_text(json.dumps(doc, indent=None if series else 2) + "\n", encoding="utf-8")
    return p


def format_cell(median: dict[str, Any], spread: dict[str, list[Any]], key: str, fmt: str) -> str:
    """``median`` alone (one seed) or ``median [min-max]``; ``never`` for no recovery."""

    def one(v: Any) -> str:
        if v is None:
            return "never"
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, float) and not math.isfinite(v):
            return "n/a"
        return fmt.format(v)

    value = median.get(key)
    if key == "p50_ms":
        return f"{one(value)} / {one(median.get('p99_ms'))}"
    text = one(value)
    lo, hi = (spread.get(key) or [None, None])[:2]
    if median.get("seeds", 1) > 1 and key in spread and (lo != hi):
        text += f" [{one(lo)}-{one(hi)}]"
    return text


def _table(summary: Summary) -> list[str]:
    names = summary.scenario_names()
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, key, fmt in TABLE_ROWS:
        cells = [format_cell(summary.medians[n], summary.spreads[n], key, fmt) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _fmt_value(value: float | None) -> str:
    if value is None:
        return "never"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else "n/a"
    return str(value)


# --------------------------------------------------------------------------- charts


def _shade(ax: Any, replay: ReplayResult) -> None:
    s0, s1 = replay.schedule.surge
    ax.axvspan(s0, s1, color="#f2c14e", alpha=0.18, lw=0, label="surge")
    for t, _event in replay.schedule.events:
        ax.axvline(t, color="#888888", lw=0.6, ls=":")


def _clock_axis(ax: Any, replay: ReplayResult) -> None:
    sched = replay.schedule
    n = max(2, int(sched.duration))
    step = max(1, n // 8)
    ticks = list(range(0, n + 1, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}s\n{sched.clock_label(t)}" for t in ticks], fontsize=8)
    ax.set_xlim(0, sched.duration)
    ax.grid(True, alpha=0.25)


def _save(fig: Any, ax: Any, replay: ReplayResult, path: Path, caption: str) -> tuple[str, str]:
    """Finish a time-series chart the same way for all: clock axis, legend outside, PNG."""
    import matplotlib.pyplot as plt

    _clock_axis(ax, replay)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return caption, path.name


def _plots(summary: Summary, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replay = summary.first
    results = [r for r in replay.results if r.scenario in _CHARTED]
    made: list[tuple[str, str]] = []
    title = replay.profile.name + (" (--quick)" if replay.quick else "") + f", seed {replay.seed}"

    def color(name: str) -> str:
        return _COLORS.get(name, "#8c564b")

    t = list(range(len(replay.plan.ideal)))
    fig, ax = plt.subplots(figsize=(13, 5.2), dpi=110)
    _shade(ax, replay)
    ax.step(t, replay.plan.offered, where="post", color="#bbbbbb", lw=1.2, label="offered")
    ax.step(t, replay.plan.ideal, where="post", color="black", lw=2, ls="--", label="ideal")
    ax.step(
        t, replay.plan.ideal_raw, where="post", color="black", lw=1, ls=":", label="raw capacity"
    )
    for i, r in enumerate(results):
        ax.step(
            t,
            r.series["useful"],
            where="post",
            color=color(r.scenario),
            lw=max(1.2, 3.2 - 0.6 * i),
            alpha=0.9,
            zorder=3 + i,
            label=f"{r.scenario} (surge {r.goodput_ratio_surge:.0%})",
        )
        for c in r.series.get("crash_times", []):
            ax.axvline(c, color=color(r.scenario), lw=1, ls="-.", alpha=0.7)
    ax.set_ylabel("useful responses / s (by planned time)")
    ax.set_title(f"Goodput against the ideals: {title}  (dash-dot: crashes)")
    made.append(_save(fig, ax, replay, out / "goodput.png", "Goodput against the ideals"))

    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    _shade(ax, replay)
    for r in results:
        for key, ls in (("p50_ms", "-"), ("p99_ms", "--")):
            ys = [v if v is not None else math.nan for v in r.series[key]]
            ax.step(t, ys, where="post", color=color(r.scenario), ls=ls, lw=1.5,
                    label=f"{r.scenario} {key[:3]}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylabel("ms until answered or given up (log)")
    ax.set_title(f"Latency percentiles per second: {title}")
    made.append(_save(fig, ax, replay, out / "latency.png", "Latency percentiles"))

    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    _shade(ax, replay)
    for r in results:
        ax.step(t, r.series["queue_max"], where="post", color=color(r.scenario), lw=1.6,
                label=f"{r.scenario} queue (crashes: {r.crashes})")  # fmt: skip
        down = [d > 0 for d in r.series["down_fraction"]]
        if any(down):
            top = max(1, max(r.series["queue_max"]))
            ax.fill_between(t, 0, [top if d else 0 for d in down], step="post",
                            color=color(r.scenario), alpha=0.12,
                            label=f"{r.scenario} down (restarting)")  # fmt: skip
    ax.set_ylabel("server accept queue (max per second)")
    ax.set_title(f"Server queue depth and downtime: {title}")
    made.append(_save(fig, ax, replay, out / "queue.png", "Queue depth, crashes and downtime"))

    protected = [r for r in results if r.series["events"]]
    if protected:
        fig, axes = plt.subplots(
            len(protected), 1, figsize=(13, 3.6 * len(protected)), dpi=110, squeeze=False
        )
        keys = ("shed.shed", "limited", "served", "rejected", "budget_exhausted", "scheduled")
        # one colour per decision in every panel, so panels compare at a glance
        shown = sorted(
            {n for r in protected for n in r.series["events"] if any(k in n for k in keys)}
        )
        palette = plt.get_cmap("tab10")
        hue = {name: palette(i % 10) for i, name in enumerate(shown)}
        for ax, r in zip(axes[:, 0], protected, strict=True):
            _shade(ax, replay)
            events = r.series["events"]
            wanted = [name for name in shown if name in events]
            for name in wanted[:8]:
                ax.step(t, events[name], where="post", lw=1.3, label=name, color=hue[name])
            ax.set_ylabel("decisions / s")
            ax.set_title(f"{r.scenario}: seawall's decisions per second")
            _clock_axis(ax, replay)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "decisions.png")
        plt.close(fig)
        made.append(("seawall's decisions", "decisions.png"))

    names = summary.scenario_names()
    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    width = 0.4
    for offset, key, label in (
        (-width / 2, "goodput_ratio_surge", "surge goodput (of the cache-credited ideal)"),
        (width / 2, "build_step_success_ratio", "build steps on time"),
    ):
        meds = [summary.medians[n][key] or 0.0 for n in names]
        lows = [m - (summary.spreads[n][key][0] or 0.0) for n, m in zip(names, meds, strict=True)]
        highs = [(summary.spreads[n][key][1] or 0.0) - m for n, m in zip(names, meds, strict=True)]
        xs = [i + offset for i in range(len(names))]
        ax.bar(xs, meds, width, label=label, yerr=[lows, highs], capsize=3)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.2)
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(loc="upper center", ncol=2, fontsize=9)
    seeds = ", ".join(str(s) for s in summary.seeds)
    ax.set_title(f"Every scenario, median and spread over seeds {seeds}")
    fig.tight_layout()
    fig.savefig(out / "scenarios.png")
    plt.close(fig)
    made.append(("Every scenario (ablations included)", "scenarios.png"))
    return made


def write_report(summary: Summary, out_dir: str | Path) -> Path:
    """Write ``report.md``, the PNG charts and ``summary.json`` into ``out_dir``."""
    from seawall.replay.load import LoadConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = _plots(summary, out)
    first = summary.first
    sched = first.schedule
    prof = first.profile
    seeds = ", ".join(str(s) for s in summary.seeds)
    lines = [
        f"# Replay: {prof.title}",
        "",
        f"Profile `{prof.name}`{' (--quick)' if first.quick else ''}, seeds {seeds}"
        f"{', over loopback TCP (uvicorn)' if first.sockets else ', in-process'}: "
        f"{sched.clock_label(0)}-{sched.clock_label(sched.duration)} replayed in "
        f"{sched.duration:.0f} real seconds (shortened, not compressed: every time constant "
        f"is real); surge {sched.clock_label(sched.surge[0])}-{sched.clock_label(sched.surge[1])}"
        f" = {sched.surge[0]:.0f}-{sched.surge[1]:.0f} s. Planned (seed {first.seed}): "
        f"{first.plan.steps} build steps, {first.plan.webhooks} webhook deliveries, "
        f"{first.plan.uploads} uploads, {first.plan.requests} requests.",
        "",
        prof.description,
        "",
    ]
    if not summary.valid:
        lines += [
            "## INVALID runs",
            "",
            "The harness, not the simulated server, was the bottleneck in these runs; their "
            "figures say nothing about the server, and no goal is checked on them:",
            "",
            *[
                f"- seed {x['seed']}, {x['scenario']}: {'; '.join(x['reasons'])}"
                for x in summary.invalid()
            ],
            "",
        ]
    lines += [
        "## Results" + (" (median [min-max] over the seeds)" if len(summary.runs) > 1 else ""),
        "",
        *_table(summary),
        "",
        "Goodput is useful responses (correct, on time, of a build step that succeeded on "
        "time) over the cache-credited ideal `min(offered, capacity + cache-servable)` or the "
        "raw-capacity ideal `min(offered, capacity)` per second; the bound is the best any "
        "system could do for whole build steps (see docs/replay.md).",
        "",
    ]
    if summary.valid:
        lines += [
            "## Goals (on the medians)",
            "",
            "| scenario | goal | value | |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {c.scenario} | {c.goal} | {_fmt_value(c.value)} | {'met' if c.ok else 'NOT MET'} |"
            for c in summary.checks
        ]
        lines.append("")
    lines += ["## Scenarios", ""]
    for r in first.results:
        mech = "; ".join(r.mechanisms) if r.mechanisms else "none"
        lines.append(f"- **{r.scenario}**: {r.description}. Built as: {mech}.")
    lines += ["", "## Validity", ""]
    lines += ["| seed | scenario | loop lag p99 ms | stalled | CPU/wall | drift p99 / max ms |"]
    lines += ["|---|---|---|---|---|---|"]
    for run in summary.runs:
        for r in run.results:
            lines.append(
                f"| {run.seed} | {r.scenario} | {r.loop_lag_p99_ms:.1f} | "
                f"{r.loop_stall_fraction:.1%} | {r.cpu_ratio:.0%} | "
                f"{r.arrival_drift_p99_ms:.1f} / {r.arrival_drift_max_ms:.0f} |"
            )
    lines += ["", "## Time constants (real seconds, the same in --quick)", ""]
    for name, value in time_constants(_sim_config(first), LoadConfig()).items():
        lines.append(f"- {name}: {value:g} s")
    lines += ["", "## Phases", ""]
    for seg in sched.segments:
        ph = seg.phase
        load = ", ".join(f"{k} {v:g}x" for k, v in ph.load.items())
        lines.append(
            f"- {sched.clock_label(seg.t0)} ({seg.t0:.0f} s, {seg.t1 - seg.t0:.0f} s long) "
            f"**{ph.name}**: {load}; capacity {ph.capacity:g}. {ph.note}"
        )
    lines += ["", "## Charts", ""]
    for caption, name in charts:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(summary, out / "summary.json", series=True)
    return path
