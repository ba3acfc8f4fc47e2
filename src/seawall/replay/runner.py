"""Run scenarios in real time, in-process (httpx.ASGITransport) or over loopback TCP.

Each scenario gets a fresh simulator, fresh clients (one per runner, each with its own
client address so per-client limits see them apart), its own event bus and its own work
directory. Scenarios run one after the other on the same seeded plan, so they face exactly
the same arrivals and none competes with another for the CPU. Besides the load, the runner
owns three small tasks per scenario: a sampler (server state every 100 ms), an event-loop
lag probe (every 20 ms) and a conductor that applies the profile's capacity changes and
restarts. All are cancelled when the scenario ends, and a hard timeout bounds it.

Validity (:func:`~seawall.replay.metrics.judge_validity`) is judged from the loop lag, the
process's CPU time over wall time and the arrival drift: a run whose harness was the
bottleneck says so instead of reporting figures about the server.

With ``sockets=True`` the server side (the scenario's middleware around the simulator) is
served by uvicorn on 127.0.0.1 in the same process, and every client talks HTTP/1.1 over
TCP from its own loopback address (127.0.0.2, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from starlette.types import ASGIApp

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.replay.load import (
    BASE_URL,
    Client,
    CountingTransport,
    DockerLikeClient,
    LoadConfig,
    LoadGenerator,
    Plan,
    plan_load,
)
from seawall.replay.metrics import (
    ObservationLog,
    Sample,
    ScenarioResult,
    judge_validity,
    summarize,
)
from seawall.replay.profile import Profile, Schedule, load_profile, sim_config_from
from seawall.replay.scenarios import (
    MISCONFIGURED_LIMIT_FACTOR,
    LabContext,
    Scenario,
    scenario_by_name,
)
from seawall.replay.simulator import Catalog, SimConfig, SimulatedRegistry

__all__ = [
    "ReplayResult",
    "capacity_rps",
    "plan_for",
    "run_replay",
    "run_scenario",
    "run_seeds",
    "time_constants",
]

SAMPLE_INTERVAL = 0.1
LAG_INTERVAL = 0.02

Progress = Callable[[str, float, float], None]
"""progress(scenario, seconds done, total)"""


@dataclass(slots=True)
class ReplayResult:
    profile: Profile
    schedule: Schedule
    quick: bool
    seed: int
    plan: Plan
    sockets: bool = False
    results: list[ScenarioResult] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return all(r.valid for r in self.results)


def capacity_rps(sim: SimConfig, catalog: Catalog) -> float:
    """Requests per second the base server answers with the normal build mix."""
    per_step = catalog.mean_step_work(sim.service)
    requests_per_step = 1 + sum(
        p * len(img.layers) for p, img in zip(catalog.popularity, catalog.images, strict=True)
    )
    return float(sim.slots * requests_per_step / per_step)


def time_constants(sim: SimConfig, load: LoadConfig) -> dict[str, float]:
    """Every time constant of the lab's world, in real seconds, as a run uses it.

    The same in a full and a ``--quick`` run: runs are shorter, never compressed (a test
    keeps it so). seawall's own constants are its defaults (docs/replay.md lists them).
    """
    svc = sim.service
    return {
        "service.manifest": svc.manifest,
        "service.blob (1 KiB)": svc.blob(1024),
        "service.webhook": svc.webhook,
        "server.restart": sim.restart_seconds,
        "step.on_time": load.on_time,
        "step.timeout": load.step_timeout,
        "request.timeout (webhook, upload)": load.request_timeout,
        **{f"webhook.redelivery[{i}]": w for i, w in enumerate(load.webhook_redelivery)},
        "naive.attempt_timeout": load.naive_attempt_timeout,
        "docker.layer_wait_start": DockerLikeClient.LAYER_WAIT_START,
        "docker.layer_wait_increment": DockerLikeClient.LAYER_WAIT_INCREMENT,
        "drain": load.drain_seconds,
    }


def _base_sim_config(profile: Profile, catalog: Catalog) -> SimConfig:
    base: SimConfig = sim_config_from(profile.server)
    cap = capacity_rps(base, catalog)
    limited: SimConfig = sim_config_from(
        profile.server, rate_limit_rps=MISCONFIGURED_LIMIT_FACTOR * cap
    )
    return limited


@contextlib.asynccontextmanager
async def _served(app: ASGIApp) -> AsyncIterator[str]:
    """uvicorn serving ``app`` on a free loopback port, in this event loop."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        access_log=False,
        backlog=2048,
        timeout_keep_alive=75,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        sock.close()


