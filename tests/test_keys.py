"""Key extraction: trusted proxies only, namespaced and bounded keys, never an exception."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seawall.ratelimit_keys import bounded
from seawall.ratelimit_keys import client_address as _client_address
from seawall.ratelimit_keys import make_key_func as _make_key_func

PEER = ("192.0.2.10", 5555)
ANY = ("*",)  # every peer is a trusted proxy: most tests here are about parsing the header


def client_address(scope: dict[str, Any], **options: Any) -> str:
    """With hops, trust any peer (the proxy-address checks have tests of their own)."""
    if options.get("trusted_proxy_hops"):
        options.setdefault("trusted_proxies", ANY)
    return _client_address(scope, **options)


def make_key_func(source: Any, **options: Any) -> Any:
    if options.get("trusted_proxy_hops"):
        options.setdefault("trusted_proxies", ANY)
    return _make_key_func(source, **options)


def scope(headers: list[tuple[bytes, bytes]] | None = None, client: Any = PEER) -> dict[str, Any]:
    return {"type": "http", "path": "/", "headers": headers or [], "client": client}


def xff(value: bytes, client: Any = PEER) -> dict[str, Any]:
    return scope([(b"x-forwarded-for", value)], client)


def test_default_ignores_forwarding_headers_entirely() -> None:
    spoofed = xff(b"1.2.3.4, 5.6.7.8")
    assert client_address(spoofed) == "ip:192.0.2.10"
    assert client_address(scope([(b"forwarded", b"for=1.2.3.4")])) == "ip:192.0.2.10"


def test_one_trusted_hop_takes_the_rightmost_entry() -> None:
    # The client spoofed "6.6.6.6"; our proxy appended the real address "203.0.113.7".
    s = xff(b"6.6.6.6, 203.0.113.7")
    assert client_address(s, trusted_proxy_hops=1) == "ip:203.0.113.7"
    assert client_address(s, trusted_proxy_hops=2) == "ip:6.6.6.6"


def test_spoofing_left_of_trusted_hops_changes_nothing() -> None:
    honest = xff(b"203.0.113.7")
    for spoof in (b"1.1.1.1", b"garbage", b"", b"x" * 100_000, b"::1"):
        spoofed = xff(spoof + b", 203.0.113.7")
        assert client_address(spoofed, trusted_proxy_hops=1) == client_address(
            honest, trusted_proxy_hops=1
        )


def test_multiple_header_lines_are_one_list() -> None:
    s = scope([(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"203.0.113.7")])
    assert client_address(s, trusted_proxy_hops=1) == "ip:203.0.113.7"


def test_malformed_empty_short_and_long_fall_back_to_the_peer() -> None:
    for value in (
        b"",
        b" , ",
        b"not-an-ip",
        b"999.1.1.1",
        b"\xff\xfe\x00",
        b"1" * 10_000,
        b",".join([b"1.2.3.4"] * 50_000) + b",junk",
    ):
        assert client_address(xff(value), trusted_proxy_hops=1) == "ip:192.0.2.10", value[:20]
    # fewer entries than trusted hops: the request did not pass through all our proxies
    assert client_address(xff(b"203.0.113.7"), trusted_proxy_hops=3) == "ip:192.0.2.10"


def test_ports_brackets_and_ipv6_grouping() -> None:
    assert client_address(xff(b"203.0.113.7:8080"), trusted_proxy_hops=1) == "ip:203.0.113.7"
    a = client_address(xff(b"[2001:db8::1]:443"), trusted_proxy_hops=1)
    b = client_address(xff(b"2001:db8::ffff"), trusted_proxy_hops=1)
    assert a == b == "ip:2001:db8::~64"  # one /64 is one client
    assert client_address(scope(client=("::ffff:10.0.0.1", 1))) == "ip:10.0.0.1"
    assert client_address(scope(client=("2001:db8::1", 1)), ipv6_prefix=128) == "ip:2001:db8::1"


def test_rfc7239_forwarded() -> None:
    value = b'for=6.6.6.6;proto=http, for="[2001:db8:cafe::17]:4711";by=10.0.0.1'
    s = scope([(b"forwarded", value)])
    assert client_address(s, trusted_proxy_hops=1, proxy_header="forwarded") == (
        "ip:2001:db8:cafe::~64"
    )
    assert client_address(s, trusted_proxy_hops=2, proxy_header="forwarded") == "ip:6.6.6.6"
    empty_elements = scope([(b"forwarded", b"for=203.0.113.9, ,")])  # RFC 9110: ignored
    assert client_address(empty_elements, trusted_proxy_hops=1, proxy_header="forwarded") == (
        "ip:203.0.113.9"
    )
    hostile = scope([(b"forwarded", b'for="' + b'a,"\\' * 30_000)])
    assert client_address(hostile, trusted_proxy_hops=2, proxy_header="forwarded") == (
        "ip:192.0.2.10"
    )
    odd = scope([(b"forwarded", b'for="_hidden", for=unknown;x="a,b"')])
    assert client_address(odd, trusted_proxy_hops=1, proxy_header="forwarded") == "ip:192.0.2.10"


def test_missing_or_odd_client() -> None:
    assert client_address(scope(client=None)) == "ip:unknown"
    assert client_address(scope(client=("testclient", 50000))) == "peer:testclient"
    assert client_address(scope(client=(None, 1))) == "ip:unknown"
    assert client_address(scope(client=42)) == "ip:unknown"


def test_keys_are_namespaced_so_tenants_cannot_collide() -> None:
    by_header = make_key_func("header:x-tenant")
    tenant_like_ip = by_header(scope([(b"x-tenant", b"192.0.2.10")]))
    assert tenant_like_ip == "h:192.0.2.10"
    assert tenant_like_ip != make_key_func("client")(scope())
    # A tenant cannot forge a hashed key either: '#' is never kept verbatim.
    forged = bounded("h", bounded("h", "x" * 100)[2:])
    assert forged != bounded("h", "x" * 100)
    assert by_header(scope([(b"x-tenant", b"acme")])) != by_header(scope([(b"x-tenant", b"Acme")]))


def test_keys_are_bounded_and_separator_free() -> None:
    key = make_key_func("header:x-tenant")(scope([(b"x-tenant", b"t/" * 50_000)]))
    assert len(key) <= 40
    assert "/" not in key
    assert bounded("h", "a/b") != bounded("h", "a_b")


def test_missing_header_and_failing_callable_fall_back_to_client() -> None:
    assert make_key_func("header:x-tenant")(scope()) == "ip:192.0.2.10"

    def broken(_scope: Any) -> str:
        raise RuntimeError("bug in user code")

    assert make_key_func(broken)(scope()) == "ip:192.0.2.10"
    assert make_key_func(lambda s: None)(scope()) == "ip:192.0.2.10"
    assert make_key_func(lambda s: "acme")(scope()) == "fn:acme"
    assert make_key_func("global")(scope()) == make_key_func("global")(scope(client=None))


header_bytes = st.binary(max_size=300)
clients = st.one_of(
    st.none(),
    st.tuples(st.one_of(st.text(max_size=80), st.ip_addresses().map(str)), st.integers()),
    st.tuples(),
    st.integers(),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(
        st.tuples(
            st.sampled_from([b"x-forwarded-for", b"forwarded", b"x-tenant", b"x-other"]),
            header_bytes,
        ),
        max_size=4,
    ),
    client=clients,
    hops=st.integers(min_value=0, max_value=3),
    source=st.sampled_from(["client", "header:x-tenant", "global"]),
    proxy_header=st.sampled_from(["x-forwarded-for", "forwarded"]),
)
def test_any_header_bytes_any_client_never_raise(
    values: list[tuple[bytes, bytes]], client: Any, hops: int, source: str, proxy_header: str
) -> None:
    func = make_key_func(source, trusted_proxy_hops=hops, proxy_header=proxy_header)
    key = func(scope(values, client))
    assert isinstance(key, str)
    assert 0 < len(key) <= 80
    assert "/" not in key
    assert func(scope(list(values), client)) == key  # same input, same key


@settings(max_examples=100, deadline=None)
@given(
    real=st.ip_addresses(v=4).map(str),
    junk=st.lists(st.binary(max_size=40).filter(lambda b: b"," not in b), max_size=5),
)
def test_same_trusted_input_same_key_whatever_the_client_prepends(
    real: str, junk: list[bytes]
) -> None:
    honest = client_address(xff(real.encode()), trusted_proxy_hops=1)
    spoofed = client_address(xff(b",".join([*junk, real.encode()])), trusted_proxy_hops=1)
    assert honest == spoofed == f"ip:{real}"


# --- issue 13: forwarding headers count only from configured proxy addresses ------------


def test_hop_count_alone_no_longer_lets_a_direct_client_pick_its_key() -> None:
    """Issue 13: with trusted_proxy_hops=1 and the app reachable directly, a client picked
    any key, a victim's address included. Now the peer must be a configured proxy."""
    direct = xff(b"203.0.113.99", client=("198.51.100.23", 1))  # not via our proxy
    via_proxy = xff(b"203.0.113.99", client=("10.0.0.5", 1))
    trust = {"trusted_proxies": ("10.0.0.0/8",), "trusted_proxy_hops": 1}
    assert _client_address(direct, **trust) == "ip:198.51.100.23"
    assert _client_address(via_proxy, **trust) == "ip:203.0.113.99"


