"""Retry budget, full-jitter backoff, Retry-After parsing and the retry policy."""

from __future__ import annotations

import email.utils
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seawall.clock import ManualClock
from seawall.errors import PolicyError
from seawall.events import Event, EventBus
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import (
    FINAL,
    MAX_RETRY_AFTER,
    Retries,
    RetriesExhausted,
    RetryAfterHonoured,
    RetryBudget,
    RetryBudgetExhausted,
    RetryScheduled,
    Verdict,
    full_jitter_backoff,
    parse_retry_after,
)

WALL = 1_700_000_000.0

# ---------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("5", 5.0),
        ("  7 ", 7.0),
        (b"12", 12.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-3", 0.0),  # negative: clamped, not trusted
        ("99999999999", MAX_RETRY_AFTER),  # huge: clamped
        ("", None),
        ("soon", None),
        ("5 seconds", None),
        ("1e9", None),
        ("nan", None),
        ("inf", None),
        (None, None),
        ("9" * 5000, None),  # longer than any real value; no int-parsing blow-up
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),  # in the past
        ("Mon, 32 Foo 2023 99:99:99 GMT", None),
    ],
)
def test_parse_retry_after_forms(value: str | bytes | None, expected: float | None) -> None:
    assert parse_retry_after(value, WALL) == expected


def test_parse_retry_after_http_date_is_relative_to_the_wall_clock() -> None:
    date = email.utils.formatdate(WALL + 42, usegmt=True)
    assert parse_retry_after(date, WALL) == pytest.approx(42.0)
    # an obsolete date without a zone is read as GMT, independent of the machine's zone
    assert parse_retry_after(date.replace(" GMT", ""), WALL) == pytest.approx(42.0)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.integers().map(str), st.floats().map(str)))
def test_parse_retry_after_never_raises(value: str | bytes) -> None:
    got = parse_retry_after(value, WALL)
    assert got is None or 0.0 <= got <= MAX_RETRY_AFTER


_header_values = st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
    st.integers(min_value=-(10**6), max_value=10**12).map(str),
    st.floats(min_value=-1e6, max_value=1e6).map(lambda f: f"{f:.3f}"),
    st.integers(min_value=-(10**6), max_value=10**8).map(
        lambda d: email.utils.formatdate(WALL + d, usegmt=True)
    ),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_header_values, min_size=1, max_size=6), deadline=st.floats(0.5, 60))
def test_fuzzed_retry_after_never_crashes_nor_passes_the_deadline(
    values: list[str], deadline: float
) -> None:
    """Any Retry-After sequence: the call ends with the upstream's answer, within the deadline."""
    from seawall.client.httpx import ResilientSyncTransport

    clock = ManualClock(start=0.0, wall_start=WALL)
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        value = values[min(calls, len(values) - 1)]
        calls += 1
        return httpx.Response(503, headers={"Retry-After": value})

    policy = ClientPolicy(
        retry=RetryPolicy(attempts=10, deadline=deadline, budget_min_retries_per_second=100),
        breaker=None,
    )
    transport = ResilientSyncTransport(httpx.MockTransport(handler), policy, clock=clock)
    with httpx.Client(transport=transport) as client:
        response = client.get("http://registry.test/v2/")
    assert response.status_code == 503
    assert 1 <= calls <= 10
    assert clock.now() <= deadline  # never slept past the deadline
    assert all(s >= 0 for s in clock.slept)


# ---------------------------------------------------------------- backoff


def test_full_jitter_backoff_is_bounded_by_the_exponential_ceiling() -> None:
    assert full_jitter_backoff(1, 0.5, 10, lambda: 1.0) == 0.5
    assert full_jitter_backoff(3, 0.5, 10, lambda: 1.0) == 2.0
    assert full_jitter_backoff(10, 0.5, 10, lambda: 1.0) == 10.0  # capped
    assert full_jitter_backoff(10_000, 0.5, 10, lambda: 1.0) == 10.0  # no overflow
    assert full_jitter_backoff(3, 0.5, 10, lambda: 0.0) == 0.0  # full jitter reaches 0


