"""Fetch URLs with requests through seawall: mounting the adapter is the one line.

python examples/clients/requests_fetch.py https://registry.example/v2/ ...
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import requests

from seawall import SYSTEM_CLOCK, Clock, DiskStore, FallbackCache
from seawall.client.requests import ResilientAdapter


def session(cache_dir: str, *, clock: Clock = SYSTEM_CLOCK) -> requests.Session:
    s = requests.Session()
    adapter = ResilientAdapter(cache=FallbackCache(DiskStore(cache_dir), clock=clock), clock=clock)
    s.mount("https://", adapter)  # the one line that matters
    s.mount("http://", adapter)
    return s


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--cache", default="~/.cache/seawall", help="fallback cache directory")
    args = parser.parse_args(argv)
    with session(args.cache) as s:
        for url in args.urls:
            r = s.get(url)
            print(r.status_code, r.headers.get("x-seawall-cache", "upstream"), len(r.content), url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
