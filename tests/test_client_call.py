"""The call wrapper: any async callable (a registry SDK method) in the same pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import httpx
import pytest

from seawall.breaker import BreakerRegistry, CircuitOpenError
from seawall.client._async.call import AsyncCallFace
from seawall.client._async.pipeline import async_send
from seawall.client._call import default_retry_on
from seawall.client.call import Resilient, resilient
from seawall.client.core import (
    BUILD_STEP,
    CALL_TIME_LIMIT,
    AttemptStarted,
    BulkheadTimeout,
    ClientCore,
    HostPacer,
    RateLimitWaitTooLong,
    build_step,
)
from seawall.client.httpx import CircuitOpenTransportError, ResilientTransport
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import RetryScheduled

T = TypeVar("T")

POLICY = ClientPolicy(retry=RetryPolicy(budget_min_retries_per_second=100))


class SdkError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"registry said {status}")
        self.status_code = status


async def test_connection_errors_are_retried(clock: ManualClock) -> None:
    calls = 0

    @resilient(POLICY, host="registry.test", clock=clock)
    async def pull(ref: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionResetError("peer reset")
        return f"manifest of {ref}"

    assert await pull("alpine:3.20") == "manifest of alpine:3.20"
    assert calls == 3
    assert pull.__name__ == "pull"


@pytest.mark.parametrize(("status", "expected_calls"), [(503, 2), (429, 2), (404, 1), (500, 1)])
async def test_status_bearing_errors_follow_the_policy(
    clock: ManualClock, status: int, expected_calls: int
) -> None:
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise SdkError(status)
        return "ok"

    guard: Resilient[[], str] = Resilient(fetch, "registry.test", POLICY, clock=clock)
    if expected_calls == 1:
        with pytest.raises(SdkError):
            await guard()
    else:
        assert await guard() == "ok"
    assert calls == expected_calls


async def test_other_errors_and_non_idempotent_calls_are_not_retried(clock: ManualClock) -> None:
    calls = 0

    async def fail() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("bad digest")

    with pytest.raises(ValueError):
        await resilient(POLICY, host="h", clock=clock)(fail)()
    assert calls == 1

    async def upload() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("lost")

    calls = 0
    with pytest.raises(ConnectionError):
        await resilient(POLICY, host="h", clock=clock, idempotent=False)(upload)()
    assert calls == 1


async def test_exhausted_retries_raise_the_last_own_error(clock: ManualClock) -> None:
    errors: list[Exception] = []

    async def flaky() -> None:
        errors.append(TimeoutError(f"attempt {len(errors)}"))
        raise errors[-1]

    policy = ClientPolicy(retry=RetryPolicy(attempts=3, budget_min_retries_per_second=100))
    with pytest.raises(TimeoutError) as info:
        await Resilient(None, "h", policy, clock=clock).call(flaky)
    assert info.value is errors[-1] and len(errors) == 3


async def test_shares_the_breaker_registry_with_the_transport(clock: ManualClock) -> None:
    registry = BreakerRegistry(
        BreakerPolicy(window="count", window_size=3, minimum_calls=3), clock=clock
    )
    transport = ResilientTransport(
        httpx.MockTransport(lambda r: httpx.Response(500)), POLICY, clock=clock, breakers=registry
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for _ in range(3):
            await client.get("http://registry.test/v2/")
        with pytest.raises(CircuitOpenTransportError):
            await client.get("http://registry.test/v2/")
    calls = 0

    @resilient(POLICY, host="registry.test", clock=clock, breakers=transport.breakers)
    async def sdk_call() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(CircuitOpenError) as info:
        await sdk_call()
    assert calls == 0 and info.value.name == "registry.test"


async def test_cancellation_stops_retries_and_frees_the_permit(clock: ManualClock) -> None:
    calls = 0
    hang = asyncio.Event()

    async def fetch() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("first fails")
        hang.set()
        await asyncio.Event().wait()

    guard = Resilient(fetch, "h", POLICY, clock=clock)
    task = asyncio.create_task(guard())
    await hang.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 2
    assert guard.breakers is not None and guard.breakers.get("h").in_flight == 0
    with pytest.raises(ValueError, match="host"):
        Resilient(None, "", POLICY)  # no function and no host: nothing to key the breaker by
    assert Resilient(fetch, None, POLICY).host.endswith("fetch")  # keyed by its own name


async def test_bulkhead_and_rate_limit_apply_to_calls(clock: ManualClock) -> None:
    release = asyncio.Event()
    running = peak = 0

    async def slow() -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await release.wait()
        running -= 1
        return "done"

    policy = ClientPolicy(max_concurrency=2, rate_limit="2/second")
    guard = Resilient(slow, "h", policy, clock=clock)
    tasks = [asyncio.create_task(guard()) for _ in range(4)]
    for _ in range(10):
        await asyncio.sleep(0)
    assert running == 2  # the bulkhead holds the other two
    release.set()
    assert await asyncio.gather(*tasks) == ["done"] * 4
    assert peak == 2
    assert sum(clock.slept) == pytest.approx(1.0)  # a burst of 2, then one every 0.5 s


async def test_a_429_carried_by_an_exception_follows_the_breaker_policy(
    clock: ManualClock,
) -> None:
    class Throttled(Exception):
        def __init__(self) -> None:
            super().__init__("registry said 429")
            self.response = httpx.Response(429)

    async def fetch() -> str:
        raise Throttled()

    async def breaker_after_one_call(count_429: bool) -> str:
        policy = ClientPolicy(
            retry=RetryPolicy(attempts=1),
            breaker=BreakerPolicy(minimum_calls=1, count_429_as_failure=count_429),
        )
        breakers = BreakerRegistry(policy.breaker, clock=clock)
        guard = Resilient(fetch, "registry.test", policy, clock=clock, breakers=breakers)
        with pytest.raises(Throttled):
            await guard()
        return breakers.get("registry.test").state.value

    assert await breaker_after_one_call(count_429=True) == "open"
    assert await breaker_after_one_call(count_429=False) == "closed"


def test_a_plain_def_is_guarded_synchronously(clock: ManualClock) -> None:
    """@resilient on a plain def returns its value, not a coroutine, with the same retries."""
    from seawall import SyncResilient

    calls = 0

    @resilient(POLICY, host="registry.test", clock=clock)
    def pull(ref: str) -> str:
        nonlocal calls
        calls += 1
        if calls < 2:
            raise ConnectionResetError("peer reset")
        return f"manifest of {ref}"

    assert isinstance(pull, SyncResilient)
    assert pull("alpine:3.20") == "manifest of alpine:3.20"
    assert calls == 2 and len(clock.slept) == 1


async def test_a_bare_decorator_keys_the_breaker_by_the_function_name(clock: ManualClock) -> None:
    @resilient
    async def fetch_index() -> str:
        return "index"

    assert await fetch_index() == "index"
    assert fetch_index.host.endswith("fetch_index")
    assert fetch_index.breakers is not None and fetch_index.host in fetch_index.breakers
    with pytest.raises(TypeError, match="ClientPolicy or a function"):
        resilient(42)  # type: ignore[call-overload]


# ---------------------------------------------------------------- the admission sequence
# (the client core's decisions, seen through the call wrapper and the httpx transport)


def _recorder() -> tuple[EventBus, list[Event]]:
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    return bus, events


async def _yield(times: int = 10) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def _start_with_time_limit(coro: Coroutine[Any, Any, T], seconds: float) -> asyncio.Task[T]:
    """A task whose calls may take ``seconds`` (as under the fallback cache): shorter than
    the attempt timeout of the call already holding the slot, so only its wait times out."""
    token = CALL_TIME_LIMIT.set(seconds)
    try:
        return asyncio.create_task(coro)
    finally:
        CALL_TIME_LIMIT.reset(token)


async def test_a_full_bulkhead_fails_locally_without_charging_the_breaker(
    clock: ManualClock,
) -> None:
    release = asyncio.Event()
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        return "done"

    policy = ClientPolicy(retry=POLICY.retry, max_concurrency=1, attempt_timeout=2.0)
    guard = Resilient(slow, "registry.test", policy, clock=clock)
    first = asyncio.create_task(guard())
    await _yield()
    second = _start_with_time_limit(guard(), 1.0)
    await _yield()
    clock.advance(1.0)  # the second call's time passes while it waits for the slot
    with pytest.raises(BulkheadTimeout) as info:
        await second
    assert (info.value.host, info.value.waited) == ("registry.test", 1.0)
    assert str(info.value) == "no free slot for registry.test (max_concurrency) within 1.0s"
    assert calls == 1  # never sent, never retried
    breaker = guard.breakers.get("registry.test")  # type: ignore[union-attr]
    assert breaker.in_flight == 1  # the refused attempt gave its permit back: only `first`
    release.set()
    assert await first == "done"
    assert breaker.in_flight == 0 and breaker.rates() == (1, 0.0, 0.0)  # neutral, not counted


async def test_a_full_bulkhead_is_never_retried_even_when_the_face_calls_it_retryable(
    clock: ManualClock,
) -> None:
    """A face may report a full bulkhead with an error it otherwise retries (requests
    raises a ConnectTimeout): the core still treats it as local and raises it at once."""

    class Stream:
        def __aiter__(self) -> AsyncIterator[bytes]:
            return self._chunks()

        async def _chunks(self) -> AsyncIterator[bytes]:
            yield b"layer"

        async def aclose(self) -> None:
            pass

    class StreamingPoolFace(AsyncCallFace):
        """Answers that stream (the slot is held until closed), and a full bulkhead
        reported as a connection error."""

        def finished(self, response: object) -> bool:
            return False

        def body(self, response: Any) -> Any:
            return response

        def replace_body(self, response: Any, body: Any) -> Any:
            return body

        def no_slot_error(self, host: str, waited: float | None, request: object) -> BaseException:
            return ConnectionError(f"no free slot for {host}")

    async def open_stream() -> Stream:
        return Stream()

    bus, events = _recorder()
    policy = ClientPolicy(retry=POLICY.retry, max_concurrency=1, attempt_timeout=1.0)
    core = ClientCore(policy, clock=clock, events=bus)
    face = StreamingPoolFace(core, "h", True, default_retry_on)
    held = await async_send(core, face, (open_stream, (), {}))  # its open body holds the slot
    second = asyncio.create_task(async_send(core, face, (open_stream, (), {})))
    await _yield()
    clock.advance(1.0)
    await _yield()
    try:
        assert second.done()
        with pytest.raises(ConnectionError, match="no free slot for h"):
            second.result()
        assert not [e for e in events if isinstance(e, RetryScheduled)]
    finally:
        second.cancel()
        await held.aclose()


async def test_httpx_reports_a_full_bulkhead_as_a_pool_timeout_of_the_request(
    clock: ManualClock,
) -> None:
    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"layer"

    policy = ClientPolicy(retry=POLICY.retry, max_concurrency=1, attempt_timeout=3.0)
    transport = ResilientTransport(
        httpx.MockTransport(lambda r: httpx.Response(200, stream=Body())), policy, clock=clock
    )
    async with httpx.AsyncClient(transport=transport) as client:
        first = await client.send(client.build_request("GET", "http://registry.test/"), stream=True)
        request = client.build_request("GET", "http://registry.test/v2/tags")
        # the open body holds the slot; the transport is asked directly, as httpx would:
        # its errors carry the request themselves
        second = asyncio.create_task(transport.handle_async_request(request))
        await _yield()
        clock.advance(3.0)
        with pytest.raises(httpx.PoolTimeout) as info:
            await second
        assert info.value.request is request
        assert str(info.value) == "no free slot for registry.test (max_concurrency) within 3.0s"
        await first.aclose()


async def test_pacing_never_waits_past_the_deadline_and_frees_the_permit(
    clock: ManualClock,
) -> None:
    calls = 0

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        return "ok"

    policy = ClientPolicy(retry=RetryPolicy(deadline=0.5), rate_limit="1/second")
    guard = Resilient(fetch, "registry.test", policy, clock=clock)
    assert await guard() == "ok"
    with pytest.raises(RateLimitWaitTooLong) as info:
        await guard()  # the next slot is 1 s away, the deadline 0.5 s
    assert (info.value.host, info.value.wait) == ("registry.test", 1.0)
    assert calls == 1 and clock.slept == []
    breaker = guard.breakers.get("registry.test")  # type: ignore[union-attr]
    assert breaker.in_flight == 0 and breaker.rates() == (1, 0.0, 0.0)


async def test_a_pacing_wait_as_long_as_the_time_left_is_refused_at_once(
    clock: ManualClock,
) -> None:
    """A slot that frees exactly at the deadline would leave the attempt a zero timeout
    after a whole wait: the caller learns at once that the rate limit is in the way."""
    bus, events = _recorder()

    async def fetch() -> str:
        await asyncio.sleep(0)
        return "ok"

    policy = ClientPolicy(retry=RetryPolicy(deadline=1.0), rate_limit="1/second")
    guard = Resilient(fetch, "registry.test", policy, clock=clock, events=bus)
    start = clock.now()
    assert await guard() == "ok"
    with pytest.raises(RateLimitWaitTooLong) as info:
        await guard()  # its slot is 1 s away: exactly the time it has
    assert info.value.wait == 1.0 and clock.slept == []
    started = [e for e in events if isinstance(e, AttemptStarted)]
    assert started == [AttemptStarted(at=start, host="registry.test", attempt=1, timeout=1.0)]


def test_a_pacer_reserves_only_a_wait_shorter_than_the_time_allowed(clock: ManualClock) -> None:
    pacer = HostPacer("1/second", clock)
    assert pacer.reserve(0.0) == 0.0  # no wait at all: reserved even with no time to spare
    assert pacer.reserve(0.999) == -1.0  # too long: nothing reserved
    assert pacer.reserve(1.0) == -1.0  # as long as the time allowed: nothing reserved
    assert pacer.reserve(1.001) == 1.0
    assert pacer.reserve(1.001) == -2.0


async def test_each_attempt_is_announced_with_its_time_and_timeout(clock: ManualClock) -> None:
    bus, events = _recorder()
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionResetError("peer reset")
        return "ok"

    policy = ClientPolicy(retry=POLICY.retry, attempt_timeout=4.0)
    start = clock.now()
    assert await Resilient(flaky, "h", policy, clock=clock, events=bus)() == "ok"
    (wait,) = clock.slept
    started = [e for e in events if isinstance(e, AttemptStarted)]
    assert started == [
        AttemptStarted(at=start, host="h", attempt=1, timeout=4.0),
        AttemptStarted(at=start + wait, host="h", attempt=2, timeout=4.0),
    ]


async def test_each_logical_call_earns_its_host_budget_once(clock: ManualClock) -> None:
    """With ratio 1 and no minimum, every call sent adds one retry to the allowance; its
    own retries do not count as calls."""
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise ConnectionResetError("peer reset")
        return "ok"

    retry = RetryPolicy(budget_ratio=1.0, budget_min_retries_per_second=0.0)
    guard = Resilient(flaky, "h", ClientPolicy(retry=retry), clock=clock)
    assert await guard() == "ok"  # the first attempt earned the one retry it took
    assert calls == 2 and guard.budgets.available("h") == 0.0
    assert await guard() == "ok"
    assert calls == 4 and guard.budgets.available("h") == 0.0
    calls = 1  # the next call succeeds at once
    assert await guard() == "ok"
    assert guard.budgets.available("h") == 1.0


async def test_seawalls_own_errors_are_never_retried_whatever_retry_on_says(
    clock: ManualClock,
) -> None:
    calls = 0

    async def nested() -> None:
        nonlocal calls
        calls += 1
        raise CircuitOpenError("inner.test", clock.now() + 5.0, 5.0)

    guard = Resilient(nested, "h", POLICY, clock=clock, retry_on=lambda exc: True)
    with pytest.raises(CircuitOpenError):
        await guard()
    assert calls == 1 and clock.slept == []


async def test_pacing_is_per_host_and_a_busy_pacer_outlives_max_hosts(clock: ManualClock) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        return httpx.Response(200)

    policy = ClientPolicy(retry=POLICY.retry, rate_limit="1/second", max_hosts=1)
    transport = ResilientTransport(httpx.MockTransport(handler), policy, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        await client.get("http://a.test/")
        await client.get("http://b.test/")  # another host: its own pace
        assert clock.slept == []
        await client.get("http://a.test/")  # a's slot is still reserved: it waits
        assert clock.slept == [1.0]
    assert seen == ["a.test", "b.test", "a.test"]


async def test_bulkheads_are_per_host_and_one_in_use_outlives_max_hosts(
    clock: ManualClock,
) -> None:
    gates = {"a.test": asyncio.Event(), "b.test": asyncio.Event()}
    running = {"a.test": 0, "b.test": 0}
    peak = dict(running)

    async def handler(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        running[host] += 1
        peak[host] = max(peak[host], running[host])
        await gates[host].wait()
        running[host] -= 1
        return httpx.Response(200)

    policy = ClientPolicy(retry=POLICY.retry, max_concurrency=1, max_hosts=1)
    transport = ResilientTransport(httpx.MockTransport(handler), policy, clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        a1 = asyncio.create_task(client.get("http://a.test/1"))
        await _yield()
        gates["b.test"].set()
        assert (await client.get("http://b.test/")).status_code == 200  # not behind a's slot
        a2 = asyncio.create_task(client.get("http://a.test/2"))
        await _yield()
        assert running["a.test"] == 1  # a's bulkhead was kept while its slot was taken
        gates["a.test"].set()
        assert [r.status_code for r in await asyncio.gather(a1, a2)] == [200, 200]
    assert peak == {"a.test": 1, "b.test": 1}


async def test_a_crawlers_bulkheads_stay_within_max_hosts(clock: ManualClock) -> None:
    policy = ClientPolicy(retry=POLICY.retry, max_concurrency=4, max_hosts=2)
    transport = ResilientTransport(
        httpx.MockTransport(lambda r: httpx.Response(200)), policy, clock=clock
    )
    async with httpx.AsyncClient(transport=transport) as client:
        for n in range(10):
            await client.get(f"http://host{n}.test/")
    bulkheads = transport._core._bulkheads  # no public view of these maps
    assert sum(len(per_host) for per_host in bulkheads.values()) == 2


def test_a_build_step_closed_twice_leaves_no_step_behind() -> None:
    step = build_step("pipeline-42/step-3")
    with step:
        assert BUILD_STEP.get() == "pipeline-42/step-3"
    step.__exit__(None, None, None)  # an ExitStack and a finally both closing it
    assert BUILD_STEP.get() is None
