"""Finish started steps, lose no small write (issue 11, points 3 and 4, server half).

The priority a request is shed at shows in the refusal's problem document, so each test
holds the only slot and reads the priority of what is refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from seawall.asgi.shed import LoadShedMiddleware
from seawall.clock import ManualClock
from seawall.policy.shed import ShedPolicy
from seawall.protocol import REFUSED_HEADER, STEP_HEADER
from seawall.shed import StepTracker
from test_shed_middleware import Client, GatedApp, body, http_scope, settle

HELD = ShedPolicy(adaptive=False, initial_limit=1, min_limit=1, max_queue_length=0)
NEW, CONTINUES = 30, 50


def scope(
    path: str,
    *,
    client: str = "10.0.0.1",
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    s = http_scope(path, method)
    s["client"] = (client, 4242)
    s["headers"] = headers or []
    return s


async def priority_of(mw: LoadShedMiddleware, s: dict[str, Any]) -> int:
    """Send ``s`` while the only slot is held: it is refused, and says at which priority."""
    c = Client(body())
    await mw(s, c.receive, c.send)
    assert c.status == 503
    return int(json.loads(c.sent[1]["body"])["priority"])


async def admit(mw: LoadShedMiddleware, s: dict[str, Any]) -> None:
    c = Client(body())
    await mw(s, c.receive, c.send)
    assert c.status == 200


async def ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def holding(mw: LoadShedMiddleware) -> Any:
    slot = mw.limiter.try_acquire(1000)
    assert slot is not None
    return slot


async def test_a_step_header_seen_before_makes_a_continuation(clock: ManualClock) -> None:
    mw = LoadShedMiddleware(ok, HELD, clock=clock)
    step = [(STEP_HEADER.encode(), b"build-42/pull")]
    await admit(mw, scope("/v2/team/app/manifests/v1", headers=step))
    held = holding(mw)
    # the same step: its next manifest by tag continues it
    assert await priority_of(mw, scope("/v2/team/other/manifests/v2", headers=step)) == CONTINUES
    # another step of the same client starts new work
    other = [(STEP_HEADER.encode(), b"build-43/pull")]
    assert await priority_of(mw, scope("/v2/team/other/manifests/v2", headers=other)) == NEW
    # the same step name from another tenant is another step
    bob = [(STEP_HEADER.encode(), b"build-42/pull"), (b"authorization", b"Bearer bob")]
    assert await priority_of(mw, scope("/v2/team/other/manifests/v2", headers=bob)) == NEW
    mw.limiter.release(held)


async def test_without_the_header_client_and_repository_infer_a_step(clock: ManualClock) -> None:
    mw = LoadShedMiddleware(ok, HELD, clock=clock)
    await admit(mw, scope("/v2/team/app/manifests/v1", client="10.0.0.1"))
    held = holding(mw)
    same = scope("/v2/team/app/manifests/v1-arm64", client="10.0.0.1")
    assert await priority_of(mw, same) == CONTINUES
    # no leak between tenants: another client, or another repository, starts new work
    assert await priority_of(mw, scope("/v2/team/app/manifests/v2", client="10.0.0.2")) == NEW
    assert await priority_of(mw, scope("/v2/team/web/manifests/v1", client="10.0.0.1")) == NEW
    # behind one address, credentials tell tenants apart
    alice = [(b"authorization", b"Bearer alice")]
    bob = [(b"authorization", b"Bearer bob")]
    mw.limiter.release(held)
    await admit(mw, scope("/v2/team/db/manifests/v1", headers=alice))
    held = holding(mw)
    assert await priority_of(mw, scope("/v2/team/db/manifests/v2", headers=alice)) == CONTINUES
    assert await priority_of(mw, scope("/v2/team/db/manifests/v2", headers=bob)) == NEW
    # a step goes idle: after step_idle its client starts new work again
    clock.advance(HELD.step_idle + 1)
    assert await priority_of(mw, scope("/v2/team/app/manifests/v3", client="10.0.0.1")) == NEW
    mw.limiter.release(held)


async def test_pip_and_npm_index_pages_continue_a_step_of_the_same_client(
    clock: ManualClock,
) -> None:
    mw = LoadShedMiddleware(ok, HELD, clock=clock)
    npm = [(b"accept", b"application/vnd.npm.install-v1+json")]
    await admit(mw, scope("/simple/requests/"))
    await admit(mw, scope("/express", headers=npm))
    held = holding(mw)
    assert await priority_of(mw, scope("/simple/urllib3/")) == CONTINUES  # dependency page
    assert await priority_of(mw, scope("/body-parser", headers=npm)) == CONTINUES
    assert await priority_of(mw, scope("/simple/urllib3/", client="10.9.9.9")) == NEW
    mw.limiter.release(held)


async def test_step_memory_is_bounded(clock: ManualClock) -> None:
    mw = LoadShedMiddleware(ok, HELD.replace(step_memory=3), clock=clock)
    for i in range(50):
        await admit(mw, scope(f"/v2/team/app{i}/manifests/v1", client=f"10.0.{i}.1"))
        assert len(mw.steps) <= 3
    held = holding(mw)
    # the most recent ones are kept, the oldest forgotten
    assert await priority_of(mw, scope("/v2/team/app49/manifests/v2", client="10.0.49.1")) == 50
    assert await priority_of(mw, scope("/v2/team/app0/manifests/v2", client="10.0.0.1")) == 30
    mw.limiter.release(held)


async def test_under_a_surge_new_steps_are_refused_and_started_ones_finish(
    clock: ManualClock,
) -> None:
    """The queue holds one; a step's layers take the place of new steps' manifests."""
    inner = GatedApp()
    policy = HELD.replace(max_queue_length=2)
    mw = LoadShedMiddleware(inner, policy, clock=clock)
    first = Client(body())
    running = asyncio.ensure_future(
        mw(scope("/v2/team/app/manifests/v1"), first.receive, first.send)
    )
    await inner.started.wait()
    new_steps = [Client(body()) for _ in range(2)]
    queued = [
        asyncio.ensure_future(
            mw(scope(f"/v2/team/s{i}/manifests/v1", client=f"10.1.0.{i}"), c.receive, c.send)
        )
        for i, c in enumerate(new_steps)
    ]
    await settle()
    layers = [Client(body()) for _ in range(2)]
    digest = "sha256:" + "cd" * 32
    fetches = [
        asyncio.ensure_future(mw(scope(f"/v2/team/app/blobs/{digest}"), c.receive, c.send))
        for c in layers
    ]
    await settle()
    await asyncio.wait_for(asyncio.gather(*queued), 1)
    assert [c.status for c in new_steps] == [503, 503]  # refused at their first request
    inner.gate.set()
    await asyncio.wait_for(asyncio.gather(running, *fetches), 1)
    assert [c.status for c in layers] == [200, 200]


async def test_small_writes_are_not_shed_before_large_uploads(clock: ManualClock) -> None:
    """A webhook delivery takes a queued large upload's place, never the reverse."""
    inner = GatedApp()
    mw = LoadShedMiddleware(inner, HELD.replace(max_queue_length=1), clock=clock)
    a = Client(body())
    run_a = asyncio.ensure_future(mw(scope("/v2/team/app/manifests/v1"), a.receive, a.send))
    await inner.started.wait()
    big = Client(body(b"layer", more=True), body(b"-bytes"))
    big_scope = scope(
        "/v2/team/app/blobs/uploads/7", method="PUT", headers=[(b"content-length", b"50000000")]
    )
    run_big = asyncio.ensure_future(mw(big_scope, big.receive, big.send))
    await settle()
    hook = Client(body(b'{"event":"push"}'))
    hook_scope = scope("/hooks/registry", method="POST", headers=[(b"content-length", b"16")])
    run_hook = asyncio.ensure_future(mw(hook_scope, hook.receive, hook.send))
    await asyncio.wait_for(run_big, 1)
    assert big.status == 503
    assert json.loads(big.sent[1]["body"])["reason"] == "displaced"
    later = Client(body())
    late_big = scope(
        "/v2/team/app/blobs/uploads/8", method="PUT", headers=[(b"content-length", b"50000000")]
    )
    await mw(late_big, later.receive, later.send)
    assert later.status == 503  # it cannot take the small write's place
    inner.gate.set()
    await asyncio.wait_for(asyncio.gather(run_a, run_hook), 1)
    assert hook.status == 200 and inner.bodies[-1] == b'{"event":"push"}'


