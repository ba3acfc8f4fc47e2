"""Client face of the fallback cache: httpx transports that go OUTERMOST.

``FallbackCacheTransport(ResilientTransport(...))``: the cache answers when everything
inside it gave up (retries exhausted, budget spent, breaker open, timeouts: any
``httpx.TransportError`` or :class:`~seawall.errors.SeawallError`) or the upstream answers
with a fallback status (429, 5xx). It also serves fresh entries and digest-verified blobs
without asking (``CachePolicy.serve_fresh``), revalidates due metadata with
``If-None-Match`` / ``If-Modified-Since`` (a 304 refreshes the entry and serves its
verified body), and records successful GETs while the caller reads them. Bodies served
from the cache stream in chunks, as the upstream's did.

The sync transport runs the (async) cache on a private event-loop thread that it owns
and stops in ``close()``: one implementation of the cache for both faces, and a sync
caller never touches an event loop. A ``FallbackCache`` given to a sync transport must
not be used from another event loop at the same time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx

from seawall.cache.fallback import FallbackCache, Hit, Recorder
from seawall.cache.freshness import State
from seawall.cache.keys import RequestInfo
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError, SeawallError
from seawall.events import EventBus
from seawall.policy.cache import CachePolicy

__all__ = ["FallbackCacheSyncTransport", "FallbackCacheTransport"]

T = TypeVar("T")
_CONDITIONALS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since")


def _is_failure(exc: BaseException) -> bool:
    """Upstream trouble the cache may cover for (never a caller's own mistake)."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, SeawallError) and not isinstance(exc, PolicyError)


def _info(request: httpx.Request) -> RequestInfo:
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in request.headers.raw]
    return RequestInfo(request.method, str(request.url), headers)


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in response.headers.raw]


def _conditional(request: httpx.Request, hit: Hit) -> httpx.Request | None:
    """A copy of ``request`` asking "changed since?", or None when it cannot ask."""
    if hit.immutable or any(h in request.headers for h in _CONDITIONALS):
        return None
    etag, modified = hit.header("etag"), hit.header("last-modified")
    if etag is None and modified is None:
        return None
    headers = request.headers.copy()
    if etag is not None:
        headers["if-none-match"] = etag
    if modified is not None:
        headers["if-modified-since"] = modified
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        stream=request.stream,
        extensions=request.extensions,
    )


class _Decision:
    """Sans-IO choices shared by both transports."""

    def __init__(self, cache: FallbackCache) -> None:
        self.cache = cache

    def serve_without_asking(self, hit: Hit | None, request: httpx.Request) -> bool:
        """Fresh and a plain GET/HEAD: a caller's own conditionals or Range go upstream
        (a full 200 still answers them if the upstream then fails)."""
        return (
            hit is not None
            and self.cache.policy.serve_fresh
            and hit.fresh
            and "range" not in request.headers
            and not any(h in request.headers for h in _CONDITIONALS)
        )

    def serve_then_revalidate(self, hit: Hit | None, request: httpx.Request) -> bool:
        return (
            "range" not in request.headers
            and hit is not None
            and self.cache.policy.serve_fresh
            and hit.state is State.STALE_REVALIDATE
        )

    def fall_back_on_status(self, hit: Hit | None, status: int) -> bool:
        return (
            hit is not None
            and hit.usable_on_error
            and status in self.cache.policy.fallback_statuses
        )


# -- async --------------------------------------------------------------------------------


class _CachedStream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes] | None) -> None:
        self._chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self._chunks is not None:
            async for chunk in self._chunks:
                yield chunk

    async def aclose(self) -> None:
        if self._chunks is not None and hasattr(self._chunks, "aclose"):
            await self._chunks.aclose()


class _TeeStream(httpx.AsyncByteStream):
    """The upstream body to the caller and, chunk by chunk, to the recorder."""

    def __init__(self, inner: httpx.AsyncByteStream, recorder: Recorder) -> None:
        self._inner = inner
        self._rec = recorder

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                await self._rec.feed(chunk)
                yield chunk
        except BaseException:
            await self._rec.abort()
            raise
        await self._rec.finish()

    async def aclose(self) -> None:
        await self._rec.abort()  # no-op once finished; an unread body is not kept
        await self._inner.aclose()


def _cached_response(
    cache: FallbackCache, hit: Hit, request: httpx.Request, reason: str
) -> httpx.Response:
    headers = cache.served(hit, reason=reason)
    body = None if request.method == "HEAD" else cache.body(hit)
    return httpx.Response(hit.status, headers=headers, stream=_CachedStream(body), request=request)


