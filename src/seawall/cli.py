"""The ``seawall`` command: ``seawall replay PROFILE`` runs the replay lab.

argparse rather than typer so that exit codes are exactly: 0 ok, 1 a verdict failed
(only with ``--check``), 2 a usage error (bad option, unknown profile, invalid profile or
policy file).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from seawall.errors import PolicyError

__all__ = ["main"]

EXIT_OK = 0
EXIT_VERDICT = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    from seawall.replay.profile import shipped_profiles

    parser = argparse.ArgumentParser(
        prog="seawall",
        description="seawall: keep artifact fetches alive when the artifact manager is overloaded.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    replay = sub.add_parser(
        "replay",
        help="replay an incident's overload against a simulated artifact manager",
        description=(
            "Replay an overload profile against a simulated artifact repository manager, "
            "unprotected and protected by seawall, and compare them to the ideal. "
            f"Shipped profiles: {', '.join(shipped_profiles())}."
        ),
    )
    replay.add_argument("profile", metavar="PROFILE", help="a shipped profile name or a TOML file")
    replay.add_argument("--quick", action="store_true", help="a shorter replay (<= 45 s)")
    replay.add_argument("--seed", type=int, default=1, metavar="N", help="random seed (default 1)")
    replay.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="unprotected or seawall; repeat for several (default: both)",
    )
    replay.add_argument(
        "--policy",
        metavar="FILE",
        help="a seawall policy TOML ([ratelimit], [shed], [client], [cache]), "
        "run as an extra scenario named 'policy'",
    )
    replay.add_argument("--out", metavar="DIR", help="write report.md, PNG charts and summary.json")
    replay.add_argument("--json", metavar="FILE", help="write the per-scenario numbers as JSON")
    replay.add_argument(
        "--check", action="store_true", help="exit 1 unless every goal of the replay is met"
    )
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from seawall.replay.metrics import verdicts
    from seawall.replay.profile import load_profile
    from seawall.replay.report import write_json, write_report
    from seawall.replay.runner import run_replay
    from seawall.replay.scenarios import build_scenarios

    console = Console(stderr=True)
    try:
        profile = load_profile(args.profile)
        scenarios = build_scenarios(args.scenario, args.policy)
    except PolicyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    for s in scenarios:
        if s.missing:
            console.print(f"[yellow]{s.name}: not available yet: {', '.join(s.missing)}[/yellow]")

    sched = profile.schedule(quick=args.quick)
    progress = Progress(
        TextColumn("[bold]{task.description:<12}"),
        BarColumn(),
        TextColumn("{task.fields[clock]}"),
        TextColumn("{task.completed:>5.1f}/{task.total:.0f} s"),
        TimeRemainingColumn(),
        console=console,
        disable=args.no_progress,
    )
    tasks = {
        s.name: progress.add_task(s.name, total=sched.duration, clock=sched.clock_label(0))
        for s in scenarios
    }

    def on_progress(name: str, done: float, total: float) -> None:
        progress.update(tasks[name], completed=done, clock=sched.clock_label(done))

    with progress:
        replay = asyncio.run(
            run_replay(scenarios, profile, quick=args.quick, seed=args.seed, progress=on_progress)
        )

    table = Table(
        title=f"seawall replay {profile.name}{' --quick' if args.quick else ''} (seed {args.seed})"
    )
    table.add_column("metric")
    for r in replay.results:
        table.add_column(r.scenario, justify="right")
    rows = [
        ("goodput (run)", "goodput_ratio", "{:.0%}"),
        ("goodput (surge)", "goodput_ratio_surge", "{:.0%}"),
        ("build steps ok", "build_step_success_ratio", "{:.1%}"),
        ("  bound", "build_step_success_bound", "{:.1%}"),
        ("failed steps", "failed_build_steps", "{}"),
        ("retry amplification", "retry_amplification", "{:.2f}"),
        ("p50 ms", "p50_ms", "{:.0f}"),
        ("p99 ms", "p99_ms", "{:.0f}"),
        ("wasted work", "wasted_work_ratio", "{:.0%}"),
        ("crashes", "crashes", "{}"),
        ("recovery s", "recovery_seconds", "{:.1f}"),
        ("webhooks lost", "webhooks_lost", "{}"),
        ("valid", "valid", "{}"),
    ]
    for label, key, fmt in rows:
        cells = []
        for r in replay.results:
            v = getattr(r, key)
            cells.append("never" if v is None else fmt.format(v))
        table.add_row(label, *cells)
    out_console = Console()
    out_console.print(table)

    vs = verdicts(replay.results, profile.goals)
    failed = [v for v in vs if not v.ok]
    for v in failed:
        out_console.print(f"[red]goal not met[/red] {v.scenario}: {v.goal} (value {v.value})")
    if not failed:
        out_console.print("[green]every goal met[/green]")
    if args.json:
        write_json(replay, args.json)
        out_console.print(f"JSON: {args.json}")
    if args.out:
        path = write_report(replay, Path(args.out))
        out_console.print(f"report: {path}")
    return EXIT_VERDICT if args.check and failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point (``seawall = "seawall.cli:main"``); returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for usage errors
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "replay":
        return _replay(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
