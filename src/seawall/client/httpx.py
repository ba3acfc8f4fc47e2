"""httpx transports that make a client a good citizen of an overloaded registry.

``httpx.AsyncClient(transport=ResilientTransport())`` wraps httpx's own transport;
``ResilientTransport(inner, policy=...)`` wraps any other; ``ResilientSyncTransport`` is
the same for ``httpx.Client``. With ``cache=FallbackCache(...)`` the fallback cache goes
outermost: it answers from a verified or stale copy when everything inside gave up.
``FallbackCacheTransport`` / ``FallbackCacheSyncTransport`` are the cache alone.

The code is written once, async (``seawall/client/_async/httpx.py``); the sync
transports are generated from it (``scripts/generate_sync.py``).
"""

from seawall.client._async.httpx import FallbackCacheTransport, ResilientTransport
from seawall.client._httpx import CircuitOpenTransportError
from seawall.client._sync.httpx import FallbackCacheSyncTransport, ResilientSyncTransport
from seawall.client.core import AttemptStarted, RequestCoalesced

__all__ = [
    "AttemptStarted",
    "CircuitOpenTransportError",
    "FallbackCacheSyncTransport",
    "FallbackCacheTransport",
    "RequestCoalesced",
    "ResilientSyncTransport",
    "ResilientTransport",
]
