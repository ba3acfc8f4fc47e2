"""Sans-IO freshness: is a stored response fresh, stale-but-usable, or too old?

Plain functions over header lists and clock readings (RFC 9111 ages and lifetimes,
RFC 5861 ``stale-if-error`` / ``stale-while-revalidate``), shared by both faces and tested
without any I/O. Times are wall-clock seconds read from the injected clock: entries
outlive the process on disk, so a monotonic reading would mean nothing after a restart.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = [
    "Freshness",
    "State",
    "cache_control",
    "evaluate",
    "freshness_for",
    "http_date",
    "is_artifact",
    "is_per_client_field",
    "is_storable_request",
    "is_storable_response",
    "shared_cache_allowed",
]

Headers = Iterable[tuple[str, str]]


def _get(headers: Headers, name: str) -> str | None:
    values = [v for k, v in headers if k.lower() == name]
    return ", ".join(values) if values else None


def cache_control(value: str | None) -> dict[str, str | None]:
    """Parse a Cache-Control value into lower-case directives (quotes stripped)."""
    out: dict[str, str | None] = {}
    if not value:
        return out
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, arg = part.partition("=")
        out[name.strip().lower()] = arg.strip().strip('"') if sep else None
    return out


MAX_SECONDS = 2**31
"""Delta-seconds at or above this mean "for ever" (RFC 9111 section 1.2.2): a hostile
``max-age`` of 400 digits must not overflow a float."""


def _seconds(directives: Mapping[str, str | None], name: str) -> float | None:
    raw = directives.get(name)
    if raw is None or not raw.isascii() or not raw.isdigit():
        return None
    if len(raw) > 10:
        return float(MAX_SECONDS)
    return float(min(int(raw), MAX_SECONDS))


def content_length(headers: Headers) -> int | None:
    """The declared body length: ASCII digits only (``"²"`` is a digit to ``isdigit``)."""
    raw = _get(headers, "content-length")
    if raw is None:
        return None
    raw = raw.strip()
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


def http_date(value: str | None) -> float | None:
    """Epoch seconds of an HTTP date, or None when absent or malformed."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def is_storable_request(method: str, headers: Headers) -> bool:
    """GET only (HEAD has no body to store) and no ``no-store`` from the client."""
    if method.upper() != "GET":
        return False
    return "no-store" not in cache_control(_get(headers, "cache-control"))


def is_storable_response(status: int, headers: Headers) -> bool:
    """A complete 200 that neither ``no-store`` nor ``private`` forbids, nor ``Vary: *``."""
    if status != 200:
        return False
    cc = cache_control(_get(headers, "cache-control"))
    if "no-store" in cc or "private" in cc:
        return False
    vary = _get(headers, "vary") or ""
    return "*" not in [p.strip() for p in vary.split(",")]


_ARTIFACT_PATH = re.compile(
    r"^/v2/.+/(?:manifests|blobs)/[^/]+$"  # OCI distribution
    r"|^/v2/.+/tags/list$"
    r"|^/simple(?:/|$)"  # PEP 503 / 691 index pages
    r"|^/pypi/[^/]+(?:/[^/]+)?/json$"  # PyPI JSON API
    r"|^/packages/.+\.(?:whl|tar\.gz|zip|tar\.bz2|tgz|egg)(?:\.metadata)?$"  # PyPI files
    r"|/-/[^/]+\.tgz$"  # npm tarballs
)
_ARTIFACT_TYPE = re.compile(
    r"^application/vnd\.(?:oci\.|docker\.|pypi\.simple\.|npm\.install-v1\+json)",
    re.IGNORECASE,
)
_NPM_PACKUMENT = re.compile(r"application/vnd\.npm\.install-v1\+json", re.IGNORECASE)
_PER_CLIENT = re.compile(r"^(?:set-cookie|ratelimit(?:-.*)?|x-ratelimit-.*|retry-after)$")


def is_artifact(path: str, accept: str | None, headers: Headers) -> bool:
    """A response shaped like an artifact: OCI manifests, blobs and tag lists, PEP 503/691
    pages and PyPI files, npm packuments (asked for or sent as npm's media type) and
    tarballs. What a server face stores without being told: anything else (a dynamic
    JSON page, a session) may differ per caller or per second."""
    if _ARTIFACT_PATH.search(path):
        return True
    if accept and _NPM_PACKUMENT.search(accept):
        return True
    content_type = _get(headers, "content-type") or ""
    return _ARTIFACT_TYPE.match(content_type.strip()) is not None


def shared_cache_allowed(headers: Headers) -> bool:
    """The response says it may be kept: ``public``, ``max-age`` or ``s-maxage``."""
    cc = cache_control(_get(headers, "cache-control"))
    return "public" in cc or "max-age" in cc or "s-maxage" in cc


