"""Cache keys: digest extractors, credential scope, Accept for manifests, Vary, policy."""

from __future__ import annotations

import gc
import re
import tracemalloc
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seawall.cache import keys as keys_module
from seawall.cache.fallback import FallbackCache
from seawall.cache.keys import (
    EXTRACTORS,
    UNVERIFIABLE,
    RequestInfo,
    credential_scope,
    extract_digest,
    fragment_digest,
    is_manifest_request,
    oci_blob_digest,
    parse_vary,
    path_digest,
    register_extractor,
    request_key,
    variant_key,
    vary_values,
)
from seawall.errors import PolicyError
from seawall.policy.cache import CachePolicy

HEX = "a" * 64
HEX2 = "0123456789abcdef" * 4


@pytest.fixture(autouse=True)
def _cold_memos() -> None:
    """Every test here computes each URL, digest and header name afresh. The module
    remembers them (a registry front-end sees the same request lines again and again), so
    what earlier tests asked would otherwise be answered from the memo and the first
    computation, the one that decides, would go unchecked. mutmut forks each mutant's
    run from a process that has already run the whole selection: without this, no
    mutant of URL normalization or of the credential-name rule was ever seen."""
    for memo in (keys_module._URLS, keys_module._DIGESTS, keys_module._CREDENTIAL_NAMES):
        memo.clear()


def test_oci_extractor_matches_blobs_only() -> None:
    assert oci_blob_digest(f"/v2/library/alpine/blobs/sha256:{HEX}", "") == f"sha256:{HEX}"
    assert oci_blob_digest(f"/v2/a/b/c/blobs/sha256:{HEX2}", "") == f"sha256:{HEX2}"
    assert oci_blob_digest("/v2/library/alpine/manifests/latest", "") is None
    assert oci_blob_digest(f"/v2/x/blobs/sha256:{HEX[:63]}", "") == UNVERIFIABLE
    assert oci_blob_digest(f"/v2/x/blobs/uploads/sha256:{HEX}x", "") is None


def test_fragment_extractor() -> None:
    assert fragment_digest("/packages/x.whl", f"sha256={HEX}") == f"sha256:{HEX}"
    assert fragment_digest("/packages/x.whl", f"md5=00&sha256={HEX2}") == f"sha256:{HEX2}"
    assert fragment_digest("/packages/x.whl", "md5=00") is None
    assert fragment_digest("/packages/x.whl", f"sha256={HEX}0") == UNVERIFIABLE


def test_path_extractor_both_spellings() -> None:
    assert path_digest(f"/api/sha256/{HEX}/file.tgz", "") == f"sha256:{HEX}"
    assert path_digest(f"/store/sha256:{HEX2}", "") == f"sha256:{HEX2}"
    assert path_digest("/store/sha256/not-hex", "") is None
    assert path_digest("/sha256", "") is None


def test_extractors_are_pluggable_and_selected_by_policy() -> None:
    def nexus(path: str, fragment: str) -> str | None:
        return f"sha256:{path.rsplit('/', 1)[-1]}" if path.startswith("/nexus/") else None

    register_extractor("nexus-test", nexus)
    try:
        assert extract_digest(f"/nexus/{HEX}", "", ["nexus-test"]) == f"sha256:{HEX}"
        assert extract_digest(f"/nexus/{HEX}", "", ["oci"]) is None
        policy = CachePolicy(extractors=("nexus-test",))
        key = request_key(
            RequestInfo("GET", f"https://r/nexus/{HEX}"), extractors=policy.extractors
        )
        assert key.digest == f"sha256:{HEX}"
    finally:
        del EXTRACTORS["nexus-test"]
    unregistered = CachePolicy(extractors=("nexus-test",))  # a plug-in may register it later
    with pytest.raises(PolicyError, match=r"^extractors: 'nexus-test' is not a registered"):
        FallbackCache(policy=unregistered)


