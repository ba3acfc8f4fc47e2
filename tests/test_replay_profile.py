"""Replay profiles: validation messages, shipped profiles, the schedule and the plan."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from seawall.errors import PolicyError
from seawall.replay.load import LoadConfig, plan_load
from seawall.replay.profile import load_profile, parse_profile, shipped_profiles
from seawall.replay.simulator import Catalog, SimConfig

GOOD: dict[str, Any] = {
    "name": "t",
    "timeline": {
        "start": "10:00",
        "end": "11:00",
        "surge": ["10:15", "10:30"],
    },
    "phase": [
        {"at": "10:00", "builds": 0.5, "seconds": 5},
        {"at": "10:15", "builds": 3.0, "capacity": 0.5, "seconds": 5, "quick_seconds": 2},
        {"at": "10:30", "builds": 0.5, "seconds": 10},
    ],
    "event": [{"at": "10:20", "kind": "restart"}],
}


def test_shipped_profiles_load_and_follow_the_incident_reports() -> None:
    assert {"december-2022", "june-2021"} <= set(shipped_profiles())
    dec = load_profile("december-2022")
    surge = next(p for p in dec.phases if p.name == "surge")
    assert sum(surge.load.values()) >= 3.0  # abnormally high: >= 3x capacity
    assert dec.surge == pytest.approx((10 + 7 / 60, 12 + 7 / 60))
    reruns = next(p for p in dec.phases if p.at > dec.surge[1] - 1e-9)
    assert 0 < sum(reruns.load.values()) < 1.0  # elevated but below capacity until 15:40
    last = dec.phases[-1]
    assert last.at == pytest.approx(15 + 40 / 60)
    full, quick = dec.schedule(), dec.schedule(quick=True)
    assert full.duration == pytest.approx(120)  # real seconds per scenario
    assert quick.duration <= 40  # --quick
    for sched in (full, quick):  # the surge is the longest phase, in both
        s0, s1 = sched.surge
        assert s1 - s0 == max(seg.t1 - seg.t0 for seg in sched.segments)

    june = load_profile("june-2021")
    cut = [p for p in june.phases if p.capacity < 1]
    assert len(cut) == 1 and cut[0].capacity == pytest.approx(1 / 3, abs=0.02)
    sched = june.schedule()
    changes = sched.capacity_changes()[1:]
    assert [c for _, c in changes] == [0.33, 1.0]
    assert [t for t, _ in changes] == pytest.approx(
        [sched.to_sim(17 + 5 / 60), sched.to_sim(17.25)]
    )
    assert sched.to_sim(17.25) - sched.to_sim(17 + 5 / 60) == pytest.approx(60)


def test_a_profile_file_by_path(tmp_path: Path) -> None:
    text = Path(__file__).read_text()  # any file that is not TOML
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_profile(bad)
    with pytest.raises(PolicyError, match="neither a shipped profile"):
        load_profile(tmp_path / "missing.toml")
    good = tmp_path / "mine.toml"
    good.write_text(
        '[timeline]\nstart = "10:00"\nend = "11:00"\nsurge = ["10:10", "10:20"]\n'
        '[[phase]]\nat = "10:00"\nbuilds = 1.0\nseconds = 30\n'
    )
    prof = load_profile(good)
    assert prof.name == "mine"
    assert prof.schedule().duration == pytest.approx(30.0)
    assert prof.schedule(quick=True).duration == pytest.approx(7.5)  # a quarter by default


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("timeline", "start"), "25:00", "timeline.start: '25:00' is not a time of day"),
        (("timeline", "end"), "09:00", "timeline.end: '09:00' must be after timeline.start"),
        (("timeline", "seconds_per_hour"), 11, "timeline.seconds_per_hour: 11 is no longer"),
        (("phase", 1, "quick_seconds_per_hour"), 3, "runs are not compressed"),
        (("phase", 1, "seconds"), 0, "phase[1].seconds: 0 must be a finite number greater"),
        (("catalog", "images"), 0, "catalog.images: 0 must be a whole number of at least 1"),
        (("catalog", "colours"), 3, "catalog.colours: 3 is not a profile setting"),
        (("timeline", "surge"), ["10:30", "10:15"], "timeline.surge"),
        (("phase", 1, "builds"), -1, "phase[1].builds: -1 must be a finite number of at least 0"),
        (("phase", 1, "capacity"), 0, "phase[1].capacity: 0 must be a finite number greater"),
        (("phase", 1, "at"), "10:00", "phase[1].at: '10:00' must be after the previous phase"),
        (("phase", 0, "at"), "10:05", "phase[0].at: '10:05' must equal timeline.start"),
        (("phase", 1, "bulids"), 1.0, "phase[1].bulids: 1.0 is not a profile setting"),
        (("event", 0, "kind"), "explode", "event[0].kind: 'explode' is not one of"),
        (("server", "slots"), 0, "server.slots: 0 must be a whole number of at least 1"),
        (("wat",), 1, "wat: 1 is not a profile setting"),
        (("goals", "nope"), 1, "goals.nope: 1 is not a profile setting"),
        (("goals", "seawall_surge_goodput_min"), -1, "goals.seawall_surge_goodput_min: -1"),
    ],
)
def test_validation_messages_name_the_field(
    path: tuple[str | int, ...], value: Any, message: str
) -> None:
    data = copy.deepcopy(GOOD)
    node: Any = data
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(key, str) else node[key]
    node[path[-1]] = value
    with pytest.raises(PolicyError) as info:
        parse_profile(data)
    assert message in str(info.value)


def test_a_phase_without_its_length_is_an_error() -> None:
    data = copy.deepcopy(GOOD)
    del data["phase"][0]["seconds"]
    with pytest.raises(PolicyError, match=r"phase\[0\]\.seconds: None is required"):
        parse_profile(data)


def test_schedule_maps_incident_time_to_run_seconds() -> None:
    prof = parse_profile(GOOD)
    sched = prof.schedule()
    assert sched.duration == pytest.approx(20.0)
    assert sched.surge == pytest.approx((5.0, 10.0))
    assert sched.clock_label(5.0) == "10:15"
    assert sched.phase_at(6.0).load["builds"] == 3.0
    # 10:20 is a third into the 5-second surge phase
    assert [t for t, e in sched.events if e.kind == "restart"] == [pytest.approx(5 + 5 / 3)]
    quick = prof.schedule(quick=True)
    assert [seg.t1 - seg.t0 for seg in quick.segments] == pytest.approx([1.25, 2.0, 2.5])


def test_one_time_scale_quick_only_shortens_the_profile() -> None:
    """Runs are never compressed: --quick changes the phases' lengths and nothing else."""
    from seawall.replay.profile import sim_config_from
    from seawall.replay.runner import time_constants

    dec = load_profile("december-2022")
    sim = sim_config_from(dec.server)
    assert time_constants(sim, LoadConfig()) == time_constants(sim, LoadConfig())
    full, quick = dec.schedule(), dec.schedule(quick=True)
    assert [s.phase for s in full.segments] == [s.phase for s in quick.segments]
    assert quick.duration < full.duration
    constants = time_constants(sim, LoadConfig())
    assert constants["server.restart"] == 30.0  # a real restart, in both
    assert constants["docker.layer_wait_start"] == 5.0