def is_per_client_field(name: str) -> bool:
    """A field that describes the caller, not the resource (``Set-Cookie``, ``RateLimit*``,
    ``Retry-After``): never stored, never replayed to anybody."""
    return _PER_CLIENT.match(name.lower()) is not None


class State(enum.Enum):
    """What a stored response may be used for right now."""

    FRESH = "fresh"  # serve without asking
    STALE_REVALIDATE = "stale-while-revalidate"  # serve, and revalidate in the background
    STALE_IF_ERROR = "stale-if-error"  # serve only when the upstream fails
    EXPIRED = "expired"  # never serve


@dataclass(frozen=True, slots=True)
class Freshness:
    """Freshness facts of one stored response, fixed when it is stored (JSON-friendly)."""

    stored_at: float  # wall seconds when the response was received
    initial_age: float  # Age header (and Date skew) at reception
    lifetime: float  # freshness lifetime in seconds (inf for digest-named blobs)
    stale_if_error: float  # seconds past lifetime usable on upstream failure
    stale_while_revalidate: float  # seconds past lifetime usable while revalidating
    must_revalidate: bool = False

    def age(self, now_wall: float) -> float:
        """Current age in seconds (RFC 9111 section 4.2.3, simplified)."""
        return self.initial_age + max(0.0, now_wall - self.stored_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "stored_at": self.stored_at,
            "initial_age": self.initial_age,
            "lifetime": None if math.isinf(self.lifetime) else self.lifetime,
            "stale_if_error": self.stale_if_error,
            "stale_while_revalidate": self.stale_while_revalidate,
            "must_revalidate": self.must_revalidate,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Freshness:
        lifetime = data.get("lifetime")
        return cls(
            stored_at=float(data["stored_at"]),
            initial_age=float(data["initial_age"]),
            lifetime=math.inf if lifetime is None else float(lifetime),
            stale_if_error=float(data["stale_if_error"]),
            stale_while_revalidate=float(data["stale_while_revalidate"]),
            must_revalidate=bool(data.get("must_revalidate", False)),
        )


def freshness_for(
    headers: Headers,
    *,
    now_wall: float,
    immutable: bool,
    default_fresh: float,
    max_stale: float,
    stale_while_revalidate: float,
) -> Freshness:
    """Freshness of a response received at ``now_wall``.

    ``immutable`` (the URL names a digest): fresh forever, because the digest names the
    bytes. Otherwise: ``max-age`` (or ``s-maxage``), else ``Expires - Date``, else the
    policy default (registries send no Cache-Control for manifests). ``no-cache`` makes
    the lifetime 0 (always revalidate, still usable on error). The stale-if-error window
    is the response's own ``stale-if-error`` capped by the policy's ``max_stale``;
    ``must-revalidate``/``proxy-revalidate`` forbid stale use entirely.
    """
    headers = list(headers)
    cc = cache_control(_get(headers, "cache-control"))
    age_header = _seconds({"age": _get(headers, "age")}, "age") or 0.0
    date = http_date(_get(headers, "date"))
    apparent = max(0.0, now_wall - date) if date is not None else 0.0
    initial_age = max(age_header, apparent)
    if immutable:
        return Freshness(now_wall, initial_age, math.inf, 0.0, 0.0)
    lifetime: float | None
    if "no-cache" in cc:
        lifetime = 0.0
    else:
        lifetime = _seconds(cc, "s-maxage")
        if lifetime is None:
            lifetime = _seconds(cc, "max-age")
        if lifetime is None:
            expires = http_date(_get(headers, "expires"))
            if expires is not None:
                lifetime = max(0.0, expires - (date if date is not None else now_wall))
            elif _get(headers, "expires") is not None:
                lifetime = 0.0  # an invalid Expires means "already expired"
    if lifetime is None:
        lifetime = default_fresh
    must = "must-revalidate" in cc or "proxy-revalidate" in cc
    sie = _seconds(cc, "stale-if-error")
    sie = max_stale if sie is None else min(sie, max_stale)
    swr = _seconds(cc, "stale-while-revalidate")
    swr = stale_while_revalidate if swr is None else min(swr, max_stale)
    if must:
        sie = swr = 0.0
    return Freshness(now_wall, initial_age, lifetime, sie, swr, must)


def evaluate(freshness: Freshness, now_wall: float) -> State:
    """The usable state of an entry at ``now_wall``."""
    age = freshness.age(now_wall)
    if age < freshness.lifetime or math.isinf(freshness.lifetime):
        return State.FRESH
    staleness = age - freshness.lifetime
    if staleness <= freshness.stale_while_revalidate and freshness.stale_while_revalidate > 0:
        return State.STALE_REVALIDATE
    if staleness <= freshness.stale_if_error and freshness.stale_if_error > 0:
        return State.STALE_IF_ERROR
    return State.EXPIRED
