"""Sans-IO freshness: lifetimes, ages, RFC 5861 windows, storability."""

from __future__ import annotations

import math
from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seawall.cache.freshness import (
    Freshness,
    State,
    cache_control,
    evaluate,
    freshness_for,
    http_date,
    is_storable_request,
    is_storable_response,
)
from seawall.clock import ManualClock

NOW = 1_700_000_000.0


def fresh(headers: list[tuple[str, str]], **kw: float | bool) -> Freshness:
    args: dict[str, float | bool] = {
        "immutable": False,
        "default_fresh": 60.0,
        "max_stale": 3600.0,
        "stale_while_revalidate": 0.0,
    }
    args.update(kw)
    return freshness_for(headers, now_wall=NOW, **args)  # type: ignore[arg-type]


def test_cache_control_parsing() -> None:
    cc = cache_control('max-age=60, No-Store, stale-if-error="30",  ,private')
    assert cc == {"max-age": "60", "no-store": None, "stale-if-error": "30", "private": None}
    assert cache_control(None) == {}


def test_default_freshness_when_registry_sends_no_cache_control(clock: ManualClock) -> None:
    f = freshness_for(
        [("etag", '"sha256:abc"'), ("docker-content-digest", "sha256:abc")],
        now_wall=clock.wall(),
        immutable=False,
        default_fresh=60.0,
        max_stale=3600.0,
        stale_while_revalidate=0.0,
    )
    assert f.lifetime == 60.0
    assert evaluate(f, clock.wall()) is State.FRESH
    clock.advance(59.9)
    assert evaluate(f, clock.wall()) is State.FRESH
    clock.advance(0.2)
    assert evaluate(f, clock.wall()) is State.STALE_IF_ERROR
    clock.advance(3600.0 - 0.1 - 0.05)
    assert evaluate(f, clock.wall()) is State.STALE_IF_ERROR
    clock.advance(0.2)
    assert evaluate(f, clock.wall()) is State.EXPIRED


def test_max_age_s_maxage_and_expires() -> None:
    assert fresh([("cache-control", "max-age=300")]).lifetime == 300
    assert fresh([("cache-control", "max-age=300, s-maxage=10")]).lifetime == 10
    expires = [
        ("date", formatdate(NOW - 10, usegmt=True)),
        ("expires", formatdate(NOW + 90, usegmt=True)),
    ]
    assert fresh(expires).lifetime == 100
    assert fresh([("expires", "0")]).lifetime == 0  # invalid Expires: already expired
    assert fresh([("cache-control", "max-age=nonsense")]).lifetime == 60  # ignored -> default


def test_age_header_and_date_count_towards_age() -> None:
    f = fresh([("cache-control", "max-age=100"), ("age", "40")])
    assert f.age(NOW) == 40
    assert evaluate(f, NOW + 59) is State.FRESH
    assert evaluate(f, NOW + 61) is State.STALE_IF_ERROR
    g = fresh([("date", formatdate(NOW - 30, usegmt=True))])
    assert 29 <= g.age(NOW) <= 31


def test_no_cache_is_stored_but_always_revalidated_and_usable_on_error() -> None:
    f = fresh([("cache-control", "no-cache")])
    assert f.lifetime == 0
    assert evaluate(f, NOW) is State.STALE_IF_ERROR


def test_must_revalidate_forbids_stale_use() -> None:
    f = fresh([("cache-control", "max-age=10, must-revalidate, stale-if-error=100")])
    assert evaluate(f, NOW + 5) is State.FRESH
    assert evaluate(f, NOW + 11) is State.EXPIRED


def test_stale_if_error_from_response_is_capped_by_policy() -> None:
    f = fresh([("cache-control", "max-age=10, stale-if-error=20")])
    assert evaluate(f, NOW + 29) is State.STALE_IF_ERROR
    assert evaluate(f, NOW + 31) is State.EXPIRED
    g = fresh([("cache-control", "max-age=10, stale-if-error=99999")], max_stale=50.0)
    assert g.stale_if_error == 50
    assert evaluate(g, NOW + 61) is State.EXPIRED


def test_stale_while_revalidate_window() -> None:
    f = fresh([("cache-control", "max-age=10, stale-while-revalidate=5")])
    assert evaluate(f, NOW + 12) is State.STALE_REVALIDATE
    assert evaluate(f, NOW + 16) is State.STALE_IF_ERROR
    g = fresh([], stale_while_revalidate=30.0)
    assert evaluate(g, NOW + 80) is State.STALE_REVALIDATE


