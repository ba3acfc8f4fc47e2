"""seawall.toml: one file configures every mechanism with the same validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from seawall.errors import PolicyError
from seawall.policy import (
    CachePolicy,
    ClientPolicy,
    Policies,
    RateLimitPolicy,
    ShedPolicy,
    load_policies,
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "seawall.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_full_file_builds_every_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [ratelimit]
        limit = "100/minute"

        [shed]
        max_limit = 200

        [client.retry]
        attempts = 2

        [cache]
        max_stale = 3600
        """,
    )
    policies = load_policies(path)
    assert policies.ratelimit == RateLimitPolicy(limit="100/minute")
    assert isinstance(policies.shed, ShedPolicy) and policies.shed.max_limit == 200
    assert isinstance(policies.client, ClientPolicy) and policies.client.retry.attempts == 2
    assert policies.cache == CachePolicy(max_stale=3600)


def test_missing_tables_mean_not_configured(tmp_path: Path) -> None:
    assert load_policies(write(tmp_path, "")) == Policies()


def test_errors_name_the_file_and_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path, '[ratelimit]\nlimit = "ten per sec"\n')
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    assert str(info.value) == (
        f"{path}: ratelimit.limit: 'ten per sec' is not a rate like '100/second'"
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[ratelimt]\nlimit = '1/second'\n", "ratelimt: "),
        ("[client.retry]\nattempt = 2\n", "client.retry.attempt: "),
        ("ratelimit = 3\n", "is not a table of RateLimitPolicy settings"),
        ("[ratelimit\n", "is not valid TOML"),
    ],
)
def test_unknown_or_malformed_content_is_an_error(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_policies(write(tmp_path, text))


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policies(tmp_path / "absent.toml")
