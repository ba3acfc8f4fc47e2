"""What stands between the clients and the simulated server, one scenario at a time.

Every scenario faces the same arrivals, the same simulated server (including its own global
rate limit, "misconfigured" at 4x its capacity as in December 2022) and the same world
(:class:`~seawall.replay.load.LoadConfig`: runners, webhook sender, uploader). What differs:

- ``unprotected``: today's naive clients (2 s timeout, three immediate retries, no cache)
  against the bare server with its unbounded queue: the collapse witness.
- ``conventional``: what a competent team runs without seawall: a bounded backlog in front
  of the server (nginx ``limit_conn``-style: at most ``2 x worker slots`` waiting, then a
  fast 503), an RFC 9111 pull-through cache (hishel's ASGI middleware, a shared cache), and
  clients that behave like docker (a local layer store; layers retried 5 times, waiting
  5/10/15/20 s, on tenacity).
- ``seawall``: the library's defaults, exactly as a user gets them with no arguments:
  ``FallbackCacheMiddleware(RateLimitMiddleware(LoadShedMiddleware(server)))`` and, on each
  runner, ``ResilientTransport(wire, cache=FallbackCache())``. Only ``events=`` is passed
  (to observe decisions); nothing is derived from the simulator. The headline.
- ``seawall-tuned``: the same classes with the policies of ``policies/tuned.toml``, tuned on
  seeds that are never reported (see that file).
- ``seawall-no-<mechanism>``: the defaults with one mechanism removed (shed, ratelimit,
  cache, breaker, budget), so the gain can be attributed.
- ``policy``: your own ``seawall.toml`` (``--policy FILE``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.types import ASGIApp

# only the public API (seawall's re-exports), so the lab keeps working as the library's
# modules are reorganised
from seawall import (
    SYSTEM_CLOCK,
    ClientPolicy,
    Clock,
    EventBus,
    FallbackCache,
    FallbackCacheMiddleware,
    FallbackCacheTransport,
    LoadShedMiddleware,
    Policies,
    PolicyError,
    RateLimitMiddleware,
    ResilientTransport,
)
from seawall.replay.load import (
    BASE_URL,
    Client,
    DockerLikeClient,
    LoadConfig,
    NaiveClient,
    StackClient,
)
from seawall.replay.simulator import SimConfig

__all__ = [
    "ABLATIONS",
    "HEADLINE",
    "MISCONFIGURED_LIMIT_FACTOR",
    "SCENARIOS",
    "LabContext",
    "Scenario",
    "SeawallSetup",
    "build_scenarios",
    "conventional_scenario",
    "scenario_by_name",
    "seawall_scenario",
    "setup_from_dict",
    "setup_from_file",
    "tuned_policy_path",
    "unprotected_scenario",
]

MISCONFIGURED_LIMIT_FACTOR = 4.0
"""The simulator's own global rate limit, as a multiple of its capacity (it never bites)."""

CONVENTIONAL_BACKLOG_PER_SLOT = 2
"""The conventional server's bounded backlog, per worker slot: an operator knows how many
workers the server has and keeps a short queue in front (nginx ``limit_conn``, Tomcat's
``acceptCount``); 2 per slot is about half a second of waiting work here."""

MECHANISMS = ("shed", "ratelimit", "cache", "breaker", "budget")
"""What an ablation can remove (``client`` too, from a policy file)."""

HEADLINE = ("unprotected", "conventional", "seawall", "seawall-tuned")
ABLATIONS = tuple(f"seawall-no-{m}" for m in MECHANISMS)
SCENARIOS = (*HEADLINE, *ABLATIONS)
GROUPS: dict[str, tuple[str, ...]] = {
    "headline": HEADLINE,
    "ablations": ABLATIONS,
    "all": SCENARIOS,
}


@dataclass(slots=True)
class LabContext:
    """What a scenario needs to build its stacks, and what it must close afterwards."""

    bus: EventBus
    load: LoadConfig
    sim: SimConfig
    workdir: Path
    clock: Clock = SYSTEM_CLOCK
    base_url: str = BASE_URL
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


ServerWrap = Callable[[ASGIApp, LabContext], ASGIApp]
ClientMaker = Callable[[httpx.AsyncBaseTransport, LabContext, int], Client]


def _same_app(app: ASGIApp, ctx: LabContext) -> ASGIApp:
    return app