def test_digest_named_blobs_never_go_stale() -> None:
    f = fresh([("cache-control", "max-age=1")], immutable=True)
    assert math.isinf(f.lifetime)
    assert evaluate(f, NOW + 10**9) is State.FRESH
    assert Freshness.from_json(f.to_json()) == f


def test_storability() -> None:
    assert is_storable_request("GET", [])
    assert not is_storable_request("HEAD", [])
    assert not is_storable_request("POST", [])
    assert not is_storable_request("GET", [("cache-control", "no-store")])
    assert is_storable_response(200, [("cache-control", "max-age=60")])
    assert not is_storable_response(200, [("cache-control", "no-store")])
    assert not is_storable_response(200, [("Cache-Control", "private, max-age=60")])
    assert not is_storable_response(200, [("vary", "*")])
    for status in (206, 304, 404, 500, 503):
        assert not is_storable_response(status, [])


def test_http_date() -> None:
    assert http_date(formatdate(NOW, usegmt=True)) == NOW
    assert http_date("yesterday") is None
    assert http_date(None) is None


_ORDER = [State.FRESH, State.STALE_REVALIDATE, State.STALE_IF_ERROR, State.EXPIRED]


@settings(max_examples=80, deadline=None)
@given(
    max_age=st.integers(0, 1000),
    swr=st.integers(0, 1000),
    sie=st.integers(0, 1000),
    steps=st.lists(st.floats(0, 500, allow_nan=False), min_size=1, max_size=20),
)
def test_state_only_moves_forward_in_time(
    max_age: int, swr: int, sie: int, steps: list[float]
) -> None:
    f = fresh(
        [
            (
                "cache-control",
                f"max-age={max_age}, stale-while-revalidate={swr}, stale-if-error={sie}",
            )
        ],
        max_stale=10_000.0,
    )
    clock = ManualClock(wall_start=NOW)
    last = _ORDER.index(evaluate(f, clock.wall()))
    assert last == 0 or max_age == 0
    for step in steps:
        clock.advance(step)
        state = evaluate(f, clock.wall())
        assert _ORDER.index(state) >= last
        last = _ORDER.index(state)
        usable = clock.wall() - NOW <= max_age + max(swr, sie)
        assert (state is not State.EXPIRED) == usable or (
            clock.wall() - NOW == max_age + max(swr, sie)
        )


# ---------------------------------------------------------------- edges that decide staleness


def test_a_response_dated_now_is_not_aged_by_its_date() -> None:
    f = fresh([("date", formatdate(NOW, usegmt=True)), ("cache-control", "max-age=10")])
    assert f.initial_age == 0.0
    assert evaluate(f, NOW + 9.5) is State.FRESH


def test_expires_decides_the_lifetime_with_or_without_a_date() -> None:
    dated = fresh([("date", formatdate(NOW, usegmt=True)), ("expires", formatdate(NOW))])
    assert dated.lifetime == 0.0  # expires when it was sent: stale at once
    assert evaluate(dated, NOW + 0.5) is State.STALE_IF_ERROR
    undated = fresh([("expires", formatdate(NOW + 30, usegmt=True))])
    assert undated.lifetime == 30.0  # counted from reception


def test_proxy_revalidate_forbids_stale_use_like_must_revalidate() -> None:
    for directive in ("must-revalidate", "proxy-revalidate"):
        f = fresh([("cache-control", f"max-age=5, stale-if-error=60, {directive}")])
        assert (f.stale_if_error, f.stale_while_revalidate) == (0.0, 0.0)
        assert evaluate(f, NOW + 6) is State.EXPIRED


def test_the_stale_windows_include_their_last_instant_and_nothing_at_zero() -> None:
    f = Freshness(NOW, 0.0, 10.0, 5.0, 0.5)
    assert evaluate(f, NOW + 10.25) is State.STALE_REVALIDATE
    assert evaluate(f, NOW + 10.5) is State.STALE_REVALIDATE
    assert evaluate(f, NOW + 15.0) is State.STALE_IF_ERROR
    assert evaluate(f, NOW + 15.01) is State.EXPIRED
    none = Freshness(NOW, 0.0, 10.0, 0.0, 0.0)
    assert evaluate(none, NOW + 10.0) is State.EXPIRED  # at the end of its lifetime


