"""A simulated artifact repository manager with the mechanics that make real ones collapse.

Two layers, as everywhere in seawall:

- :class:`ServerModel` is sans-IO: worker slots, an accept queue, memory and crashes, driven
  only by the times it is given. Tests drive it with explicit times; nothing sleeps.
- :class:`SimulatedRegistry` is the ASGI face: OCI-style manifests and blobs (real bytes
  whose sha256 matches their digest), webhook deliveries, attachment uploads and a health
  route. It parks each request on a future that a single loop timer resolves when the model
  says the job finished, so the work goes on when the client has given up (the server does
  not know) and that work is counted as wasted.

Collapse mechanics, each a :class:`SimConfig` parameter: fixed capacity (``slots`` x the
service time of each request class, blob time growing with size), an unbounded FIFO accept
queue (``queue_limit=None``), memory that grows with the queue, and past ``memory_limit_mib``
a crash: the process is down (fast 502) for ``restart_seconds`` and loses its queue.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import heapq
import json
import math
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Receive, Scope, Send

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError
from seawall.policy.base import check_int_at_least, check_non_negative, check_positive

__all__ = [
    "Catalog",
    "Image",
    "Job",
    "Refusal",
    "ServerModel",
    "ServiceTimes",
    "SimConfig",
    "SimulatedRegistry",
]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ServiceTimes:
    """Seconds of one worker slot per request class (simulated seconds = wall seconds).

    Small, so that a run stays cheap, but well above the event loop's lag (a few ms) so the
    simulator, not the machine, is what saturates.
    """

    manifest: float = 0.100
    blob_base: float = 0.040
    blob_per_kib: float = 0.012
    webhook: float = 0.060
    upload_base: float = 0.080
    upload_per_kib: float = 0.012

    def __post_init__(self) -> None:
        for name in ("manifest", "blob_base", "webhook", "upload_base"):
            check_positive(f"service.{name}", getattr(self, name))
        check_non_negative("service.blob_per_kib", self.blob_per_kib)
        check_non_negative("service.upload_per_kib", self.upload_per_kib)

    def blob(self, size: int) -> float:
        return self.blob_base + self.blob_per_kib * size / 1024

    def upload(self, size: int) -> float:
        return self.upload_base + self.upload_per_kib * size / 1024


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated server. Defaults collapse the way the December 2022 manager did.

    ``queue_limit=None`` is the unbounded FIFO accept queue of the unprotected server.
    Memory is ``memory_base_mib + per queued + per running``; above ``memory_limit_mib`` the
    process crashes, answers fast 502s for ``restart_seconds`` and loses its queue.
    ``rate_limit_rps`` is the server's own (misconfigured) global limit: set above capacity,
    as in the incident, it never protects anything. ``restart_seconds`` is real seconds, like
    every time constant of the lab (runs are not compressed): a JVM artifact manager takes
    tens of seconds to come back, 30 s is on the short side.
    """

    slots: int = 4
    service: ServiceTimes = field(default_factory=ServiceTimes)
    queue_limit: int | None = None
    memory_base_mib: float = 512.0
    memory_per_queued_mib: float = 1.0
    memory_per_running_mib: float = 8.0
    memory_limit_mib: float = 800.0
    restart_seconds: float = 30.0
    rate_limit_rps: float | None = None

    def __post_init__(self) -> None:
        check_int_at_least("slots", self.slots, 1)
        if self.queue_limit is not None:
            check_int_at_least("queue_limit", self.queue_limit, 0)
        check_non_negative("memory_base_mib", self.memory_base_mib)
        check_non_negative("memory_per_queued_mib", self.memory_per_queued_mib)
        check_non_negative("memory_per_running_mib", self.memory_per_running_mib)
        check_positive("memory_limit_mib", self.memory_limit_mib)
        if self.memory_limit_mib <= self.memory_base_mib:
            raise PolicyError(
                "memory_limit_mib", self.memory_limit_mib, "must be above memory_base_mib"
            )
        check_non_negative("restart_seconds", self.restart_seconds)
        if self.rate_limit_rps is not None:
            check_positive("rate_limit_rps", self.rate_limit_rps)


