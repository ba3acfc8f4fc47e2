"""Real artifact servers on 127.0.0.1 for integration tests: the CNCF distribution
registry (Debian's ``docker-registry``) and pypiserver. Each runs as a child process on a
free port, is stopped by its own process id (never by name), and can be stopped and
started again on the same port and storage: "the upstream was killed, then came back".
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REQUIRE = os.environ.get("SEAWALL_REQUIRE_SERVERS") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _missing(what: str) -> None:
    message = f"{what} (run: make servers, as root)"
    if REQUIRE:
        pytest.fail(f"SEAWALL_REQUIRE_SERVERS=1 but {message}")
    pytest.skip(message)


class Server:
    """A child process answering HTTP on ``port``; ``stop()`` and ``start()`` again."""

    def __init__(self, argv: list[str], port: int, probe: str, workdir: Path) -> None:
        self.argv = argv
        self.port = port
        self.probe = probe
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(self.url + self.probe, timeout=1):
                    return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = (self.workdir / "server.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{self.argv[0]} did not start:\n{tail}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop this server by its own process id."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@contextmanager
def oci_registry(tmp: Path) -> Iterator[Server]:
    """The CNCF distribution registry with filesystem storage under ``tmp``."""
    binary = shutil.which("docker-registry") or shutil.which("registry")
    if binary is None:
        _missing("the CNCF distribution registry (docker-registry) is not installed")
    assert binary is not None
    port = _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n"
    )
    server = Server([binary, "serve", str(config)], port, "/v2/", tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def pypi_index(tmp: Path) -> Iterator[Server]:
    """pypiserver serving the packages put in ``tmp / "packages"``."""
    packages = tmp / "packages"
    packages.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    argv = [
        sys.executable, "-m", "pypiserver", "run", "-p", str(port), "-i", "127.0.0.1",
        "--disable-fallback", "--hash-algo", "sha256", "--backend", "simple-dir", str(packages),
    ]  # fmt: skip
    server = Server(argv, port, "/simple/", tmp)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def make_wheel(directory: Path, name: str, version: str, payload: bytes = b"") -> Path:
    """A small, valid pure-Python wheel (pip can install it)."""
    dist = f"{name}-{version}.dist-info"
    module = f"{name}.py"
    files = {
        module: b"VERSION = %r\nPAYLOAD = %r\n" % (version, payload),
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: seawall-tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    files[f"{dist}/RECORD"] = record.encode()
    path = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for arcname, data in files.items():
            zf.writestr(arcname, data)
    return path
