"""What stands between the clients and the simulated server, assembled in one place.

- ``unprotected``: naive clients (fixed timeouts, three immediate retries) against the bare
  simulator, whose own global rate limit is "misconfigured" at 4x its capacity, as in the
  December 2022 incident: a limit that never bites.
- ``seawall``: the same load and the same simulator, with seawall on both faces: on the
  server, fallback cache -> rate limit -> load shedding -> simulator; on each runner,
  fallback cache -> resilient transport (budgeted retries honouring Retry-After, per-host
  breaker, coalescing) -> the wire.
- ``policy``: the same, with the user's own policies from a TOML file (``--policy FILE``)
  (``seawall.toml``: ``[ratelimit]``, ``[shed]``, ``[client]``, ``[cache]``). A missing
  table means that mechanism's defaults; ``enabled = false`` in a table leaves it out.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp

from seawall.asgi.cache import FallbackCacheMiddleware
from seawall.asgi.ratelimit import RateLimitMiddleware
from seawall.asgi.shed import LoadShedMiddleware
from seawall.cache import FallbackCache
from seawall.client.cache import FallbackCacheTransport
from seawall.client.httpx import ResilientTransport
from seawall.errors import PolicyError
from seawall.events import EventBus
from seawall.policy import (
    CachePolicy,
    ClientPolicy,
    Policies,
    RateLimitPolicy,
    RequestClass,
    RetryPolicy,
    ShedPolicy,
)

__all__ = [
    "MISCONFIGURED_LIMIT_FACTOR",
    "SCENARIOS",
    "LabContext",
    "Scenario",
    "build_scenarios",
    "policies_from_dict",
    "policies_from_file",
    "seawall_scenario",
    "unprotected_scenario",
]

MISCONFIGURED_LIMIT_FACTOR = 4.0
"""The simulator's own global rate limit, as a multiple of its capacity (it never bites)."""

SCENARIOS = ("unprotected", "seawall")


@dataclass(frozen=True, slots=True)
class LabContext:
    """What a scenario needs to know about the run to build its stacks."""

    bus: EventBus
    capacity_rps: float
    runners: int
    step_deadline: float
    attempt_timeout: float


ServerWrap = Callable[[ASGIApp, LabContext], ASGIApp]
ClientWrap = Callable[[httpx.AsyncBaseTransport, LabContext, int], httpx.AsyncBaseTransport]


def _same_app(app: ASGIApp, ctx: LabContext) -> ASGIApp:
    return app


def _same_transport(
    inner: httpx.AsyncBaseTransport, ctx: LabContext, runner: int
) -> httpx.AsyncBaseTransport:
    return inner


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    client: str  # "naive" | "protected"
    server: ServerWrap = _same_app
    client_transport: ClientWrap = _same_transport
    mechanisms: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    server_limit_factor: float | None = MISCONFIGURED_LIMIT_FACTOR


def unprotected_scenario() -> Scenario:
    return Scenario(
        name="unprotected",
        description=(
            "naive clients (fixed 2 s timeout, 3 immediate retries, no jitter/breaker/cache) "
            "against the bare simulator; its rate limit is misconfigured at 4x capacity"
        ),
        client="naive",
    )


# --------------------------------------------------------------------------- seawall


