"""No leak, no poison, no bypass (issue 13): the cache against hostile and careless input.

One regression test per finding of the hostile review, and property tests over what makes
a key: credential headers, digests, redirects. docs/security.md says what each face
promises and points here.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import httpx
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from scripted import Answer, scripted_server
from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.cache import DiskStore, FallbackCache, MemoryStore
from seawall.cache.keys import RequestInfo, credential_scope, request_key
from seawall.client.httpx import ResilientTransport
from seawall.client.requests import ResilientAdapter
from seawall.clock import ManualClock
from seawall.policy.cache import CachePolicy

MANIFEST = "https://registry.test/v2/team/private/manifests/1.0"
CREDENTIAL_HEADERS = [
    "Authorization",
    "Proxy-Authorization",
    "Cookie",
    "X-JFrog-Art-Api",
    "PRIVATE-TOKEN",
    "JOB-TOKEN",
    "DEPLOY-TOKEN",
    "X-Api-Key",
    "X-Registry-Auth",  # not in seawall's list: caught because it looks like a credential
]


class Streamed(httpx.AsyncByteStream):
    """A body that arrives as a network body does (httpx reads a prebuilt one at once)."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        yield self.body


def _counting(
    body: bytes = b'{"private": true}',
) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-type": "application/json"}
        return httpx.Response(200, stream=Streamed(body), headers=headers)

    return httpx.MockTransport(handler), seen


@pytest.mark.parametrize("header", CREDENTIAL_HEADERS)
async def test_a_copy_fetched_with_a_credential_is_never_given_to_another(
    header: str, clock: ManualClock
) -> None:
    transport, seen = _counting()
    cache = FallbackCache(clock=clock)
    async with httpx.AsyncClient(
        transport=ResilientTransport(transport, clock=clock, cache=cache)
    ) as client:
        await client.get(MANIFEST, headers={header: "secret-of-alice"})
        await client.get(MANIFEST, headers={header: "secret-of-alice"})  # fresh: from cache
        assert len(seen) == 1
        await client.get(MANIFEST, headers={header: "secret-of-mallory"})
        await client.get(MANIFEST)  # no credential at all
    assert len(seen) == 3  # both went upstream: the upstream decides who may read it


@pytest.mark.parametrize("header", CREDENTIAL_HEADERS)
async def test_the_server_face_never_serves_a_private_copy_to_an_anonymous_caller(
    header: str, clock: ManualClock
) -> None:
    failing = False

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        status = 503 if failing else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"private manifest"})

    cache = FallbackCache(clock=clock)
    mw = FallbackCacheMiddleware(app, cache)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=mw), base_url="http://registry.test"
    ) as client:
        ok = await client.get("/v2/team/private/manifests/1.0", headers={header: "alice"})
        assert ok.status_code == 200
        failing = True
        anon = await client.get("/v2/team/private/manifests/1.0")
        same = await client.get("/v2/team/private/manifests/1.0", headers={header: "alice"})
    assert anon.status_code == 503  # nothing served across scopes
    assert same.status_code == 200 and same.headers["x-seawall-cache"] in ("hit", "stale")


def test_credential_headers_can_be_added_by_policy() -> None:
    info_a = RequestInfo("GET", MANIFEST, [("x-tenant", "a")])
    info_b = RequestInfo("GET", MANIFEST, [("x-tenant", "b")])
    assert request_key(info_a).base == request_key(info_b).base  # not a credential by name
    extra = ("x-tenant",)
    assert (
        request_key(info_a, credential_headers=extra).base
        != request_key(info_b, credential_headers=extra).base
    )
    assert CachePolicy(credential_headers=["X-Tenant"]).credential_headers == ("x-tenant",)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from([h.lower() for h in CREDENTIAL_HEADERS] + ["x-auth-token", "x-session"]),
    a=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    b=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    noise=st.lists(
        st.tuples(st.sampled_from(["accept", "user-agent", "x-request-id"]), st.text(max_size=10)),
        max_size=3,
    ),
)
def test_scopes_separate_every_credential_and_never_contain_it(
    name: str, a: str, b: str, noise: list[tuple[str, str]]
) -> None:
    scope_a = credential_scope(
        RequestInfo("GET", MANIFEST, [*noise, (name, a)]), public=False, namespace="n"
    )
    scope_b = credential_scope(
        RequestInfo("GET", MANIFEST, [(name, b), *noise]), public=False, namespace="n"
    )
    anon = credential_scope(RequestInfo("GET", MANIFEST, noise), public=False, namespace="n")
    assert anon == "anon" and scope_a != anon
    assert (scope_a == scope_b) == (a == b)
    assert len(a) < 8 or a not in scope_a  # only a salted hash


