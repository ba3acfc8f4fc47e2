"""Long streams do not starve short requests; stalled bodies get 408 (issue 11, point 2).

The limit counts work until the response starts; a body streaming out (a slow download)
or in (an upload) holds a *stream*, capped separately by ``max_streams``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Message

from seawall.asgi.shed import LoadShedMiddleware, RequestBodyStalled
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.shed import ShedPolicy
from test_shed_middleware import Client, body, http_scope, settle

FOUR = ShedPolicy(adaptive=False, initial_limit=4, min_limit=1, max_queue_length=0)


class Registry:
    """Blobs start their response and then stream until ``release`` is set (a slow
    runner reading a big layer); manifests answer at once; uploads read their body."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.release = asyncio.Event()
        self.streaming = 0
        self.seen: list[Message] = []
        self.body_states: list[tuple[int, int]] = []  # (in flight, streams) per chunk
        self.mw: LoadShedMiddleware | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path: str = scope["path"]
        if scope["method"] in ("PUT", "POST", "PATCH"):
            data = b""
            while True:
                message = await receive()
                self.seen.append(message)
                if self.mw is not None:
                    lim = self.mw.limiter
                    self.body_states.append((lim.in_flight, lim.streams))
                if message["type"] != "http.request":
                    raise OSError("client went away")  # what a framework does on disconnect
                data += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            await send({"type": "http.response.start", "status": 201, "headers": []})
            await send({"type": "http.response.body", "body": str(len(data)).encode()})
            return
        self.clock.advance(0.01)  # 10 ms of work before the first byte
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if "/blobs/" in path:
            self.streaming += 1
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
            await self.release.wait()
            self.streaming -= 1
        await send({"type": "http.response.body", "body": b"{}"})


def manifest(n: int) -> dict[str, Any]:
    return http_scope(f"/v2/team/app/manifests/v{n}")


def blob(n: int) -> dict[str, Any]:
    return http_scope(f"/v2/team/app/blobs/sha256:{n:064x}")


def upload(length: int | None) -> dict[str, Any]:
    scope = http_scope("/v2/team/app/blobs/uploads/1", "PUT")
    if length is None:
        scope["headers"] = [(b"transfer-encoding", b"chunked")]
    else:
        scope["headers"] = [(b"content-length", str(length).encode())]
    return scope


async def test_slow_downloads_do_not_hold_the_slots_manifests_need(clock: ManualClock) -> None:
    """Four slow blob downloads on a limit of four: every manifest is still served, and
    the adaptive controller keeps getting samples while the downloads stream."""
    app = Registry(clock)
    mw = LoadShedMiddleware(app, FOUR, clock=clock)
    downloads = [Client(body()) for _ in range(4)]
    runs = [asyncio.ensure_future(mw(blob(i), c.receive, c.send)) for i, c in enumerate(downloads)]
    await settle()
    assert app.streaming == 4
    assert mw.limiter.in_flight == 0 and mw.limiter.streams == 4  # streams, not work
    clients = [Client(body()) for _ in range(20)]
    for i, c in enumerate(clients):
        await mw(manifest(i), c.receive, c.send)
    assert [c.status for c in clients] == [200] * 20
    app.release.set()
    await asyncio.gather(*runs)
    assert [c.status for c in downloads] == [200] * 4
    assert mw.limiter.in_flight == 0 and mw.limiter.streams == 0

    adaptive = LoadShedMiddleware(Registry(clock), ShedPolicy(), clock=clock)
    inner = adaptive.app
    assert isinstance(inner, Registry)
    slow = [Client(body()) for _ in range(4)]
    slow_runs = [
        asyncio.ensure_future(adaptive(blob(i), c.receive, c.send)) for i, c in enumerate(slow)
    ]
    await settle()
    for i in range(40):
        c = Client(body())
        await adaptive(manifest(i), c.receive, c.send)
        assert c.status == 200
    controller = adaptive.limiter.controller
    assert controller is not None and controller.baseline is not None  # samples arrived
    assert controller.baseline < 0.05  # the time to first byte, not the stream's length
    inner.release.set()
    await asyncio.gather(*slow_runs)


