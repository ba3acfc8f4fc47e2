"""Circuit-breaker state shared across processes through Redis, off the request path.

Every worker keeps deciding from its own :class:`~seawall.breaker.CircuitBreaker` (no I/O
in ``admit``/``record``); :class:`SharedBreakerState` only *moves* decisions between
processes in the background:

* **A trip anywhere opens it everywhere.** A local trip is written to one Redis hash per
  host (``seawall:v1:breaker:<namespace>:{<host>}``) by a Lua script that bumps the
  host's *epoch* and publishes it; every other worker receives the message (pub/sub, a
  few milliseconds) and opens its own breaker for the remaining period
  (``apply_remote``). After a reconnect a worker re-reads every host it knows, so a
  missed message costs at most that.
* **Half-open probes are limited across all workers.** The breakers are *gated*: when a
  worker's open period ends, its breaker admits no probe until this module claims the
  epoch's probes in Redis. The first worker to claim gets all ``half_open_probes`` for a
  lease of ``probe_timeout``; the others stay half-open, refusing, until the prober
  publishes the result: its probes closed the breaker (``close`` -> all close) or one
  failed (a new trip -> all open). A prober that dies loses its lease and another claims.
* **Redis down or slow changes nothing on the request path.** Writes and reads are queued
  and bounded by a timeout; when a claim cannot be made, the worker grants itself the
  probes (each process then probes on its own, as without sharing).

aiobreaker's ``CircuitRedisStorage`` is not used: it calls a synchronous Redis client
from inside ``call_async``, two blocking round trips on the event loop per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from seawall.breaker import BreakerRegistry, BreakerState, BreakerStateChanged, CircuitBreaker
from seawall.redis_storage import SCHEMA, redis_client

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["SharedBreakerState"]

log = logging.getLogger("seawall.shared_breaker")

# KEYS[1] = the host's hash. Fields: state (open|closed), epoch, until (ms, Redis TIME),
# owner (the process holding the probes), lease (ms). Every write refreshes the TTL.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local h = redis.call('HMGET', KEYS[1], 'state', 'epoch', 'until', 'owner', 'lease')
local state, epoch = h[1] or 'closed', tonumber(h[2]) or 0
local till, owner, lease = tonumber(h[3]) or 0, h[4] or '', tonumber(h[5]) or 0
"""

# ARGV: open_ms, origin, ttl_ms, channel, host. A trip: unless already open for longer.
_TRIP = (
    _PRELUDE
    + """
local open_ms = tonumber(ARGV[1])
if state == 'open' and till > now then
  return {0, epoch, till - now}
end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'state', 'open', 'epoch', epoch, 'until', now + open_ms,
           'owner', '', 'lease', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local message = ARGV[5] .. '\\n' .. epoch .. '\\nopen\\n' .. open_ms .. '\\n' .. ARGV[2]
redis.call('PUBLISH', ARGV[4], message)
return {1, epoch, open_ms}
"""
)

# ARGV: origin, lease_ms, ttl_ms. The epoch's probes: {1, epoch} granted, {0, wait_ms}
# someone else holds them, {2, epoch, remaining_ms} still open, {3, epoch} closed.
_CLAIM = (
    _PRELUDE
    + """
if state ~= 'open' then return {3, epoch} end
if till > now + 50 then return {2, epoch, till - now} end
if owner ~= '' and owner ~= ARGV[1] and lease > now then return {0, lease - now} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease', now + tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, epoch}
"""
)

# ARGV: origin, epoch, ttl_ms, channel, host. The prober's probes succeeded: close.
_CLOSE = (
    _PRELUDE
    + """
if state ~= 'open' or epoch ~= tonumber(ARGV[2]) then return {0, epoch} end
if owner ~= '' and owner ~= ARGV[1] then return {0, epoch} end
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'state', 'closed', 'epoch', epoch, 'until', 0, 'owner', '')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\\n' .. epoch .. '\\nclosed\\n0\\n' .. ARGV[1])
return {1, epoch}
"""
)

# No ARGV: the state as {state, epoch, remaining_ms}, for a resync.
_READ = (
    _PRELUDE
    + """
return {state, epoch, math.max(0, till - now)}
"""
)


