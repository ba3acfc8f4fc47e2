"""The replay's world and scenarios: the same world for everyone, the library's defaults as
users get them, the conventional stack's real libraries and docker's retry schedule."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from seawall.clock import ManualClock
from seawall.events import EventBus
from seawall.replay import scenarios as sc
from seawall.replay.load import (
    Arrival,
    DockerLikeClient,
    LoadConfig,
    LoadGenerator,
    NaiveClient,
    Plan,
    StackClient,
)
from seawall.replay.metrics import ObservationLog
from seawall.replay.profile import parse_profile
from seawall.replay.simulator import Catalog, ServiceTimes, SimConfig, SimulatedRegistry

FAST = ServiceTimes(manifest=0.001, blob_base=0.001, blob_per_kib=0.0, webhook=0.001,
                    upload_base=0.001)  # fmt: skip


class Scripted(httpx.AsyncBaseTransport):
    """Answers from a script of statuses (then 200) and records every request."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        status = self.statuses.pop(0) if self.statuses else 200
        return httpx.Response(status, content=b"{}")


def _plan(arrivals: list[Arrival]) -> Plan:
    n = 1
    return Plan(arrivals, 1.0, [1.0] * n, [0.0] * n, [0.0] * n, [0.0] * n, [4.0] * n,
                [1.0] * n, [1.0] * n, webhooks=2, uploads=1)  # fmt: skip


@pytest.mark.parametrize("kind", ["naive", "docker", "stack"])
async def test_the_webhook_sender_and_uploader_are_the_same_for_every_client(kind: str) -> None:
    """Same keys, same redelivery waits, whatever client the scenario gives the runner."""
    clock = ManualClock()
    config = LoadConfig(runners=1, naive_retries=0)
    wire = Scripted([503, 503, 503])  # the first three requests fail
    client = {
        "naive": lambda: NaiveClient(wire, config),
        "docker": lambda: DockerLikeClient(wire, clock=clock),
        "stack": lambda: StackClient(wire),
    }[kind]()
    arrivals = [Arrival(0.0, "webhook", 1, 0), Arrival(0.0, "upload", 1, 0)]
    log = ObservationLog()
    gen = LoadGenerator(_plan(arrivals), Catalog(images=2), [client], log, config, clock=clock)
    await gen.run(clock.now())
    keys = sorted(r.headers["idempotency-key"] for r in wire.seen)
    hooks = [r for r in wire.seen if r.method == "POST"]
    assert {r.headers["idempotency-key"] for r in hooks} == {"hook-1"}
    assert "upload-1" in keys
    # the hook failed twice (one of the three 503s went to the upload), then the sender's
    # second redelivery got through: after waiting 5 s and 10 s, the world's schedule
    assert len(hooks) == 3
    assert [w for w in clock.slept if w >= 5] == [5.0, 10.0]
    assert log.deliveries[("webhook", "late")] == 1
    assert log.deliveries[("upload", "lost")] == 1  # the uploader sends once, for all


async def test_docker_like_client_follows_mobys_layer_schedule() -> None:
    clock = ManualClock()
    wire = Scripted([503, 502, 500, 503, 200])
    docker = DockerLikeClient(wire, clock=clock)
    r = await docker.request("GET", "/v2/a/blobs/sha256:00")
    assert r is not None and r.status_code == 200
    assert clock.slept == [5.0, 10.0, 15.0, 20.0]  # 5 attempts, waits 5/10/15/20 s
    wire = Scripted([503] * 9)
    docker = DockerLikeClient(wire, clock=clock)
    r = await docker.request("GET", "/v2/a/blobs/sha256:00")
    assert r is not None and r.status_code == 503 and len(wire.seen) == 5  # then gives up
    for path, status in (("/v2/a/blobs/sha256:00", 429), ("/v2/a/manifests/latest", 503)):
        wire = Scripted([status])
        docker = DockerLikeClient(wire, clock=clock)
        r = await docker.request("GET", path)
        assert r is not None and r.status_code == status and len(wire.seen) == 1
    assert not docker.has_layer("sha256:00")
    docker.keep_layer("sha256:00")
    assert docker.has_layer("sha256:00")  # its local layer store


def _ctx(tmp_path: Path) -> sc.LabContext:
    return sc.LabContext(bus=EventBus(), load=LoadConfig(), sim=SimConfig(), workdir=tmp_path)


