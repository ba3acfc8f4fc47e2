"""Rate-limit counters on Redis: every rate of a request decided in one Lua script.

Why not the Redis storage of ``limits`` (5.8) for the distributed mode (each shortfall has a
test in ``tests/test_distributed_ratelimit.py``):

* one request costs several round trips: ``hit`` then ``get_window_stats`` per rate, and
  *test, then hit* across several rates, which is not atomic (a concurrent request slips
  in between);
* its key layout does not carry the strategy: a moving window (a list) and a fixed window
  (a string) under one name answer ``WRONGTYPE`` to each other, so two app versions with
  different strategies on one Redis fail open on every request;
* redis-py's default async pool raises "Too many connections" at once when a burst
  exceeds it, and each such request fails open;
* its moving window stamps entries with each client's own ``time.time()``; workers on
  hosts whose clocks differ disagree about the window.

:class:`RedisLimitStorage` keeps ``limits`` for what it does well (parsing rates, the
strategies' semantics, the in-memory twin) and decides on Redis with one ``EVALSHA`` per
request: the script tests every rate and hits them all only when all admit, atomically,
and answers the state the ``RateLimit`` headers need. A burst *waits* for one of a bounded
set of connections (``slots``; :class:`~seawall.ratelimit.RateLimiter` bounds the wait)
instead of failing.
Time is Redis's own clock (``TIME`` in the script), the one clock every worker shares;
a test may inject a driven clock instead.

Keys are ``seawall:v1:<strategy>:<rule>:<amount>/<window>:{<client key>}``: the schema
version and the strategy are part of the name, so two deployments side by side never read
each other's data as the wrong type, and the client key is a Redis Cluster hash tag, so
every rate of one client key lives in one slot. Every key carries a TTL of at most its
window (twice for the sliding window counter): an idle client leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from seawall.clock import Clock

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["SCHEMA", "RedisLimitStorage"]

SCHEMA = "v1"
"""Version of the key layout and the scripts' data; bump it when either changes."""

DEFAULT_MAX_CONNECTIONS = 32
"""Connections per process; a burst queues for one of them (one script is ~0.1 ms)."""

# --- the scripts --------------------------------------------------------------------------
# ARGV: now_ms ('' = Redis TIME), cost, then per rate: limit, window_ms. KEYS: one per rate.
# Answer: refused {0, i, remaining, retry_ms}; admitted {1, 0, remaining_1, reset_ms_1, ...}.
# Lua numbers become integers on the way out, so times are whole milliseconds (rounded up).

_PRELUDE = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
else
  now = tonumber(ARGV[1])
end
local cost = tonumber(ARGV[2])
local n = #KEYS
local function ms(x) if x < 0 then return 0 end return math.ceil(x) end
local function stamp(x) return string.format('%.3f', x) end
"""

_FIXED = (
    _PRELUDE
    + """
local starts, counts = {}, {}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local state = redis.call('HMGET', KEYS[i], 's', 'c')
  local s, c = tonumber(state[1]), tonumber(state[2]) or 0
  if s == nil or now >= s + window then s = nil; c = 0 end
  if c + cost > limit then
    return {0, i, math.max(0, limit - c), ms((s or now) + window - now)}
  end
  starts[i], counts[i] = s, c
