"""The offered load: build steps, webhook deliveries and attachment uploads, and their clients.

:func:`plan_load` turns a :class:`~seawall.replay.profile.Schedule` into a seeded list of
arrivals (Poisson per class, images drawn from the catalog's Zipf popularity) plus the
per-second *ideal*: what a perfect system could usefully answer, given the capacity and
what a verified cache could serve without the upstream. The plan is the same for every
scenario, so they are compared on exactly the same load.

:class:`LoadGenerator` plays the plan in real time. A build step pulls a manifest by tag,
then its layers by digest (concurrently, verifying each sha256), and fails if any pull fails
after its client's own retries or the step passes its deadline. Two kinds of client:

- :class:`NaiveClient`: what CI runners do by default: fixed per-attempt timeout, three
  immediate retries, no jitter, no breaker, no cache;
- :class:`ProtectedClient`: one call through whatever transport stack the scenario built
  (seawall's), marking each request with its build step (``x-seawall-step``) so a server face
  can prefer steps already in progress. Its webhook deliveries that cannot go now are
  deferred with an idempotency key and delivered later.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field
from hashlib import sha256
from typing import Protocol

import httpx

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError
from seawall.policy.base import check_int_at_least, check_non_negative, check_positive
from seawall.replay.metrics import Recorder
from seawall.replay.profile import Schedule
from seawall.replay.simulator import Catalog, SimConfig

__all__ = [
    "Arrival",
    "CountingTransport",
    "LoadConfig",
    "LoadGenerator",
    "NaiveClient",
    "Plan",
    "ProtectedClient",
    "plan_load",
]

BASE_URL = "http://registry.sim"
STEP_HEADER = "x-seawall-step"
PRIORITY_HEADER = "x-seawall-priority"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The clients' side of the replay. Times are simulated seconds (= wall seconds)."""

    runners: int = 4
    step_deadline: float = 8.0
    naive_attempt_timeout: float = 2.0
    naive_retries: int = 3
    webhook_deadline: float = 4.0
    upload_kib: int = 4
    drain_seconds: float = 3.0
    webhook_drain_seconds: float = 10.0
    redelivery_interval: float = 0.5
    redelivery_batch: int = 8
    cache_scope: str = "shared"

    def __post_init__(self) -> None:
        check_int_at_least("runners", self.runners, 1)
        check_positive("step_deadline", self.step_deadline)
        check_positive("naive_attempt_timeout", self.naive_attempt_timeout)
        check_int_at_least("naive_retries", self.naive_retries, 0)
        check_positive("webhook_deadline", self.webhook_deadline)
        check_int_at_least("upload_kib", self.upload_kib, 0)
        check_non_negative("drain_seconds", self.drain_seconds)
        check_non_negative("webhook_drain_seconds", self.webhook_drain_seconds)
        check_positive("redelivery_interval", self.redelivery_interval)
        check_int_at_least("redelivery_batch", self.redelivery_batch, 1)
        if self.cache_scope not in ("shared", "runner"):
            raise PolicyError("cache_scope", self.cache_scope, "is not 'shared' or 'runner'")


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float
    kind: str  # "step" | "webhook" | "upload"
    ident: int
    runner: int
    image: int = -1


@dataclass(slots=True)
class Plan:
    """Arrivals plus the per-second ideal (see docs/replay.md, "the ideal and the bound")."""

    arrivals: list[Arrival]
    duration: float
    offered: list[float]  # logical requests offered, per second
    cache_servable: list[float]  # of which a verified per-runner cache could serve
    uncacheable_work: list[float]  # slot-seconds the rest needs
    slots: list[float]  # slot-seconds available per second
    ideal: list[float]  # S + min(U, U * slots / work): best possible useful responses
    steps: int = 0
    webhooks: int = 0
    uploads: int = 0