async def test_a_shed_post_was_never_processed_and_runs_once_when_retried(
    clock: ManualClock,
) -> None:
    """The server half of "no write lost": a refused POST is marked as refused before
    the app ran, so the client may send it again; the app then processes it exactly once."""
    gate = asyncio.Event()
    deliveries: list[bytes] = []

    async def receiver(scope: Any, receive: Any, send: Any) -> None:
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body", False):
                break
        if scope["path"] == "/slow":
            await gate.wait()
        else:
            deliveries.append(data)
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = LoadShedMiddleware(receiver, HELD, clock=clock)
    transport = httpx.ASGITransport(app=mw)
    async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as client:
        slow = asyncio.ensure_future(client.post("/slow", content=b"x"))
        for _ in range(20):
            await asyncio.sleep(0)
        event = b'{"delivery":"d-1"}'
        attempts = []
        response = await client.post("/events", content=event)
        attempts.append(response)
        assert response.status_code == 503
        assert response.headers[REFUSED_HEADER] == "shed"
        assert deliveries == []  # refused before the app ran: nothing was processed
        gate.set()
        await slow
        if response.headers.get(REFUSED_HEADER):  # a client retries what was refused
            attempts.append(await client.post("/events", content=event))
    assert [r.status_code for r in attempts] == [503, 202]
    assert deliveries == [event]  # exactly once


# -- the tracker itself ---------------------------------------------------------------------


def test_idle_steps_are_forgotten_once_an_idle_period_has_passed() -> None:
    tracker = StepTracker(idle=10.0, capacity=100)
    for key, at in (("a", 0.0), ("b", 5.0), ("c", 9.0), ("d", 9.5)):
        tracker.admitted(key, at)  # one sweep, at 0: nothing idle then
    assert len(tracker) == 4
    tracker.admitted("e", 12.0)  # 12 s after that sweep: a, idle for 12 s, goes
    assert len(tracker) == 4 and not tracker.started("a", 12.0)
    tracker.admitted("f", 22.0)  # exactly one idle period later: idle longer than 10 s go,
    assert len(tracker) == 2  # e (exactly 10 s) stays
    assert [tracker.started(k, 22.0) for k in "bcdef"] == [False, False, False, True, True]


def test_a_step_admitted_again_is_the_last_to_be_dropped() -> None:
    tracker = StepTracker(idle=100.0, capacity=2)
    tracker.admitted("a", 0.0)
    tracker.admitted("b", 1.0)
    tracker.admitted("a", 2.0)  # a continues: b is now the least recently admitted
    tracker.admitted("c", 3.0)
    assert [tracker.started(k, 3.0) for k in "abc"] == [True, False, True]
