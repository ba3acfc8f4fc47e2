"""Small metadata entries shared between workers in Redis; blobs stay in the local store.

Several workers behind one load balancer each keep their own fallback cache, so a manifest
that worker A fetched is no help to worker B when the registry fails. ``SharedMetaStore``
wraps the worker's own store (a :class:`DiskStore` for blobs, by default a
:class:`MemoryStore`) and also puts every small entry that is **not** a blob by digest (a
manifest by tag, an index page, a packument, a Vary index) into Redis, so any worker can
serve it: fresh, or stale when the upstream fails. A blob by digest is never shared: it is
large, and each worker verifies and keeps its own.

Bounded: an entry above ``max_entry_bytes`` (1 MiB) is not shared, and the entries in Redis
are kept under ``max_bytes`` (64 MiB), least recently written evicted first, by one Lua
script per write; every key has a TTL (``ttl``, 7 days, refreshed by each write), so an
idle namespace leaves nothing behind. Redis trouble never fails a request: a call that
errs or takes longer than ``timeout`` (0.25 s) counts against a breaker (the rate
limiter's storage breaker policy), and while it is open the store is local only. The
bytes read back from Redis are verified like any stored body (``trusted_bytes`` is
False), so a writer to Redis can delete entries, never make a worker serve wrong bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from seawall.breaker import CircuitBreaker, CircuitOpenError, Outcome
from seawall.cache.memory import MemoryStore
from seawall.cache.store import Meta, Reader, Store, StoreStats, Writer
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.policy.ratelimit import STORAGE_BREAKER

__all__ = ["SharedMetaStore"]

T = TypeVar("T")

SCHEMA = "v1"

# KEYS: entry, lru (zset key -> write time), sizes (hash key -> bytes), total (string)
# ARGV: key, meta, body, size, now, ttl seconds, max bytes
_PUT = """
local old = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], 'meta', ARGV[2], 'body', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
local total = redis.call('INCRBY', KEYS[4], tonumber(ARGV[4]) - old)
local evicted = 0
while total > tonumber(ARGV[7]) do
  local oldest = redis.call('ZPOPMIN', KEYS[2])
  if #oldest == 0 then break end
  local size = tonumber(redis.call('HGET', KEYS[3], oldest[1]) or '0')
  redis.call('HDEL', KEYS[3], oldest[1])
  redis.call('DEL', KEYS[5] .. oldest[1])
  total = redis.call('DECRBY', KEYS[4], size)
  evicted = evicted + 1
