"""Rate-limit policy: what is limited, by which key, at what cost, and what a failure means.

Defaults are tuned for a service that serves artifacts: a generous per-client limit (an
image pull is one manifest plus dozens of blob requests), no proxy trusted (so a spoofed
``X-Forwarded-For`` changes nothing until an operator says how many proxies are in front),
health probes exempt, fail *open* when the shared counter store is down (a rate limiter
must never be the reason an artifact manager stops serving) and a bounded key table so a
flood of distinct clients cannot grow the process.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from limits import RateLimitItem, parse_many

from seawall.errors import PolicyError
from seawall.policy.base import MAX_WINDOW, PolicyBase, check_int_at_least, check_positive
from seawall.policy.breaker import BreakerPolicy

__all__ = [
    "DEFAULT_EXEMPT_PATHS",
    "STORAGE_BREAKER",
    "KeySource",
    "LimitRule",
    "RateLimitPolicy",
    "Strategy",
    "parse_rates",
]

KeySource = str | Callable[[Any], "str | None"]
"""``"client"``, ``"global"``, ``"header:<name>"`` or a callable ``scope -> str | None``."""

Strategy = Literal["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
STRATEGIES: tuple[str, ...] = (
    "fixed-window",
    "moving-window",
    "sliding-window-counter",
    "token-bucket",
)
STORAGE_SCHEMES: tuple[str, ...] = ("memory", "redis", "rediss", "async+redis", "async+rediss")

MAX_AMOUNT = 1_000_000_000
"""Largest request count of one rate: Redis and Lua count in integers below 2^53."""


STORAGE_BREAKER = BreakerPolicy(
    window="count",
    window_size=10,
    minimum_calls=3,
    failure_rate_threshold=0.5,
    slow_call_duration=None,
    open_duration=1.0,
    backoff_multiplier=2.0,
    max_open_duration=5.0,
    jitter=0.2,
    half_open_probes=1,
    probe_timeout=5.0,
)
"""The shared store's own breaker: 3 failures or timeouts of the last 10 calls open it for
1 s (doubling up to 5 s, so a restarted Redis is used again within seconds); one request
probes it. A failure costs at most ``storage_timeout``; while open, nothing waits on it."""

DEFAULT_EXEMPT_PATHS: frozenset[str] = frozenset(
    {"/healthz", "/readyz", "/livez", "/health", "/ready", "/ping", "/metrics"}
)
"""Health and metrics probes: limiting them makes an orchestrator kill a busy but healthy pod."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9a-z-]+$")  # RFC 9110 token, lower case


def parse_rates(field_name: str, value: Any) -> tuple[RateLimitItem, ...]:
    """Parse ``"100/second"`` or ``"10/second;500/minute"`` with ``limits``; else PolicyError."""
    if not isinstance(value, str):
        raise PolicyError(field_name, value, "is not a rate like '100/second'")
    try:
        items = tuple(parse_many(value))
    except ValueError:
        raise PolicyError(field_name, value, "is not a rate like '100/second'") from None
    if not items:
        raise PolicyError(field_name, value, "is not a rate like '100/second'")
    for item in items:
        if item.amount < 1:
            raise PolicyError(field_name, value, "must allow at least 1 request per window")
        if item.amount > MAX_AMOUNT:
            raise PolicyError(field_name, value, f"allows more than {MAX_AMOUNT} per window")
        if item.get_expiry() > MAX_WINDOW:
            raise PolicyError(
                field_name, value, f"has a window longer than ten years ({MAX_WINDOW} s)"
            )
    return items


# redis-py's URL options (redis.asyncio.connection.URL_QUERY_ARGUMENT_PARSERS) plus the
# one it passes through as text; any other option would fail on the first connection.
_REDIS_URL_OPTIONS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_read_size",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "ssl_min_version",
        "timeout",
        "protocol",
        "client_name",
    }
)


