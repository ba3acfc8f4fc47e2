# Generated from src/seawall/client/_async/pipeline.py by scripts/generate_sync.py: do not edit.
"""The client pipeline's I/O, written once: this async source is the only one kept by hand.

``seawall/client/_sync/pipeline.py`` is generated from it by ``scripts/generate_sync.py``
(``make test`` checks that the copy is current). Outermost first, for every face:

    fallback cache -> coalescing -> retries (deadline, budget) -> breaker
        -> rate limit / bulkhead -> per-attempt timeout -> the face's one send

Every decision is taken by :mod:`seawall.client.core` (sans-IO); this module only
sleeps, waits for slots, sends, closes, and moves body chunks. Bodies stay streaming:
a body is never read whole here, only passed on chunk by chunk (to the caller, to the
cache's recorder, to the followers of a coalesced fetch).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Callable, Sequence
from typing import Generic, Protocol, TypeVar
from urllib.parse import urljoin

from seawall.cache._sync.io import SyncCacheRecorder
from seawall.cache.fallback import FallbackCache, Hit
from seawall.cache.freshness import State
from seawall.cache.keys import RequestInfo, request_key
from seawall.client.core import (
    BUILD_STEP,
    CALL_TIME_LIMIT,
    Call,
    ClientCore,
    Face,
    RequestCoalesced,
    is_immutable_url,
)
from seawall.concurrency import SyncEvent, SyncLock, SyncSemaphore, SyncTasks
from seawall.protocol import STEP_HEADER

__all__ = [
    "SyncBody",
    "SyncCacheLayer",
    "SyncCoalescer",
    "SyncFace",
    "SyncHandler",
    "SyncPipeline",
    "sync_send",
]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Req_contra = TypeVar("Req_contra", contravariant=True)
Resp_co = TypeVar("Resp_co", covariant=True)

_CONDITIONALS = ("if-none-match", "if-modified-since", "if-match", "if-unmodified-since")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_REVALIDATING = "revalidating:"  # claimed in the cache's table of work in flight
_MAX_REDIRECTS = 5


class SyncHandler(Protocol[Req_contra, Resp_co]):
    """The rest of the pipeline, seen from a layer: request in, answer out."""

    def __call__(self, request: Req_contra) -> Resp_co: ...


class SyncBody(Protocol):
    """A response body as the pipeline moves it: raw (still encoded) chunks, then close."""

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class SyncFace(Face[Req, Resp], Protocol):
    """What a face does in its colour: send once, close, and hand over bodies."""

    def send(self, request: Req, timeout: float | None) -> Resp:
        """One attempt; ``timeout`` bounds it (the call's deadline included)."""
        ...

    def close(self, response: Resp) -> None:
        """Release an answer that will not be returned (it is being retried)."""
        ...

    def body(self, response: Resp) -> SyncBody:
        """The answer's unread body."""
        ...

    def replace_body(self, response: Resp, body: SyncBody) -> Resp:
        """The same answer with ``body`` instead of its own."""
        ...

    def build(
        self, request: Req, status: int, headers: Sequence[tuple[str, str]], body: SyncBody
    ) -> Resp:
        """A new answer to ``request`` (from the cache, or for a coalesced follower)."""
        ...

    def request_info(self, request: Req) -> RequestInfo:
        """The face-neutral request (method, absolute URL, lower-case headers)."""
        ...

    def response_headers(self, response: Resp) -> list[tuple[str, str]]:
        """All response headers, lower-case names, in order."""
        ...

    def with_headers(self, request: Req, headers: Sequence[tuple[str, str]]) -> Req:
        """A copy of ``request`` with these headers set (for a conditional request)."""
        ...

    def is_upstream_failure(self, exc: BaseException) -> bool:
        """Trouble upstream the cache may cover for (never the caller's own mistake)."""
        ...

    def redirect(self, request: Req, url: str) -> Req:
        """A GET of ``url`` following ``request``'s redirect; credentials only to the same
        origin (:func:`seawall.cache.keys.is_credential_header` says which headers)."""
        ...


# --------------------------------------------------------------------------- retries


def sync_send(core: ClientCore, face: SyncFace[Req, Resp], request: Req) -> Resp:
    """One logical call: attempts, with the core's decisions between them."""
    call = Call(core, face, request)
    clock = core.clock
    while True:
        attempt = call.admit()  # raises at once when the breaker or the pacing says no
        try:
            pace = attempt.pace
            if pace > 0.0:
                clock.sleep_sync(pace)
            timeout = call.timeout()
            bulkhead = core.bulkhead(call.host, SyncSemaphore)
            if bulkhead is not None:
                if not bulkhead.acquire(timeout, clock):
                    raise call.no_slot(attempt, timeout)
                attempt.hold(bulkhead.release)
                timeout = call.timeout()  # the wait for the slot came out of the time left
            call.started(attempt, timeout)
            response = face.send(request, timeout)
        except Exception as exc:
            wait = call.failed(attempt, exc)  # raises exc when it is final
        except BaseException:
            call.abandoned(attempt)
            raise
        else:
            after = call.answered(attempt, response)
            if after is None:
                release = attempt.hand_over()
                if release is None:
                    return response
                if face.finished(response):  # a prebuilt answer: nothing will close it
                    release()
                    return response
                return face.replace_body(response, SyncReleasingBody(face.body(response), release))
            face.close(response)
            wait = after
        clock.sleep_sync(wait)


class SyncReleasingBody:
    """Hold the bulkhead slot until the body is closed, not just until the headers."""

    __slots__ = ("_inner", "_release")

    def __init__(self, inner: SyncBody, release: Callable[[], None]) -> None:
        self._inner = inner
        self._release: Callable[[], None] | None = release

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            yield chunk

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()


# --------------------------------------------------------------------------- coalescing


class BodyCut(ConnectionError):
    """A shared body ended early: the reader pulling it for everyone was cancelled."""

    def __init__(self) -> None:
        super().__init__("the coalesced fetch was cancelled while its body was read")


def _own_copy(error: BaseException) -> BaseException:
    """A follower's own copy of the leader's error: concurrent raisers must not share one
    object (its traceback and context are written as it propagates)."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class _LeaderGone(Exception):
    """The leading request was cancelled: followers try again, one of them as leader."""


class _Group(Generic[Resp]):
    """One in-flight coalesced fetch and who waits for it."""

    __slots__ = ("done", "error", "gone", "head", "joined", "tee")

    def __init__(self) -> None:
        self.done = SyncEvent()
        self.joined = 0
        self.gone: set[int] = set()
        self.head: Resp | None = None
        self.tee: SyncTee | None = None
        self.error: BaseException | None = None


class SyncCoalescer(Generic[Req, Resp]):
    """Concurrent identical GETs of immutable content share one upstream fetch.

    "Identical" is the URL, the credential scope (a follower never receives what another
    credential fetched), Accept and Range. The leader's body is fanned out to every
    follower as it streams (:class:`AsyncTee`); nobody holds it whole. The group table is
    guarded by a thread lock held for a few dictionary operations only, so the same code
    is safe for a sync face called from many threads.
    """

    __slots__ = ("_core", "_face", "_groups", "_lock")

    def __init__(self, core: ClientCore, face: SyncFace[Req, Resp]) -> None:
        self._core = core
        self._face = face
        self._groups: dict[tuple[str, ...], _Group[Resp]] = {}
        self._lock = threading.Lock()

    def key(self, request: Req) -> tuple[str, ...] | None:
        """The request's coalescing key, or None when it must be fetched on its own: only
        what the cache would call a verifiable digest (the cheap test first)."""
        face = self._face
        if face.method(request) != "GET" or not is_immutable_url(face.target(request)):
            return None
        info = face.request_info(request)
        rk = request_key(info, namespace="coalesce")  # its scope: the credential scope
        if rk.digest is None:
            return None
        return (info.url, rk.scope, info.header("accept") or "", info.header("range") or "")

    def fetch(
        self,
        key: tuple[str, ...],
        request: Req,
        send: SyncHandler[Req, Resp],
    ) -> Resp:
        face = self._face
        while True:
            with self._lock:
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = _Group()
                    index = 0
                else:
                    group.joined += 1
                    index = group.joined
            if index == 0:
                return self._lead(key, group, request, send)
            try:
                group.done.wait()
            except BaseException:
                self._leave(group, index)
                raise
            if isinstance(group.error, _LeaderGone):
                continue  # the leader was cancelled: try again, maybe as the leader
            if group.error is not None:
                raise _own_copy(group.error) from group.error
            head, tee = group.head, group.tee
            assert head is not None and tee is not None
            return face.build(
                request, face.status(head), face.response_headers(head), tee.reader(index)
            )

    def _leave(self, group: _Group[Resp], index: int) -> None:
        with self._lock:
            tee = group.tee
            if tee is None:
                group.gone.add(index)  # the tee will not keep chunks for this reader
                return
        tee.close(index)

    def _lead(
        self,
        key: tuple[str, ...],
        group: _Group[Resp],
        request: Req,
        send: SyncHandler[Req, Resp],
    ) -> Resp:
        face = self._face
        try:
            response = send(request)
        except BaseException as exc:
            with self._lock:
                self._groups.pop(key, None)
            group.error = exc if isinstance(exc, Exception) else _LeaderGone()
            group.done.set()
            raise
        with self._lock:
            self._groups.pop(key, None)  # from here on, nobody joins this group
            followers = group.joined
            if followers:
                group.tee = SyncTee(face.body(response), followers + 1, group.gone)
        if not followers:
            return response
        group.head = response
        group.done.set()
        core = self._core
        if core.bus.active:
            core.bus.emit(
                RequestCoalesced(at=core.clock.now(), host=face.host(request), followers=followers)
            )
        assert group.tee is not None
        return face.replace_body(response, group.tee.reader(0))


class SyncTee:
    """Fan one body out to ``n`` readers without reading it whole.

    Chunks are pulled from the source on demand by whichever reader is ahead, kept until
    every open reader has passed them, then dropped: memory is bounded by the distance
    between the fastest and the slowest reader (documented in docs/client.md).
    """

    __slots__ = ("_base", "_chunks", "_done", "_error", "_it", "_lock", "_pos", "_source")

    def __init__(self, source: SyncBody, n: int, gone: set[int]) -> None:
        self._source = source
        self._it: Iterator[bytes] = source.__iter__()
        self._chunks: list[bytes] = []
        self._base = 0
        self._done = False
        self._error: BaseException | None = None
        self._lock = SyncLock()
        self._pos: dict[int, int] = {i: 0 for i in range(n) if i not in gone}

    def reader(self, index: int) -> SyncTeeReader:
        return SyncTeeReader(self, index)

    def next_chunk(self, index: int) -> bytes | None:
        with self._lock:
            pos = self._pos.get(index)
            if pos is None:
                return None
            i = pos - self._base
            if i >= len(self._chunks):
                if self._error is not None:
                    raise self._error
                if self._done:
                    return None
                try:
                    self._chunks.append(self._it.__next__())
                except StopIteration:
                    self._done = True
                    return None
                except BaseException as exc:
                    # A reader cancelled while pulling (its own timeout, a caller that
                    # left) ends the source too: the others must see an error, never a
                    # body cut short that looks complete.
                    self._error = exc if isinstance(exc, Exception) else BodyCut()
                    raise
            chunk = self._chunks[i]
            self._pos[index] = pos + 1
            self._trim()
            return chunk

    def _trim(self) -> None:
        low = min(self._pos.values(), default=self._base + len(self._chunks))
        drop = low - self._base
        if drop > 0:
            del self._chunks[:drop]
            self._base = low

    def forget(self, index: int) -> bool:
        """Stop keeping chunks for reader ``index``; True when it was the last reader."""
        if self._pos.pop(index, None) is None:
            return False
        self._trim()
        if self._pos:
            return False
        self._chunks.clear()
        return True

    def close(self, index: int) -> None:
        with self._lock:
            last = self.forget(index)
        if last:
            self._source.close()


class SyncTeeReader:
    __slots__ = ("_index", "_tee")

    def __init__(self, tee: SyncTee, index: int) -> None:
        self._tee = tee
        self._index = index

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._tee.next_chunk(self._index)) is not None:
            yield chunk

    def close(self) -> None:
        self._tee.close(self._index)


# --------------------------------------------------------------------------- fallback cache


class SyncCacheLayer(Generic[Req, Resp]):
    """The fallback cache in front of everything else (DESIGN.md's order).

    It answers from the cache when everything inside gave up (an upstream failure, an
    open breaker, a spent budget) or the upstream answers with a fallback status; it
    serves fresh entries and verified blobs without asking (``CachePolicy.serve_fresh``),
    revalidates due metadata with ``If-None-Match`` / ``If-Modified-Since``, and records
    successful GETs while the caller reads them.
    """

    __slots__ = ("_face", "_tasks", "cache")

    def __init__(self, cache: FallbackCache, face: SyncFace[Req, Resp]) -> None:
        self.cache = cache
        self._face = face
        self._tasks = SyncTasks()

    def handle(self, request: Req, inner: SyncHandler[Req, Resp]) -> Resp:
        face = self._face
        method = face.method(request)
        if method not in ("GET", "HEAD"):
            return inner(request)
        io = self.cache.sync
        info = face.request_info(request)
        hit = io.lookup(info)
        if hit is not None and self._serve_without_asking(hit, info):
            return self._answer(request, method, hit, "fresh")
        if hit is not None and self._tasks.background and self._serve_then_revalidate(hit, info):
            stale = hit
            claim = _REVALIDATING + hit.key
            if self.cache.claim(claim):  # one refresh at a time, not a herd
                self._tasks.start(
                    lambda: self._revalidate(request, info, stale, inner),
                    done=lambda: self.cache.release(claim),
                )
            return self._answer(request, method, hit, "stale-while-revalidate")
        conditional = self._conditional(request, info, hit)
        wait = self.cache.policy.fallback_after
        token = None
        if hit is not None and hit.usable_on_error and wait is not None:
            token = CALL_TIME_LIMIT.set(wait)  # the copy answers sooner than the deadline
        try:
            response = inner(conditional or request)
            if method == "GET" and face.status(response) in _REDIRECTS:
                response = self._follow(request, info, response, inner)
        except Exception as exc:
            if hit is not None and hit.usable_on_error and face.is_upstream_failure(exc):
                return self._answer(request, method, hit, type(exc).__name__)
            raise
        finally:
            if token is not None:
                CALL_TIME_LIMIT.reset(token)
        return self._after(request, info, hit, conditional is not None, response)

    def _follow(
        self, request: Req, info: RequestInfo, response: Resp, inner: SyncHandler[Req, Resp]
    ) -> Resp:
        """Follow a blob's redirect (to a CDN or an object store) here, so that the bytes
        are recorded and verified under the digest the caller asked for, and the signed
        URL is never stored. Anything that is not a verifiable blob is left to the caller.
        Credentials are not sent to another origin."""
        face = self._face
        if self.cache.key(info).digest is None:
            return response
        for _ in range(_MAX_REDIRECTS):
            location = face.response_header(response, "location")
            if face.status(response) not in _REDIRECTS or not location:
                break
            face.close(response)
            request = face.redirect(request, urljoin(face.request_info(request).url, location))
            response = inner(request)
        return response

    def _serve_without_asking(self, hit: Hit, info: RequestInfo) -> bool:
        """Fresh and a plain GET/HEAD: a caller's own conditionals or Range go upstream
        (a full 200 still answers them if the upstream then fails)."""
        return (
            self.cache.policy.serve_fresh
            and hit.fresh
            and info.header("range") is None
            and not any(info.header(h) is not None for h in _CONDITIONALS)
        )

    def _serve_then_revalidate(self, hit: Hit, info: RequestInfo) -> bool:
        return (
            self.cache.policy.serve_fresh
            and hit.state is State.STALE_REVALIDATE
            and info.header("range") is None
        )

    def _conditional(self, request: Req, info: RequestInfo, hit: Hit | None) -> Req | None:
        """A copy of ``request`` asking "changed since?", or None when it cannot ask."""
        if hit is None or hit.immutable or any(info.header(h) is not None for h in _CONDITIONALS):
            return None
        etag, modified = hit.header("etag"), hit.header("last-modified")
        if etag is None and modified is None:
            return None
        extra = []
        if etag is not None:
            extra.append(("if-none-match", etag))
        if modified is not None:
            extra.append(("if-modified-since", modified))
        return self._face.with_headers(request, extra)

    def _answer(self, request: Req, method: str, hit: Hit, reason: str) -> Resp:
        headers = self.cache.served(hit, reason=reason)
        body = SyncStoredBody(None if method == "HEAD" else self.cache.sync.body(hit))
        return self._face.build(request, hit.status, headers, body)

    def _after(
        self,
        request: Req,
        info: RequestInfo,
        hit: Hit | None,
        asked_conditionally: bool,
        response: Resp,
    ) -> Resp:
        face = self._face
        io = self.cache.sync
        status = face.status(response)
        method = face.method(request)
        if status == 304 and asked_conditionally and hit is not None:
            face.close(response)
            fresh = io.refresh(hit, face.response_headers(response))
            return self._answer(request, method, fresh, "revalidated")
        if (
            hit is not None
            and hit.usable_on_error
            and status in self.cache.policy.fallback_statuses
        ):
            face.close(response)
            return self._answer(request, method, hit, f"status {status}")
        if method == "GET":
            try:
                recorder = io.recorder(info, status, face.response_headers(response))
            except Exception:  # the cache's trouble (odd headers, a store error): not the caller's
                recorder = None
            if recorder is not None:
                recording = SyncRecordingBody(face.body(response), recorder)
                return face.replace_body(response, recording)
        return response

    def _revalidate(
        self, request: Req, info: RequestInfo, hit: Hit, inner: SyncHandler[Req, Resp]
    ) -> None:
        """Refresh in the background for stale-while-revalidate. (A sync caller has no loop
        to work in the background: it revalidates before answering, as for a stale copy.)"""
        face = self._face
        conditional = self._conditional(request, info, hit)
        try:
            response = inner(conditional or request)
            try:
                out = self._after(request, info, hit, conditional is not None, response)
            except Exception:
                face.close(response)
                raise
            body = face.body(out)
            try:
                for _ in body:
                    pass  # drain through the recorder so the new version is kept
            finally:
                body.close()
        except Exception:
            pass  # a failed refresh leaves the stale copy; the next request tries again

    def close(self) -> None:
        self._tasks.close()


class SyncStoredBody:
    """A body served from the cache (None: a HEAD answer, no body)."""

    __slots__ = ("_chunks",)

    def __init__(self, chunks: Iterator[bytes] | None) -> None:
        self._chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        if self._chunks is not None:
            for chunk in self._chunks:
                yield chunk

    def close(self) -> None:
        chunks, self._chunks = self._chunks, None
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class SyncRecordingBody:
    """The upstream body to the caller and, chunk by chunk, to the cache's recorder."""

    __slots__ = ("_inner", "_recorder")

    def __init__(self, inner: SyncBody, recorder: SyncCacheRecorder) -> None:
        self._inner = inner
        self._recorder = recorder

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._recorder.feed(chunk)
                yield chunk
        except BaseException:
            self._recorder.abort()
            raise
        self._recorder.finish()

    def close(self) -> None:
        self._recorder.abort()  # no-op once finished; an unread body is not kept
        self._inner.close()


# --------------------------------------------------------------------------- the whole


class SyncPipeline(Generic[Req, Resp]):
    """Cache -> coalescing -> retries for one face; ``cache=None`` leaves the cache out."""

    __slots__ = ("_coalescer", "cache_layer", "core", "face")

    def __init__(
        self, core: ClientCore, face: SyncFace[Req, Resp], cache: FallbackCache | None
    ) -> None:
        self.core = core
        self.face = face
        self.cache_layer = SyncCacheLayer(cache, face) if cache is not None else None
        self._coalescer = SyncCoalescer(core, face) if core.policy.coalesce else None

    def handle(self, request: Req) -> Resp:
        step = BUILD_STEP.get()
        if step is not None and self.face.header(request, STEP_HEADER) is None:
            self.face.mark(request, STEP_HEADER, step)
        layer = self.cache_layer
        if layer is not None:
            return layer.handle(request, self._shared)
        return self._shared(request)

    def _shared(self, request: Req) -> Resp:
        coalescer = self._coalescer
        if coalescer is not None:
            key = coalescer.key(request)
            if key is not None:
                return coalescer.fetch(key, request, self._send)
        return sync_send(self.core, self.face, request)

    def _send(self, request: Req) -> Resp:
        return sync_send(self.core, self.face, request)

    def close(self) -> None:
        if self.cache_layer is not None:
            self.cache_layer.close()
