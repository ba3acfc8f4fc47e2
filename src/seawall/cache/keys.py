"""Cache keys: what makes two requests "the same" for the fallback cache.

A key is built from the method-normalized URL (HEAD reads what GET stored), the
credential scope (a hash of every credential the request carries, so a response fetched
with one credential is never served to another, unless the upstream is public), the
expected digest when the URL names one, ``Accept`` for OCI manifest requests (registries
choose the manifest by Accept and send no ``Vary``), and the values of the headers named by
the stored response's ``Vary``. Raw credentials never reach the store: only a salted hash.

Digests are verified with the algorithm they name: ``sha256`` and ``sha512``, the two
that OCI allows. A URL that claims a digest the cache cannot verify (another algorithm, or
a value of the wrong length or alphabet) is never cached: :data:`UNVERIFIABLE`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from seawall.lru import remember

__all__ = [
    "CREDENTIAL_HEADERS",
    "DIGEST_ALGORITHMS",
    "EXTRACTORS",
    "UNVERIFIABLE",
    "DigestExtractor",
    "RequestInfo",
    "RequestKey",
    "credential_scope",
    "extract_digest",
    "fragment_digest",
    "is_credential_header",
    "is_manifest_request",
    "oci_blob_digest",
    "parse_digest",
    "parse_vary",
    "path_digest",
    "redact_url",
    "register_extractor",
    "request_key",
    "variant_key",
    "vary_values",
]

DigestExtractor = Callable[[str, str], str | None]
"""``(path, fragment) -> "sha256:<hex>" | UNVERIFIABLE | None``: the digest a URL promises."""

DIGEST_ALGORITHMS: dict[str, int] = {"sha256": 64, "sha512": 128}
"""The algorithms the cache verifies, with the length of their lower-case hex value."""

UNVERIFIABLE = "unverifiable"
"""What an extractor returns for a URL that claims a digest the cache cannot check: such
a response is never stored and never served from the cache."""

CREDENTIAL_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "cookie",
    "x-jfrog-art-api",  # Artifactory
    "private-token",  # GitLab
    "job-token",
    "deploy-token",
    "x-api-key",
)
"""Request headers that carry a credential, by default (``CachePolicy.credential_headers``
adds more). Any header whose *name* looks like a credential counts too (fail-safe)."""

_CREDENTIAL_LIKE = re.compile(
    r"auth|token|api[-_]?key|secret|session|passw|credential|cookie|signature", re.IGNORECASE
)
_SECRET_QUERY = re.compile(
    r"^(?:x-amz-|x-goog-)|token|signature|^sig$|key|secret|credential|passw|auth|^expires$",
    re.IGNORECASE,
)
_DIGEST_TEXT = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([A-Za-z0-9=_-]+)$")
_OCI_BLOB = re.compile(r"^/v2/(?:.+)/blobs/([^/]+)$")
_OCI_MANIFEST = re.compile(r"^/v2/(?:.+)/manifests/[^/]+$")
_FRAGMENT = re.compile(r"(?:^|&)(sha256|sha512)=([^&]*)(?:&|$)", re.IGNORECASE)
_HEX = re.compile(r"^[0-9a-f]+$")


def parse_digest(text: str) -> str:
    """``algo:hex`` normalized, or :data:`UNVERIFIABLE` for anything the cache cannot check
    (an algorithm other than sha256/sha512, a value of the wrong length, not hex)."""
    m = _DIGEST_TEXT.match(text)
    if m is None:
        return UNVERIFIABLE
    algorithm, value = m.group(1), m.group(2)
    length = DIGEST_ALGORITHMS.get(algorithm)
    if length is None or len(value) != length or not _HEX.match(value):
        return UNVERIFIABLE
    return f"{algorithm}:{value}"


def oci_blob_digest(path: str, fragment: str) -> str | None:
    """OCI distribution blob URL: ``/v2/<name>/blobs/<algorithm>:<encoded>``."""
    m = _OCI_BLOB.match(path)
    if m is None or m.group(1) == "uploads":
        return None
    return parse_digest(m.group(1))


def fragment_digest(path: str, fragment: str) -> str | None:
    """PEP 503 style file URL: ``...whl#sha256=<hex>`` (client face only: never sent)."""
    m = _FRAGMENT.search(fragment)
    if m is None:
        return None
    return parse_digest(f"{m.group(1).lower()}:{m.group(2)}")


