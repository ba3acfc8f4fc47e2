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
        "seconds_per_hour": 20,
        "surge": ["10:15", "10:30"],
    },
    "phase": [
        {"at": "10:00", "builds": 0.5},
        {"at": "10:15", "builds": 3.0, "capacity": 0.5},
        {"at": "10:30", "builds": 0.5},
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
    assert 120 <= 2 * full.duration <= 180  # two scenarios: 2-3 minutes
    assert 2 * quick.duration <= 40  # --quick <= 45 s including set-up

    june = load_profile("june-2021")
    cut = [p for p in june.phases if p.capacity < 1]
    assert len(cut) == 1 and cut[0].capacity == pytest.approx(1 / 3, abs=0.02)
    sched = june.schedule()
    changes = sched.capacity_changes()[1:]
    assert [c for _, c in changes] == [0.33, 1.0]
    assert [t for t, _ in changes] == pytest.approx(
        [sched.to_sim(17 + 5 / 60), sched.to_sim(17.25)]
    )
    assert sched.to_sim(17.25) - sched.to_sim(17 + 5 / 60) == pytest.approx(10 / 60 * 80)


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
        '[[phase]]\nat = "10:00"\nbuilds = 1.0\n'
    )
    prof = load_profile(good)
    assert prof.name == "mine"
    assert prof.schedule().duration == pytest.approx(10.0)  # default 10 s per hour


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("timeline", "start"), "25:00", "timeline.start: '25:00' is not a time of day"),
        (("timeline", "end"), "09:00", "timeline.end: '09:00' must be after timeline.start"),
        (("timeline", "seconds_per_hour"), 0, "timeline.seconds_per_hour: 0 must be a finite"),
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


def test_schedule_maps_incident_time_to_simulated_seconds() -> None:
    prof = parse_profile(GOOD)
    sched = prof.schedule()
    assert sched.duration == pytest.approx(20.0)
    assert sched.surge == pytest.approx((5.0, 10.0))
    assert sched.clock_label(5.0) == "10:15"
    assert sched.phase_at(6.0).load["builds"] == 3.0
    assert [t for t, e in sched.events if e.kind == "restart"] == [pytest.approx(20 / 3)]


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


def _summarize(useful_per_second: list[int], offered: list[float]) -> Any:
    from seawall.replay.metrics import Recorder, summarize

    rec = Recorder()
    for b, (u, o) in enumerate(zip(useful_per_second, offered, strict=True)):
        for i in range(int(o)):
            rec.request("blob", b + 0.5, ok=i < u, useful=i < u, latency=0.1)
            rec.upstream_sent()
            rec.upstream_sent()
    rec.step(0.5, 1.0, True, "ok")
    rec.step(3.5, 4.0, False, "layer")
    return summarize(
        scenario="s",
        description="",
        mechanisms=[],
        recorder=rec,
        ideal=[min(o, 8.0) for o in offered],
        offered=offered,
        planned_steps=3,
        planned_webhooks=0,
        surge=(2.0, 4.0),
        server_stats={"work_done": 10.0, "wasted_work": 2.5, "crashes": 1},
        webhooks_deferred=0,
        wall_seconds=10.0,
    )


def test_profile_goals_override_the_issue_goals() -> None:
    from seawall.replay.metrics import verdicts

    r = _summarize([10] * 14, [10.0] * 14)
    r.scenario = "unprotected"
    names = [v.goal for v in verdicts([r])]
    assert any("crash" in n for n in names)
    june = load_profile("june-2021")
    assert not any("crash" in v.goal for v in verdicts([r], june.goals))
    failed = {v.goal for v in verdicts([r]) if not v.ok}
    assert "goodput during surge < 25% of ideal" in failed  # it did not collapse


def test_metrics_ratios_bound_and_recovery_with_relapse() -> None:
    offered = [10.0] * 14
    # collapse in the surge (2-4), a false recovery (5-7), a relapse (8), then for good (9-)
    useful = [10, 10, 1, 1, 5, 10, 10, 10, 2, 10, 10, 10, 10, 10]
    r = _summarize(useful, offered)
    assert r.goodput_ratio_surge == pytest.approx(2 / 16)
    assert r.build_step_success_bound == pytest.approx(0.8)  # min(o, 8) / o
    assert r.build_step_success_ratio == pytest.approx(1 / 3)
    assert r.failed_build_steps == 2
    assert r.retry_amplification == pytest.approx(2.0)
    assert r.wasted_work_ratio == pytest.approx(0.25)
    assert r.recovery_seconds == pytest.approx(5.0)  # 9 - 4: the relapse reset it
    assert r.crashes == 1
    assert r.p50_ms == pytest.approx(100.0)
    never = _summarize([10, 10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], offered)
    assert never.recovery_seconds is None