async def test_coalescing_never_hands_one_credentials_answer_to_another(
    clock: ManualClock,
) -> None:
    blob = "https://registry.test/v2/team/private/blobs/sha256:" + "0" * 64
    release = asyncio.Event()
    seen: list[str | None] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        await release.wait()
        if request.headers.get("authorization") != "Bearer alice":
            return httpx.Response(401)
        return httpx.Response(200, stream=Streamed(b"private layer"))

    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        alice = asyncio.create_task(client.get(blob, headers={"authorization": "Bearer alice"}))
        bob = asyncio.create_task(client.get(blob, headers={"authorization": "Bearer bob"}))
        nobody = asyncio.create_task(client.get(blob))
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        answers = await asyncio.gather(alice, bob, nobody)
    assert [r.status_code for r in answers] == [200, 401, 401]
    assert sorted(map(str, seen)) == ["Bearer alice", "Bearer bob", "None"]


# --------------------------------------------------------------------------- digests


def _blob_url(algorithm: str, value: str) -> str:
    return f"https://registry.test/v2/lib/app/blobs/{algorithm}:{value}"


async def _record_and_read(
    cache: FallbackCache, url: str, body: bytes
) -> tuple[bool, bytes | None]:
    rec = await cache.recorder(RequestInfo("GET", url), 200, [])
    stored = False
    if rec is not None:
        await rec.feed(body)
        stored = await rec.finish()
    hit = await cache.lookup(RequestInfo("GET", url))
    served = None if hit is None else b"".join([c async for c in cache.body(hit)])
    return stored, served


async def test_sha512_blobs_are_verified_with_sha512(clock: ManualClock) -> None:
    body = b"layer bytes" * 100
    right = hashlib.sha512(body).hexdigest()
    cache = FallbackCache(clock=clock)
    assert await _record_and_read(cache, _blob_url("sha512", right), body) == (True, body)
    wrong = hashlib.sha512(b"other").hexdigest()
    assert await _record_and_read(cache, _blob_url("sha512", wrong), body) == (False, None)
    assert cache.stats.rejected == 1


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "g" * 64,  # not hex
        "sha256:" + "a" * 63,  # too short
        "sha256:" + "A" * 64,  # OCI digests are lower-case hex
        "sha512:" + "a" * 64,  # the wrong length for sha512
        "md5:" + "a" * 32,  # an algorithm the cache cannot verify
        "sha384:" + "a" * 96,
    ],
)
async def test_a_digest_the_cache_cannot_verify_is_never_cached(
    digest: str, clock: ManualClock
) -> None:
    cache = FallbackCache(clock=clock)
    url = f"https://registry.test/v2/lib/app/blobs/{digest}"
    assert await _record_and_read(cache, url, b"whatever bytes") == (False, None)
    assert cache.store.keys() == []


_HEXISH = "0123456789abcdefABCDEFg"


@settings(max_examples=200, deadline=None)
@given(
    algorithm=st.sampled_from(["sha256", "sha512", "sha384", "md5", "SHA256", "sha256+b64"]),
    value=st.text(_HEXISH, min_size=0, max_size=130),
    honest=st.booleans(),
    body=st.binary(min_size=0, max_size=64),
)
def test_a_blob_is_cached_exactly_when_its_bytes_hash_to_its_verifiable_digest(
    algorithm: str, value: str, honest: bool, body: bytes
) -> None:
    """Whatever the digest in the URL, the cache stores and serves the bytes only when the
    algorithm is one it verifies (sha256, sha512), the value is its lower-case hex, and the
    bytes hash to it; anything else is never kept (no unverified `hit`)."""
    if honest and algorithm in ("sha256", "sha512"):
        value = hashlib.new(algorithm, body).hexdigest()
    verifiable = (
        algorithm in ("sha256", "sha512") and value == hashlib.new(algorithm, body).hexdigest()
    )
    cache = FallbackCache(clock=ManualClock())
    stored, served = asyncio.run(_record_and_read(cache, _blob_url(algorithm, value), body))
    assert stored is verifiable
    assert served == (body if verifiable else None)
    if not verifiable:
        assert cache.store.keys() == []