end
for i = 2, 4 do redis.call('EXPIRE', KEYS[i], ARGV[6]) end
return evicted
"""

# KEYS: entry, lru, sizes, total; ARGV: key
_DELETE = """
local size = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if size > 0 then redis.call('DECRBY', KEYS[4], size) end
return size
"""


class SharedMetaStore(Store):
    """The local store for everything, plus small non-blob entries shared in Redis."""

    blocking = True  # Redis calls wait on the network: the async faces run them in threads
    trusted_bytes = False  # bytes read back from Redis are hashed again

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        local: Store | None = None,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        max_entry_bytes: int = 1024 * 1024,
        ttl: float = 7 * 24 * 3600,
        timeout: float = 0.25,
        namespace: str = "seawall",
        client: Any = None,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        if max_bytes < 1 or max_entry_bytes < 1 or ttl < 1 or timeout <= 0:
            raise ValueError("max_bytes, max_entry_bytes and ttl >= 1; timeout > 0")
        if client is None:
            try:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry
            except ImportError as exc:  # pragma: no cover - exercised without the extra
                raise ImportError(
                    "SharedMetaStore needs redis: pip install 'seawall[redis]'"
                ) from exc
            client = redis.Redis.from_url(  # no retries: a slow Redis costs one timeout
                url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),
            )
        self.local = local if local is not None else MemoryStore(namespace=namespace)
        self.namespace = namespace
        self.max_bytes = self.local.max_bytes
        self.shared_max_bytes = max_bytes
        self.shared_max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.ttl = int(ttl)
        self.stats = self.local.stats  # what the worker's own store did
        self.shared_stats = StoreStats()  # Redis: commits, evictions, failed calls, corrupt
        self._redis = client
        self._prefix = f"seawall:{SCHEMA}:cache:{namespace}:"
        self._put = client.register_script(_PUT)
        self._delete = client.register_script(_DELETE)
        self._clock = clock
        # named by host and port only: a URL may carry a password, and the name reaches
        # events, logs and metric labels
        where = urlsplit(url)
        self._breaker = CircuitBreaker(
            f"cache-redis {where.hostname}:{where.port or 6379}",
            STORAGE_BREAKER,
            clock=clock,
            events=events,
        )

    # -- Redis calls, each behind the breaker ------------------------------------------

    def _keys(self, key: str) -> list[str]:
        p = self._prefix
        return [f"{p}e:{key}", f"{p}lru", f"{p}sizes", f"{p}total", f"{p}e:"]

    def _shared(self, call: Callable[[], T]) -> T | None:
        """``call()`` on Redis, or None when the breaker is open or Redis failed."""
        try:
            permit = self._breaker.admit()
        except CircuitOpenError:
            return None
        started = self._clock.now()
        try:
            result = call()
        except Exception:
            self._breaker.record(permit, Outcome.FAILURE, self._clock.now() - started)
            self.shared_stats.write_errors += 1
            return None
        self._breaker.record(permit, Outcome.SUCCESS, self._clock.now() - started)
        return result

    def _share(self, key: str, meta: Meta, body: bytes) -> bool:
        if len(body) > self.shared_max_entry_bytes:
            return False
        payload = json.dumps({"key": key, "meta": meta}, separators=(",", ":"))
        args = [key, payload, body, len(body), self._clock.wall(), self.ttl, self.shared_max_bytes]
        evicted = self._shared(lambda: self._put(keys=self._keys(key), args=args))
        if evicted is None:
            return False
        self.shared_stats.commits += 1
        self.shared_stats.evictions += int(evicted)
        return True

    def _fetch(self, key: str) -> tuple[Meta, bytes] | None:
        found = self._shared(lambda: self._redis.hmget(self._keys(key)[0], "meta", "body"))
        if not found or found[0] is None or found[1] is None:
            return None
        try:
            record = json.loads(found[0])
            meta = record["meta"]
            if record["key"] != key or not isinstance(meta, dict):
                raise ValueError("stored under another key")
            body = bytes(found[1])
            if not _intact(meta, body):
                raise ValueError("bytes do not match the entry's hash")
        except (ValueError, KeyError, TypeError):
            self.shared_stats.corrupt += 1
            return None
        return meta, body

    # -- the Store interface -------------------------------------------------------------

    def open_writer(self, key: str) -> Writer:
        return _SharedWriter(self, key, self.local.open_writer(key))

    def open_reader(self, key: str) -> Reader | None:
        found = self.local.open_reader(key)
        if found is not None:
            return found
        shared = self._fetch(key)
        if shared is None:
            return None
        meta, body = shared
        return meta, iter((body,) if body else ())

    def has(self, key: str) -> bool:
        return self.local.has(key)  # answered without waiting: False when only Redis has it

    def read_meta(self, key: str) -> Meta | None:
        meta = self.local.read_meta(key)
        if meta is not None:
            return meta
        shared = self._fetch(key)
        return None if shared is None else shared[0]

    def replace_meta(self, key: str, meta: Meta) -> bool:
        """Local only: a shared entry is written again whole (the cache copies the body)."""
        return self.local.replace_meta(key, meta) and self._fetch(key) is None

    def delete(self, key: str) -> None:
        self.local.delete(key)
        self._shared(lambda: self._delete(keys=self._keys(key)[:4], args=[key]))

    def keys(self) -> list[str]:
        shared = self._shared(lambda: self._redis.zrange(self._keys("")[1], 0, -1)) or []
        names = {k.decode() if isinstance(k, bytes) else str(k) for k in shared}
        return sorted(names | set(self.local.keys()))

    @property
    def size_bytes(self) -> int:
        return self.local.size_bytes

    @property
    def shared_bytes(self) -> int:
        """Bytes of entries in Redis (0 when it cannot be asked)."""
        total = self._shared(lambda: self._redis.get(self._keys("")[3]))
        return int(total or 0)

    @property
    def max_entry_bytes(self) -> int:
        return max(self.local.max_entry_bytes, self.shared_max_entry_bytes)

    @property
    def writable(self) -> bool:
        return self.local.writable

    def close(self) -> None:
        self.local.close()
        self._redis.close()


class _SharedWriter(Writer):
    """Writes through to the local store and keeps a copy of a small body to share."""

    def __init__(self, store: SharedMetaStore, key: str, local: Writer) -> None:
        self._store = store
        self._key = key
        self._local = local
        self._chunks: list[bytes] | None = []
        self._size = 0

    def write(self, chunk: bytes) -> bool:
        if self._chunks is not None:
            self._size += len(chunk)
            if self._size > self._store.shared_max_entry_bytes:
                self._chunks = None  # too big to share: stop holding it
            else:
                self._chunks.append(chunk)
        return self._local.write(chunk)

    def flush(self) -> None:
        self._local.flush()

    def commit(self, meta: Meta) -> bool:
        kept = self._local.commit(meta)
        if self._chunks is None or meta.get("digest"):
            return kept  # a blob by digest, or too big: this worker's own
        shared = self._store._share(self._key, meta, b"".join(self._chunks))
        self._chunks = None
        return kept or shared

    def abort(self) -> None:
        self._chunks = None
        self._local.abort()


def _intact(meta: Meta, body: bytes) -> bool:
    """Whether ``body`` is the one ``meta`` describes, checked before a byte is served
    (a response must not start with bytes that fail their hash at the end)."""
    content_hash = meta.get("hash")
    if content_hash is None:
        return not body  # a Vary index: metadata only
    algorithm, _, value = str(content_hash).partition(":")
    if algorithm not in ("sha256", "sha512") or meta.get("size") != len(body):
        return False
    return hashlib.new(algorithm, body).hexdigest() == value
