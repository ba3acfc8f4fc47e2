"""The fallback cache as httpx transports of its own (kept for imports that name them
here; see :mod:`seawall.client.httpx`)."""

from seawall.client.httpx import FallbackCacheSyncTransport, FallbackCacheTransport

__all__ = ["FallbackCacheSyncTransport", "FallbackCacheTransport"]
