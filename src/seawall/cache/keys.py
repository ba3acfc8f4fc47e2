"""Cache keys: what makes two requests "the same" for the fallback cache.

A key is built from the method-normalized URL (HEAD reads what GET stored), the
credential scope (a hash of Authorization and Cookie, so a response fetched with one
credential is never served to another, unless the upstream is public), the expected
digest when the URL names one, ``Accept`` for OCI manifest requests (registries choose the
manifest by Accept and send no ``Vary``), and the values of the headers named by the
stored response's ``Vary``. Raw credentials never reach the store: only a salted hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "EXTRACTORS",
    "DigestExtractor",
    "RequestInfo",
    "RequestKey",
    "credential_scope",
    "extract_digest",
    "fragment_digest",
    "is_manifest_request",
    "oci_blob_digest",
    "parse_vary",
    "path_digest",
    "register_extractor",
    "request_key",
    "variant_key",
    "vary_values",
]

DigestExtractor = Callable[[str, str], str | None]
"""``(path, fragment) -> "sha256:<hex>" | None``: finds the digest a URL promises."""

_HEX64 = r"[0-9a-f]{64}"
_OCI_BLOB = re.compile(rf"^/v2/(?:.+)/blobs/sha256:({_HEX64})$")
_OCI_MANIFEST = re.compile(r"^/v2/(?:.+)/manifests/[^/]+$")
_FRAGMENT = re.compile(rf"(?:^|&)sha256=({_HEX64})(?:&|$)")
_HEX_ONLY = re.compile(rf"^{_HEX64}$")
_PREFIXED = re.compile(rf"^sha256[:=]({_HEX64})$")


def oci_blob_digest(path: str, fragment: str) -> str | None:
    """OCI distribution blob URL: ``/v2/<name>/blobs/sha256:<hex>``."""
    m = _OCI_BLOB.match(path)
    return f"sha256:{m.group(1)}" if m else None


def fragment_digest(path: str, fragment: str) -> str | None:
    """PEP 503 style file URL: ``...whl#sha256=<hex>`` (client face only: never sent)."""
    m = _FRAGMENT.search(fragment.lower())
    return f"sha256:{m.group(1)}" if m else None


def path_digest(path: str, fragment: str) -> str | None:
    """A ``sha256`` path part: ``.../sha256/<hex>/...`` or a ``sha256:<hex>`` segment."""
    parts = path.split("/")
    for i, part in enumerate(parts):
        low = part.lower()
        if low == "sha256" and i + 1 < len(parts) and _HEX_ONLY.match(parts[i + 1].lower()):
            return f"sha256:{parts[i + 1].lower()}"
        m = _PREFIXED.match(low)
        if m:
            return f"sha256:{m.group(1)}"
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


def extract_digest(path: str, fragment: str, names: Iterable[str]) -> str | None:
    """The first digest any selected extractor finds, as ``"sha256:<hex>"``."""
    for name in names:
        found = EXTRACTORS[name](path, fragment)
        if found:
            return found
    return None


def is_manifest_request(path: str) -> bool:
    """OCI manifest URL: the body depends on Accept although no Vary says so."""
    return _OCI_MANIFEST.match(path) is not None


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
    """The normalized identity of a request; ``base`` is the store key before Vary."""

    base: str
    url: str
    digest: str | None
    scope: str


def _normalize_url(url: str) -> tuple[str, str, str]:
    """``(url without fragment, path, fragment)`` with scheme/host lower-cased."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    port = parts.port
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    path = parts.path or "/"
    return urlunsplit((scheme, host, path, parts.query, "")), path, parts.fragment


def credential_scope(request: RequestInfo, *, public: bool, namespace: str) -> str:
    """``"public"``, ``"anon"``, or a salted hash of Authorization and Cookie."""
    if public:
        return "public"
    auth = request.header("authorization")
    cookie = request.header("cookie")
    if auth is None and cookie is None:
        return "anon"
    h = hashlib.sha256(namespace.encode())
    h.update(b"\0auth\0" + (auth or "").encode("latin-1", "replace"))
    h.update(b"\0cookie\0" + (cookie or "").encode("latin-1", "replace"))
    return "cred:" + h.hexdigest()[:32]


def request_key(
    request: RequestInfo,
    *,
    public: bool = False,
    extractors: Iterable[str] = ("oci", "fragment", "path"),
    namespace: str = "seawall",
) -> RequestKey:
    """The key of ``request`` before Vary is applied (HEAD and GET share it)."""
    url, path, fragment = _normalize_url(request.url)
    digest = extract_digest(path, fragment, extractors)
    scope = credential_scope(request, public=public, namespace=namespace)
    accept = ""
    if digest is None and is_manifest_request(path):
        accept = _normalize_list(request.header("accept") or "")
    raw = "\n".join((namespace, scope, "GET", url, digest or "", f"accept={accept}"))
    return RequestKey(
        base=hashlib.sha256(raw.encode()).hexdigest(), url=url, digest=digest, scope=scope
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
