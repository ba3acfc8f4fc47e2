"""Fetch a project's newest file from a PyPI simple index with pypi-simple through seawall.

    python examples/clients/pypi_simple_fetch.py https://pypi.org/simple/ requests --out .

pypi-simple takes a ``requests.Session``: mount seawall's adapter on it. The index page is
served stale from the cache when the index is down; a file is verified against the
``#sha256=`` its link carries before it is ever served from the cache. pypi-simple does
not retry by itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import requests
from pypi_simple import PyPISimple

from seawall import SYSTEM_CLOCK, Clock, DiskStore, FallbackCache
from seawall.client.requests import ResilientAdapter


def session(cache_dir: str, *, clock: Clock = SYSTEM_CLOCK) -> requests.Session:
    s = requests.Session()
    adapter = ResilientAdapter(cache=FallbackCache(DiskStore(cache_dir), clock=clock), clock=clock)
    s.mount("https://", adapter)  # the one line that matters
    s.mount("http://", adapter)
    return s


def fetch(
    index: str, project: str, out: Path, cache_dir: str, *, clock: Clock = SYSTEM_CLOCK
) -> Path:
    """Download the project's newest file into ``out``; pypi-simple checks its digest."""
    with session(cache_dir, clock=clock) as s, PyPISimple(endpoint=index, session=s) as client:
        package = client.get_project_page(project).packages[-1]
        path = out / package.filename
        client.download_package(package, path=path, verify=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index", help="a simple index URL, e.g. https://pypi.org/simple/")
    parser.add_argument("project")
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--cache", default="~/.cache/seawall", help="fallback cache directory")
    args = parser.parse_args(argv)
    print(fetch(args.index, args.project, args.out, args.cache))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
