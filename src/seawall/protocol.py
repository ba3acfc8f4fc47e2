"""The wire contract between seawall's server face and its client faces: header names.

They live in the bottom layer so that the ASGI middleware, which writes them, and the
client faces, which read them, share one definition without one face importing another.
"""

from __future__ import annotations

__all__ = ["CACHE_HEADER", "REFUSED_HEADER", "STEP_HEADER"]

REFUSED_HEADER = "x-seawall-refused"
"""On an answer seawall gave *before the application ran*: ``shed`` (503 from the load
shedder) or ``rate-limit`` (429 from the limiter, or its 503 when the counter store is
down). Nothing was processed, so any request, whatever its method, may be sent again when
its body can be; the server is alive and pacing with ``Retry-After``, so a client breaker
treats the answer as neutral."""

STEP_HEADER = "x-seawall-step"
"""Sent by a client to say which unit of work (a build step) a request belongs to, so a
server face can finish steps already started before it admits new ones."""

CACHE_HEADER = "x-seawall-cache"
"""On an answer from a fallback cache: ``hit``, ``stale`` or ``verified``."""
