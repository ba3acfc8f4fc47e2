"""Pull an image's manifest and layers with python-dxf through seawall.

    python examples/clients/dxf_pull.py 127.0.0.1:5000 demo/notes 1.0 --insecure

python-dxf has no public way to hand it a session: inside ``with dxf:`` it keeps the
``requests.Session`` it made in ``dxf._sessions[0]`` (a private attribute, as of
python-dxf 12; ``tests/test_real_clients.py`` fails if that changes). Mount seawall's
adapter there. Outside a ``with`` block python-dxf calls the ``requests`` module's own
functions, which no adapter can reach. python-dxf does not retry by itself.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence

from dxf import DXF

from seawall import SYSTEM_CLOCK, Clock, DiskStore, FallbackCache
from seawall.client.requests import ResilientAdapter


def pull(
    host: str,
    repo: str,
    tag: str,
    cache_dir: str,
    *,
    insecure: bool = False,
    clock: Clock = SYSTEM_CLOCK,
) -> dict[str, bytes]:
    """The manifest (under the tag) and every blob it names (under its digest)."""
    adapter = ResilientAdapter(cache=FallbackCache(DiskStore(cache_dir), clock=clock), clock=clock)
    dxf = DXF(host, repo, insecure=insecure)
    with dxf:
        session = dxf._sessions[0]  # python-dxf's own session: the only hook it has
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        manifest = dxf.get_manifest(tag)
        pulled = {tag: manifest.encode()}
        for digest in dxf.get_alias(manifest=manifest):
            pulled[digest] = b"".join(dxf.pull_blob(digest))  # python-dxf checks the digest
    return pulled


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("repo")
    parser.add_argument("tag")
    parser.add_argument("--cache", default="~/.cache/seawall", help="fallback cache directory")
    parser.add_argument("--insecure", action="store_true", help="plain http (a local registry)")
    args = parser.parse_args(argv)
    pulled = pull(args.host, args.repo, args.tag, args.cache, insecure=args.insecure)
    for name, data in pulled.items():
        print(name, len(data), hashlib.sha256(data).hexdigest()[:12])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
