"""Policy of the fallback cache: how much to keep, how long metadata stays usable.

Defaults are tuned for artifact traffic: blobs named by a digest never go stale, while
metadata (manifests by tag, simple pages, packuments) usually arrives with no
Cache-Control at all, so it gets a short default freshness and a long stale-if-error
window: a build that pulled yesterday should still pull when the registry is down today.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from seawall.errors import PolicyError
from seawall.policy.base import (
    PolicyBase,
    check_int_at_least,
    check_non_negative,
    check_positive,
    check_statuses,
)

__all__ = ["DEFAULT_EXTRACTORS", "CachePolicy"]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP field name (RFC 9110)

DEFAULT_EXTRACTORS: tuple[str, ...] = ("oci", "fragment", "path")
"""Digest extractors tried in order (names registered in :mod:`seawall.cache.keys`)."""

_MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CachePolicy(PolicyBase):
    """Settings shared by the middleware and the client transport.

    - ``max_bytes``: capacity of the default in-memory store (256 MiB).
    - ``max_entry_bytes``: larger bodies stream through uncached in the memory store, so
      one huge layer cannot evict everything else or sit in RAM (64 MiB).
    - ``default_fresh_seconds``: freshness of metadata sent without Cache-Control/Expires
      (registries send none for manifests); 60 s keeps tags moving.
    - ``max_stale``: stale-if-error window in seconds (RFC 5861): how long past freshness
      a copy may still be served when the upstream fails (7 days).
    - ``stale_while_revalidate``: seconds past freshness during which the client serves
      the stored copy at once and revalidates in the background (0 = off).
    - ``public``: the upstream serves the same bytes to everybody, so credentials are not
      part of the key (off: a response is only served to the same credentials).
    - ``fallback_statuses``: upstream statuses that make the cache answer instead: 429
      (shed or limited) and every 5xx except 501/505, which no retry or copy would fix.
    - ``extractors``: names of digest extractors (see ``seawall.cache.keys``); the cache
      checks that they are registered when it is built, so a policy file can name an
      extractor that a plug-in registers later (and the policy layer imports no mechanism).
    - ``serve_fresh``: the client serves fresh entries without asking the upstream.
    - ``namespace``: prefix of every store key (several caches can share one store).
    - ``credential_headers``: request headers that carry a credential, besides the ones
      seawall knows (Authorization, Proxy-Authorization, Cookie, Artifactory's
      X-JFrog-Art-Api, GitLab's tokens, X-Api-Key) and any header whose name looks like
      one; each is part of the credential scope, so a copy is only served to the same one.
    - ``fallback_after``: with a copy that may answer for a failure, a client gives the
      upstream this long (every attempt and wait included) before the copy answers, so a
      hanging registry costs seconds, not the client's whole deadline (None: no limit).
    - ``store_paths``: server face only: regular expressions (searched in the path) of
      other responses to store although they are not artifacts and their Cache-Control
      does not say ``public``/``max-age``/``s-maxage``. Empty by default: a dynamic page
      is opt-in, since a copy of it may be wrong for the next caller.
    """

    max_bytes: int = 256 * _MIB
    max_entry_bytes: int = 64 * _MIB
    default_fresh_seconds: float = 60.0
    max_stale: float = 7 * 24 * 3600.0
    stale_while_revalidate: float = 0.0
    public: bool = False
    fallback_statuses: frozenset[int] = field(
        default_factory=lambda: frozenset({429, *range(500, 600)} - {501, 505})
    )
    extractors: tuple[str, ...] = DEFAULT_EXTRACTORS
    serve_fresh: bool = True
    namespace: str = "seawall"
    fallback_after: float | None = 5.0
    credential_headers: tuple[str, ...] = ()
    store_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int_at_least("max_bytes", self.max_bytes, 1)
        check_int_at_least("max_entry_bytes", self.max_entry_bytes, 1)
        if self.max_entry_bytes > self.max_bytes:
            raise PolicyError(
                "max_entry_bytes",
                self.max_entry_bytes,
                f"must not exceed max_bytes ({self.max_bytes})",
            )
        check_non_negative("default_fresh_seconds", self.default_fresh_seconds)
        check_non_negative("max_stale", self.max_stale)
        check_non_negative("stale_while_revalidate", self.stale_while_revalidate)
        if not isinstance(self.public, bool):
            raise PolicyError("public", self.public, "must be true or false")
        if not isinstance(self.serve_fresh, bool):
            raise PolicyError("serve_fresh", self.serve_fresh, "must be true or false")
        statuses = check_statuses("fallback_statuses", self.fallback_statuses, 400, 599)
        object.__setattr__(self, "fallback_statuses", statuses)
        if isinstance(self.extractors, str) or not isinstance(self.extractors, tuple | list):
            raise PolicyError("extractors", self.extractors, "must be a list of extractor names")
        object.__setattr__(self, "extractors", tuple(self.extractors))
        for name in self.extractors:
            if not isinstance(name, str) or not name:
                raise PolicyError("extractors", name, "is not an extractor name")
        headers = self.credential_headers
        if isinstance(headers, str) or not isinstance(headers, tuple | list):
            raise PolicyError("credential_headers", headers, "must be a list of header names")
        for name in headers:
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise PolicyError("credential_headers", name, "is not an HTTP header name")
        object.__setattr__(self, "credential_headers", tuple(h.lower() for h in headers))
        if self.fallback_after is not None:
            check_positive("fallback_after", self.fallback_after)
        if not isinstance(self.namespace, str) or not self.namespace or "\n" in self.namespace:
            raise PolicyError("namespace", self.namespace, "must be a non-empty one-line string")
        if isinstance(self.store_paths, str) or not isinstance(self.store_paths, tuple | list):
            raise PolicyError("store_paths", self.store_paths, "must be a list of regexes")
        object.__setattr__(self, "store_paths", tuple(self.store_paths))
        for pattern in self.store_paths:
            try:
                re.compile(pattern)
            except (re.error, TypeError):
                raise PolicyError("store_paths", pattern, "is not a regular expression") from None
