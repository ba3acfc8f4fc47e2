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
from seawall.client.call import Resilient, resilient
from seawall.client.httpx import (
    CircuitOpenTransportError,
    RequestCoalesced,
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
from seawall.retry import (
    RetriesExhausted,
    RetryAfterHonoured,
    RetryBudget,
    RetryBudgetExhausted,
    RetryScheduled,
    parse_retry_after,
)
from seawall.shed import ConcurrencyLimitChanged, ConcurrencyLimiter, RequestShed

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUS",
    "SYSTEM_CLOCK",
    "BreakerPolicy",
    "BreakerRegistry",
    "BreakerRejected",
    "BreakerState",
    "BreakerStateChanged",
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
    "RateLimited",
    "RateLimiter",
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
    "ShedPolicy",
    "Store",
    "SystemClock",
    "__version__",
    "load_policies",
    "parse_retry_after",
    "resilient",
]
