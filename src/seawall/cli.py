"""The ``seawall`` command: ``seawall replay PROFILE`` runs the replay lab.

argparse rather than typer so that exit codes are exactly: 0 ok, 1 a verdict failed
(only with ``--check``), 2 a usage error (bad option, unknown profile, invalid profile or
policy file), 3 an invalid replay (the harness was the bottleneck: no verdict).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from seawall.errors import PolicyError

__all__ = ["main"]

EXIT_OK = 0
EXIT_VERDICT = 1
EXIT_USAGE = 2
EXIT_INVALID = 3


def _parser() -> argparse.ArgumentParser:
    from seawall.replay.profile import shipped_profiles
    from seawall.replay.scenarios import ABLATIONS, HEADLINE

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
            "with today's naive clients, with what a competent team runs without seawall, "
            "with seawall's defaults, tuned, and with one mechanism removed at a time; "
            "compare them on the same arrivals to the ideal. Runs are real time, never "
            f"compressed. Shipped profiles: {', '.join(shipped_profiles())}. "
            "Exit codes: 0 done, 1 a goal not met (--check), 2 usage error, "
            "3 invalid run (the machine, not the server, was the bottleneck: no verdict)."
        ),
    )
    replay.add_argument("profile", metavar="PROFILE", help="a shipped profile name or a TOML file")
    replay.add_argument("--quick", action="store_true", help="the profile's short version")
    seeds = replay.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=None, metavar="N", help="one seed (default 1)")
    seeds.add_argument(
        "--seeds",
        metavar="SPEC",
        help="several seeds, e.g. 1-5 or 1,3,7: median and spread per metric",
    )
    replay.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help=f"repeatable: {', '.join((*HEADLINE, *ABLATIONS))}, or a group: headline "
        "(default), ablations, all",
    )
    replay.add_argument(
        "--policy",
        metavar="FILE",
        help="a seawall policy TOML ([ratelimit], [shed], [client], [cache]), "
        "run as an extra scenario named 'policy'",
    )
    replay.add_argument(
        "--sockets",
        action="store_true",
        help="serve the server side with uvicorn on 127.0.0.1 and send over TCP",
    )
    replay.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="run N scenarios at once in worker processes (each judges its own validity)",
    )
    replay.add_argument("--out", metavar="DIR", help="write report.md, PNG charts and summary.json")
    replay.add_argument("--json", metavar="FILE", help="write the per-scenario numbers as JSON")
    replay.add_argument(
        "--check", action="store_true", help="exit 1 unless every goal of the replay is met"
    )
    replay.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_seeds(spec: str) -> list[int]:
    """``"1-5"`` -> [1, 2, 3, 4, 5]; ``"1,3,7"`` -> [1, 3, 7]; else PolicyError."""
    out: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if hi else int(lo)
            if last < first or last - first > 1000:
                raise ValueError
            out += [s for s in range(first, last + 1) if s not in out]
    except ValueError:
        raise PolicyError("--seeds", spec, "is not a list of seeds like 1-5 or 1,3,7") from None
    return out


def _replay(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from seawall.replay.profile import load_profile
    from seawall.replay.report import (
        TABLE_ROWS,
        format_cell,
        summarize_seeds,
        write_json,
        write_report,
    )
    from seawall.replay.runner import run_seeds
    from seawall.replay.scenarios import build_scenarios

    console = Console(stderr=True)
    try:
        profile = load_profile(args.profile)
        scenarios = build_scenarios(args.scenario, args.policy)
        seeds = parse_seeds(args.seeds) if args.seeds else [args.seed or 1]
        if args.jobs < 1:
            raise PolicyError("--jobs", args.jobs, "must be at least 1")
    except PolicyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return EXIT_USAGE
    names = [s.name for s in scenarios]

    sched = profile.schedule(quick=args.quick)
    progress = Progress(
        TextColumn("[bold]{task.description:<22}"),
        BarColumn(),
        TextColumn("{task.completed:>4.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    overall = progress.add_task(
        f"{len(names)} scenarios x {len(seeds)} seeds", total=len(names) * len(seeds)
    )
    current = progress.add_task("", total=sched.duration, visible=args.jobs == 1)

    def on_progress(name: str, done: float, total: float) -> None:
        progress.update(current, description=name, completed=done)

    def on_done(seed: int, name: str) -> None:
        progress.advance(overall)

    with progress:
        runs = run_seeds(
            args.profile,
            names,
            seeds,
            policy_file=args.policy,
            quick=args.quick,
            sockets=args.sockets,
            jobs=args.jobs,
            progress=on_progress,
            done=on_done,
        )
    summary = summarize_seeds(runs)

    seed_text = f"seeds {args.seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    table = Table(
        title=f"seawall replay {profile.name}{' --quick' if args.quick else ''} ({seed_text}"
        f"{', median [min-max]' if len(seeds) > 1 else ''}"
        f"{', over loopback TCP' if args.sockets else ''})"
    )
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for label, key, fmt in TABLE_ROWS:
        table.add_row(
            label,
            *(format_cell(summary.medians[n], summary.spreads[n], key, fmt) for n in names),
        )
    # wide enough for every scenario's column: a squeezed table is unreadable in CI logs
    out_console = Console(width=max(100, 34 + 16 * len(names)))
    out_console.print(table)
    if args.json:
        write_json(summary, args.json)
        out_console.print(f"JSON: {args.json}")
    if args.out:
        path = write_report(summary, Path(args.out))
        out_console.print(f"report: {path}")
    failed = [c for c in summary.checks if not c.ok]
    for c in summary.checks:
        mark = "[green]met[/green]" if c.ok else "[red]NOT MET[/red]"
        value = f"{c.value:.3g}" if isinstance(c.value, float) else c.value
        out_console.print(f"{mark} {c.scenario}: {c.goal} (value {value})")
    if not summary.valid:
        # no verdict on an invalid run: its scenario's goals were not checked above
        out_console.print(
            "[red]INVALID runs: no verdict on them[/red] (the harness was the bottleneck)"
        )
        for bad in summary.invalid():
            out_console.print(
                f"  seed {bad['seed']} {bad['scenario']}: {'; '.join(bad['reasons'])}"
            )
        return EXIT_INVALID
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
