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
seconds_per_hour = 15
surge = ["10:02", "10:04"]
[[phase]]
at = "10:00"
builds = 0.2
webhooks = 0.05
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
    assert "--quick" in out and "december-2022" in out and "--policy" in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["replay"],
        ["replay", "december-2022", "--seed", "x"],
        ["replay", "no-such-profile"],
        ["replay", "december-2022", "--scenario", "nope"],
        ["replay", "december-2022", "--scenario", "policy"],
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


def test_runs_writes_json_and_check_fails_on_unmet_goals(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "j.json"
    argv = ["replay", str(tiny), "--scenario", "unprotected", "--no-progress", "--json", str(out)]
    assert main(argv) == 0  # goals unmet, but no --check
    doc = json.loads(out.read_text())
    res = doc["scenarios"]["unprotected"]
    for key in (
        "goodput_ratio",
        "goodput_ratio_surge",
        "build_step_success_ratio",
        "build_step_success_bound",
        "failed_build_steps",
        "retry_amplification",
        "p50_ms",
        "p99_ms",
        "wasted_work_ratio",
        "crashes",
        "recovery_seconds",
        "webhooks_lost",
        "valid",
    ):
        assert key in res
    assert res["crashes"] == 0  # a light load never crashes the server
    assert res["build_step_success_ratio"] > 0.9
    assert "metric" in capsys.readouterr().out  # the summary table
    # light load: the unprotected system does not collapse, so its goals are not met
    assert main([*argv, "--check"]) == 1


def test_policy_file_sections_map_to_policy_classes(tmp_path: Path) -> None:
    from seawall.errors import PolicyError
    from seawall.replay.scenarios import build_scenarios, policies_from_dict

    pol = policies_from_dict(
        {
            "shed": {"max_queue_length": 8},
            "client": {"attempt_timeout": 1.5, "retry": {"budget_ratio": 0.2}},
            "ratelimit": {"enabled": False},
        }
    )
    assert pol.shed is not None and pol.shed.max_queue_length == 8
    assert pol.client is not None and pol.client.retry.budget_ratio == 0.2
    assert pol.ratelimit is None  # enabled = false leaves it out
    assert pol.cache is not None  # a missing section means the defaults
    with pytest.raises(PolicyError, match=r"client\.retry\.budget_ratio"):
        policies_from_dict({"client": {"retry": {"budget_ratio": 7}}})
    with pytest.raises(PolicyError, match=r"^breakers: .* is not a setting of Policies"):
        policies_from_dict({"breakers": {}})
    f = tmp_path / "p.toml"
    f.write_text("[cache]\npublic = true\n")
    names = [s.name for s in build_scenarios(["unprotected"], f)]
    assert names == ["unprotected", "policy"]


def test_policy_scenario_runs_beside_the_others(tiny: Path, tmp_path: Path) -> None:
    pol = tmp_path / "mine.toml"
    pol.write_text('[client]\nattempt_timeout = 1.0\n[ratelimit]\nlimit = "50/second"\n')
    out = tmp_path / "p.json"
    argv = ["replay", str(tiny), "--scenario", "seawall", "--policy", str(pol)]
    assert main([*argv, "--no-progress", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert list(doc["scenarios"]) == ["seawall", "policy"]
    policy = doc["scenarios"]["policy"]
    assert "client: ResilientTransport" in policy["mechanisms"]
    assert policy["build_step_success_ratio"] > 0.9