def _no_overrides(sim: SimConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str
    client: ClientMaker
    server: ServerWrap = _same_app
    sim_overrides: Callable[[SimConfig], dict[str, Any]] = _no_overrides
    mechanisms: tuple[str, ...] = ()


# --------------------------------------------------------------------------- unprotected


def unprotected_scenario() -> Scenario:
    def client(wire: httpx.AsyncBaseTransport, ctx: LabContext, runner: int) -> Client:
        return NaiveClient(wire, ctx.load, base_url=ctx.base_url)

    return Scenario(
        name="unprotected",
        description=(
            "today's naive clients (2 s timeout, 3 immediate retries, no cache) against the "
            "bare server and its unbounded queue: the collapse witness"
        ),
        client=client,
        mechanisms=("client: naive (4 immediate attempts)", "server: unbounded FIFO queue"),
    )


# --------------------------------------------------------------------------- conventional


def conventional_scenario() -> Scenario:
    def backlog(sim: SimConfig) -> dict[str, Any]:
        return {"queue_limit": CONVENTIONAL_BACKLOG_PER_SLOT * sim.slots}

    def server(app: ASGIApp, ctx: LabContext) -> ASGIApp:
        from hishel import AsyncSqliteStorage, CacheOptions
        from hishel.asgi import ASGICacheMiddleware

        storage = AsyncSqliteStorage(database_path=ctx.workdir / "pull-through-cache.db")
        ctx.closers.append(storage.close)
        wrapped: ASGIApp = ASGICacheMiddleware(app, storage=storage, rfc=CacheOptions(shared=True))
        return wrapped

    def client(wire: httpx.AsyncBaseTransport, ctx: LabContext, runner: int) -> Client:
        return DockerLikeClient(wire, clock=ctx.clock, base_url=ctx.base_url)

    return Scenario(
        name="conventional",
        description=(
            "a bounded backlog (2 per worker slot, then 503), an RFC 9111 pull-through cache "
            "(hishel), docker-like clients (local layer store; layers retried 5 times after "
            "5/10/15/20 s, on tenacity)"
        ),
        client=client,
        server=server,
        sim_overrides=backlog,
        mechanisms=(
            "server: hishel.asgi.ASGICacheMiddleware(rfc=CacheOptions(shared=True))",
            "server: bounded backlog (queue_limit = 2 x slots)",
            "client: docker-like (tenacity: 5 attempts, wait_incrementing(5, 5); layer store)",
        ),
    )


# --------------------------------------------------------------------------- seawall


@dataclass(frozen=True, slots=True)
class SeawallSetup:
    """seawall's classes with these policies (None: the class's own default, passed no
    argument at all) and without the mechanisms named in ``without``."""

    policies: Policies = field(default_factory=Policies)
    without: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.without - {*MECHANISMS, "client"}
        if unknown:
            raise PolicyError("without", sorted(unknown), f"known: {', '.join(MECHANISMS)}")

    def client_policy(self) -> ClientPolicy | None:
        """The client policy, or None to build ``ResilientTransport`` with no argument."""
        pol = self.policies.client
        if "breaker" in self.without:
            pol = dataclasses.replace(pol or ClientPolicy(), breaker=None)
        if "budget" in self.without:
            # the budget cannot be switched off: at ratio 1 and an unreachable minimum rate
            # it never refuses a retry
            pol = pol or ClientPolicy()
            retry = dataclasses.replace(
                pol.retry, budget_ratio=1.0, budget_min_retries_per_second=1e9
            )
            pol = dataclasses.replace(pol, retry=retry)
        return pol


def _policy_kw(policy: object) -> dict[str, Any]:
    return {} if policy is None else {"policy": policy}


def seawall_scenario(
    setup: SeawallSetup | None = None,
    *,
    name: str = "seawall",
    description: str = "seawall's defaults on both faces, no argument but events=",
) -> Scenario:
    setup = setup or SeawallSetup()
    pol = setup.policies
    out = setup.without

    def server(app: ASGIApp, ctx: LabContext) -> ASGIApp:
        if "shed" not in out:
            app = LoadShedMiddleware(app, **_policy_kw(pol.shed), events=ctx.bus)
        if "ratelimit" not in out:
            app = RateLimitMiddleware(app, **_policy_kw(pol.ratelimit), events=ctx.bus)
        if "cache" not in out:
            app = FallbackCacheMiddleware(app, **_policy_kw(pol.cache), events=ctx.bus)
        return app

    def client(wire: httpx.AsyncBaseTransport, ctx: LabContext, runner: int) -> Client:
        cache = None if "cache" in out else FallbackCache(**_policy_kw(pol.cache), events=ctx.bus)
        transport: httpx.AsyncBaseTransport
        if "client" in out:
            transport = wire if cache is None else FallbackCacheTransport(wire, cache)
        else:
            transport = ResilientTransport(
                wire, **_policy_kw(setup.client_policy()), events=ctx.bus, cache=cache
            )
        return StackClient(transport, base_url=ctx.base_url)

    def arg(p: object) -> str:
        return "" if p is None else "policy"

    used = []
    if "shed" not in out:
        used.append(f"server: LoadShedMiddleware({arg(pol.shed)})")
    if "ratelimit" not in out:
        used.append(f"server: RateLimitMiddleware({arg(pol.ratelimit)})")
    if "cache" not in out:
        used += [
            f"server: FallbackCacheMiddleware({arg(pol.cache)})",
            f"client: FallbackCache({arg(pol.cache)})",
        ]
    if "client" not in out:
        removed = [m for m in ("breaker", "budget") if m in out]
        note = f" without {', '.join(removed)}" if removed else ""
        used.append(f"client: ResilientTransport({arg(setup.client_policy())}){note}")
    return Scenario(
        name=name,
        description=description,
        client=client,
        server=server,
        mechanisms=tuple(used),
    )


def ablation_scenario(mechanism: str) -> Scenario:
    return seawall_scenario(
        SeawallSetup(without=frozenset({mechanism})),
        name=f"seawall-no-{mechanism}",
        description=f"seawall's defaults without {mechanism}",
    )


# --------------------------------------------------------------------------- policy files


def setup_from_file(path: str | Path) -> SeawallSetup:
    """Read a ``seawall.toml`` for a seawall scenario (see :func:`setup_from_dict`)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError("policy", str(path), f"cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError("policy", str(path), f"is not valid TOML: {exc}") from None
    try:
        return setup_from_dict(data)
    except PolicyError as exc:  # name the file, as seawall.policy.load_policies does
        raise PolicyError(f"{path}: {exc.field}", exc.value, exc.problem) from None


def setup_from_dict(data: Mapping[str, Any]) -> SeawallSetup:
    """The tables of a ``seawall.toml``, read by :class:`seawall.policy.Policies`.

    A missing table means that mechanism with its defaults; ``enabled = false`` in a table
    leaves the mechanism out (``[client]``: no ResilientTransport at all).
    """
    tables: dict[str, Any] = {}
    without: set[str] = set()
    for section, raw in data.items():
        if isinstance(raw, Mapping) and "enabled" in raw:
            raw = dict(raw)
            enabled = raw.pop("enabled")
            if not isinstance(enabled, bool):
                raise PolicyError(f"{section}.enabled", enabled, "must be true or false")
            if not enabled:
                without.add(section)
        tables[section] = raw
    policies = Policies.from_dict(tables)
    kept = {k: (None if k in without else getattr(policies, k)) for k in tables}
    return SeawallSetup(dataclasses.replace(policies, **kept), frozenset(without))


def tuned_policy_path() -> Path:
    """The shipped tuned policy file (``seawall-tuned``)."""
    res = importlib.resources.files("seawall.replay").joinpath("policies", "tuned.toml")
    return Path(str(res))


# --------------------------------------------------------------------------- choosing


def build_scenarios(names: list[str] | None, policy_file: str | Path | None) -> list[Scenario]:
    """The scenarios to run, in order (names or groups ``headline``, ``ablations``,
    ``all``; default ``headline``); ``--policy`` adds one named ``policy``."""
    chosen: list[str] = []
    for name in names or ["headline"]:
        for one in GROUPS.get(name, (name,)):
            if one not in chosen:
                chosen.append(one)
    if "policy" in chosen:
        if policy_file is None:
            raise PolicyError("scenario", "policy", "needs --policy FILE")
        chosen.remove("policy")
    out = [scenario_by_name(name) for name in chosen]
    if policy_file is not None:
        out.append(scenario_by_name("policy", policy_file))
    return out


def scenario_by_name(name: str, policy_file: str | Path | None = None) -> Scenario:
    """One scenario by its name (``policy`` needs ``policy_file``)."""
    if name == "unprotected":
        return unprotected_scenario()
    if name == "conventional":
        return conventional_scenario()
    if name == "seawall":
        return seawall_scenario()
    if name == "seawall-tuned":
        return seawall_scenario(
            setup_from_file(tuned_policy_path()),
            name="seawall-tuned",
            description="seawall with policies/tuned.toml (tuned on seeds never reported)",
        )
    if name in ABLATIONS:
        return ablation_scenario(name.removeprefix("seawall-no-"))
    if name == "policy" and policy_file is not None:
        return seawall_scenario(
            setup_from_file(policy_file),
            name="policy",
            description=f"seawall with the policies of {policy_file}",
        )
    known = ", ".join((*SCENARIOS, *GROUPS, "policy"))
    raise PolicyError("scenario", name, f"is not a scenario; known: {known}")
