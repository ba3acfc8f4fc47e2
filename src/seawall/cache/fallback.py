"""The fallback cache mechanism shared by the ASGI middleware and the httpx transports.

It records responses while they stream (a tee: every chunk goes to the caller and to a
store writer, hashed on the way), commits an entry only when the body is complete and,
for a URL that names a digest, only when the bytes hash to that digest; so nobody can
plant bytes under a digest they do not match. Reading verifies again before the first
byte is served (digest for blobs, the recorded sha256 for metadata); an entry that fails
is evicted, counted and never served. Only one recording per key runs at a time, so 50
callers streaming the same blob leave one entry and one write.

The faces decide *when* to ask (fresh hit, upstream failure); this module decides *what*
may be served: fresh, stale within stale-if-error, or a digest-verified blob.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from seawall.cache.freshness import (
    Freshness,
    State,
    evaluate,
    freshness_for,
    is_storable_request,
    is_storable_response,
)
from seawall.cache.keys import (
    EXTRACTORS,
    RequestInfo,
    RequestKey,
    parse_vary,
    request_key,
    variant_key,
    vary_values,
)
from seawall.cache.memory import MemoryStore
from seawall.cache.store import Meta, Store, Writer
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError, SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.cache import CachePolicy
from seawall.protocol import CACHE_HEADER

__all__ = [
    "CACHE_HEADER",
    "CacheCorrupt",
    "CacheCorruptError",
    "CacheRejected",
    "CacheServed",
    "CacheStats",
    "CacheStored",
    "FallbackCache",
    "Hit",
    "Recorder",
]

_FORMAT = 1
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "set-cookie",  # never replay a session to anyone, even the same scope
        "age",
        CACHE_HEADER,
    }
)
_NOT_UPDATED_BY_304 = frozenset({"content-length", "content-encoding", "content-type", "etag"})


class CacheCorruptError(SeawallError):
    """A cached body changed between verification and serving (the stream is cut)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheServed(Event):
    """A response was answered from the cache; ``state`` is hit, stale or verified."""

    name: ClassVar[str] = "cache.served"
    url: str
    state: str
    age: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheStored(Event):
    """A response was recorded (complete and, for a digest URL, verified)."""

    name: ClassVar[str] = "cache.stored"
    url: str
    size: int
    digest: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheRejected(Event):
    """A recording was dropped: incomplete, or its bytes do not hash to the URL's digest."""

    name: ClassVar[str] = "cache.rejected"
    url: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CacheCorrupt(Event):
    """A stored entry failed verification when read; it was evicted and not served."""

    name: ClassVar[str] = "cache.corrupt"
    url: str
    reason: str


@dataclass(slots=True)
class CacheStats:
    """Counters of what the cache did (plain ints; cheap and easy to assert on)."""

    hits: int = 0
    stale: int = 0
    verified: int = 0
    misses: int = 0
    stored: int = 0
    rejected: int = 0
    corrupt: int = 0
    concurrent_skipped: int = 0
    revalidated: int = 0


@dataclass(slots=True)
class Hit:
    """A stored response that passed verification, with its current usability."""

    key: str
    url: str
    status: int
    headers: list[tuple[str, str]]
    size: int
    sha256: str
    digest: str | None
    freshness: Freshness
    state: State
    age: float
    vary: tuple[str, ...] = ()
    meta: Meta = field(default_factory=dict)

    @property
    def immutable(self) -> bool:
        """Named by a digest: the bytes can never be stale."""
        return self.digest is not None

    @property
    def fresh(self) -> bool:
        return self.immutable or self.state is State.FRESH

    @property
    def usable_on_error(self) -> bool:
        """May answer when the upstream fails (fresh, verified, or within stale-if-error)."""
        return self.immutable or self.state is not State.EXPIRED

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


def _clean_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k.lower(), v) for k, v in headers if k.lower() not in _HOP_BY_HOP]


