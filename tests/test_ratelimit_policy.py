"""RateLimitPolicy: defaults, the one-liner, every validation error, dict/TOML loading."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from seawall.errors import PolicyError
from seawall.policy.ratelimit import DEFAULT_EXEMPT_PATHS, LimitRule, RateLimitPolicy


def test_the_issue_example_message_is_exact() -> None:
    with pytest.raises(PolicyError) as info:
        RateLimitPolicy(limit="ten per sec")
    assert str(info.value) == "limit: 'ten per sec' is not a rate like '100/second'"
    assert info.value.field == "limit"


def test_one_liner_and_defaults() -> None:
    policy = RateLimitPolicy(limit="100/minute")
    assert [(i.amount, i.get_expiry()) for i in policy.items] == [(100, 60)]
    default = RateLimitPolicy()
    assert default.strategy == "moving-window"
    assert default.storage == "memory://"
    assert default.on_storage_error == "open"
    assert default.trusted_proxy_hops == 0
    assert "/healthz" in default.exempt_paths
    assert default.exempt_paths == DEFAULT_EXEMPT_PATHS
    assert default.max_tracked_keys >= 1


def test_several_rates_and_rules() -> None:
    policy = RateLimitPolicy(
        limit="10/second;500/minute",
        key="header:x-tenant",
        rules=(LimitRule("5000/minute", key="global", name="global"),),
        costs={"/v2/*/blobs/*": 5},
    )
    assert [i.amount for i in policy.items] == [10, 500]
    # An unverified header key also applies per client address (its "-client" twin).
    assert [r.name for r in policy.all_rules()] == ["default", "global", "default-client"]
    assert policy.all_rules()[2].key == "client"
    assert policy.replace(header_keys_verified=True).all_rules()[-1].name == "global"
    cost = policy.cost_of()
    assert cost("/v2/library/alpine/blobs/sha256:abc") == 5
    assert cost("/v2/library/alpine/manifests/latest") == 1


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"limit": 100}, "limit", "is not a rate"),
    ({"limit": ""}, "limit", "is not a rate"),
    ({"limit": "0/second"}, "limit", "at least 1"),
    ({"key": "ip"}, "key", "is not 'client'"),
    ({"key": 3}, "key", "is not 'client'"),
    ({"key": "header:"}, "key", "names no valid"),
    ({"key": "header:X-Tenant"}, "key", "names no valid"),
    ({"name": "has space"}, "name", "letters"),
    ({"name": ""}, "name", "letters"),
    ({"rules": "global"}, "rules", "is not a list"),
    ({"rules": (3,)}, "rules[0]", "is not a LimitRule"),
    ({"rules": (LimitRule("1/second", name="default"),)}, "rules[0].name", "used by another"),
    ({"costs": 5}, "costs", "is not a mapping"),
    ({"costs": (("/a",),)}, "costs", "pair"),
    ({"costs": {"blobs": 2}}, "costs", "starting with '/'"),
    ({"costs": {"/blobs": 0}}, "costs['/blobs']", "at least 1"),
    ({"limit": "3/second", "costs": {"/blobs": 4}}, "costs['/blobs']", "never pass"),
    ({"strategy": "leaky-bucket"}, "strategy", "is not one of"),
    ({"storage": "localhost:6379"}, "storage", "storage URI"),
    ({"storage": "memcached://x:1"}, "storage", "unknown scheme"),
    ({"storage_timeout": 0}, "storage_timeout", "greater than 0"),
    ({"on_storage_error": "ignore"}, "on_storage_error", "'open' or 'closed'"),
    ({"closed_retry_after": -1}, "closed_retry_after", "greater than 0"),
    ({"log_interval": float("nan")}, "log_interval", "not a number"),
    ({"emit_headers": "yes"}, "emit_headers", "true or false"),
    ({"trusted_proxy_hops": -1}, "trusted_proxy_hops", "at least 0"),
    ({"trusted_proxy_hops": 1.5}, "trusted_proxy_hops", "whole number"),
    ({"proxy_header": "x-real-ip"}, "proxy_header", "is not"),
    ({"ipv6_prefix": 0}, "ipv6_prefix", "at least 1"),
    ({"ipv6_prefix": 129}, "ipv6_prefix", "at most 128"),
    ({"exempt_paths": "/healthz"}, "exempt_paths", "set of paths"),
    ({"exempt_paths": {"healthz"}}, "exempt_paths", "starting with '/'"),
    ({"max_tracked_keys": 0}, "max_tracked_keys", "at least 1"),
]


@pytest.mark.parametrize(("kwargs", "field", "fragment"), BAD)
def test_every_validation_error_names_field_and_value(
    kwargs: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(PolicyError) as info:
        RateLimitPolicy(**kwargs)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"limit": "often"}, "limit"),
        ({"limit": "1/second", "key": "tenant"}, "key"),
        ({"limit": "1/second", "name": "a/b"}, "name"),
    ],
)
def test_limit_rule_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(PolicyError) as info:
        LimitRule(**kwargs)
    assert info.value.field == field


def test_from_dict_rejects_unknown_keys_at_any_depth() -> None:
    with pytest.raises(PolicyError, match="is not a setting of RateLimitPolicy"):
        RateLimitPolicy.from_dict({"limt": "1/second"})
    with pytest.raises(PolicyError) as info:
        RateLimitPolicy.from_dict({"rules": [{"limit": "1/second", "nmae": "x"}]})
    assert "nmae" in info.value.field


def test_from_toml_builds_the_same_policy() -> None:
    text = """
    limit = "20/second;600/minute"
    key = "header:x-tenant"
    trusted_proxies = ["10.0.0.0/8"]
    trusted_proxy_hops = 1
    exempt_paths = ["/healthz"]
    [costs]
    "/v2/*/blobs/*" = 4
    [[rules]]
    limit = "10000/minute"
    key = "global"
    name = "global"
    """
    policy = RateLimitPolicy.from_dict(tomllib.loads(text))
    assert policy.rules == (LimitRule("10000/minute", "global", "global"),)
    assert policy.costs == (("/v2/*/blobs/*", 4),)
    assert policy.exempt_paths == frozenset({"/healthz"})
    assert RateLimitPolicy.from_dict(policy.to_dict()) == policy


def test_bad_toml_value_names_the_nested_field() -> None:
    with pytest.raises(PolicyError) as info:
        RateLimitPolicy.from_dict({"rules": [{"limit": "lots"}]})
    assert info.value.field.endswith("limit")
    assert "'lots' is not a rate" in str(info.value)


def test_callable_key_and_replace_validate() -> None:
    policy = RateLimitPolicy(key=lambda scope: "t")
    assert callable(policy.key)
    with pytest.raises(PolicyError):
        policy.replace(limit="nope")