# --------------------------------------------------------------------------- the sans-IO model


class Refusal(enum.Enum):
    """Why the model did not accept a request (each answered fast by the face)."""

    DOWN = "down"  # crashed and restarting: 502, like a proxy with no backend
    LIMITED = "limited"  # the server's own global rate limit: 429 without Retry-After
    FULL = "full"  # bounded queue is full: 503


@dataclass(slots=True, eq=False)
class Job:
    """One request's work. ``meta`` is the face's; the model never reads it."""

    kind: str
    service: float
    arrived: float
    meta: Any = None
    started: float | None = None
    finished: float | None = None
    failed: bool = False
    abandoned_at: float | None = None


class ServerModel:
    """Worker slots, a FIFO queue, memory and crashes, driven by explicit times."""

    def __init__(self, config: SimConfig, now: float) -> None:
        self.config = config
        self.slots = config.slots
        self._queue: deque[Job] = deque()
        self._running: list[tuple[float, int, Job]] = []
        self._seq = 0
        self._now = now
        self.down_until: float | None = None
        self._done: list[Job] = []
        self._tokens = config.rate_limit_rps or 0.0
        self._tokens_at = now
        # counters
        self.arrivals = 0
        self.completed = 0
        self.crashes = 0
        self.crash_times: list[float] = []
        self.refused: dict[Refusal, int] = dict.fromkeys(Refusal, 0)
        self.work_done = 0.0  # slot-seconds of completed jobs
        self.wasted_work = 0.0  # ... of those whose client had already given up
        self.lost_work = 0.0  # slot-seconds thrown away by crashes
        self.max_queue = 0

    # -- queries

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return len(self._running)

    def memory_mib(self) -> float:
        c = self.config
        return (
            c.memory_base_mib
            + c.memory_per_queued_mib * len(self._queue)
            + c.memory_per_running_mib * len(self._running)
        )

    def is_down(self, now: float) -> bool:
        self.advance(now)
        return self.down_until is not None

    def next_deadline(self) -> float | None:
        """The next time something happens by itself: a job finishes or a restart ends."""
        times = []
        if self._running:
            times.append(self._running[0][0])
        if self.down_until is not None:
            times.append(self.down_until)
        return min(times) if times else None

    def drain_done(self) -> list[Job]:
        """Jobs finished or failed since the last call (the face resolves their waiters)."""
        done, self._done = self._done, []
        return done

    # -- inputs

    def admit(self, now: float, kind: str, service: float, meta: Any = None) -> Job | Refusal:
        """A request arrives. Returns its job, or why it was refused at once."""
        self.advance(now)
        self.arrivals += 1
        if self.down_until is not None:
            self.refused[Refusal.DOWN] += 1
            return Refusal.DOWN
        if self.config.rate_limit_rps is not None and not self._take_token(now):
            self.refused[Refusal.LIMITED] += 1
            return Refusal.LIMITED
        limit = self.config.queue_limit
        if limit is not None and len(self._queue) >= limit and len(self._running) >= self.slots:
            self.refused[Refusal.FULL] += 1
            return Refusal.FULL
        job = Job(kind=kind, service=service, arrived=now, meta=meta)
        self._queue.append(job)
        self._start_ready(now)
        self.max_queue = max(self.max_queue, len(self._queue))
        if self.memory_mib() > self.config.memory_limit_mib:
            self.crash(now)
        return job

    def abandon(self, job: Job, now: float) -> None:
        """The client gave up. The server does not know: the job still runs."""
        if job.abandoned_at is None and job.finished is None:
            job.abandoned_at = now

    def set_slots(self, now: float, slots: int) -> None:
        """Capacity changes (scaling event). Running jobs finish; new starts obey the limit."""
        check_int_at_least("slots", slots, 1)
        self.advance(now)
        self.slots = slots
        self._start_ready(now)

    def crash(self, now: float) -> None:
        """The process dies: every queued and running job fails, and it restarts."""
        self.advance(now)
        self.crashes += 1
        self.crash_times.append(now)
        self._fail_all(now)
        self.down_until = now + self.config.restart_seconds

    def shutdown(self, now: float) -> None:
        """The end of a run: fail what is left (not a crash; nothing is counted)."""
        self.advance(now)
        self._fail_all(now)

    def _fail_all(self, now: float) -> None:
        for _, _, job in self._running:
            assert job.started is not None
            self.lost_work += now - job.started
            job.failed = True
            job.finished = now
            self._done.append(job)
        for job in self._queue:
            job.failed = True
            job.finished = now
            self._done.append(job)
        self._running.clear()
        self._queue.clear()

    def advance(self, now: float) -> None:
        """Move the model to ``now``: finish jobs, start queued ones in FIFO order, restart."""
        if now < self._now:
            now = self._now
        while self._running and self._running[0][0] <= now:
            finish, _, job = heapq.heappop(self._running)
            job.finished = finish
            self.completed += 1
            self.work_done += job.service
            if job.abandoned_at is not None and job.abandoned_at <= finish:
                self.wasted_work += job.service
            self._done.append(job)
            self._start_ready(finish)
        if self.down_until is not None and self.down_until <= now:
            self.down_until = None
        self._now = now

    # -- internals

    def _start_ready(self, at: float) -> None:
        while self._queue and len(self._running) < self.slots:
            job = self._queue.popleft()
            job.started = max(at, job.arrived)
            self._seq += 1
            heapq.heappush(self._running, (job.started + job.service, self._seq, job))

    def _take_token(self, now: float) -> bool:
        rate = self.config.rate_limit_rps or 0.0
        self._tokens = min(rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


# --------------------------------------------------------------------------- the catalog


@dataclass(frozen=True, slots=True)
class Image:
    """One repository:tag with its manifest and layer digests."""

    name: str
    tag: str
    layers: tuple[str, ...]
    manifest: bytes

    @property
    def path(self) -> str:
        return f"/v2/{self.name}/manifests/{self.tag}"


def _blob_bytes(seed: int, index: int, size: int) -> bytes:
    return hashlib.shake_128(f"seawall-layer-{seed}-{index}".encode()).digest(size)


class Catalog:
    """Images and layers, with layers shared between images and Zipf popularity.

    Each image is one base layer (few, popular), one shared runtime layer and one to three
    layers of its own; sizes are a few KiB so a run is cheap, and every blob's sha256 is its
    digest so clients can verify what they (or a cache) got.
    """

    def __init__(
        self,
        *,
        seed: int = 1,
        images: int = 60,
        bases: int = 5,
        runtimes: int = 15,
        zipf_s: float = 1.1,
        size_kib: tuple[int, int] = (1, 12),
    ) -> None:
        check_int_at_least("images", images, 1)
        rng = random.Random(seed)
        self.blobs: dict[str, bytes] = {}
        index = 0

        def new_layer() -> str:
            nonlocal index
            data = _blob_bytes(seed, index, rng.randint(size_kib[0], size_kib[1]) * 1024)
            index += 1
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            self.blobs[digest] = data
            return digest

        base_layers = [new_layer() for _ in range(bases)]
        runtime_layers = [new_layer() for _ in range(runtimes)]
        self.images: list[Image] = []
        for i in range(images):
            layers = [
                base_layers[min(int(rng.paretovariate(1.5)) - 1, bases - 1)],
                rng.choice(runtime_layers),
                *(new_layer() for _ in range(rng.randint(1, 3))),
            ]
            doc = {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "layers": [
                    {"mediaType": LAYER_TYPE, "digest": d, "size": len(self.blobs[d])}
                    for d in layers
                ],
            }
            manifest = json.dumps(doc, separators=(",", ":")).encode()
            self.images.append(Image(f"team{i % 7}/app{i}", "latest", tuple(layers), manifest))
        weights = [1.0 / (rank + 1) ** zipf_s for rank in range(images)]
        total = sum(weights)
        self.popularity = [w / total for w in weights]
        self.by_path = {img.path: img for img in self.images}

    def pick(self, rng: random.Random) -> int:
        """An image index drawn from the Zipf popularity."""
        return rng.choices(range(len(self.images)), weights=self.popularity)[0]

    def step_work(self, service: ServiceTimes, image: int) -> float:
        img = self.images[image]
        return service.manifest + float(sum(service.blob(len(self.blobs[d])) for d in img.layers))

    def mean_step_work(self, service: ServiceTimes) -> float:
        """Expected slot-seconds of one build step (manifest + its layers)."""
        return float(sum(p * self.step_work(service, i) for i, p in enumerate(self.popularity)))


# --------------------------------------------------------------------------- the ASGI face


@dataclass(slots=True)
class _Meta:
    kind: str
    body: bytes = b""
    content_type: bytes = b"application/json"
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)
    hook: str | None = None
    key: str | None = None
    waiter: asyncio.Future[None] | None = None


