"""The replay's outputs: a JSON summary, a Markdown report and PNG charts (matplotlib Agg).

Charts, each with every scenario on the same axes and the surge shaded:
``goodput.png`` (useful responses per second against the ideal), ``latency.png`` (p50 and
p99 per second), ``queue.png`` (server queue depth, crashes and downtime) and
``decisions.png`` (seawall's decisions per second and breaker state changes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from seawall.replay.metrics import ScenarioResult, Verdict, verdicts
from seawall.replay.runner import ReplayResult

__all__ = ["summary_dict", "write_json", "write_report"]

_COLORS = {"unprotected": "#d62728", "seawall": "#1f77b4", "policy": "#2ca02c"}
_HEADLINE = (
    "goodput_ratio",
    "goodput_ratio_surge",
    "build_step_success_ratio",
    "build_step_success_bound",
    "failed_build_steps",
    "retry_amplification",
    "p50_ms",
    "p99_ms",
    "wasted_work_ratio",
    "crashes",
    "recovery_seconds",
    "webhooks_lost",
    "valid",
)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def summary_dict(replay: ReplayResult, *, series: bool = False) -> dict[str, Any]:
    """What ``--json`` writes: the run's parameters and each scenario's numbers."""
    sched = replay.schedule
    out: dict[str, Any] = {
        "profile": replay.profile.name,
        "quick": replay.quick,
        "seed": replay.seed,
        "simulated_seconds": sched.duration,
        "seconds_per_hour": sched.seconds_per_hour,
        "surge_seconds": list(sched.surge),
        "planned": {
            "build_steps": replay.plan.steps,
            "webhooks": replay.plan.webhooks,
            "uploads": replay.plan.uploads,
        },
        "scenarios": {},
        "verdicts": [
            {"scenario": v.scenario, "goal": v.goal, "value": v.value, "ok": v.ok}
            for v in verdicts(replay.results, replay.profile.goals)
        ],
    }
    for r in replay.results:
        doc = r.headline()
        if series:
            doc["series"] = r.series
        out["scenarios"][r.scenario] = doc
    return _clean(out)  # type: ignore[no-any-return]


def write_json(replay: ReplayResult, path: str | Path, *, series: bool = False) -> Path:
    """The summary as JSON; ``series`` adds the per-second series (report directories)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = summary_dict(replay, series=series)
    p.write_text(json.dumps(doc, indent=None if series else 2) + "\n", encoding="utf-8")
    return p


def _fmt(value: Any) -> str:
    if value is None:
        return "never"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _shade(ax: Any, replay: ReplayResult) -> None:
    s0, s1 = replay.schedule.surge
    ax.axvspan(s0, s1, color="#f2c14e", alpha=0.18, lw=0, label="surge")
    for t, _event in replay.schedule.events:
        ax.axvline(t, color="#888888", lw=0.6, ls=":")


def _save(fig: Any, ax: Any, replay: ReplayResult, path: Path, caption: str) -> tuple[str, str]:
    """Finish a time-series chart the same way for all: clock axis, legend outside, PNG."""
    import matplotlib.pyplot as plt  # already loaded by write_report; kept out of import time

    _clock_axis(ax, replay)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return caption, path.name


