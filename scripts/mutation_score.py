"""Print the mutation score of each mutated module from mutmut's results in mutants/.

    python scripts/mutation_score.py             # killed / total per module, then survivors
    python scripts/mutation_score.py --markdown  # the same as a table for docs/mutation.md
    python scripts/mutation_score.py --list      # and the name of every mutant not killed
    python scripts/mutation_score.py --unexplained docs/mutation.md
                                                 # those not killed that the page's tables miss
    python scripts/mutation_score.py --rows      # a table row to fill in for each of those

``make mutate`` runs this after ``mutmut run``. A mutant counts as killed when a test failed
or timed out on it; "no tests" (no selected test reaches the function) counts against the
score, like a survivor: nothing would notice that bug either.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

# -9: the test process was killed (an endless ``itertools.repeat`` eating memory, say): the
# tests did not pass, which is what a kill means.
KILLED = {
    1: "killed",
    3: "killed",
    -9: "killed",
    36: "timeout",
    24: "timeout",
    -24: "timeout",
    152: "timeout",
}
LABELS = {0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}


def status(code: int | None) -> str:
    return KILLED.get(code, LABELS.get(code, "suspicious")) if code is not None else "not checked"


ROW = re.compile(
    r"^\| `(?P<file>[^`:]+):\d+` \| `(?P<orig>(?:[^`]|``)*)` → `(?P<mutant>(?:[^`]|``)*)` \|"
)


Pattern = re.Pattern[str]


def _pattern(cell: str) -> Pattern:
    """A table cell's code as a pattern: ``…`` stands for whatever the row left out."""
    parts = cell.replace("\\|", "|").strip().split("…")
    return re.compile(".*".join(re.escape(p.strip()) for p in parts), re.DOTALL)


def explained(doc: Path) -> list[tuple[str, Pattern, Pattern]]:
    """(file, original line, mutated line) of every row of the page's survivor tables."""
    out = []
    for line in doc.read_text().splitlines():
        m = ROW.match(line)
        if m:
            out.append((m["file"], _pattern(m["orig"]), _pattern(m["mutant"])))
    return out


def changed_lines(name: str, module: str) -> tuple[list[str], list[str]]:
    """The lines one mutant removed and added, from mutmut's own diff."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # the mutate extra

    diff = get_diff_for_mutant(name, path=module).splitlines()
    removed = [x[1:].strip() for x in diff if x.startswith("-") and not x.startswith("---")]
    added = [x[1:].strip() for x in diff if x.startswith("+") and not x.startswith("+++")]
    return removed, added


def unexplained(doc: Path, survivors: list[tuple[str, str]]) -> list[str]:
    """Survivors whose change no table row of ``doc`` explains."""
    rows = explained(doc)
    missing = []
    for name, module in survivors:
        short = module.removeprefix("src/seawall/")
        removed, added = changed_lines(name, module)
        shown = f"{' / '.join(removed)} -> {' / '.join(added)}"
        removed.append(" / ".join(removed))  # a row may show every changed line, as --rows does
        added.append(" / ".join(added))
        if not any(
            file == short
            and any(orig.fullmatch(r) for r in removed)
            and any(mutant.fullmatch(a) for a in added)
            for file, orig, mutant in rows
        ):
            missing.append(f"{name}: {shown}")
    return missing


def row(name: str, module: str) -> str:
    """A survivor table row for one mutant, its "why" left to fill in."""
    removed, added = changed_lines(name, module)
    source = Path(module).read_text().splitlines()
    first = removed[0] if removed else ""
    line = next((i for i, text in enumerate(source, 1) if text.strip() == first), 0)
    orig, mutant = (" / ".join(x).replace("|", "\\|") for x in (removed, added))
    return f"| `{module.removeprefix('src/seawall/')}:{line}` | `{orig}` → `{mutant}` | |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--list", action="store_true", help="name every mutant not killed")
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--rows", action="store_true", help="a table row per mutant not killed")
    parser.add_argument(
        "--unexplained",
        type=Path,
        metavar="DOC",
        help="list the mutants not killed that no table row of DOC explains (exit 1 if any)",
    )
    args = parser.parse_args()
    metas = sorted(args.root.glob("src/**/*.py.meta"))
    if not metas:
        print("no results in mutants/: run `make mutate` first", file=sys.stderr)
        return 1
    rows: list[tuple[str, int, int, Counter[str]]] = []
    survivors: list[str] = []
    located: list[tuple[str, str]] = []  # (mutant, its module's path)
    for meta in metas:
        data = json.loads(meta.read_text())
        codes: dict[str, int | None] = data.get("exit_code_by_key", {})
        if not codes:
            continue
        module = str(meta.relative_to(args.root)).removesuffix(".meta")
        counts = Counter(status(c) for c in codes.values())
        killed = counts["killed"] + counts["timeout"]
        rows.append((module, killed, len(codes), counts))
        alive = sorted(k for k, c in codes.items() if status(c) not in ("killed", "timeout"))
        survivors += alive
        located += [(k, module) for k in alive if status(codes[k]) != "not checked"]
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
    if args.rows:
        for name, module in located:
            print(row(name, module))
    if args.unexplained is not None:
        missing = unexplained(args.unexplained, located)
        print(f"\n{len(missing)} not killed and not explained in {args.unexplained}:")
        for line in missing:
            print("   ", line)
        return 1 if missing else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
