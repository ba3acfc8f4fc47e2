"""Parity across the client faces: one table of scripted situations, every face, the
same decisions and the same events.

The faces are async httpx, sync httpx, requests, and the decorator around an async and
a plain function (which raise for an error status, as SDKs do). Each situation is played
by a real server on 127.0.0.1, so every face goes through its real HTTP library. What is
compared: what the server saw (method, count), what the caller got (a status, or an
error kind), the cache label, and the decision events in order (random backoff waits
left out). This is the test that keeps the one client core honest.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests

from scripted import Answer, Scripted, closed_port, scripted_server
from seawall.breaker import BreakerRegistry, BreakerState, CircuitOpenError
from seawall.cache import FallbackCache
from seawall.client.call import Resilient, SyncResilient
from seawall.client.httpx import ResilientSyncTransport, ResilientTransport
from seawall.client.requests import ResilientAdapter
from seawall.clock import SYSTEM_CLOCK, Clock, ManualClock
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.cache import CachePolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import RetryBudget

SHED = {"x-seawall-refused": "shed", "retry-after": "1"}
GENEROUS = ClientPolicy(retry=RetryPolicy(budget_min_retries_per_second=100))
BLOB_PATH = "/v2/lib/app/blobs/sha256:" + "0" * 64
BIG = bytes(range(256)) * 1024  # 256 KiB
CLOSED = closed_port()  # one refused port for every face


@dataclass(frozen=True)
class Step:
    method: str = "GET"
    path: str = "/v2/lib/app/manifests/1.0"
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    port: int | None = None  # another port (a closed one: connection refused)
    later: float = 0.0  # seconds the driven clock moves on before this step


@dataclass(frozen=True)
class Situation:
    name: str
    answers: tuple[Answer, ...]
    steps: tuple[Step, ...] = (Step(),)
    policy: ClientPolicy = field(default_factory=lambda: GENEROUS)
    budget: Callable[[Clock], RetryBudget] | None = None
    cache: bool = False
    http_only: bool = False  # the decorator has no cache and no response headers
    real_time: bool = False  # a timeout: the sync libraries time out on the real clock


SITUATIONS = [
    Situation("success", (Answer(200, body=b"manifest"),)),
    Situation("shed 503 then ok", (Answer(503, SHED), Answer(200))),
    Situation("unmarked 503 then ok", (Answer(503), Answer(200))),
    Situation("429 with Retry-After", (Answer(429, {"retry-after": "2"}), Answer(200))),
    Situation("404 is final", (Answer(404),)),
    Situation(
        "connection refused",
        (Answer(200),),
        steps=(Step(port=-1),),
        policy=ClientPolicy(retry=RetryPolicy(attempts=3, budget_min_retries_per_second=100)),
    ),
    Situation(
        "attempt timeout",
        (Answer(200, delay=1.0), Answer(200)),
        policy=ClientPolicy(
            retry=RetryPolicy(attempts=2, backoff_base=0.01, budget_min_retries_per_second=100),
            attempt_timeout=0.3,
        ),
        real_time=True,
    ),
    Situation("POST 503 is final", (Answer(503), Answer(200)), steps=(Step("POST", body=b"x"),)),
    Situation(
        "POST refused is sent again",
        (Answer(503, SHED), Answer(200)),
        steps=(Step("POST", body=b"x"),),
    ),
    Situation(
        "POST with an idempotency key",
        (Answer(503), Answer(200)),
        steps=(Step("POST", body=b"x", headers={"idempotency-key": "k1"}),),
    ),
    Situation("streamed body", (Answer(200, body=BIG, chunks=16),), steps=(Step(path=BLOB_PATH),)),
    Situation(
        "breaker opens",
        (Answer(500),),
        steps=(Step(), Step(), Step(), Step()),
        policy=ClientPolicy(
            retry=RetryPolicy(budget_min_retries_per_second=100),
            breaker=BreakerPolicy(window="count", window_size=3, minimum_calls=3, open_duration=5),
        ),
    ),
    Situation(
        "budget spent",
        (Answer(503), Answer(200)),
        budget=lambda clock: RetryBudget(0.0, 0.0, clock=clock),
    ),
    Situation(
        "cache: stale when the upstream fails",
        (
            Answer(200, {"etag": '"v1"', "cache-control": "max-age=10"}, b"m1"),
            Answer(503),
        ),
        steps=(Step(), Step(later=60)),
        policy=ClientPolicy(retry=RetryPolicy(attempts=1)),
        cache=True,
        http_only=True,
    ),
    Situation(
        "cache: fresh hit asks nobody",
        (Answer(200, {"cache-control": "max-age=60"}, b"m1"), Answer(500)),
        steps=(Step(), Step()),
        cache=True,
        http_only=True,
    ),
]


@dataclass(frozen=True)
class Result:
    outcome: str  # "200", "503", "connect", "timeout", "open"
    body_len: int
    cache: str | None


def _answered(status: int, body: bytes, headers: Any = None) -> Result:
    cache = headers.get("x-seawall-cache") if headers is not None else None
    return Result(str(status), len(body), cache)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, CircuitOpenError):
        return "open"
    if isinstance(exc, httpx.TimeoutException | requests.Timeout):
        return "timeout"
    if isinstance(exc, httpx.ConnectError | requests.ConnectionError):
        return "connect"
    raise exc


def _reason(text: str) -> str:
    """Error names differ by library (ConnectError, ConnectionError): compare the kind."""
    if text.startswith("status") or not text:
        return text
    for kind in ("Timeout", "Connect"):
        if kind in text:
            return kind.lower()
    return text


def _event(e: Event) -> tuple[Any, ...]:
    fields: dict[str, Any] = {
        k: getattr(e, k) for k in getattr(e, "__dataclass_fields__", {}) if k != "at"
    }
    for dropped in ("wait", "failure_rate", "slow_rate", "open_for", "url", "age", "retry_in"):
        fields.pop(dropped, None)  # random jitter, or how a face spells a URL
    for k in ("reason",):
        if k in fields:
            fields[k] = _reason(str(fields[k]))
    return (e.name, tuple(sorted(fields.items())))


# --------------------------------------------------------------------------- the faces


class Face:
    name = ""

    def __init__(self, s: Situation, server: Scripted, clock: Clock, bus: EventBus) -> None:
        self.s = s
        self.server = server
        self.clock = clock
        self.bus = bus
        self.budget = s.budget(clock) if s.budget else None
        self.cache = (
            FallbackCache(policy=CachePolicy(default_fresh_seconds=0), clock=clock, events=bus)
            if s.cache
            else None
        )
        self.host = self.url(s.steps[0]).split("/")[2]  # the decorator's upstream name
        self.breakers: BreakerRegistry | None = None

    def before(self, step: Step) -> None:
        if step.later and isinstance(self.clock, ManualClock):
            self.clock.advance(step.later)

    def url(self, step: Step) -> str:
        if step.port == -1:
            return f"http://127.0.0.1:{CLOSED}{step.path}"
        return self.server.url + step.path

    def play(self) -> list[Result]:
        raise NotImplementedError


class AsyncHttpx(Face):
    name = "httpx async"

    def play(self) -> list[Result]:
        async def run() -> list[Result]:
            transport = ResilientTransport(
                None, self.s.policy, clock=self.clock, events=self.bus,
                budgets=self.budget, cache=self.cache,
            )  # fmt: skip
            self.breakers = transport.breakers
            out = []
            async with httpx.AsyncClient(transport=transport) as client:
                for step in self.s.steps:
                    self.before(step)
                    try:
                        async with client.stream(
                            step.method, self.url(step), content=step.body, headers=step.headers
                        ) as r:
                            body = b"".join([c async for c in r.aiter_raw()])
                            out.append(_answered(r.status_code, body, r.headers))
                    except Exception as exc:
                        out.append(Result(_error_kind(exc), 0, None))
            return out

        return asyncio.run(run())


class SyncHttpx(Face):
    name = "httpx sync"

    def play(self) -> list[Result]:
        transport = ResilientSyncTransport(
            None, self.s.policy, clock=self.clock, events=self.bus,
            budgets=self.budget, cache=self.cache,
        )  # fmt: skip
        self.breakers = transport.breakers
        out = []
        with httpx.Client(transport=transport) as client:
            for step in self.s.steps:
                self.before(step)
                try:
                    with client.stream(
                        step.method, self.url(step), content=step.body, headers=step.headers
                    ) as r:
                        body = b"".join(r.iter_raw())
                        out.append(_answered(r.status_code, body, r.headers))
                except Exception as exc:
                    out.append(Result(_error_kind(exc), 0, None))
        return out


class Requests(Face):
    name = "requests"

    def play(self) -> list[Result]:
        adapter = ResilientAdapter(
            self.s.policy, clock=self.clock, events=self.bus, budgets=self.budget, cache=self.cache
        )
        self.breakers = adapter.breakers
        out = []
        with requests.Session() as session:
            session.mount("http://", adapter)
            for step in self.s.steps:
                self.before(step)
                try:
                    r = session.request(
                        step.method, self.url(step), data=step.body, headers=step.headers,
                        stream=True,
                    )  # fmt: skip
                    body = b"".join(r.raw.stream(8192, decode_content=False))
                    r.close()
                    out.append(_answered(r.status_code, body, r.headers))
                except Exception as exc:
                    out.append(Result(_error_kind(exc), 0, None))
        return out


class AsyncCall(Face):
    name = "decorator async"

    def play(self) -> list[Result]:
        async def fetch(client: httpx.AsyncClient, step: Step) -> Result:
            r = await client.request(
                step.method, self.url(step), content=step.body, headers=step.headers
            )
            r.raise_for_status()  # an SDK raises for an error status
            return Result(str(r.status_code), len(r.content), None)

        async def run() -> list[Result]:
            guard = Resilient(
                fetch, self.host, self.s.policy, clock=self.clock, events=self.bus,
                budgets=self.budget, idempotent=False,
            )  # fmt: skip
            self.breakers = guard.breakers
            out = []
            async with httpx.AsyncClient() as client:
                for step in self.s.steps:
                    self.before(step)
                    guard.idempotent = _idempotent(step, self.s.policy)
                    guard._face.idempotent = guard.idempotent
                    try:
                        out.append(await guard(client, step))
                    except httpx.HTTPStatusError as exc:
                        out.append(_answered(exc.response.status_code, exc.response.content))
                    except Exception as exc:
                        out.append(Result(_error_kind(exc), 0, None))
            return out

        return asyncio.run(run())


class SyncCall(Face):
    name = "decorator sync"

    def play(self) -> list[Result]:
        def fetch(client: httpx.Client, step: Step) -> Result:
            timeout = self.s.policy.attempt_timeout
            r = client.request(
                step.method, self.url(step), content=step.body, headers=step.headers,
                timeout=timeout,  # a plain function bounds its own attempts
            )  # fmt: skip
            r.raise_for_status()
            return Result(str(r.status_code), len(r.content), None)

        guard = SyncResilient(
            fetch, self.host, self.s.policy, clock=self.clock, events=self.bus,
            budgets=self.budget,
        )  # fmt: skip
        self.breakers = guard.breakers
        out = []
        with httpx.Client() as client:
            for step in self.s.steps:
                self.before(step)
                guard._face.idempotent = _idempotent(step, self.s.policy)
                try:
                    out.append(guard(client, step))
                except httpx.HTTPStatusError as exc:
                    out.append(_answered(exc.response.status_code, exc.response.content))
                except Exception as exc:
                    out.append(Result(_error_kind(exc), 0, None))
        return out


def _idempotent(step: Step, policy: ClientPolicy) -> bool:
    """What an SDK author declares for this call (the HTTP faces read it from the request)."""
    r = policy.retry
    return step.method in r.retry_methods or r.idempotency_header.lower() in step.headers


FACES: list[type[Face]] = [AsyncHttpx, SyncHttpx, Requests, AsyncCall, SyncCall]


@dataclass
class Trace:
    results: list[Result]
    seen: list[tuple[str, str]]
    events: list[tuple[Any, ...]]
    slept: list[float]
    breaker: tuple[BreakerState, int, float] | None  # state, calls, failure rate after


def _trace(face_type: type[Face], s: Situation, server: Scripted) -> Trace:
    server.play(*s.answers)
    clock: Clock = SYSTEM_CLOCK if s.real_time else ManualClock()
    bus = EventBus()
    events: list[Event] = []
    bus.subscribe(events.append)
    face = face_type(s, server, clock, bus)
    results = face.play()
    breaker = None
    if face.breakers is not None and face.host in face.breakers:
        b = face.breakers.get(face.host)
        calls, failure_rate, _ = b.rates()
        breaker = (b.state, calls, round(failure_rate, 3))
    slept = [round(w, 3) for w in clock.slept] if isinstance(clock, ManualClock) else []
    waits_from_server = [w for w in slept if w >= 1.0]  # Retry-After waits (not jitter)
    return Trace(
        results,
        [(x.method, x.path) for x in server.seen],
        [_event(e) for e in events],
        waits_from_server,
        breaker,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[Scripted]:
    with scripted_server() as s:
        yield s


@pytest.mark.parametrize("situation", SITUATIONS, ids=[s.name for s in SITUATIONS])
def test_every_face_takes_the_same_decisions(situation: Situation, server: Scripted) -> None:
    faces = [f for f in FACES if not (situation.http_only and f in (AsyncCall, SyncCall))]
    traces = {f.name: _trace(f, situation, server) for f in faces}
    reference_name = faces[0].name
    reference = traces[reference_name]
    for name, trace in traces.items():
        assert trace.results == reference.results, f"{name} vs {reference_name}: answers"
        assert trace.seen == reference.seen, f"{name} vs {reference_name}: what the server saw"
        assert trace.events == reference.events, f"{name} vs {reference_name}: events"
        assert trace.slept == reference.slept, f"{name} vs {reference_name}: Retry-After waits"
        assert trace.breaker == reference.breaker, f"{name} vs {reference_name}: breaker"
    _check_expectations(situation, reference)


def _check_expectations(s: Situation, t: Trace) -> None:
    """The decisions themselves, once (the comparison above makes them every face's)."""
    names = [e[0] for e in t.events]
    outcomes = [r.outcome for r in t.results]
    expected: dict[str, Callable[[], bool]] = {
        "success": lambda: outcomes == ["200"] and len(t.seen) == 1,
        "shed 503 then ok": lambda: (
            outcomes == ["200"]
            and len(t.seen) == 2
            and t.breaker == (BreakerState.CLOSED, 1, 0.0)  # the shed answer is neutral
            and t.slept == [1.0]
        ),
        "unmarked 503 then ok": lambda: (
            outcomes == ["200"] and len(t.seen) == 2 and t.breaker == (BreakerState.CLOSED, 2, 0.5)
        ),
        "429 with Retry-After": lambda: outcomes == ["200"] and t.slept == [2.0],
        "404 is final": lambda: outcomes == ["404"] and len(t.seen) == 1,
        "connection refused": lambda: (
            outcomes == ["connect"] and names.count("client.attempt_started") == 3
        ),
        "attempt timeout": lambda: outcomes == ["200"] and len(t.seen) == 2,
        "POST 503 is final": lambda: outcomes == ["503"] and len(t.seen) == 1,
        "POST refused is sent again": lambda: (
            outcomes == ["200"] and [m for m, _ in t.seen] == ["POST", "POST"]
        ),
        "POST with an idempotency key": lambda: outcomes == ["200"] and len(t.seen) == 2,
        "streamed body": lambda: outcomes == ["200"] and t.results[0].body_len == len(BIG),
        "breaker opens": lambda: outcomes == ["500", "500", "500", "open"] and len(t.seen) == 3,
        "budget spent": lambda: (
            outcomes == ["503"] and len(t.seen) == 1 and "retry.budget_exhausted" in names
        ),
        "cache: stale when the upstream fails": lambda: (
            outcomes == ["200", "200"] and t.results[1].cache == "stale" and len(t.seen) == 2
        ),
        "cache: fresh hit asks nobody": lambda: (
            outcomes == ["200", "200"] and t.results[1].cache == "hit" and len(t.seen) == 1
        ),
    }
    assert expected[s.name](), f"{s.name}: {outcomes} {t.seen} {names} {t.slept}"


def test_every_http_face_sends_the_build_step(server: Scripted) -> None:
    """Issue 11: inside ``build_step()`` every HTTP face marks its requests with one
    ``x-seawall-step`` (the server face finishes started steps first); outside, none."""
    from seawall import build_step

    server.play(Answer(200))
    with httpx.Client(transport=ResilientSyncTransport()) as client:
        client.get(server.url + "/outside")
        with build_step("pipeline-7/step-2"):
            client.get(server.url + "/a")
    with requests.Session() as session:
        session.mount("http://", ResilientAdapter())
        with build_step() as step:
            session.get(server.url + "/b")

    async def run() -> None:
        async with httpx.AsyncClient(transport=ResilientTransport()) as c, build_step("s3"):
            await c.get(server.url + "/c", headers={"x-seawall-step": "own"})  # kept
            await asyncio.gather(c.get(server.url + "/d"))  # a task inherits the step

    asyncio.run(run())
    steps = {x.path: x.headers.get("x-seawall-step") for x in server.seen}
    expected = {"/outside": None, "/a": "pipeline-7/step-2", "/b": step, "/c": "own", "/d": "s3"}
    assert steps == expected
