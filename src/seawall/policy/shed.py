"""Load-shedding policy: an adaptive concurrency limit, a wait queue, request classes.

Why these defaults: a server that serves artifacts does not know its own capacity (it
changes with the storage backend, the cache hit ratio and the size of the blobs), so the
limit is *adaptive* by default and found from latency, starting fast (slow start doubles it
per round trip while latency holds). The wait queue absorbs bursts of any length the
server drains; only a *standing* queue (CoDel: the oldest wait above ``queue_target`` for a
whole ``queue_interval``) while the limit cannot grow is overload, and then the queue is
cut to a hand-off buffer served newest-first. Classes follow what a CI fleet needs to make
progress: health checks are never shed (a shed health check gets a healthy but busy
instance restarted); digest-addressed fetches continue a build step already started and
rank first; small writes (webhook deliveries) next; requests that start new work (a
manifest by tag, an index page, a packument) after them; large uploads last.
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
    """A class of requests matched by method, path, Accept and body size, with a priority.

    ``methods`` empty matches every method; ``path`` is a regular expression searched
    (``re.search``) in the request path; ``accept`` (empty: any) is one searched in the
    ``Accept`` field, for the formats a path alone cannot tell apart (an npm packument is
    ``/<name>`` like any other one-segment path, but npm asks for it by media type);
    ``max_body`` (None: any) matches only requests that declare a body of at most that many
    bytes (no Content-Length, i.e. a streamed body of unknown size, does not match).
    Higher ``priority`` is shed later; a class with ``never_shed`` bypasses the limiter
    entirely (it is not counted in flight either). ``stream`` marks long transfers (blobs,
    uploads): they are refused while ``ShedPolicy.max_streams`` transfers are in progress.
    """

    name: str
    priority: int = 0
    methods: frozenset[str] = frozenset()
    path: str = ""
    accept: str = ""
    max_body: int | None = None
    stream: bool = False
    never_shed: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _accept: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

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
        object.__setattr__(self, "_regex", _compile("path", self.path))
        accept = _compile("accept", self.accept) if self.accept else None
        object.__setattr__(self, "_accept", accept)
        if self.max_body is not None:
            check_int_at_least("max_body", self.max_body, 0)
        for name in ("stream", "never_shed"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(name, getattr(self, name), "must be true or false")

    def matches(self, method: str, path: str, accept: str = "", body: int | None = 0) -> bool:
        """True when this class applies; ``body`` is the declared size, None if unknown."""
        if self.methods and method not in self.methods:
            return False
        if self.max_body is not None and (body is None or body > self.max_body):
            return False
        if self._accept is not None and self._accept.search(accept) is None:
            return False
        return self._regex.search(path) is not None


def _compile(name: str, pattern: object) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise PolicyError(name, pattern, "must be a regular expression string")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyError(name, pattern, f"is not a regular expression ({exc})") from None


_READ = frozenset({"GET", "HEAD"})
_WRITE = frozenset({"PUT", "POST", "PATCH", "DELETE"})
_OCI_NAME = r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
_DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
_TAG = r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}"
_NPM_NAME = r"(?:@[a-z0-9~-][a-z0-9._~-]*/)?[a-z0-9~-][a-z0-9._~-]*"
_PYPI_FILE = r"\.(?:whl|tar\.gz|zip|tar\.bz2|tgz|egg)(?:\.metadata)?"
SMALL_WRITE_BYTES = 256 * 1024
"""A write declaring at most this body is a small write (a webhook or event delivery)."""

DEFAULT_CLASSES: tuple[RequestClass, ...] = (
    RequestClass(
        "health",
        priority=100,
        methods=_READ,
        path=r"^/(?:healthz?|livez|readyz|ping|-/ping|_health|metrics)/?$",
        never_shed=True,
    ),
    RequestClass(
        "blob",
        priority=50,
        methods=_READ,
        path=(
            rf"^/v2/{_OCI_NAME}/blobs/{_DIGEST}$"
            rf"|^/packages/(?:[^/]+/)+[^/]+{_PYPI_FILE}$"
            rf"|^/{_NPM_NAME}/-/[^/]+\.tgz$"
        ),
        stream=True,
    ),
    RequestClass(
        "manifest-by-digest",
        priority=50,
        methods=_READ,
        path=rf"^/v2/{_OCI_NAME}/manifests/{_DIGEST}$",
    ),
    RequestClass("small-write", priority=40, methods=_WRITE, max_body=SMALL_WRITE_BYTES),
    RequestClass(
        "index",
        priority=30,
        methods=_READ,
        path=(
            rf"^/v2/?$|^/v2/{_OCI_NAME}/manifests/{_TAG}$|^/v2/{_OCI_NAME}/tags/list$"
            r"|^/simple/?$|^/simple/[^/]+/?$|^/pypi/[^/]+(?:/[^/]+)?/json$"
        ),
    ),
    RequestClass(
        "packument",
        priority=30,
        methods=_READ,
        path=rf"^/{_NPM_NAME}/?$",
        accept=r"application/vnd\.npm\.install-v1\+json",
    ),
    RequestClass("upload", priority=10, methods=_WRITE, stream=True),
)
"""Health (never shed) > fetches by digest that continue a build step (OCI blobs and
manifests by digest, PyPI files, npm tarballs: 50) > small writes (webhook and event
deliveries: 40) > requests that start new work (OCI ``/v2/``, manifests by tag, tag lists,
PEP 503/691 ``/simple/`` pages, PyPI JSON, npm packuments asked for by npm's media type:
30) > anything else (20) > large or streamed uploads (10)."""


@dataclass(frozen=True, slots=True)
class ShedPolicy(PolicyBase):
    """How many requests work at once, how long others may wait, and who is shed first.

    Limit: ``adaptive`` (default) starts at ``initial_limit``, doubles per round trip
    while latency holds (slow start), then follows the gradient controller between
    ``min_limit`` and ``max_limit`` (see docs/shedding.md); with ``adaptive=False`` the
    limit stays at ``initial_limit``. The limit counts *work*: a request from its start to
    its response start; a body streaming in or out does not hold it.

    Queue (CoDel): a waiter waits its turn however long the queue drains. Once the oldest
    wait passes ``queue_target`` the queue is *standing* and served newest-first
    (``lifo_under_overload``); once it has stood for ``overload_after`` while the limit
    cannot grow, it is *overloaded*: it is cut to what the drain rate serves within half
    of ``queue_interval`` (possibly nothing), waits are capped at ``queue_interval``, and
    each class above a request's keeps ``priority_reserve`` of the limit.
    ``max_queue_length`` caps the queue always. Overload ends when a slot stays free for a
    whole hold time or nothing was refused for ``overload_after`` (docs/shedding.md).

    Controller, once per window of ``window_samples`` latency samples (or ``window_max``
    seconds): latency above ``tolerance * baseline`` shrinks the limit in proportion;
    latency within it grows the limit by ``sqrt(limit)`` if the limit was in use; steps
    are smoothed by ``smoothing``. ``baseline`` is the no-load latency, learned from
    windows with spare concurrency (no probe that sheds healthy traffic).

    Streams: at most ``max_streams`` long transfers (a ``stream`` class: blobs, uploads)
    at once; a request body that stalls ``body_timeout`` seconds gets ``408``.

    Steps: a GET/HEAD that continues a build step gets ``continuation_priority``: its
    ``x-seawall-step`` was admitted before, or without that field its client and
    repository were admitted within ``step_idle`` seconds (``step_memory`` entries at most).
    """

    adaptive: bool = True
    initial_limit: int = 10
    min_limit: int = 4
    max_limit: int = 1000
    queue_target: float = 0.005
    queue_interval: float = 0.05
    overload_after: float = 1.0
    max_queue_length: int = 1000
    lifo_under_overload: bool = True
    priority_reserve: float = 0.1
    tolerance: float = 1.5
    smoothing: float = 0.5
    window_samples: int = 20
    window_max: float = 1.0
    max_streams: int = 512
    body_timeout: float = 30.0
    step_idle: float = 10.0
    step_memory: int = 10_000
    continuation_priority: int = 50
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
        check_positive("overload_after", self.overload_after)
        if self.overload_after < self.queue_interval:
            raise PolicyError(
                "overload_after",
                self.overload_after,
                f"must be at least queue_interval ({self.queue_interval})",
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
        check_int_at_least("max_streams", self.max_streams, 1)
        check_positive("body_timeout", self.body_timeout)
        check_positive("step_idle", self.step_idle)
        check_int_at_least("step_memory", self.step_memory, 0)
        for name in ("continuation_priority", "default_priority"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(name, value, "must be a whole number")
        check_positive("retry_after_min", self.retry_after_min)
        check_positive("retry_after_max", self.retry_after_max)
        if self.retry_after_max < self.retry_after_min:
            raise PolicyError(
                "retry_after_max",
                self.retry_after_max,
                f"must be at least retry_after_min ({self.retry_after_min})",
            )
        classes = self.classes
        if isinstance(classes, list):
            classes = tuple(classes)
            object.__setattr__(self, "classes", classes)
        if not isinstance(classes, tuple) or not all(isinstance(c, RequestClass) for c in classes):
            raise PolicyError("classes", classes, "must be a list of request classes")
        names = [c.name for c in classes]
        if len(set(names)) != len(names):
            raise PolicyError("classes", names, "has duplicate class names")

    def classify(
        self, method: str, path: str, accept: str = "", body: int | None = 0
    ) -> RequestClass | None:
        """The first class matching the request, or None (``default_priority`` applies).

        ``accept`` is the request's Accept field; ``body`` the declared body size in bytes
        (0 without a body, None when it streams with no declared size).
        """
        for cls in self.classes:
            if cls.matches(method, path, accept, body):
                return cls
        return None
