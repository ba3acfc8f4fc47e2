"""The httpx transports: what is retried, what never is, deadlines, streaming, breakers."""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

from seawall.breaker import BreakerState, CircuitOpenError
from seawall.client.httpx import (
    CircuitOpenTransportError,
    RequestCoalesced,
    ResilientSyncTransport,
    ResilientTransport,
)
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import RetriesExhausted, RetryAfterHonoured, RetryBudgetExhausted

URL = "http://registry.test/v2/library/alpine/manifests/3.20"
BLOB = "http://registry.test/v2/library/alpine/blobs/sha256:" + "ab" * 32

Handler = Callable[[httpx.Request], httpx.Response]

# A budget that never interferes, for tests about something else.
GENEROUS = RetryPolicy(budget_min_retries_per_second=1000)


def script(
    *answers: int | BaseException, headers: dict[str, str] | None = None
) -> tuple[Handler, list[httpx.Request]]:
    """A handler answering in order (the last answer repeats) and the requests it saw."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = answers[min(len(seen) - 1, len(answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        return httpx.Response(answer, headers=headers or {}, content=b"body")

    return handler, seen


def make(
    handler: Handler,
    clock: ManualClock,
    policy: ClientPolicy | None = None,
    bus: EventBus | None = None,
) -> httpx.AsyncClient:
    policy = policy or ClientPolicy(retry=GENEROUS)
    transport = ResilientTransport(httpx.MockTransport(handler), policy, clock=clock, events=bus)
    return httpx.AsyncClient(transport=transport)


def make_sync(
    handler: Handler, clock: ManualClock, policy: ClientPolicy | None = None
) -> httpx.Client:
    policy = policy or ClientPolicy(retry=GENEROUS)
    transport = ResilientSyncTransport(httpx.MockTransport(handler), policy, clock=clock)
    return httpx.Client(transport=transport)


def recorder() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return bus, events


# ---------------------------------------------------------------- what is retried


@pytest.mark.parametrize("status", [429, 502, 503, 504])
async def test_retryable_statuses_are_retried(clock: ManualClock, status: int) -> None:
    handler, seen = script(status, 200)
    async with make(handler, clock) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert len(seen) == 2


@pytest.mark.parametrize(
    "error", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), httpx.ReadTimeout("t")]
)
async def test_connect_errors_and_timeouts_are_retried(
    clock: ManualClock, error: Exception
) -> None:
    handler, seen = script(error, 200)
    async with make(handler, clock) as client:
        response = await client.get(URL)
    assert response.status_code == 200
    assert len(seen) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 500, 501])
async def test_other_statuses_are_never_retried(clock: ManualClock, status: int) -> None:
    handler, seen = script(status, 200)
    async with make(handler, clock) as client:
        response = await client.get(URL)
    assert response.status_code == status
    assert len(seen) == 1


async def test_post_without_idempotency_key_is_never_retried(clock: ManualClock) -> None:
    handler, seen = script(503, 200)
    async with make(handler, clock) as client:
        response = await client.post(URL, content=b"upload")
        assert response.status_code == 503
        assert len(seen) == 1
        with pytest.raises(httpx.ConnectError):
            handler2, seen2 = script(httpx.ConnectError("down"), 200)
            async with make(handler2, clock) as client2:
                await client2.put(URL, content=b"x")
        assert len(seen2) == 1


async def test_post_with_idempotency_key_is_retried(clock: ManualClock) -> None:
    handler, seen = script(503, 200)
    async with make(handler, clock) as client:
        response = await client.post(URL, content=b"upload", headers={"Idempotency-Key": "k1"})
    assert response.status_code == 200
    assert len(seen) == 2
    assert seen[1].content == b"upload"  # the body was sent again, whole


async def test_retry_unsafe_opt_in(clock: ManualClock) -> None:
    handler, seen = script(503, 200)
    policy = ClientPolicy(retry=GENEROUS.replace(retry_unsafe=True))
    async with make(handler, clock, policy) as client:
        assert (await client.post(URL, content=b"x")).status_code == 200
    assert len(seen) == 2


async def test_streaming_request_body_is_never_replayed(clock: ManualClock) -> None:
    handler, seen = script(503, 200)

    async def body() -> AsyncIterator[bytes]:
        yield b"chunk"

    policy = ClientPolicy(retry=GENEROUS.replace(retry_unsafe=True))
    async with make(handler, clock, policy) as client:
        response = await client.post(URL, content=body())
    assert response.status_code == 503
    assert len(seen) == 1


async def test_attempts_exhausted_returns_the_upstreams_own_response(clock: ManualClock) -> None:
    handler, seen = script(503)
    bus, events = recorder()
    async with make(handler, clock, bus=bus) as client:
        response = await client.get(URL)
    assert response.status_code == 503  # not a new exception type
    assert len(seen) == 4  # the default attempts
    done = [e for e in events if isinstance(e, RetriesExhausted)]
    assert len(done) == 1 and done[0].why == "attempts" and done[0].attempts == 4


async def test_attempts_exhausted_raises_the_upstreams_own_error(clock: ManualClock) -> None:
    error = httpx.ConnectError("refused")
    handler, seen = script(error)
    async with make(handler, clock) as client:
        with pytest.raises(httpx.ConnectError) as info:
            await client.get(URL)
    assert info.value is error
    assert len(seen) == 4


async def test_discarded_responses_are_closed(clock: ManualClock) -> None:
    closed: list[int] = []

    class Body(httpx.AsyncByteStream):
        def __init__(self, n: int) -> None:
            self.n = n

        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"x"

        async def aclose(self) -> None:
            closed.append(self.n)

    n = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal n
        n += 1
        return httpx.Response(503 if n < 3 else 200, stream=Body(n))

    async with make(handler, clock) as client:
        response = await client.send(client.build_request("GET", URL), stream=True)
        assert response.status_code == 200
        assert closed == [1, 2]  # both discarded 503 bodies, not the answer
        await response.aclose()
    assert closed == [1, 2, 3]


# ---------------------------------------------------------------- deadline, Retry-After, budget


async def test_deadline_is_respected(clock: ManualClock) -> None:
    handler, seen = script(503)
    bus, events = recorder()
    start = clock.now()
    policy = ClientPolicy(
        retry=GENEROUS.replace(attempts=1000, deadline=5.0, backoff_base=0.5, backoff_cap=2.0),
        breaker=None,
    )
    async with make(handler, clock, policy, bus) as client:
        response = await client.get(URL)
    assert response.status_code == 503
    assert clock.now() - start <= 5.0
    assert len(seen) > 2
    assert [e.why for e in events if isinstance(e, RetriesExhausted)] == ["deadline"]


async def test_retry_after_delta_seconds_is_honoured(clock: ManualClock) -> None:
    handler, _ = script(503, 200, headers={"Retry-After": "3"})
    bus, events = recorder()
    async with make(handler, clock, bus=bus) as client:
        assert (await client.get(URL)).status_code == 200
    assert clock.slept == [3.0]
    assert any(isinstance(e, RetryAfterHonoured) and e.retry_after == 3.0 for e in events)


async def test_retry_after_http_date_is_honoured(clock: ManualClock) -> None:
    date = email.utils.formatdate(clock.wall() + 4, usegmt=True)
    handler, _ = script(429, 200, headers={"Retry-After": date})
    async with make(handler, clock) as client:
        assert (await client.get(URL)).status_code == 200
    assert clock.slept == [pytest.approx(4.0)]


async def test_retry_after_past_the_deadline_is_not_waited_for(clock: ManualClock) -> None:
    handler, seen = script(503, 200, headers={"Retry-After": "3600"})
    async with make(handler, clock) as client:
        response = await client.get(URL)
    assert response.status_code == 503
    assert len(seen) == 1
    assert clock.slept == []


async def test_malformed_retry_after_falls_back_to_backoff(clock: ManualClock) -> None:
    handler, _ = script(503, 200, headers={"Retry-After": "whenever you like"})
    async with make(handler, clock) as client:
        assert (await client.get(URL)).status_code == 200
    assert len(clock.slept) == 1 and 0 <= clock.slept[0] <= 0.5


async def test_spent_budget_fails_fast_with_the_upstreams_response(clock: ManualClock) -> None:
    handler, seen = script(503)
    bus, events = recorder()
    policy = ClientPolicy(
        retry=RetryPolicy(budget_ratio=0.0, budget_min_retries_per_second=0.1), breaker=None
    )
    async with make(handler, clock, policy, bus) as client:
        response = await client.get(URL)  # the minimum allows one retry per 10 s window
        assert response.status_code == 503 and len(seen) == 2
        response = await client.get(URL)
        assert response.status_code == 503 and len(seen) == 3  # no retry: budget spent
    assert [e.host for e in events if isinstance(e, RetryBudgetExhausted)] == [
        "registry.test",
        "registry.test",
    ]
    assert [e.why for e in events if isinstance(e, RetriesExhausted)] == ["budget", "budget"]


# ---------------------------------------------------------------- streaming, cancellation


async def test_successful_responses_stay_streaming(clock: ManualClock) -> None:
    pulled: list[int] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for i in range(3):
                pulled.append(i)
                yield b"chunk%d" % i

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=Body())

    async with make(handler, clock) as client, client.stream("GET", URL) as response:
        assert pulled == []  # headers only: nothing of the body was read
        chunks = [c async for c in response.aiter_raw()]
    assert chunks == [b"chunk0", b"chunk1", b"chunk2"]


async def test_cancellation_stops_retries_at_once(clock: ManualClock) -> None:
    attempts = 0
    started = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            return httpx.Response(503)
        started.set()
        await asyncio.Event().wait()  # the second attempt hangs until cancelled
        raise AssertionError("unreachable")

    transport = ResilientTransport(
        httpx.MockTransport(handler), ClientPolicy(retry=GENEROUS), clock=clock
    )
    async with httpx.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(client.get(URL))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert attempts == 2  # no attempt after the cancellation
    breakers = transport.breakers
    assert breakers is not None
    assert breakers.get("registry.test").in_flight == 0  # the cancelled permit was released


async def test_cancelled_error_from_the_inner_transport_is_not_retried(clock: ManualClock) -> None:
    handler, seen = script(asyncio.CancelledError())
    async with make(handler, clock) as client:
        with pytest.raises(asyncio.CancelledError):
            await client.get(URL)
    assert len(seen) == 1


# ---------------------------------------------------------------- breaker


def _trippy() -> ClientPolicy:
    return ClientPolicy(
        retry=GENEROUS,
        breaker=BreakerPolicy(window="count", window_size=4, minimum_calls=4, open_duration=30),
    )


async def test_open_breaker_fails_fast(clock: ManualClock) -> None:
    handler, seen = script(500)
    async with make(handler, clock, _trippy()) as client:
        for _ in range(4):
            assert (await client.get(URL)).status_code == 500
        with pytest.raises(CircuitOpenTransportError) as info:
            await client.get(URL)
    assert len(seen) == 4  # the upstream was not called
    err = info.value
    assert isinstance(err, httpx.TransportError) and isinstance(err, CircuitOpenError)
    assert err.name == "registry.test" and 0 < err.retry_in <= 30 * 1.2


async def test_breaker_sees_every_attempt_and_stops_retries(clock: ManualClock) -> None:
    handler, seen = script(503)
    policy = ClientPolicy(
        retry=GENEROUS.replace(attempts=10),
        breaker=BreakerPolicy(window="count", window_size=3, minimum_calls=3),
    )
    transport = ResilientTransport(httpx.MockTransport(handler), policy, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(CircuitOpenTransportError):
            await client.get(URL)
    assert len(seen) == 3  # three attempts tripped it; the retry then failed fast
    assert transport.breakers is not None
    assert transport.breakers.get("registry.test").state is BreakerState.OPEN


async def test_404_does_not_trip_the_breaker(clock: ManualClock) -> None:
    handler, seen = script(404)
    async with make(handler, clock, _trippy()) as client:
        for _ in range(10):
            assert (await client.get(URL)).status_code == 404
    assert len(seen) == 10


# ---------------------------------------------------------------- limits


async def test_client_rate_limit_paces_requests(clock: ManualClock) -> None:
    handler, seen = script(200)
    policy = ClientPolicy(rate_limit="2/second")
    async with make(handler, clock, policy) as client:
        for _ in range(4):
            await client.get(URL)
    assert len(seen) == 4
    assert sum(clock.slept) == pytest.approx(1.0)  # a burst of 2, then one every 0.5 s


async def test_bulkhead_holds_its_slot_until_the_body_is_closed(clock: ManualClock) -> None:
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"layer"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=Body())

    policy = ClientPolicy(max_concurrency=1)
    async with make(handler, clock, policy) as client:
        first = await client.send(client.build_request("GET", URL), stream=True)
        second = asyncio.create_task(client.get(URL))
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(seen) == 1 and not second.done()
        await first.aclose()
        assert (await second).status_code == 200
    assert len(seen) == 2


# ---------------------------------------------------------------- coalescing


async def test_identical_immutable_gets_share_one_fetch(clock: ManualClock) -> None:
    gate = asyncio.Event()
    calls = 0
    pulled: list[int] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for i in range(3):
                pulled.append(i)
                yield b"part%d" % i

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await gate.wait()
        return httpx.Response(200, stream=Body())

    bus, events = recorder()
    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock, events=bus)
    async with httpx.AsyncClient(transport=transport) as client:

        async def fetch() -> tuple[bytes, int]:
            async with client.stream("GET", BLOB) as response:
                return await response.aread(), len(pulled)

        tasks = [asyncio.create_task(fetch()) for _ in range(5)]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        results = await asyncio.gather(*tasks)
    assert calls == 1
    assert [body for body, _ in results] == [b"part0part1part2"] * 5
    assert pulled == [0, 1, 2]  # the upstream body was read once, for all five
    assert [e.followers for e in events if isinstance(e, RequestCoalesced)] == [4]


async def test_coalescing_respects_credentials_and_mutable_urls(clock: ManualClock) -> None:
    gate = asyncio.Event()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await gate.wait()
        return httpx.Response(200, content=b"x")

    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        tasks = [
            asyncio.create_task(client.get(BLOB, headers={"Authorization": "Bearer a"})),
            asyncio.create_task(client.get(BLOB, headers={"Authorization": "Bearer b"})),
            asyncio.create_task(client.get(URL)),
            asyncio.create_task(client.get(URL)),
        ]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)
    assert calls == 4


async def test_a_cancelled_leader_does_not_fail_its_followers(clock: ManualClock) -> None:
    gate = asyncio.Event()
    calls = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await gate.wait()
        return httpx.Response(200, content=b"blob")

    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        leader = asyncio.create_task(client.get(BLOB))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        followers = [asyncio.create_task(client.get(BLOB)) for _ in range(3)]
        for _ in range(3):
            await asyncio.sleep(0)
        leader.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        responses = await asyncio.gather(*followers)
        with pytest.raises(asyncio.CancelledError):
            await leader
    assert [r.content for r in responses] == [b"blob"] * 3
    assert calls == 2  # the cancelled leader's fetch, then one shared by the followers


# ---------------------------------------------------------------- sync face


def test_sync_retries_and_never_retries_post(clock: ManualClock) -> None:
    handler, seen = script(503, 200)
    with make_sync(handler, clock) as client:
        assert client.get(URL).status_code == 200
        assert len(seen) == 2
    handler, seen = script(503, 200)
    with make_sync(handler, clock) as client:
        assert client.post(URL, content=b"x").status_code == 503
        assert len(seen) == 1


def test_sync_connect_error_retried_and_404_not(clock: ManualClock) -> None:
    handler, seen = script(httpx.ConnectError("refused"), 200)
    with make_sync(handler, clock) as client:
        assert client.get(URL).status_code == 200
    assert len(seen) == 2
    handler, seen = script(404)
    with make_sync(handler, clock) as client:
        assert client.get(URL).status_code == 404
    assert len(seen) == 1


def test_sync_deadline_and_retry_after(clock: ManualClock) -> None:
    handler, seen = script(503, headers={"Retry-After": "2"})
    policy = ClientPolicy(retry=GENEROUS.replace(attempts=100, deadline=7.0), breaker=None)
    start = clock.now()
    with make_sync(handler, clock, policy) as client:
        assert client.get(URL).status_code == 503
    assert clock.slept == [2.0, 2.0, 2.0]  # the fourth wait would reach the deadline
    assert clock.now() - start <= 7.0
    assert len(seen) == 4


def test_sync_open_breaker_fails_fast(clock: ManualClock) -> None:
    handler, seen = script(502)
    with make_sync(handler, clock, _trippy()) as client, pytest.raises(CircuitOpenTransportError):
        for _ in range(10):
            client.get(URL)
    assert len(seen) == 4


def test_sync_streaming_and_timeouts_capped(clock: ManualClock) -> None:
    pulled: list[int] = []
    timeouts: list[object] = []

    class Body(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            pulled.append(1)
            yield b"data"

    def handler(request: httpx.Request) -> httpx.Response:
        timeouts.append(request.extensions.get("timeout"))
        return httpx.Response(200, stream=Body())

    with make_sync(handler, clock) as client, client.stream("GET", URL, timeout=60.0) as response:
        assert pulled == []
        assert response.read() == b"data"
    assert timeouts == [{"connect": 10.0, "read": 10.0, "write": 10.0, "pool": 10.0}]


async def test_rate_limit_wait_past_the_deadline_fails_without_calling(clock: ManualClock) -> None:
    from seawall import RateLimitWaitTooLong

    handler, seen = script(200)
    policy = ClientPolicy(rate_limit="1/minute")
    async with make(handler, clock, policy) as client:
        await client.get(URL)
        with pytest.raises(RateLimitWaitTooLong) as info:
            await client.get(URL)
    assert len(seen) == 1 and info.value.wait == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("url", "immutable"),
    [
        (BLOB, True),
        ("https://ghcr.io/v2/o/i/manifests/sha256:" + "0f" * 32, True),
        ("https://files.example/pkg.tar.gz?digest=sha256%3A" + "A1" * 32, True),
        ("https://ghcr.io/v2/o/i/manifests/latest", False),
        ("https://ghcr.io/v2/o/i/blobs/sha256:abc", False),
    ],
)
def test_immutable_urls_are_recognised(url: str, immutable: bool) -> None:
    from seawall.client.core import is_immutable_url

    assert is_immutable_url(url) is immutable
    assert is_immutable_url(httpx.URL(url).raw_path) is immutable


async def test_per_attempt_timeout_is_a_retryable_read_timeout(clock: ManualClock) -> None:
    calls = 0

    async def hangs(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    policy = ClientPolicy(retry=GENEROUS.replace(attempts=2), attempt_timeout=5.0)
    transport = ResilientTransport(httpx.MockTransport(hangs), policy, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        task = asyncio.create_task(client.get(URL))
        while not task.done():  # the upstream hangs until the driven clock moves on
            await asyncio.sleep(0)
            clock.advance(1.0)
        with pytest.raises(httpx.ReadTimeout, match="attempt timeout"):
            await task
    assert calls == 2
    assert transport.breakers is not None
    assert transport.breakers.get("registry.test").rates()[:2] == (2, 1.0)  # two failures


async def test_tee_keeps_only_what_the_slowest_open_reader_still_needs() -> None:
    from seawall.client._async.pipeline import AsyncTee

    closed: list[bool] = []

    class Source(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            for i in range(4):
                yield b"c%d" % i

        async def aclose(self) -> None:
            closed.append(True)

    tee = AsyncTee(Source(), 3, gone={2})  # reader 2 left before the answer came
    fast, slow = tee.reader(0), tee.reader(1)
    assert [c async for c in fast] == [b"c0", b"c1", b"c2", b"c3"]
    assert len(tee._chunks) == 4  # the slow reader has read nothing yet
    it = slow.__aiter__()
    assert await it.__anext__() == b"c0"
    assert len(tee._chunks) == 3  # c0 dropped: every open reader passed it
    await slow.aclose()
    assert tee._chunks == [] and closed == []  # the fast reader is still open
    await fast.aclose()
    assert closed == [True]  # the upstream body is closed once, by the last reader


@pytest.mark.parametrize(("marked", "expected"), [(True, "closed"), (False, "open")])
async def test_a_shed_answer_does_not_trip_the_breaker(
    clock: ManualClock, marked: bool, expected: str
) -> None:
    """A 503 that seawall's shedder marks is a live server pacing us (Retry-After does
    that job); an unmarked 503 is an unhealthy upstream and counts against the breaker."""
    from seawall.protocol import REFUSED_HEADER

    headers = {"retry-after": "1", **({REFUSED_HEADER: "shed"} if marked else {})}
    upstream = httpx.MockTransport(lambda request: httpx.Response(503, headers=headers))
    policy = ClientPolicy(retry=RetryPolicy(attempts=1), breaker=BreakerPolicy(minimum_calls=5))
    transport = ResilientTransport(upstream, policy, clock=clock)
    refused = 0
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(10):
            try:
                r = await client.get("https://registry.test/v2/app/manifests/latest")
            except CircuitOpenTransportError:
                refused += 1
            else:
                assert r.status_code == 503
    assert (refused > 0) == (expected == "open")
    breakers = transport.breakers
    assert breakers is not None
    assert breakers.get("registry.test").state.value == expected


async def test_a_caller_cancelled_while_pacing_gives_its_slot_back() -> None:
    """Issue 13: the client rate limit kept the slots of callers cancelled while waiting,
    so the next call waited for a slot nobody used (5.46 s instead of ~0.5 s)."""

    class PacingClock(ManualClock):
        def __init__(self) -> None:
            super().__init__()
            self.asked: list[float] = []

        async def sleep(self, seconds: float) -> None:
            self.asked.append(seconds)
            if seconds > 0:
                await asyncio.Event().wait()  # a pacing wait: until cancelled

    clock = PacingClock()
    handler, seen = script(200)
    policy = ClientPolicy(rate_limit="2/second")  # a burst of 2, then one every 0.5 s
    async with make(handler, clock, policy) as client:
        await client.get(URL)
        await client.get(URL)
        for _ in range(3):  # three callers wait for slots, then give up
            asked = len(clock.asked)
            waiting = asyncio.create_task(client.get(URL))
            while len(clock.asked) == asked:  # noqa: ASYNC110 - until it starts pacing
                await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        assert clock.asked[-3:] == [0.5, 0.5, 0.5]  # each found the slot given back
    assert len(seen) == 2


# ---------------------------------------------------------------- the admission sequence


async def test_a_shared_registrys_breakers_judge_with_their_own_policy(
    clock: ManualClock,
) -> None:
    from seawall.breaker import BreakerRegistry

    counting = BreakerPolicy(
        window="count", window_size=4, minimum_calls=4, jitter=0.0, count_429_as_failure=True
    )
    registry = BreakerRegistry(counting, clock=clock, events=EventBus())
    handler, seen = script(429)
    policy = ClientPolicy(retry=RetryPolicy(attempts=1))  # its own breaker policy: default
    transport = ResilientTransport(
        httpx.MockTransport(handler), policy, clock=clock, breakers=registry
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(4):
            assert (await client.get(URL)).status_code == 429
        with pytest.raises(CircuitOpenTransportError):
            await client.get(URL)
    assert len(seen) == 4
    assert registry.get("registry.test").state is BreakerState.OPEN


async def test_a_retried_answer_frees_its_bulkhead_slot_and_a_final_one_keeps_it(
    clock: ManualClock,
) -> None:
    bus, events = recorder()
    seen: list[httpx.Request] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"layer"

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503 if len(seen) == 1 else 200, stream=Body())

    policy = ClientPolicy(retry=GENEROUS, max_concurrency=1)
    async with make(handler, clock, policy, bus) as client:
        response = await client.send(client.build_request("GET", URL), stream=True)
        assert response.status_code == 200 and len(seen) == 2  # the retry got the one slot
        waiting = asyncio.create_task(client.get(URL))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done() and len(seen) == 2  # the streamed answer holds the slot
        await response.aclose()
        assert (await waiting).status_code == 200
    scheduled = [e for e in events if type(e).__name__ == "RetryScheduled"]
    assert [(e.attempt, e.reason) for e in scheduled] == [(1, "status 503")]  # type: ignore[attr-defined]
    started = [e for e in events if type(e).__name__ == "AttemptStarted"]
    assert [(e.host, e.attempt) for e in started] == [  # type: ignore[attr-defined]
        ("registry.test", 1),
        ("registry.test", 2),
        ("registry.test", 1),
    ]


def test_a_build_step_is_set_inside_its_block_only() -> None:
    from seawall.client.core import BUILD_STEP, build_step

    assert BUILD_STEP.get() is None
    with build_step("pipeline-42/step-3") as step:
        assert step == "pipeline-42/step-3" == BUILD_STEP.get()
        with build_step() as inner:
            assert len(inner) == 32 and BUILD_STEP.get() == inner
        assert BUILD_STEP.get() == step
    assert BUILD_STEP.get() is None
    marker = build_step("again")
    marker.__exit__()  # never entered: nothing to undo
    with marker:
        assert BUILD_STEP.get() == "again"
    assert BUILD_STEP.get() is None


def test_a_pacing_wait_past_the_deadline_names_the_host_and_the_wait(clock: ManualClock) -> None:
    from seawall.client.core import RateLimitWaitTooLong

    error = RateLimitWaitTooLong("registry.test", 12.5)
    assert (error.host, error.wait) == ("registry.test", 12.5)
    assert str(error) == (
        "client rate limit for registry.test needs a wait of 12.500s, past the deadline"
    )


async def test_without_a_breaker_a_pacing_wait_too_long_still_fails_cleanly(
    clock: ManualClock,
) -> None:
    from seawall import RateLimitWaitTooLong

    handler, seen = script(200)
    policy = ClientPolicy(rate_limit="1/minute", breaker=None)
    async with make(handler, clock, policy) as client:
        await client.get(URL)
        with pytest.raises(RateLimitWaitTooLong):
            await client.get(URL)
        clock.advance(60.0)  # the slot that was refused was not kept
        assert (await client.get(URL)).status_code == 200
    assert len(seen) == 2


async def test_a_clients_breaker_and_budget_run_on_its_clock(clock: ManualClock) -> None:
    handler, seen = script(503)
    policy = ClientPolicy(
        retry=RetryPolicy(
            attempts=2, budget_ratio=0.0, budget_min_retries_per_second=0.1, budget_window=10.0
        ),
        breaker=BreakerPolicy(
            window="count", window_size=5, minimum_calls=5, jitter=0.0, open_duration=30.0
        ),
        max_hosts=2,
    )
    transport = ResilientTransport(httpx.MockTransport(handler), policy, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get(URL)  # 503, one retry (the budget's one per 10 s), 503
        assert len(seen) == 2
        await client.get(URL)  # the budget is spent: no retry
        assert len(seen) == 3
        clock.advance(10.0)  # on the client's clock the window has moved on
        await client.get(URL)  # 503 and a retry again; five 503s: the breaker opens
        assert len(seen) == 5
        with pytest.raises(CircuitOpenTransportError):
            await client.get(URL)
        clock.advance(30.0)  # and its open period ends on the same clock
        with pytest.raises(CircuitOpenTransportError):
            await client.get(URL)  # a probe: it fails, and the breaker refuses its retry
        assert len(seen) == 6
        for host in ("a.test", "b.test", "c.test"):
            await client.get(f"http://{host}/")
    assert len(transport.budgets) == 2  # the policy's max_hosts bounds the budget too
