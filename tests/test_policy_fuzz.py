"""Every policy value either loads and works, or is refused at load time with a
PolicyError naming the field (issue 13): generated [client] and [cache] tables, written as
a seawall.toml, loaded, and when they load, used for a real call through the transport.
(The [ratelimit] table has its own generator in tests/test_ratelimit_policy.py.)"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seawall.cache import FallbackCache
from seawall.client.httpx import ResilientTransport
from seawall.clock import ManualClock
from seawall.errors import PolicyError
from seawall.policy.file import load_policies

NUMBERS = st.one_of(
    st.integers(-2, 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["10", True, [1]]),
)

CLIENT: dict[str, Any] = {
    "attempt_timeout": NUMBERS,
    "rate_limit": st.sampled_from(
        ["50/second", "0/second", "1 per 100000000000000000000 second", "lots", "5/minute", 5]
    ),
    "max_concurrency": NUMBERS,
    "coalesce": st.sampled_from([True, False, "yes", 1]),
    "max_hosts": NUMBERS,
}
RETRY: dict[str, Any] = {
    "attempts": NUMBERS,
    "deadline": NUMBERS,
    "backoff_base": NUMBERS,
    "backoff_cap": NUMBERS,
    "retry_methods": st.sampled_from([["GET"], ["get", "post"], "GET", [1], []]),
    "retry_statuses": st.sampled_from([[503], [200], [600], 503, ["503"], []]),
    "idempotency_header": st.sampled_from(["Idempotency-Key", "bad header", "", 3]),
    "budget_ratio": NUMBERS,
    "budget_min_retries_per_second": NUMBERS,
    "budget_window": NUMBERS,
}
BREAKER: dict[str, Any] = {
    "window": st.sampled_from(["count", "time", "rolling", 3]),
    "window_size": NUMBERS,
    "minimum_calls": NUMBERS,
    "failure_rate_threshold": NUMBERS,
    "open_duration": NUMBERS,
    "max_open_duration": NUMBERS,
    "half_open_probes": NUMBERS,
    "jitter": NUMBERS,
}
CACHE: dict[str, Any] = {
    "max_bytes": NUMBERS,
    "max_entry_bytes": NUMBERS,
    "default_fresh_seconds": NUMBERS,
    "max_stale": NUMBERS,
    "fallback_statuses": st.sampled_from([[503], 503, [200], [700], "503", []]),
    "extractors": st.sampled_from([["oci"], ["nope"], "oci", [3], []]),
    "credential_headers": st.sampled_from([["X-Tenant"], ["bad header"], "x-tenant", [1]]),
    "fallback_after": NUMBERS,
    "namespace": st.sampled_from(["seawall", "", "a\nb", 5]),
}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def _table(name: str, values: dict[str, Any]) -> list[str]:
    return [f"[{name}]", *(f"{k} = {_toml(v)}" for k, v in values.items())]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=st.fixed_dictionaries({}, optional=CLIENT),
    retry=st.fixed_dictionaries({}, optional=RETRY),
    breaker=st.fixed_dictionaries({}, optional=BREAKER),
    cache=st.fixed_dictionaries({}, optional=CACHE),
)
def test_generated_client_and_cache_tables_load_and_work_or_name_the_field(
    tmp_path_factory: pytest.TempPathFactory,
    client: dict[str, Any],
    retry: dict[str, Any],
    breaker: dict[str, Any],
    cache: dict[str, Any],
) -> None:
    lines = [
        *_table("client", client),
        *_table("client.retry", retry),
        *_table("client.breaker", breaker),
        *_table("cache", cache),
    ]
    path = Path(tmp_path_factory.mktemp("fuzz")) / "seawall.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        policies = load_policies(path)
        store = FallbackCache(policy=policies.cache)
    except PolicyError as exc:
        field = exc.field.removeprefix(f"{path}: ")
        section, _, name = field.partition(".")
        tables = {"client": client, "cache": cache}
        if name.startswith("retry.") or name.startswith("breaker."):
            sub, _, name = name.partition(".")
            tables = {"client": retry if sub == "retry" else breaker}
        assert section in tables, exc
        named = name.split("[")[0]
        given_fields = tables[section]
        # A conflict between two settings (backoff_cap below backoff_base) may name the one
        # left at its default; its message then names the one that was set.
        assert named in given_fields or any(f in exc.problem for f in given_fields), exc
        return
    assert policies.client is not None

    async def call() -> int:
        transport = ResilientTransport(
            httpx.MockTransport(lambda request: httpx.Response(200, content=b"ok")),
            policies.client,
            clock=ManualClock(),
            cache=store,
        )
        async with httpx.AsyncClient(transport=transport) as c:
            r = await c.get("https://registry.test/v2/x/manifests/1")
            return r.status_code

    assert asyncio.run(call()) == 200