def test_cache_control_spread_over_lines_quoted_values_and_a_billion_seconds() -> None:
    f = fresh([("cache-control", 'max-age="1000000000"'), ("cache-control", "stale-if-error=7")])
    assert (f.lifetime, f.stale_if_error) == (1_000_000_000.0, 7.0)


def test_vary_star_without_spaces_is_still_vary_star() -> None:
    assert not is_storable_response(200, [("vary", "accept,*")])
    assert is_storable_response(200, [("vary", "accept, accept-encoding")])


@pytest.mark.parametrize(
    ("name", "per_client"),
    [
        ("Set-Cookie", True),
        ("RateLimit-Policy", True),
        ("X-RateLimit-Remaining", True),
        ("Retry-After", True),
        ("ETag", False),
    ],
)
def test_fields_about_the_caller_are_known_in_any_case(name: str, per_client: bool) -> None:
    from seawall.cache.freshness import is_per_client_field

    assert is_per_client_field(name) is per_client


def test_what_looks_like_an_artifact() -> None:
    from seawall.cache.freshness import is_artifact

    npm = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8"
    assert is_artifact("/express", npm, [])
    assert not is_artifact("/express", "application/json", [])
    oci = [("Content-Type", " application/vnd.oci.image.index.v1+json")]
    assert is_artifact("/api/anything", None, oci)
    assert not is_artifact("/api/session", None, [("content-type", "application/json")])


# ---------------------------------------------------------------- what the server face keeps


@pytest.mark.parametrize(
    ("cache_control_value", "allowed"),
    [
        ("public", True),
        ("Public", True),
        ("s-maxage=60", True),
        ("max-age=0", True),
        ("no-cache", False),
        (None, False),
    ],
)
def test_a_response_says_a_shared_cache_may_keep_it(
    cache_control_value: str | None, allowed: bool
) -> None:
    from seawall.cache.freshness import shared_cache_allowed

    headers = [] if cache_control_value is None else [("Cache-Control", cache_control_value)]
    assert shared_cache_allowed(headers) is allowed


def test_quoted_field_names_in_cache_control_are_kept_whole() -> None:
    assert cache_control('no-cache="X-Auth-Token", private="X-User"') == {
        "no-cache": "X-Auth-Token",
        "private": "X-User",
    }


def test_a_one_second_stale_if_error_window_is_honoured() -> None:
    f = fresh([("cache-control", "max-age=10, stale-if-error=1")])
    assert evaluate(f, NOW + 10.5) is State.STALE_IF_ERROR
    assert evaluate(f, NOW + 11.0) is State.STALE_IF_ERROR
    assert evaluate(f, NOW + 11.5) is State.EXPIRED


def test_freshness_survives_its_json_on_disk() -> None:
    """The metadata is written as strict JSON (Redis and other readers), read back by
    another process, and may have been written before a field existed."""
    import json

    for f in (
        fresh([("cache-control", "max-age=10, must-revalidate")]),
        fresh([("cache-control", "max-age=10, proxy-revalidate, stale-if-error=60")]),
        fresh([("cache-control", "max-age=10, stale-while-revalidate=5")]),
        fresh([], immutable=True),
    ):
        text = json.dumps(f.to_json(), allow_nan=False)
        assert Freshness.from_json(json.loads(text)) == f
    assert fresh([("cache-control", "max-age=10, must-revalidate")]).must_revalidate is True
    assert fresh([("cache-control", "max-age=10")]).must_revalidate is False
    older = fresh([("cache-control", "max-age=10")]).to_json()
    del older["must_revalidate"]
    assert Freshness.from_json(older).must_revalidate is False


def test_any_content_length_a_server_can_send_is_read() -> None:
    """Up to 18 digits (every length below 10**18 fits a signed 64-bit integer): a body
    declared larger than the store takes is not even buffered."""
    from seawall.cache.fallback import FallbackCache
    from seawall.cache.freshness import content_length
    from seawall.cache.keys import RequestInfo

    huge = "9" * 18
    assert content_length([("Content-Length", f" {huge} ")]) == int(huge)
    assert content_length([("content-length", "12")]) == 12
    for hostile in ("1" * 19, "²", "-1", "1e3", ""):
        assert content_length([("content-length", hostile)]) is None
    cache = FallbackCache()
    request = RequestInfo("GET", "https://r.test/v2/app/manifests/1")
    assert cache.plan_recording(request, 200, [("content-length", huge)]) is None
    assert cache.plan_recording(request, 200, [("content-length", "12")]) is not None