@given(st.integers(1, 200), st.floats(0.01, 5), st.floats(5, 100), st.floats(0, 1))
def test_full_jitter_backoff_range(n: int, base: float, cap: float, u: float) -> None:
    w = full_jitter_backoff(n, base, cap, lambda: u)
    assert 0.0 <= w <= min(cap, base * 2 ** min(n - 1, 62)) + 1e-9


# ---------------------------------------------------------------- budget


def test_budget_allows_ratio_of_first_attempts(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.0, window=10, clock=clock)
    for _ in range(100):
        budget.record_attempt("h")
    granted = sum(budget.try_spend("h") for _ in range(50))
    assert granted == 10
    assert budget.available("h") == 0


def test_budget_minimum_rate_lets_a_quiet_client_retry(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.5, window=10, clock=clock)
    budget.record_attempt("h")
    assert sum(budget.try_spend("h") for _ in range(20)) == 5  # 0.5/s x 10 s


@pytest.mark.parametrize(("firsts", "allowed"), [(100, 10), (20, 5), (50, 5), (60, 6)])
def test_budget_is_the_larger_of_ratio_and_minimum_never_their_sum(
    clock: ManualClock, firsts: int, allowed: int
) -> None:
    # ratio 0.1 and a floor of 0.5/s x 10 s = 5: a busy host gets 10% of its first
    # attempts (amplification stays 1.1), a quiet one its floor; a sum would give both more.
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.5, window=10, clock=clock)
    for _ in range(firsts):
        budget.record_attempt("h")
    assert budget.available("h") == allowed
    assert sum(budget.try_spend("h") for _ in range(3 * allowed)) == allowed
    assert budget.available("h") == 0


def test_a_spent_budget_keeps_refusing_until_its_window_moves_on(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0.0, window=10, clock=clock)
    for _ in range(4):
        budget.record_attempt("h")
    assert [budget.try_spend("h") for _ in range(3)] == [True, True, False]
    for _ in range(5):  # a refused retry takes nothing, and refusing does not wear out
        clock.advance(1)
        assert not budget.try_spend("h")
        assert budget.available("h") == 0
    clock.advance(5.01)  # the first attempts and the retries have left the window
    assert budget.available("h") == 0
    budget.record_attempt("h")
    budget.record_attempt("h")
    assert [budget.try_spend("h") for _ in range(2)] == [True, False]


def test_budget_window_slides(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.5, min_retries_per_second=0.0, window=10, clock=clock)
    for _ in range(10):
        budget.record_attempt("h")
    assert sum(budget.try_spend("h") for _ in range(10)) == 5
    clock.advance(5)
    assert not budget.try_spend("h")  # still inside the window
    clock.advance(5.01)
    assert not budget.try_spend("h")  # the first attempts left the window too
    for _ in range(4):
        budget.record_attempt("h")
    assert sum(budget.try_spend("h") for _ in range(10)) == 2


def test_budget_hosts_are_separate_and_bounded(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, clock=clock, max_hosts=3)
    budget.record_attempt("a")
    assert budget.try_spend("a")
    assert not budget.try_spend("b")
    for host in "cdefg":
        budget.record_attempt(host)
    assert len(budget) == 3


