"""The offered load and the world that sends it: CI runners, a webhook sender, an uploader.

:func:`plan_load` turns a :class:`~seawall.replay.profile.Schedule` into a seeded list of
arrivals (Poisson per class, images drawn from the catalog's Zipf popularity) plus, per
second, two ideals: the *cache-credited* one (what a perfect system could usefully answer
given the capacity and what a shared verified cache could serve without the upstream) and
the *raw-capacity* one (what the server alone could answer, no cache at all). The plan is
the same for every scenario, so they are compared on exactly the same arrivals.

:class:`LoadGenerator` is the world outside the library, identical in every scenario
(:class:`LoadConfig`): a build step pulls a manifest by tag, then its layers by digest, at
most ``layer_concurrency`` at a time (docker's ``max-concurrent-downloads``), verifying each
sha256; it is *on time* if it succeeds within ``on_time`` seconds, *late* if it succeeds
later, and *failed* if a pull fails for good or the CI gives up after ``step_timeout``. The
webhook sender tries each delivery at once and again after each wait of
``webhook_redelivery``, always with an ``Idempotency-Key``; the uploader sends each
attachment once, with one too. What differs between scenarios is only the HTTP client each
runner uses (:class:`NaiveClient`, :class:`DockerLikeClient`, :class:`StackClient`) and
what stands in front of the server.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from hashlib import sha256
from typing import Any, Protocol

import httpx
import tenacity

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError
from seawall.policy.base import check_int_at_least, check_non_negative, check_positive
from seawall.protocol import STEP_HEADER
from seawall.replay.metrics import ObservationLog
from seawall.replay.profile import Schedule
from seawall.replay.simulator import Catalog, SimConfig

__all__ = [
    "BASE_URL",
    "Arrival",
    "Client",
    "CountingTransport",
    "DockerLikeClient",
    "LoadConfig",
    "LoadGenerator",
    "NaiveClient",
    "Plan",
    "StackClient",
    "plan_load",
]

BASE_URL = "http://registry.sim"


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """The world outside seawall, the same in every scenario. Real seconds (nothing is
    compressed, see docs/replay.md "One time scale").

    ``mark_steps``: the CI runner labels every request of a build step with
    ``x-seawall-step`` (a CI system knows its steps), in every scenario; servers that do
    not read it ignore it. seawall's client faces cannot send it yet, so the runner does.
    """

    runners: int = 4
    on_time: float = 10.0
    step_timeout: float = 60.0
    layer_concurrency: int = 3
    request_timeout: float = 10.0
    webhook_redelivery: tuple[float, ...] = (5.0, 10.0, 20.0)
    upload_kib: int = 4
    drain_seconds: float = 60.0
    naive_attempt_timeout: float = 2.0
    naive_retries: int = 3
    cache_scope: str = "shared"
    mark_steps: bool = True

    def __post_init__(self) -> None:
        check_int_at_least("runners", self.runners, 1)
        check_positive("on_time", self.on_time)
        check_positive("step_timeout", self.step_timeout)
        if self.step_timeout < self.on_time:
            raise PolicyError("step_timeout", self.step_timeout, "must be at least on_time")
        check_int_at_least("layer_concurrency", self.layer_concurrency, 1)
        check_positive("request_timeout", self.request_timeout)
        for i, wait in enumerate(self.webhook_redelivery):
            check_non_negative(f"webhook_redelivery[{i}]", wait)
        check_int_at_least("upload_kib", self.upload_kib, 0)
        check_non_negative("drain_seconds", self.drain_seconds)
        check_positive("naive_attempt_timeout", self.naive_attempt_timeout)
        check_int_at_least("naive_retries", self.naive_retries, 0)
        if not isinstance(self.mark_steps, bool):
            raise PolicyError("mark_steps", self.mark_steps, "must be true or false")
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
    """Arrivals plus the per-second ideals (see docs/replay.md, "The ideals and the bound")."""

    arrivals: list[Arrival]
    duration: float
    offered: list[float]  # logical requests offered, per second
    cache_servable: list[float]  # of which a verified shared cache could serve
    uncacheable_work: list[float]  # slot-seconds the rest needs
    work: list[float]  # slot-seconds all of them need (no cache at all)
    slots: list[float]  # slot-seconds available per second
    ideal: list[float]  # S + min(U, U * slots / work(U)): the cache-credited ideal
    ideal_raw: list[float]  # min(D, D * slots / work(D)): raw capacity, no cache credit
    steps: int = 0
    webhooks: int = 0
    uploads: int = 0

    @property
    def requests(self) -> int:
        """Every planned logical request (each step's manifest and layers, hooks, uploads)."""
        return round(sum(self.offered))


def plan_load(
    schedule: Schedule,
    catalog: Catalog,
    sim: SimConfig,
    config: LoadConfig,
    seed: int,
) -> Plan:
    """Seeded arrivals for the whole schedule and the ideals they allow."""
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
    work_u = [0.0] * n
    work_all = [0.0] * n
    # cache-servable: a GET whose content was requested before. "shared" (default): by
    # anyone, since a shared cache in front of the server could serve it; "runner": by the
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
                work_all[b] += cost
                if key in seen[a.runner]:
                    servable[b] += 1
                else:
                    work_u[b] += cost
                    seen[a.runner].add(key)
        else:
            cost = svc.webhook if a.kind == "webhook" else upload_service
            offered[b] += 1
            work_all[b] += cost
            work_u[b] += cost
    slots = [sim.slots * schedule.phase_at(b + 0.5).capacity for b in range(n)]
    ideal: list[float] = []
    ideal_raw: list[float] = []
    for b in range(n):
        u = offered[b] - servable[b]
        ideal.append(servable[b] + (u if work_u[b] <= slots[b] else u * slots[b] / work_u[b]))
        d = offered[b]
        ideal_raw.append(d if work_all[b] <= slots[b] else d * slots[b] / work_all[b])
    return Plan(
        arrivals=arrivals,
        duration=schedule.duration,
        offered=offered,
        cache_servable=servable,
        uncacheable_work=work_u,
        work=work_all,
        slots=slots,
        ideal=ideal,
        ideal_raw=ideal_raw,
        steps=idents["step"],
        webhooks=idents["webhook"],
        uploads=idents["upload"],
    )


# --------------------------------------------------------------------------- clients


class CountingTransport(httpx.AsyncBaseTransport):
    """Counts every request that leaves a client for the server (retry amplification)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, log: ObservationLog) -> None:
        self.inner = inner
        self.log = log

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.log.upstream_sent()
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            self.log.upstream_answered(None)
            raise
        self.log.upstream_answered(response.status_code)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


class Client(Protocol):
    """What a runner, the webhook sender and the uploader send their requests through."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        """The final answer, or None when the client gave up (error, timeout)."""
        ...

    def has_layer(self, digest: str) -> bool:
        """A local layer store already holds this layer (docker skips it)."""
        ...

    def keep_layer(self, digest: str) -> None: ...

    async def aclose(self) -> None: ...


class _NoLayerStore:
    def has_layer(self, digest: str) -> bool:
        return False

    def keep_layer(self, digest: str) -> None:
        return None


class NaiveClient(_NoLayerStore):
    """Today's naive CI client, kept as the collapse witness: a fixed 2 s timeout per
    attempt, three immediate retries on errors, 429 and 5xx, no jitter, breaker or cache."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        config: LoadConfig,
        *,
        base_url: str = BASE_URL,
    ) -> None:
        self.http = httpx.AsyncClient(transport=transport, base_url=base_url)
        self.config = config

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        response: httpx.Response | None = None
        for _ in range(1 + self.config.naive_retries):
            try:
                async with asyncio.timeout(self.config.naive_attempt_timeout):
                    response = await self.http.request(
                        method, url, headers=headers, content=content
                    )
            except (TimeoutError, httpx.HTTPError):
                response = None
                continue
            if response.status_code < 500 and response.status_code != 429:
                return response
        return response

    async def aclose(self) -> None:
        await self.http.aclose()


