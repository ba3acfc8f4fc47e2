"""Server face of the fallback cache: pure ASGI middleware.

For GET/HEAD it tees successful artifact responses into the cache as they stream
(nothing is buffered), and answers from the cache when the app raises, returns a
fallback status (5xx) or is shed by seawall (503 with ``x-seawall-refused: shed``). It
needs no buffering to do so: the status is in ``http.response.start`` itself, so only
that one message is inspected before deciding whether to pass the app's response on or
to swallow it and send the stored copy instead. It never answers from the cache while
the app is healthy: the app stays the authority on who may read what.

While the shedder inside is refusing (for the ``Retry-After`` its last refusal announced),
a GET/HEAD for a digest-addressed blob with a verified copy is answered from the store
*before* the app: the bytes are named by their digest, so the copy is exactly what the
app would send, and each such answer leaves a slot of an overloaded server to work that
no copy can do. A healthy app is always asked first.

It answers for *failures*, not for deliberate refusals: a 429 (the rate limiter's, or
the app's own) and anything marked ``x-seawall-refused: rate-limit`` pass through, since
replacing them with a stored 200 would undo the limit. Per-client fields
(``Set-Cookie``, ``RateLimit*``, ``Retry-After``) are never stored nor replayed. By
default only artifact-shaped responses (OCI, PEP 503/691 pages and files, npm packuments
and tarballs) or responses whose Cache-Control says ``public``/``max-age``/``s-maxage``
are stored; anything else is opt-in (``CachePolicy.store_paths``).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable
from operator import itemgetter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seawall.asgi._http import header_map
from seawall.cache._async.io import AsyncCacheRecorder
from seawall.cache.fallback import CacheCorruptError, FallbackCache, Hit
from seawall.cache.freshness import is_artifact, is_per_client_field, shared_cache_allowed
from seawall.cache.keys import RequestInfo, RequestKey, is_credential_header
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.lru import remember
from seawall.policy.cache import CachePolicy
from seawall.protocol import REFUSED_HEADER

__all__ = ["FallbackCacheMiddleware"]

_REFUSED = REFUSED_HEADER.encode("latin-1")
_Picker = Callable[[dict[bytes, bytes]], Any]


def request_info(scope: Scope) -> RequestInfo:
    """The face-neutral request of an ASGI HTTP scope (absolute URL, lower-case headers)."""
    headers = [
        (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope.get("headers") or ()
    ]
    host = next((v for k, v in headers if k == "host"), None)
    if host is None:
        server = scope.get("server")
        host = f"{server[0]}:{server[1]}" if server else "localhost"
    path = scope.get("root_path", "") + scope.get("path", "/")
    query = scope.get("query_string", b"").decode("latin-1")
    url = f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{query}" if query else "")
    return RequestInfo(scope["method"], url, headers)


class _KeyMemo:
    """Cache keys of recent requests, by what makes the key: the request line, Host, Accept
    and the credential headers' raw bytes. A registry front-end sees the same blob asked
    for again and again; this saves decoding every header, parsing the URL and hashing for
    each. Which headers make the key is itself remembered per list of header names (one
    client sends the same names every time), so a request costs a few lookups in C, not a
    Python loop over its headers. Bounded: a flood of distinct requests only starts it over.
    """

    __slots__ = ("_extra", "_keys", "_names", "_pickers")

    _MAX = 8192
    _MAX_VALUES = 4096  # bytes of a request's key parts beyond which its key is not kept

    def __init__(self, cache: FallbackCache) -> None:
        self._keys: dict[tuple[Any, ...], RequestKey] = {}
        self._names: dict[bytes, bool] = {}
        self._pickers: dict[tuple[bytes, ...], tuple[tuple[bytes, ...], _Picker | None]] = {}
        self._extra = frozenset(cache.policy.credential_headers)

    def _in_key(self, name: bytes) -> bool:
        """Whether a header of this name makes the key: Host, Accept, or a credential."""
        known = self._names.get(name)
        if known is None:
            text = name.decode("latin-1").lower()
            known = text in ("host", "accept") or is_credential_header(text, self._extra)
            if len(self._names) < 1024:  # header names: few, unless hostile
                self._names[name] = known
        return known

    def _picker(self, names: tuple[bytes, ...]) -> tuple[tuple[bytes, ...], _Picker | None]:
        """The names among ``names`` that make the key, and a getter of their values (one
        value, or a tuple of several: the names beside it in the memo tell which)."""
        wanted = tuple(n for n in names if self._in_key(n))
        pick = itemgetter(*wanted) if wanted else None
        if len(names) <= 64 and sum(map(len, names)) <= 2048:  # a client's usual few names
            remember(self._pickers, names, (wanted, pick), 1024)
        return wanted, pick

    def key(self, scope: Scope, ex: _Exchange) -> RequestKey:
        headers = header_map(scope)
        values: object
        if headers is not None:
            names = tuple(headers)
            wanted, pick = self._pickers.get(names) or self._picker(names)
            values = None if pick is None else pick(headers)
        else:  # a name repeats: every value of it counts, in order
            pairs = [(n, v) for n, v in scope.get("headers") or () if self._in_key(n)]
            wanted = tuple(n for n, _ in pairs)
            values = tuple(v for _, v in pairs)
        memo = (
            scope.get("scheme"),
            scope.get("server"),
            scope.get("root_path", ""),
            scope.get("path"),
            scope.get("query_string", b""),
            wanted,
            values,
        )
        found = self._keys.get(memo)
        if found is None:
            found = ex.cache.key(ex.info)
            size = sum(len(n) + len(v) for n, v in scope.get("headers") or () if self._in_key(n))
            size += len(scope.get("path") or "") + len(scope.get("query_string") or b"")
            if size < self._MAX_VALUES:
                remember(self._keys, memo, found, self._MAX)
        return found


class _Exchange:
    """One request's state; its face-neutral form and cache key are made once, when first
    needed (a healthy answer for a blob already stored needs neither decoding nor hashing
    beyond the key)."""

    __slots__ = ("_info", "_key", "_keys", "answered", "cache", "recorder", "scope", "started")

    def __init__(self, scope: Scope, cache: FallbackCache, keys: _KeyMemo) -> None:
        self.scope = scope
        self.cache = cache
        self._keys = keys
        self.started = False  # the app's response start went to the client
        self.answered = False  # the cache answered instead
        self.recorder: AsyncCacheRecorder | None = None
        self._info: RequestInfo | None = None
        self._key: RequestKey | None = None

    @property
    def info(self) -> RequestInfo:
        if self._info is None:
            self._info = request_info(self.scope)
        return self._info

    @property
    def key(self) -> RequestKey:
        if self._key is None:
            self._key = self._keys.key(self.scope, self)
        return self._key

    async def lookup(self) -> Hit | None:
        return await self.cache.lookup(self.info, self.key)

    async def drop_recording(self) -> None:
        """Abort a recording the response did not finish (the app failed or was cancelled)."""
        if self.recorder is not None and not self.recorder.done:
            await self.recorder.abort()


class FallbackCacheMiddleware:
    """Record artifact responses; serve them when the app fails or is shed.

    ``FallbackCacheMiddleware(app)`` works alone on the bounded in-memory store; pass a
    shared :class:`FallbackCache` (e.g. on a ``DiskStore``) to share it with clients.
    """

    def __init__(
        self,
        app: ASGIApp,
        cache: FallbackCache | None = None,
        policy: CachePolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.app = app
        self.cache = cache or FallbackCache(policy=policy, clock=clock, events=events)
        self._store_paths = tuple(re.compile(p) for p in self.cache.policy.store_paths)
        self._shedding_until = -math.inf  # monotonic: the inner shedder asked to come back
        self._keys = _KeyMemo(self.cache)

    def _note_refusal(self, message: Message) -> None:
        """A shed answer passed by: copies by digest go first for its Retry-After."""
        seconds = 1.0
        for k, v in message.get("headers", ()):
            if k.lower() == b"retry-after":
                with contextlib.suppress(ValueError):  # an HTTP date: keep one second
                    seconds = max(1.0, min(float(v), 60.0))
        self._shedding_until = max(self._shedding_until, self.cache.clock.now() + seconds)

    def _falls_back(self, message: Message) -> bool:
        status = int(message["status"])
        if status < 400:
            return False  # neither a refusal nor a failure: the common answer costs no scan
        refused = next((v for k, v in message.get("headers", ()) if k.lower() == _REFUSED), None)
        if refused is not None:
            if refused == b"shed":
                self._note_refusal(message)
                return True  # overload: answer
            return False  # a rate limit: never undo it
        if status == 429:
            return False  # a deliberate refusal of this client, whoever sent it
        return status in self.cache.policy.fallback_statuses

    def _storable(self, scope: Scope, request: RequestInfo, headers: list[tuple[str, str]]) -> bool:
        """Artifact-shaped, allowed by its Cache-Control, or opted in by path."""
        path: str = scope.get("path", "/")
        if is_artifact(path, request.header("accept"), headers):
            return True
        if shared_cache_allowed(headers):
            return True
        return any(p.search(path) for p in self._store_paths)

    async def _serve(self, send: Send, hit: Hit, head: bool, reason: str) -> bool:
        """Answer with the stored copy; False (nothing sent) when it cannot be read after
        all: the first chunk is pulled before the response starts."""
        chunks = None if head else self.cache.body(hit)
        first = b""
        if chunks is not None:
            try:
                first = await chunks.__anext__()
            except StopAsyncIteration:
                chunks = None  # an empty body
            except (CacheCorruptError, OSError):
                return False
        headers = [(k, v) for k, v in self.cache.served(hit, reason=reason)]
        await send(
            {
                "type": "http.response.start",
                "status": hit.status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in headers
                    if not is_per_client_field(k)  # stored by an older version, or elsewhere
                ],
            }
        )
        if first:
            await send({"type": "http.response.body", "body": first, "more_body": True})
        if chunks is not None:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        cache = self.cache
        head = scope["method"] == "HEAD"
        ex = _Exchange(scope, cache, self._keys)
        if cache.clock.now() < self._shedding_until and ex.key.digest is not None:
            hit = await ex.lookup()  # verified against its digest before serving
            served = (
                hit is not None
                and hit.immutable
                and await self._serve(send, hit, head, "overloaded")
            )
            if served:
                return  # else: no copy, or it went away since its lookup: ask the app

        async def send_wrapper(message: Message) -> None:
            kind = message["type"]
            if ex.answered:
                return  # the app's own response was replaced by the stored copy
            if kind == "http.response.start":
                if self._falls_back(message):
                    hit = await ex.lookup()
                    reason = f"status {message['status']}"
                    if (
                        hit is not None
                        and hit.usable_on_error
                        and await self._serve(send, hit, head, reason)
                    ):
                        ex.answered = True
                        return
                # Only a complete 200 is ever stored, and a blob already stored needs
                # nothing at all: no header decoding, no hashing, no copy.
                if head or message["status"] != 200:
                    pass
                elif cache.holds(ex.key):
                    cache.stats.already_stored += 1
                else:
                    headers = [
                        (k.decode("latin-1").lower(), v.decode("latin-1"))
                        for k, v in message.get("headers", ())
                    ]
                    if self._storable(scope, ex.info, headers):
                        kept = [(k, v) for k, v in headers if not is_per_client_field(k)]
                        ex.recorder = await cache.recorder(ex.info, 200, kept, ex.key)
                ex.started = True
                await send(message)
                return
            rec = ex.recorder
            if kind == "http.response.body":
                await send(message)
                if rec is not None:
                    await rec.feed(message.get("body", b""))
                    if not message.get("more_body", False):
                        await rec.finish()
                return
            if rec is not None:  # pathsend/zerocopy: a body we cannot see is not recorded
                await rec.abort()
            await send(message)

        # An unfinished recording is dropped on every way out. Not from a ``finally:``: in
        # the compiled build an ``await`` there is a known hazard (docs/design.md).
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            await ex.drop_recording()
            if isinstance(exc, Exception) and await self._answer_failure(ex, send, head):
                return
            raise
        if ex.recorder is not None:  # most requests record nothing: no coroutine for them
            await ex.drop_recording()

    async def _answer_failure(self, ex: _Exchange, send: Send, head: bool) -> bool:
        """Whether the client has its answer from the cache although the app raised."""
        if ex.answered:
            return True  # already answered from the cache; the app's late failure is moot
        if ex.started:
            return False
        hit = await ex.lookup()
        if (
            hit is not None
            and hit.usable_on_error
            and await self._serve(send, hit, head, "app raised")
        ):
            ex.answered = True
            return True
        return False
