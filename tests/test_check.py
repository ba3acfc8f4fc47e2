"""``seawall check``: every rule fires on a policy that has its problem and not on one without.

Each case sets explicitly every setting its rule reads, so a change of a library default
(shedding defaults are being retuned) cannot flip these tests: the rules must derive
their thresholds from the settings, not from today's defaults.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from seawall.check import RULE_IDS, RULES, check_policies, exit_code
from seawall.cli import main
from seawall.policy import BreakerPolicy, ClientPolicy, Policies, load_policies

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "policies"


@dataclass(frozen=True)
class Case:
    rule: str
    severity: str
    triggers: str | Policies
    passes: str | Policies
    capacity: float | None = None
    clients: int | None = None
    deployed: bool = False  # check ``passes`` with capacity 2000 and 5000 clients


RETRY_OK = """
[client]
attempt_timeout = 10.0
[client.retry]
attempts = 4
deadline = 60.0
backoff_base = 0.5
backoff_cap = 10.0
retry_methods = ["GET", "HEAD"]
retry_unsafe = false
honor_retry_after = true
budget_ratio = 0.1
budget_min_retries_per_second = 0.02
[client.breaker]
window = "time"
window_size = 60.0
minimum_calls = 10
open_duration = 15.0
max_open_duration = 120.0
jitter = 0.2
count_429_as_failure = false
"""


def client(**changes: object) -> str:
    """RETRY_OK with ``section.key = value`` lines replaced (keys are unique in RETRY_OK)."""
    lines = RETRY_OK.strip().splitlines()
    for key, value in changes.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        lines = [f"{key} = {text}" if ln.split(" = ")[0] == key else ln for ln in lines]
    return "\n".join(lines) + "\n"


SHED_OK = """
[shed]
queue_target = 0.005
queue_interval = 0.05
max_queue_length = 64
classes = [
  { name = "health", priority = 100, path = "^/healthz$", never_shed = true },
  { name = "blob", priority = 30, path = "^/v2/.+/blobs/" },
]
"""

RATELIMIT_OK = """
[ratelimit]
limit = "20/second;600/minute"
key = "client"
rules = [{ key = "global", limit = "1800/second", name = "global" }]
exempt_paths = ["/healthz", "/metrics"]
on_storage_error = "open"
"""

CACHE_OK = """
[cache]
max_stale = 86400
fallback_statuses = [429, 502, 503, 504]
extractors = ["oci", "path"]
"""

CASES = [
    Case(
        "retry-amplification",
        "error",
        client(budget_ratio=1.0, budget_min_retries_per_second=5.0),
        client(),
        2000,
        5000,
    ),
    Case(  # the floor alone breaks the budget's promise, but cannot fill the upstream
        "retry-amplification",
        "warning",
        client(budget_min_retries_per_second=0.1),
        client(attempts=1, budget_min_retries_per_second=0.1),  # no retries at all
        2000,
        5000,
    ),
    Case(
        "retry-non-idempotent",
        "error",
        client(retry_methods=["GET", "POST"]),
        client(retry_methods=["GET", "HEAD", "PUT", "DELETE"]),
    ),
    Case("retry-non-idempotent", "error", client(retry_unsafe=True), client()),
    Case(
        "attempt-timeout-exceeds-deadline",
        "warning",
        client(attempt_timeout=60.0),
        client(attempt_timeout=59.0),
    ),
    Case(
        "retry-after-ignored",
        "warning",
        client(honor_retry_after=False),
        client(honor_retry_after=True),
    ),
    Case(
        "breaker-open-shorter-than-backoff",
        "warning",
        # longest backoff: min(cap 10, 0.5 * 2**2) = 2 s; open at least 2.4 * 0.8 = 1.92 s
        client(open_duration=2.4, max_open_duration=2.4),
        client(open_duration=2.5, max_open_duration=2.5),  # at least exactly 2 s
    ),
    Case(
        "breaker-window-never-fills",
        "error",
        # 2000 req/s over 5000 clients = 0.4 req/s: 60 s hold 24 calls
        client(minimum_calls=25),
        client(minimum_calls=24),
        2000,
        5000,
    ),
    Case(
        "breaker-trips-on-429",
        "warning",
        client(count_429_as_failure=True),
        client(count_429_as_failure=False),
    ),
    Case(
        "ratelimit-exceeds-capacity",
        "error",  # a global limit above capacity
        RATELIMIT_OK.replace("1800/second", "2001/second") + SHED_OK,
        RATELIMIT_OK.replace("1800/second", "2000/second"),
        2000,
    ),
    Case(
        "ratelimit-exceeds-capacity",
        "error",  # per-client totals with nothing bounding the total
        RATELIMIT_OK.replace("rules = [", "# rules = ["),
        RATELIMIT_OK.replace("rules = [", "# rules = [") + SHED_OK,
        2000,
        5000,
    ),
    Case(
        "ratelimit-burst",
        "warning",
        RATELIMIT_OK.replace("1800/second", "100000/minute"),
        RATELIMIT_OK.replace("1800/second", "1800/second;100000/minute"),
        2000,
    ),
    Case(
        "ratelimit-fails-closed",
        "warning",
        RATELIMIT_OK.replace('"open"', '"closed"'),
        RATELIMIT_OK,
    ),
    Case(
        "health-check-rate-limited",
        "error",
        RATELIMIT_OK.replace('["/healthz", "/metrics"]', '["/metrics"]'),
        RATELIMIT_OK.replace('["/healthz", "/metrics"]', '["/livez"]'),
    ),
    Case(
        "health-check-sheddable",
        "error",
        SHED_OK.replace("never_shed = true", "never_shed = false"),
        SHED_OK,
    ),
    Case(  # the probe the rate limiter exempts must be the one shedding never refuses
        "health-check-sheddable",
        "error",
        RATELIMIT_OK.replace('["/healthz", "/metrics"]', '["/ping"]') + SHED_OK,
        RATELIMIT_OK + SHED_OK,
    ),
    Case("shedding-absent", "warning", RATELIMIT_OK, RATELIMIT_OK + SHED_OK),
    Case(
        "shed-queue-unbounded",
        "warning",
        client(attempt_timeout=10.0)
        + SHED_OK.replace("queue_interval = 0.05", "queue_interval = 10\noverload_after = 10"),
        client(attempt_timeout=10.0)
        + SHED_OK.replace("queue_interval = 0.05", "queue_interval = 9.9\noverload_after = 9.9"),
    ),
    Case(
        "stale-if-error-off",
        "warning",
        CACHE_OK.replace("max_stale = 86400", "max_stale = 0"),
        CACHE_OK,
    ),
    Case(
        "stale-if-error-off",
        "warning",
        CACHE_OK.replace("[429, 502, 503, 504]", "[]"),
        CACHE_OK,
    ),
    Case("no-blob-cache", "warning", client(), client() + CACHE_OK),
    Case(
        "no-blob-cache",
        "warning",
        CACHE_OK.replace('["oci", "path"]', "[]"),
        CACHE_OK,
    ),
    Case("needs-deployment", "info", client(), client(), deployed=True),
    Case(  # only from Python: a TOML table cannot say None
        "breaker-absent",
        "warning",
        Policies(client=ClientPolicy(breaker=None)),
        Policies(client=ClientPolicy(breaker=BreakerPolicy())),
    ),
]


def policies(text: str | Policies) -> Policies:
    return text if isinstance(text, Policies) else Policies.from_dict(tomllib.loads(text))


def ids(text: str | Policies, capacity: float | None, clients: int | None) -> list[tuple[str, str]]:
    found = check_policies(policies(text), capacity=capacity, clients=clients)
    return [(f.rule, f.severity) for f in found]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.rule}-{c.severity}-{i}" for i, c in enumerate(CASES)]
)
def test_rule_fires_on_its_problem_and_not_without_it(case: Case) -> None:
    assert (case.rule, case.severity) in ids(case.triggers, case.capacity, case.clients)
    deployment = (2000, 5000) if case.deployed else (case.capacity, case.clients)
    assert case.rule not in [rule for rule, _ in ids(case.passes, *deployment)]


def test_every_rule_has_a_case() -> None:
    assert {c.rule for c in CASES} == RULE_IDS
    assert len({r.id for r in RULES}) == len(RULES)


def test_every_finding_has_an_id_severity_line_and_suggestion() -> None:
    path = EXAMPLES / "december-2022-misconfigured.toml"
    found = check_policies(load_policies(path), capacity=2000, clients=5000)
    assert found
    for f in found:
        assert f.rule in RULE_IDS
        assert f.severity in ("error", "warning", "info")
        assert f.message and "\n" not in f.message
        assert f.suggestion and "\n" not in f.suggestion


def test_the_amplification_figures_are_computed_from_the_policy() -> None:
    """ratio x C + clients x floor, capped at (attempts - 1) x C; not a fixed threshold."""
    text = client(attempts=3, budget_ratio=0.2, budget_min_retries_per_second=0.3)
    # 0.2 * 1000 + 3000 * 0.3 = 1100 >= 1000: an error; 2000 clients: 800 < 1000, a warning
    found = check_policies(policies(text), capacity=1000, clients=3000)
    (f,) = [f for f in found if f.rule == "retry-amplification"]
    assert f.severity == "error"
    assert "1,100 req/s with the budget" in f.message
    assert "2,000 req/s without it" in f.message  # (3 - 1) x 1000
    assert f.field == "client.retry.budget_min_retries_per_second"
    assert f.suggestion == "budget_min_retries_per_second = 0.066"  # 0.2 * 1000 / 3000
    found = check_policies(policies(text), capacity=1000, clients=2000)
    (f,) = [f for f in found if f.rule == "retry-amplification"]
    assert f.severity == "warning" and "800 req/s with the budget" in f.message


def test_following_the_suggestions_clears_the_error() -> None:
    text = client(budget_ratio=1.0, budget_min_retries_per_second=5.0)
    (f,) = [
        f
        for f in check_policies(policies(text), capacity=2000, clients=5000)
        if f.rule == "retry-amplification"
    ]
    fixed = client(**dict(part.split(" = ") for part in f.suggestion.split(", ")))
    after = check_policies(policies(fixed), capacity=2000, clients=5000)
    assert "retry-amplification" not in [x.rule for x in after]


def test_without_a_table_its_rules_do_not_run() -> None:
    assert check_policies(Policies()) == []
    only_cache = check_policies(policies(CACHE_OK), capacity=1, clients=1)
    assert only_cache == []


def test_a_missing_deadline_cannot_be_configured() -> None:
    """'No overall deadline' needs no rule: the policy refuses one (a PolicyError)."""
    from seawall.errors import PolicyError

    with pytest.raises(PolicyError, match="deadline"):
        policies(client(deadline="inf"))


# --------------------------------------------------------------------------- examples


def test_the_incident_example_fails_and_names_the_december_root_causes() -> None:
    found = check_policies(
        load_policies(EXAMPLES / "december-2022-misconfigured.toml"), capacity=2000, clients=5000
    )
    assert exit_code(found) == 1
    errors = [f for f in found if f.severity == "error"]
    causes = {f.cause for f in errors}
    assert "December 2022: misconfigured rate limiting" in causes
    assert "December 2022: misconfigured circuit breaking" in causes
    assert "December 2022: abnormally high load" in causes
    assert "December 2022: the restart that caused downtime" in causes


@pytest.mark.parametrize("name", ["registry-frontend.toml", "ci-runners.toml"])
def test_the_good_examples_pass_without_a_single_warning(name: str) -> None:
    found = check_policies(load_policies(EXAMPLES / name), capacity=2000, clients=5000)
    assert [(f.rule, f.message) for f in found] == []


# --------------------------------------------------------------------------- the command


def test_cli_exit_codes_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    bad = EXAMPLES / "december-2022-misconfigured.toml"
    good = EXAMPLES / "ci-runners.toml"
    argv = ["--capacity", "2000", "--clients", "5000"]
    assert main(["check", str(bad), *argv]) == 1
    out = capsys.readouterr().out
    assert "error retry-amplification" in out and "suggest:" in out and "fails: 6 errors" in out
    assert main(["check", str(good), *argv]) == 0
    assert "passes: 0 errors, 0 warnings, 0 notes" in capsys.readouterr().out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    bad = EXAMPLES / "december-2022-misconfigured.toml"
    assert main(["check", str(bad), "--capacity", "2000", "--clients", "5000", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["capacity"] == 2000 and doc["clients"] == 5000
    assert doc["summary"]["error"] == len([f for f in doc["findings"] if f["severity"] == "error"])
    first = doc["findings"][0]
    assert set(first) == {"rule", "severity", "field", "message", "suggestion", "cause"}


def test_cli_notes_what_it_could_not_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLES / "ci-runners.toml")]) == 0
    out = capsys.readouterr().out
    assert "info needs-deployment" in out and "--capacity" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["check"],
        ["check", "x.toml", "--capacity", "0"],
        ["check", "x.toml", "--capacity", "lots"],
        ["check", "x.toml", "--clients", "0"],
    ],
)
def test_cli_usage_errors_exit_two(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2


def test_cli_bad_policy_is_one_unbroken_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")  # a narrow terminal must not cut the sentence
    pol = tmp_path / "a-rather-long-directory-name" / "policy.toml"
    pol.parent.mkdir()
    pol.write_text("[client.retry]\nattempts = 0\n")
    assert main(["check", str(pol)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "client.retry.attempts: 0 must be a whole number of at least 1" in lines[0]


def test_list_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--list-rules"]) == 0
    out = capsys.readouterr().out
    for rule in RULES:
        assert rule.id in out