async def run_scenario(
    scenario: Scenario,
    profile: Profile,
    *,
    quick: bool = False,
    seed: int = 1,
    load: LoadConfig | None = None,
    progress: Progress | None = None,
    clock: Clock = SYSTEM_CLOCK,
    plan: Plan | None = None,
    sockets: bool = False,
) -> ScenarioResult:
    load = load or LoadConfig()
    schedule = profile.schedule(quick=quick)
    catalog = Catalog(seed=seed, **profile.catalog)
    world = _base_sim_config(profile, catalog)
    if plan is None:
        plan = plan_load(schedule, catalog, world, load, seed)
    sim_config: SimConfig = sim_config_from(
        profile.server, rate_limit_rps=world.rate_limit_rps, **scenario.sim_overrides(world)
    )
    log = ObservationLog()
    bus = EventBus()
    bus.subscribe(log.on_event)
    with tempfile.TemporaryDirectory(prefix=f"seawall-replay-{scenario.name}-") as workdir:
        ctx = LabContext(bus=bus, load=load, sim=sim_config, workdir=Path(workdir), clock=clock)
        sim = SimulatedRegistry(sim_config, catalog, clock=clock, upload_kib=load.upload_kib)
        app = scenario.server(sim, ctx)
        try:
            async with contextlib.AsyncExitStack() as stack:
                wires: list[httpx.AsyncBaseTransport]
                if sockets:
                    ctx.base_url = await stack.enter_async_context(_served(app))
                    wires = [
                        httpx.AsyncHTTPTransport(
                            local_address=f"127.0.0.{r + 2}",
                            limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
                        )
                        for r in range(load.runners)
                    ]
                else:
                    ctx.base_url = BASE_URL
                    wires = [
                        httpx.ASGITransport(app=app, client=(f"127.0.0.{r + 2}", 40000 + r))
                        for r in range(load.runners)
                    ]
                clients = [
                    scenario.client(CountingTransport(w, log), ctx, r) for r, w in enumerate(wires)
                ]
                for c in clients:
                    stack.push_async_callback(c.aclose)
                result = await _play(
                    scenario, schedule, plan, catalog, clients, sim, log, load, clock, progress
                )
        finally:
            sim.close()
            for close in ctx.closers:
                with contextlib.suppress(Exception):
                    await close()
    return result


async def _play(
    scenario: Scenario,
    schedule: Schedule,
    plan: Plan,
    catalog: Catalog,
    clients: list[Client],
    sim: SimulatedRegistry,
    log: ObservationLog,
    load: LoadConfig,
    clock: Clock,
    progress: Progress | None,
) -> ScenarioResult:
    generator = LoadGenerator(plan, catalog, list(clients), log, load, clock=clock)
    await _warm_up(clients, log)
    origin0 = sim.model.arrivals

    t0 = clock.now()
    wall0 = time.perf_counter()
    cpu0 = time.process_time()

    async def sampler() -> None:
        while True:
            m = sim.model
            now = clock.now()
            m.advance(now)
            log.sample(
                Sample(
                    t=now - t0,
                    queue=m.queue_length,
                    busy=m.busy,
                    slots=m.slots,
                    memory_mib=m.memory_mib(),
                    down=m.down_until is not None,
                )
            )
            if progress is not None:
                progress(scenario.name, min(now - t0, schedule.duration), schedule.duration)
            await clock.sleep(SAMPLE_INTERVAL)

    async def lag_probe() -> None:
        while True:
            before = clock.now()
            await asyncio.sleep(LAG_INTERVAL)
            log.lag(before - t0, max(0.0, clock.now() - before - LAG_INTERVAL))

    async def conductor() -> None:
        actions: list[tuple[float, str, float]] = [
            (t, "capacity", c) for t, c in schedule.capacity_changes()
        ]
        actions += [(t, e.kind, 0.0) for t, e in schedule.events if e.kind == "restart"]
        for at, kind, value in sorted(actions):
            delay = t0 + at - clock.now()
            if delay > 0:
                await clock.sleep(delay)
            if kind == "capacity":
                sim.set_capacity(value)
            else:
                sim.restart()

    helpers = [asyncio.create_task(f()) for f in (sampler, lag_probe, conductor)]
    try:
        limit = schedule.duration + load.drain_seconds + 60.0
        async with asyncio.timeout(limit):
            await generator.run(t0)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    stats = {
        "hooks_delivered": len(sim.hooks_delivered),
        "hooks_duplicated": sum(n - 1 for n in sim.hooks_delivered.values()),
        "work_done": sim.model.work_done,
        "wasted_work": sim.model.wasted_work,
        "crashes": sim.model.crashes,
        "crash_times": [t - t0 for t in sim.model.crash_times],
        "origin_requests": sim.model.arrivals - origin0,
    }
    # the drain is judged too: a starved loop there delays answers that still count
    validity = judge_validity(
        lags=[lag for _, lag in log.lags],
        drifts=log.drifts,
        cpu_seconds=cpu,
        wall_seconds=wall,
    )
    if progress is not None:
        progress(scenario.name, schedule.duration, schedule.duration)
    return summarize(
        scenario=scenario.name,
        description=scenario.description,
        mechanisms=list(scenario.mechanisms),
        log=log,
        ideal=plan.ideal,
        ideal_raw=plan.ideal_raw,
        offered=plan.offered,
        planned_steps=plan.steps,
        planned_webhooks=plan.webhooks,
        surge=schedule.surge,
        server_stats=stats,
        validity=validity,
        wall_seconds=wall,
        clock_labels=[schedule.clock_label(b) for b in range(len(plan.ideal))],
    )


