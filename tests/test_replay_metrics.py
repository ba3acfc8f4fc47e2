"""The replay's metrics, validity and goals, on injected observations (no run, no timing)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from seawall.replay.metrics import (
    GOALS,
    ObservationLog,
    ScenarioResult,
    Validity,
    aggregate,
    check_goals,
    judge_validity,
    recovery_after,
    summarize,
)
from seawall.replay.profile import load_profile

VALID = judge_validity(lags=[0.001] * 100, drifts=[0.001] * 100, cpu_seconds=1, wall_seconds=10)


def test_validity_from_injected_measurements() -> None:
    assert VALID.valid and VALID.reasons == ()
    assert VALID.cpu_ratio == pytest.approx(0.1)

    lagged = judge_validity(
        lags=[0.001] * 90 + [0.03] * 10, drifts=[0.0], cpu_seconds=1, wall_seconds=10
    )
    assert not lagged.valid
    assert lagged.reasons == ("loop_lag_p99_ms 30 > 20",)

    stalled = judge_validity(
        lags=[0.001] * 995 + [0.1] * 5, drifts=[0.0], cpu_seconds=1, wall_seconds=10
    )  # p99 is fine, but 0.5 s of 10 s were stalls over 50 ms
    assert stalled.loop_lag_p99_ms < 20
    assert stalled.reasons == ("loop_stall_fraction 5.0% > 2.0%",)

    busy = judge_validity(lags=[0.001], drifts=[0.0], cpu_seconds=9.5, wall_seconds=10)
    assert busy.reasons == ("cpu_ratio 95% > 85%",)

    drifted = judge_validity(
        lags=[0.001], drifts=[0.0] * 50 + [0.6] * 50, cpu_seconds=1, wall_seconds=10
    )
    assert drifted.reasons == ("arrival_drift_p99_ms 600 > 20", "arrival_drift_max_ms 600 > 500")
    early = judge_validity(lags=[0.001], drifts=[-1.0] * 10, cpu_seconds=1, wall_seconds=10)
    assert early.valid  # sending early is the sleep's rounding, never the harness lagging

    nothing = judge_validity(lags=[], drifts=[], cpu_seconds=0, wall_seconds=10)
    assert nothing.reasons == ("no event-loop lag measured",)

    relaxed = judge_validity(
        lags=[0.03] * 10, drifts=[0.0], cpu_seconds=1, wall_seconds=10,
        limits={"loop_lag_p99_ms": 50},
    )  # fmt: skip
    assert relaxed.valid


def test_recovery_is_the_first_window_of_on_time_steps_after_the_surge() -> None:
    steps = [(10.0 + i / 4, 0.0, "failed", "layer") for i in range(16)]  # 10-14 s: failing
    steps += [(14.0 + i / 4, 0.0, "on_time", "ok") for i in range(40)]  # 14-24 s: fine
    assert recovery_after(steps, surge_end=10.0, run_end=30.0) == 4.0
    # a late step at 16 s (second 6 after the surge) makes each window holding it 95%
    steps.append((16.0, 0.0, "late", "ok"))
    assert recovery_after(steps, surge_end=10.0, run_end=30.0) == 7.0
    assert recovery_after(steps, surge_end=10.0, run_end=17.0) is None  # too short to tell
    never = [(10.0 + i / 4, 0.0, "failed", "layer") for i in range(80)]
    assert recovery_after(never, surge_end=10.0, run_end=30.0) is None


def _summarize(useful: list[int], offered: list[float], validity: Validity = VALID) -> Any:
    log = ObservationLog()
    for b, (u, o) in enumerate(zip(useful, offered, strict=True)):
        for i in range(int(o)):
            log.request("blob", b + 0.5, ok=i < u, useful=i < u, latency=0.1)
            log.upstream_sent()
            log.upstream_sent()
    for b in range(len(offered)):
        log.step(b + 0.5, b + 1.0, "on_time" if useful[b] == offered[b] else "failed", "x")
    log.step(0.7, 12.0, "late", "ok")
    log.delivery("webhook", "late")
    log.delivery("upload", "lost")
    return summarize(
        scenario="seawall",
        description="",
        mechanisms=[],
        log=log,
        ideal=[min(o, 8.0) for o in offered],
        ideal_raw=[min(o, 4.0) for o in offered],
        offered=offered,
        planned_steps=len(offered) + 1,
        planned_webhooks=3,
        surge=(2.0, 4.0),
        server_stats={
            "work_done": 10.0,
            "wasted_work": 2.5,
            "crashes": 1,
            "hooks_delivered": 2,
            "origin_requests": 7,
        },
        validity=validity,
        wall_seconds=10.0,
    )


def test_summary_ratios_against_both_ideals_and_every_planned_request() -> None:
    offered = [10.0] * 14
    useful = [10, 10, 1, 1, 5, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    r = _summarize(useful, offered)
    assert r.goodput_ratio_surge == pytest.approx(2 / 16)
    assert r.goodput_ratio_raw_surge == pytest.approx(2 / 8)
    assert r.build_step_success_bound == pytest.approx(0.8)  # min(o, 8) / o
    assert r.build_step_success_ratio == pytest.approx(11 / 15)
    assert r.late_build_steps == 1
    assert r.failed_build_steps == 3
    assert r.planned_requests == 140
    assert r.retry_amplification == pytest.approx(2.0)  # 280 sent / 140 planned
    assert r.origin_requests == 7
    assert r.wasted_work_ratio == pytest.approx(0.25)
    assert r.recovery_seconds == pytest.approx(1.0)  # steps 4.5 failed, 5.5-9.5 on time
    assert (r.webhooks_lost, r.webhooks_late, r.uploads_lost) == (1, 1, 1)
    assert r.p50_ms == pytest.approx(100.0)
    assert r.valid and r.invalid_reasons == []
    bad = judge_validity(lags=[0.5], drifts=[0.0], cpu_seconds=1, wall_seconds=10)
    assert _summarize(useful, offered, bad).invalid_reasons == list(bad.reasons)


def _result(name: str, **kw: Any) -> ScenarioResult:
    r: ScenarioResult = _summarize([10] * 14, [10.0] * 14)
    r.scenario = name
    for key, value in kw.items():
        setattr(r, key, value)
    return r


def test_goals_are_the_issues_and_only_for_seawall_scenarios() -> None:
    good = dict(
        goodput_ratio_surge=0.95,
        build_step_success_ratio=0.97,
        build_step_success_bound=1.0,
        webhooks_lost=0,
        retry_amplification=0.5,
        crashes=0,
        recovery_seconds=2.0,
    )
    conventional = _result("conventional", goodput_ratio_surge=0.6)
    checks = check_goals([_result("unprotected"), conventional, _result("seawall", **good)])
    assert {c.scenario for c in checks} == {"seawall"}  # no goal pushes the others down
    assert all(c.ok for c in checks), checks
    assert len(checks) == 7

    checks = check_goals([conventional, _result("seawall", **{**good, "recovery_seconds": None})])
    assert [c.goal for c in checks if not c.ok] == ["recovery <= 5 s after the surge"]
    checks = check_goals([_result("seawall", **{**good, "goodput_ratio_surge": 0.91})])
    assert not any("conventional" in c.goal for c in checks)  # not run: not checked
    close = check_goals(
        [_result("conventional", goodput_ratio_surge=0.7), _result("seawall", **good)]
    )
    assert [c.goal for c in close if not c.ok] == ["surge goodput >= 1.5x conventional's"]
    relaxed = check_goals(
        [_result("seawall", **{**good, "crashes": 1})], {"seawall_crashes_max": 1}
    )
    assert all(c.ok for c in relaxed)
    assert set(GOALS) >= {"seawall_recovery_max", "seawall_vs_conventional_min"}
    assert load_profile("june-2021").goals == {}


def test_median_and_spread_over_seeds() -> None:
    runs = [
        _result("seawall", goodput_ratio_surge=g, recovery_seconds=rec, valid=v, crashes=c)
        for g, rec, v, c in ((0.9, 1.0, True, 0), (0.7, None, True, 2), (0.8, None, False, 0))
    ]
    median, spread = aggregate(runs)
    assert median["goodput_ratio_surge"] == pytest.approx(0.8)
    assert spread["goodput_ratio_surge"] == pytest.approx([0.7, 0.9])
    assert median["recovery_seconds"] is None  # two of three never recovered
    assert spread["recovery_seconds"] == [1.0, None]
    assert median["valid"] is False  # one invalid run makes the set invalid
    assert median["crashes"] == 0 and spread["crashes"] == [0, 2]
    assert median["seeds"] == 3
    assert math.isfinite(median["p99_ms"])


def test_no_verdict_on_an_invalid_run() -> None:
    from seawall.replay.report import summarize_seeds
    from seawall.replay.runner import ReplayResult, plan_for

    profile = load_profile("december-2022")
    plan = plan_for(profile, quick=True, seed=1)

    def replay(**valid: bool) -> ReplayResult:
        results = [_result(n, valid=v) for n, v in valid.items()]
        return ReplayResult(profile, profile.schedule(quick=True), True, 1, plan, results=results)

    both = summarize_seeds([replay(unprotected=False, conventional=True, seawall=True)] * 2)
    assert not both.valid  # the set is invalid (exit 3) ...
    assert {c.scenario for c in both.checks} == {"seawall"}  # ... seawall's runs are not
    assert both.invalid() == [
        {"seed": 1, "scenario": "unprotected", "reasons": []},
        {"seed": 1, "scenario": "unprotected", "reasons": []},
    ]
    one_bad = replay(unprotected=True, conventional=True, seawall=False)
    assert summarize_seeds([replay(conventional=True, seawall=True), one_bad]).checks == []
    no_base = summarize_seeds([replay(conventional=False, seawall=True)])
    assert no_base.checks == []  # seawall's ratio reads conventional's invalid run