def test_budget_is_thread_safe(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.0, clock=clock)
    for _ in range(1000):
        budget.record_attempt("h")
    granted: list[int] = []

    def worker() -> None:
        granted.append(sum(budget.try_spend("h") for _ in range(200)))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 100


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.just(("first", 0.0)),
            st.just(("retry", 0.0)),
            st.floats(0.0, 4.0).map(lambda d: ("advance", d)),
        ),
        max_size=300,
    )
)
def test_budget_never_grants_more_than_its_allowance(ops: list[tuple[str, float]]) -> None:
    """Over any run: retries <= ratio x first attempts + the minimum per elapsed window."""
    clock = ManualClock(start=0.0)
    budget = RetryBudget(ratio=0.1, min_retries_per_second=0.2, window=10, clock=clock)
    firsts = retries = 0
    for op, dt in ops:
        if op == "first":
            budget.record_attempt("h")
            firsts += 1
        elif op == "retry":
            retries += budget.try_spend("h")
        else:
            clock.advance(dt)
    windows = int(clock.now() // 10) + 2
    assert retries <= 0.1 * firsts * 2 + 0.2 * 10 * windows  # each first counts in <= 2 windows


# ---------------------------------------------------------------- policy


def test_retry_policy_defaults_are_artifact_friendly() -> None:
    p = RetryPolicy()
    assert p.retry_methods == {"GET", "HEAD", "OPTIONS"}
    assert p.retry_statuses == {429, 502, 503, 504}
    assert p.budget_ratio == 0.1 and not p.retry_unsafe
    assert ClientPolicy().breaker is not None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": 0}, "attempts"),
        ({"deadline": 0}, "deadline"),
        ({"backoff_base": 2, "backoff_cap": 1}, "backoff_cap"),
        ({"retry_statuses": frozenset({200})}, "retry_statuses"),
        ({"retry_statuses": frozenset({999})}, "retry_statuses"),
        ({"idempotency_header": "Bad Header"}, "idempotency_header"),
        ({"budget_ratio": 1.5}, "budget_ratio"),
        ({"retry_methods": "GET"}, "retry_methods"),
    ],
)
def test_retry_policy_rejects_bad_values(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_client_policy_validates_and_round_trips() -> None:
    with pytest.raises(PolicyError, match="rate_limit"):
        ClientPolicy(rate_limit="ten per sec")
    with pytest.raises(PolicyError, match="max_concurrency"):
        ClientPolicy(max_concurrency=0)
    p = ClientPolicy.from_dict(
        {"retry": {"attempts": 2, "retry_methods": ["get", "put"]}, "rate_limit": "5/second"}
    )
    assert p.retry.attempts == 2 and p.retry.retry_methods == {"GET", "PUT"}
    assert ClientPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(PolicyError, match=r"retry\.atempts"):
        ClientPolicy.from_dict({"retry": {"atempts": 2}})


# ---------------------------------------------------------- tenacity's shortfalls, kept visible


def test_tenacity_stop_after_delay_ignores_an_injected_clock() -> None:
    """tenacity measures delay with time.monotonic, so a driven clock never stops it;
    seawall's StopAtDeadline reads the injected clock."""
    import tenacity

    from seawall.retry import FINAL, Retries, Verdict

    clock = ManualClock(start=0.0)
    attempts = 0

    def always_fails() -> None:
        nonlocal attempts
        attempts += 1
        raise ConnectionError("down")

    plain = tenacity.Retrying(
        sleep=clock.sleep_sync,
        stop=tenacity.stop_after_delay(5) | tenacity.stop_after_attempt(50),
        wait=tenacity.wait_fixed(1),
        reraise=True,
    )
    with pytest.raises(ConnectionError):
        plain(always_fails)
    assert attempts == 50 and clock.now() == 49.0  # ran 49 s of driven time past a 5 s limit

    attempts = 0
    clock = ManualClock(start=0.0)
    retries: Retries[None] = Retries(
        host="h",
        policy=RetryPolicy(attempts=50, deadline=5.0, backoff_base=1, backoff_cap=1),
        deadline_at=5.0,
        budget=None,
        judge_result=lambda _r: FINAL,
        judge_exception=lambda _e: Verdict(True, "down"),
        clock=clock,
        rng=lambda: 1.0,
    )
    with pytest.raises(ConnectionError):
        while True:  # the driver's loop: attempt, ask, sleep
            try:
                always_fails()
            except ConnectionError as exc:
                clock.sleep_sync(retries.after_exception(exc))
    assert clock.now() < 5.0 and attempts == 5


async def test_tenacity_can_retry_a_cancelled_error_ours_never_does() -> None:
    """A predicate like retry_if_not_exception_type(ValueError) matches CancelledError."""
    import asyncio

    import tenacity

    from seawall.retry import Retries, Verdict

    attempts = 0

    async def cancelled() -> None:
        nonlocal attempts
        attempts += 1
        raise asyncio.CancelledError

    clock = ManualClock()
    plain = tenacity.AsyncRetrying(
        sleep=clock.sleep,
        retry=tenacity.retry_if_not_exception_type(ValueError),
        stop=tenacity.stop_after_attempt(3),
        reraise=True,
    )
    with pytest.raises(asyncio.CancelledError):
        await plain(cancelled)
    assert attempts == 3  # tenacity retried a cancellation twice

    attempts = 0
    retries: Retries[None] = Retries(
        host="h",
        policy=RetryPolicy(attempts=3),
        deadline_at=clock.now() + 30,
        budget=None,
        judge_result=lambda _r: Verdict(True),
        judge_exception=lambda _e: Verdict(True, "anything"),  # even a face that says yes
        clock=clock,
    )
    with pytest.raises(asyncio.CancelledError):
        while True:
            try:
                await cancelled()
            except asyncio.CancelledError as exc:
                await clock.sleep(retries.after_exception(exc))
    assert attempts == 1


# ---------------------------------------------------------------- what a call tells


def _retries(
    clock: ManualClock,
    bus: EventBus,
    *,
    attempts: int = 3,
    budget: RetryBudget | None = None,
    deadline: float = 30.0,
) -> Retries[str]:
    return Retries(
        host="registry.test",
        policy=RetryPolicy(attempts=attempts, backoff_base=1.0, backoff_cap=8.0),
        deadline_at=clock.now() + deadline,
        budget=budget,
        judge_result=lambda r: Verdict(r != "ok", r, 4.0 if r == "shed" else None),
        judge_exception=lambda e: Verdict(True, "connect"),
        clock=clock,
        events=bus,
        rng=lambda: 0.5,
    )


def _recorded() -> tuple[EventBus, list[Event]]:
    bus, seen = EventBus(), []
    bus.subscribe(seen.append)
    return bus, seen


def test_each_retry_is_announced_with_its_time_attempt_wait_and_reason() -> None:
    clock = ManualClock(start=100.0)
    bus, seen = _recorded()
    retries = _retries(clock, bus)
    # shed with Retry-After 4: longer than the backoff (0.5 x 1 s), so honoured
    assert retries.after_result("shed") == 4.0
    clock.advance(4.0)
    wait = retries.after_result("timeout")  # second retry: 0.5 x 2 s of backoff
    assert wait == 1.0
    clock.advance(wait)
    assert retries.after_result("timeout") is None  # the third attempt was the last
    assert seen == [
        RetryAfterHonoured(at=100.0, host="registry.test", retry_after=4.0, wait=4.0),
        RetryScheduled(at=100.0, host="registry.test", attempt=1, wait=4.0, reason="shed"),
        RetryScheduled(at=104.0, host="registry.test", attempt=2, wait=1.0, reason="timeout"),
        RetriesExhausted(
            at=105.0, host="registry.test", attempts=3, why="attempts", reason="timeout"
        ),
    ]


def test_a_call_stopped_by_its_budget_says_so_at_the_attempt_it_stopped() -> None:
    clock = ManualClock(start=50.0)
    bus, seen = _recorded()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.1, window=10, clock=clock)
    retries = _retries(clock, bus, attempts=5, budget=budget)
    with pytest.raises(ConnectionError):
        clock.advance(retries.after_exception(ConnectionError("refused")))  # the one retry
        retries.after_exception(ConnectionError("refused"))
    assert seen[1:] == [
        RetryBudgetExhausted(at=50.5, host="registry.test", attempt=2, reason="connect"),
        RetriesExhausted(at=50.5, host="registry.test", attempts=2, why="budget", reason="connect"),
    ]
    assert budget.available("registry.test") == 0

    # Spent before the first retry: no retry machinery, the same story at attempt 1.
    seen.clear()
    again = _retries(clock, bus, attempts=5, budget=budget)
    assert again.after_result("shed") is None  # the upstream's answer stands
    assert seen == [
        RetryBudgetExhausted(at=50.5, host="registry.test", attempt=1, reason="shed"),
        RetriesExhausted(at=50.5, host="registry.test", attempts=1, why="budget", reason="shed"),
    ]


