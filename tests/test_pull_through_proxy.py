"""examples/pull_through_proxy.py for real: pip installs through it from pypiserver, the
index is killed, and pip installs again from what the proxy served before (issue 15)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from real_servers import Server, _free_port, make_wheel, pypi_index

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pull_through_proxy.py"


def pip_install(index: str, target: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-deps",
            "--retries",
            "0",
            "--timeout",
            "20",
            "--index-url",
            index,
            "--target",
            str(target),
            "demo",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pip_installs_through_the_proxy_while_the_index_is_down(tmp_path: Path) -> None:
    with pypi_index(tmp_path / "index") as index:
        make_wheel(tmp_path / "index" / "packages", "demo", "1.0", b"from the index")
        port = _free_port()
        proxy = Server(
            [
                sys.executable,
                str(EXAMPLE),
                "--upstream",
                index.url,
                "--port",
                str(port),
                "--cache",
                str(tmp_path / "proxy-cache"),
            ],
            port,
            "/healthz",
            tmp_path,
        )
        proxy.start()
        try:
            first = pip_install(f"{proxy.url}/simple/", tmp_path / "first")
            assert first.returncode == 0, first.stderr
            assert b"from the index" in (tmp_path / "first" / "demo.py").read_bytes()

            index.stop()
            again = pip_install(f"{proxy.url}/simple/", tmp_path / "again")
            assert again.returncode == 0, again.stderr
            assert (tmp_path / "again" / "demo.py").read_bytes() == (
                tmp_path / "first" / "demo.py"
            ).read_bytes()
        finally:
            proxy.stop()
        log = (tmp_path / "server.log").read_text()
        assert "Traceback" not in log, log[-2000:]