# --------------------------------------------------------------------------- redirects


def test_a_redirected_blob_is_kept_under_its_digest_and_no_signed_url_reaches_disk(
    tmp_path: Path,
) -> None:
    """Registries answer a blob GET with 307 to a CDN or object store. The cache follows
    it, verifies the bytes against the digest the client asked for, stores them under that
    digest, and writes neither the signed URL nor any credential to disk."""
    layer = bytes(range(256)) * 512
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    clock = ManualClock()
    cache = FallbackCache(DiskStore(tmp_path / "cache"), clock=clock)
    with scripted_server() as server, requests.Session() as session:
        signed = "/cdn/object?X-Amz-Signature=s3cr3tsig&X-Amz-Credential=AKIAEXAMPLE&token=tok"
        server.play(
            Answer(307, {"location": server.url + signed}, b""),
            Answer(200, {"content-length": str(len(layer))}, layer),
        )
        session.mount("http://", ResilientAdapter(cache=cache, clock=clock))
        url = f"{server.url}/v2/lib/app/blobs/{digest}"
        first = session.get(url, headers={"authorization": "Bearer registry-token"})
        assert first.content == layer and first.status_code == 200
        cdn_request = server.seen[1]
        assert cdn_request.path == signed
        assert "authorization" in cdn_request.headers  # same origin here: credential kept

        server.play(Answer(503))
        again = session.get(url, headers={"authorization": "Bearer registry-token"})
        assert again.content == layer and again.headers["x-seawall-cache"] == "verified"
    on_disk = b"".join(p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file())
    for secret in (b"s3cr3tsig", b"AKIAEXAMPLE", b"registry-token", b"tok&", b"=tok"):
        assert secret not in on_disk


async def test_a_redirect_to_another_origin_carries_no_credential(clock: ManualClock) -> None:
    layer = b"cdn bytes"
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.test":
            return httpx.Response(307, headers={"location": "https://cdn.test/o?sig=1"})
        return httpx.Response(200, stream=Streamed(layer))

    cache = FallbackCache(clock=clock)
    transport = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
    async with httpx.AsyncClient(transport=transport) as client:
        got = await client.get(
            f"https://registry.test/v2/x/blobs/{digest}",
            headers={"authorization": "Bearer t", "x-jfrog-art-api": "k", "accept": "*/*"},
        )
    assert got.content == layer
    cdn = seen[1]
    assert cdn.url.host == "cdn.test"
    assert "authorization" not in cdn.headers and "x-jfrog-art-api" not in cdn.headers
    assert cdn.headers["accept"] == "*/*"


_SECRET = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=8, max_size=24).map(
    lambda s: "s3cr3t-" + s  # marked, so a match is the secret and not any 8 digits
)


@settings(max_examples=40, deadline=None)
@given(signature=_SECRET, credential=_SECRET, same_origin=st.booleans())
def test_no_signed_url_or_credential_of_any_redirect_reaches_disk(
    signature: str, credential: str, same_origin: bool
) -> None:
    """Any signed redirect target, same origin or a CDN: the blob is served verified from
    the disk store once the registry fails, and neither the signature nor the credential
    is in any file the store wrote."""
    import tempfile

    layer = b"layer bytes" * 50
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    cdn = "registry.test" if same_origin else "cdn.test"
    registry_up = True

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "registry.test" and request.url.path.startswith("/v2/"):
            if not registry_up:
                return httpx.Response(503)
            location = f"https://{cdn}/o/{digest[7:15]}?X-Amz-Signature={signature}"
            return httpx.Response(307, headers={"location": location})
        return httpx.Response(200, stream=Streamed(layer))

    async def scenario(root: Path) -> None:
        nonlocal registry_up
        clock = ManualClock()
        cache = FallbackCache(DiskStore(root), clock=clock)
        transport = ResilientTransport(httpx.MockTransport(handler), clock=clock, cache=cache)
        url = f"https://registry.test/v2/lib/app/blobs/{digest}"
        headers = {"authorization": f"Bearer {credential}"}
        async with httpx.AsyncClient(transport=transport) as client:
            assert (await client.get(url, headers=headers)).content == layer
            registry_up = False
            again = await client.get(url, headers=headers)
        assert again.content == layer and again.headers["x-seawall-cache"] == "verified"

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        asyncio.run(scenario(root))
        names = " ".join(str(p) for p in root.rglob("*")).encode()
        written = b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())
        assert layer in written  # the store did write the blob
        for secret in (signature.encode(), credential.encode()):
            assert secret not in names and secret not in written