async def test_streams_are_capped_separately(clock: ManualClock) -> None:
    app = Registry(clock)
    mw = LoadShedMiddleware(app, FOUR.replace(initial_limit=10, max_streams=2), clock=clock)
    downloads = [Client(body()) for _ in range(2)]
    runs = [asyncio.ensure_future(mw(blob(i), c.receive, c.send)) for i, c in enumerate(downloads)]
    await settle()
    third, short = Client(body()), Client(body())
    await mw(blob(3), third.receive, third.send)
    await mw(manifest(1), short.receive, short.send)
    assert third.status == 503 and b'"reason":"streams"' in third.sent[1]["body"]
    assert short.status == 200  # a manifest is not a long transfer
    app.release.set()
    await asyncio.gather(*runs)
    again = Client(body())
    await mw(blob(4), again.receive, again.send)
    assert again.status == 200 and mw.limiter.streams == 0


async def test_an_upload_streaming_in_holds_a_stream_not_a_slot(clock: ManualClock) -> None:
    app = Registry(clock)
    mw = LoadShedMiddleware(app, FOUR, clock=clock)
    app.mw = mw
    c = Client(body(b"a" * 10, more=True), body(b"b" * 10, more=True), body(b"c" * 5))
    await mw(upload(25), c.receive, c.send)
    assert c.status == 201 and c.sent[1]["body"] == b"25"
    # while the body streamed: no slot, one stream; once complete: work again, no stream
    assert app.body_states == [(0, 1), (0, 1), (1, 0)]
    assert mw.limiter.in_flight == 0 and mw.limiter.streams == 0


async def test_a_stalled_upload_gets_408_and_frees_everything(clock: ManualClock) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    app = Registry(clock)
    mw = LoadShedMiddleware(app, FOUR.replace(body_timeout=7.0), clock=clock, events=bus)
    stalled = Client(body(b"part", more=True))  # and then nothing, ever
    before = clock.now()
    await asyncio.wait_for(mw(upload(1000), stalled.receive, stalled.send), 5)
    assert stalled.status == 408
    start = stalled.sent[0]
    assert (b"connection", b"close") in start["headers"]
    assert clock.now() - before >= 7.0  # the stall was timed on the injected clock
    assert app.seen[-1] == {"type": "http.disconnect"}  # the app was told to stop
    assert [m for m in stalled.sent if m["type"] == "http.response.start"] == [start]
    assert mw.limiter.in_flight == 0 and mw.limiter.streams == 0
    stalls = [e for e in seen if isinstance(e, RequestBodyStalled)]
    assert [(e.path, e.seconds) for e in stalls] == [("/v2/team/app/blobs/uploads/1", 7.0)]


async def test_four_stalled_uploads_do_not_stop_manifests(clock: ManualClock) -> None:
    """The issue's case: four uploads stall on a limit of four; manifests are served."""
    app = Registry(clock)
    mw = LoadShedMiddleware(app, FOUR, clock=clock)
    app.mw = mw
    gate = asyncio.Event()

    class Stalling(Client):
        async def receive(self) -> Message:
            self.receive_calls += 1
            if self.receive_calls == 1:
                return body(b"first", more=True)
            await gate.wait()
            return body(b"rest")

    uploads = [Stalling() for _ in range(4)]
    runs = [asyncio.ensure_future(mw(upload(None), u.receive, u.send)) for u in uploads]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert mw.limiter.in_flight == 0  # (the ManualClock made them stall at once: 408)
    clients = [Client(body()) for _ in range(20)]
    for i, c in enumerate(clients):
        await mw(manifest(i), c.receive, c.send)
    assert [c.status for c in clients] == [200] * 20
    gate.set()
    await asyncio.gather(*runs)
    assert all(u.status in (201, 408) for u in uploads)
    assert mw.limiter.in_flight == 0 and mw.limiter.streams == 0


async def test_requests_without_a_body_are_not_watched(clock: ManualClock) -> None:
    """A GET's receive() is passed through: waiting for a disconnect is never a stall."""
    seen: list[Message] = []

    async def waits_for_disconnect(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen.append(await receive())  # an app watching for the client to leave
        await send({"type": "http.response.body", "body": b""})

    mw = LoadShedMiddleware(waits_for_disconnect, FOUR.replace(body_timeout=1.0), clock=clock)
    c = Client(body())
    run = asyncio.ensure_future(mw(manifest(1), c.receive, c.send))
    await settle()
    clock.advance(100)
    await settle()
    assert not run.done() and c.status == 200
    c.inbox.put_nowait({"type": "http.disconnect"})
    await asyncio.wait_for(run, 1)
    assert seen[1] == {"type": "http.disconnect"}