def test_head_and_get_share_a_key_and_url_is_normalized() -> None:
    a = request_key(RequestInfo("GET", "HTTPS://Registry.Example:443/v2/x/manifests/1"))
    b = request_key(RequestInfo("HEAD", "https://registry.example/v2/x/manifests/1"))
    assert a.base == b.base
    assert a.url == "https://registry.example/v2/x/manifests/1"
    c = request_key(RequestInfo("GET", "https://registry.example:5000/v2/x/manifests/1"))
    assert c.base != a.base
    d = request_key(RequestInfo("GET", "https://registry.example/v2/x/manifests/1?n=1"))
    assert d.base != a.base


def test_fragment_is_not_part_of_the_url_but_its_digest_is() -> None:
    a = request_key(RequestInfo("GET", f"https://pypi/x.whl#sha256={HEX}"))
    b = request_key(RequestInfo("GET", f"https://pypi/x.whl#sha256={HEX2}"))
    c = request_key(RequestInfo("GET", f"https://pypi/x.whl#sha256={HEX}"))
    assert a.url == b.url == "https://pypi/x.whl"
    assert a.base != b.base  # a response for one digest is never the answer for another
    assert a.base == c.base


def test_credentials_scope_the_key() -> None:
    url = f"https://r/v2/x/blobs/sha256:{HEX}"
    anon = request_key(RequestInfo("GET", url))
    alice = request_key(RequestInfo("GET", url, [("authorization", "Bearer alice")]))
    bob = request_key(RequestInfo("GET", url, [("authorization", "Bearer bob")]))
    cookie = request_key(RequestInfo("GET", url, [("cookie", "s=1")]))
    assert len({anon.base, alice.base, bob.base, cookie.base}) == 4
    assert anon.scope == "anon"
    assert "alice" not in alice.scope and alice.scope.startswith("cred:")
    public_a = request_key(RequestInfo("GET", url, [("authorization", "Bearer a")]), public=True)
    public_b = request_key(RequestInfo("GET", url), public=True)
    assert public_a.base == public_b.base


def test_credential_hash_is_salted_by_namespace() -> None:
    req = RequestInfo("GET", "https://r/", [("authorization", "Basic eA==")])
    assert credential_scope(req, public=False, namespace="a") != credential_scope(
        req, public=False, namespace="b"
    )


def test_accept_is_in_the_key_of_manifest_requests_only() -> None:
    m = "https://r/v2/lib/alpine/manifests/3.19"
    oci = "application/vnd.oci.image.index.v1+json"
    docker = "application/vnd.docker.distribution.manifest.v2+json"
    k1 = request_key(RequestInfo("GET", m, [("accept", oci)]))
    k2 = request_key(RequestInfo("GET", m, [("accept", docker)]))
    k3 = request_key(RequestInfo("GET", m, [("accept", f"{docker}, {oci}")]))
    k4 = request_key(RequestInfo("GET", m, [("accept", f"{oci},{docker}")]))
    assert k1.base != k2.base
    assert k3.base == k4.base  # order of the list does not matter
    assert is_manifest_request("/v2/lib/alpine/manifests/3.19")
    b = f"https://r/v2/lib/alpine/blobs/sha256:{HEX}"
    assert (
        request_key(RequestInfo("GET", b, [("accept", oci)])).base
        == request_key(RequestInfo("GET", b)).base
    )


def test_vary_parsing_and_variants() -> None:
    assert parse_vary(None) == ()
    assert parse_vary("Accept-Encoding, accept") == ("accept", "accept-encoding")
    assert parse_vary("Accept, *") is None
    req_json = RequestInfo("GET", "https://pypi/simple/x/", [("accept", "application/json")])
    req_html = RequestInfo("GET", "https://pypi/simple/x/", [("accept", "text/html")])
    names = ("accept",)
    base = request_key(req_json).base
    assert variant_key(base, vary_values(req_json, names)) != variant_key(
        base, vary_values(req_html, names)
    )
    assert vary_values(RequestInfo("GET", "https://x/"), names) == {"accept": ""}


