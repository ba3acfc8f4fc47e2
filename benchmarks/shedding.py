"""Goodput under load: a fixed-capacity Starlette app, bare and behind LoadShedMiddleware.

The simulated app has ``slots`` workers (default 8) and, like a real server, an unbounded
FIFO in front of them and no idea that a client has given up: work for an abandoned
request is still done. A client gives up after ``--timeout`` (it then sends
``http.disconnect``, as a closed connection would). Each level runs on a fresh app and
fresh middleware (``LoadShedMiddleware()`` with the DEFAULT policy: nothing here is tuned
to these scenarios), after an unmeasured warm-up at 0.5x. Calls are raw ASGI, in-process.

Loads (open loop; C = slots / mean service time):

- ``poisson``: Poisson arrivals, 20 ms each (90% blobs by digest, 10% manifests by tag);
- ``bursty``: Poisson batches of 8 blob requests arriving together (a step's layers);
- ``mixed``: Poisson arrivals, exponentially distributed service (mean 20 ms);
- ``steps``: build steps (the issue's shape): a manifest by tag (10 ms), then 2-8 layers
  at once (30-60 ms each) when it succeeded; bursty and mixed at once.

Variants: ``bare`` (no middleware), ``seawall`` (defaults, the headline) and ``static``
(what a competent user who knows the capacity would run instead: a fixed limit of 1.5x
the worker count, ``ShedPolicy(adaptive=False, initial_limit=12)``).

Goodput = responses with status 200 completed within the client's timeout, per second,
as a fraction of C. Event-loop lag is sampled by a 5 ms ticker; a run whose lag p99 is
above 5 ms is flagged (the machine, not the server, was the bottleneck).

Cold start: an I/O-bound endpoint that sleeps 200 ms (no worker limit), on a fresh
middleware: 50 closed-loop clients for 3 s, and a burst of 300 requests at once.

    .venv/bin/python benchmarks/shedding.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message

from seawall.asgi.shed import LoadShedMiddleware
from seawall.events import EventBus
from seawall.policy.shed import ShedPolicy
from seawall.shed import ConcurrencyLimitChanged, ConcurrencySlot

LAG_INVALID = 0.005
SERVICE_HEADER = b"x-bench-service"
VARIANTS = ("bare", "seawall", "static")


def make_app(slots: int | None) -> Starlette:
    """An app of ``slots`` workers (None: unlimited, I/O-bound) that finishes every
    request it started (no disconnect check); the service time comes with the request."""
    sem = asyncio.Semaphore(slots) if slots is not None else None

    async def work(request: Request) -> None:
        service = float(request.headers.get(SERVICE_HEADER.decode(), "0.02"))
        if sem is None:
            await asyncio.sleep(service)
            return
        async with sem:
            await asyncio.sleep(service)

    async def blob(request: Request) -> Response:
        await work(request)
        return Response(b"x" * 512, media_type="application/octet-stream")

    async def manifest(request: Request) -> Response:
        await work(request)
        return Response(b"{}", media_type="application/vnd.oci.image.manifest.v1+json")

    return Starlette(
        routes=[
            Route("/v2/{name:path}/blobs/{digest}", blob),
            Route("/v2/{name:path}/manifests/{ref}", manifest),
        ]
    )


@dataclass(frozen=True)
class Load:
    """An arrival process and a service-time law; ``mean_service`` fixes C."""

    name: str
    batch: int  # requests arriving together (1: plain Poisson)
    steps: bool  # a manifest, then 2-8 layers when it succeeded
    service: Callable[[random.Random, bool], float]  # (rng, is_manifest) -> seconds
    mean_service: float


def _fixed(rng: random.Random, manifest: bool) -> float:
    return 0.020


def _exponential(rng: random.Random, manifest: bool) -> float:
    return rng.expovariate(1 / 0.020)


def _step_service(rng: random.Random, manifest: bool) -> float:
    return 0.010 if manifest else rng.uniform(0.030, 0.060)


STEP_LAYERS = (2, 8)
_MEAN_LAYERS = sum(STEP_LAYERS) / 2
LOADS = {
    "poisson": Load("poisson", 1, False, _fixed, 0.020),
    "bursty": Load("bursty", 8, False, _fixed, 0.020),
    "mixed": Load("mixed", 1, False, _exponential, 0.020),
    "steps": Load(
        "steps", 1, True, _step_service, (0.010 + _MEAN_LAYERS * 0.045) / (1 + _MEAN_LAYERS)
    ),
}


def make_variant(variant: str, app: Any, slots: int, bus: EventBus) -> Any:
    if variant == "bare":
        return app
    if variant == "seawall":
        return LoadShedMiddleware(app, events=bus)
    if variant == "static":
        policy = ShedPolicy(adaptive=False, initial_limit=slots + slots // 2)
        return LoadShedMiddleware(app, policy, events=bus)
    raise ValueError(variant)


@dataclass
class Result:
    variant: str
    load: str
    level: float
    duration: float
    capacity: float
    sent: int = 0
    ok_in_time: int = 0
    ok_late: int = 0
    shed: int = 0
    unfinished: int = 0
    steps: int = 0
    steps_ok: int = 0
    ok_latency: list[float] = field(default_factory=list)
    shed_latency: list[float] = field(default_factory=list)
    lag: list[float] = field(default_factory=list)
    limits: list[int] = field(default_factory=list)

    @property
    def goodput_fraction(self) -> float:
        return self.ok_in_time / self.duration / self.capacity

    @property
    def shed_fraction(self) -> float:
        return self.shed / self.sent if self.sent else 0.0

    @property
    def lag_p99(self) -> float:
        return pct(self.lag, 99)

    @property
    def valid(self) -> bool:
        return self.lag_p99 <= LAG_INVALID


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def ticker(lag: list[float], stop: asyncio.Event, period: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    expected = loop.time() + period
    while not stop.is_set():
        await asyncio.sleep(max(0.0, expected - loop.time()))
        now = loop.time()
        lag.append(max(0.0, now - expected))
        expected = now + period


def http_scope(path: str, service: float, client: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"registry"), (SERVICE_HEADER, f"{service:.6f}".encode())],
        "client": (f"10.0.{client >> 8 & 255}.{client & 255}", 1),
        "server": ("registry", 80),
    }


async def call(app: Any, scope: dict[str, Any], give_up: float) -> tuple[int, float | None]:
    """One request with a client that gives up after ``give_up`` s: (status, done at)."""
    loop = asyncio.get_running_loop()
    status = 0
    done_at: float | None = None
    disconnect: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(give_up, _resolve, disconnect)
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.shield(disconnect)  # a cancelled watch must not cancel the client
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, done_at
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done_at = loop.time()

    try:
        await app(scope, receive, send)
    finally:
        timer.cancel()
    return status, done_at


async def run_level(
    variant: str,
    load: Load,
    level: float,
    *,
    slots: int,
    duration: float,
    warmup: float,
    client_timeout: float,
    seed: int,
) -> Result:
    timeout = client_timeout
    capacity = slots / load.mean_service
    bus = EventBus()
    limits: list[int] = []
    bus.subscribe(
        lambda e: limits.append(e.new) if isinstance(e, ConcurrencyLimitChanged) else None
    )
    app = make_variant(variant, make_app(slots), slots, bus)
    res = Result(variant, load.name, level, duration, capacity)
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[Any]] = set()
    window = [float("inf"), float("inf")]  # the measured window, set after warm-up
    clients = iter(range(1, 1 << 30))

    async def one(path: str, manifest: bool, measured: bool, t0: float) -> bool:
        service = load.service(rng, manifest)
        status, done_at = await call(app, http_scope(path, service, next(clients)), timeout)
        ok = status == 200 and done_at is not None and done_at - t0 <= timeout
        if ok and done_at is not None and window[0] <= done_at <= window[1]:
            res.ok_in_time += 1  # goodput: completions inside the measured window
        if not measured:
            return ok
        res.sent += 1
        if done_at is None:
            res.unfinished += 1
            return False
        latency = done_at - t0
        if status == 200:
            res.ok_latency.append(latency)
            if latency > timeout:
                res.ok_late += 1
        elif status == 503:
            res.shed += 1
            res.shed_latency.append(latency)
        return ok

    async def step(measured: bool) -> None:
        image = rng.getrandbits(32)
        t0 = loop.time()
        ok = await one(f"/v2/team/app{image % 800}/manifests/v1", True, measured, t0)
        if ok:
            layers = [
                one(
                    f"/v2/team/app{image % 800}/blobs/sha256:{rng.getrandbits(64):016x}",
                    False,
                    measured,
                    loop.time(),
                )
                for _ in range(rng.randint(*STEP_LAYERS))
            ]
            ok = all(await asyncio.gather(*layers))
        if measured:
            res.steps += 1
            res.steps_ok += ok

    def spawn(coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def arrivals(rate: float, seconds: float, measured: bool) -> None:
        # exactly rate * seconds requests, at uniformly random times (Poisson arrivals
        # conditioned on their count): a level offers what it says, not +-10% by chance
        per_event = (1 + _MEAN_LAYERS) if load.steps else load.batch
        start = loop.time()
        events = round(rate * seconds / per_event)
        for t in sorted(start + rng.uniform(0, seconds) for _ in range(events)):
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if load.steps:
                spawn(step(measured))
                continue
            for _ in range(load.batch):
                digest = rng.getrandbits(64)
                manifest = load.batch == 1 and rng.random() < 0.1
                path = (
                    f"/v2/library/app/manifests/v{digest % 50}"
                    if manifest
                    else f"/v2/library/app/blobs/sha256:{digest:016x}"
                )
                spawn(one(path, manifest, measured, loop.time()))
        delay = start + seconds - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(res.lag, stop))
    await arrivals(0.5 * capacity, warmup, measured=False)
    res.lag.clear()
    window[0] = loop.time()
    window[1] = window[0] + duration
    await arrivals(level * capacity, duration, measured=True)
    # Clients still waiting have up to `timeout` to get an answer (a step's layers may
    # start late); then the level ends.
    if tasks:
        await asyncio.wait(set(tasks), timeout=2 * timeout)
    stop.set()
    await tick
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    res.limits = limits
    return res


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x * 1000:7.1f}"


async def unloaded_latency(slots: int, n: int) -> float:
    app = make_app(slots)
    loop = asyncio.get_running_loop()
    latencies = []
    for i in range(n):
        t0 = loop.time()
        await call(app, http_scope(f"/v2/library/app/blobs/sha256:{i:016x}", 0.02, 1), 10.0)
        latencies.append(loop.time() - t0)
    return statistics.median(latencies)


@dataclass
class ColdStart:
    variant: str
    closed_ok: int = 0  # 50 closed-loop clients, completions in the first 3 s
    burst_ok: int = 0  # 300 at once: answered 200
    burst_shed: int = 0
    burst_done: float = 0.0  # seconds until the last burst answer


async def cold_start(variant: str, *, seconds: float, clients: int, burst: int) -> ColdStart:
    """A fresh middleware in front of an I/O-bound endpoint (200 ms, no worker limit)."""
    out = ColdStart(variant)
    loop = asyncio.get_running_loop()
    app = make_variant(variant, make_app(None), 8, EventBus())
    end = loop.time() + seconds

    async def client(n: int) -> None:
        while loop.time() < end:
            status, done_at = await call(app, http_scope("/v2/a/manifests/v1", 0.2, n), 5.0)
            if status == 200 and done_at is not None and done_at <= end:
                out.closed_ok += 1
            elif status != 200:
                await asyncio.sleep(0.01)  # a shed client tries again shortly

    await asyncio.gather(*(client(n) for n in range(clients)))
    app = make_variant(variant, make_app(None), 8, EventBus())
    t0 = loop.time()
    results = await asyncio.gather(
        *(call(app, http_scope(f"/v2/a/manifests/v{n}", 0.2, n), 30.0) for n in range(burst))
    )
    out.burst_ok = sum(1 for status, _ in results if status == 200)
    out.burst_shed = sum(1 for status, _ in results if status == 503)
    out.burst_done = max((d for _, d in results if d is not None), default=t0) - t0
    return out


def chart(results: list[Result], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    rs = [r for r in results if r.load == "poisson"]
    levels = sorted({r.level for r in rs})
    ax.plot(levels, [min(1.0, x) for x in levels], "k:", label="ideal min(offered, C)")
    for variant, style in (("bare", "o-"), ("seawall", "s-"), ("static", "^--")):
        vs = sorted((r for r in rs if r.variant == variant), key=lambda r: r.level)
        if not vs:
            continue
        ax.plot([r.level for r in vs], [r.goodput_fraction for r in vs], style, label=variant)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--", label="goal: 95% of C")
    ax.set_xscale("log")
    ax.set_xticks(levels)
    # 0.9x and 1x sit too close on a log axis for two labels: keep the capacity's
    ax.set_xticklabels(["" if x == 0.9 and 1.0 in levels else f"{x:g}x" for x in levels])
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("offered load (multiple of capacity C)")
    ax.set_ylabel("goodput / C (200 within client timeout)")
    ax.set_title("Load shedding: goodput vs offered load (Poisson)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    path = out / "shedding-goodput.png"
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


async def rejection_cost(n: int) -> tuple[float, float]:
    """Microseconds per shed request through the middleware (limit held, no queue): p50, p99."""

    async def never(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("a shed request reached the app")

    # default policy without a queue: the path of a refusal under sustained overload
    mw = LoadShedMiddleware(never, ShedPolicy(max_queue_length=0))
    while isinstance(mw.limiter.try_acquire(1000), ConcurrencySlot):
        pass  # hold every slot: what follows is shed
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/v2/library/app/blobs/sha256:0",
        "headers": [],
    }

    async def receive() -> Message:  # pragma: no cover - never called when shed
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    costs = []
    for _ in range(n):
        t0 = time.perf_counter()
        await mw(scope, receive, send)
        costs.append(time.perf_counter() - t0)
    return pct(costs, 50) * 1e6, pct(costs, 99) * 1e6


PLAN: dict[str, tuple[float, ...]] = {
    "poisson": (0.5, 0.9, 1.0, 2.0, 5.0, 10.0),
    "bursty": (0.5, 0.9, 2.0, 5.0),
    "mixed": (0.5, 0.9, 2.0, 5.0),
    "steps": (0.5, 0.9, 2.0, 5.0),
}


def verdicts(results: list[Result], base: float) -> list[tuple[str, bool]]:
    """The issue's goals for the default middleware, one line each."""
    out = []
    for r in results:
        if r.variant != "seawall":
            continue
        tag = f"{r.load} {r.level:g}x"
        if r.level <= 0.9:
            out.append((f"{tag}: shed {r.shed_fraction:.2%} <= 0.5%", r.shed_fraction <= 0.005))
        elif r.level >= 2 and r.load == "poisson":
            p99 = pct(r.ok_latency, 99)
            out.append(
                (f"{tag}: goodput {r.goodput_fraction:.3f} >= 0.95", r.goodput_fraction >= 0.95)
            )
            out.append((f"{tag}: p99 {p99 / base:.2f}x unloaded <= 3", p99 <= 3 * base))
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 s per level instead of 3 s")
    parser.add_argument("--out", type=Path, help="directory for the PNG chart")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loads", default=",".join(PLAN), help="comma-separated loads")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--no-cold-start", action="store_true")
    args = parser.parse_args()
    duration = 1.0 if args.quick else 3.0
    warmup = 0.5 if args.quick else 1.0
    variants = [v for v in args.variants.split(",") if v]
    gc.freeze()
    base = await unloaded_latency(args.slots, 20 if args.quick else 50)
    print(
        f"{args.slots} workers; client timeout {args.timeout:g} s; {duration:g} s per level "
        f"after {warmup:g} s warm-up at 0.5x; unloaded latency {base * 1000:.1f} ms"
    )
    cost50, cost99 = await rejection_cost(2000 if args.quick else 20000)
    print(
        f"cost of one shed request through the middleware: p50 {cost50:.1f} us, p99 {cost99:.1f} us"
    )
    results: list[Result] = []
    started = time.perf_counter()
    for name in args.loads.split(","):
        load = LOADS[name]
        for level in PLAN[name]:
            for variant in variants:
                results.append(
                    await run_level(
                        variant,
                        load,
                        level,
                        slots=args.slots,
                        duration=duration,
                        warmup=warmup,
                        client_timeout=args.timeout,
                        seed=args.seed + int(level * 10),
                    )
                )
    header = (
        f"{'load':8} {'level':>5} {'variant':8} {'sent':>6} {'goodput/C':>9} {'shed':>7} "
        f"{'p50 ok':>7} {'p99 ok':>7} {'p99/unl':>7} {'steps ok':>8} {'limit':>5} {'lag p99':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        p99 = pct(r.ok_latency, 99)
        steps = f"{r.steps_ok / r.steps:8.1%}" if r.steps else f"{'-':>8}"
        print(
            f"{r.load:8} {r.level:>4g}x {r.variant:8} {r.sent:>6} {r.goodput_fraction:>9.3f} "
            f"{r.shed_fraction:>7.2%} {fmt_ms(pct(r.ok_latency, 50))} {fmt_ms(p99)} "
            f"{p99 / base:>7.2f} {steps} {(r.limits[-1] if r.limits else '-'):>5} "
            f"{fmt_ms(r.lag_p99)}{'' if r.valid else ' (loop lag)'}"
        )
    print("(latencies in ms; C = workers / mean service time; 'limit' = seawall's at the end)")
    ok_all = True
    if not args.no_cold_start:
        print("\ncold start, I/O-bound endpoint (200 ms, no worker limit), fresh middleware:")
        print(
            f"{'variant':8} {'50 clients, OK in 3 s':>22} {'ratio':>6} {'burst 300: OK':>14} "
            f"{'shed':>5} {'last answer':>11}"
        )
        colds = [await cold_start(v, seconds=3.0, clients=50, burst=300) for v in variants]
        bare = next((c for c in colds if c.variant == "bare"), None)
        for c in colds:
            ratio = c.closed_ok / bare.closed_ok if bare and bare.closed_ok else float("nan")
            print(
                f"{c.variant:8} {c.closed_ok:>22} {ratio:>6.2f} {c.burst_ok:>14} "
                f"{c.burst_shed:>5} {c.burst_done:>10.2f}s"
            )
            if c.variant == "seawall" and bare:
                ok = ratio >= 0.8 and c.burst_shed == 0
                ok_all = ok_all and ok
                print(
                    f"  goal: cold start >= 0.8x bare and no burst shed: {'ok' if ok else 'MISS'}"
                )
    print("\ngoals for the default LoadShedMiddleware:")
    for text, ok in verdicts(results, base):
        ok_all = ok_all and ok
        print(f"  {'ok  ' if ok else 'MISS'} {text}")
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    if args.out:
        print(f"chart: {chart(results, args.out)}")
    if not all(r.valid for r in results if r.variant != "bare"):
        print("WARNING: some protected runs had event-loop lag p99 > 5 ms (a busy machine)")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
