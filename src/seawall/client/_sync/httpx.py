# Generated from src/seawall/client/_async/httpx.py by scripts/generate_sync.py: do not edit.
"""The httpx transports, written once: ``_sync/httpx.py`` is generated from this file.

``ResilientTransport`` (and, generated, ``ResilientSyncTransport``) runs the whole client
pipeline around any inner httpx transport; ``FallbackCacheTransport`` (and
``FallbackCacheSyncTransport``) is the fallback cache alone, for a pipeline of your own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import httpx

from seawall.breaker import BreakerRegistry
from seawall.cache.fallback import FallbackCache
from seawall.client._sync.pipeline import SyncBody, SyncCacheLayer, SyncPipeline
from seawall.client._httpx import HttpxFaceBase
from seawall.client.core import ClientCore, CoreAccess
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.concurrency import SYNC_DEADLINES_CANCEL, sync_deadline
from seawall.events import EventBus
from seawall.policy.cache import CachePolicy
from seawall.policy.retry import ClientPolicy
from seawall.retry import RetryBudget

__all__ = ["SyncHttpxFace", "FallbackCacheSyncTransport", "ResilientSyncTransport"]


class SyncBodyStream(httpx.SyncByteStream):
    """Any pipeline body as the byte stream an ``httpx.Response`` needs."""

    __slots__ = ("_body",)

    def __init__(self, body: SyncBody) -> None:
        self._body = body

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._body:
            yield chunk

    def close(self) -> None:
        self._body.close()


class SyncHttpxFace(HttpxFaceBase):
    """httpx to the client pipeline: one send through ``inner``, bodies as byte streams."""

    __slots__ = ("clock", "inner")

    def __init__(self, inner: httpx.BaseTransport, clock: Clock) -> None:
        self.inner = inner
        self.clock = clock

    def send(self, request: httpx.Request, timeout: float | None) -> httpx.Response:
        if not SYNC_DEADLINES_CANCEL:  # (the sync copy) bound httpx's own timeouts instead
            self.cap_timeouts(request, timeout)
        try:
            with sync_deadline(self.clock, timeout):
                return self.inner.handle_request(request)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no response within the attempt timeout of {timeout}s", request=request
            ) from None

    def close(self, response: httpx.Response) -> None:
        response.close()

    def body(self, response: httpx.Response) -> SyncBody:
        stream = response.stream
        assert isinstance(stream, httpx.SyncByteStream)
        return stream

    def replace_body(self, response: httpx.Response, body: SyncBody) -> httpx.Response:
        response.stream = body if isinstance(body, httpx.SyncByteStream) else SyncBodyStream(body)
        return response

    def build(
        self,
        request: httpx.Request,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: SyncBody,
    ) -> httpx.Response:
        stream = SyncBodyStream(body)
        return httpx.Response(status, headers=list(headers), stream=stream, request=request)


class ResilientSyncTransport(CoreAccess, httpx.BaseTransport):
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
        inner: httpx.BaseTransport | None = None,
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
        self._inner = inner if inner is not None else httpx.HTTPTransport()
        self._pipeline = SyncPipeline(self._core, SyncHttpxFace(self._inner, clock), cache)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._pipeline.handle(request)

    def close(self) -> None:
        self._pipeline.close()
        self._inner.close()


class FallbackCacheSyncTransport(httpx.BaseTransport):
    """The fallback cache alone, in front of ``inner``: answers from a fresh, stale or
    verified copy when ``inner`` fails, and records what it returns (see docs/cache.md).
    A cache made here (``cache=None``) is closed with the transport."""

    __slots__ = ("_layer", "_owns_cache", "cache", "inner")

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        cache: FallbackCache | None = None,
        *,
        policy: CachePolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self._owns_cache = cache is None  # a shared cache is closed by whoever made it
        self.cache = cache or FallbackCache(policy=policy, clock=clock, events=events)
        self._layer = SyncCacheLayer(self.cache, SyncHttpxFace(self.inner, clock))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._layer.handle(request, self.inner.handle_request)

    def close(self) -> None:
        self._layer.close()
        self.inner.close()
        if self._owns_cache:
            self.cache.store.close()
