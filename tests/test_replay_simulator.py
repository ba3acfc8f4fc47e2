"""The simulated artifact manager's collapse mechanics, driven with explicit times."""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seawall.errors import PolicyError
from seawall.replay.simulator import (
    Catalog,
    Job,
    Refusal,
    ServerModel,
    ServiceTimes,
    SimConfig,
    SimulatedRegistry,
)


def small(**kw: object) -> SimConfig:
    base: dict[str, object] = {
        "slots": 2,
        "memory_base_mib": 100.0,
        "memory_per_queued_mib": 1.0,
        "memory_per_running_mib": 0.0,
        "memory_limit_mib": 110.0,
        "restart_seconds": 5.0,
    }
    base.update(kw)
    return SimConfig(**base)  # type: ignore[arg-type]


def admit(model: ServerModel, now: float, service: float = 1.0) -> Job:
    job = model.admit(now, "blob", service)
    assert isinstance(job, Job)
    return job


def test_fifo_queue_grows_beyond_capacity_and_drains_in_order() -> None:
    m = ServerModel(small(memory_limit_mib=10_000), now=0.0)
    jobs = [admit(m, 0.0) for _ in range(6)]
    assert m.busy == 2
    assert m.queue_length == 4
    m.advance(1.0)
    assert [j.finished for j in jobs[:2]] == [1.0, 1.0]
    assert m.queue_length == 2
    m.advance(3.0)
    assert m.queue_length == 0 and m.busy == 0
    # FIFO: start times never go backwards
    starts = [j.started for j in jobs]
    assert starts == sorted(starts)  # type: ignore[type-var]
    assert m.completed == 6


def test_work_for_abandoned_requests_continues_and_is_counted_as_wasted() -> None:
    m = ServerModel(small(slots=1, memory_limit_mib=10_000), now=0.0)
    first = admit(m, 0.0, 1.0)
    second = admit(m, 0.0, 2.0)
    m.abandon(second, 0.5)  # the client gave up while queued
    m.advance(10.0)
    assert first.finished == 1.0
    assert second.started == 1.0 and second.finished == 3.0  # the server still did it
    assert m.wasted_work == pytest.approx(2.0)
    assert m.work_done == pytest.approx(3.0)


def test_memory_past_the_limit_crashes_loses_the_queue_and_restarts() -> None:
    m = ServerModel(small(), now=0.0)
    jobs = [admit(m, 0.0) for _ in range(12)]  # 2 running + 10 queued = 110 MiB: at limit
    assert m.crashes == 0
    result = m.admit(0.0, "blob", 1.0)  # the 11th queued job tips it over
    assert m.crashes == 1
    assert isinstance(result, Job) and result.failed
    assert all(j.failed for j in jobs)
    assert m.queue_length == 0 and m.busy == 0
    assert m.admit(1.0, "blob", 1.0) is Refusal.DOWN  # restarting: fast refusal
    assert m.is_down(4.9)
    assert not m.is_down(5.0)
    assert isinstance(m.admit(5.0, "blob", 1.0), Job)
    done = m.drain_done()
    assert len(done) == 13


def test_capacity_events_change_how_many_run_at_once() -> None:
    m = ServerModel(small(slots=3, memory_limit_mib=10_000), now=0.0)
    for _ in range(9):
        admit(m, 0.0)
    assert m.busy == 3
    m.set_slots(0.5, 1)  # capacity drops: running jobs finish, new starts obey the limit
    m.advance(1.0)
    assert m.busy == 1
    m.set_slots(1.5, 4)
    assert m.busy == 4
    with pytest.raises(PolicyError):
        m.set_slots(2.0, 0)


def test_misconfigured_rate_limit_refuses_only_above_its_rate() -> None:
    m = ServerModel(small(memory_limit_mib=10_000, rate_limit_rps=2.0), now=0.0)
    assert isinstance(m.admit(0.0, "blob", 0.1), Job)
    assert isinstance(m.admit(0.0, "blob", 0.1), Job)
    assert m.admit(0.0, "blob", 0.1) is Refusal.LIMITED
    assert isinstance(m.admit(0.6, "blob", 0.1), Job)