@settings(max_examples=60, deadline=None)
@given(token=st.text(min_size=6, max_size=40).filter(lambda s: s.strip() == s and "\n" not in s))
def test_keys_never_carry_the_credential(token: str) -> None:
    req = RequestInfo("GET", "https://r/v2/x/manifests/1", [("authorization", f"Bearer {token}")])
    key = request_key(req)
    assert token not in key.scope and token not in key.base
    assert key == request_key(req)  # deterministic
    assert key.base != request_key(RequestInfo("GET", "https://r/v2/x/manifests/1")).base


def test_policy_validation_and_round_trip() -> None:
    p = CachePolicy()
    assert (
        503 in p.fallback_statuses and 429 in p.fallback_statuses and 501 not in p.fallback_statuses
    )
    assert CachePolicy.from_dict(p.to_dict()) == p
    q = CachePolicy.from_dict({"fallback_statuses": [503], "extractors": ["oci"], "public": True})
    assert q.fallback_statuses == frozenset({503}) and q.extractors == ("oci",)
    for bad in (
        {"max_bytes": 0},
        {"max_entry_bytes": 10, "max_bytes": 5},
        {"max_stale": -1},
        {"default_fresh_seconds": "soon"},
        {"fallback_statuses": [200]},
        {"public": "yes"},
        {"namespace": ""},
        {"extractors": "oci"},
        {"no_such": 1},
    ):
        with pytest.raises(PolicyError):
            CachePolicy.from_dict(bad)


# ---------------------------------------------------------------- what may be written down


def test_signed_query_values_are_redacted_and_everything_else_kept() -> None:
    from seawall.cache.keys import redact_url

    signed = (
        "https://cdn.test/blobs/sha256:ab?X-Amz-Signature=s3cr3t&X-Amz-Date=20240101"
        "&token=t0k&sig=abc&expires=99&part=2&empty="
    )
    assert redact_url(signed) == (
        "https://cdn.test/blobs/sha256:ab?X-Amz-Signature=REDACTED&X-Amz-Date=REDACTED"
        "&token=REDACTED&sig=REDACTED&expires=REDACTED&part=2&empty="
    )
    for plain in (
        "https://registry.test/v2/app/manifests/1.0",
        "https://registry.test/v2/?",
        "https://registry.test/simple/?page=2&format=json",
    ):
        assert redact_url(plain) == plain


@pytest.mark.parametrize(
    ("name", "credential"),
    [
        ("authorization", True),
        ("cookie", True),
        ("x-jfrog-art-api", True),
        ("x-registry-auth", True),
        ("x-session-id", True),
        ("private-token", True),
        ("accept", False),
        ("x-request-id", False),
    ],
)
def test_credential_headers_are_known_by_name_or_by_look(name: str, credential: bool) -> None:
    from seawall.cache.keys import is_credential_header

    for _ in range(2):  # the remembered answer is the same answer
        assert is_credential_header(name) is credential
    assert is_credential_header("x-tenant", extra=("x-tenant",)) is True


def test_a_repeated_request_header_reads_as_one_comma_joined_value() -> None:
    from seawall.cache.keys import RequestInfo

    info = RequestInfo("GET", "https://r.test/", (("accept", "a/b"), ("x", "1"), ("accept", "c/d")))
    assert info.header("accept") == "a/b, c/d"
    assert info.header("missing") is None


HEX = "ab" * 32


@pytest.mark.parametrize(
    ("path", "digest"),
    [
        ("/files/sha256", None),  # a directory called sha256 with nothing after it
        (f"/a/sha256/{HEX}", f"sha256:{HEX}"),  # the digest is the last segment
        (f"/a/SHA256/{HEX}/f.tgz", f"sha256:{HEX}"),
        (f"/files/sha256:{HEX}:x", "unverifiable"),  # says it is a digest, is not: never cached
    ],
)
def test_digest_path_segments(path: str, digest: str | None) -> None:
    from seawall.cache.keys import oci_blob_digest, path_digest

    assert path_digest(path, "") == digest
    assert oci_blob_digest("/v2/app/blobs/uploads/0b7a9c", "") is None  # an upload session