# --------------------------------------------------------------------------- stores


def test_a_disk_entry_copied_under_another_keys_name_is_not_served(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = FallbackCache(DiskStore(tmp_path), policy=CachePolicy(max_stale=3600))
        for name, body in (("a", b"answer for a"), ("b", b"answer for b")):
            rec = await cache.recorder(RequestInfo("GET", f"https://r/simple/{name}/"), 200, [])
            assert rec is not None
            await rec.feed(body)
            assert await rec.finish()
        files = sorted((tmp_path / "seawall").rglob("*.entry"), key=os.path.getmtime)
        assert len(files) == 2
        shutil.copy(files[0], files[1])  # a's entry now sits under b's name
        fresh = FallbackCache(DiskStore(tmp_path), policy=CachePolicy(max_stale=3600))
        assert await fresh.lookup(RequestInfo("GET", "https://r/simple/b/")) is None
        assert fresh.store.stats.corrupt == 1

    asyncio.run(scenario())


async def test_set_cookie_is_stripped_and_never_replayed(clock: ManualClock) -> None:
    """Stored with the cookie stripped (not refused, as Varnish would): registries behind
    load balancers set affinity cookies on every answer, and refusing those would leave
    nothing cached; the credential scope keeps tenants apart, the cookie is never kept."""
    cache = FallbackCache(MemoryStore(), clock=clock)
    url = "https://registry.test/v2/lib/app/manifests/1.0"
    rec = await cache.recorder(
        RequestInfo("GET", url),
        200,
        [("set-cookie", "AWSALB=abc; session=s3cr3t"), ("content-type", "application/json")],
    )
    assert rec is not None
    await rec.feed(b"{}")
    assert await rec.finish()
    hit = await cache.lookup(RequestInfo("GET", url))
    assert hit is not None
    served = dict(cache.served(hit))
    assert "set-cookie" not in served and served["content-type"] == "application/json"


_REQUEST = st.tuples(
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"host", b"accept", b"authorization", b"x-api-key", b"cookie", b"x-auth-token",
                 b"user-agent", b"x-request-id", b"Private-Token", b"x-tenant", b"Host", b"Accept"]
            ),
            st.sampled_from([b"", b"a", b"b", b"registry.test", b"[", b"x" * 5000]),
        ),
        max_size=6,
    ),
    st.sampled_from(
        ["/v2/a/manifests/1", "/v2/a/blobs/sha256:" + "0" * 64, "/simple/x/", "/v2/a/blobs/md5:1"]
    ),
    st.sampled_from([b"", b"n=1", b"token=abc"]),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(requests=st.lists(_REQUEST, min_size=1, max_size=8))
def test_the_server_faces_key_memo_always_agrees_with_the_key(
    requests: list[tuple[list[tuple[bytes, bytes]], str, bytes]],
) -> None:
    """The ASGI face remembers keys by the request line and the raw Host, Accept and
    credential headers (which of them a request has is remembered by its header names);
    every key it gives, for a sequence of requests through one memo, must be the key the
    cache computes from scratch (no leak by memo). Names repeat, so both the map and the
    walk over the header list are exercised."""
    from seawall.asgi.cache import _Exchange, _KeyMemo, request_info

    cache = FallbackCache(policy=CachePolicy(credential_headers=["x-tenant"]))
    memo = _KeyMemo(cache)
    for _ in range(2):  # computed, then remembered
        for headers, path, query in requests:
            scope = {
                "type": "http", "method": "GET", "scheme": "https", "path": path,
                "root_path": "", "query_string": query, "headers": headers,
                "server": ("registry.test", 443),
            }  # fmt: skip
            got = memo.key(scope, _Exchange(scope, cache, memo))
            assert got == cache.key(request_info(scope))