def check_storage_uri(field_name: str, value: Any) -> None:
    """Refuse at load time a storage URI that would only fail when the first request comes."""
    if not isinstance(value, str) or "://" not in value:
        raise PolicyError(field_name, value, "is not a storage URI like 'memory://'")
    scheme, rest = value.split("://", 1)
    if scheme not in STORAGE_SCHEMES:
        raise PolicyError(
            field_name, value, f"has an unknown scheme; known: {', '.join(STORAGE_SCHEMES)}"
        )
    if scheme == "memory":
        if rest:
            raise PolicyError(field_name, value, "takes nothing after 'memory://'")
        return
    parts = urlsplit(value.removeprefix("async+"))
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise PolicyError(field_name, value, "has a port that is not a number 1-65535") from None
    if not parts.hostname:
        raise PolicyError(field_name, value, "names no host, like 'redis://localhost:6379/0'")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise PolicyError(field_name, value, "has a database that is not a number, like '/0'")
    for name, option in parse_qsl(parts.query, keep_blank_values=True):
        if name not in _REDIS_URL_OPTIONS:
            raise PolicyError(
                field_name,
                value,
                f"has an unknown option {name!r}; known: {', '.join(sorted(_REDIS_URL_OPTIONS))}",
            )
        if name in ("db", "max_connections", "socket_read_size", "health_check_interval"):
            if not option.isdigit():
                raise PolicyError(field_name, value, f"has {name}={option!r}, not a whole number")
            if name == "max_connections" and int(option) < 1:
                raise PolicyError(field_name, value, "has max_connections below 1")
        if name in ("socket_timeout", "socket_connect_timeout", "timeout"):
            try:
                seconds = float(option)
            except ValueError:
                seconds = -1.0
            if not 0 < seconds < 3600:
                raise PolicyError(field_name, value, f"has {name}={option!r}, not seconds > 0")


def check_trusted_proxies(field_name: str, value: Any) -> frozenset[str]:
    """Addresses or CIDRs (``10.0.0.0/8``, ``::1``), or ``*`` for any peer."""
    if isinstance(value, str) or not isinstance(value, frozenset | set | list | tuple):
        raise PolicyError(field_name, value, "is not a list of addresses or CIDRs")
    for item in value:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except (TypeError, ValueError):
            raise PolicyError(
                field_name, item, "is not an IP address or CIDR like '10.0.0.0/8'"
            ) from None
    return frozenset(value)


def check_key_source(field_name: str, value: Any) -> None:
    """Accept ``client``, ``global``, ``header:<token>`` or a callable."""
    if callable(value):
        return
    if value in ("client", "global"):
        return
    if isinstance(value, str) and value.startswith("header:"):
        name = value[len("header:") :]
        if _HEADER.match(name):
            return
        raise PolicyError(
            field_name, value, "names no valid lower-case header, like 'header:x-tenant'"
        )
    raise PolicyError(field_name, value, "is not 'client', 'global', 'header:<name>' or a callable")