def plan_load(
    schedule: Schedule,
    catalog: Catalog,
    sim: SimConfig,
    config: LoadConfig,
    seed: int,
) -> Plan:
    """Seeded arrivals for the whole schedule and the ideal they allow."""
    rng = random.Random(seed)
    svc = sim.service
    upload_service = svc.upload(config.upload_kib * 1024)
    step_work = catalog.mean_step_work(svc)
    unit = {"builds": step_work, "webhooks": svc.webhook, "uploads": upload_service}
    kind_of = {"builds": "step", "webhooks": "webhook", "uploads": "upload"}
    arrivals: list[Arrival] = []
    idents = dict.fromkeys(kind_of.values(), 0)
    for seg in schedule.segments:
        for cls, multiple in seg.phase.load.items():
            rate = multiple * sim.slots / unit[cls]
            if rate <= 0:
                continue
            t = seg.t0 + rng.expovariate(rate)
            while t < seg.t1:
                kind = kind_of[cls]
                idents[kind] += 1
                image = catalog.pick(rng) if kind == "step" else -1
                arrivals.append(
                    Arrival(t, kind, idents[kind], rng.randrange(config.runners), image)
                )
                t += rng.expovariate(rate)
    arrivals.sort(key=lambda a: a.at)

    n = max(1, int(schedule.duration + 0.999))
    offered = [0.0] * n
    servable = [0.0] * n
    work = [0.0] * n
    # cache-servable: a GET whose content was requested before. "shared" (default): by
    # anyone, since a shared cache (the server face's) could serve it; "runner": by the
    # same runner only. Shared makes the ideal higher: it is the upper bound.
    shared: set[str] = set()
    seen: list[set[str]] = (
        [shared] * config.runners
        if config.cache_scope == "shared"
        else [set() for _ in range(config.runners)]
    )
    for a in arrivals:
        b = min(n - 1, int(a.at))
        if a.kind == "step":
            img = catalog.images[a.image]
            keys = [(img.path, svc.manifest)] + [
                (d, svc.blob(len(catalog.blobs[d]))) for d in img.layers
            ]
            for key, cost in keys:
                offered[b] += 1
                if key in seen[a.runner]:
                    servable[b] += 1
                else:
                    work[b] += cost
                    seen[a.runner].add(key)
        else:
            offered[b] += 1
            work[b] += svc.webhook if a.kind == "webhook" else upload_service
    slots = [sim.slots * schedule.phase_at(b + 0.5).capacity for b in range(n)]
    ideal = []
    for b in range(n):
        u = offered[b] - servable[b]
        served = u if work[b] <= slots[b] else u * slots[b] / work[b]
        ideal.append(servable[b] + served)
    return Plan(
        arrivals=arrivals,
        duration=schedule.duration,
        offered=offered,
        cache_servable=servable,
        uncacheable_work=work,
        slots=slots,
        ideal=ideal,
        steps=idents["step"],
        webhooks=idents["webhook"],
        uploads=idents["upload"],
    )