def test_seawall_scenario_builds_the_library_classes_with_no_arguments(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def spy(name: str) -> Any:
        real = getattr(sc, name)

        def make(*args: Any, **kwargs: Any) -> Any:
            calls.append((name, args, kwargs))
            return real(*args, **kwargs)

        return make

    for name in (
        "LoadShedMiddleware",
        "RateLimitMiddleware",
        "FallbackCacheMiddleware",
        "FallbackCache",
        "ResilientTransport",
    ):
        monkeypatch.setattr(sc, name, spy(name))
    scenario = sc.scenario_by_name("seawall")
    ctx = _ctx(tmp_path)
    scenario.server(SimulatedRegistry(SimConfig()), ctx)
    scenario.client(httpx.MockTransport(lambda r: httpx.Response(200)), ctx, 0)
    made = {name: (args, kwargs) for name, args, kwargs in calls}
    assert set(made) == {
        "LoadShedMiddleware",
        "RateLimitMiddleware",
        "FallbackCacheMiddleware",
        "FallbackCache",
        "ResilientTransport",
    }
    for name, (args, kwargs) in made.items():
        extra = set(kwargs) - {"events", "cache"}  # observation, and the client's own cache
        assert extra == set(), f"{name} got {extra}: not a default"
        assert len(args) <= 1, f"{name} got positional settings"  # the app / inner only
    assert scenario.sim_overrides(SimConfig()) == {}  # nothing derived from the simulator

    calls.clear()
    for mechanism in sc.MECHANISMS:
        ablation = sc.scenario_by_name(f"seawall-no-{mechanism}")
        ablation.server(SimulatedRegistry(SimConfig()), ctx)
        ablation.client(httpx.MockTransport(lambda r: httpx.Response(200)), ctx, 0)
    by = [name for name, _, _ in calls]
    assert by.count("LoadShedMiddleware") == len(sc.MECHANISMS) - 1  # all but no-shed
    assert by.count("RateLimitMiddleware") == len(sc.MECHANISMS) - 1
    assert by.count("FallbackCacheMiddleware") == len(sc.MECHANISMS) - 1
    policies = [kw.get("policy") for name, _, kw in calls if name == "ResilientTransport"]
    breakers = [p for p in policies if p is not None and p.breaker is None]
    budgets = [p for p in policies if p is not None and p.retry.budget_ratio == 1.0]
    assert len(breakers) == 1 and len(budgets) == 1  # each changes only its own mechanism
    assert sum(p is None for p in policies) == len(sc.MECHANISMS) - 2


def test_the_tuned_policy_file_is_shipped_and_valid() -> None:
    setup = sc.setup_from_file(sc.tuned_policy_path())
    text = sc.tuned_policy_path().read_text()
    assert "never reported" in text and "101" in text  # says how it was tuned, on what
    assert setup.without == frozenset()  # every mechanism is still there


async def test_conventional_stack_is_an_rfc9111_cache_over_a_bounded_backlog(
    tmp_path: Path,
) -> None:
    scenario = sc.scenario_by_name("conventional")
    overrides = scenario.sim_overrides(SimConfig(slots=4))
    assert overrides == {"queue_limit": 8}
    cat = Catalog(seed=2, images=3)
    sim = SimulatedRegistry(SimConfig(slots=2, service=FAST, **overrides), cat)
    ctx = _ctx(tmp_path)
    app = scenario.server(sim, ctx)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://registry.sim"
        ) as client:
            img = cat.images[0]
            digest = img.layers[0]
            for _ in range(3):
                blob = await client.get(f"/v2/{img.name}/blobs/{digest}")
                assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
            for _ in range(2):
                manifest = await client.get(img.path)
                assert json.loads(manifest.content)["layers"]
        # the immutable blob was fetched from the server once; the manifest (no
        # Cache-Control, an ETag) is revalidated every time, as RFC 9111 says
        assert sim.model.arrivals == 3
        assert sim.answered.get(304) == 1
    finally:
        sim.close()
        for close in ctx.closers:
            await close()


TINY = {
    "name": "tiny",
    "timeline": {"start": "10:00", "end": "10:03", "surge": ["10:01", "10:02"]},
    "phase": [
        {"at": "10:00", "seconds": 1.0, "builds": 0.3, "webhooks": 0.05, "uploads": 0.05},
        {"at": "10:01", "seconds": 1.0, "builds": 0.3},
        {"at": "10:02", "seconds": 1.0, "builds": 0.3},
    ],
}


@pytest.mark.parametrize("sockets", [False, True])
async def test_a_scenario_runs_in_process_and_over_loopback_tcp(sockets: bool) -> None:
    from seawall.replay.runner import run_scenario

    profile = parse_profile(TINY)
    result = await run_scenario(
        sc.scenario_by_name("seawall"),
        profile,
        seed=3,
        load=LoadConfig(drain_seconds=5.0),
        sockets=sockets,
    )
    assert result.logical_requests == result.planned_requests > 0
    assert result.build_step_success_ratio > 0.9
    assert result.upstream_requests > 0 and result.origin_requests > 0
    assert result.statuses.get("2xx", 0) > 0
    await asyncio.sleep(0)


@pytest.mark.parametrize("kind", ["naive", "docker", "stack"])
async def test_every_runner_marks_its_build_steps(kind: str) -> None:
    from seawall.protocol import STEP_HEADER

    clock = ManualClock()
    config = LoadConfig(runners=1)
    wire = Scripted()
    client = {
        "naive": lambda: NaiveClient(wire, config),
        "docker": lambda: DockerLikeClient(wire, clock=clock),
        "stack": lambda: StackClient(wire),
    }[kind]()
    arrivals = [Arrival(0.0, "step", 9, 0, image=0)]
    log = ObservationLog()
    gen = LoadGenerator(_plan(arrivals), Catalog(images=2), [client], log, config, clock=clock)
    await gen.run(clock.now())
    assert [r.headers.get(STEP_HEADER) for r in wire.seen] == ["r0-s9"]
    # the scripted "{}" is no manifest: the step failed, its layers count as failed requests
    assert log.steps[0][2:] == ("failed", "manifest")
    assert len(log.requests) == 1 + len(Catalog(images=2).images[0].layers)
