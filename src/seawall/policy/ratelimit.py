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
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from limits import RateLimitItem, parse_many

from seawall.errors import PolicyError
from seawall.policy.base import PolicyBase, check_int_at_least, check_positive

__all__ = [
    "DEFAULT_EXEMPT_PATHS",
    "KeySource",
    "LimitRule",
    "RateLimitPolicy",
    "Strategy",
    "parse_rates",
]

KeySource = str | Callable[[Any], "str | None"]
"""``"client"``, ``"global"``, ``"header:<name>"`` or a callable ``scope -> str | None``."""

Strategy = Literal["fixed-window", "moving-window", "sliding-window-counter"]
STRATEGIES: tuple[str, ...] = ("fixed-window", "moving-window", "sliding-window-counter")
STORAGE_SCHEMES: tuple[str, ...] = ("memory", "redis", "rediss", "async+redis", "async+rediss")

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
    return items


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
    on_storage_error: Literal["open", "closed"] = "open"
    closed_retry_after: float = 5.0
    log_interval: float = 60.0
    emit_headers: bool = True
    trusted_proxy_hops: int = 0
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
        if not isinstance(self.storage, str) or "://" not in self.storage:
            raise PolicyError("storage", self.storage, "is not a storage URI like 'memory://'")
        scheme = self.storage.split("://", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise PolicyError(
                "storage",
                self.storage,
                f"has an unknown scheme; known: {', '.join(STORAGE_SCHEMES)}",
            )
        check_positive("storage_timeout", self.storage_timeout)
        if self.on_storage_error not in ("open", "closed"):
            raise PolicyError(
                "on_storage_error", self.on_storage_error, "is not 'open' or 'closed'"
            )
        check_positive("closed_retry_after", self.closed_retry_after)
        check_positive("log_interval", self.log_interval)
        if not isinstance(self.emit_headers, bool):
            raise PolicyError("emit_headers", self.emit_headers, "is not true or false")
        check_int_at_least("trusted_proxy_hops", self.trusted_proxy_hops, 0)
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

    def all_rules(self) -> tuple[LimitRule, ...]:
        """The main limit as a rule, followed by the extra rules."""
        return (LimitRule(self.limit, self.key, self.name), *self.rules)

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
