"""The httpx transports, written once: ``_sync/httpx.py`` is generated from this file.

``ResilientTransport`` (and, generated, ``ResilientSyncTransport``) runs the whole client
pipeline around any inner httpx transport; ``FallbackCacheTransport`` (and
``FallbackCacheSyncTransport``) is the fallback cache alone, for a pipeline of your own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from seawall.breaker import BreakerRegistry
from seawall.cache.fallback import FallbackCache
from seawall.client._async.pipeline import AsyncBody, AsyncCacheLayer, AsyncPipeline
from seawall.client._httpx import HttpxFaceBase
from seawall.client.core import ClientCore, CoreAccess
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.concurrency import ASYNC_DEADLINES_CANCEL, async_deadline
from seawall.events import EventBus
from seawall.policy.cache import CachePolicy
from seawall.policy.retry import ClientPolicy
from seawall.retry import RetryBudget

__all__ = ["AsyncHttpxFace", "FallbackCacheTransport", "ResilientTransport"]


class AsyncBodyStream(httpx.AsyncByteStream):
    """Any pipeline body as the byte stream an ``httpx.Response`` needs."""

    __slots__ = ("_body",)

    def __init__(self, body: AsyncBody) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._body:
            yield chunk

    async def aclose(self) -> None:
        await self._body.aclose()


class AsyncHttpxFace(HttpxFaceBase):
    """httpx to the client pipeline: one send through ``inner``, bodies as byte streams."""

    __slots__ = ("clock", "inner")

    def __init__(self, inner: httpx.AsyncBaseTransport, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock

    async def send(self, request: httpx.Request, timeout: float | None) -> httpx.Response:
        if not ASYNC_DEADLINES_CANCEL:  # (the sync copy) bound httpx's own timeouts instead
            self.cap_timeouts(request, timeout)
        try:
            async with async_deadline(self.clock, timeout):
                return await self.inner.handle_async_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no response within the attempt timeout of {timeout}s", request=request
            ) from None

    async def close(self, response: httpx.Response) -> None:
        await response.aclose()

    def body(self, response: httpx.Response) -> AsyncBody:
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return stream

    def replace_body(self, response: httpx.Response, body: AsyncBody) -> httpx.Response:
        response.stream = body if isinstance(body, httpx.AsyncByteStream) else AsyncBodyStream(body)
        return response

    def build(
        self,
        request: httpx.Request,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: AsyncBody,
    ) -> httpx.Response:
        stream = AsyncBodyStream(body)
        return httpx.Response(status, headers=list(headers), stream=stream, request=request)


class ResilientTransport(CoreAccess, httpx.AsyncBaseTransport):
    """Budgeted retries, a per-host breaker, limits, coalescing and an optional fallback
    cache around ``inner`` (httpx's own transport when None).

    The pipeline, outermost first: fallback cache (``cache=``) -> coalescing of identical
    immutable GETs -> retry (deadline, budget) -> circuit breaker -> rate limit / bulkhead
    -> per-attempt timeout -> inner transport. A successful body is never read here; a
    body discarded for a retry is closed.
    """

    __slots__ = ("_core", "_inner", "_pipeline")

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        breakers: BreakerRegistry | None = None,
        budgets: RetryBudget | None = None,
        cache: FallbackCache | None = None,
    ) -> None:
        self._core = ClientCore(
            policy, clock=clock, events=events, breakers=breakers, budgets=budgets
        )
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._pipeline = AsyncPipeline(self._core, AsyncHttpxFace(self._inner, clock), cache)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pipeline.handle(request)

    async def aclose(self) -> None:
        await self._pipeline.aclose()
        await self._inner.aclose()


class FallbackCacheTransport(httpx.AsyncBaseTransport):
    """The fallback cache alone, in front of ``inner``: answers from a fresh, stale or
    verified copy when ``inner`` fails, and records what it returns (see docs/cache.md).
    A cache made here (``cache=None``) is closed with the transport."""

    __slots__ = ("_layer", "_owns_cache", "cache", "inner")

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        cache: FallbackCache | None = None,
        *,
        policy: CachePolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._owns_cache = cache is None  # a shared cache is closed by whoever made it
        self.cache = cache or FallbackCache(policy=policy, clock=clock, events=events)
        self._layer = AsyncCacheLayer(self.cache, AsyncHttpxFace(self.inner, clock))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._layer.handle(request, self.inner.handle_async_request)

    async def aclose(self) -> None:
        await self._layer.aclose()
        await self.inner.aclose()
        if self._owns_cache:
            self.cache.store.close()