def test_recursive_walk_skips_our_own_proxies_like_nginx_real_ip_recursive() -> None:
    proxies = ("10.0.0.0/8", "2001:db8:ffff::/48")
    chain = xff(b"6.6.6.6, 203.0.113.7, 10.1.2.3, 10.0.0.9", client=("10.0.0.1", 1))
    assert _client_address(chain, trusted_proxies=proxies) == "ip:203.0.113.7"
    spoofed_inner = xff(b"10.9.9.9", client=("10.0.0.1", 1))  # every entry is ours
    assert _client_address(spoofed_inner, trusted_proxies=proxies) == "ip:10.9.9.9"
    v6_proxy = scope([(b"x-forwarded-for", b"203.0.113.8")], client=("2001:db8:ffff::2", 1))
    assert _client_address(v6_proxy, trusted_proxies=proxies) == "ip:203.0.113.8"
    mapped = scope([(b"x-forwarded-for", b"203.0.113.8")], client=("::ffff:10.0.0.1", 1))
    assert _client_address(mapped, trusted_proxies=proxies) == "ip:203.0.113.8"


@settings(max_examples=100, deadline=None)
@given(
    peer=st.ip_addresses(v=4).map(str),
    header=st.binary(max_size=120),
)
def test_an_untrusted_peer_is_its_own_key_whatever_it_writes(peer: str, header: bytes) -> None:
    func = _make_key_func("client", trusted_proxies=("10.0.0.0/8",))
    key = func(scope([(b"x-forwarded-for", header), (b"forwarded", header)], (peer, 1)))
    if not peer.startswith("10."):
        assert key == f"ip:{peer}"
