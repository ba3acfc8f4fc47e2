"""The registry clients people use, wrapped by seawall as examples/clients/ shows, against
real servers on 127.0.0.1: the CNCF distribution registry and pypiserver.

Each test: the first pull goes through seawall; the server is killed (by its process id);
the same pull is served from the verified cache with the manifest or index page stale;
the server comes back with new content and fresh data flows again. Time between the
pulls is the driven clock's (so "stale" takes no waiting); the servers are real.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import oras.client
import pytest

from real_servers import Server, make_wheel, oci_registry, pypi_index
from seawall.clock import ManualClock

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "clients"


def example(name: str) -> ModuleType:
    """Import examples/clients/<name>.py as a module (they are programs, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def push(registry: Server, target: str, files: dict[str, bytes], workdir: Path) -> None:
    """Publish an artifact with plain oras-py (no seawall): the registry's own content."""
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files.items():
        (workdir / name).write_bytes(data)
        paths.append(name)
    plain = oras.client.OrasClient(hostname=registry.host, insecure=True)
    cwd = os.getcwd()
    os.chdir(workdir)  # oras names a layer by the path it was given
    try:
        plain.push(files=paths, target=target, disable_path_validation=True)
    finally:
        os.chdir(cwd)


def read_dir(paths: list[str]) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in paths}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Server]:
    with oci_registry(tmp_path / "registry") as server:
        yield server


def test_oras_pull_survives_the_registry_going_away(registry: Server, tmp_path: Path) -> None:
    oras_pull = example("oras_pull")
    target = f"{registry.host}/demo/notes:1.0"
    push(registry, target, {"notes.txt": b"version one\n" * 1000}, tmp_path / "v1")
    clock = ManualClock()
    client = oras_pull.client(str(tmp_path / "cache"), insecure=True, clock=clock)
    cache = client.session.get_adapter("http://").cache

    first = read_dir(client.pull(target=target, outdir=str(tmp_path / "a")))
    assert first == {"notes.txt": b"version one\n" * 1000}
    assert cache.stats.stored >= 2  # the manifest and the blob

    registry.stop()
    clock.advance(120)  # the manifest (60 s fresh) is stale now
    again = read_dir(client.pull(target=target, outdir=str(tmp_path / "b")))
    assert again == first
    assert cache.stats.stale >= 1 and cache.stats.verified >= 1

    registry.start()
    push(registry, target, {"notes.txt": b"version two\n"}, tmp_path / "v2")
    clock.advance(120)
    third = read_dir(client.pull(target=target, outdir=str(tmp_path / "c")))
    assert third == {"notes.txt": b"version two\n"}


def test_oras_with_nothing_cached_fails_in_seconds_not_minutes(
    registry: Server, tmp_path: Path
) -> None:
    """oras-py's own retries (131 s of sleep) are out: seawall's budget is the only one."""
    oras_pull = example("oras_pull")
    clock = ManualClock()
    client = oras_pull.client(str(tmp_path / "cache"), insecure=True, clock=clock)
    registry.stop()
    with pytest.raises(Exception):  # noqa: B017 - whatever oras-py makes of a refused connection
        client.pull(target=f"{registry.host}/demo/none:1", outdir=str(tmp_path / "x"))
    assert sum(clock.slept) <= 30  # seawall's deadline; oras alone would sleep 131 s


def test_python_dxf_pull_survives_the_registry_going_away(registry: Server, tmp_path: Path) -> None:
    dxf_pull = example("dxf_pull")
    layer = bytes(range(256)) * 5000
    push(registry, f"{registry.host}/demo/image:1.0", {"layer.bin": layer}, tmp_path / "v1")
    clock = ManualClock()
    cache = str(tmp_path / "cache")
    first = dxf_pull.pull(registry.host, "demo/image", "1.0", cache, insecure=True, clock=clock)
    assert len(first) == 2  # the manifest and its layer
    for digest, data in first.items():
        if digest.startswith("sha256:"):
            assert hashlib.sha256(data).hexdigest() == digest.removeprefix("sha256:")

    registry.stop()
    clock.advance(120)
    again = dxf_pull.pull(registry.host, "demo/image", "1.0", cache, insecure=True, clock=clock)
    assert again == first

    registry.start()
    push(registry, f"{registry.host}/demo/image:1.0", {"layer.bin": b"new"}, tmp_path / "v2")
    clock.advance(120)
    third = dxf_pull.pull(registry.host, "demo/image", "1.0", cache, insecure=True, clock=clock)
    assert third["1.0"] != first["1.0"] and b"new" in third.values()


def test_pypi_simple_fetch_survives_the_index_going_away(tmp_path: Path) -> None:
    pypi_simple_fetch = example("pypi_simple_fetch")
    with pypi_index(tmp_path / "index") as index:
        packages = tmp_path / "index" / "packages"
        wheel = make_wheel(packages, "demo", "1.0", b"x" * 10_000)
        clock = ManualClock()
        cache = str(tmp_path / "cache")
        out = tmp_path / "out"
        out.mkdir()
        got = pypi_simple_fetch.fetch(index.url + "/simple/", "demo", out, cache, clock=clock)
        assert got.read_bytes() == wheel.read_bytes()

        index.stop()
        clock.advance(120)
        got.unlink()
        again = pypi_simple_fetch.fetch(index.url + "/simple/", "demo", out, cache, clock=clock)
        assert again.read_bytes() == wheel.read_bytes()  # stale page, verified file

        index.start()
        newer = make_wheel(packages, "demo", "2.0", b"y")
        clock.advance(120)
        third = pypi_simple_fetch.fetch(index.url + "/simple/", "demo", out, cache, clock=clock)
        assert third.name == newer.name and third.read_bytes() == newer.read_bytes()


def test_plain_httpx_and_requests_survive_the_index_going_away(tmp_path: Path) -> None:
    httpx_fetch = example("httpx_fetch")
    requests_fetch = example("requests_fetch")
    with pypi_index(tmp_path / "index") as index:
        make_wheel(tmp_path / "index" / "packages", "demo", "1.0")
        url = index.url + "/simple/demo/"
        clock = ManualClock()
        cache = str(tmp_path / "cache")
        (first,) = asyncio.run(httpx_fetch.fetch([url], cache, clock=clock))
        with requests_fetch.session(cache, clock=clock) as s:
            assert s.get(url).content == first.content  # fresh from the same disk cache
        index.stop()
        clock.advance(120)
        (again,) = asyncio.run(httpx_fetch.fetch([url], cache, clock=clock))
        assert again.content == first.content and again.headers["x-seawall-cache"] == "stale"
        with requests_fetch.session(cache, clock=clock) as s:
            r = s.get(url)
            assert r.content == first.content and r.headers["x-seawall-cache"] == "stale"
        with pytest.raises(httpx.ConnectError):  # nothing cached for this one: the error
            asyncio.run(httpx_fetch.fetch([index.url + "/simple/other/"], cache, clock=clock))
