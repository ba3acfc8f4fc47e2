"""Small pure-ASGI helpers shared by the middleware: headers, Retry-After, problem+json."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

from starlette.types import Scope, Send

__all__ = ["header", "header_map", "retry_after_seconds", "send_problem"]

Headers = list[tuple[bytes, bytes]]


def header(scope: Scope, name: bytes) -> bytes | None:
    """First value of request header ``name`` (lower-case bytes), or None."""
    for key, value in scope.get("headers") or ():
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def header_map(scope: Scope) -> dict[bytes, bytes] | None:
    """The request headers by name, built in C: a few lookups instead of a Python loop
    over every header per middleware. None when a name repeats (a map would keep only the
    last value, so callers walk the list instead) or the pairs are malformed.

    ASGI allows the headers to be any iterable: one that is not a list or tuple is turned
    into a list in the scope first, so that it is not used up before the app (or the next
    layer, or the cache key) reads it."""
    raw = scope.get("headers") or ()
    if not isinstance(raw, list | tuple):
        raw = scope["headers"] = list(raw)
    try:
        found: dict[bytes, bytes] = dict(raw)
    except (TypeError, ValueError):
        return None
    return found if len(found) == len(raw) else None


def retry_after_seconds(seconds: float) -> int:
    """Whole seconds for a ``Retry-After`` field: rounded up, never below 1."""
    if not math.isfinite(seconds):
        return 1
    return max(1, math.ceil(seconds))


async def send_problem(
    send: Send,
    status: int,
    title: str,
    detail: str,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    extra: dict[str, Any] | None = None,
    head_only: bool = False,
) -> None:
    """Answer with a small RFC 9457 ``application/problem+json`` document."""
    doc: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if extra:
        doc.update(extra)
    body = json.dumps(doc, separators=(",", ":")).encode()
    out: Headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head_only else body})
