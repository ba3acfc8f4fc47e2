"""The ``seawall`` command: ``seawall replay PROFILE`` runs the replay lab, ``seawall check
POLICY`` finds dangerous settings in a policy file.

argparse rather than typer so that exit codes are exactly: 0 ok, 1 a verdict failed
(``replay --check``) or a policy has errors (``check``), 2 a usage error (bad option,
unknown profile, invalid profile or policy file, a missing extra), 3 an invalid replay (the
harness was the bottleneck: no verdict).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import TYPE_CHECKING

from seawall.errors import PolicyError

if TYPE_CHECKING:
    from rich.console import Console

    from seawall.check import Finding

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
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_check_parser(sub)
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
        _print_error(str(exc), console)
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


def _version() -> str:
    from seawall import __version__

    compiled = compiled_modules()
    build = f"{len(compiled)} modules compiled" if compiled else "pure Python"
    return f"seawall {__version__} ({build})"


def compiled_modules() -> list[str]:
    """The seawall modules that load from C extensions: the compiled build (docs/design.md).

    An extension module beside its ``.py`` is what Python imports, so the files say it.
    """
    import seawall

    root = Path(seawall.__file__).parent
    found = []
    for path in root.rglob("*"):
        suffix = next((s for s in EXTENSION_SUFFIXES if path.name.endswith(s)), None)
        stem = path.name[: -len(suffix)] if suffix else ""
        if stem and "." not in stem:  # not one built for another Python (x.cpython-312-...so)
            parts = [*path.relative_to(root.parent).parent.parts, stem]
            found.append(".".join(parts[:-1] if stem == "__init__" else parts))
    return sorted(found)


def _print_error(message: str, console: Console | None = None) -> None:
    """One error, on one line whatever the terminal's width (CI logs are grepped by line)."""
    from rich.console import Console
    from rich.markup import escape

    console = console if console is not None else Console(stderr=True)
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)


EXTRAS: dict[str, tuple[str, ...]] = {"lab": ("matplotlib",)}
"""Modules an extra brings that the CLI imports only when a command needs them."""


def _missing_extra(extra: str) -> str | None:
    """Why ``extra`` is needed and how to install it, or None when it is installed."""
    import importlib

    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            return (
                f"this needs the {extra!r} extra ({module} is not installed): "
                f"pip install 'seawall[{extra}]'"
            )
    return None


def _missing_for_replay(args: argparse.Namespace) -> str | None:
    """Charts (``--out``) need matplotlib; say which extra brings it before running."""
    if args.out:
        missing = _missing_extra("lab")
        if missing:
            return f"seawall replay --out: {missing}"
    return None


# --------------------------------------------------------------------------- seawall check


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"{text!r} must be a number greater than 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check",
        help="find settings in a policy file that turn an overload into an outage",
        description=(
            "Check a seawall policy file (what load_policies reads) for settings that "
            "turn an overload into an outage: retry amplification, rate limits and "
            "breakers that cannot work at the declared capacity, sheddable health "
            "checks, no fallback copies. Exit 1 when a finding is an error."
        ),
    )
    check.add_argument("policy", metavar="POLICY.toml", nargs="?", help="the policy file to check")
    check.add_argument(
        "--capacity",
        type=_positive_float,
        metavar="RPS",
        help="requests per second the protected upstream serves at best",
    )
    check.add_argument(
        "--clients",
        type=_positive_int,
        metavar="N",
        help="how many clients (processes, CI runners, rate-limit keys) call it",
    )
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.add_argument(
        "--list-rules", action="store_true", help="list every rule and exit (POLICY ignored)"
    )


def _check(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from seawall.check import RULES, check_policies, exit_code, report_dict
    from seawall.policy import load_policies

    out = Console(soft_wrap=True, highlight=False)
    if args.list_rules:
        for rule in RULES:
            out.print(f"{rule.id:<34} {rule.severity:<8} {rule.summary}")
        return EXIT_OK
    if args.policy is None:
        _print_error("seawall check: give a POLICY.toml to check (or --list-rules)")
        return EXIT_USAGE
    try:
        policies = load_policies(args.policy)
    except PolicyError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    findings = check_policies(policies, capacity=args.capacity, clients=args.clients)
    if args.json:
        doc = report_dict(findings, path=args.policy, capacity=args.capacity, clients=args.clients)
        print(json.dumps(doc, indent=2))
    else:
        _print_findings(out, findings, args)
    return exit_code(findings)


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def _print_findings(out: Console, findings: Sequence[Finding], args: argparse.Namespace) -> None:
    """One block per finding; every line is one physical line (soft wrap) for CI logs."""
    from rich.markup import escape

    from seawall.check import summary

    given = []
    if args.capacity is not None:
        given.append(f"capacity {args.capacity:g} req/s")
    if args.clients is not None:
        given.append(f"{args.clients} clients")
    out.print(f"[bold]{escape(args.policy)}[/bold]" + (f" ({', '.join(given)})" if given else ""))
    for f in findings:
        where = f" [dim]{escape(f.field)}[/dim]" if f.field else ""
        out.print(f"[{_STYLE[f.severity]}]{f.severity}[/] [bold]{f.rule}[/bold]{where}")
        out.print(f"  {escape(f.message)}")
        out.print(f"  [green]suggest:[/green] {escape(f.suggestion)}")
        if f.cause:
            out.print(f"  [dim]{escape(f.cause)}[/dim]")
    counts = summary(findings)
    verdict = "[red]fails[/red]" if counts["error"] else "[green]passes[/green]"
    out.print(
        f"{verdict}: {_count(counts['error'], 'error')}, "
        f"{_count(counts['warning'], 'warning')}, {_count(counts['info'], 'note')}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        missing = _missing_for_replay(args)
        if missing:
            _print_error(missing)
            return EXIT_USAGE
        return _replay(args)
    if args.command == "check":
        return _check(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