# ---------------------------------------------------------------- what makes two requests one


@pytest.mark.parametrize(
    ("spelled", "normal"),
    [
        ("HTTP://Mirror.Test:80/simple/app/", "http://mirror.test/simple/app/"),
        ("https://mirror.test:443/simple/app/", "https://mirror.test/simple/app/"),
        ("https://mirror.test", "https://mirror.test/"),  # no path is the root
        ("http://mirror.test:8080/simple/", "http://mirror.test:8080/simple/"),
        ("http://mirror.test:443/simple/", "http://mirror.test:443/simple/"),  # https's port
        ("https://mirror.test:80/simple/", "https://mirror.test:80/simple/"),  # http's port
        ("http:///v2/app/manifests/1", "http:///v2/app/manifests/1"),  # empty Host: none made up
    ],
)
def test_default_ports_and_an_empty_path_name_the_same_resource(spelled: str, normal: str) -> None:
    spelled_key = request_key(RequestInfo("GET", spelled))
    normal_key = request_key(RequestInfo("GET", normal))
    assert spelled_key.url == normal_key.url == normal
    assert spelled_key.base == normal_key.base
    for other in ("http://mirror.test:8081/simple/", "https://mirror.test:8443/"):
        assert request_key(RequestInfo("GET", other)).base != normal_key.base


def test_a_port_that_is_not_the_default_is_another_server() -> None:
    default = request_key(RequestInfo("GET", "http://mirror.test/simple/"))
    for port in (443, 8080):
        assert request_key(RequestInfo("GET", f"http://mirror.test:{port}/simple/")).base != (
            default.base
        )


def test_request_key_defaults_are_the_default_cache_policys() -> None:
    """Tooling that computes a key with the module function (to evict or inspect an entry)
    finds what a FallbackCache with the default policy stored."""
    for request in (
        RequestInfo("GET", f"https://r.test/v2/app/blobs/sha256:{HEX}", [("authorization", "x")]),
        RequestInfo("GET", "https://r.test/v2/app/manifests/1", [("accept", "a/b")]),
    ):
        assert request_key(request) == FallbackCache().key(request)


def test_public_anonymous_and_credential_scopes() -> None:
    with_token = RequestInfo("GET", "https://r.test/", [("authorization", "Bearer t")])
    anonymous = RequestInfo("GET", "https://r.test/", [("accept", "a/b")])
    assert credential_scope(with_token, public=True, namespace="n") == "public"
    assert credential_scope(anonymous, public=True, namespace="n") == "public"
    assert credential_scope(anonymous, public=False, namespace="n") == "anon"
    assert credential_scope(with_token, public=False, namespace="n").startswith("cred:")


def test_a_credential_header_outside_latin_1_still_scopes_the_key() -> None:
    """A header a caller built by hand (not read off the wire) may hold any character:
    the key is still computed, private, and the same each time, never an exception."""
    url = "https://r.test/v2/app/manifests/1"
    hand_made = RequestInfo("GET", url, [("x-token-€", "s€cret")])
    key = request_key(hand_made)
    assert key.scope.startswith("cred:") and "s€cret" not in key.scope
    assert key == request_key(hand_made)
    assert key.base != request_key(RequestInfo("GET", url)).base


def test_no_extractor_selected_means_no_url_names_a_digest() -> None:
    blob = f"https://r.test/v2/app/blobs/sha256:{HEX}"
    assert extract_digest(f"/v2/app/blobs/sha256:{HEX}", "", ()) is None
    key = request_key(RequestInfo("GET", blob), extractors=())
    assert (key.digest, key.cacheable) == (None, True)  # stored like any metadata
    manifest = "https://r.test/v2/app/manifests/1"
    by_accept = {
        request_key(RequestInfo("GET", manifest, [("accept", a)]), extractors=()).base
        for a in ("application/vnd.oci.image.index.v1+json", "application/json")
    }
    assert len(by_accept) == 2  # a manifest is still chosen by Accept