class FallbackCacheTransport(httpx.AsyncBaseTransport):
    """Serve from the cache when the wrapped transport fails; record what it returns."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport | None = None,
        cache: FallbackCache | None = None,
        *,
        policy: CachePolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.inner = inner or httpx.AsyncHTTPTransport()
        self._owns_cache = cache is None  # a shared cache is closed by whoever made it
        self.cache = cache or FallbackCache(policy=policy, clock=clock, events=events)
        self._decide = _Decision(self.cache)
        self._tasks: set[asyncio.Task[None]] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in ("GET", "HEAD"):
            return await self.inner.handle_async_request(request)
        cache = self.cache
        info = _info(request)
        hit = await cache.lookup(info)
        if self._decide.serve_without_asking(hit, request):
            assert hit is not None
            return _cached_response(cache, hit, request, "fresh")
        if self._decide.serve_then_revalidate(hit, request):
            assert hit is not None
            self._spawn(self._revalidate(request, info, hit))
            return _cached_response(cache, hit, request, "stale-while-revalidate")
        conditional = _conditional(request, hit) if hit is not None else None
        try:
            response = await self.inner.handle_async_request(conditional or request)
        except Exception as exc:
            if hit is not None and hit.usable_on_error and _is_failure(exc):
                return _cached_response(cache, hit, request, type(exc).__name__)
            raise
        return await self._after(request, info, hit, conditional is not None, response)

    async def _after(
        self,
        request: httpx.Request,
        info: RequestInfo,
        hit: Hit | None,
        asked_conditionally: bool,
        response: httpx.Response,
    ) -> httpx.Response:
        cache = self.cache
        status = response.status_code
        if status == 304 and asked_conditionally and hit is not None:
            await response.aclose()
            fresh = await cache.refresh(hit, _headers(response))
            return _cached_response(cache, fresh, request, "revalidated")
        if self._decide.fall_back_on_status(hit, status):
            assert hit is not None
            await response.aclose()
            return _cached_response(cache, hit, request, f"status {status}")
        if request.method == "GET":
            recorder = await cache.recorder(info, status, _headers(response))
            if recorder is not None:
                assert isinstance(response.stream, httpx.AsyncByteStream)
                response.stream = _TeeStream(response.stream, recorder)
        return response

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _revalidate(self, request: httpx.Request, info: RequestInfo, hit: Hit) -> None:
        """Background refresh for stale-while-revalidate; owned and cancelled by aclose()."""
        conditional = _conditional(request, hit)
        with contextlib.suppress(Exception):
            response = await self.inner.handle_async_request(conditional or request)
            try:
                out = await self._after(request, info, hit, conditional is not None, response)
                if out is response:
                    async for _ in response.stream:  # type: ignore[union-attr]
                        pass  # drain through the tee so the new version is recorded
            finally:
                await response.aclose()

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.inner.aclose()
        if self._owns_cache:
            await self.cache.store.aclose()


# -- sync ---------------------------------------------------------------------------------


class _Portal:
    """A private event loop on a thread of its own, to run the async cache from sync code."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="seawall-cache-loop", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def run(self, coro: Awaitable[T]) -> T:
        async def wrapper() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrapper(), self._ensure()).result()

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()


class _SyncCachedStream(httpx.SyncByteStream):
    def __init__(self, portal: _Portal, chunks: AsyncIterator[bytes] | None) -> None:
        self._portal = portal
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        if self._chunks is None:
            return
        it = self._chunks.__aiter__()
        while True:
            try:
                yield self._portal.run(it.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None and hasattr(chunks, "aclose"):
            self._portal.run(chunks.aclose())


class _SyncTeeStream(httpx.SyncByteStream):
    def __init__(self, portal: _Portal, inner: httpx.SyncByteStream, recorder: Recorder) -> None:
        self._portal = portal
        self._inner = inner
        self._rec = recorder

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._portal.run(self._rec.feed(chunk))
                yield chunk
        except BaseException:
            self._portal.run(self._rec.abort())
            raise
        self._portal.run(self._rec.finish())

    def close(self) -> None:
        self._portal.run(self._rec.abort())
        self._inner.close()


class FallbackCacheSyncTransport(httpx.BaseTransport):
    """The sync twin of :class:`FallbackCacheTransport` (same cache, same decisions).

    Stale-while-revalidate is treated as "revalidate now" here: a sync transport has no
    loop of the caller's to refresh in the background.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | None = None,
        cache: FallbackCache | None = None,
        *,
        policy: CachePolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.inner = inner or httpx.HTTPTransport()
        self._owns_cache = cache is None
        self.cache = cache or FallbackCache(policy=policy, clock=clock, events=events)
        self._decide = _Decision(self.cache)
        self._portal = _Portal()

    def _response(self, hit: Hit, request: httpx.Request, reason: str) -> httpx.Response:
        headers = self.cache.served(hit, reason=reason)
        body = None if request.method == "HEAD" else self.cache.body(hit)
        return httpx.Response(
            hit.status,
            headers=headers,
            stream=_SyncCachedStream(self._portal, body),
            request=request,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in ("GET", "HEAD"):
            return self.inner.handle_request(request)
        cache, run = self.cache, self._portal.run
        info = _info(request)
        hit = run(cache.lookup(info))
        if self._decide.serve_without_asking(hit, request):
            assert hit is not None
            return self._response(hit, request, "fresh")
        conditional = _conditional(request, hit) if hit is not None else None
        try:
            response = self.inner.handle_request(conditional or request)
        except Exception as exc:
            if hit is not None and hit.usable_on_error and _is_failure(exc):
                return self._response(hit, request, type(exc).__name__)
            raise
        status = response.status_code
        if status == 304 and conditional is not None and hit is not None:
            response.close()
            fresh = run(cache.refresh(hit, _headers(response)))
            return self._response(fresh, request, "revalidated")
        if self._decide.fall_back_on_status(hit, status):
            assert hit is not None
            response.close()
            return self._response(hit, request, f"status {status}")
        if request.method == "GET":
            recorder = run(cache.recorder(info, status, _headers(response)))
            if recorder is not None:
                assert isinstance(response.stream, httpx.SyncByteStream)
                response.stream = _SyncTeeStream(self._portal, response.stream, recorder)
        return response

    def close(self) -> None:
        self.inner.close()
        if self._owns_cache and self._portal.started:
            with contextlib.suppress(RuntimeError):
                self._portal.run(self.cache.store.aclose())
        self._portal.close()
