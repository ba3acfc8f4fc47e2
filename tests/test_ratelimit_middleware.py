"""RateLimitMiddleware through httpx.ASGITransport: 429s, headers, keys, failures, wiring."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.ratelimit import RateLimitAdmitted, RateLimited, RateLimitStorageFailed
from seawall.storage import BoundedMemoryStorage

calls: list[str] = []


async def home(request: Request) -> PlainTextResponse:
    calls.append(request.url.path)
    return PlainTextResponse("ok")


def make_app(policy: RateLimitPolicy, **kwargs: Any) -> Starlette:
    routes = [
        Route("/", home, methods=["GET", "HEAD"]),
        Route("/healthz", home),
        Route("/internal/x", home),
        Route("/v2/{name:path}/blobs/{digest}", home),
        Route("/v2/{name:path}/manifests/{ref}", home),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(RateLimitMiddleware, policy=policy, **kwargs)]
    )


def client(app: Any, peer: str = "192.0.2.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


async def test_thousand_concurrent_requests_admit_exactly_the_limit() -> None:
    app = make_app(RateLimitPolicy(limit="100/minute"), events=EventBus())
    async with client(app) as c:
        responses = await asyncio.gather(*(c.get("/") for _ in range(1000)))
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 100
    assert statuses.count(429) == 900


async def test_429_carries_retry_after_ratelimit_fields_and_problem_json(
    clock: ManualClock,
) -> None:
    app = make_app(RateLimitPolicy(limit="2/minute"), clock=clock, events=EventBus())
    async with client(app) as c:
        first = await c.get("/")
        clock.advance(10.5)
        second = await c.get("/")
        limited = await c.get("/")
    assert first.headers["ratelimit-policy"] == '"default";q=2;w=60'
    assert first.headers["ratelimit"] == '"default";r=1;t=60'
    assert second.headers["ratelimit"] == '"default";r=0;t=50'  # 49.5 s rounds up
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "50"
    assert limited.headers["ratelimit"] == '"default";r=0;t=50'
    assert limited.headers["ratelimit-policy"] == '"default";q=2;w=60'
    assert limited.headers["content-type"] == "application/problem+json"
    assert limited.headers["x-seawall-refused"] == "rate-limit"  # the app never ran
    assert "x-seawall-refused" not in first.headers
    body = limited.json()
    assert body["status"] == 429
    assert body["retry_after"] == 50
    assert body["title"] == "Too Many Requests"


async def test_head_429_has_no_body_and_headers_can_be_off(clock: ManualClock) -> None:
    app = make_app(RateLimitPolicy(limit="1/minute", emit_headers=False), clock=clock)
    async with client(app) as c:
        ok = await c.head("/")
        limited = await c.head("/")
    assert "ratelimit" not in ok.headers
    assert limited.status_code == 429
    assert limited.content == b""
    assert "retry-after" in limited.headers


@settings(max_examples=40, deadline=None)
@given(
    steps=st.lists(st.floats(min_value=0, max_value=70, allow_nan=False), min_size=1, max_size=8),
    limit=st.integers(min_value=1, max_value=3),
)
def test_retry_after_is_never_zero_or_negative(steps: list[float], limit: int) -> None:
    clock = ManualClock()
    app = make_app(RateLimitPolicy(limit=f"{limit}/minute"), clock=clock, events=EventBus())

    async def run() -> None:
        async with client(app) as c:
            for step in steps:
                clock.advance(step)
                for _ in range(limit + 1):
                    r = await c.get("/")
                    assert r.status_code in (200, 429)
                    t = int(r.headers["ratelimit"].rsplit("t=", 1)[1])
                    assert t >= 0
                    if r.status_code == 429:
                        assert int(r.headers["retry-after"]) >= 1
                        assert t >= 1

    asyncio.run(run())


@pytest.mark.parametrize(
    "strategy", ["moving-window", "fixed-window", "sliding-window-counter", "token-bucket"]
)
async def test_per_tenant_isolation_and_a_global_cap(strategy: str, clock: ManualClock) -> None:
    policy = RateLimitPolicy(
        limit="3/hour",
        key="header:x-tenant",
        header_keys_verified=True,  # both tenants come through one peer
        strategy=strategy,  # type: ignore[arg-type]
        rules=(LimitRule("5/minute", key="global", name="global"),),
    )
    app = make_app(policy, clock=clock, events=EventBus())
    async with client(app) as c:
        a = [(await c.get("/", headers={"x-tenant": "a"})).status_code for _ in range(4)]
        b = [(await c.get("/", headers={"x-tenant": "b"})).status_code for _ in range(3)]
        # A refused request consumes nothing (test every rate, then hit them all): a's
        # refused 4th left two of the global 5 for b, and b's 3rd, refused by the global
        # cap, left b one of its own 3, which it gets once the global minute is over.
        clock.advance(61)
        later = [(await c.get("/", headers={"x-tenant": "b"})).status_code for _ in range(2)]
    assert a == [200, 200, 200, 429]
    assert b == [200, 200, 429]  # b has its own 3, but the global 5 is used up
    assert later == [200, 429]  # b's own third, then b's own rate refuses


async def test_tenant_exhaustion_does_not_touch_other_tenants() -> None:
    policy = RateLimitPolicy(limit="2/minute", key="header:x-tenant", header_keys_verified=True)
    app = make_app(policy, events=EventBus())
    async with client(app) as c:
        for _ in range(5):
            await c.get("/", headers={"x-tenant": "noisy"})
        quiet = await c.get("/", headers={"x-tenant": "quiet"})
        anonymous = await c.get("/")
    assert quiet.status_code == 200
    assert quiet.headers["ratelimit"].startswith('"default";r=1')
    assert anonymous.status_code == 200  # falls back to the client address, own namespace


async def test_spoofed_forwarded_for_changes_nothing_by_default() -> None:
    app = make_app(RateLimitPolicy(limit="2/minute"), events=EventBus())
    async with client(app) as c:
        codes = [
            (await c.get("/", headers={"x-forwarded-for": f"10.0.0.{i}"})).status_code
            for i in range(4)
        ]
    assert codes == [200, 200, 429, 429]


async def test_trusted_hop_keys_by_forwarded_address() -> None:
    policy = RateLimitPolicy(limit="1/minute", trusted_proxies={"10.9.9.9"}, trusted_proxy_hops=1)
    app = make_app(policy, events=EventBus())
    async with client(app, peer="10.9.9.9") as c:  # the proxy
        one = await c.get("/", headers={"x-forwarded-for": "6.6.6.6, 203.0.113.1"})
        two = await c.get("/", headers={"x-forwarded-for": "7.7.7.7, 203.0.113.2"})
        again = await c.get("/", headers={"x-forwarded-for": "8.8.8.8, 203.0.113.1"})
        bad = await c.get("/", headers={"x-forwarded-for": "x" * 20_000})
        empty = await c.get("/", headers={"x-forwarded-for": ""})
    assert (one.status_code, two.status_code, again.status_code) == (200, 200, 429)
    assert bad.status_code == 200  # falls back to the proxy's own address
    assert empty.status_code == 429  # ... which bad just used


async def test_route_costs_and_exempt_paths() -> None:
    policy = RateLimitPolicy(
        limit="10/minute",
        costs={"/v2/*/blobs/*": 4},
        exempt_paths=frozenset({"/healthz", "/internal/*"}),
    )
    app = make_app(policy, events=EventBus())
    async with client(app) as c:
        blob1 = await c.get("/v2/lib/alpine/blobs/sha256:1")
        blob2 = await c.get("/v2/lib/alpine/blobs/sha256:2")
        blob3 = await c.get("/v2/lib/alpine/blobs/sha256:3")  # 8 used, 4 more do not fit
        manifest = await c.get("/v2/lib/alpine/manifests/latest")
        health = [(await c.get("/healthz")).status_code for _ in range(20)]
        internal = await c.get("/internal/x")
    assert blob2.headers["ratelimit"].startswith('"default";r=2;')
    assert (blob1.status_code, blob3.status_code, manifest.status_code) == (200, 429, 200)
    assert set(health) == {200}
    assert "ratelimit" not in internal.headers


async def test_events_for_every_decision(clock: ManualClock) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    app = make_app(RateLimitPolicy(limit="1/minute"), clock=clock, events=bus)
    async with client(app) as c:
        await c.get("/")
        await c.get("/")
    admitted, limited = seen
    assert isinstance(admitted, RateLimitAdmitted)
    assert admitted.remaining == 0
    assert isinstance(limited, RateLimited)
    assert limited.rule == "default"
    assert limited.key == "ip:192.0.2.1"
    assert limited.retry_after == pytest.approx(60)
    assert limited.name == "ratelimit.limited"


class BrokenStorage(BoundedMemoryStorage):
    def acquire_moving(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("storage is down")


@pytest.mark.parametrize(("mode", "status"), [("open", 200), ("closed", 503)])
async def test_storage_failure_never_becomes_a_500(
    mode: str, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    calls.clear()
    policy = RateLimitPolicy.from_dict({"on_storage_error": mode, "closed_retry_after": 2.5})
    app = make_app(policy, events=bus, storage=BrokenStorage())
    async with client(app) as c:
        responses = [await c.get("/") for _ in range(3)]
    assert {r.status_code for r in responses} == {status}
    warnings = [r for r in caplog.records if "rate-limit storage" in r.getMessage()]
    assert len(warnings) == 1  # once per log_interval, not once per request
    assert all(isinstance(e, RateLimitStorageFailed) for e in seen)
    assert len(seen) == 3
    if mode == "closed":
        assert responses[0].headers["retry-after"] == "3"
        assert calls == []  # the app never ran
    else:
        assert calls == ["/", "/", "/"]


async def test_non_http_scopes_pass_straight_through() -> None:
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    mw = RateLimitMiddleware(inner, RateLimitPolicy(limit="1/hour"), events=EventBus())

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing should be sent by the middleware")

    for kind in ("lifespan", "websocket", "websocket", "lifespan"):
        await mw({"type": kind, "path": "/", "client": ("1.1.1.1", 1)}, receive, send)
    assert seen == ["lifespan", "websocket", "websocket", "lifespan"]


async def test_admitted_stream_is_passed_through_message_by_message() -> None:
    sent: list[Message] = []
    chunks = [b"a" * 10, b"b" * 10, b""]

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"application/octet-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < 2})
            assert len(sent) == i + 2  # forwarded immediately, not buffered
        assert headers == [(b"content-type", b"application/octet-stream")]  # not mutated

    mw = RateLimitMiddleware(inner, RateLimitPolicy(limit="5/second"), events=EventBus())

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await mw(
        {"type": "http", "method": "GET", "path": "/", "headers": [], "client": ("1.1.1.1", 1)},
        receive,
        send,
    )
    names = [k for k, _ in sent[0]["headers"]]
    assert names == [b"content-type", b"ratelimit-policy", b"ratelimit"]
    assert [m.get("body") for m in sent[1:]] == chunks


async def test_fastapi_add_middleware_and_custom_key_func() -> None:
    app = FastAPI()

    @app.get("/items")
    async def items() -> dict[str, int]:
        return {"n": 1}

    app.add_middleware(
        RateLimitMiddleware,
        policy=RateLimitPolicy(limit="2/minute"),
        key_func=lambda scope: dict(scope["headers"]).get(b"authorization", b"").decode() or None,
        events=EventBus(),
    )
    async with client(app) as c:
        tok = [
            (await c.get("/items", headers={"authorization": "t1"})).status_code for _ in range(3)
        ]
        other = await c.get("/items", headers={"authorization": "t2"})
    assert tok == [200, 200, 429]
    assert other.status_code == 200


async def test_default_policy_and_plain_starlette_add_middleware() -> None:
    async def endpoint(_request: Request) -> Response:
        return Response(b"x")

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(RateLimitMiddleware)
    async with client(app) as c:
        r = await c.get("/")
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"default";q=1000;w=60'


async def test_several_rates_in_one_limit_are_all_advertised(clock: ManualClock) -> None:
    app = make_app(RateLimitPolicy(limit="2/second;3/minute"), clock=clock, events=EventBus())
    async with client(app) as c:
        codes = []
        for _ in range(3):
            codes.append((await c.get("/")).status_code)
            clock.advance(1)
        last = await c.get("/")
    assert codes == [200, 200, 200]
    assert last.status_code == 429
    assert last.headers["ratelimit-policy"] == '"default-1s";q=2;w=1, "default-60s";q=3;w=60'
    assert last.headers["ratelimit"].startswith('"default-60s";r=0;t=')


@settings(max_examples=60, deadline=None)
@given(
    headers=st.lists(
        st.tuples(
            st.sampled_from([b"x-forwarded-for", b"forwarded", b"x-tenant", b"host"]),
            st.binary(max_size=200),
        ),
        max_size=4,
    ),
    client_tuple=st.one_of(
        st.none(),
        st.tuples(st.text(max_size=60), st.integers()),
        st.tuples(st.ip_addresses().map(str), st.integers(0, 65535)),
    ),
    hops=st.integers(0, 2),
    path=st.text(max_size=30).map(lambda p: "/" + p),
)
def test_hostile_requests_never_raise_or_5xx(
    headers: list[tuple[bytes, bytes]], client_tuple: Any, hops: int, path: str
) -> None:
    statuses: list[int] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    policy = RateLimitPolicy(
        limit="1/minute",
        key="header:x-tenant",
        trusted_proxies={"*"} if hops else frozenset(),
        trusted_proxy_hops=hops,
        rules=(LimitRule("2/minute", key="client", name="ip"),),
    )
    mw = RateLimitMiddleware(inner, policy, events=EventBus())
    scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": headers,
        "client": client_tuple,
    }

    async def twice() -> None:
        await mw(dict(scope), receive, send)
        await mw(dict(scope), receive, send)

    asyncio.run(twice())
    assert len(statuses) == 2
    assert all(s in (200, 429) for s in statuses)
    if path not in policy.exempt_paths:
        assert statuses[1] == 429  # the same input got the same key: its one request is used


async def test_random_header_values_no_longer_buy_fresh_quotas() -> None:
    """Issue 13: key="header:x-api-key" with a random value per request admitted 50 of 50
    at 5/minute. An unverified header key now also applies per client address."""
    app = make_app(RateLimitPolicy(limit="5/minute", key="header:x-api-key"), events=EventBus())
    async with client(app) as c:
        codes = [(await c.get("/", headers={"x-api-key": f"k{i}"})).status_code for i in range(50)]
        other = await c.get("/", headers={"x-api-key": "k0"})  # another client, same key
    assert codes.count(200) == 5
    assert other.status_code == 429  # "k0" has 1 of 5 left, but this address none


async def test_verified_header_keys_stand_alone() -> None:
    """Behind a gateway that authenticates the header, tenants behind one address do not
    share a quota."""
    policy = RateLimitPolicy(limit="2/minute", key="header:x-tenant", header_keys_verified=True)
    app = make_app(policy, events=EventBus())
    async with client(app) as c:
        codes = [(await c.get("/", headers={"x-tenant": t})).status_code for t in "aabbcc"]
    assert codes == [200] * 6
