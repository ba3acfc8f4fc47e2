"""The requests adapter against a tiny threaded HTTP server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from seawall.breaker import CircuitOpenError
from seawall.client.requests import CircuitOpenRequestsError, ResilientAdapter
from seawall.clock import ManualClock
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy


class Stub:
    """Answers with a script of (status, headers); the last entry repeats."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str]]] = [(200, {})]
        self.seen: list[tuple[str, str, bytes]] = []
        self.lock = threading.Lock()


@pytest.fixture
def stub() -> Iterator[tuple[Stub, str]]:
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            with state.lock:
                state.seen.append((self.command, self.path, body))
                n = len(state.seen) - 1
                status, headers = state.script[min(n, len(state.script) - 1)]
            payload = b"answer %d" % n
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def session(clock: ManualClock, policy: ClientPolicy | None = None) -> requests.Session:
    s = requests.Session()
    policy = policy or ClientPolicy(retry=RetryPolicy(budget_min_retries_per_second=100))
    s.mount("http://", ResilientAdapter(policy, clock=clock))
    return s


def test_mount_takes_one_line_and_retries_503(stub: tuple[Stub, str], clock: ManualClock) -> None:
    state, base = stub
    state.script = [(503, {"Retry-After": "2"}), (200, {})]
    with session(clock) as s:
        response = s.get(base + "/v2/")
    assert response.status_code == 200
    assert response.text == "answer 1"
    assert len(state.seen) == 2
    assert clock.slept == [2.0]


def test_404_is_not_retried(stub: tuple[Stub, str], clock: ManualClock) -> None:
    state, base = stub
    state.script = [(404, {}), (200, {})]
    with session(clock) as s:
        assert s.get(base + "/v2/missing").status_code == 404
    assert len(state.seen) == 1


def test_post_needs_an_idempotency_key(stub: tuple[Stub, str], clock: ManualClock) -> None:
    state, base = stub
    state.script = [(503, {}), (503, {}), (200, {})]
    with session(clock) as s:
        assert s.post(base + "/upload", data=b"payload").status_code == 503
        assert len(state.seen) == 1
        response = s.post(base + "/upload", data=b"payload", headers={"Idempotency-Key": "abc"})
    assert response.status_code == 200
    assert [m for m, _, _ in state.seen] == ["POST"] * 3
    assert state.seen[2][2] == b"payload"


def test_exhausted_retries_return_the_upstreams_response(
    stub: tuple[Stub, str], clock: ManualClock
) -> None:
    state, base = stub
    state.script = [(503, {})]
    policy = ClientPolicy(retry=RetryPolicy(attempts=3, budget_min_retries_per_second=100))
    with session(clock, policy) as s:
        response = s.get(base + "/v2/")
    assert response.status_code == 503
    assert len(state.seen) == 3


def test_connection_refused_is_retried_then_raised(clock: ManualClock) -> None:
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = ClientPolicy(retry=RetryPolicy(attempts=3, budget_min_retries_per_second=100))
    with session(clock, policy) as s, pytest.raises(requests.ConnectionError):
        s.get(f"http://127.0.0.1:{port}/")
    assert len(clock.slept) == 2  # two backoffs: three attempts


def test_open_breaker_fails_fast_as_a_requests_error(
    stub: tuple[Stub, str], clock: ManualClock
) -> None:
    state, base = stub
    state.script = [(500, {})]
    policy = ClientPolicy(
        breaker=BreakerPolicy(window="count", window_size=3, minimum_calls=3, open_duration=5)
    )
    with session(clock, policy) as s:
        for _ in range(3):
            assert s.get(base + "/").status_code == 500
        with pytest.raises(requests.ConnectionError) as info:
            s.get(base + "/")
    assert isinstance(info.value, CircuitOpenRequestsError)
    assert isinstance(info.value, CircuitOpenError)
    assert len(state.seen) == 3


def test_timeouts_are_capped_by_the_attempt_timeout() -> None:
    from urllib3.util import Timeout

    from seawall.client.requests import _cap

    assert _cap(None, 10.0) == 10.0
    assert _cap(60.0, 10.0) == 10.0
    assert _cap((3.0, None), 10.0) == (3.0, 10.0)
    custom = Timeout(connect=1, read=2)
    assert _cap(custom, 10.0) is custom  # type: ignore[arg-type]
    assert _cap(5.0, None) == 5.0


def test_importing_the_adapter_without_requests_names_the_extra() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['requests'] = None\n"
        "try:\n    import seawall.client.requests\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'seawall[requests]'" in out.stdout