def test_a_retry_after_shorter_than_the_backoff_or_not_honoured_is_not_reported() -> None:
    clock = ManualClock(start=0.0)
    bus, seen = _recorded()
    retries: Retries[str] = Retries(
        host="registry.test",
        policy=RetryPolicy(attempts=3, backoff_base=4.0, backoff_cap=8.0),
        deadline_at=30.0,
        budget=None,
        judge_result=lambda r: Verdict(True, r, 1.0),  # Retry-After: 1
        judge_exception=lambda e: FINAL,
        clock=clock,
        events=bus,
        rng=lambda: 0.5,
    )
    assert retries.after_result("busy") == 2.0  # our own backoff is the longer wait
    ignoring: Retries[str] = Retries(
        host="registry.test",
        policy=RetryPolicy(attempts=3, backoff_base=1.0, honor_retry_after=False),
        deadline_at=30.0,
        budget=None,
        judge_result=lambda r: Verdict(True, r, 20.0),  # Retry-After: 20, ignored
        judge_exception=lambda e: FINAL,
        clock=clock,
        events=bus,
        rng=lambda: 0.5,
    )
    assert ignoring.after_result("busy") == 0.5
    assert [type(e) for e in seen] == [RetryScheduled, RetryScheduled]


def test_the_retry_predicate_composes_with_plain_tenacity() -> None:
    import tenacity

    from seawall.retry import retry_if_retryable

    clock = ManualClock()
    call = _retries(clock, EventBus())
    answers = iter(["shed", "timeout", "not found", "ok"])
    retrying = tenacity.Retrying(
        retry=retry_if_retryable(call) & tenacity.retry_if_result(lambda r: r != "timeout"),
        stop=tenacity.stop_after_attempt(5),
        sleep=clock.sleep_sync,
    )
    assert retrying(lambda: next(answers)) == "timeout"  # retried only "shed"
    assert call.last == Verdict(True, "timeout")


