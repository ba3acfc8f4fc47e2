"""Load-shedding policy: an adaptive concurrency limit, a short wait queue, request classes.

Why these defaults: a server that serves artifacts does not know its own capacity (it
changes with the storage backend, the cache hit ratio and the size of the blobs), so the
limit is *adaptive* by default and found from latency. The wait queue only absorbs bursts:
CoDel's 5 ms target / 100 ms interval lets a short burst wait, while a standing queue
(sustained overload) is cut down to a hand-off buffer served newest-first, so the clients
still waiting are the ones served and everyone else gets a microsecond ``503``.
Classes follow what a CI fleet needs to make progress: health checks are never shed
(a shed health check gets a healthy but busy instance restarted, which is how the
incident's restart caused downtime), manifests and index pages are small and gate
everything after them, blobs are big but by digest (cacheable elsewhere), uploads can wait.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from seawall.errors import PolicyError
from seawall.policy.base import (
    PolicyBase,
    check_fraction,
    check_int_at_least,
    check_positive,
)

__all__ = ["RequestClass", "ShedPolicy"]

_METHOD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True, slots=True)
class RequestClass(PolicyBase):
    """A class of requests matched by method and path, with a shedding priority.

    ``methods`` empty matches every method; ``path`` is a regular expression searched
    (``re.search``) in the request path. Higher ``priority`` is shed later; a class with
    ``never_shed`` bypasses the limiter entirely (it is not counted in flight either).
    """

    name: str
    priority: int = 0
    methods: frozenset[str] = frozenset()
    path: str = ""
    never_shed: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PolicyError("name", self.name, "must be a non-empty string")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise PolicyError("priority", self.priority, "must be a whole number")
        methods = self.methods
        if isinstance(methods, str) or not all(isinstance(m, str) and m for m in methods):
            raise PolicyError("methods", methods, "must be a set of HTTP method names")
        upper = frozenset(m.upper() for m in methods)
        if not all(set(m) <= _METHOD_CHARS for m in upper):
            raise PolicyError("methods", methods, "must be a set of HTTP method names")
        object.__setattr__(self, "methods", upper)
        if not isinstance(self.path, str):
            raise PolicyError("path", self.path, "must be a regular expression string")
        try:
            regex = re.compile(self.path)
        except re.error as exc:
            raise PolicyError("path", self.path, f"is not a regular expression ({exc})") from None
        object.__setattr__(self, "_regex", regex)
        if not isinstance(self.never_shed, bool):
            raise PolicyError("never_shed", self.never_shed, "must be true or false")

    def matches(self, method: str, path: str) -> bool:
        """True when this class applies to ``method`` ``path``."""
        if self.methods and method not in self.methods:
            return False
        return self._regex.search(path) is not None


_READ = frozenset({"GET", "HEAD"})
_WRITE = frozenset({"PUT", "POST", "PATCH", "DELETE"})

DEFAULT_CLASSES: tuple[RequestClass, ...] = (
    RequestClass(
        "health",
        priority=100,
        methods=_READ,
        path=r"^/(healthz?|livez|readyz|ping|-/ping|_health|metrics)/?$",
        never_shed=True,
    ),
    RequestClass("upload", priority=10, methods=_WRITE, path=""),
    RequestClass(
        "index",
        priority=40,
        methods=_READ,
        path=r"^/v2/?$|^/v2/.+/(manifests|tags)/|^/simple(/|$)|^/[^/]+/?$|^/@[^/]+/[^/]+/?$",
    ),
    RequestClass(
        "blob",
        priority=30,
        methods=_READ,
        path=r"^/v2/.+/blobs/|^/packages/|/-/[^/]+\.tgz$",
    ),
)
"""Health > index (OCI manifests/tags, PEP 503 ``/simple/``, npm packuments) > blobs
(OCI blobs, PyPI files, npm tarballs) > anything else (20) > uploads (PUT/POST/PATCH/DELETE)."""


@dataclass(frozen=True, slots=True)
class ShedPolicy(PolicyBase):
    """How many requests run at once, how long others may wait, and who is shed first.

    Limit: ``adaptive`` (default) starts at ``initial_limit`` and follows the gradient
    controller (see docs/shedding.md) between ``min_limit`` and ``max_limit``; with
    ``adaptive=False`` the limit stays at ``initial_limit``.

    Queue (CoDel): a waiter may wait up to ``queue_interval`` while the queue drains;
    once the wait has stayed above ``queue_target`` for a whole ``queue_interval`` the
    queue is *overloaded*: new waits are capped at ``queue_target``, the queue holds only
    the waiters that the estimated drain rate serves within a quarter of the target
    (possibly none), it is served newest-first (``lifo_under_overload``), and each class
    above a request's keeps ``priority_reserve`` of the limit. ``max_queue_length`` caps
    the queue always. It goes back to normal after one ``queue_interval`` without pressure.

    Controller, once per window of ``window_samples`` latency samples (or ``window_max``
    seconds): latency above ``tolerance * baseline`` shrinks the limit in proportion;
    latency within it grows the limit by ``sqrt(limit)`` if the limit was in use; steps
    are smoothed by ``smoothing``. ``baseline`` is the no-load latency, re-measured at
    ``min_limit`` concurrency for one window every ``probe_interval`` seconds.
    """

    adaptive: bool = True
    initial_limit: int = 10
    min_limit: int = 4
    max_limit: int = 1000
    queue_target: float = 0.005
    queue_interval: float = 0.05
    max_queue_length: int = 64
    lifo_under_overload: bool = True
    priority_reserve: float = 0.1
    tolerance: float = 1.5
    smoothing: float = 0.5
    window_samples: int = 20
    window_max: float = 1.0
    probe_interval: float = 10.0
    retry_after_min: float = 1.0
    retry_after_max: float = 60.0
    default_priority: int = 20
    classes: tuple[RequestClass, ...] = DEFAULT_CLASSES

    def __post_init__(self) -> None:
        if not isinstance(self.adaptive, bool):
            raise PolicyError("adaptive", self.adaptive, "must be true or false")
        check_int_at_least("min_limit", self.min_limit, 1)
        check_int_at_least("initial_limit", self.initial_limit, 1)
        check_int_at_least("max_limit", self.max_limit, 1)
        if self.max_limit < self.min_limit:
            raise PolicyError(
                "max_limit", self.max_limit, f"must be at least min_limit ({self.min_limit})"
            )
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise PolicyError(
                "initial_limit",
                self.initial_limit,
                f"must be between min_limit ({self.min_limit}) and max_limit ({self.max_limit})",
            )
        check_positive("queue_target", self.queue_target)
        check_positive("queue_interval", self.queue_interval)
        if self.queue_interval < self.queue_target:
            raise PolicyError(
                "queue_interval",
                self.queue_interval,
                f"must be at least queue_target ({self.queue_target})",
            )
        check_int_at_least("max_queue_length", self.max_queue_length, 0)
        if not isinstance(self.lifo_under_overload, bool):
            raise PolicyError(
                "lifo_under_overload", self.lifo_under_overload, "must be true or false"
            )
        check_fraction("priority_reserve", self.priority_reserve)
        if self.priority_reserve > 0.5:
            raise PolicyError("priority_reserve", self.priority_reserve, "must be at most 0.5")
        check_positive("tolerance", self.tolerance)
        if self.tolerance < 1:
            raise PolicyError("tolerance", self.tolerance, "must be at least 1")
        check_fraction("smoothing", self.smoothing)
        if self.smoothing == 0:
            raise PolicyError("smoothing", self.smoothing, "must be greater than 0")
        check_int_at_least("window_samples", self.window_samples, 1)
        check_positive("window_max", self.window_max)
        check_positive("probe_interval", self.probe_interval)
        check_positive("retry_after_min", self.retry_after_min)
        check_positive("retry_after_max", self.retry_after_max)
        if self.retry_after_max < self.retry_after_min:
            raise PolicyError(
                "retry_after_max",
                self.retry_after_max,
                f"must be at least retry_after_min ({self.retry_after_min})",
            )
        if isinstance(self.default_priority, bool) or not isinstance(self.default_priority, int):
            raise PolicyError("default_priority", self.default_priority, "must be a whole number")
        classes = self.classes
        if isinstance(classes, list):
            classes = tuple(classes)
            object.__setattr__(self, "classes", classes)
        if not isinstance(classes, tuple) or not all(isinstance(c, RequestClass) for c in classes):
            raise PolicyError("classes", classes, "must be a list of request classes")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise PolicyError("classes", names, "has duplicate class names")

    def classify(self, method: str, path: str) -> RequestClass | None:
        """The first class matching the request, or None (``default_priority`` applies)."""
        for cls in self.classes:
            if cls.matches(method, path):
                return cls
        return None
