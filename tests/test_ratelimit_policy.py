"""RateLimitPolicy: defaults, the one-liner, every validation error, dict/TOML loading."""

from __future__ import annotations

import asyncio
import os
import tomllib
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seawall.errors import PolicyError
from seawall.events import EventBus
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


CRASHED_LATER: list[tuple[dict[str, Any], str, str]] = [
    # Issue 13: accepted, then every request failed (or the middleware did not build).
    ({"storage": "redis://localhost:notaport"}, "storage", "port"),
    ({"storage": "redis://localhost:99999"}, "storage", "port"),
    ({"storage": "redis://:6379/0"}, "storage", "names no host"),
    ({"storage": "redis://localhost:6379/zero"}, "storage", "database"),
    ({"storage": "redis://localhost:6379/0?max_connections=lots"}, "storage", "whole number"),
    ({"storage": "redis://localhost:6379/0?socket_timeout=0"}, "storage", "seconds"),
    ({"storage": "redis://localhost:6379/0?pool=big"}, "storage", "unknown option"),
    ({"storage": "memory://somewhere"}, "storage", "nothing after"),
    ({"limit": "1 per 100000000000000000000 second"}, "limit", "ten years"),
    ({"limit": "10000000000/second"}, "limit", "more than"),
    ({"storage_timeout": 600}, "storage_timeout", "at most 60"),
    ({"storage_timeout": 7e-40}, "storage_timeout", "at least 0.001"),
    ({"trusted_proxy_hops": 1}, "trusted_proxy_hops", "needs trusted_proxies"),
    ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies", "CIDR"),
    ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies", "is not a list"),
    ({"header_keys_verified": "yes"}, "header_keys_verified", "true or false"),
    ({"storage_breaker": {"open_duration": 0}}, "storage_breaker.open_duration", "greater"),
    (
        {"key": "header:x-t", "rules": [{"limit": "1/second", "name": "default-client"}]},
        "name",
        "twin",
    ),
]


@pytest.mark.parametrize(("data", "field", "fragment"), CRASHED_LATER)
def test_values_that_used_to_crash_later_are_refused_at_load(
    data: dict[str, Any], field: str, fragment: str
) -> None:
    with pytest.raises(PolicyError) as info:
        RateLimitPolicy.from_dict(data)
    assert info.value.field == field
    assert fragment in str(info.value)


def test_good_storage_uris_and_proxies_load() -> None:
    for uri in (
        "redis://localhost:6379/0",
        "rediss://user:secret@cache.internal:6380/2?socket_timeout=0.5&max_connections=64",
        "async+redis://127.0.0.1",
        "memory://",
    ):
        assert RateLimitPolicy(storage=uri).storage == uri
    policy = RateLimitPolicy.from_dict(
        {"trusted_proxies": ["10.0.0.0/8", "::1", "*"], "storage_breaker": {"open_duration": 2}}
    )
    assert policy.trusted_proxies == frozenset({"10.0.0.0/8", "::1", "*"})
    assert policy.storage_breaker.open_duration == 2
    assert RateLimitPolicy.from_dict(policy.to_dict()) == policy


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if value == value and abs(value) != float("inf") else "nan"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


STRATEGIES_FOR_TEST = ["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
_FIELD_VALUES: dict[str, Any] = {
    "limit": st.sampled_from(
        [
            "5/minute",
            "0/second",
            "1 per 100000000000000000000 second",
            "10/second;100/minute",
            "9999999999/hour",
            "3/7 seconds",
            "1/year",
            "lots",
        ]
    ),
    "strategy": st.sampled_from([*STRATEGIES_FOR_TEST, "leaky"]),
    "storage": st.sampled_from(
        [
            "memory://",
            "REDIS",  # the live test server
            "REDIS?max_connections=4",
            "redis://localhost:notaport",
            "redis://localhost:6379/x",
            "redis://localhost:6379/0?pool=1",
            "memcached://localhost:11211",
        ]
    ),
    "storage_timeout": st.one_of(st.floats(allow_nan=True), st.integers(-1, 100)),
    "key": st.sampled_from(["client", "global", "header:x-api-key", "header:X", "ip"]),
    "trusted_proxies": st.lists(
        st.sampled_from(["10.0.0.0/8", "::1", "*", "300.1.1.1", "10.0.0.0/33"]), max_size=2
    ),
    "trusted_proxy_hops": st.integers(-1, 3),
    "header_keys_verified": st.sampled_from([True, False, "yes"]),
    "costs": st.sampled_from([{}, {"/v2/*": 2}, {"/v2/*": 0}, {"/v2/*": 10**6}]),
    "max_tracked_keys": st.integers(-1, 5),
}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.fixed_dictionaries({}, optional=_FIELD_VALUES))
def test_generated_policy_files_load_and_work_or_name_the_field(
    tmp_path_factory: pytest.TempPathFactory, table: dict[str, Any]
) -> None:
    """Issue 13: every policy value either loads and works, or is refused at load time
    with a PolicyError naming the field. Each generated [ratelimit] table is written as a
    seawall.toml; when it loads, a real request is decided without a storage error."""
    from seawall.policy.file import load_policies
    from seawall.ratelimit import RateLimiter

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    uses_redis = str(table.get("storage", "")).startswith("REDIS")
    if uses_redis:
        table["storage"] = table["storage"].replace("REDIS", redis_url)
        table["name"] = f"fuzz{uuid.uuid4().hex[:10]}"
    lines = ["[ratelimit]"]
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if k not in nested]
    for name, sub in nested.items():
        lines.append(f"[ratelimit.{name}]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in sub.items()]
    path = tmp_path_factory.mktemp("fuzz") / "seawall.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        policy = load_policies(path).ratelimit
    except PolicyError as exc:
        assert exc.field.startswith(f"{path}: ratelimit.")
        assert exc.field.split("ratelimit.", 1)[1].split("[")[0].split(".")[0] in table
        return
    assert policy is not None
    if uses_redis and _redis_down(redis_url):
        return
    cost = policy.cost_of()("/v2/x")

    async def decide() -> None:
        limiter = RateLimiter(policy, events=EventBus())
        keys = tuple("ip:192.0.2.1" if r.key == "client" else "*" for r in limiter.rules)
        decision = await limiter.hit(keys, cost)
        await limiter.aclose()
        assert not decision.storage_failed, limiter.storage_failures
        assert decision.admitted

    asyncio.run(decide())


def _redis_down(url: str) -> bool:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception:
        if os.environ.get("SEAWALL_REQUIRE_REDIS") == "1":
            raise
        return True
    return False