def _clock_axis(ax: Any, replay: ReplayResult) -> None:
    sched = replay.schedule
    n = max(2, int(sched.duration))
    step = max(1, n // 8)
    ticks = list(range(0, n + 1, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t}s\n{sched.clock_label(t)}" for t in ticks], fontsize=8)
    ax.set_xlim(0, sched.duration)
    ax.grid(True, alpha=0.25)


def _plots(replay: ReplayResult, out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = replay.results
    made: list[tuple[str, str]] = []
    title = replay.profile.name + (" (--quick)" if replay.quick else "")

    def color(name: str) -> str:
        return _COLORS.get(name, "#9467bd")

    # goodput
    fig, ax = plt.subplots(figsize=(13, 5.2), dpi=110)
    _shade(ax, replay)
    t = list(range(len(replay.plan.ideal)))
    ax.step(t, replay.plan.offered, where="post", color="#bbbbbb", lw=1.2, label="offered")
    ax.step(t, replay.plan.ideal, where="post", color="black", lw=2, ls="--", label="ideal")
    for i, r in enumerate(results):
        # later scenarios drawn thinner and on top, so equal curves stay visible
        ax.step(
            t,
            r.series["useful"],
            where="post",
            color=color(r.scenario),
            lw=max(1.2, 3.2 - 1.0 * i),
            alpha=0.9,
            zorder=3 + i,
            label=f"{r.scenario} (surge goodput {r.goodput_ratio_surge:.0%})",
        )
        for c in r.series.get("crash_times", []):
            ax.axvline(c, color=color(r.scenario), lw=1, ls="-.", alpha=0.7)
    ax.set_ylabel("useful responses / s (by offer time)")
    ax.set_title(f"Goodput vs ideal: {title}  (dash-dot lines: crashes)")
    made.append(_save(fig, ax, replay, out / "goodput.png", "Goodput over time against the ideal"))

    # latency
    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    _shade(ax, replay)
    for r in results:
        for key, ls in (("p50_ms", "-"), ("p99_ms", "--")):
            ys = [v if v is not None else math.nan for v in r.series[key]]
            ax.step(
                t,
                ys,
                where="post",
                color=color(r.scenario),
                ls=ls,
                lw=1.5,
                label=f"{r.scenario} {key[:3]}",
            )
    ax.set_yscale("log")
    ax.set_ylabel("ms until answered or given up (log)")
    ax.set_title(f"Latency percentiles per second: {title}")
    made.append(_save(fig, ax, replay, out / "latency.png", "Latency percentiles"))

    # queue depth + downtime
    fig, ax = plt.subplots(figsize=(13, 4.8), dpi=110)
    _shade(ax, replay)
    for r in results:
        ax.step(
            t,
            r.series["queue_max"],
            where="post",
            color=color(r.scenario),
            lw=1.6,
            label=f"{r.scenario} queue (crashes: {r.crashes})",
        )
        down = r.series["down_fraction"]
        ys = [(d > 0) for d in down]
        if any(ys):
            ax.fill_between(
                t,
                0,
                [max(1, max(r.series["queue_max"])) if y else 0 for y in ys],
                step="post",
                color=color(r.scenario),
                alpha=0.12,
                label=f"{r.scenario} down (restarting)",
            )
    ax.set_ylabel("server accept queue (max per second)")
    ax.set_title(f"Server queue depth and downtime: {title}")
    made.append(_save(fig, ax, replay, out / "queue.png", "Queue depth, crashes and downtime"))

    # seawall's decisions
    protected = [r for r in results if r.series["events"]]
    if protected:
        fig, axes = plt.subplots(
            len(protected), 1, figsize=(13, 3.6 * len(protected)), dpi=110, squeeze=False
        )
        for ax, r in zip(axes[:, 0], protected, strict=True):
            _shade(ax, replay)
            events = r.series["events"]
            wanted = [
                name
                for name in events
                if any(
                    k in name
                    for k in (
                        "shed.shed",
                        "limited",
                        "served",
                        "rejected",
                        "budget_exhausted",
                        "scheduled",
                        "state",
                    )
                )
            ]
            for name in wanted[:8]:
                ax.step(t, events[name], where="post", lw=1.3, label=name)
            changes = r.series.get("breaker_state", [])
            if changes:
                xs = [0.0] + [c[0] for c in changes] + [replay.schedule.duration]
                ys = [0] + [c[2] for c in changes] + [changes[-1][2]]
                twin = ax.twinx()
                twin.step(
                    xs,
                    ys,
                    where="post",
                    color="black",
                    lw=1.2,
                    ls="--",
                    label="breakers not closed",
                )
                twin.set_ylabel("hosts whose breaker is not closed")
                twin.set_ylim(0, max(1, max(ys)) + 0.5)
            ax.set_ylabel("decisions / s")
            ax.set_title(
                f"{r.scenario}: seawall's decisions per second (dashed: client breakers not closed)"
            )
            _clock_axis(ax, replay)
            ax.legend(loc="upper left", bbox_to_anchor=(1.08 if changes else 1.01, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "decisions.png")
        plt.close(fig)
        made.append(("seawall's decisions and breaker states", "decisions.png"))
    return made


def _table(results: list[ScenarioResult]) -> list[str]:
    lines = ["| metric | " + " | ".join(r.scenario for r in results) + " |"]
    lines.append("|---|" + "---|" * len(results))
    for key in _HEADLINE:
        lines.append(f"| {key} | " + " | ".join(_fmt(getattr(r, key)) for r in results) + " |")
    return lines


def _verdict_lines(vs: list[Verdict]) -> list[str]:
    lines = ["| scenario | goal | value | verdict |", "|---|---|---|---|"]
    for v in vs:
        lines.append(
            f"| {v.scenario} | {v.goal} | {_fmt(v.value)} | {'pass' if v.ok else 'FAIL'} |"
        )
    return lines


def write_report(replay: ReplayResult, out_dir: str | Path) -> Path:
    """Write ``report.md``, the PNG charts and ``summary.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = _plots(replay, out)
    sched = replay.schedule
    prof = replay.profile
    vs = verdicts(replay.results, replay.profile.goals)
    lines = [
        f"# Replay: {prof.title}",
        "",
        f"Profile `{prof.name}`{' (--quick)' if replay.quick else ''}, seed {replay.seed}: "
        f"{sched.clock_label(0)}-{sched.clock_label(sched.duration)} replayed in "
        f"{sched.duration:.0f} simulated seconds ({sched.seconds_per_hour:g} s per incident hour); "
        f"surge {sched.clock_label(sched.surge[0])}-{sched.clock_label(sched.surge[1])} "
        f"= {sched.surge[0]:.1f}-{sched.surge[1]:.1f} s. Planned: {replay.plan.steps} build steps, "
        f"{replay.plan.webhooks} webhook deliveries, {replay.plan.uploads} uploads.",
        "",
        prof.description,
        "",
        "## Results",
        "",
        *_table(replay.results),
        "",
        "Ratios are to the ideal `min(offered, capacity + cache-servable)` per second; "
        "`build_step_success_bound` = `min(1, (cache-servable + C) / demand)` is the best "
        "any system could do (see docs/replay.md).",
        "",
        "## Verdicts",
        "",
        *_verdict_lines(vs),
        "",
        "## Scenarios",
        "",
    ]
    for r in replay.results:
        mech = ", ".join(r.mechanisms) if r.mechanisms else "none"
        lines += [
            f"- **{r.scenario}**: {r.description}. Mechanisms: {mech}. "
            f"Upstream statuses: {r.statuses}. Loop lag p99 {r.loop_lag_p99_ms:.0f} ms, "
            f"stalled {r.loop_stall_fraction:.1%} of the run; wall {r.wall_seconds:.1f} s.",
        ]
    lines += ["", "## Phases", ""]
    for seg in sched.segments:
        ph = seg.phase
        load = ", ".join(f"{k} {v:g}x" for k, v in ph.load.items())
        lines.append(
            f"- {sched.clock_label(seg.t0)} ({seg.t0:.1f} s) **{ph.name}**: {load}; "
            f"capacity {ph.capacity:g}. {ph.note}"
        )
    lines += ["", "## Charts", ""]
    for caption, name in charts:
        lines += [f"### {caption}", "", f"![{caption}]({name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_json(replay, out / "summary.json", series=True)
    return path
