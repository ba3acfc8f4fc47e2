"""Print the mutation score of each mutated module from mutmut's results in mutants/.

    python scripts/mutation_score.py             # killed / total per module, then survivors
    python scripts/mutation_score.py --markdown  # the same as a table for docs/mutation.md
    python scripts/mutation_score.py --list      # and the name of every mutant not killed

``make mutate`` runs this after ``mutmut run``. A mutant counts as killed when a test failed
or timed out on it; "no tests" (no selected test reaches the function) counts against the
score, like a survivor: nothing would notice that bug either.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {1: "killed", 3: "killed", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout"}
LABELS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}


def status(code: int | None) -> str:
    return KILLED.get(code, LABELS.get(code, "suspicious")) if code is not None else "not checked"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--list", action="store_true", help="name every mutant not killed")
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    args = parser.parse_args()
    metas = sorted(args.root.glob("src/**/*.py.meta"))
    if not metas:
        print("no results in mutants/: run `make mutate` first", file=sys.stderr)
        return 1
    rows: list[tuple[str, int, int, Counter[str]]] = []
    survivors: list[str] = []
    for meta in metas:
        data = json.loads(meta.read_text())
        codes: dict[str, int | None] = data.get("exit_code_by_key", {})
        if not codes:
            continue
        module = str(meta.relative_to(args.root)).removesuffix(".meta")
        counts = Counter(status(c) for c in codes.values())
        killed = counts["killed"] + counts["timeout"]
        rows.append((module, killed, len(codes), counts))
        survivors += sorted(k for k, c in codes.items() if status(c) not in ("killed", "timeout"))
    total_killed = sum(r[1] for r in rows)
    total = sum(r[2] for r in rows)
    if args.markdown:
        print("| module | killed / total | score | survived | no tests |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for module, killed, n, counts in rows:
            print(
                f"| `{module}` | {killed} / {n} | {100 * killed / n:.1f}% "
                f"| {counts['survived']} | {counts['no tests']} |"
            )
        score = f"{100 * total_killed / total:.1f}%"
        print(f"| **all** | **{total_killed} / {total}** | **{score}** | | |")
    else:
        for module, killed, n, counts in rows:
            rest = ", ".join(
                f"{k} {v}" for k, v in sorted(counts.items()) if k not in KILLED.values()
            )
            print(f"{module:40} {killed:5} / {n:<5} {100 * killed / n:5.1f}%  {rest}")
        print(f"{'all':40} {total_killed:5} / {total:<5} {100 * total_killed / total:5.1f}%")
        if survivors and args.list:
            print(f"\n{len(survivors)} not killed (`mutmut show NAME` prints the change):")
            for name in survivors:
                print("   ", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