def test_a_single_attempt_policy_gives_up_at_once_and_says_why() -> None:
    clock = ManualClock(start=7.0)
    bus, seen = _recorded()
    assert _retries(clock, bus, attempts=1).after_result("timeout") is None
    assert seen == [
        RetriesExhausted(at=7.0, host="registry.test", attempts=1, why="attempts", reason="timeout")
    ]


def test_a_retry_that_could_not_start_before_the_deadline_is_not_taken() -> None:
    clock = ManualClock(start=0.0)
    bus, seen = _recorded()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=1.0, window=10, clock=clock)
    retries = _retries(clock, bus, attempts=10, budget=budget, deadline=5.0)
    assert retries.after_result("shed") == 4.0
    clock.advance(4.0)
    # the next wait (1 s of backoff) would start the retry at the deadline: none is sent
    assert retries.after_result("timeout") is None
    assert seen[-1] == RetriesExhausted(
        at=4.0, host="registry.test", attempts=2, why="deadline", reason="timeout"
    )
    # the deadline stop is asked before the budget: the refused retry spent nothing
    assert budget.available("registry.test") == 9


def test_a_zone_less_http_date_is_gmt_whatever_the_local_zone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        # asctime form (RFC 9110's obsolete third form): no zone, meant as GMT
        assert parse_retry_after("Tue Nov 14 22:13:40 2023", WALL) == 20.0
        assert parse_retry_after("Tue, 14 Nov 2023 23:13:40 +0100", WALL) == 20.0
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize(("padding", "expected"), [(62, 10.0), (63, None)])
def test_a_retry_after_longer_than_64_characters_is_ignored(
    padding: int, expected: float | None
) -> None:
    assert parse_retry_after("0" * padding + "10", WALL) == expected