class SimulatedRegistry:
    """The artifact manager as an ASGI app over a :class:`ServerModel`.

    Routes: ``GET /v2/<image>/manifests/<tag>``, ``GET /v2/<image>/blobs/sha256:<hex>``,
    ``POST /hooks/<id>``, ``PUT /attachments/<id>``, ``GET /healthz``. A manifest GET with
    a matching ``If-None-Match`` gets ``304`` (a revalidation costs the same slot time:
    the lookup is the work, as in Docker Distribution). Call :meth:`close`
    when done: it cancels the one timer the face owns and fails parked requests.
    """

    def __init__(
        self,
        config: SimConfig | None = None,
        catalog: Catalog | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        upload_kib: int = 4,
    ) -> None:
        self.config = config or SimConfig()
        self.catalog = catalog or Catalog()
        self.clock = clock
        self.model = ServerModel(self.config, clock.now())
        self.base_slots = self.config.slots
        self.upload_kib = upload_kib
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.hooks_delivered: dict[str, int] = {}  # id -> times processed by the server
        self.hook_keys: set[str] = set()
        self.hooks_deduplicated = 0
        self.uploads_stored = 0
        self.answered: dict[int, int] = {}  # status -> count (responses actually sent)
        self.closed = False

    # -- control (profile events)

    def set_capacity(self, factor: float) -> None:
        """Scale the worker slots to ``factor`` x the configured ones (at least one)."""
        check_positive("capacity", factor)
        self.model.set_slots(self.clock.now(), max(1, round(self.base_slots * factor)))
        self._settle()

    def restart(self) -> None:
        """An operator restart: like a crash, the queue is lost and it is down a while."""
        self.model.crash(self.clock.now())
        self._settle()

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.model.shutdown(self.clock.now())
        self._resolve(self.model.drain_done())

    # -- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        now = self.clock.now()
        if path == "/healthz":
            down = self.model.is_down(now)
            await self._answer(
                send, 503 if down else 200, b'{"ok":%s}' % (b"false" if down else b"true")
            )
            return
        meta, service = await self._route(method, path, scope, receive)
        if meta is None:
            await self._answer(send, 404 if service == 0 else 405, b'{"error":"not found"}')
            return
        if meta.kind == "webhook" and meta.hook is not None:
            key = _header(scope, b"idempotency-key")
            if key is not None and key in self.hook_keys:
                self.hooks_deduplicated += 1
                await self._answer(send, 200, b'{"duplicate":true}')
                return
            meta.key = key
        result = self.model.admit(now, meta.kind, service, meta)
        if isinstance(result, Refusal):
            self._resolve(self.model.drain_done())
            if result is Refusal.DOWN:
                await self._answer(send, 502, b'{"error":"bad gateway: backend restarting"}')
            elif result is Refusal.LIMITED:
                await self._answer(send, 429, b'{"error":"rate limited"}')
            else:
                await self._answer(send, 503, b'{"error":"queue full"}')
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        meta.waiter = waiter
        self._settle()
        try:
            await waiter
        except asyncio.CancelledError:
            self.model.abandon(result, self.clock.now())
            raise
        if result.failed:
            await self._answer(send, 502, b'{"error":"bad gateway: backend crashed"}')
            return
        if meta.kind == "manifest" and _not_modified(scope, meta.extra):
            await self._answer(send, 304, b"", meta.content_type, meta.extra, length=False)
            return
        await self._answer(send, 200, meta.body, meta.content_type, meta.extra)

    async def _route(
        self, method: str, path: str, scope: Scope, receive: Receive
    ) -> tuple[_Meta | None, float]:
        svc = self.config.service
        parts = path.split("/")
        if path.startswith("/v2/") and len(parts) >= 5 and parts[-2] in ("manifests", "blobs"):
            if method not in ("GET", "HEAD"):
                return None, 1
            if parts[-2] == "manifests":
                img = self.catalog.by_path.get(path)
                if img is None:
                    return None, 0
                digest = "sha256:" + hashlib.sha256(img.manifest).hexdigest()
                return _Meta(
                    "manifest",
                    img.manifest,
                    MANIFEST_TYPE.encode(),
                    # like real registries: no Cache-Control on manifests (a tag moves), the
                    # digest as ETag so a cache can revalidate
                    [
                        (b"docker-content-digest", digest.encode()),
                        (b"etag", f'"{digest}"'.encode()),
                    ],
                ), svc.manifest
            data = self.catalog.blobs.get(parts[-1])
            if data is None:
                return None, 0
            return _Meta(
                "blob",
                data,
                b"application/octet-stream",
                [
                    (b"docker-content-digest", parts[-1].encode()),
                    (b"cache-control", b"public, max-age=31536000, immutable"),
                    (b"etag", f'"{parts[-1]}"'.encode()),
                ],
            ), svc.blob(len(data))
        if path.startswith("/hooks/") and len(parts) == 3:
            if method != "POST":
                return None, 1
            await _read_body(receive)
            return _Meta("webhook", b'{"delivered":true}', hook=parts[2]), svc.webhook
        if path.startswith("/attachments/") and len(parts) == 3:
            if method != "PUT":
                return None, 1
            size = await _read_body(receive)
            return _Meta("upload", b'{"stored":true}'), svc.upload(size)
        return None, 0

    async def _answer(
        self,
        send: Send,
        status: int,
        body: bytes,
        content_type: bytes = b"application/json",
        extra: Iterable[tuple[bytes, bytes]] = (),
        *,
        length: bool = True,
    ) -> None:
        self.answered[status] = self.answered.get(status, 0) + 1
        headers = [(b"content-type", content_type), *extra]
        if length:
            headers.insert(1, (b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # -- the one timer

    def _settle(self) -> None:
        """Resolve finished jobs and (re)arm the single timer for the next deadline."""
        if self.closed:
            return
        now = self.clock.now()
        self.model.advance(now)
        self._resolve(self.model.drain_done())
        deadline = self.model.next_deadline()
        if deadline is None:
            return
        if self._timer is not None and self._timer_at <= deadline:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = deadline
        self._timer = loop.call_later(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._settle()

    def _resolve(self, done: list[Job]) -> None:
        for job in done:
            meta: _Meta = job.meta
            if not job.failed and meta.kind == "webhook" and meta.hook is not None:
                self.hooks_delivered[meta.hook] = self.hooks_delivered.get(meta.hook, 0) + 1
                if meta.key:
                    self.hook_keys.add(meta.key)
            elif not job.failed and meta.kind == "upload":
                self.uploads_stored += 1
            if meta.waiter is not None and not meta.waiter.done():
                meta.waiter.set_result(None)


def _not_modified(scope: Scope, extra: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request's If-None-Match names this response's ETag."""
    wanted = _header(scope, b"if-none-match")
    if wanted is None:
        return False
    etag = next((v.decode("latin-1") for k, v in extra if k == b"etag"), None)
    tags = {t.strip().removeprefix("W/") for t in wanted.split(",")}
    return etag is not None and (etag in tags or "*" in tags)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return bytes(value).decode("latin-1")
    return None


async def _read_body(receive: Receive) -> int:
    """Consume the request body chunk by chunk (never held whole); returns its size."""
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return size
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return size
