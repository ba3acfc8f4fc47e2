"""Build steps through a surge: how many started steps finish, against the bound.

A registry of ``--workers`` slots (manifest 10 ms, layers 30-60 ms each, an unbounded FIFO
in front, work done even for clients that gave up) serves a *flat* catalogue: every image
has its own manifest (by tag) and 2-8 layers of its own, and every surge step pulls an
image no other surge step pulls. Half of those images were pulled before (they are in the
fallback cache: seeded through a zero-latency copy of the registry, so nothing is learned
by the shedder from it), half were never fetched. A warm-up at 0.5x capacity pulls cached
images; then build steps arrive at ``--surge`` x capacity for ``--seconds``; then nothing
new starts and the level ends when every step has finished or passed its deadline.

A step is one client pulling one image: GET the manifest by tag, then every layer at once;
it succeeds if every request got a 200 within ``--deadline`` s of its start. Clients are
plain, identical in every variant, with one documented retry rule: an answer 503 or 429
is retried after its ``Retry-After`` (1 s without one) plus up to 250 ms of jitter, and an
attempt with no answer after 5 s is abandoned (the client disconnects) and retried, all
while the step's deadline allows. No client sends ``x-seawall-step``: the server infers
steps from the client and the repository.

Variants (the server side only):

- ``bare``: the registry alone (no cache either);
- ``seawall``: ``FallbackCacheMiddleware(LoadShedMiddleware(app))``, all DEFAULTS;
- ``bulkhead``: what a competent team runs without seawall's admission: the same cache in
  front of a fixed concurrency cap that refuses at once above it (like uvicorn's
  ``--limit-concurrency``): ``ShedPolicy(adaptive=False, initial_limit=1.5 x workers,
  max_queue_length=0, classes=())``.

The bound: a step whose image is cached can be answered entirely by the cache; the others
need registry time (their manifest and layers). So at most ``cached + min(uncached,
workers x (seconds + deadline) / mean registry time per uncached step)`` surge steps can
succeed. "of bound" = successful steps / bound is the figure of merit.

    .venv/bin/python benchmarks/build_steps.py [--quick] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.asgi.shed import LoadShedMiddleware
from seawall.cache import FallbackCache
from seawall.policy.shed import ShedPolicy

MANIFEST_SERVICE = 0.010
LAYER_SERVICE = (0.030, 0.060)
LAYERS = (2, 8)
ATTEMPT_TIMEOUT = 5.0
JITTER = 0.25


@dataclass(frozen=True)
class Image:
    name: str
    layers: tuple[tuple[str, bytes, float], ...]  # (digest, body, service seconds)
    manifest: bytes

    @property
    def work(self) -> float:
        return MANIFEST_SERVICE + sum(s for _, _, s in self.layers)


def catalogue(n: int, rng: random.Random) -> list[Image]:
    images = []
    for i in range(n):
        layers = []
        for j in range(rng.randint(*LAYERS)):
            data = f"image {i} layer {j} ".encode() * 64
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            layers.append((digest, data, rng.uniform(*LAYER_SERVICE)))
        manifest = ('{"layers":[' + ",".join(f'"{d}"' for d, _, _ in layers) + "]}").encode()
        images.append(Image(f"lib/app{i}", tuple(layers), manifest))
    return images


class Registry:
    """A fixed number of workers behind an unbounded FIFO; finishes abandoned work."""

    def __init__(self, workers: int, images: list[Image], *, instant: bool = False) -> None:
        self.instant = instant  # the copy that seeds the cache: no workers, no delay
        self.slots = asyncio.Semaphore(workers)
        self.manifests = {f"/v2/{im.name}/manifests/latest": im for im in images}
        self.blobs = {f"/v2/{im.name}/blobs/{d}": (b, s) for im in images for d, b, s in im.layers}
        self.busy = 0.0  # worker-seconds spent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        image = self.manifests.get(path)
        if image is not None:
            body, service = image.manifest, MANIFEST_SERVICE
            kind = b"application/vnd.oci.image.manifest.v1+json"
        elif path in self.blobs:
            body, service = self.blobs[path]
            kind = b"application/octet-stream"
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if not self.instant:
            async with self.slots:
                await asyncio.sleep(service)
                self.busy += service
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def build(variant: str, registry: Registry, workers: int, cache: FallbackCache) -> Any:
    if variant == "bare":
        return registry
    if variant == "seawall":
        return FallbackCacheMiddleware(LoadShedMiddleware(registry), cache)
    if variant == "bulkhead":
        cap = ShedPolicy(
            adaptive=False, initial_limit=workers + workers // 2, max_queue_length=0, classes=()
        )
        return FallbackCacheMiddleware(LoadShedMiddleware(registry, cap), cache)
    raise ValueError(variant)


@dataclass
class Outcome:
    variant: str
    steps: int = 0
    steps_ok: int = 0
    cached_steps: int = 0  # surge steps whose image was pulled in the warm-up
    cached_ok: int = 0
    uncached_work: float = 0.0
    attempts: int = 0
    logical: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    bound: float = 0.0
    seconds: float = 0.0

    @property
    def success(self) -> float:
        return self.steps_ok / self.steps if self.steps else 0.0

    @property
    def of_bound(self) -> float:
        return self.steps_ok / self.bound if self.bound else 0.0


async def fetch(app: Any, path: str, client: str, give_up: float) -> tuple[int, str, float]:
    """One attempt: (status, x-seawall-cache, Retry-After seconds); 0 when abandoned."""
    loop = asyncio.get_running_loop()
    disconnect: asyncio.Future[None] = loop.create_future()
    timer = loop.call_later(give_up, lambda: disconnect.done() or disconnect.set_result(None))
    status, cached, retry_after = 0, "", 1.0
    done = False
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.shield(disconnect)  # a cancelled watch must not cancel the client
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, cached, retry_after, done
        if disconnect.done():
            return
        if message["type"] == "http.response.start":
            status = message["status"]
            for k, v in message.get("headers", ()):
                if k == b"x-seawall-cache":
                    cached = v.decode()
                elif k == b"retry-after":
                    retry_after = float(v)
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done = True

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"registry"), (b"accept", b"*/*")],
        "client": (client, 40000),
        "server": ("registry", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        await asyncio.wait((task, disconnect), return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
    if not done:
        if not disconnect.done():
            disconnect.set_result(None)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # finishes alone
        return 0, "", 1.0
    await task
    return status, cached, retry_after


async def get(
    app: Any, path: str, client: str, deadline: float, rng: random.Random, out: Outcome | None
) -> bool:
    """The documented retry: 503/429 after Retry-After (+ jitter), no answer after 5 s."""
    loop = asyncio.get_running_loop()
    if out is not None:
        out.logical += 1
    while True:
        left = deadline - loop.time()
        if left <= 0:
            return False
        status, cached, retry_after = await fetch(app, path, client, min(ATTEMPT_TIMEOUT, left))
        if out is not None:
            out.attempts += 1
            out.statuses[f"{status}{' ' + cached if cached else ''}"] += 1
        if status == 200:
            return loop.time() <= deadline
        if status not in (0, 429, 503):
            return False
        wait = (retry_after if status else 0.0) + rng.uniform(0, JITTER)
        if loop.time() + wait >= deadline:
            return False
        await asyncio.sleep(wait)


async def step(
    app: Any, image: Image, client: str, deadline_s: float, rng: random.Random, out: Outcome | None
) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    if not await get(app, f"/v2/{image.name}/manifests/latest", client, deadline, rng, out):
        return False
    layers = [
        get(app, f"/v2/{image.name}/blobs/{d}", client, deadline, rng, out)
        for d, _, _ in image.layers
    ]
    return all(await asyncio.gather(*layers))


async def run(
    variant: str,
    *,
    workers: int,
    surge: float,
    seconds: float,
    warmup: float,
    deadline: float,
    seed: int,
) -> Outcome:
    rng = random.Random(seed)
    mean_work = MANIFEST_SERVICE + sum(LAYERS) / 2 * sum(LAYER_SERVICE) / 2
    capacity = workers / mean_work  # steps per second
    surge_steps = round(surge * capacity * seconds)
    images = catalogue(2 * surge_steps, rng)  # one image per surge step, half cached
    cached_images, fresh_images = images[:surge_steps], images[surge_steps:]
    registry = Registry(workers, images)
    cache = FallbackCache()
    app = build(variant, registry, workers, cache)
    out = Outcome(variant)
    loop = asyncio.get_running_loop()
    pulled: set[str] = set()
    tasks: set[asyncio.Task[Any]] = set()
    if variant != "bare":  # pulled before: seeded without the shedder seeing it
        seeder = FallbackCacheMiddleware(Registry(workers, images, instant=True), cache)
        for image in cached_images:
            assert await step(seeder, image, "10.0.0.1", 60.0, rng, None)
    pulled.update(im.name for im in cached_images)
    surge_order = cached_images + fresh_images
    rng.shuffle(surge_order)
    surge_queue = iter(surge_order)

    async def warm(image: Image, client: str) -> None:
        await step(app, image, client, deadline, rng, None)

    async def surge_step(image: Image, client: str) -> None:
        image = next(surge_queue)  # every surge step pulls an image of its own
        cached = image.name in pulled
        ok = await step(app, image, client, deadline, rng, out)
        out.steps += 1
        out.steps_ok += ok
        out.cached_steps += cached
        out.cached_ok += ok and cached
        if not cached:
            out.uncached_work += image.work

    async def arrivals(rate: float, span: float, fn: Any) -> None:
        start = loop.time()
        for t in sorted(start + rng.uniform(0, span) for _ in range(round(rate * span))):
            delay = t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            image = rng.choice(cached_images)
            task = asyncio.ensure_future(fn(image, f"10.1.{rng.randrange(64)}.1"))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    await arrivals(0.5 * capacity, warmup, warm)
    while tasks:  # the warm-up's steps finish before the surge
        await asyncio.wait(set(tasks))
    started = loop.time()
    await arrivals(surge * capacity, seconds, surge_step)
    while tasks:
        await asyncio.wait(set(tasks))
    out.seconds = loop.time() - started
    uncached = out.steps - out.cached_steps
    per_step = out.uncached_work / uncached if uncached else mean_work
    out.bound = out.cached_steps + min(uncached, workers * (seconds + deadline) / per_step)
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--surge", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--deadline", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", default="bare,seawall,bulkhead")
    args = parser.parse_args()
    warmup = 2.0 if args.quick else 4.0
    seconds = args.seconds / 2 if args.quick else args.seconds
    print(
        f"{args.workers} workers; surge {args.surge:g}x capacity for {seconds:g} s after "
        f"{warmup:g} s at 0.5x; step deadline {args.deadline:g} s; plain retrying clients"
    )
    header = (
        f"{'variant':9} {'seed':>4} {'steps':>6} {'ok':>5} {'success':>8} {'bound':>6} "
        f"{'of bound':>8} {'cached ok':>10} {'uncached ok':>12} {'ampl.':>6}  answers"
    )
    print(header)
    print("-" * len(header))
    started = time.perf_counter()
    best: dict[str, list[float]] = {}
    for r in range(args.repeat):
        for variant in args.variants.split(","):
            o = await run(
                variant,
                workers=args.workers,
                surge=args.surge,
                seconds=seconds,
                warmup=warmup,
                deadline=args.deadline,
                seed=args.seed + r,
            )
            best.setdefault(variant, []).append(o.of_bound)
            uncached = o.steps - o.cached_steps
            answers = ", ".join(f"{k}:{v}" for k, v in o.statuses.most_common(5))
            print(
                f"{variant:9} {args.seed + r:>4} {o.steps:>6} {o.steps_ok:>5} {o.success:>8.1%} "
                f"{o.bound:>6.0f} {o.of_bound:>8.1%} "
                f"{o.cached_ok:>4}/{o.cached_steps:<5} {o.steps_ok - o.cached_ok:>5}/{uncached:<6} "
                f"{o.attempts / max(1, o.logical):>6.2f}  {answers}"
            )
    print("('answers': status and x-seawall-cache of every attempt; 0 = abandoned after 5 s;")
    print(" 'ampl.': attempts per logical request)")
    ok = all(v >= 0.9 for v in best.get("seawall", [1.0]))
    print(f"goal: default stack >= 90% of the bound: {'ok' if ok else 'MISS'}")
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