end
local out = {1, 0}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local s = starts[i]
  if s == nil then
    s = now
    redis.call('HSET', KEYS[i], 's', stamp(now), 'c', cost)
    redis.call('PEXPIRE', KEYS[i], ms(window))
  else
    redis.call('HINCRBY', KEYS[i], 'c', cost)
  end
  out[#out + 1] = limit - counts[i] - cost
  out[#out + 1] = ms(s + window - now)
end
return out
"""
)

_MOVING = (
    _PRELUDE
    + """
local counts, oldest = {}, {}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local key, cutoff = KEYS[i], now - window
  -- Entries are newest first; drop what left the window from the tail (each entry once).
  local last = redis.call('LINDEX', key, -1)
  while last and tonumber(last) < cutoff do
    redis.call('RPOP', key)
    last = redis.call('LINDEX', key, -1)
  end
  local count = redis.call('LLEN', key)
  local first = last and tonumber(last) or now
  if count + cost > limit then
    return {0, i, math.max(0, limit - count), ms(first + window - now)}
  end
  counts[i], oldest[i] = count, first
end
local out = {1, 0}
local entries = {}
for j = 1, math.min(cost, 1000) do entries[j] = stamp(now) end
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local left = cost
  while left > 0 do  -- unpack() has a stack limit: push at most 1000 at a time
    local k = math.min(left, 1000)
    redis.call('LPUSH', KEYS[i], unpack(entries, 1, k))
    left = left - k
  end
  redis.call('PEXPIRE', KEYS[i], ms(window))
  out[#out + 1] = limit - counts[i] - cost
  out[#out + 1] = ms(oldest[i] + window - now)
end
return out
"""
)

_SLIDING = (
    _PRELUDE
    + """
-- One hash per rate: w = index of the current window, c = its count, p = the previous one's.
local function state(key, window)
  local idx = math.floor(now / window)
  local h = redis.call('HMGET', key, 'w', 'c', 'p')
  local w, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if w == nil then c, p = 0, 0
  elseif w == idx - 1 then p, c = c, 0
  elseif w ~= idx then c, p = 0, 0 end
  local into = now - idx * window  -- ms into the current window
  local prev_ttl = window - into
  return idx, c, p, p * prev_ttl / window + c, prev_ttl
end
local function reset(c, p, window, prev_ttl)
  if c == 0 and p == 0 then return 0 end
  local r = math.huge
  if p > 0 then r = math.fmod(prev_ttl, window / p) end
  if c > 0 then r = math.min(r, prev_ttl) end
  return ms(r)
end
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local idx, c, p, weighted, prev_ttl = state(KEYS[i], window)
  if cost > limit then  -- never admitted: the whole window, as the memory storage says
    return {0, i, math.max(0, limit - math.floor(weighted)), ms(window)}
  end
  if math.floor(weighted) + cost > limit then
    return {0, i, math.max(0, limit - math.floor(weighted)), reset(c, p, window, prev_ttl)}
  end
end
local out = {1, 0}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local idx, c, p, weighted, prev_ttl = state(KEYS[i], window)
  c = c + cost
  redis.call('HSET', KEYS[i], 'w', idx, 'c', c, 'p', p)
  redis.call('PEXPIRE', KEYS[i], ms(2 * window))
  out[#out + 1] = math.max(0, limit - math.floor(weighted + cost))
  out[#out + 1] = reset(c, p, window, prev_ttl)
end
return out
"""
)

_BUCKET = (
    _PRELUDE
    + """
-- GCRA: the key holds the theoretical arrival time (ms); the bucket is full when it is <= now.
local tats = {}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local interval = window / limit
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + cost * interval
  if new_tat - now > window + 1e-3 then  -- a microsecond of slack for rounding
    local left = math.max(0, math.floor((window - (tat - now)) / interval + 1e-6))
    return {0, i, left, ms(new_tat - window - now)}
  end
  tats[i] = new_tat
end
local out = {1, 0}
for i = 1, n do
  local limit, window = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local interval = window / limit
  local new_tat = tats[i]
  redis.call('SET', KEYS[i], stamp(new_tat), 'PX', math.max(1, ms(new_tat - now)))
  out[#out + 1] = math.max(0, math.floor((window - (new_tat - now)) / interval + 1e-6))
  out[#out + 1] = ms(new_tat - now)
end
return out
"""
)

SCRIPTS: dict[str, str] = {
    "fixed-window": _FIXED,
    "moving-window": _MOVING,
    "sliding-window-counter": _SLIDING,
    "token-bucket": _BUCKET,
}


def redis_client(
    uri: str, *, timeout: float, max_connections: int = DEFAULT_MAX_CONNECTIONS
) -> Redis:
    """An asyncio Redis client for ``uri`` with a *blocking* pool and no client retries.

    ``timeout`` bounds the socket connect, every read, and the wait for a free connection.
    redis-py's own retries (three, with back-off, by default) are off: a caller that must
    decide in milliseconds decides on the first failure. ``max_connections`` in the URI's
    query wins over the argument.
    """
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    uri = uri.removeprefix("async+")
    pool = BlockingConnectionPool.from_url(
        uri,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)  # the client owns the pool: aclose() disconnects it


class RedisLimitStorage:
    """Counters for every seawall strategy on one Redis (see the module doc).

    ``clock``: None (the default) takes time from Redis itself, the clock all workers
    share; a clock makes the scripts use ``clock.wall()`` instead (tests drive windows).
    """

    def __init__(
        self,
        uri: str,
        *,
        timeout: float = 0.25,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        clock: Clock | None = None,
        client: Redis | None = None,
    ) -> None:
        self.uri = uri
        self.client = (
            client
            if client is not None
            else redis_client(uri, timeout=timeout, max_connections=max_connections)
        )
        self.clock = clock
        self._scripts = {name: self.client.register_script(src) for name, src in SCRIPTS.items()}
        self.round_trips = 0
        # One slot per pooled connection: callers queue here (with their own deadline and a
        # look at the breaker afterwards) instead of inside redis-py's pool.
        pool_size = getattr(self.client.connection_pool, "max_connections", max_connections)
        self.slots = asyncio.Semaphore(pool_size)

    @staticmethod
    def key(strategy: str, rule: str, amount: int, window: int, client_key: str) -> str:
        """The Redis key of one rate of one rule for one client key."""
        return f"seawall:{SCHEMA}:{strategy}:{rule}:{amount}/{window}:{{{client_key}}}"

    async def decide(
        self,
        strategy: str,
        keys: Sequence[str],
        limits: Sequence[int],
        windows: Sequence[float],
        cost: int = 1,
    ) -> tuple[bool, int, list[tuple[int, float]]]:
        """One round trip: test every rate, hit all only when all admit (atomic on Redis).

        Same answer as :meth:`BoundedMemoryStorage.decide
        <seawall.storage.BoundedMemoryStorage.decide>`: ``(admitted, index, states)`` with
        times in seconds.
        """
        now = "" if self.clock is None else f"{self.clock.wall() * 1000.0:.3f}"
        args: list[Any] = [now, cost]
        for limit, window in zip(limits, windows, strict=True):
            args.append(limit)
            args.append(int(window * 1000))
        self.round_trips += 1
        raw = await self._scripts[strategy](keys=list(keys), args=args)
        if not raw[0]:
            return False, int(raw[1]) - 1, [(int(raw[2]), int(raw[3]) / 1000.0)]
        return (
            True,
            -1,
            [(int(raw[i]), int(raw[i + 1]) / 1000.0) for i in range(2, len(raw), 2)],
        )

    async def clear(self, keys: Sequence[str]) -> None:
        """Delete the given counters (an operator's reset)."""
        if keys:
            await self.client.delete(*keys)

    async def check(self) -> bool:
        """True when Redis answers PING."""
        return bool(await self.client.ping())

    async def aclose(self) -> None:
        """Close every connection of the pool (lifespan shutdown)."""
        await self.client.aclose()

    def __repr__(self) -> str:
        return f"RedisLimitStorage({_redact(self.uri)!r})"


def _redact(uri: str) -> str:
    """The URI without a password, for logs."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
