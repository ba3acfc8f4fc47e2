"""seawall: keep artifact fetches alive when an artifact repository manager is overloaded.

Every public name is listed in ``docs/api.md`` (a test keeps the two in agreement). The
``requests`` adapter lives in :mod:`seawall.client.requests` and is not imported here, so
``requests`` stays an optional extra.
"""

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.asgi.shed import LoadShedMiddleware, RequestBodyStalled
from seawall.breaker import (
    BreakerRegistry,
    BreakerRejected,
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
)
from seawall.cache import (
    CacheCorrupt,
    CacheEvicted,
    CacheRejected,
    CacheServed,
    CacheStored,
    CacheWritesDisabled,
    DiskStore,
    FallbackCache,
    MemoryStore,
    Store,
)
from seawall.client.cache import FallbackCacheSyncTransport, FallbackCacheTransport
from seawall.client.call import Resilient, SyncResilient, resilient
from seawall.client.core import (
    AttemptStarted,
    BulkheadTimeout,
    RateLimitWaitTooLong,
    RequestCoalesced,
    build_step,
)
from seawall.client.httpx import (
    CircuitOpenTransportError,
    ResilientSyncTransport,
    ResilientTransport,
)
from seawall.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from seawall.errors import PolicyError, SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.policy import (
    BreakerPolicy,
    CachePolicy,
    ClientPolicy,
    LimitRule,
    Policies,
    RateLimitPolicy,
    RequestClass,
    RetryPolicy,
    ShedPolicy,
    load_policies,
)
from seawall.ratelimit import RateLimitAdmitted, RateLimited, RateLimiter, RateLimitStorageFailed
from seawall.redis_storage import RedisLimitStorage
from seawall.retry import (
    RetriesExhausted,
    RetryAfterHonoured,
    RetryBudget,
    RetryBudgetExhausted,
    RetryScheduled,
    parse_retry_after,
)
from seawall.shared_breaker import SharedBreakerState
from seawall.shed import ConcurrencyLimitChanged, ConcurrencyLimiter, RequestShed

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUS",
    "SYSTEM_CLOCK",
    "AttemptStarted",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerRejected",
    "BreakerState",
    "BreakerStateChanged",
    "BulkheadTimeout",
    "CacheCorrupt",
    "CacheEvicted",
    "CachePolicy",
    "CacheRejected",
    "CacheServed",
    "CacheStored",
    "CacheWritesDisabled",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitOpenTransportError",
    "ClientPolicy",
    "Clock",
    "ConcurrencyLimitChanged",
    "ConcurrencyLimiter",
    "DiskStore",
    "Event",
    "EventBus",
    "FallbackCache",
    "FallbackCacheMiddleware",
    "FallbackCacheSyncTransport",
    "FallbackCacheTransport",
    "LimitRule",
    "LoadShedMiddleware",
    "ManualClock",
    "MemoryStore",
    "Outcome",
    "Policies",
    "PolicyError",
    "RateLimitAdmitted",
    "RateLimitMiddleware",
    "RateLimitPolicy",
    "RateLimitStorageFailed",
    "RateLimitWaitTooLong",
    "RateLimited",
    "RateLimiter",
    "RedisLimitStorage",
    "RequestBodyStalled",
    "RequestClass",
    "RequestCoalesced",
    "RequestShed",
    "Resilient",
    "ResilientSyncTransport",
    "ResilientTransport",
    "RetriesExhausted",
    "RetryAfterHonoured",
    "RetryBudget",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "RetryScheduled",
    "SeawallError",
    "SharedBreakerState",
    "ShedPolicy",
    "Store",
    "SyncResilient",
    "SystemClock",
    "__version__",
    "build_step",
    "load_policies",
    "parse_retry_after",
    "resilient",
]
