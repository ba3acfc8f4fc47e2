"""The call wrapper: any async callable (a registry SDK method) in the same pipeline."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from seawall.breaker import BreakerRegistry, CircuitOpenError
from seawall.client.call import Resilient, resilient
from seawall.client.httpx import CircuitOpenTransportError, ResilientTransport
from seawall.clock import ManualClock
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy

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