def test_the_key_memo_tells_apart_what_only_accept_or_a_credential_tells_apart() -> None:
    """The cases a random search meets rarely: one manifest URL asked for with two media
    types, and one blob with two tokens, through the same memo."""
    from seawall.asgi.cache import _Exchange, _KeyMemo, request_info

    cache = FallbackCache(policy=CachePolicy(credential_headers=["x-tenant"]))
    memo = _KeyMemo(cache)
    base = [(b"host", b"registry.test"), (b"user-agent", b"docker")]
    variants = [
        ("/v2/a/manifests/1", [*base, (b"accept", b"application/vnd.oci.image.index.v1+json")]),
        ("/v2/a/manifests/1", [*base, (b"accept", b"application/vnd.oci.image.manifest.v1+json")]),
        ("/v2/a/manifests/1", [*base, (b"x-tenant", b"a")]),
        ("/v2/a/manifests/1", [*base, (b"x-tenant", b"b")]),
        ("/v2/a/manifests/1", [(b"host", b"other.test"), (b"user-agent", b"docker")]),
        ("/v2/a/manifests/1", [*base, (b"authorization", b"a"), (b"authorization", b"b")]),
        ("/v2/a/manifests/1", [*base, (b"authorization", b"a")]),
    ]
    keys = []
    for path, headers in variants * 2:
        scope = {
            "type": "http", "method": "GET", "scheme": "https", "path": path, "root_path": "",
            "query_string": b"", "headers": headers, "server": ("registry.test", 443),
        }  # fmt: skip
        got = memo.key(scope, _Exchange(scope, cache, memo))
        assert got == cache.key(request_info(scope))
        keys.append(got.base)
    assert len(set(keys)) == len(variants)


def test_the_key_memo_keeps_nothing_big_that_a_client_chooses() -> None:
    """A review measured the memo holding every byte of a key's path, query and header
    names uncounted: a key is kept only when all of them are small, and so is a list of
    header names."""
    from seawall.asgi.cache import _Exchange, _KeyMemo

    cache = FallbackCache()
    memo = _KeyMemo(cache)

    def ask(path: str, headers: list[tuple[bytes, bytes]]) -> None:
        scope = {
            "type": "http", "method": "GET", "scheme": "https", "path": path, "root_path": "",
            "query_string": b"", "headers": headers, "server": ("registry.test", 443),
        }  # fmt: skip
        memo.key(scope, _Exchange(scope, cache, memo))

    ask("/v2/a/manifests/" + "x" * 5000, [(b"host", b"r")])
    ask("/v2/a/manifests/1", [(b"x-token-" + b"t" * 5000, b"")])
    assert len(memo._keys) == 0
    ask("/v2/a/manifests/1", [(b"h%d" % i, b"") for i in range(100)])
    ask("/v2/a/manifests/1", [(b"host", b"r")])
    assert len(memo._pickers) == 1 and len(memo._keys) == 2


@pytest.mark.parametrize("host", [b"[", b"registry:notaport", b"[::1"])
async def test_a_hostile_host_header_passes_through_the_cache(host: bytes) -> None:
    """Found by the memo property test: a Host of ``[`` made the cache key raise, so the
    middleware answered 500. Such a request is simply never cached."""

    async def app(scope, receive, send):  # type: ignore[no-untyped-def]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = FallbackCacheMiddleware(app)
    sent: list[dict[str, object]] = []

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    async def receive():  # type: ignore[no-untyped-def]
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http", "method": "GET", "scheme": "http", "path": "/simple/x/",
        "root_path": "", "query_string": b"", "headers": [(b"host", host)],
    }  # fmt: skip
    await mw(scope, receive, send)
    assert sent[0]["status"] == 200 and mw.cache.store.keys() == []