async def _warm_up(clients: Sequence[Client], log: ObservationLog) -> None:
    """One health check through every stack before the clock starts.

    Libraries import and initialise lazily on their first request (storages, regexes);
    done inside the run, that would stall the event loop and count against validity.
    """
    for c in clients:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5.0):
                await c.request("GET", "/healthz")
    log.reset_upstream()


def plan_for(profile: Profile, *, quick: bool, seed: int, load: LoadConfig | None = None) -> Plan:
    """The seeded plan every scenario of one seed faces."""
    load = load or LoadConfig()
    catalog = Catalog(seed=seed, **profile.catalog)
    sched = profile.schedule(quick=quick)
    return plan_load(sched, catalog, _base_sim_config(profile, catalog), load, seed)


def _run_one(
    profile_ref: str,
    name: str,
    policy_file: str | None,
    quick: bool,
    seed: int,
    sockets: bool,
) -> ScenarioResult:
    """One scenario in a worker process (``run_seeds(jobs > 1)``)."""
    profile = load_profile(profile_ref)
    scenario = scenario_by_name(name, policy_file)
    return asyncio.run(run_scenario(scenario, profile, quick=quick, seed=seed, sockets=sockets))


def run_seeds(
    profile_ref: str,
    names: Sequence[str],
    seeds: Sequence[int],
    *,
    policy_file: str | None = None,
    quick: bool = False,
    sockets: bool = False,
    jobs: int = 1,
    progress: Progress | None = None,
    done: Callable[[int, str], None] | None = None,
) -> list[ReplayResult]:
    """Every scenario for every seed: one after the other, or ``jobs`` at a time in worker
    processes (each judges its own validity, so a crowded machine shows as invalid runs).
    """
    profile = load_profile(profile_ref)
    out = [
        ReplayResult(
            profile,
            profile.schedule(quick=quick),
            quick,
            s,
            plan_for(profile, quick=quick, seed=s),
            sockets,
        )
        for s in seeds
    ]
    if jobs <= 1:
        for replay in out:
            for name in names:
                scenario = scenario_by_name(name, policy_file)
                replay.results.append(
                    asyncio.run(
                        run_scenario(
                            scenario,
                            profile,
                            quick=quick,
                            seed=replay.seed,
                            progress=progress,
                            plan=replay.plan,
                            sockets=sockets,
                        )
                    )
                )
                if done is not None:
                    done(replay.seed, name)
        return out
    results: dict[tuple[int, str], ScenarioResult] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {
            pool.submit(_run_one, profile_ref, name, policy_file, quick, seed, sockets): (
                seed,
                name,
            )
            for seed in seeds
            for name in names
        }
        for future in as_completed(futures):
            seed, name = futures[future]
            results[(seed, name)] = future.result()
            if done is not None:
                done(seed, name)
    for replay in out:
        replay.results = [results[(replay.seed, name)] for name in names]
    return out


async def run_replay(
    scenarios: list[Scenario],
    profile: Profile,
    *,
    quick: bool = False,
    seed: int = 1,
    load: LoadConfig | None = None,
    progress: Progress | None = None,
    sockets: bool = False,
) -> ReplayResult:
    """Every scenario, one after the other, on the same seeded plan."""
    load = load or LoadConfig()
    schedule = profile.schedule(quick=quick)
    catalog = Catalog(seed=seed, **profile.catalog)
    plan = plan_load(schedule, catalog, _base_sim_config(profile, catalog), load, seed)
    out = ReplayResult(profile, schedule, quick, seed, plan, sockets)
    for scenario in scenarios:
        out.results.append(
            await run_scenario(
                scenario,
                profile,
                quick=quick,
                seed=seed,
                load=load,
                progress=progress,
                plan=plan,
                sockets=sockets,
            )
        )
    return out
