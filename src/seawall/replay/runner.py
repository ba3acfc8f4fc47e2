"""Run scenarios in compressed real time, in-process (httpx.ASGITransport), bounded in time.

Each scenario gets a fresh simulator, fresh clients (one per runner, each with its own
client address so per-client limits see them apart) and its own event bus. Scenarios run
one after the other on the same seeded plan, so they face exactly the same load and none
competes with another for the CPU. Besides the load, the runner owns three small tasks per
scenario: a sampler (server state every 100 ms), an event-loop lag probe (every 20 ms: the
machine, not the simulator, must never be the bottleneck) and a conductor that applies the
profile's capacity changes and restarts. All are cancelled when the scenario ends, and a
hard timeout bounds the whole scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.replay.load import (
    Client,
    CountingTransport,
    LoadConfig,
    LoadGenerator,
    NaiveClient,
    Plan,
    ProtectedClient,
    plan_load,
)
from seawall.replay.metrics import Recorder, Sample, ScenarioResult, summarize
from seawall.replay.profile import Profile, Schedule, sim_config_from
from seawall.replay.scenarios import LabContext, Scenario
from seawall.replay.simulator import Catalog, SimConfig, SimulatedRegistry

__all__ = ["ReplayResult", "capacity_rps", "run_replay", "run_scenario"]

SAMPLE_INTERVAL = 0.1
LAG_INTERVAL = 0.02

Progress = Callable[[str, float, float], None]
"""progress(scenario, simulated seconds done, total)"""


@dataclass(slots=True)
class ReplayResult:
    profile: Profile
    schedule: Schedule
    quick: bool
    seed: int
    plan: Plan
    results: list[ScenarioResult] = field(default_factory=list)


def capacity_rps(sim: SimConfig, catalog: Catalog) -> float:
    """Requests per second the base server answers with the normal build mix."""
    per_step = catalog.mean_step_work(sim.service)
    requests_per_step = 1 + sum(
        p * len(img.layers) for p, img in zip(catalog.popularity, catalog.images, strict=True)
    )
    return float(sim.slots * requests_per_step / per_step)


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
) -> ScenarioResult:
    load = load or LoadConfig()
    schedule = profile.schedule(quick=quick)
    catalog = Catalog(seed=seed)
    base = sim_config_from(profile.server)
    cap = capacity_rps(base, catalog)
    overrides = {}
    if scenario.server_limit_factor is not None:
        overrides["rate_limit_rps"] = scenario.server_limit_factor * cap
    sim_config: SimConfig = sim_config_from(profile.server, **overrides)
    if plan is None:
        plan = plan_load(schedule, catalog, sim_config, load, seed)
    recorder = Recorder()
    bus = EventBus()
    bus.subscribe(recorder.on_event)
    ctx = LabContext(
        bus=bus,
        capacity_rps=cap,
        runners=load.runners,
        step_deadline=load.step_deadline,
        attempt_timeout=load.naive_attempt_timeout,
    )
    sim = SimulatedRegistry(sim_config, catalog, clock=clock, upload_kib=load.upload_kib)
    app = scenario.server(sim, ctx)
    clients: list[Client] = []
    for r in range(load.runners):
        wire = CountingTransport(
            httpx.ASGITransport(app=app, client=(f"127.0.0.{r + 1}", 40000 + r)), recorder
        )
        if scenario.client == "naive":
            clients.append(NaiveClient(wire, load, clock))
        else:
            clients.append(ProtectedClient(scenario.client_transport(wire, ctx, r), clock))
    generator = LoadGenerator(plan, catalog, clients, recorder, load, clock=clock, seed=seed)
    await _warm_up(clients, recorder, clock)

    t0 = clock.now()
    wall0 = time.perf_counter()

    async def sampler() -> None:
        while True:
            m = sim.model
            now = clock.now()
            m.advance(now)
            recorder.sample(
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
            recorder.lag(before - t0, max(0.0, clock.now() - before - LAG_INTERVAL))

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
        limit = schedule.duration + load.drain_seconds + max(30.0, schedule.duration)
        async with asyncio.timeout(limit):
            await generator.run(t0)
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        for c in clients:
            with contextlib.suppress(Exception):
                await c.aclose()
        stats = {
            "hooks_delivered": len(sim.hooks_delivered),
            "hooks_duplicated": sum(n - 1 for n in sim.hooks_delivered.values()),
            "work_done": sim.model.work_done,
            "wasted_work": sim.model.wasted_work,
            "crashes": sim.model.crashes,
            "crash_times": [t - t0 for t in sim.model.crash_times],
        }
        sim.close()
    if progress is not None:
        progress(scenario.name, schedule.duration, schedule.duration)
    return summarize(
        scenario=scenario.name,
        description=scenario.description,
        mechanisms=list(scenario.mechanisms),
        recorder=recorder,
        ideal=plan.ideal,
        offered=plan.offered,
        planned_steps=plan.steps,
        planned_webhooks=plan.webhooks,
        surge=schedule.surge,
        server_stats=stats,
        webhooks_deferred=generator.webhooks_deferred,
        wall_seconds=time.perf_counter() - wall0,
        clock_labels=[schedule.clock_label(b) for b in range(len(plan.ideal))],
    )


async def _warm_up(clients: list[Client], recorder: Recorder, clock: Clock) -> None:
    """One health check through every stack before the clock starts.

    Libraries import and initialise lazily on their first request (storages, regexes);
    done inside the run, that would stall the event loop and count against validity.
    """
    for c in clients:
        with contextlib.suppress(Exception):
            await c.fetch("GET", "/healthz", deadline=clock.now() + 5.0)
    recorder.reset_upstream()


async def run_replay(
    scenarios: list[Scenario],
    profile: Profile,
    *,
    quick: bool = False,
    seed: int = 1,
    load: LoadConfig | None = None,
    progress: Progress | None = None,
) -> ReplayResult:
    """Every scenario, one after the other, on the same seeded plan."""
    load = load or LoadConfig()
    schedule = profile.schedule(quick=quick)
    catalog = Catalog(seed=seed)
    sim = sim_config_from(profile.server)
    plan = plan_load(schedule, catalog, sim, load, seed)
    out = ReplayResult(profile, schedule, quick, seed, plan)
    for scenario in scenarios:
        out.results.append(
            await run_scenario(
                scenario, profile, quick=quick, seed=seed, load=load, progress=progress, plan=plan
            )
        )
    return out