class SharedBreakerState:
    """Share the breakers of ``registry`` with every process using the same Redis namespace.

    ``async with SharedBreakerState(registry, "redis://..."):`` (or ``await start()`` /
    ``await aclose()``, e.g. in an ASGI lifespan) on the event loop of the process. The
    registry keeps working while Redis is away; only the sharing pauses.
    """

    def __init__(
        self,
        registry: BreakerRegistry,
        url: str,
        *,
        namespace: str = "default",
        timeout: float = 0.5,
        client: Redis | None = None,
    ) -> None:
        self.registry = registry
        self.url = url
        self.namespace = namespace
        self.timeout = timeout
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.channel = f"seawall:{SCHEMA}:breaker:{namespace}"
        self._client = client
        self._queue: asyncio.Queue[tuple[str, BreakerStateChanged]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._epochs: dict[str, int] = {}  # host -> last epoch applied or written
        self._claimed: dict[str, int] = {}  # host -> epoch whose probes this process holds
        self._listening = asyncio.Event()
        self.published = 0  # trips and closes this process wrote
        self.applied = 0  # remote states applied to local breakers
        self.subscriptions = 0  # successful (re)subscriptions

    def key(self, host: str) -> str:
        return f"seawall:{SCHEMA}:breaker:{self.namespace}:{{{host}}}"

    @property
    def _ttl_ms(self) -> int:
        p = self.registry.policy
        return int(1000 * (2 * p.max_open_duration + p.probe_timeout + 60))

    # -- life cycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Attach to the registry and start the background tasks; waits until subscribed."""
        if self._tasks:
            return
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        if self._client is None:
            self._client = redis_client(self.url, timeout=self.timeout, max_connections=4)
        client = self._client
        self._scripts = {
            name: client.register_script(src)
            for name, src in (
                ("trip", _TRIP),
                ("claim", _CLAIM),
                ("close", _CLOSE),
                ("read", _READ),
            )
        }
        self.registry.add_listener(self._on_change)
        self.registry.gate_probes(True)
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="seawall-breaker-writer"),
            asyncio.create_task(self._listen_loop(), name="seawall-breaker-listener"),
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=max(1.0, 4 * self.timeout))

    async def aclose(self) -> None:
        """Stop the tasks, close the connections; the breakers go on locally (ungated)."""
        self.registry.gate_probes(False)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
        self._loop = None

    async def __aenter__(self) -> SharedBreakerState:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- local changes -> Redis ---------------------------------------------------------

    def _on_change(self, breaker: CircuitBreaker, event: BreakerStateChanged) -> None:
        """Runs on whatever thread changed the breaker: only hand the event to the loop."""
        if event.reason.startswith("remote"):
            return  # it came from Redis: do not echo it back
        loop, queue = self._loop, self._queue
        if loop is None or queue is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, (breaker.name, event))

    async def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            host, event = await self._queue.get()
            try:
                async with asyncio.timeout(self.timeout):
                    await self._write(host, event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sharing breaker %s (%s) failed: %s", host, event.new.value, exc)
                if event.new is BreakerState.HALF_OPEN:
                    self._grant_locally(host, event.generation)

    async def _write(self, host: str, event: BreakerStateChanged) -> None:
        breaker = self.registry.peek(host)
        if breaker is None:
            return
        if event.new is BreakerState.OPEN:
            open_ms = int(1000 * (event.open_for or self.registry.policy.open_duration))
            done, epoch, _remaining = await self._scripts["trip"](
                keys=[self.key(host)],
                args=[open_ms, self.origin, self._ttl_ms, self.channel, host],
            )
            self._epochs[host] = max(self._epochs.get(host, 0), int(epoch))
            self._claimed.pop(host, None)
            self.published += int(done)
        elif event.new is BreakerState.HALF_OPEN:
            await self._claim(host, breaker, event.generation)
        elif event.new is BreakerState.CLOSED:
            epoch = self._claimed.pop(host, None)
            if epoch is None:
                return
            done, new_epoch = await self._scripts["close"](
                keys=[self.key(host)],
                args=[self.origin, epoch, self._ttl_ms, self.channel, host],
            )
            if done:
                self._epochs[host] = int(new_epoch)
                self.published += 1

    async def _claim(self, host: str, breaker: CircuitBreaker, generation: int) -> None:
        """Claim this epoch's probes; retry when another holder's lease runs out."""
        policy = self.registry.policy
        answer = await self._scripts["claim"](
            keys=[self.key(host)],
            args=[self.origin, int(1000 * policy.probe_timeout), self._ttl_ms],
        )
        kind = int(answer[0])
        if kind == 1:
            self._claimed[host] = int(answer[1])
            breaker.grant_probes(generation, policy.half_open_probes)
        elif kind == 3:  # nobody tripped it in Redis (or it closed): probe here
            self._claimed[host] = -1
            breaker.grant_probes(generation, policy.half_open_probes)
        elif kind == 2:  # another worker tripped it again meanwhile: open for the rest
            self._remember(host, int(answer[1]))
            breaker.apply_remote(BreakerState.OPEN, int(answer[2]) / 1000)
        else:  # another worker probes; ask again if its lease runs out
            wait = int(answer[1]) / 1000 + 0.01
            assert self._loop is not None
            self._loop.call_later(wait, self._reclaim, host, generation)

    def _reclaim(self, host: str, generation: int) -> None:
        breaker = self.registry.peek(host)
        if breaker is None or breaker.generation != generation or self._queue is None:
            return
        if breaker.state is BreakerState.HALF_OPEN:
            event = BreakerStateChanged(
                breaker=host,
                old=BreakerState.HALF_OPEN,
                new=BreakerState.HALF_OPEN,
                generation=generation,
                failure_rate=0.0,
                slow_rate=0.0,
                reason="lease_expired",
            )
            self._queue.put_nowait((host, event))

    def _grant_locally(self, host: str, generation: int) -> None:
        breaker = self.registry.peek(host)
        if breaker is not None:
            breaker.grant_probes(generation, self.registry.policy.half_open_probes)

    # -- Redis -> local breakers ---------------------------------------------------------

    def _remember(self, host: str, epoch: int) -> bool:
        """True when ``epoch`` is newer than what this process has seen for ``host``."""
        if epoch <= self._epochs.get(host, 0):
            return False
        if len(self._epochs) > 4 * 10_000:
            self._epochs.clear()
        self._epochs[host] = epoch
        return True

    def _apply(self, host: str, epoch: int, state: str, remaining_ms: int) -> None:
        if not self._remember(host, epoch):
            return
        self._claimed.pop(host, None)
        if state == "open":
            breaker = self.registry.get(host)  # a trip elsewhere concerns us before our first call
            if breaker.apply_remote(BreakerState.OPEN, remaining_ms / 1000):
                self.applied += 1
        else:
            existing = self.registry.peek(host)
            if existing is not None and existing.apply_remote(BreakerState.CLOSED):
                self.applied += 1

    async def _listen_loop(self) -> None:
        """Subscribe; after every (re)connect re-read the known hosts; back off on errors."""
        assert self._client is not None
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._resync()
                self.subscriptions += 1
                self._listening.set()
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    self._on_message(message["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("breaker sharing lost its subscription (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis 8

    def _on_message(self, data: Any) -> None:
        text = data.decode() if isinstance(data, bytes) else str(data)
        try:
            host, epoch, state, remaining, origin = text.split("\n")
            if origin == self.origin:
                return
            self._apply(host, int(epoch), state, int(remaining))
        except ValueError:
            log.warning("unreadable breaker message %r", text[:200])

    async def _resync(self) -> None:
        hosts = list(self.registry.snapshot())
        if not hosts:
            return
        async with asyncio.timeout(max(self.timeout, 0.002 * len(hosts))):
            assert self._client is not None
            async with self._client.pipeline(transaction=False) as pipe:
                for host in hosts:
                    await self._scripts["read"](keys=[self.key(host)], args=[], client=pipe)
                answers = await pipe.execute()
        for host, (state, epoch, remaining) in zip(hosts, answers, strict=True):
            state = state.decode() if isinstance(state, bytes) else state
            if int(epoch):
                self._apply(host, int(epoch), state, int(remaining))