class _RetryableStatus(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


class DockerLikeClient:
    """What docker does, on tenacity: a local layer store, and its real retry schedule.

    moby's layer download (``distribution/xfer/download.go``): 5 attempts, waiting 5, 10,
    15 and 20 s between them, on transport errors and 5xx; a 429 is not retried
    (``errcode.ErrorCodeTooManyRequests`` is a ``DoNotRetry``). The manifest is fetched
    once (a failed tag resolution fails the pull). Webhook and upload requests are sent
    once: their senders' own schedules are the world's, not the client's. No per-attempt
    timeout: docker's registry transport has none past the connect timeout.
    """

    LAYER_ATTEMPTS = 5
    LAYER_WAIT_START = 5.0
    LAYER_WAIT_INCREMENT = 5.0

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        clock: Clock = SYSTEM_CLOCK,
        base_url: str = BASE_URL,
    ) -> None:
        self.http = httpx.AsyncClient(transport=transport, base_url=base_url)
        self.clock = clock
        self.layers: set[str] = set()

    def has_layer(self, digest: str) -> bool:
        return digest in self.layers

    def keep_layer(self, digest: str) -> None:
        self.layers.add(digest)

    def layer_retrying(self) -> tenacity.AsyncRetrying:
        return tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.LAYER_ATTEMPTS),
            wait=tenacity.wait_incrementing(
                start=self.LAYER_WAIT_START, increment=self.LAYER_WAIT_INCREMENT
            ),
            retry=tenacity.retry_if_exception_type((_RetryableStatus, httpx.TransportError)),
            sleep=self.clock.sleep,
            reraise=True,
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        try:
            if method == "GET" and "/blobs/" in url:
                async for attempt in self.layer_retrying():
                    with attempt:
                        response = await self.http.request(method, url, headers=headers)
                        if response.status_code >= 500:
                            raise _RetryableStatus(response)
                return response
            return await self.http.request(method, url, headers=headers, content=content)
        except _RetryableStatus as exc:
            return exc.response
        except httpx.HTTPError:
            return None

    async def aclose(self) -> None:
        await self.http.aclose()


