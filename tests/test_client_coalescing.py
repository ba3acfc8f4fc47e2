"""Coalescing on every HTTP face: concurrent identical GETs of a digest-addressed URL share
one upstream fetch, within one credential scope only, and every caller gets every byte.

The sync faces are driven from threads; the upstream (a real server on 127.0.0.1) holds
its answer back briefly so that the callers really overlap.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
import requests

from scripted import Answer, Scripted, scripted_server
from seawall.client.httpx import ResilientSyncTransport, ResilientTransport
from seawall.client.requests import ResilientAdapter
from seawall.events import Event, EventBus

BLOB = "/v2/lib/app/blobs/sha256:" + "ab" * 32
BODY = bytes(range(256)) * 2048  # 512 KiB, streamed in chunks
TOKENS = ["Bearer alice"] * 4 + ["Bearer bob"] * 4


@pytest.fixture
def server() -> Iterator[Scripted]:
    with scripted_server() as s:
        s.play(Answer(200, body=BODY, chunks=32, delay=0.3))
        yield s


def _coalesced(events: list[Event]) -> list[int]:
    return sorted(getattr(e, "followers", 0) for e in events if e.name == "client.coalesced")


def _threads(fetch: object) -> list[bytes]:
    out: list[bytes] = [b""] * len(TOKENS)
    barrier = threading.Barrier(len(TOKENS))

    def run(i: int) -> None:
        barrier.wait()
        out[i] = fetch(TOKENS[i])  # type: ignore[operator]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(TOKENS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_sync_httpx_coalesces_per_credential(server: Scripted) -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    with httpx.Client(transport=ResilientSyncTransport(events=bus)) as client:

        def fetch(token: str) -> bytes:
            with client.stream("GET", server.url + BLOB, headers={"authorization": token}) as r:
                return b"".join(r.iter_raw(16384))

        bodies = _threads(fetch)
    assert all(b == BODY for b in bodies)
    assert len(server.seen) == 2  # one fetch per credential, not eight
    assert {s.headers["authorization"] for s in server.seen} == {"Bearer alice", "Bearer bob"}
    assert _coalesced(events) == [3, 3]


def test_requests_coalesces_per_credential(server: Scripted) -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    adapter = ResilientAdapter(events=bus, pool_maxsize=16)
    with requests.Session() as session:
        session.mount("http://", adapter)

        def fetch(token: str) -> bytes:
            return session.get(server.url + BLOB, headers={"authorization": token}).content

        bodies = _threads(fetch)
    assert all(b == BODY for b in bodies)
    assert len(server.seen) == 2
    assert _coalesced(events) == [3, 3]


async def test_async_httpx_coalesces_per_credential(server: Scripted) -> None:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    async with httpx.AsyncClient(transport=ResilientTransport(events=bus)) as client:

        async def fetch(token: str) -> bytes:
            r = await client.get(server.url + BLOB, headers={"authorization": token})
            return r.content

        bodies = await asyncio.gather(*(fetch(t) for t in TOKENS))
    assert all(b == BODY for b in bodies)
    assert len(server.seen) == 2
    assert _coalesced(events) == [3, 3]


def test_a_follower_that_gives_up_does_not_stall_the_others(server: Scripted) -> None:
    """A follower that closes its body early must not keep chunks for ever or block."""
    with httpx.Client(transport=ResilientSyncTransport()) as client:

        def fetch(token: str) -> bytes:
            with client.stream("GET", server.url + BLOB, headers={"authorization": "same"}) as r:
                if token == "Bearer bob":
                    return next(r.iter_raw(1024))  # reads one chunk, then leaves
                return b"".join(r.iter_raw(16384))

        bodies = _threads(fetch)
    assert sum(b == BODY for b in bodies) == 4 and len(server.seen) == 1
