"""A protected pull-through proxy for a PyPI simple index: seawall on both sides of it.

    python examples/pull_through_proxy.py --upstream https://pypi.org --port 8080
    pip install --index-url http://127.0.0.1:8080/simple/ requests

In front (server face): rate limiting per client and load shedding, so a CI fleet that
surges gets 429/503 with Retry-After instead of a collapsing proxy. Behind (client face):
budgeted retries, a breaker on the upstream, and a fallback cache on disk, so what the
proxy served once (index pages and files) is served again when the upstream index is
down. Bodies stream through; nothing is read whole.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator, Sequence

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from seawall import (
    DiskStore,
    FallbackCache,
    LoadShedMiddleware,
    RateLimitMiddleware,
    RateLimitPolicy,
    ResilientTransport,
)

# What the proxy passes on, either way (hop-by-hop and length headers are the server's).
_FORWARD = ("accept", "accept-encoding", "user-agent", "if-none-match", "if-modified-since")
_BACK = ("content-type", "content-encoding", "etag", "last-modified", "cache-control", "age",
         "x-seawall-cache")  # fmt: skip


def create_app(upstream: str, cache_dir: str, *, limit: str = "600/minute") -> Starlette:
    """The proxy as an ASGI app (the test runs it under uvicorn)."""
    cache = FallbackCache(DiskStore(cache_dir))
    client = httpx.AsyncClient(
        base_url=upstream.rstrip("/"),
        transport=ResilientTransport(cache=cache),
        timeout=httpx.Timeout(10.0),
        follow_redirects=True,
    )

    async def proxy(request: Request) -> Response:
        path = request.url.path
        if not path.startswith(("/simple/", "/packages/")):
            return PlainTextResponse("not found", status_code=404)
        headers = {k: v for k, v in request.headers.items() if k in _FORWARD}
        try:
            upstream_request = client.build_request("GET", path, headers=headers)
            answer = await client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:  # the upstream is down and nothing is cached
            return PlainTextResponse(f"upstream unavailable: {exc}", status_code=502)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in answer.aiter_raw():
                yield chunk

        kept = {k: v for k, v in answer.headers.items() if k in _BACK}
        done = BackgroundTask(answer.aclose)
        return StreamingResponse(body(), answer.status_code, headers=kept, background=done)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = Starlette(
        routes=[Route("/healthz", healthz), Route("/{path:path}", proxy)], lifespan=lifespan
    )
    app.add_middleware(LoadShedMiddleware)  # inner: sheds what the proxy cannot do
    app.add_middleware(RateLimitMiddleware, policy=RateLimitPolicy(limit=limit))  # outer
    return app


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", default="https://pypi.org", help="the index to proxy")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--cache", default="~/.cache/seawall-proxy", help="cache directory")
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.upstream, args.cache), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