def test_a_plug_in_extractors_claim_is_checked_like_any_other() -> None:
    def sloppy(path: str, fragment: str) -> str | None:
        return path.rsplit("/", 1)[-1] if path.startswith("/sloppy/") else None

    register_extractor("sloppy-test", sloppy)
    try:
        names = ["sloppy-test"]
        assert extract_digest(f"/sloppy/sha256:{HEX}", "", names) == f"sha256:{HEX}"
        assert extract_digest("/sloppy/sha256:abc", "", names) == UNVERIFIABLE  # too short
        assert extract_digest(f"/sloppy/md5:{HEX[:32]}", "", names) == UNVERIFIABLE
        assert extract_digest(f"/sloppy/SHA256:{HEX.upper()}", "", names) == UNVERIFIABLE
        key = request_key(RequestInfo("GET", "https://r.test/sloppy/sha256:abc"), extractors=names)
        assert (key.digest, key.cacheable) == (None, False)
    finally:
        del EXTRACTORS["sloppy-test"]


def test_a_digest_the_cache_cannot_verify_is_no_digest() -> None:
    """Never cached, and no digest to coalesce on or to answer 'already stored' with."""
    key = request_key(RequestInfo("GET", f"https://r.test/v2/app/blobs/sha256:{HEX[:10]}"))
    assert (key.digest, key.cacheable) == (None, False)


def test_the_upload_endpoint_names_no_digest() -> None:
    assert oci_blob_digest("/v2/app/blobs/uploads", "") is None
    key = request_key(RequestInfo("GET", "https://r.test/v2/app/blobs/uploads"))
    assert (key.digest, key.cacheable) == (None, True)


def test_a_url_that_does_not_parse_gets_a_key_that_is_never_cached() -> None:
    hostile = "http://[/v2/app/manifests/1?token=s3cr3t"
    key = request_key(RequestInfo("GET", hostile, [("authorization", "Bearer t")]))
    assert (key.url, key.digest, key.cacheable) == ("(unparsable URL)", None, False)
    assert re.fullmatch(r"[0-9a-f]{64}", key.base)  # still a store key, whatever the input
    assert key.base != request_key(RequestInfo("GET", "http://[/other")).base


def test_accept_is_left_to_vary_outside_manifests_and_absent_is_empty() -> None:
    page = "https://pypi.test/simple/app/"
    html = request_key(RequestInfo("GET", page, [("accept", "text/html")]))
    json_ = request_key(
        RequestInfo("GET", page, [("accept", "application/vnd.pypi.simple.v1+json")])
    )
    assert html.base == json_.base == request_key(RequestInfo("GET", page)).base
    manifest = "https://r.test/v2/app/manifests/1"
    absent = request_key(RequestInfo("GET", manifest))
    empty = request_key(RequestInfo("GET", manifest, [("accept", "")]))
    assert absent.base == empty.base  # as for a Vary header: absent = empty
    assert absent.base != request_key(RequestInfo("GET", manifest, [("accept", "a/b")])).base


def test_vary_values_are_normalized_lists() -> None:
    url = "https://pypi.test/simple/app/"
    spread = RequestInfo(
        "GET", url, [("accept", " text/html ,application/json"), ("accept", "a/b")]
    )
    packed = RequestInfo("GET", url, [("accept", "a/b,application/json,text/html")])
    assert vary_values(spread, ["accept"]) == {"accept": "a/b,application/json,text/html"}
    assert vary_values(spread, ["accept"]) == vary_values(packed, ["accept"])


def test_long_urls_are_keyed_without_being_remembered() -> None:
    """The memos keep short request lines only: a flood of long distinct URLs (file links
    with a digest fragment and padding) costs a computation each, not memory."""
    urllib.parse.clear_cache()  # the standard library's own (128 URLs) is not this bound
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            url = f"https://files.test/app-{i}.whl#sha256={HEX}&pad=" + "x" * 50_000
            assert request_key(RequestInfo("GET", url)).digest == f"sha256:{HEX}"
        urllib.parse.clear_cache()
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 500_000  # 40 URLs of 50 kB: 2 MB if they were kept
