"""Edge cases a review of the one client core found, each pinned by a test.

A shared body cut by a cancelled reader; waits for pacing counted as upstream slowness;
a stale-while-revalidate answer on a sync face; headers that make ``int()`` raise; an SDK
error whose status the breaker read differently from the retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from seawall.breaker import BreakerState, Outcome, classify_exception
from seawall.cache import FallbackCache
from seawall.cache.freshness import content_length, freshness_for
from seawall.client._async.pipeline import AsyncTee, BodyCut
from seawall.client.httpx import ResilientSyncTransport, ResilientTransport
from seawall.clock import ManualClock
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.cache import CachePolicy
from seawall.policy.retry import ClientPolicy


async def test_a_reader_cancelled_while_pulling_cuts_the_body_for_everyone_loudly() -> None:
    """The reader pulling from the source for all was cancelled mid-body: the others must
    get an error, never a short body that looks complete."""
    gate = asyncio.Event()

    class Source(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"x0"
            await gate.wait()  # the second chunk is slow
            yield b"x1"

        async def aclose(self) -> None:
            pass

    tee = AsyncTee(Source(), 2, set())
    puller, other = tee.reader(0), tee.reader(1)
    it = puller.__aiter__()
    assert await it.__anext__() == b"x0"
    pulling = asyncio.create_task(it.__anext__())
    await asyncio.sleep(0)
    pulling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pulling
    with pytest.raises(BodyCut):
        _ = [chunk async for chunk in other]


async def test_waiting_for_pacing_is_not_the_upstreams_slowness(clock: ManualClock) -> None:
    """40 calls to an instant upstream behind a 1/second pacer wait up to 40 s for their
    slots; the breaker must not see slow calls (it opened on them before)."""
    policy = ClientPolicy(
        rate_limit="1/second",
        breaker=BreakerPolicy(window="count", window_size=10, minimum_calls=5),
    )
    transport = ResilientTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), policy, clock=clock
    )
    async with httpx.AsyncClient(transport=transport) as client:
        answers = await asyncio.gather(*(client.get("http://up.test/") for _ in range(25)))
    assert all(a.status_code == 200 for a in answers)
    assert clock.now() > 1_000 + 20  # they did wait for their slots
    assert transport.breakers is not None
    breaker = transport.breakers.get("up.test")
    assert breaker.state is BreakerState.CLOSED
    calls, _, slow_rate = breaker.rates()
    assert calls > 0 and slow_rate == 0.0


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives as a network body does, for either colour of transport."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def test_a_sync_face_in_the_revalidate_window_answers_fresh_data(clock: ManualClock) -> None:
    """A sync caller has no loop for a background refresh; it used to wait for the whole
    refresh and then get the stale copy anyway. It now revalidates and answers fresh."""
    version = [b"v1"]

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"cache-control": "max-age=10, stale-while-revalidate=300"}
        return httpx.Response(200, headers=headers, stream=Chunks(version[0]))

    cache = FallbackCache(policy=CachePolicy(stale_while_revalidate=300), clock=clock)
    transport = ResilientSyncTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    with httpx.Client(transport=transport) as client:
        assert client.get("http://up.test/simple/x/").content == b"v1"
        version[0] = b"v2"
        clock.advance(60)  # stale, inside the revalidate window
        again = client.get("http://up.test/simple/x/")
    assert again.content == b"v2" and "x-seawall-cache" not in again.headers


async def test_a_refresh_cancelled_before_it_ran_leaves_the_entry_refreshable(
    clock: ManualClock,
) -> None:
    """One refresh per entry at a time: the claim must be given back even when the
    transport closes before the background refresh took its first step (its ``finally``
    never runs), or no transport sharing the cache would refresh that entry again."""
    version = [b"v1"]
    asked: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked.append(str(request.url))
        headers = {"cache-control": "max-age=10, stale-while-revalidate=300"}
        return httpx.Response(200, headers=headers, stream=Chunks(version[0]))

    cache = FallbackCache(policy=CachePolicy(stale_while_revalidate=300), clock=clock)
    url = "http://up.test/simple/x/"
    first = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    async with httpx.AsyncClient(transport=first) as client:
        assert (await client.get(url)).content == b"v1"
        version[0] = b"v2"
        clock.advance(60)  # stale, inside the revalidate window
        stale = await client.get(url)
    # the client closed at once: the refresh was cancelled before it ran
    assert stale.content == b"v1" and len(asked) == 1
    second = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    async with httpx.AsyncClient(transport=second) as client:
        await client.get(url)  # stale again: this transport may refresh it
        layer = second._pipeline.cache_layer
        assert layer is not None
        await layer._tasks.join()
    assert len(asked) == 2
    third = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    async with httpx.AsyncClient(transport=third) as client:
        assert (await client.get(url)).content == b"v2"  # the refresh was kept


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b2", "-1", "12a", " 7 ", "9" * 40])
def test_a_content_length_only_counts_when_it_is_ascii_digits(value: str) -> None:
    expected = 7 if value.strip() == "7" else None
    assert content_length([("content-length", value)]) == expected


def test_a_huge_max_age_or_age_does_not_overflow() -> None:
    """A max-age or Age of 400 digits made ``float(int(raw))`` raise OverflowError."""
    huge = "9" * 400
    fresh = freshness_for(
        [("cache-control", f"max-age={huge}"), ("age", huge)],
        now_wall=1_700_000_000.0,
        immutable=False,
        default_fresh=60.0,
        max_stale=3600.0,
        stale_while_revalidate=0.0,
    )
    assert fresh.lifetime >= 2**31


def test_an_sdk_error_with_its_own_status_code_reads_the_same_to_the_breaker() -> None:
    """The retry read ``exc.status_code``; the breaker read only ``exc.response``: a 404
    from an SDK was final for the retry but a failure for the breaker."""

    class NotFound(Exception):
        status_code = 404

    class Busy(Exception):
        status = 503

    assert classify_exception(NotFound()) is Outcome.SUCCESS
    assert classify_exception(Busy()) is Outcome.FAILURE
