"""Fallback cache: digest-verified blobs and stale-if-error metadata (see docs/cache.md)."""

from seawall.cache.disk import DiskStore
from seawall.cache.fallback import (
    CacheCorrupt,
    CacheCorruptError,
    CacheRejected,
    CacheServed,
    CacheStats,
    CacheStored,
    FallbackCache,
    Hit,
)
from seawall.cache.keys import RequestInfo, register_extractor
from seawall.cache.memory import MemoryStore
from seawall.cache.shared import SharedMetaStore
from seawall.cache.store import CacheEvicted, CacheWritesDisabled, Store, Writer

__all__ = [
    "CacheCorrupt",
    "CacheCorruptError",
    "CacheEvicted",
    "CacheRejected",
    "CacheServed",
    "CacheStats",
    "CacheStored",
    "CacheWritesDisabled",
    "DiskStore",
    "FallbackCache",
    "Hit",
    "MemoryStore",
    "RequestInfo",
    "SharedMetaStore",
    "Store",
    "Writer",
    "register_extractor",
]