def test_plan_is_seeded_and_its_ideal_respects_capacity_and_cache() -> None:
    prof = parse_profile(GOOD)
    sched = prof.schedule()
    cat = Catalog(seed=1, images=20)
    sim = SimConfig()
    cfg = LoadConfig(runners=2, cache_scope="runner")
    a = plan_load(sched, cat, sim, cfg, seed=5)
    shared = plan_load(sched, cat, sim, LoadConfig(runners=2), seed=5)
    assert shared.offered == a.offered
    assert all(x >= y - 1e-9 for x, y in zip(shared.ideal, a.ideal, strict=True))
    assert sum(shared.cache_servable) > sum(a.cache_servable)  # the upper bound is higher
    b = plan_load(sched, cat, sim, cfg, seed=5)
    assert [x.at for x in a.arrivals] == [x.at for x in b.arrivals]
    assert a.steps > 0
    for b_ in range(len(a.ideal)):
        assert a.cache_servable[b_] <= a.ideal[b_] <= a.offered[b_] + 1e-9
    # in the surge, with half the capacity, the uncacheable part cannot all be served
    surge = range(int(sched.surge[0]), int(sched.surge[1]))
    assert sum(a.ideal[x] for x in surge) < sum(a.offered[x] for x in surge)
    # before it, everything offered is servable
    assert sum(a.ideal[:4]) == pytest.approx(sum(a.offered[:4]))
    # the raw-capacity ideal gives no cache credit: never above the cache-credited one,
    # and in the surge it is capacity alone
    for x in range(len(a.ideal)):
        assert a.ideal_raw[x] <= a.ideal[x] + 1e-9
        assert a.ideal_raw[x] <= a.offered[x] + 1e-9
    for x in surge:
        assert a.ideal_raw[x] == pytest.approx(a.offered[x] * a.slots[x] / a.work[x])
    assert a.requests == round(sum(a.offered))


def test_shipped_profiles_parse_as_plain_toml_with_explanations() -> None:
    import importlib.resources

    for name in shipped_profiles():
        text = (
            importlib.resources.files("seawall.replay")
            .joinpath("profiles", f"{name}.toml")
            .read_text()
        )
        tomllib.loads(text)
        assert "incidents/" in text  # each explains its derivation from the report
        assert all(p.note for p in load_profile(name).phases)