def test_bounded_queue_refuses_when_full() -> None:
    m = ServerModel(small(slots=1, queue_limit=1, memory_limit_mib=10_000), now=0.0)
    admit(m, 0.0)
    admit(m, 0.0)
    assert m.admit(0.0, "blob", 1.0) is Refusal.FULL


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 0.5), st.floats(0.01, 1.0), st.booleans()), min_size=1, max_size=40
    ),
    st.integers(1, 4),
)
def test_model_invariants(arrivals: list[tuple[float, float, bool]], slots: int) -> None:
    """Never more running than slots; all work accounted; wasted <= done."""
    m = ServerModel(small(slots=slots, memory_limit_mib=10_000), now=0.0)
    now = 0.0
    jobs = []
    for gap, service, give_up in arrivals:
        now += gap
        job = admit(m, now, service)
        jobs.append(job)
        if give_up:
            m.abandon(job, now)
        assert m.busy <= m.slots
    m.advance(now + 100.0)
    assert m.completed == len(jobs)
    assert m.work_done == pytest.approx(sum(j.service for j in jobs))
    assert 0 <= m.wasted_work <= m.work_done + 1e-9
    for j in jobs:
        assert j.started is not None and j.started >= j.arrived
        assert j.finished == pytest.approx(j.started + j.service)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(PolicyError, match="slots"):
        SimConfig(slots=0)
    with pytest.raises(PolicyError, match="memory_limit_mib"):
        SimConfig(memory_base_mib=100, memory_limit_mib=50)
    with pytest.raises(PolicyError, match=r"service\.manifest"):
        ServiceTimes(manifest=0)


def test_catalog_blobs_match_their_digests_and_layers_are_shared() -> None:
    cat = Catalog(seed=3, images=20)
    for digest, data in cat.blobs.items():
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    uses: dict[str, int] = {}
    for img in cat.images:
        for d in img.layers:
            uses[d] = uses.get(d, 0) + 1
        doc = json.loads(img.manifest)
        assert [x["digest"] for x in doc["layers"]] == list(img.layers)
    assert max(uses.values()) >= 4  # base layers are shared widely
    assert sum(cat.popularity) == pytest.approx(1.0)
    assert cat.popularity[0] > cat.popularity[-1]  # Zipf: a few images dominate


async def test_asgi_face_serves_manifests_blobs_hooks_uploads() -> None:
    fast = ServiceTimes(
        manifest=0.001, blob_base=0.001, blob_per_kib=0.0, webhook=0.001, upload_base=0.001
    )
    cat = Catalog(seed=2, images=5)
    sim = SimulatedRegistry(SimConfig(slots=2, service=fast), cat)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=sim), base_url="http://sim"
        ) as client:
            assert (await client.get("/healthz")).status_code == 200
            img = cat.images[0]
            r = await client.get(img.path)
            assert r.status_code == 200
            assert r.headers["docker-content-digest"] == (
                "sha256:" + hashlib.sha256(r.content).hexdigest()
            )
            etag = r.headers["etag"]
            again = await client.get(img.path, headers={"if-none-match": etag})
            assert again.status_code == 304 and again.content == b""  # a revalidation
            assert (await client.get(img.path, headers={"if-none-match": '"x"'})).content
            digest = json.loads(r.content)["layers"][0]["digest"]
            blob = await client.get(f"/v2/{img.name}/blobs/{digest}")
            assert "sha256:" + hashlib.sha256(blob.content).hexdigest() == digest
            assert (await client.get("/v2/x/blobs/sha256:00")).status_code == 404
            hook = await client.post("/hooks/7", content=b"{}", headers={"idempotency-key": "k7"})
            assert hook.status_code == 200
            again = await client.post("/hooks/7", content=b"{}", headers={"idempotency-key": "k7"})
            assert again.json() == {"duplicate": True}
            assert sim.hooks_delivered == {"7": 1}
            assert (await client.put("/attachments/1", content=b"x" * 2048)).status_code == 200
            assert sim.uploads_stored == 1
            sim.restart()
            assert (await client.get(img.path)).status_code == 502
            assert (await client.get("/healthz")).status_code == 503
    finally:
        sim.close()


async def test_asgi_face_client_giving_up_leaves_the_work_running() -> None:
    svc = ServiceTimes(manifest=0.05, blob_base=0.05, webhook=0.05, upload_base=0.05)
    cat = Catalog(seed=2, images=3)
    sim = SimulatedRegistry(SimConfig(slots=1, service=svc), cat)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=sim), base_url="http://sim"
        ) as client:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.001):
                    await client.get(cat.images[0].path)
            assert sim.model.busy == 1  # the server does not know
            r = await client.get(cat.images[1].path)  # waits behind the abandoned job
            assert r.status_code == 200
        assert sim.model.wasted_work == pytest.approx(0.05)
    finally:
        sim.close()
    assert sim.model.crashes == 0  # the end of a run is not a crash
