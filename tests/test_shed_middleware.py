"""LoadShedMiddleware through httpx.ASGITransport and raw ASGI calls."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message

from seawall.asgi.shed import LoadShedMiddleware
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.shed import ShedPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.shed import RequestShed

ONE = ShedPolicy(adaptive=False, initial_limit=1, min_limit=1, max_queue_length=0)
ONE_QUEUED = ONE.replace(max_queue_length=4)


class GatedApp:
    """An ASGI app that holds every request until ``gate`` is set; counts its runs."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self.runs: list[str] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.runs.append(scope["path"])
        self.started.set()
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def http_scope(path: str = "/v2/a/blobs/sha256:1", method: str = "GET") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }


class Client:
    """A raw ASGI client whose messages and disconnect the test controls."""

    def __init__(self, *messages: Message) -> None:
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        for m in messages:
            self.inbox.put_nowait(m)
        self.receive_calls = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        self.receive_calls += 1
        return await self.inbox.get()

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        for m in self.sent:
            if m["type"] == "http.response.start":
                return int(m["status"])
        return None


def body(data: bytes = b"", more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_shed_response_is_a_503_problem_with_retry_after(clock: ManualClock) -> None:
    inner = GatedApp()
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    app = LoadShedMiddleware(inner, ONE, clock=clock, events=bus)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = asyncio.ensure_future(client.get("/v2/a/blobs/sha256:1"))
        await inner.started.wait()
        shed = await client.get("/v2/a/blobs/sha256:2")
        head = await client.head("/v2/a/blobs/sha256:3")
        inner.gate.set()
        ok = await first
        again = await client.get("/v2/a/blobs/sha256:4")
    assert ok.status_code == 200 and again.status_code == 200
    assert shed.status_code == 503
    assert shed.headers["content-type"] == "application/problem+json"
    assert int(shed.headers["retry-after"]) >= 1
    assert shed.headers[REFUSED_HEADER] == "shed"
    doc = json.loads(shed.content)
    assert doc["status"] == 503 and doc["reason"] == "queue_full"
    assert doc["priority"] == 50  # the blob class: a fetch by digest continues a step
    assert head.status_code == 503 and head.content == b""
    assert inner.runs == ["/v2/a/blobs/sha256:1", "/v2/a/blobs/sha256:4"]
    events = [e for e in seen if isinstance(e, RequestShed)]
    assert [(e.reason, e.priority) for e in events] == [("queue_full", 50)] * 2
    assert all(e.retry_after >= 1 for e in events)
    assert app.limiter.in_flight == 0


async def test_disconnected_queued_client_costs_nothing(clock: ManualClock) -> None:
    inner = GatedApp()
    app = LoadShedMiddleware(inner, ONE_QUEUED, clock=clock)
    a = Client(body())
    b = Client(body())
    run_a = asyncio.ensure_future(app(http_scope("/v2/a/blobs/1"), a.receive, a.send))
    await inner.started.wait()
    run_b = asyncio.ensure_future(app(http_scope("/v2/a/blobs/2"), b.receive, b.send))
    await settle()
    assert app.limiter.queued == 1
    b.inbox.put_nowait({"type": "http.disconnect"})  # the client gives up while queued
    await asyncio.wait_for(run_b, 1)
    assert app.limiter.queued == 0
    assert b.sent == []  # nobody to answer
    inner.gate.set()
    await asyncio.wait_for(run_a, 1)
    assert inner.runs == ["/v2/a/blobs/1"]  # the app never ran for b
    assert app.limiter.in_flight == 0


async def test_body_read_while_queued_is_replayed_to_the_app(clock: ManualClock) -> None:
    inner = GatedApp()
    app = LoadShedMiddleware(inner, ONE_QUEUED, clock=clock)
    a = Client(body())
    b = Client(body(b"payload"))
    run_a = asyncio.ensure_future(app(http_scope("/a"), a.receive, a.send))
    await inner.started.wait()
    run_b = asyncio.ensure_future(app(http_scope("/b"), b.receive, b.send))
    await settle()
    assert b.receive_calls == 2  # the body, then the watch for a disconnect
    inner.gate.set()
    await asyncio.wait_for(asyncio.gather(run_a, run_b), 1)
    assert inner.bodies == [b"", b"payload"]
    assert b.status == 200


async def test_streamed_body_is_not_read_ahead_while_queued(clock: ManualClock) -> None:
    inner = GatedApp()
    app = LoadShedMiddleware(inner, ONE_QUEUED, clock=clock)
    a = Client(body())
    b = Client(body(b"part1-", more=True), body(b"part2", more=False))
    run_a = asyncio.ensure_future(app(http_scope("/a"), a.receive, a.send))
    await inner.started.wait()
    run_b = asyncio.ensure_future(app(http_scope("/b", "PUT"), b.receive, b.send))
    await settle()
    assert b.receive_calls == 1  # more_body: the watch stops, the rest stays unread
    inner.gate.set()
    await asyncio.wait_for(asyncio.gather(run_a, run_b), 1)
    assert inner.bodies == [b"", b"part1-part2"]


async def test_cancelled_queued_request_frees_its_place(clock: ManualClock) -> None:
    inner = GatedApp()
    app = LoadShedMiddleware(inner, ONE_QUEUED, clock=clock)
    a, b = Client(body()), Client(body())
    run_a = asyncio.ensure_future(app(http_scope("/a"), a.receive, a.send))
    await inner.started.wait()
    run_b = asyncio.ensure_future(app(http_scope("/b"), b.receive, b.send))
    await settle()
    run_b.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run_b
    assert app.limiter.queued == 0
    inner.gate.set()
    await run_a
    assert app.limiter.in_flight == 0 and inner.runs == ["/a"]


async def test_cancelled_while_the_disconnect_watch_winds_down(clock: ManualClock) -> None:
    """The permit arrives, the watch on receive() is cancelled, and the request itself is
    cancelled while that watch is still winding down (a server whose receive() is slow to
    honour cancellation). The cancellation must propagate and the permit come back once."""
    inner = GatedApp()
    app = LoadShedMiddleware(inner, ONE_QUEUED, clock=clock)
    a, b = Client(body()), Client()
    slow = asyncio.Event()

    async def slow_to_cancel_receive() -> Message:
        try:
            return await b.inbox.get()
        except asyncio.CancelledError:
            await slow.wait()
            raise

    run_a = asyncio.ensure_future(app(http_scope("/a"), a.receive, a.send))
    await inner.started.wait()
    run_b = asyncio.ensure_future(app(http_scope("/b"), slow_to_cancel_receive, b.send))
    await settle()
    inner.gate.set()
    await run_a  # b is handed the permit; its watch is now winding down
    await settle()
    run_b.cancel()
    await settle()
    slow.set()
    done, _ = await asyncio.wait({run_b}, timeout=5)  # bounded: a regression hangs here
    assert run_b in done and run_b.cancelled()
    assert inner.runs == ["/a"], "the app never runs for a cancelled request"
    assert app.limiter.in_flight == 0 and app.limiter.queued == 0


async def test_permit_is_released_once_when_the_app_raises_or_is_cancelled(
    clock: ManualClock,
) -> None:
    async def boom(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("app failed")

    app = LoadShedMiddleware(boom, ONE, clock=clock)
    c = Client(body())
    with pytest.raises(RuntimeError):
        await app(http_scope(), c.receive, c.send)
    assert app.limiter.in_flight == 0

    inner = GatedApp()
    app2 = LoadShedMiddleware(inner, ONE, clock=clock)
    run = asyncio.ensure_future(app2(http_scope(), c.receive, c.send))
    await inner.started.wait()
    assert app2.limiter.in_flight == 1
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert app2.limiter.in_flight == 0
    # exactly once: a fresh request is admitted, a second one is shed
    d = Client(body())
    inner.gate.set()
    await app2(http_scope(), d.receive, d.send)
    assert d.status == 200 and app2.limiter.in_flight == 0


async def test_non_http_scopes_pass_through(clock: ManualClock) -> None:
    seen: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])
        await send({"type": f"{scope['type']}.marker"})

    app = LoadShedMiddleware(inner, ONE.replace(max_queue_length=0), clock=clock)
    held = app.limiter.try_acquire()  # the limit is taken: http would be shed
    assert held is not None
    for kind in ("lifespan", "websocket"):
        c = Client()
        await app({"type": kind, "path": "/ws"}, c.receive, c.send)
        assert c.sent == [{"type": f"{kind}.marker"}]
    assert seen == ["lifespan", "websocket"]


