"""The app the multi-process tests serve with uvicorn (``--app-dir tests distributed_app:app``).

Configured by environment: ``SEAWALL_TEST_STORAGE`` (the Redis URL), ``SEAWALL_TEST_NAME``
(a unique policy name, so parallel runs never share counters), ``SEAWALL_TEST_LIMIT``.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.policy.ratelimit import RateLimitPolicy


async def home(_request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


policy = RateLimitPolicy(
    limit=os.environ.get("SEAWALL_TEST_LIMIT", "100/minute"),
    storage=os.environ.get("SEAWALL_TEST_STORAGE", "redis://127.0.0.1:6379/0"),
    name=os.environ.get("SEAWALL_TEST_NAME", "distributed"),
    strategy=os.environ.get("SEAWALL_TEST_STRATEGY", "moving-window"),  # type: ignore[arg-type]
    key="global",
    on_storage_error="closed",  # a storage error shows as 503 instead of hiding as a 200
    storage_timeout=2.0,  # four servers and their client on a shared 2-core machine
)
app = Starlette(routes=[Route("/", home), Route("/healthz", home)])
app.add_middleware(RateLimitMiddleware, policy=policy)
