"""Resilience for any async callable: a registry SDK method, a gRPC stub, a helper.

``@resilient(host="registry.example")`` wraps an ``async def`` in the same pipeline as the
HTTP faces (budgeted retries with deadline, per-host breaker, rate limit, bulkhead,
per-attempt timeout), sharing a breaker registry and a budget when given the transport's.
The callable is assumed idempotent (it is usually a fetch); pass ``idempotent=False`` for
one that is not, and it will be guarded but never retried.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Generic, ParamSpec, TypeVar

from seawall.breaker import BreakerRegistry
from seawall.client._pipeline import Admission, ClientCore, CoreAccess
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import SeawallError
from seawall.events import EventBus
from seawall.policy.retry import ClientPolicy
from seawall.retry import FINAL, RetryBudget, RetryCall, Verdict

__all__ = ["Resilient", "default_retry_on", "resilient"]

P = ParamSpec("P")
R = TypeVar("R")


def _status_of(exc: BaseException) -> int | None:
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def default_retry_on(exc: BaseException) -> bool:
    """Connection errors and timeouts: the failures worth a second try for any SDK."""
    if isinstance(exc, SeawallError):  # open breaker, local limits: retrying adds nothing
        return False
    return isinstance(exc, ConnectionError | TimeoutError) or (
        type(exc).__module__.startswith("httpx")
        and type(exc).__name__
        in ("ConnectError", "ConnectTimeout", "ReadTimeout", "ReadError", "RemoteProtocolError")
    )


class Resilient(CoreAccess, Generic[P, R]):
    """A guarded async callable; also ``await guard.call(fn, *args)`` for one-off calls."""

    def __init__(
        self,
        fn: Callable[P, Awaitable[R]] | None,
        host: str,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        breakers: BreakerRegistry | None = None,
        budgets: RetryBudget | None = None,
        idempotent: bool = True,
        retry_on: Callable[[BaseException], bool] = default_retry_on,
    ) -> None:
        if not host:
            raise ValueError("host names the upstream (the breaker and budget key)")
        self._fn = fn
        self.host = host
        self.idempotent = idempotent
        self.retry_on = retry_on
        self._core = ClientCore(
            policy, clock=clock, events=events, breakers=breakers, budgets=budgets
        )
        if fn is not None:
            functools.update_wrapper(self, fn)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        assert self._fn is not None, "Resilient without a function: use .call(fn, ...)"
        return await self.call(self._fn, *args, **kwargs)

    def _judge(self, exc: BaseException) -> Verdict:
        status = _status_of(exc)
        if status is not None:
            return self._core.judge_status(status, _retry_after_of(exc))
        if self.retry_on(exc):
            return Verdict(True, type(exc).__name__)
        return FINAL

    async def call(self, fn: Callable[..., Awaitable[R]], *args: Any, **kwargs: Any) -> R:
        core = self._core
        host = self.host
        deadline_at = core.start(host)

        async def attempt() -> R:
            return await self._attempt(fn, args, kwargs, deadline_at)

        try:
            return await attempt()
        except Exception as exc:
            if not self.idempotent or not self._judge(exc).retryable:
                raise
            first: BaseException = exc
        call: RetryCall[R] = core.retry_call(host, deadline_at, lambda _r: FINAL, self._judge)
        return await call.resume(first, attempt)

    async def _attempt(
        self,
        fn: Callable[..., Awaitable[R]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        deadline_at: float,
    ) -> R:
        # CircuitOpenError and BulkheadTimeout are raised as they are: no face types here.
        with Admission(self._core, self.host, deadline_at, None) as admission:
            timeout = await admission.wait()
            async with asyncio.timeout(timeout):
                result = await fn(*args, **kwargs)
            admission.succeeded()
        return result


def _retry_after_of(exc: BaseException) -> str | bytes | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
    except Exception:
        return None
    return value if isinstance(value, str | bytes) else None


def resilient(
    policy: ClientPolicy | None = None,
    *,
    host: str,
    clock: Clock = SYSTEM_CLOCK,
    events: EventBus | None = None,
    breakers: BreakerRegistry | None = None,
    budgets: RetryBudget | None = None,
    idempotent: bool = True,
    retry_on: Callable[[BaseException], bool] = default_retry_on,
) -> Callable[[Callable[P, Awaitable[R]]], Resilient[P, R]]:
    """Decorator: ``@resilient(host="ghcr.io")`` on an ``async def`` (or a bound method)."""

    def wrap(fn: Callable[P, Awaitable[R]]) -> Resilient[P, R]:
        return Resilient(
            fn,
            host,
            policy,
            clock=clock,
            events=events,
            breakers=breakers,
            budgets=budgets,
            idempotent=idempotent,
            retry_on=retry_on,
        )

    return wrap
