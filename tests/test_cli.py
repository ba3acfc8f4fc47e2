"""The ``seawall`` command line: help, exit codes, outputs (on a tiny profile)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seawall.cli import main

TINY = """
name = "tiny"
[timeline]
start = "10:00"
end = "10:06"
surge = ["10:02", "10:04"]
[[phase]]
at = "10:00"
seconds = 1.5
builds = 0.2
webhooks = 0.05
[[phase]]
at = "10:02"
seconds = 0.5
builds = 0.2
[[phase]]
at = "10:04"
seconds = 0.5
builds = 0.2
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY)
    return p


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert main(["replay", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--quick", "december-2022", "--policy", "--seeds", "--sockets", "--jobs"):
        assert option in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["replay"],
        ["replay", "december-2022", "--seed", "x"],
        ["replay", "no-such-profile"],
        ["replay", "december-2022", "--scenario", "nope"],
        ["replay", "december-2022", "--scenario", "policy"],
        ["replay", "december-2022", "--seeds", "5-1"],
        ["replay", "december-2022", "--seeds", "x"],
        ["replay", "december-2022", "--seed", "1", "--seeds", "1-2"],
        ["replay", "december-2022", "--jobs", "0"],
    ],
)
def test_usage_errors_exit_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2


def test_bad_policy_file_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = tmp_path / "p.toml"
    pol.write_text("[shed]\nmin_limit = 0\n")
    assert main(["replay", "december-2022", "--policy", str(pol)]) == 2
    assert "shed.min_limit" in capsys.readouterr().err.replace("\n", "")
    pol.write_text("[breakers]\nx = 1\n")
    assert main(["replay", "december-2022", "--policy", str(pol)]) == 2


def test_seed_lists() -> None:
    from seawall.cli import parse_seeds

    assert parse_seeds("1-5") == [1, 2, 3, 4, 5]
    assert parse_seeds("1,3,7") == [1, 3, 7]
    assert parse_seeds("2, 1-3") == [2, 1, 3]


def test_runs_writes_json_keeping_todays_fields(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "j.json"
    argv = ["replay", str(tiny), "--scenario", "unprotected", "--no-progress", "--json", str(out)]
    code = main(argv)
    doc = json.loads(out.read_text())
    assert code == (0 if doc["valid"] else 3)  # no goal for unprotected; invalid is exit 3
    for key in ("profile", "quick", "seed", "simulated_seconds", "surge_seconds", "planned"):
        assert key in doc  # today's fields
    assert doc["seeds"] == [1] and isinstance(doc["valid"], bool)
    res = doc["scenarios"]["unprotected"]
    for key in (
        "goodput_ratio",
        "goodput_ratio_surge",
        "goodput_ratio_raw_surge",
        "build_step_success_ratio",
        "build_step_success_bound",
        "failed_build_steps",
        "late_build_steps",
        "retry_amplification",
        "p50_ms",
        "p99_ms",
        "wasted_work_ratio",
        "crashes",
        "recovery_seconds",
        "webhooks_lost",
        "webhooks_late",
        "uploads_lost",
        "valid",
        "invalid_reasons",
        "spread",
    ):
        assert key in res
    assert res["crashes"] == 0  # a light load never crashes the server
    assert res["logical_requests"] == res["planned_requests"] == doc["planned"]["requests"]
    assert doc["runs"][0]["scenarios"]["unprotected"]["crashes"] == 0
    assert "metric" in capsys.readouterr().out  # the summary table


def test_an_invalid_run_prints_no_verdict_and_exits_three(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from seawall.replay import metrics

    monkeypatch.setitem(metrics.VALIDITY_LIMITS, "loop_lag_p99_ms", -1.0)  # any lag fails
    out = tmp_path / "j.json"
    argv = ["replay", str(tiny), "--scenario", "seawall", "--no-progress", "--check"]
    assert main([*argv, "--json", str(out)]) == 3
    text = capsys.readouterr().out
    assert "INVALID" in text and "loop_lag_p99_ms" in text
    assert "NOT MET" not in text and "met" not in text.replace("metric", "")
    doc = json.loads(out.read_text())
    assert doc["valid"] is False and doc["verdicts"] == []
    assert doc["invalid"][0]["scenario"] == "seawall"


def test_check_exits_one_when_a_goal_is_not_met(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seawall.replay import metrics

    monkeypatch.setitem(metrics.VALIDITY_LIMITS, "loop_lag_p99_ms", 1e9)  # never invalid here
    monkeypatch.setitem(metrics.VALIDITY_LIMITS, "arrival_drift_p99_ms", 1e9)
    monkeypatch.setitem(metrics.VALIDITY_LIMITS, "arrival_drift_max_ms", 1e9)
    monkeypatch.setitem(metrics.VALIDITY_LIMITS, "loop_stall_fraction", 1.0)
    monkeypatch.setitem(metrics.GOALS, "seawall_surge_goodput_min", 2.0)  # unreachable
    argv = ["replay", str(tiny), "--scenario", "seawall", "--no-progress"]
    assert main(argv) == 0
    assert main([*argv, "--check"]) == 1


def test_policy_file_sections_map_to_policy_classes(tmp_path: Path) -> None:
    from seawall.errors import PolicyError
    from seawall.replay.scenarios import build_scenarios, setup_from_dict

    setup = setup_from_dict(
        {
            "shed": {"max_queue_length": 8},
            "client": {"attempt_timeout": 1.5, "retry": {"budget_ratio": 0.2}},
            "ratelimit": {"enabled": False},
        }
    )
    pol = setup.policies
    assert pol.shed is not None and pol.shed.max_queue_length == 8
    assert pol.client is not None and pol.client.retry.budget_ratio == 0.2
    assert setup.without == {"ratelimit"}  # enabled = false leaves it out
    assert pol.cache is None  # a missing section: the class gets no policy argument
    with pytest.raises(PolicyError, match=r"client\.retry\.budget_ratio"):
        setup_from_dict({"client": {"retry": {"budget_ratio": 7}}})
    with pytest.raises(PolicyError, match=r"^breakers: .* is not a setting of Policies"):
        setup_from_dict({"breakers": {}})
    f = tmp_path / "p.toml"
    f.write_text("[cache]\npublic = true\n")
    names = [s.name for s in build_scenarios(["unprotected"], f)]
    assert names == ["unprotected", "policy"]
    assert [s.name for s in build_scenarios(None, None)] == [
        "unprotected",
        "conventional",
        "seawall",
        "seawall-tuned",
    ]
    assert len(build_scenarios(["all"], None)) == 9


def test_policy_scenario_runs_beside_the_others(tiny: Path, tmp_path: Path) -> None:
    pol = tmp_path / "mine.toml"
    pol.write_text("[client]\nattempt_timeout = 1.0\n[ratelimit]\nenabled = false\n")
    out = tmp_path / "p.json"
    argv = ["replay", str(tiny), "--scenario", "seawall", "--policy", str(pol)]
    assert main([*argv, "--no-progress", "--json", str(out)]) in (0, 3)
    doc = json.loads(out.read_text())
    assert list(doc["scenarios"]) == ["seawall", "policy"]
    policy = doc["scenarios"]["policy"]
    assert "client: ResilientTransport(policy)" in policy["mechanisms"]
    assert not any("RateLimit" in m for m in policy["mechanisms"])
    assert "server: RateLimitMiddleware()" in doc["scenarios"]["seawall"]["mechanisms"]
    assert policy["build_step_success_ratio"] > 0.9