async def test_health_checks_are_never_shed(clock: ManualClock) -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = LoadShedMiddleware(ok, ONE.replace(classes=ShedPolicy().classes), clock=clock)
    app.limiter.try_acquire()
    c, d = Client(body()), Client(body())
    await app(http_scope("/healthz"), c.receive, c.send)
    await app(http_scope("/v2/a/manifests/latest"), d.receive, d.send)
    assert c.status == 200 and d.status == 503


async def test_latency_sample_is_time_to_first_byte(clock: ManualClock) -> None:
    async def slow_body(scope: Any, receive: Any, send: Any) -> None:
        clock.advance(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        clock.advance(2.0)  # a big blob streamed to a slow client
        await send({"type": "http.response.body", "body": b""})

    policy = ShedPolicy(window_samples=1, initial_limit=1, min_limit=1)
    app = LoadShedMiddleware(slow_body, policy, clock=clock)
    c = Client(body())
    await app(http_scope(), c.receive, c.send)
    controller = app.limiter.controller
    assert controller is not None and controller.baseline == pytest.approx(0.05)


def _starlette_app() -> Starlette:
    async def hello(request: Request) -> Response:
        return PlainTextResponse("hello")

    return Starlette(routes=[Route("/v2/{name:path}/manifests/{ref}", hello)])


async def test_works_with_starlette_add_middleware_and_no_arguments() -> None:
    app = _starlette_app()
    app.add_middleware(LoadShedMiddleware)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        responses = await asyncio.gather(*(client.get("/v2/a/manifests/v1") for _ in range(20)))
    assert [r.status_code for r in responses] == [200] * 20


async def test_works_with_fastapi_and_sheds_there_too(clock: ManualClock) -> None:
    gate = asyncio.Event()
    api = FastAPI()

    @api.get("/v2/{name}/blobs/{digest}")
    async def blob(name: str, digest: str) -> dict[str, str]:
        await gate.wait()
        return {"digest": digest}

    api.add_middleware(LoadShedMiddleware, policy=ONE, clock=clock)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        first = asyncio.ensure_future(client.get("/v2/a/blobs/x"))
        await settle()
        shed = await client.get("/v2/a/blobs/y")
        gate.set()
        ok = await first
    assert ok.status_code == 200 and ok.json() == {"digest": "x"}
    assert shed.status_code == 503 and shed.headers["x-seawall-refused"] == "shed"


async def test_a_started_step_displaces_new_work_and_uploads_go_first(clock: ManualClock) -> None:
    """A layer by digest (continuing a step) takes the place of a queued manifest by tag
    (starting one); a large upload facing a full queue is refused at the door."""
    inner = GatedApp()
    policy = ONE.replace(max_queue_length=1, classes=ShedPolicy().classes)
    app = LoadShedMiddleware(inner, policy, clock=clock)
    a, manifest, blob, upload = Client(body()), Client(body()), Client(body()), Client(body())
    run_a = asyncio.ensure_future(app(http_scope("/v2/a/blobs/sha256:1"), a.receive, a.send))
    await inner.started.wait()
    run_manifest = asyncio.ensure_future(
        app(http_scope("/v2/b/manifests/v1"), manifest.receive, manifest.send)
    )
    await settle()
    up_scope = http_scope("/v2/a/blobs/uploads/", "POST")
    up_scope["headers"] = [(b"transfer-encoding", b"chunked")]
    await app(up_scope, upload.receive, upload.send)
    assert upload.status == 503  # the queue is full and nothing below an upload
    run_blob = asyncio.ensure_future(
        app(http_scope("/v2/c/blobs/sha256:2"), blob.receive, blob.send)
    )
    await asyncio.wait_for(run_manifest, 1)
    assert manifest.status == 503
    doc = json.loads(manifest.sent[1]["body"])
    assert doc["reason"] == "displaced" and doc["priority"] == 30
    inner.gate.set()
    await asyncio.wait_for(asyncio.gather(run_a, run_blob), 1)
    assert blob.status == 200
    assert inner.runs == ["/v2/a/blobs/sha256:1", "/v2/c/blobs/sha256:2"]


_NAMES = [
    b"accept", b"content-length", b"transfer-encoding", b"x-seawall-step", b"authorization",
    b"host", b"user-agent",
]  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from(_NAMES),
            st.sampled_from([b"", b"0", b"12", b"-3", b"abc", b"chunked", b"t1", b"t2"]),
        ),
        max_size=6,
    ),
    method=st.sampled_from(["GET", "HEAD", "PUT", "POST"]),
    version=st.sampled_from(["1.1", "2"]),
)
def test_reading_headers_by_map_agrees_with_walking_them(
    headers: list[tuple[bytes, bytes]], method: str, version: str
) -> None:
    """Admission reads the headers through a dict built in C; a repeated name sends it
    down the walk, which keeps every value. Both must read every request alike: here the
    walk also reads the lists with no repeated name, which the map reads in practice."""
    from seawall.asgi import shed

    scope = {"type": "http", "headers": headers, "http_version": version, "client": ("c", 1)}
    mapped = shed._read(scope, method, {})
    real = shed.header_map
    try:
        shed.header_map = lambda scope: None  # type: ignore[assignment]
        assert shed._read(scope, method, {}) == mapped
    finally:
        shed.header_map = real


