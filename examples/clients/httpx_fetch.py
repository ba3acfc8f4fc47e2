"""Fetch URLs with httpx through seawall: the transport is the one line.

    python examples/clients/httpx_fetch.py https://registry.example/v2/ ...

``ResilientTransport`` (async) and ``ResilientSyncTransport`` (``httpx.Client``) wrap
httpx's own transport, or any other one you pass as ``inner``.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import httpx

from seawall import SYSTEM_CLOCK, Clock, DiskStore, FallbackCache, ResilientTransport


def client(cache_dir: str, *, clock: Clock = SYSTEM_CLOCK) -> httpx.AsyncClient:
    cache = FallbackCache(DiskStore(cache_dir), clock=clock)
    return httpx.AsyncClient(transport=ResilientTransport(cache=cache, clock=clock))


async def fetch(
    urls: Sequence[str], cache_dir: str, *, clock: Clock = SYSTEM_CLOCK
) -> list[httpx.Response]:
    async with client(cache_dir, clock=clock) as c:
        responses = [await c.get(url) for url in urls]
        for r in responses:
            await r.aread()
        return responses


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+")
    parser.add_argument("--cache", default="~/.cache/seawall", help="fallback cache directory")
    args = parser.parse_args(argv)
    for r in asyncio.run(fetch(args.urls, args.cache)):
        print(r.status_code, r.headers.get("x-seawall-cache", "upstream"), len(r.content), r.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