# --------------------------------------------------------------------------- clients


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts every request that leaves the client for the server (retry amplification)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.recorder.upstream_sent()
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            self.recorder.upstream_answered(None)
            raise
        self.recorder.upstream_answered(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Client(Protocol):
    marks_steps: bool
    defers_webhooks: bool

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None: ...

    async def aclose(self) -> None: ...


class NaiveClient:
    """Fixed per-attempt timeout, immediate retries, no jitter, breaker or cache."""

    marks_steps = False
    defers_webhooks = False

    def __init__(
        self, transport: httpx.AsyncBaseTransport, config: LoadConfig, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self.http = httpx.AsyncClient(transport=transport, base_url=BASE_URL)
        self.config = config
        self.clock = clock

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        for _ in range(1 + self.config.naive_retries):
            remaining = deadline - self.clock.now()
            if remaining <= 0:
                return None
            try:
                async with asyncio.timeout(min(self.config.naive_attempt_timeout, remaining)):
                    response = await self.http.request(
                        method, url, headers=headers, content=content
                    )
            except (TimeoutError, httpx.HTTPError):
                continue
            if response.status_code < 500 and response.status_code != 429:
                return response
        return None

    async def aclose(self) -> None:
        await self.http.aclose()


class ProtectedClient:
    """One call through the scenario's transport stack; retries are the stack's business."""

    marks_steps = True
    defers_webhooks = True

    def __init__(self, transport: httpx.AsyncBaseTransport, clock: Clock = SYSTEM_CLOCK) -> None:
        self.http = httpx.AsyncClient(transport=transport, base_url=BASE_URL)
        self.clock = clock

    async def fetch(
        self,
        method: str,
        url: str,
        *,
        deadline: float,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        remaining = deadline - self.clock.now()
        if remaining <= 0:
            return None
        try:
            async with asyncio.timeout(remaining):
                return await self.http.request(method, url, headers=headers, content=content)
        except Exception:  # timeouts, transport errors, a mechanism's "gave up" errors
            return None  # (CancelledError is a BaseException: it propagates)

    async def aclose(self) -> None:
        await self.http.aclose()


# --------------------------------------------------------------------------- the generator


@dataclass(order=True, slots=True)
class _Deferred:
    due: float
    ident: int = field(compare=False)
    offered_at: float = field(compare=False)
    runner: int = field(compare=False)


class LoadGenerator:
    """Plays a :class:`Plan` in real time against a set of clients (one per runner).

    Owns every task it starts: the request tasks and the webhook re-delivery loop end by
    themselves (deadlines), and whatever is left after ``drain_seconds`` is cancelled.
    """

    def __init__(
        self,
        plan: Plan,
        catalog: Catalog,
        clients: list[Client],
        recorder: Recorder,
        config: LoadConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        seed: int = 1,
    ) -> None:
        self.plan = plan
        self.catalog = catalog
        self.clients = clients
        self.recorder = recorder
        self.config = config
        self.clock = clock
        self.rng = random.Random(seed ^ 0x5EA)
        self.upload_body = b"a" * (config.upload_kib * 1024)
        self._tasks: set[asyncio.Task[None]] = set()
        self._hook_tasks: set[asyncio.Task[None]] = set()
        self._redelivering = 0
        self._deferred: list[_Deferred] = []
        self.webhooks_deferred = 0
        self.webhooks_redelivered = 0
        self.webhooks_lost_client = 0
        self._t0 = 0.0

    async def run(self, t0: float) -> None:
        """Send every arrival at its time, then drain (bounded)."""
        self._t0 = t0
        redeliver = asyncio.create_task(self._redeliver_loop())
        try:
            for arrival in self.plan.arrivals:
                delay = t0 + arrival.at - self.clock.now()
                if delay > 0:
                    await self.clock.sleep(delay)
                task = asyncio.create_task(self._handle(arrival))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                if arrival.kind == "webhook":
                    self._hook_tasks.add(task)
                    task.add_done_callback(self._hook_tasks.discard)
            end = t0 + self.plan.duration
            if end > self.clock.now():
                await self.clock.sleep(end - self.clock.now())
            # drain: steps and uploads get drain_seconds; webhook deliveries (in flight or
            # deferred) up to webhook_drain_seconds, since a deferred one is not lost
            now = self.clock.now()
            drain_until = now + self.config.drain_seconds
            hooks_until = now + max(self.config.drain_seconds, self.config.webhook_drain_seconds)
            while self._tasks or self._deferred or self._redelivering:
                now = self.clock.now()
                hooks_pending = self._deferred or self._hook_tasks or self._redelivering
                if now >= hooks_until or (now >= drain_until and not hooks_pending):
                    break
                await self.clock.sleep(0.05)
        finally:
            redeliver.cancel()
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(redeliver, *pending, return_exceptions=True)
            for item in self._deferred:
                self.webhooks_lost_client += 1
                self.recorder.request(
                    "webhook", item.offered_at, ok=False, useful=False, latency=None
                )
            self._deferred.clear()

    async def _handle(self, arrival: Arrival) -> None:
        if arrival.kind == "step":
            await self._step(arrival)
        elif arrival.kind == "webhook":
            await self._webhook(arrival.ident, arrival.runner, arrival.at, first=True)
        else:
            await self._upload(arrival)

    async def _step(self, arrival: Arrival) -> None:
        client = self.clients[arrival.runner]
        image = self.catalog.images[arrival.image]
        started = self.clock.now()
        deadline = started + self.config.step_deadline
        headers = (
            {STEP_HEADER: f"r{arrival.runner}-s{arrival.ident}", PRIORITY_HEADER: "step"}
            if client.marks_steps
            else None
        )
        records: list[tuple[str, float, bool, float | None]] = []
        layers: list[str] = []
        ok = False
        reason = "ok"
        try:
            async with asyncio.timeout(self.config.step_deadline):
                t = self.clock.now()
                response = await client.fetch("GET", image.path, deadline=deadline, headers=headers)
                good = response is not None and response.status_code == 200
                if good and response is not None:
                    try:
                        doc = json.loads(response.content)
                        layers = [layer["digest"] for layer in doc["layers"]]
                    except (ValueError, KeyError, TypeError):
                        good = False
                records.append(("manifest", t - self._t0, good, self.clock.now() - t))
                if not good:
                    reason = "manifest"
                else:
                    results = await asyncio.gather(
                        *(
                            self._blob(client, image.name, d, deadline, headers, records)
                            for d in layers
                        )
                    )
                    ok = all(results)
                    reason = "ok" if ok else "layer"
        except TimeoutError:
            ok = False
            reason = "deadline"
            # the pulls cut off by the deadline are logical requests that failed
            unfinished = (1 + len(layers)) - len(records) if records else 1
            waited = self.clock.now() - started
            records.extend([("blob" if records else "manifest", 0.0, False, waited)] * unfinished)
        # every request of a step is attributed to the step's planned arrival, so the
        # per-second useful counts line up exactly with the plan's offered and ideal
        for kind, _at, good, latency in records:
            self.recorder.request(kind, arrival.at, ok=good, useful=good and ok, latency=latency)
        self.recorder.step(started - self._t0, self.clock.now() - self._t0, ok, reason)

    async def _blob(
        self,
        client: Client,
        repo: str,
        digest: str,
        deadline: float,
        headers: dict[str, str] | None,
        records: list[tuple[str, float, bool, float | None]],
    ) -> bool:
        """Pull one layer and verify its digest; the outcome goes to ``records`` at once."""
        t = self.clock.now()
        response = await client.fetch(
            "GET", f"/v2/{repo}/blobs/{digest}", deadline=deadline, headers=headers
        )
        good = (
            response is not None
            and response.status_code == 200
            and "sha256:" + sha256(response.content).hexdigest() == digest
        )
        records.append(("blob", t - self._t0, good, self.clock.now() - t))
        return good

    async def _webhook(self, ident: int, runner: int, offered_at: float, *, first: bool) -> bool:
        client = self.clients[runner]
        headers = {"idempotency-key": f"hook-{ident}"} if client.defers_webhooks else None
        t = self.clock.now()
        response = await client.fetch(
            "POST",
            f"/hooks/{ident}",
            deadline=t + self.config.webhook_deadline,
            headers=headers,
            content=b'{"event":"repo:push"}',
        )
        ok = response is not None and response.status_code == 200
        if ok or not client.defers_webhooks:
            self.recorder.request(
                "webhook", offered_at, ok=ok, useful=ok, latency=self.clock.now() - t
            )
            if not ok:
                self.webhooks_lost_client += 1
            elif not first:
                self.webhooks_redelivered += 1
            return ok
        if first:
            self.webhooks_deferred += 1
        retry_after = _retry_after(response)
        self._defer(ident, runner, offered_at, retry_after)
        return False

    def _defer(self, ident: int, runner: int, offered_at: float, retry_after: float | None) -> None:
        wait = retry_after if retry_after is not None else 1.0
        wait = wait * (
            0.5 + self.rng.random()
        )  # jitter: deferred deliveries do not come back together
        self._deferred.append(_Deferred(self.clock.now() + wait, ident, offered_at, runner))

    async def _redeliver_loop(self) -> None:
        """Deliver deferred webhooks later, a few at a time (the lab's owned task)."""
        while True:
            await self.clock.sleep(self.config.redelivery_interval)
            now = self.clock.now()
            due = [d for d in self._deferred if d.due <= now][: self.config.redelivery_batch]
            if not due:
                continue
            for d in due:
                self._deferred.remove(d)
            self._redelivering = len(due)
            try:
                await asyncio.gather(
                    *(self._webhook(d.ident, d.runner, d.offered_at, first=False) for d in due)
                )
            finally:
                self._redelivering = 0

    async def _upload(self, arrival: Arrival) -> None:
        client = self.clients[arrival.runner]
        headers = {"idempotency-key": f"upload-{arrival.ident}"} if client.marks_steps else None
        t = self.clock.now()
        response = await client.fetch(
            "PUT",
            f"/attachments/{arrival.ident}",
            deadline=t + self.config.webhook_deadline,
            headers=headers,
            content=self.upload_body,
        )
        ok = response is not None and response.status_code == 200
        self.recorder.request("upload", arrival.at, ok=ok, useful=ok, latency=self.clock.now() - t)


def _retry_after(response: httpx.Response | None) -> float | None:
    if response is None:
        return None
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
