"""httpx transports that make a client a good citizen of an overloaded registry.

``httpx.AsyncClient(transport=ResilientTransport())`` wraps httpx's own transport;
``ResilientTransport(inner, policy=...)`` wraps any other. The pipeline, outermost first:
coalescing of identical immutable GETs -> retry (deadline, budget) -> circuit breaker ->
rate limit / bulkhead -> per-attempt timeout -> inner transport. The first attempt takes a
fast path; tenacity is entered only when it failed in a retryable way. Responses stay
streaming: a successful body is never read here; a body we discard for a retry is closed.

With ``cache=FallbackCache(...)`` the fallback cache goes outermost (DESIGN.md's order):
it answers from a verified or stale copy when everything inside has given up.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Generic, TypeVar

import httpx

from seawall.breaker import BreakerRegistry, CircuitOpenError, Outcome
from seawall.cache.fallback import FallbackCache
from seawall.client._pipeline import (
    Admission,
    ClientCore,
    CoreAccess,
    FaceHooks,
    RateLimitWaitTooLong,
    is_immutable_url,
)
from seawall.client.cache import FallbackCacheSyncTransport, FallbackCacheTransport
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import Event, EventBus
from seawall.policy.retry import ClientPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.retry import FINAL, RetryBudget, RetryCall, Verdict

__all__ = [
    "CircuitOpenTransportError",
    "RequestCoalesced",
    "ResilientSyncTransport",
    "ResilientTransport",
]

T = TypeVar("T", httpx.AsyncBaseTransport, httpx.BaseTransport)  # the wrapped transport

# Errors after which the same idempotent request may well succeed on another attempt.
# PoolTimeout is local (our own pool or bulkhead is full): retrying adds load, not luck.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
_LOCAL_ERRORS: tuple[type[BaseException], ...] = (httpx.PoolTimeout, RateLimitWaitTooLong)


class CircuitOpenTransportError(httpx.TransportError, CircuitOpenError):
    """The host's breaker is open: an ``httpx.TransportError`` (what httpx users catch)
    that is also seawall's :class:`~seawall.breaker.CircuitOpenError` (host, retry_in)."""

    def __init__(self, cause: CircuitOpenError, request: httpx.Request) -> None:
        Exception.__init__(self, str(cause))  # httpx's __init__ chain would reach cause's
        self._request = request
        self.__dict__.update(vars(cause))  # name, retry_at, retry_in, state, reopen_time


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestCoalesced(Event):
    """``followers`` concurrent identical GETs shared one upstream fetch."""

    name: ClassVar[str] = "client.coalesced"
    host: str
    followers: int


def _host(request: httpx.Request) -> str:
    return request.url.netloc.decode("ascii", "replace")


def _judge_exception(exc: BaseException) -> Verdict:
    if isinstance(exc, _RETRYABLE_ERRORS):
        return Verdict(True, type(exc).__name__)
    return FINAL


def _breaker_outcome(core: ClientCore, exc: BaseException) -> Outcome:
    if isinstance(exc, _LOCAL_ERRORS) or not isinstance(exc, Exception):
        return Outcome.NEUTRAL
    if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
        return Outcome.FAILURE
    return core.breaker_outcome_exception(exc)


def _pool_timeout(host: str, timeout: float | None, request: httpx.Request) -> httpx.PoolTimeout:
    """A full bulkhead, as httpx reports its own full pool: local, not retried."""
    return httpx.PoolTimeout(
        f"no free slot for {host} (max_concurrency) within {timeout:.3f}s", request=request
    )


_HOOKS = FaceHooks(CircuitOpenTransportError, _pool_timeout, _breaker_outcome)


def _replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


