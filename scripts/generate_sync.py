"""Generate seawall's sync I/O code from its async source, as httpcore does.

    python scripts/generate_sync.py     # rewrite every src/seawall/*/_sync/ file
    python scripts/generate_sync.py --check  # exit 1 when a generated file is not current

The async files under ``src/seawall/*/_async/`` are the only ones kept by hand; unasync
(https://github.com/python-trio/unasync) drops ``async``/``await``, renames ``Async*``
names to ``Sync*`` and applies the replacements below. ``make test`` runs ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

import unasync

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("src/seawall/cache", "src/seawall/client")

REPLACEMENTS = {
    "_async": "_sync",
    "aclose": "close",
    "aclosing": "closing",
    "aio": "sync",
    "sleep": "sleep_sync",
    "async_deadline": "sync_deadline",
    "ASYNC_DEADLINES_CANCEL": "SYNC_DEADLINES_CANCEL",
    "async_offload": "sync_offload",
    "async_send": "sync_send",
    "AsyncBaseTransport": "BaseTransport",
    "AsyncHTTPTransport": "HTTPTransport",
    "handle_async_request": "handle_request",
    "ResilientTransport": "ResilientSyncTransport",
    "FallbackCacheTransport": "FallbackCacheSyncTransport",
    "Resilient": "SyncResilient",
}

HEADER = "# Generated from {src} by scripts/generate_sync.py: do not edit.\n"


def generate(into: Path) -> list[Path]:
    """Write the sync files for every package under ``into``; return their paths."""
    written: list[Path] = []
    for package in PACKAGES:
        source = ROOT / package / "_async"
        target = into / package / "_sync"
        work = Path(tempfile.mkdtemp())
        try:
            (work / "_async").mkdir()
            files = []
            for path in sorted(source.glob("*.py")):
                copy = work / "_async" / path.name
                shutil.copy(path, copy)
                files.append(str(copy))
            rule = unasync.Rule("/_async/", "/_sync/", additional_replacements=REPLACEMENTS)
            unasync.unasync_files(files, [rule])
            target.mkdir(parents=True, exist_ok=True)
            for out in sorted((work / "_sync").glob("*.py")):
                text = out.read_text()
                if text.strip():
                    text = HEADER.format(src=f"{package}/_async/{out.name}") + text
                (target / out.name).write_text(text)
                written.append(target / out.name)
        finally:
            shutil.rmtree(work)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = []
        for fresh in generate(Path(tmp)):
            current = ROOT / fresh.relative_to(tmp)
            old = current.read_text() if current.exists() else ""
            if old != fresh.read_text():
                stale.append(current)
                diff = difflib.unified_diff(
                    old.splitlines(), fresh.read_text().splitlines(), str(current), "generated"
                )
                sys.stdout.writelines(line + "\n" for line in list(diff)[:40])
        if stale:
            print("stale generated files (run: make unasync):", *stale, sep="\n  ")
            return 1
    print("generated sync code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