def policies_from_file(path: str | Path) -> Policies:
    """Read a ``seawall.toml`` for the ``policy`` scenario (see :func:`policies_from_dict`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError("policy", str(path), f"cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError("policy", str(path), f"is not valid TOML: {exc}") from None
    try:
        return policies_from_dict(data)
    except PolicyError as exc:  # name the file, as seawall.policy.load_policies does
        raise PolicyError(f"{path}: {exc.field}", exc.value, exc.problem) from None


def policies_from_dict(data: Mapping[str, Any]) -> Policies:
    """The tables of a ``seawall.toml``, read by :class:`seawall.policy.Policies`.

    Two differences, because the lab must decide what runs: a missing table means that
    mechanism with seawall's defaults, and ``enabled = false`` in a table leaves it out.
    """
    tables: dict[str, Any] = {}
    disabled: set[str] = set()
    for section, raw in data.items():
        if isinstance(raw, Mapping) and "enabled" in raw:
            raw = dict(raw)
            enabled = raw.pop("enabled")
            if not isinstance(enabled, bool):
                raise PolicyError(f"{section}.enabled", enabled, "must be true or false")
            if not enabled:
                disabled.add(section)
        tables[section] = raw
    given = Policies.from_dict(tables)
    defaults = Policies(RateLimitPolicy(), ShedPolicy(), ClientPolicy(), CachePolicy())
    chosen = {
        name: None if name in disabled else (getattr(given, name) or getattr(defaults, name))
        for name in ("ratelimit", "shed", "client", "cache")
    }
    return Policies(**chosen)


def lab_policies(ctx: LabContext) -> Policies:
    """seawall's policies as the lab tunes them; every change from a default says why.

    Measured on the quick December replay (see docs/replay.md): with every default, the
    10% retry budget ends shed requests after one try and manifests outrank blobs, so new
    steps start and then fail on a layer; the surge goodput is then about half the ideal.
    The tuning keeps every mechanism in place, but lets shedding do the overload work it
    is made for.
    """
    # a fairness guard, not the overload control: each runner may use its share of
    # 3x capacity, so one runaway runner cannot starve the others
    per_runner = max(1, math.ceil(3.0 * ctx.capacity_rps / ctx.runners))
    client = ClientPolicy(
        # retries end with the build step; a shed request is retried after its
        # Retry-After (an invited, paced retry), and the budget allows that for 80% of
        # the first attempts: the cache answers about half the logical requests, so
        # amplification stays below 1. At 0.1 the budget, not the step deadline, ends
        # most shed requests after one try and fails their steps.
        retry=RetryPolicy(deadline=ctx.step_deadline, budget_ratio=0.8),
        attempt_timeout=ctx.attempt_timeout,
    )
    return Policies(
        ratelimit=RateLimitPolicy(limit=f"{per_runner}/second", key="client"),
        shed=ShedPolicy(classes=_step_first_classes(ShedPolicy().classes)),
        client=client,
        cache=CachePolicy(public=True),
    )


def _step_first_classes(classes: tuple[RequestClass, ...]) -> tuple[RequestClass, ...]:
    """The default classes with blobs above manifests: admission per build step.

    A blob GET always belongs to a step already in progress (its manifest was fetched), a
    manifest GET starts a new one. Under overload, shedding new steps first and finishing
    the started ones keeps whole steps alive; the reverse order lets every step start and
    then fails most of them on one of their layers.
    """
    return tuple(c.replace(priority=50) if c.name == "blob" else c for c in classes)


def seawall_scenario(
    policies: Policies | None = None,
    *,
    name: str = "seawall",
    description: str = "seawall on both faces with its lab-tuned defaults",
) -> Scenario:
    """The protected scenario; a policy left as None leaves its mechanism out."""
    fixed = policies

    def pick(ctx: LabContext) -> Policies:
        return fixed if fixed is not None else lab_policies(ctx)

    def server(app: ASGIApp, ctx: LabContext) -> ASGIApp:
        pol = pick(ctx)
        if pol.shed is not None:
            app = LoadShedMiddleware(app, pol.shed, events=ctx.bus)
        if pol.ratelimit is not None:
            app = RateLimitMiddleware(app, pol.ratelimit, events=ctx.bus)
        if pol.cache is not None:
            app = FallbackCacheMiddleware(app, policy=pol.cache, events=ctx.bus)
        return app

    def client(
        inner: httpx.AsyncBaseTransport, ctx: LabContext, runner: int
    ) -> httpx.AsyncBaseTransport:
        pol = pick(ctx)
        cache = None if pol.cache is None else FallbackCache(policy=pol.cache, events=ctx.bus)
        if pol.client is not None:
            return ResilientTransport(inner, pol.client, events=ctx.bus, cache=cache)
        return inner if cache is None else FallbackCacheTransport(inner, cache)

    used = {
        "server: FallbackCacheMiddleware": "cache",
        "server: RateLimitMiddleware": "ratelimit",
        "server: LoadShedMiddleware": "shed",
        "client: FallbackCacheTransport": "cache",
        "client: ResilientTransport": "client",
    }
    left_out = set() if fixed is None else {k for k, v in used.items() if getattr(fixed, v) is None}
    return Scenario(
        name=name,
        description=description,
        client="protected",
        server=server,
        client_transport=client,
        mechanisms=tuple(k for k in used if k not in left_out),
        missing=tuple(sorted(left_out)),
    )


def build_scenarios(names: list[str] | None, policy_file: str | Path | None) -> list[Scenario]:
    """The scenarios to run, in order; ``--policy`` adds one named ``policy``."""
    chosen = list(names) if names else list(SCENARIOS)
    out: list[Scenario] = []
    for name in chosen:
        if name == "unprotected":
            out.append(unprotected_scenario())
        elif name == "seawall":
            out.append(seawall_scenario())
        elif name == "policy":
            if policy_file is None:
                raise PolicyError("scenario", name, "needs --policy FILE")
        else:
            raise PolicyError(
                "scenario", name, f"is not a scenario; known: {', '.join((*SCENARIOS, 'policy'))}"
            )
    if policy_file is not None:
        policies = policies_from_file(policy_file)
        out.append(
            seawall_scenario(
                policies, name="policy", description=f"seawall with the policies of {policy_file}"
            )
        )
    return out