def path_digest(path: str, fragment: str) -> str | None:
    """A digest path part: ``.../sha256/<hex>/...`` or a ``sha256:<value>`` segment."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        low = part.lower()
        if low in DIGEST_ALGORITHMS and i + 1 < len(parts):
            found = parse_digest(f"{low}:{parts[i + 1]}")
            if found != UNVERIFIABLE:  # a directory that happens to be called sha256
                return found
        algorithm, sep, _ = part.partition(":")
        if sep and algorithm.lower() in DIGEST_ALGORITHMS:
            return parse_digest(part)  # it says what it is: verified, or never cached
    return None


EXTRACTORS: dict[str, DigestExtractor] = {
    "oci": oci_blob_digest,
    "fragment": fragment_digest,
    "path": path_digest,
}
"""Registered extractors by name; :class:`~seawall.policy.cache.CachePolicy` selects them."""


def register_extractor(name: str, extractor: DigestExtractor) -> None:
    """Make ``extractor`` selectable by ``name`` in ``CachePolicy.extractors``."""
    EXTRACTORS[name] = extractor
    _DIGESTS.clear()


def extract_digest(path: str, fragment: str, names: Iterable[str]) -> str | None:
    """The first digest any selected extractor finds (``algo:hex`` or :data:`UNVERIFIABLE`)."""
    names = tuple(names)
    memo = (path, fragment, names)
    known = _DIGESTS.get(memo, _MISSING)  # one lookup: another thread may clear the memo
    if known is not _MISSING:
        return known  # type: ignore[return-value]
    found: str | None = None
    for name in names:
        found = EXTRACTORS[name](path, fragment)
        if found:
            found = found if found == UNVERIFIABLE else parse_digest(found)
            break
    _remember(_DIGESTS, memo, found, len(path) + len(fragment))
    return found


# Small bounded memos of pure functions of the request line: a registry front-end sees
# the same paths again and again. Long inputs are never kept, and a full memo starts over.
_MEMO_MAX = 4096
_MEMO_INPUT_MAX = 2048
_MISSING = object()
_DIGESTS: dict[tuple[str, str, tuple[str, ...]], str | None] = {}
_URLS: dict[str, tuple[str, str, str]] = {}
_CREDENTIAL_NAMES: dict[str, bool] = {}


def _remember(memo: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    if size <= _MEMO_INPUT_MAX:
        remember(memo, key, value, _MEMO_MAX)


def is_manifest_request(path: str) -> bool:
    """OCI manifest URL: the body depends on Accept although no Vary says so."""
    return _OCI_MANIFEST.match(path) is not None


def is_credential_header(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether a request header (lower-case ``name``) carries a credential."""
    if name in extra:
        return True
    known = _CREDENTIAL_NAMES.get(name)
    if known is None:
        known = name in CREDENTIAL_HEADERS or _CREDENTIAL_LIKE.search(name) is not None
        _remember(_CREDENTIAL_NAMES, name, known, len(name))
    return known