class StackClient(_NoLayerStore):
    """One call through a scenario's transport stack (seawall's client face): retries,
    breaking and caching are the stack's business, never the lab's."""

    def __init__(self, transport: httpx.AsyncBaseTransport, *, base_url: str = BASE_URL) -> None:
        self.http = httpx.AsyncClient(transport=transport, base_url=base_url)

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response | None:
        try:
            return await self.http.request(method, url, headers=headers, content=content)
        except Exception:  # transport errors, a mechanism's "gave up" errors
            return None  # (CancelledError is a BaseException: it propagates)

    async def aclose(self) -> None:
        await self.http.aclose()


# --------------------------------------------------------------------------- the generator


class LoadGenerator:
    """Plays a :class:`Plan` in real time against one client per runner.

    Owns every task it starts; whatever is still running ``drain_seconds`` after the
    profile ends is cancelled and counted as failed, so every planned request is recorded
    exactly once (conservation, checked by the quick replay test).
    """

    def __init__(
        self,
        plan: Plan,
        catalog: Catalog,
        clients: list[Client],
        log: ObservationLog,
        config: LoadConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.plan = plan
        self.catalog = catalog
        self.clients = clients
        self.log = log
        self.config = config
        self.clock = clock
        self.upload_body = b"a" * (config.upload_kib * 1024)
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0 = 0.0

    async def run(self, t0: float) -> None:
        """Send every arrival at its time, then drain (bounded)."""
        self._t0 = t0
        try:
            for arrival in self.plan.arrivals:
                delay = t0 + arrival.at - self.clock.now()
                if delay > 0:
                    await self.clock.sleep(delay)
                self.log.drift(self.clock.now() - t0 - arrival.at)
                task = asyncio.create_task(self._handle(arrival))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            end = t0 + self.plan.duration
            if end > self.clock.now():
                await self.clock.sleep(end - self.clock.now())
            drain_until = self.clock.now() + self.config.drain_seconds
            while self._tasks and self.clock.now() < drain_until:
                await self.clock.sleep(0.1)
        finally:
            pending = list(self._tasks)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _handle(self, arrival: Arrival) -> Coroutine[Any, Any, None]:
        if arrival.kind == "step":
            return self._step(arrival)
        if arrival.kind == "webhook":
            return self._webhook(arrival)
        return self._upload(arrival)

    async def _step(self, arrival: Arrival) -> None:
        client = self.clients[arrival.runner]
        image = self.catalog.images[arrival.image]
        planned = 1 + len(image.layers)
        started = self.clock.now()
        records: list[tuple[str, bool, float | None]] = []
        ok = False
        reason = "cancelled"
        marks = (
            {STEP_HEADER: f"r{arrival.runner}-s{arrival.ident}"} if self.config.mark_steps else None
        )
        try:
            async with asyncio.timeout(self.config.step_timeout):
                t = self.clock.now()
                response = await client.request("GET", image.path, headers=marks)
                layers: list[str] = []
                good = response is not None and response.status_code == 200
                if good and response is not None:
                    try:
                        doc = json.loads(response.content)
                        layers = [layer["digest"] for layer in doc["layers"]]
                    except (ValueError, KeyError, TypeError):
                        good = False
                records.append(("manifest", good, self.clock.now() - t))
                if not good:
                    reason = "manifest"
                else:
                    gate = asyncio.Semaphore(self.config.layer_concurrency)
                    results = await asyncio.gather(
                        *(self._layer(client, image.name, d, gate, records, marks) for d in layers)
                    )
                    ok = all(results)
                    reason = "ok" if ok else "layer"
        except TimeoutError:
            ok = False
            reason = "timeout"
        finally:
            ended = self.clock.now()
            on_time = ok and ended - started <= self.config.on_time
            # requests never answered (timeout, cancelled, layers after a failed manifest)
            # are planned requests that failed: every planned request is recorded once
            records.extend([("blob", False, None)] * (planned - len(records)))
            for kind, good, latency in records[:planned]:
                self.log.request(
                    kind, arrival.at, ok=good, useful=good and on_time, latency=latency
                )
            outcome = "on_time" if on_time else "late" if ok else "failed"
            self.log.step(arrival.at, ended - self._t0, outcome, reason)

    async def _layer(
        self,
        client: Client,
        repo: str,
        digest: str,
        gate: asyncio.Semaphore,
        records: list[tuple[str, bool, float | None]],
        marks: dict[str, str] | None,
    ) -> bool:
        """Pull one layer (unless the local store has it) and verify its digest."""
        if client.has_layer(digest):
            records.append(("blob", True, 0.0))
            return True
        async with gate:
            t = self.clock.now()
            response = await client.request("GET", f"/v2/{repo}/blobs/{digest}", headers=marks)
            good = (
                response is not None
                and response.status_code == 200
                and "sha256:" + sha256(response.content).hexdigest() == digest
            )
            records.append(("blob", good, self.clock.now() - t))
        if good:
            client.keep_layer(digest)
        return good

    async def _attempt(
        self, send: Callable[[], Awaitable[httpx.Response | None]]
    ) -> httpx.Response | None:
        try:
            async with asyncio.timeout(self.config.request_timeout):
                return await send()
        except TimeoutError:
            return None

    async def _webhook(self, arrival: Arrival) -> None:
        """The sender: at once, then after each redelivery wait, same key every time."""
        client = self.clients[arrival.runner]
        headers = {"idempotency-key": f"hook-{arrival.ident}"}
        t = self.clock.now()
        outcome = "lost"
        try:
            for attempt, wait in enumerate((0.0, *self.config.webhook_redelivery)):
                if wait:
                    await self.clock.sleep(wait)
                response = await self._attempt(
                    lambda: client.request(
                        "POST",
                        f"/hooks/{arrival.ident}",
                        headers=headers,
                        content=b'{"event":"repo:push"}',
                    )
                )
                if response is not None and 200 <= response.status_code < 300:
                    outcome = "on_time" if attempt == 0 else "late"
                    break
        finally:
            ok = outcome != "lost"
            self.log.request(
                "webhook",
                arrival.at,
                ok=ok,
                useful=outcome == "on_time",
                latency=self.clock.now() - t,
            )
            self.log.delivery("webhook", outcome)

    async def _upload(self, arrival: Arrival) -> None:
        """The uploader: one PUT with an idempotency key (its URL is idempotent anyway)."""
        client = self.clients[arrival.runner]
        headers = {"idempotency-key": f"upload-{arrival.ident}"}
        t = self.clock.now()
        ok = False
        try:
            response = await self._attempt(
                lambda: client.request(
                    "PUT",
                    f"/attachments/{arrival.ident}",
                    headers=headers,
                    content=self.upload_body,
                )
            )
            ok = response is not None and response.status_code == 200
        finally:
            latency = self.clock.now() - t
            self.log.request("upload", arrival.at, ok=ok, useful=ok, latency=latency)
            self.log.delivery("upload", "on_time" if ok else "lost")