def test_a_default_budget_is_a_tenth_of_first_attempts_or_five_per_ten_seconds(
    clock: ManualClock,
) -> None:
    quiet = RetryBudget(clock=clock)
    quiet.record_attempt("h")
    assert quiet.available("h") == 5.0  # 0.5 retries per second over 10 s
    busy = RetryBudget(clock=clock)
    for _ in range(200):
        busy.record_attempt("h")
    assert busy.available("h") == 20.0  # 10% of 200
    clock.advance(10.0)
    assert busy.available("h") == 5.0  # the window is 10 s


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ratio": -0.1},
        {"ratio": 1.01},
        {"min_retries_per_second": -1.0},
        {"window": 0.0},
        {"buckets": 0},
    ],
)
def test_a_budget_refuses_values_that_make_no_sense(kwargs: dict[str, float]) -> None:
    # the whole message, and nothing else: it is what a misconfigured caller reads
    with pytest.raises(
        ValueError, match=r"^ratio in \[0, 1\], min rate >= 0, window > 0, buckets >= 1$"
    ):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


def test_a_budget_takes_the_edges_of_its_ranges(clock: ManualClock) -> None:
    budget = RetryBudget(ratio=1.0, min_retries_per_second=0.0, window=0.5, buckets=1, clock=clock)
    budget.record_attempt("h")
    assert budget.try_spend("h") and not budget.try_spend("h")


def test_a_budget_from_a_policy_keeps_its_window_clock_and_host_bound(clock: ManualClock) -> None:
    policy = RetryPolicy(budget_ratio=0.5, budget_min_retries_per_second=0.0, budget_window=20.0)
    budget = RetryBudget.from_policy(policy, clock=clock, max_hosts=2)
    for _ in range(4):
        budget.record_attempt("a")
    clock.advance(15.0)  # still inside a 20 s window on the driven clock
    assert budget.available("a") == 2.0
    for host in "bcd":
        budget.record_attempt(host)
    assert len(budget) == 2


def test_a_budget_made_on_its_own_is_bounded_like_a_clients(clock: ManualClock) -> None:
    """A budget built directly (to share with budgets=) or from a retry policy tracks as
    many hosts as a client's own, ClientPolicy().max_hosts, the least recent forgotten."""
    bound = ClientPolicy().max_hosts
    for budget in (RetryBudget(clock=clock), RetryBudget.from_policy(RetryPolicy(), clock=clock)):
        for n in range(bound + 1):
            budget.record_attempt(f"host{n}.test")
        assert len(budget) == bound


def test_a_spent_budget_is_reported_even_when_the_deadline_also_refuses() -> None:
    """Operators count RetryBudgetExhausted to see the budget holding retries back: a first
    answer that finds the budget spent says so, even when its Retry-After would also have
    passed the deadline."""
    clock = ManualClock(start=50.0)
    bus, seen = _recorded()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, clock=clock)
    retries = _retries(clock, bus, attempts=5, budget=budget, deadline=2.0)
    assert retries.after_result("shed") is None  # Retry-After 4 s, 2 s left, budget spent
    assert seen == [
        RetryBudgetExhausted(at=50.0, host="registry.test", attempt=1, reason="shed"),
        RetriesExhausted(at=50.0, host="registry.test", attempts=1, why="budget", reason="shed"),
    ]


def test_an_empty_budget_or_one_attempt_decides_without_a_phantom_host() -> None:
    clock = ManualClock(start=7.0)
    bus, seen = _recorded()
    budget = RetryBudget(ratio=0.0, min_retries_per_second=0.0, clock=clock)
    one = _retries(clock, bus, attempts=1, budget=budget)
    assert one.after_result("timeout") is None
    assert seen[-1].why == "attempts"  # type: ignore[attr-defined]
    assert _retries(clock, bus, attempts=3, budget=budget).after_result("timeout") is None
    assert seen[-1].why == "budget"  # type: ignore[attr-defined]
    assert len(budget) == 1  # only the call's own host is tracked