class _Base(CoreAccess, Generic[T]):
    """What the async and sync transports share: construction, the decisions, the views.

    ``T`` is the kind of httpx transport wrapped (async or sync); subclasses say which
    one to make when none is given and how to put a cache in front of themselves.
    """

    __slots__ = ("_core", "_front", "_groups", "_inner")

    def __init__(
        self,
        inner: T | None = None,
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
        self._inner: T = inner if inner is not None else self._default_inner()
        self._groups: dict[tuple[str, ...], _Group] = {}  # coalescing (async face only)
        self._front: T | None = None if cache is None else self._cache_front(cache)

    def _default_inner(self) -> T:
        raise NotImplementedError

    def _cache_front(self, cache: FallbackCache) -> T:
        raise NotImplementedError

    @property
    def policy(self) -> ClientPolicy:
        return self._core.policy

    def _may_retry(self, request: httpx.Request, replayable: bool) -> bool:
        """Safe method (or idempotency key / opt-in) and a body that can be sent again
        (judged before the first attempt: a transport may buffer a streamed body)."""
        return replayable and self._core.may_retry(request.method, request.headers)

    def _retry_response(
        self, response: httpx.Response, request: httpx.Request, replayable: bool
    ) -> bool:
        """Whether a first attempt's response calls for retries (the fast path's test: a
        retryable status is all :meth:`_judge_response` would look at, so no verdict)."""
        return response.status_code in self._core.policy.retry.retry_statuses and (
            self._may_retry(request, replayable)
        )

    def _retry_error(self, exc: Exception, request: httpx.Request, replayable: bool) -> bool:
        return _judge_exception(exc).retryable and self._may_retry(request, replayable)

    def _judge_response(self, response: httpx.Response) -> Verdict:
        return self._core.judge_response(response.status_code, response.headers)

    def _retry_call(self, host: str, deadline_at: float) -> RetryCall[httpx.Response]:
        return self._core.retry_call(host, deadline_at, self._judge_response, _judge_exception)


# --------------------------------------------------------------------------- async


class ResilientTransport(_Base[httpx.AsyncBaseTransport], httpx.AsyncBaseTransport):
    """Async transport: budgeted retries, per-host breaker, limits, coalescing."""

    __slots__ = ()

    def _default_inner(self) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport()

    def _cache_front(self, cache: FallbackCache) -> httpx.AsyncBaseTransport:
        return FallbackCacheTransport(_Behind(self), cache)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._front is not None:
            return await self._front.handle_async_request(request)
        return await self._handle(request)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if (
            request.method == "GET"
            and self._core.policy.coalesce
            and is_immutable_url(request.url.raw_path)
        ):
            return await self._coalesced(request)
        return await self._send(request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        host = _host(request)
        deadline_at = core.start(host)
        replayable = _replayable(request)
        first: httpx.Response | BaseException
        try:
            first = await self._attempt(request, host, deadline_at)
        except Exception as exc:  # CancelledError is a BaseException: it propagates at once
            if not self._retry_error(exc, request, replayable):
                raise
            first = exc
        else:
            if not self._retry_response(first, request, replayable):
                return first  # the fast path: no tenacity on success
        return await self._retry_call(host, deadline_at).resume(
            first, lambda: self._attempt(request, host, deadline_at), _aclose
        )

    async def _attempt(
        self, request: httpx.Request, host: str, deadline_at: float
    ) -> httpx.Response:
        core = self._core
        with Admission(core, host, deadline_at, request, _HOOKS) as admission:
            timeout = await admission.wait() if core.limited else core.attempt_timeout(deadline_at)
            try:
                async with asyncio.timeout(timeout):
                    response = await self._inner.handle_async_request(request)
            except TimeoutError:
                raise httpx.ReadTimeout(
                    f"no response from {host} within the attempt timeout of {timeout:.3f}s",
                    request=request,
                ) from None
            shed = REFUSED_HEADER in response.headers
            release = admission.streaming(response.status_code, shed=shed)
            if release is not None:
                if response.is_closed:  # the body is already in memory (a prebuilt response)
                    release()
                else:
                    response.stream = _ReleasingAsyncStream(response.stream, release)  # type: ignore[arg-type]
        return response

    # ---- coalescing

    async def _coalesced(self, request: httpx.Request) -> httpx.Response:
        h = request.headers
        key = (
            str(request.url),
            h.get("authorization", ""),
            h.get("cookie", ""),
            h.get("accept", ""),
            h.get("range", ""),
        )
        while True:
            group = self._groups.get(key)
            if group is None:
                return await self._lead(key, request)
            index = group.join()
            try:
                tee = await asyncio.shield(group.future)
            except _LeaderGone:
                continue  # the leader was cancelled: try again, maybe as the leader
            except asyncio.CancelledError:
                await group.leave(index)
                raise
            head = group.head
            assert head is not None
            return _copy(head, tee.reader(index), request)

    async def _lead(self, key: tuple[str, ...], request: httpx.Request) -> httpx.Response:
        loop = asyncio.get_running_loop()
        group = _Group(loop.create_future())
        self._groups[key] = group
        try:
            response = await self._send(request)
        except asyncio.CancelledError:
            self._groups.pop(key, None)
            group.future.set_exception(_LeaderGone())
            raise
        except BaseException as exc:
            self._groups.pop(key, None)
            group.future.set_exception(exc)
            raise
        self._groups.pop(key, None)
        followers = group.joined
        if followers == 0:
            group.future.set_exception(_LeaderGone())  # nobody is waiting; never retrieved
            return response
        tee = _Tee(response.stream, followers + 1, group.gone)  # type: ignore[arg-type]
        group.head = response
        group.future.set_result(tee)
        bus = self._core.bus
        if bus.active:
            bus.emit(
                RequestCoalesced(
                    at=self._core.clock.now(), host=_host(request), followers=followers
                )
            )
        return _copy(response, tee.reader(0), request)

    async def aclose(self) -> None:
        if self._front is not None:
            await self._front.aclose()  # closes the cache's tasks, then _Behind -> inner
        else:
            await self._inner.aclose()


class _Behind(httpx.AsyncBaseTransport):
    """The resilient pipeline as seen from the cache layer in front of it."""

    def __init__(self, outer: ResilientTransport) -> None:
        self._outer = outer

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._outer._handle(request)

    async def aclose(self) -> None:
        await self._outer._inner.aclose()


class _LeaderGone(Exception):
    """The leading request was cancelled (or nobody waited): followers try again."""


class _Group:
    """One in-flight coalesced fetch and who waits for it."""

    __slots__ = ("future", "gone", "head", "joined")

    def __init__(self, future: asyncio.Future[_Tee]) -> None:
        self.future = future
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # mark retrieved
        self.joined = 0
        self.gone: set[int] = set()
        self.head: httpx.Response | None = None

    def join(self) -> int:
        self.joined += 1
        return self.joined

    async def leave(self, index: int) -> None:
        f = self.future
        if f.done() and not f.cancelled() and f.exception() is None:
            await f.result().reader(index).aclose()
        else:
            self.gone.add(index)


def _copy(
    head: httpx.Response, stream: httpx.AsyncByteStream, request: httpx.Request
) -> httpx.Response:
    return httpx.Response(
        head.status_code,
        headers=head.headers,
        stream=stream,
        request=request,
        extensions={
            k: v for k, v in head.extensions.items() if k in ("http_version", "reason_phrase")
        },
    )


class _Tee:
    """Fan one response body out to ``n`` readers without reading it whole.

    Chunks are pulled from the upstream on demand by whichever reader is ahead, kept until
    every open reader has passed them, then dropped: memory is bounded by the distance
    between the fastest and the slowest reader (documented in docs/client.md).
    """

    __slots__ = ("_base", "_chunks", "_done", "_error", "_it", "_lock", "_pos", "_source")

    def __init__(self, source: httpx.AsyncByteStream, n: int, gone: set[int]) -> None:
        self._source = source
        self._it: AsyncIterator[bytes] = source.__aiter__()
        self._chunks: list[bytes] = []
        self._base = 0
        self._done = False
        self._error: BaseException | None = None
        self._lock = asyncio.Lock()
        self._pos: dict[int, int] = {i: 0 for i in range(n) if i not in gone}

    def reader(self, index: int) -> _TeeReader:
        return _TeeReader(self, index)

    async def _next(self, index: int) -> bytes | None:
        while True:
            pos = self._pos.get(index)
            if pos is None:
                return None
            i = pos - self._base
            if i < len(self._chunks):
                chunk = self._chunks[i]
                self._pos[index] = pos + 1
                self._trim()
                return chunk
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            async with self._lock:
                if pos - self._base < len(self._chunks) or self._done or self._error:
                    continue
                try:
                    self._chunks.append(await self._it.__anext__())
                except StopAsyncIteration:
                    self._done = True
                except Exception as exc:
                    self._error = exc

    def _trim(self) -> None:
        low = min(self._pos.values(), default=self._base + len(self._chunks))
        drop = low - self._base
        if drop > 0:
            del self._chunks[:drop]
            self._base = low

    async def close(self, index: int) -> None:
        if self._pos.pop(index, None) is None:
            return
        self._trim()
        if not self._pos:
            self._chunks.clear()
            await self._source.aclose()


class _TeeReader(httpx.AsyncByteStream):
    __slots__ = ("_index", "_tee")

    def __init__(self, tee: _Tee, index: int) -> None:
        self._tee = tee
        self._index = index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self._tee._next(self._index)) is not None:
            yield chunk

    async def aclose(self) -> None:
        await self._tee.close(self._index)


class _ReleasingAsyncStream(httpx.AsyncByteStream):
    """Hold the bulkhead slot until the body is closed, not just until the headers."""

    __slots__ = ("_inner", "_release")

    def __init__(self, inner: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


async def _aclose(response: httpx.Response) -> None:
    await response.aclose()


# --------------------------------------------------------------------------- sync


class ResilientSyncTransport(_Base[httpx.BaseTransport], httpx.BaseTransport):
    """Sync transport: the same pipeline for ``httpx.Client`` (no coalescing)."""

    __slots__ = ()

    def _default_inner(self) -> httpx.BaseTransport:
        return httpx.HTTPTransport()

    def _cache_front(self, cache: FallbackCache) -> httpx.BaseTransport:
        return FallbackCacheSyncTransport(_SyncBehind(self), cache)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self._front is not None:
            return self._front.handle_request(request)
        return self._handle(request)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        core = self._core
        host = _host(request)
        deadline_at = core.start(host)
        replayable = _replayable(request)
        first: httpx.Response | BaseException
        try:
            first = self._attempt(request, host, deadline_at)
        except Exception as exc:
            if not self._retry_error(exc, request, replayable):
                raise
            first = exc
        else:
            if not self._retry_response(first, request, replayable):
                return first
        return self._retry_call(host, deadline_at).resume_sync(
            first, lambda: self._attempt(request, host, deadline_at), httpx.Response.close
        )

    def _attempt(self, request: httpx.Request, host: str, deadline_at: float) -> httpx.Response:
        with Admission(self._core, host, deadline_at, request, _HOOKS) as admission:
            _cap_timeouts(request, admission.wait_sync())
            response = self._inner.handle_request(request)
            shed = REFUSED_HEADER in response.headers
            release = admission.streaming(response.status_code, shed=shed)
            if release is not None:
                if response.is_closed:
                    release()
                else:
                    response.stream = _ReleasingSyncStream(response.stream, release)  # type: ignore[arg-type]
        return response

    def close(self) -> None:
        if self._front is not None:
            self._front.close()
        else:
            self._inner.close()


class _SyncBehind(httpx.BaseTransport):
    """The sync pipeline as seen from the cache layer in front of it."""

    def __init__(self, outer: ResilientSyncTransport) -> None:
        self._outer = outer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._outer._handle(request)

    def close(self) -> None:
        self._outer._inner.close()


def _cap_timeouts(request: httpx.Request, timeout: float | None) -> None:
    """A sync attempt cannot be cancelled from outside: cap httpx's own timeouts instead."""
    if timeout is None:
        return
    current = request.extensions.get("timeout") or {}
    capped = {}
    for k in ("connect", "read", "write", "pool"):
        v = current.get(k)
        capped[k] = timeout if v is None or not math.isfinite(v) else min(v, timeout)
    request.extensions["timeout"] = capped


class _ReleasingSyncStream(httpx.SyncByteStream):
    __slots__ = ("_inner", "_release")

    def __init__(self, inner: httpx.SyncByteStream, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()
