"""Shared fixtures: the driven clock, Redis gating, and private redis-server processes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import settings

from seawall.clock import ManualClock

# `make mutate` runs each mutant against the same examples (SEAWALL_HYPOTHESIS_PROFILE=mutate):
# a mutant killed by chance in one run and missed in the next would make the score noise.
settings.register_profile("mutate", derandomize=True, database=None, deadline=None)
settings.load_profile(os.environ.get("SEAWALL_HYPOTHESIS_PROFILE", "default"))


def _compiled_modules_missing() -> list[str]:
    """The modules the compiled build lists ([tool.hatch...mypyc] include) that import as .py."""
    import importlib
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    hook = tomllib.loads(pyproject.read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    missing = []
    for path in hook["hooks"]["mypyc"]["include"]:
        name = path.removeprefix("src/").removesuffix(".py").replace("/", ".")
        if str(importlib.import_module(name).__file__).endswith(".py"):
            missing.append(name)
    return missing


# `make test-compiled`: a suite that silently ran on the .py files would prove nothing.
if os.environ.get("SEAWALL_EXPECT_COMPILED") == "1" and (_missing := _compiled_modules_missing()):
    raise pytest.UsageError(f"SEAWALL_EXPECT_COMPILED=1 but these import as Python: {_missing}")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_REDIS = os.environ.get("SEAWALL_REQUIRE_REDIS") == "1"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def _redis_answers(url: str) -> str | None:
    """None when Redis answers PING at ``url``, else the reason it does not."""
    try:
        import redis
    except ImportError:
        return "the redis package is not installed (pip install 'seawall[redis]')"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis at {url} does not answer: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a live Redis; skips visibly, or fails under SEAWALL_REQUIRE_REDIS=1."""
    reason = _redis_answers(REDIS_URL)
    if reason is not None:
        if REQUIRE_REDIS:
            pytest.fail(f"SEAWALL_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)
    return REDIS_URL


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        """Stop this server by its own process id (never by name)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
            self.process.terminate()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its socket (connections are accepted) but never answers."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_process() -> Iterator[Callable[..., RedisProcess]]:
    """Start private redis-server processes on free ports; they are stopped afterwards."""
    binary = shutil.which("redis-server")
    started: list[RedisProcess] = []

    def start(port: int | None = None) -> RedisProcess:
        """A new server; pass the port of a stopped one to restart it there."""
        if binary is None:
            if REQUIRE_REDIS:
                pytest.fail("SEAWALL_REQUIRE_REDIS=1 but redis-server is not on PATH")
            pytest.skip("redis-server is not on PATH")
        port = port if port is not None else _free_port()
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        server = RedisProcess(port, proc)
        started.append(server)
        deadline = time.monotonic() + 10
        while _redis_answers(server.url) is not None:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"private redis-server on port {port} did not start")
            time.sleep(0.05)
        return server

    yield start
    for server in started:
        server.stop()