@dataclass(frozen=True, slots=True)
class LimitRule(PolicyBase):
    """One more limit applied next to the main one, e.g. a global cap or a per-tenant quota.

    ``name`` is the policy name clients see in the ``RateLimit-Policy`` field and also
    namespaces the stored counters, so two rules never share a counter.
    """

    limit: str
    key: KeySource = "global"
    name: str = "global"

    def __post_init__(self) -> None:
        parse_rates("limit", self.limit)
        check_key_source("key", self.key)
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise PolicyError("name", self.name, "must be 1-64 letters, digits, '_', '.' or '-'")

    @property
    def items(self) -> tuple[RateLimitItem, ...]:
        return parse_rates("limit", self.limit)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy(PolicyBase):
    """Per-key rate limiting for an ASGI service (see docs/ratelimit.md).

    ``limit`` may hold several rates (``"20/second;600/minute"``): a request must fit all.
    ``costs`` maps path globs to the number of hits a request costs (first match wins,
    default 1), so a blob pull can cost more than a manifest lookup.
    """

    limit: str = "1000/minute"
    key: KeySource = "client"
    name: str = "default"
    rules: tuple[LimitRule, ...] = ()
    costs: tuple[tuple[str, int], ...] | Mapping[str, int] = ()
    strategy: Strategy = "moving-window"
    storage: str = "memory://"
    storage_timeout: float = 0.25
    storage_breaker: BreakerPolicy = STORAGE_BREAKER
    on_storage_error: Literal["open", "closed"] = "open"
    closed_retry_after: float = 5.0
    log_interval: float = 60.0
    emit_headers: bool = True
    trusted_proxies: frozenset[str] = frozenset()
    trusted_proxy_hops: int = 0
    header_keys_verified: bool = False
    proxy_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    ipv6_prefix: int = 64
    exempt_paths: frozenset[str] = field(default=DEFAULT_EXEMPT_PATHS)
    max_tracked_keys: int = 100_000

    def __post_init__(self) -> None:
        items = parse_rates("limit", self.limit)
        check_key_source("key", self.key)
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise PolicyError("name", self.name, "must be 1-64 letters, digits, '_', '.' or '-'")
        rules = self.rules
        if isinstance(rules, LimitRule):
            rules = (rules,)
        if not isinstance(rules, tuple | list):
            raise PolicyError("rules", rules, "is not a list of LimitRule")
        rules = tuple(LimitRule.from_dict(r) if isinstance(r, Mapping) else r for r in rules)
        names = {self.name}
        smallest = min(i.amount for i in items)
        for i, rule in enumerate(rules):
            if not isinstance(rule, LimitRule):
                raise PolicyError(f"rules[{i}]", rule, "is not a LimitRule")
            if rule.name in names:
                raise PolicyError(f"rules[{i}].name", rule.name, "is used by another rule")
            names.add(rule.name)
            smallest = min(smallest, *(x.amount for x in rule.items))
        object.__setattr__(self, "rules", rules)
        object.__setattr__(self, "costs", _check_costs(self.costs, smallest))
        if self.strategy not in STRATEGIES:
            raise PolicyError("strategy", self.strategy, f"is not one of {', '.join(STRATEGIES)}")
        check_storage_uri("storage", self.storage)
        check_positive("storage_timeout", self.storage_timeout)
        if self.storage_timeout < 0.001:
            raise PolicyError(  # found by the generated-policy test: 7e-40 s loaded, then
                "storage_timeout",  # every request failed as if the store were down
                self.storage_timeout,
                "must be at least 0.001 s: no store answers sooner, so every request would fail",
            )
        if self.storage_timeout > 60:
            raise PolicyError(
                "storage_timeout", self.storage_timeout, "must be at most 60 s: requests wait on it"
            )
        if not isinstance(self.storage_breaker, BreakerPolicy):
            raise PolicyError("storage_breaker", self.storage_breaker, "is not a BreakerPolicy")
        if self.on_storage_error not in ("open", "closed"):
            raise PolicyError(
                "on_storage_error", self.on_storage_error, "is not 'open' or 'closed'"
            )
        check_positive("closed_retry_after", self.closed_retry_after)
        check_positive("log_interval", self.log_interval)
        if not isinstance(self.emit_headers, bool):
            raise PolicyError("emit_headers", self.emit_headers, "is not true or false")
        proxies = check_trusted_proxies("trusted_proxies", self.trusted_proxies)
        object.__setattr__(self, "trusted_proxies", proxies)
        check_int_at_least("trusted_proxy_hops", self.trusted_proxy_hops, 0)
        if self.trusted_proxy_hops and not proxies:
            raise PolicyError(
                "trusted_proxy_hops",
                self.trusted_proxy_hops,
                "needs trusted_proxies (the addresses or CIDRs of your proxies): counting "
                "hops alone lets a client that reaches the app directly pick any key",
            )
        if not isinstance(self.header_keys_verified, bool):
            raise PolicyError(
                "header_keys_verified", self.header_keys_verified, "is not true or false"
            )
        taken = {r.name for r in rules} | {self.name}
        for where, rule in [
            ("name", self.all_rules()[0]),
            *((f"rules[{i}].name", r) for i, r in enumerate(rules)),
        ]:
            companion = self._companion(rule)
            if companion is None:
                continue
            if companion in taken:
                raise PolicyError(
                    where,
                    rule.name,
                    f"needs its per-address twin {companion!r}, a name another rule uses",
                )
            if not _NAME.match(companion):
                raise PolicyError(
                    where, rule.name, "must be at most 57 characters for a header key's twin"
                )
            taken.add(companion)
        if self.proxy_header not in ("x-forwarded-for", "forwarded"):
            raise PolicyError(
                "proxy_header", self.proxy_header, "is not 'x-forwarded-for' or 'forwarded'"
            )
        check_int_at_least("ipv6_prefix", self.ipv6_prefix, 1)
        if self.ipv6_prefix > 128:
            raise PolicyError("ipv6_prefix", self.ipv6_prefix, "must be at most 128")
        exempt = self.exempt_paths
        if isinstance(exempt, str) or not isinstance(exempt, frozenset | set | list | tuple):
            raise PolicyError("exempt_paths", exempt, "is not a set of paths")
        for path in exempt:
            if not isinstance(path, str) or not path.startswith("/"):
                raise PolicyError("exempt_paths", path, "is not a path starting with '/'")
        object.__setattr__(self, "exempt_paths", frozenset(exempt))
        check_int_at_least("max_tracked_keys", self.max_tracked_keys, 1)

    @property
    def items(self) -> tuple[RateLimitItem, ...]:
        """The parsed rates of the main limit."""
        return parse_rates("limit", self.limit)

    def _companion(self, rule: LimitRule) -> str | None:
        """The name of a header rule's per-address twin, or None when it needs none."""
        key = rule.key
        if self.header_keys_verified or not (isinstance(key, str) and key.startswith("header:")):
            return None
        return f"{rule.name}-client"

    def all_rules(self) -> tuple[LimitRule, ...]:
        """The main limit as a rule, then the extra rules, then the per-address twins.

        A ``header:`` key is whatever the client sends unless ``header_keys_verified``: a
        client sending a new value per request would get a fresh quota each time. So each
        such rule also applies, with the same rates, per client address.
        """
        rules = (LimitRule(self.limit, self.key, self.name), *self.rules)
        twins = []
        for rule in rules:
            name = self._companion(rule)
            if name is not None:
                twins.append(LimitRule(rule.limit, "client", name))
        return (*rules, *twins)

    def cost_of(self) -> Callable[[str], int]:
        """A fast ``path -> cost`` function (compiled globs, first match wins)."""
        if not self.costs:
            return _one
        pairs = self.costs.items() if isinstance(self.costs, Mapping) else self.costs
        compiled = [(re.compile(fnmatch.translate(glob)).match, cost) for glob, cost in pairs]

        def cost(path: str) -> int:
            for match, value in compiled:
                if match(path):
                    return value
            return 1

        return cost


def _one(_path: str) -> int:
    return 1


def _check_costs(costs: Any, smallest: int) -> tuple[tuple[str, int], ...]:
    if isinstance(costs, Mapping):
        costs = tuple(costs.items())
    if not isinstance(costs, tuple | list):
        raise PolicyError("costs", costs, "is not a mapping of path globs to costs")
    out: list[tuple[str, int]] = []
    for entry in costs:
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise PolicyError("costs", entry, "is not a (path glob, cost) pair")
        glob, cost = entry
        if not isinstance(glob, str) or not glob.startswith("/"):
            raise PolicyError("costs", glob, "is not a path glob starting with '/'")
        check_int_at_least(f"costs[{glob!r}]", cost, 1)
        if cost > smallest:
            raise PolicyError(
                f"costs[{glob!r}]",
                cost,
                f"exceeds the smallest limit ({smallest}), so such a request could never pass",
            )
        out.append((glob, int(cost)))
    return tuple(out)