class FallbackCache:
    """Record verified responses and serve them fresh, stale-if-error, or verified.

    ``FallbackCache()`` uses a :class:`MemoryStore` sized by the policy. One instance is
    used from one event loop (the sync transport runs its own loop thread; see
    ``seawall.client.cache``).
    """

    def __init__(
        self,
        store: Store | None = None,
        policy: CachePolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.policy = policy or CachePolicy()
        for name in self.policy.extractors:
            if name not in EXTRACTORS:
                known = ", ".join(EXTRACTORS)
                problem = f"is not a registered extractor; known: {known}"
                raise PolicyError("extractors", name, problem)
        self.clock = clock
        self.events = events or DEFAULT_BUS
        self.store: Store = store or MemoryStore(
            self.policy.max_bytes,
            max_entry_bytes=self.policy.max_entry_bytes,
            namespace=self.policy.namespace,
            clock=clock,
            events=self.events,
        )
        self.stats = CacheStats()
        self._inflight: set[str] = set()

    # -- keys -------------------------------------------------------------------------

    def key(self, request: RequestInfo) -> RequestKey:
        """The base key of ``request`` under this cache's policy."""
        p = self.policy
        return request_key(request, public=p.public, extractors=p.extractors, namespace=p.namespace)

    def _emit(self, event: Event) -> None:
        self.events.emit(event)

    # -- reading ----------------------------------------------------------------------

    async def lookup(self, request: RequestInfo) -> Hit | None:
        """The verified stored response for ``request``, or None (counted as a miss)."""
        if request.method.upper() not in ("GET", "HEAD"):
            return None
        rk = self.key(request)
        key = rk.base
        reader = await self.store.open_reader(key)
        if reader is not None and "vary_index" in reader[0]:
            names = tuple(str(n) for n in reader[0]["vary_index"])
            key = variant_key(rk.base, vary_values(request, names))
            reader = await self.store.open_reader(key)
        if reader is None:
            self.stats.misses += 1
            return None
        meta, chunks = reader
        hit = self._hit_from_meta(key, rk, meta)
        if hit is None:
            await self._corrupt(key, rk.url, "unreadable metadata")
            return None
        problem = await self._verify(hit, chunks)
        if problem is not None:
            await self._corrupt(key, rk.url, problem)
            return None
        return hit

    def _hit_from_meta(self, key: str, rk: RequestKey, meta: Meta) -> Hit | None:
        try:
            if meta.get("v") != _FORMAT or meta.get("digest") != rk.digest:
                return None
            freshness = Freshness.from_json(meta["freshness"])
            now = self.clock.wall()
            return Hit(
                key=key,
                url=rk.url,
                status=int(meta["status"]),
                headers=[(str(k), str(v)) for k, v in meta["headers"]],
                size=int(meta["size"]),
                sha256=str(meta["sha256"]),
                digest=rk.digest,
                freshness=freshness,
                state=evaluate(freshness, now),
                age=freshness.age(now),
                vary=tuple(meta.get("vary") or ()),
                meta=meta,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def _expected(self, hit: Hit) -> str:
        if hit.digest is not None:
            return hit.digest.partition(":")[2]
        return hit.sha256

    async def _verify(self, hit: Hit, chunks: AsyncIterator[bytes]) -> str | None:
        h = hashlib.sha256()
        size = 0
        try:
            async for chunk in chunks:
                h.update(chunk)
                size += len(chunk)
        except OSError as exc:
            return f"unreadable body: {exc}"
        if size != hit.size:
            return f"size {size} != recorded {hit.size}"
        if h.hexdigest() != self._expected(hit):
            return "digest mismatch" if hit.digest else "sha256 mismatch"
        return None

    async def _corrupt(self, key: str, url: str, reason: str) -> None:
        self.stats.corrupt += 1
        await self.store.delete(key)
        if self.events.active:
            self._emit(CacheCorrupt(at=self.clock.now(), url=url, reason=reason))

    async def body(self, hit: Hit) -> AsyncIterator[bytes]:
        """Stream the stored body, checking its hash again as it goes."""
        reader = await self.store.open_reader(hit.key)
        if reader is None:
            raise CacheCorruptError(f"cache entry for {hit.url} disappeared")
        h = hashlib.sha256()
        size = 0
        async for chunk in reader[1]:
            h.update(chunk)
            size += len(chunk)
            yield chunk
        if size != hit.size or h.hexdigest() != self._expected(hit):
            await self._corrupt(hit.key, hit.url, "changed while served")
            raise CacheCorruptError(f"cache entry for {hit.url} changed while served")

    def served(self, hit: Hit, *, reason: str = "fresh") -> list[tuple[str, str]]:
        """Count a served hit and return the headers to send (with Age and X-Seawall-Cache)."""
        if hit.immutable:
            label = "verified"
            self.stats.verified += 1
        elif hit.state is State.FRESH:
            label = "hit"
            self.stats.hits += 1
        else:
            label = "stale"
            self.stats.stale += 1
        if self.events.active:
            self._emit(
                CacheServed(
                    at=self.clock.now(), url=hit.url, state=label, age=hit.age, reason=reason
                )
            )
        headers = [(k, v) for k, v in hit.headers if k != "content-length"]
        headers.append(("content-length", str(hit.size)))
        headers.append(("age", str(int(hit.age)) if math.isfinite(hit.age) else "0"))
        headers.append((CACHE_HEADER, label))
        return headers

    # -- writing ----------------------------------------------------------------------

    async def recorder(
        self, request: RequestInfo, status: int, headers: Sequence[tuple[str, str]]
    ) -> Recorder | None:
        """A tee for this response, or None when it must not (or need not) be stored."""
        if not is_storable_request(request.method, request.headers):
            return None
        if not is_storable_response(status, headers):
            return None
        if not self.store.writable:
            return None
        length = next((v for k, v in headers if k.lower() == "content-length"), "")
        if length.isdigit() and int(length) > self.store.max_entry_bytes:
            return None  # would be dropped at the bound anyway: do not buffer it at all
        vary = parse_vary(", ".join(v for k, v in headers if k.lower() == "vary"))
        if vary is None:
            return None
        rk = self.key(request)
        key = variant_key(rk.base, vary_values(request, vary)) if vary else rk.base
        if key in self._inflight:
            self.stats.concurrent_skipped += 1  # one recording per key is enough
            return None
        self._inflight.add(key)
        try:
            writer = await self.store.open_writer(key)
        except Exception:
            self._inflight.discard(key)
            return None
        return Recorder(self, request, rk, key, vary, status, _clean_headers(headers), writer)

    def _meta(
        self,
        rk: RequestKey,
        status: int,
        headers: list[tuple[str, str]],
        vary: tuple[str, ...],
        size: int,
        sha256: str,
    ) -> Meta:
        p = self.policy
        fresh = freshness_for(
            headers,
            now_wall=self.clock.wall(),
            immutable=rk.digest is not None,
            default_fresh=p.default_fresh_seconds,
            max_stale=p.max_stale,
            stale_while_revalidate=p.stale_while_revalidate,
        )
        return {
            "v": _FORMAT,
            "url": rk.url,
            "status": status,
            "headers": [[k, v] for k, v in headers],
            "size": size,
            "sha256": sha256,
            "digest": rk.digest,
            "vary": list(vary),
            "freshness": fresh.to_json(),
        }

    async def _write_vary_index(self, base: str, vary: tuple[str, ...]) -> None:
        writer = await self.store.open_writer(base)
        await writer.commit({"v": _FORMAT, "vary_index": list(vary)})

    async def refresh(self, hit: Hit, headers: Sequence[tuple[str, str]]) -> Hit:
        """Apply a 304 Not Modified: new freshness, same (verified) body."""
        merged = {k: v for k, v in hit.headers}
        for k, v in _clean_headers(headers):
            if k not in _NOT_UPDATED_BY_304:
                merged[k] = v
        new_headers = list(merged.items())
        rk = RequestKey(base=hit.key, url=hit.url, digest=hit.digest, scope="")
        meta = self._meta(rk, hit.status, new_headers, hit.vary, hit.size, hit.sha256)
        self.stats.revalidated += 1
        if hit.key not in self._inflight and self.store.writable:
            self._inflight.add(hit.key)
            try:
                writer = await self.store.open_writer(hit.key)
                try:
                    async for chunk in self.body(hit):
                        await writer.write(chunk)
                except (CacheCorruptError, OSError):
                    await writer.abort()
                else:
                    await writer.commit(meta)
            finally:
                self._inflight.discard(hit.key)
        fresh = Freshness.from_json(meta["freshness"])
        now = self.clock.wall()
        return Hit(
            key=hit.key,
            url=hit.url,
            status=hit.status,
            headers=new_headers,
            size=hit.size,
            sha256=hit.sha256,
            digest=hit.digest,
            freshness=fresh,
            state=evaluate(fresh, now),
            age=fresh.age(now),
            vary=hit.vary,
            meta=meta,
        )


class Recorder:
    """The tee of one response into the store: ``feed`` chunks, then ``finish``/``abort``.

    Never raises for the cache's sake: store trouble only means the entry is not kept.
    """

    def __init__(
        self,
        cache: FallbackCache,
        request: RequestInfo,
        rk: RequestKey,
        key: str,
        vary: tuple[str, ...],
        status: int,
        headers: list[tuple[str, str]],
        writer: Writer,
    ) -> None:
        self._cache = cache
        self._request = request
        self._rk = rk
        self._key = key
        self._vary = vary
        self._status = status
        self._headers = headers
        self._writer = writer
        self._hash = hashlib.sha256()
        self._size = 0
        self._done = False
        length = next((v for k, v in headers if k == "content-length"), None)
        self._expected_size = int(length) if length and length.isdigit() else None

    @property
    def done(self) -> bool:
        return self._done

    async def feed(self, chunk: bytes) -> None:
        if self._done or not chunk:
            return
        self._hash.update(chunk)
        self._size += len(chunk)
        try:
            await self._writer.write(chunk)
        except Exception:
            await self.abort()

    async def finish(self) -> bool:
        """Commit if the body is complete and verified; True when the entry was kept."""
        if self._done:
            return False
        cache = self._cache
        try:
            reason = None
            actual = self._hash.hexdigest()
            if self._expected_size is not None and self._size != self._expected_size:
                reason = f"incomplete body: {self._size} of {self._expected_size} bytes"
            elif self._rk.digest is not None and f"sha256:{actual}" != self._rk.digest:
                reason = f"bytes hash to sha256:{actual}, not {self._rk.digest}"
            if reason is not None:
                cache.stats.rejected += 1
                if cache.events.active:
                    cache._emit(
                        CacheRejected(at=cache.clock.now(), url=self._rk.url, reason=reason)
                    )
                await self._writer.abort()
                return False
            meta = cache._meta(
                self._rk, self._status, self._headers, self._vary, self._size, actual
            )
            try:
                ok = await self._writer.commit(meta)
                if ok and self._vary:
                    await cache._write_vary_index(self._rk.base, self._vary)
            except Exception:
                return False
            if ok:
                cache.stats.stored += 1
                if cache.events.active:
                    cache._emit(
                        CacheStored(
                            at=cache.clock.now(),
                            url=self._rk.url,
                            size=self._size,
                            digest=self._rk.digest,
                        )
                    )
            return ok
        finally:
            self._done = True
            cache._inflight.discard(self._key)

    async def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._cache._inflight.discard(self._key)
        with contextlib.suppress(Exception):  # the store's trouble is not the caller's
            await self._writer.abort()
