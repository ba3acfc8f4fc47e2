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

:class:`FallbackCache` holds the state (policy, store, counters, recordings in flight) and
the decisions, without I/O. Its I/O is written once, async, in ``seawall/cache/_async/io.py``
and generated for sync callers: ``cache.aio`` and ``cache.sync`` are the two views of one
cache, so an async and a sync face can share it. ``await cache.lookup(...)`` and the other
async methods here are ``cache.aio``'s.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from seawall.cache.freshness import (
    Freshness,
    State,
    content_length,
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
from seawall.cache.store import Meta, Store
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError, SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy.cache import CachePolicy
from seawall.protocol import CACHE_HEADER

if TYPE_CHECKING:
    from seawall.cache._async.io import AsyncCacheIO, AsyncCacheRecorder
    from seawall.cache._sync.io import SyncCacheIO

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
    "Recording",
    "vary_index_meta",
]

_FORMAT = 2  # 2: the content hash names its algorithm (sha512 digests)
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
    already_stored: int = 0


@dataclass(slots=True)
class Hit:
    """A stored response that passed verification, with its current usability."""

    key: str
    url: str
    status: int
    headers: list[tuple[str, str]]
    size: int
    content_hash: str  # "algo:hex" the stored body must hash to (the digest, for a blob)
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

    ``FallbackCache()`` uses a :class:`MemoryStore` sized by the policy. One instance
    serves the async faces through :attr:`aio` and the sync faces (threads, no event loop)
    through :attr:`sync`; both use the same store.
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
        self._inflight_lock = threading.Lock()
        self._aio: AsyncCacheIO | None = None
        self._sync: SyncCacheIO | None = None

    # -- keys -------------------------------------------------------------------------

    def key(self, request: RequestInfo) -> RequestKey:
        """The base key of ``request`` under this cache's policy."""
        p = self.policy
        return request_key(
            request,
            public=p.public,
            extractors=p.extractors,
            namespace=p.namespace,
            credential_headers=p.credential_headers,
        )

    def _emit(self, event: Event) -> None:
        self.events.emit(event)

    # -- views ----------------------------------------------------------------------

    @property
    def aio(self) -> AsyncCacheIO:
        """The async I/O of this cache (blocking stores run in worker threads)."""
        io = self._aio
        if io is None:
            from seawall.cache._async.io import AsyncCacheIO

            io = self._aio = AsyncCacheIO(self)
        return io

    @property
    def sync(self) -> SyncCacheIO:
        """The sync I/O of this cache, for sync faces (calls the store directly)."""
        io = self._sync
        if io is None:
            from seawall.cache._sync.io import SyncCacheIO

            io = self._sync = SyncCacheIO(self)
        return io

    async def lookup(self, request: RequestInfo, rk: RequestKey | None = None) -> Hit | None:
        """The verified stored response for ``request``, or None (counted as a miss)."""
        return await self.aio.lookup(request, rk)

    def body(self, hit: Hit) -> AsyncIterator[bytes]:
        """Stream the stored body, checking its hash again as it goes."""
        return self.aio.body(hit)

    async def recorder(
        self,
        request: RequestInfo,
        status: int,
        headers: Sequence[tuple[str, str]],
        rk: RequestKey | None = None,
    ) -> AsyncCacheRecorder | None:
        """A tee for this response, or None when it must not (or need not) be stored."""
        return await self.aio.recorder(request, status, headers, rk)

    async def refresh(self, hit: Hit, headers: Sequence[tuple[str, str]]) -> Hit:
        """Apply a 304 Not Modified: new freshness, same (verified) body."""
        return await self.aio.refresh(hit, headers)

    # -- decisions (no I/O) ------------------------------------------------------------

    def hit_from_meta(self, key: str, rk: RequestKey, meta: Meta) -> Hit | None:
        """The stored entry as a :class:`Hit`, or None when its metadata is unusable."""
        try:
            if meta.get("v") != _FORMAT or meta.get("digest") != rk.digest:
                return None
            if rk.digest is not None and meta.get("hash") != rk.digest:
                return None
            freshness = Freshness.from_json(meta["freshness"])
            now = self.clock.wall()
            return Hit(
                key=key,
                url=rk.url,
                status=int(meta["status"]),
                headers=[(str(k), str(v)) for k, v in meta["headers"]],
                size=int(meta["size"]),
                content_hash=str(meta["hash"]),
                digest=rk.digest,
                freshness=freshness,
                state=evaluate(freshness, now),
                age=freshness.age(now),
                vary=tuple(meta.get("vary") or ()),
                meta=meta,
            )
        except (KeyError, TypeError, ValueError):
            return None

    @staticmethod
    def hasher(content_hash: str) -> Any:
        """A new hash object of the algorithm ``content_hash`` (``algo:hex``) names."""
        return hashlib.new(content_hash.partition(":")[0])

    def corrupt(self, url: str, reason: str) -> None:
        """Count an entry that failed verification (the caller deletes it)."""
        self.stats.corrupt += 1
        if self.events.active:
            self._emit(CacheCorrupt(at=self.clock.now(), url=url, reason=reason))

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

    # -- writing (decisions) ------------------------------------------------------------

    def holds(self, rk: RequestKey) -> bool:
        """A verified copy of this digest-addressed blob is stored: an answer for it needs
        no hashing and no copy (checked without blocking; False when it cannot tell)."""
        return rk.digest is not None and self.store.has(rk.base)

    def plan_recording(
        self,
        request: RequestInfo,
        status: int,
        headers: Sequence[tuple[str, str]],
        rk: RequestKey | None = None,
    ) -> Recording | None:
        """What to record for this response, or None when it must not (or need not) be
        stored. Claims the key: only one recording per key runs at a time."""
        if not is_storable_request(request.method, request.headers):
            return None
        if rk is None:
            rk = self.key(request)
        if self.holds(rk):
            self.stats.already_stored += 1  # the same bytes, already verified: nothing to do
            return None
        if not rk.cacheable:  # a digest the cache cannot verify, or a URL that won't parse
            self.rejected(rk.url, "the URL names a digest the cache cannot verify, or is malformed")
            return None
        if not is_storable_response(status, headers):
            return None
        if not self.store.writable:
            return None
        length = content_length(headers)
        if length is not None and length > self.store.max_entry_bytes:
            return None  # would be dropped at the bound anyway: do not buffer it at all
        vary = parse_vary(", ".join(v for k, v in headers if k.lower() == "vary"))
        if vary is None:
            return None
        key = variant_key(rk.base, vary_values(request, vary)) if vary else rk.base
        if not self.claim(key):
            self.stats.concurrent_skipped += 1  # one recording per key is enough
            return None
        return Recording(rk, key, vary, status, _clean_headers(headers))

    def claim(self, key: str) -> bool:
        """Start the one recording of ``key``; False when one is already running."""
        with self._inflight_lock:
            if key in self._inflight:
                return False
            self._inflight.add(key)
            return True

    def release(self, key: str) -> None:
        with self._inflight_lock:
            self._inflight.discard(key)

    def unchanged(self, recording: Recording, stored: Meta | None) -> Meta | None:
        """New metadata for the stored entry when the response's validators say its body
        is the one stored (a strong ETag, Docker-Content-Digest, or Last-Modified with the
        same length): the entry is refreshed without copying a byte. None otherwise."""
        if stored is None or recording.rk.digest is not None:
            return None
        try:
            if stored.get("v") != _FORMAT or int(stored["status"]) != recording.status:
                return None
            old = {str(k): str(v) for k, v in stored["headers"]}
            size, content_hash = int(stored["size"]), str(stored["hash"])
        except (KeyError, TypeError, ValueError):
            return None
        new = dict(recording.headers)
        same = False
        for name in ("etag", "docker-content-digest"):
            value = new.get(name)
            if value and not value.startswith("W/") and old.get(name) == value:
                same = True
        modified, length = new.get("last-modified"), new.get("content-length")
        if modified and old.get("last-modified") == modified and length == str(size):
            same = True
        if not same:
            return None
        r = recording
        return self.meta_for(r.rk, r.status, r.headers, r.vary, size, content_hash)

    def judge_recording(self, recording: Recording, size: int, actual: str) -> str | None:
        """Why a finished recording must not be kept (incomplete, wrong digest), or None;
        ``actual`` is the body's hash as ``algo:hex``."""
        expected = recording.expected_size
        if expected is not None and size != expected:
            return f"incomplete body: {size} of {expected} bytes"
        digest = recording.rk.digest
        if digest is not None and actual != digest:
            return f"bytes hash to {actual}, not {digest}"
        return None

    def rejected(self, url: str, reason: str) -> None:
        self.stats.rejected += 1
        if self.events.active:
            self._emit(CacheRejected(at=self.clock.now(), url=url, reason=reason))

    def stored(self, url: str, size: int, digest: str | None) -> None:
        self.stats.stored += 1
        if self.events.active:
            self._emit(CacheStored(at=self.clock.now(), url=url, size=size, digest=digest))

    def refreshed(self, hit: Hit, headers: Sequence[tuple[str, str]]) -> Hit:
        """The hit after a 304 Not Modified: merged headers, new freshness, same body."""
        merged = {k: v for k, v in hit.headers}
        for k, v in _clean_headers(headers):
            if k not in _NOT_UPDATED_BY_304:
                merged[k] = v
        new_headers = list(merged.items())
        rk = RequestKey(base=hit.key, url=hit.url, digest=hit.digest, scope="")
        meta = self.meta_for(rk, hit.status, new_headers, hit.vary, hit.size, hit.content_hash)
        self.stats.revalidated += 1
        fresh = Freshness.from_json(meta["freshness"])
        now = self.clock.wall()
        return Hit(
            key=hit.key,
            url=hit.url,
            status=hit.status,
            headers=new_headers,
            size=hit.size,
            content_hash=hit.content_hash,
            digest=hit.digest,
            freshness=fresh,
            state=evaluate(fresh, now),
            age=fresh.age(now),
            vary=hit.vary,
            meta=meta,
        )

    def meta_for(
        self,
        rk: RequestKey,
        status: int,
        headers: list[tuple[str, str]],
        vary: tuple[str, ...],
        size: int,
        content_hash: str,
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
            "hash": content_hash,
            "digest": rk.digest,
            "vary": list(vary),
            "freshness": fresh.to_json(),
        }


@dataclass(slots=True)
class Recording:
    """One response being recorded: its key, what was promised, the headers to keep."""

    rk: RequestKey
    key: str
    vary: tuple[str, ...]
    status: int
    headers: list[tuple[str, str]]
    expected_size: int | None = field(init=False)
    algorithm: str = field(init=False)  # of the content hash: the digest's, else sha256

    def __post_init__(self) -> None:
        self.expected_size = content_length(self.headers)
        self.algorithm = self.rk.digest.partition(":")[0] if self.rk.digest else "sha256"


def vary_index_meta(vary: tuple[str, ...]) -> Meta:
    """The entry at a base key that says which headers select the variant."""
    return {"v": _FORMAT, "vary_index": list(vary)}