def redact_url(url: str) -> str:
    """The URL with the values of credential-like query parameters (signed CDN URLs,
    ``?token=``) replaced: what may be written to disk, logs and events."""
    if "?" not in url:
        return url
    parts = urlsplit(url)
    if not parts.query:
        return url
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(_SECRET_QUERY.search(k) for k, _ in pairs):
        return url
    redacted = [(k, "REDACTED" if _SECRET_QUERY.search(k) else v) for k, v in pairs]
    return urlunsplit(parts._replace(query=urlencode(redacted)))


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A face-neutral request: what the cache needs, nothing framework-specific.

    ``headers`` are (lower-case name, value) pairs; ``url`` is absolute.
    """

    method: str
    url: str
    headers: Sequence[tuple[str, str]] = ()

    def header(self, name: str) -> str | None:
        """All values of ``name`` joined by ", " (as HTTP allows), or None."""
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None


@dataclass(frozen=True, slots=True)
class RequestKey:
    """The normalized identity of a request; ``base`` is the store key before Vary.

    ``url`` is for display (events, logs, metadata on disk): credential-like query values
    are redacted. ``cacheable`` is False for a URL that claims a digest the cache cannot
    verify."""

    base: str
    url: str
    digest: str | None
    scope: str
    cacheable: bool = True


def _normalize_url(url: str) -> tuple[str, str, str]:
    """``(url without fragment, path, fragment)`` with scheme/host lower-cased."""
    found = _URLS.get(url)
    if found is None:
        found = _split_url(url)
        _remember(_URLS, url, found, len(url))
    return found


def _split_url(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    path = parts.path or "/"
    return urlunsplit((scheme, host, path, parts.query, "")), path, parts.fragment


def credential_scope(
    request: RequestInfo,
    *,
    public: bool,
    namespace: str,
    extra_headers: Iterable[str] = (),
) -> str:
    """``"public"``, ``"anon"``, or a salted hash of every credential the request carries.

    Fail-safe: besides :data:`CREDENTIAL_HEADERS` and ``extra_headers``, any header whose
    name looks like a credential (``x-auth-token``, ``x-registry-auth``) is part of the
    scope, so a credential the cache does not know never lands in a shared scope.
    """
    if public:
        return "public"
    extra = frozenset(extra_headers)
    found = sorted((k, v) for k, v in request.headers if is_credential_header(k, extra))
    if not found:
        return "anon"
    h = hashlib.sha256(namespace.encode())
    for name, value in found:
        h.update(b"\0" + name.encode("latin-1", "replace") + b"\0")
        h.update(value.encode("latin-1", "replace"))
    return "cred:" + h.hexdigest()[:32]


def request_key(
    request: RequestInfo,
    *,
    public: bool = False,
    extractors: Iterable[str] = ("oci", "fragment", "path"),
    namespace: str = "seawall",
    credential_headers: Iterable[str] = (),
) -> RequestKey:
    """The key of ``request`` before Vary is applied (HEAD and GET share it). A URL that
    does not parse (a hostile Host header such as ``[``) gets a key that is never
    cacheable, rather than an exception in the middle of a request."""
    try:
        url, path, fragment = _normalize_url(request.url)
    except ValueError:
        raw = hashlib.sha256(f"{namespace}\nunparsable\n{request.url}".encode()).hexdigest()
        return RequestKey(base=raw, url="(unparsable URL)", digest=None, scope="", cacheable=False)
    digest = extract_digest(path, fragment, extractors)
    cacheable = digest != UNVERIFIABLE
    if not cacheable:
        digest = None
    scope = credential_scope(
        request, public=public, namespace=namespace, extra_headers=credential_headers
    )
    accept = ""
    if digest is None and is_manifest_request(path):
        accept = _normalize_list(request.header("accept") or "")
    raw = "\n".join((namespace, scope, "GET", url, digest or "", f"accept={accept}"))
    return RequestKey(
        base=hashlib.sha256(raw.encode()).hexdigest(),
        url=redact_url(url),
        digest=digest,
        scope=scope,
        cacheable=cacheable,
    )


def _normalize_list(value: str) -> str:
    return ",".join(sorted(p.strip() for p in value.split(",") if p.strip()))


def parse_vary(value: str | None) -> tuple[str, ...] | None:
    """Sorted lower-case header names of a Vary value; None for ``Vary: *`` (uncacheable)."""
    if not value:
        return ()
    names = sorted({p.strip().lower() for p in value.split(",") if p.strip()})
    if "*" in names:
        return None
    return tuple(names)


def vary_values(request: RequestInfo, names: Iterable[str]) -> dict[str, str]:
    """The request's values of the Vary headers (absent = empty string)."""
    return {n: _normalize_list(request.header(n) or "") for n in names}


def variant_key(base: str, values: Mapping[str, str]) -> str:
    """Store key of one Vary variant of ``base``."""
    raw = base + "\nvary\n" + "\n".join(f"{k}={values[k]}" for k in sorted(values))
    return hashlib.sha256(raw.encode()).hexdigest()
