"""Pull an OCI artifact with oras-py through seawall: one mount on oras's own session.

    python examples/clients/oras_pull.py 127.0.0.1:5000/demo/notes:1.0 --insecure --out ./pulled

The pull goes through seawall's pipeline (budgeted retries, a per-host breaker) and its
fallback cache on disk: a blob pulled once (verified by its digest) and a manifest within
max-stale are served when the registry is down.

oras-py retries every failed request on its own, 5 times, waiting 3, 5, 11, 29 and 83 s
(a dead registry costs 131 s of sleep before the error). Left on, its retries multiply
seawall's and ignore the retry budget, so :class:`Registry` below takes them out: seawall's
budgeted retries are the only ones, and a dead registry with nothing cached fails in
seconds.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import oras.provider

from seawall import SYSTEM_CLOCK, Clock, DiskStore, FallbackCache
from seawall.client.requests import ResilientAdapter


class Registry(oras.provider.Registry):  # type: ignore[misc]
    """oras-py without its own retry loop (``do_request`` is wrapped by it)."""

    do_request = oras.provider.Registry.do_request.__wrapped__


def client(cache_dir: str, *, insecure: bool = False, clock: Clock = SYSTEM_CLOCK) -> Registry:
    """An oras-py client whose every request goes through seawall."""
    registry = Registry(insecure=insecure)
    cache = FallbackCache(DiskStore(cache_dir), clock=clock)
    adapter = ResilientAdapter(cache=cache, clock=clock)
    registry.session.mount("https://", adapter)  # the one line that matters
    registry.session.mount("http://", adapter)
    return registry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="registry/repository:tag")
    parser.add_argument("--out", default=".", help="directory for the pulled files")
    parser.add_argument("--cache", default="~/.cache/seawall", help="fallback cache directory")
    parser.add_argument("--insecure", action="store_true", help="plain http (a local registry)")
    args = parser.parse_args(argv)
    oras = client(args.cache, insecure=args.insecure)
    for path in oras.pull(target=args.target, outdir=args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