def test_a_repeated_content_length_with_an_unreadable_value_is_a_body_of_unknown_size() -> None:
    """Only the walk sees the first of two lengths: a map keeps the last one alone."""
    from seawall.asgi.shed import _read

    scope = {"type": "http", "headers": [(b"content-length", b"x"), (b"content-length", b"5")]}
    assert _read(scope, "PUT", {}).body is None
    assert _read({"type": "http", "headers": [(b"content-length", b"5")]}, "PUT", {}).body == 5


def test_a_credential_is_hashed_into_its_tenant_once_and_the_memo_is_bounded() -> None:
    from seawall.asgi.shed import _read

    tenants: dict[bytes, bytes] = {}
    scope = {"type": "http", "headers": [(b"authorization", b"Bearer a")]}
    first = _read(scope, "GET", tenants).tenant
    assert _read(scope, "GET", tenants).tenant == first and len(tenants) == 1
    other = {"type": "http", "headers": [(b"authorization", b"Bearer b")]}
    assert _read(other, "GET", tenants).tenant != first  # no two tenants share a digest
    for i in range(2000):
        _read({"type": "http", "headers": [(b"authorization", b"%d" % i)]}, "GET", tenants)
    assert len(tenants) <= 1024
    huge = {"type": "http", "headers": [(b"authorization", b"x" * 4097)]}
    before = len(tenants)
    assert _read(huge, "GET", tenants).tenant == _read(huge, "GET", tenants).tenant
    assert len(tenants) == before  # a huge credential is hashed, never kept


def test_headers_given_as_an_iterator_are_read_and_left_for_the_app() -> None:
    """ASGI allows any iterable of headers; a review found the map using one up, so the
    shedder saw neither credential nor length (and nor would the app)."""
    from seawall.asgi import shed

    headers = [(b"authorization", b"Bearer a"), (b"content-length", b"5")]
    scope = {"type": "http", "headers": iter(headers), "client": ("c", 1)}
    read = shed._read(scope, "PUT", {})
    assert read == shed._read({"type": "http", "headers": headers, "client": ("c", 1)}, "PUT", {})
    assert read.body == 5 and read.tenant != "c"
    assert list(scope["headers"]) == headers  # still there for whoever reads next
