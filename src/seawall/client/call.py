"""Resilience for any callable: a registry SDK method, a gRPC stub, a helper.

``@resilient(host="registry.example")`` wraps an ``async def`` (or a plain ``def``) in the
same pipeline as the HTTP faces: budgeted retries within a deadline, a per-host breaker,
rate limit, bulkhead, and (for ``async def``) the per-attempt timeout; given a
transport's ``breakers`` and ``budgets`` it shares them. A bare ``@resilient`` keys the
breaker and budget by the function's own name. The callable is assumed idempotent (it is
usually a fetch); pass ``idempotent=False`` for one that is not, and it will be guarded
but never retried. A plain ``def`` cannot be interrupted from outside: give it its own
timeout (the attempt timeout is not imposed on it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, overload

from seawall.breaker import BreakerRegistry
from seawall.client._async.call import AsyncFunction, Resilient
from seawall.client._call import default_retry_on
from seawall.client._sync.call import SyncFunction, SyncResilient
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.policy.retry import ClientPolicy
from seawall.retry import RetryBudget

__all__ = ["Resilient", "SyncResilient", "default_retry_on", "resilient"]

Guard = Resilient[..., Any] | SyncResilient[..., Any]


@overload
def resilient(policy: Callable[..., Any], /) -> Guard: ...


@overload
def resilient(
    policy: ClientPolicy | None = None,
    *,
    host: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
    events: EventBus | None = None,
    breakers: BreakerRegistry | None = None,
    budgets: RetryBudget | None = None,
    idempotent: bool = True,
    retry_on: Callable[[BaseException], bool] = default_retry_on,
) -> Callable[[Callable[..., Any]], Guard]: ...


def resilient(
    policy: ClientPolicy | Callable[..., Any] | None = None,
    *,
    host: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
    events: EventBus | None = None,
    breakers: BreakerRegistry | None = None,
    budgets: RetryBudget | None = None,
    idempotent: bool = True,
    retry_on: Callable[[BaseException], bool] = default_retry_on,
) -> Guard | Callable[[Callable[..., Any]], Guard]:
    """Decorator: ``@resilient``, ``@resilient(host="ghcr.io")``, ``@resilient(policy)``.

    An ``async def`` becomes a :class:`Resilient`, a plain ``def`` a :class:`SyncResilient`.
    """
    if policy is not None and not isinstance(policy, ClientPolicy):
        if not callable(policy):
            raise TypeError(f"resilient() takes a ClientPolicy or a function, not {policy!r}")
        return resilient()(policy)  # a bare @resilient

    def wrap(fn: Callable[..., Any]) -> Guard:
        options: dict[str, Any] = {
            "clock": clock,
            "events": events,
            "breakers": breakers,
            "budgets": budgets,
            "idempotent": idempotent,
            "retry_on": retry_on,
        }
        if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004 - an object with async __call__
        ):
            afn: AsyncFunction[..., Any] = fn
            return Resilient(afn, host, policy, **options)
        sfn: SyncFunction[..., Any] = fn
        return SyncResilient(sfn, host, policy, **options)

    return wrap
