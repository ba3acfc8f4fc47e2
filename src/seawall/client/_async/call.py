"""Resilience for any async callable, written once: ``_sync/call.py`` is generated."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Generic, ParamSpec, Protocol, TypeVar

from seawall.breaker import BreakerRegistry
from seawall.client._async.pipeline import AsyncBody, async_send
from seawall.client._call import CallFaceBase, Invocation, default_host, default_retry_on
from seawall.client.core import ClientCore, CoreAccess
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.concurrency import async_deadline
from seawall.events import EventBus
from seawall.policy.retry import ClientPolicy
from seawall.retry import RetryBudget

__all__ = ["AsyncCallFace", "AsyncFunction", "Resilient"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class AsyncFunction(Protocol[P, R_co]):
    """The guarded callable (``async def`` here; a plain ``def`` in the sync copy)."""

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...


class AsyncCallFace(CallFaceBase):
    """A callable to the client pipeline: one send is one call, within the attempt's time."""

    __slots__ = ()

    async def send(self, request: Invocation, timeout: float | None) -> Any:
        fn, args, kwargs = request
        async with async_deadline(self.core.clock, timeout):
            return await fn(*args, **kwargs)

    async def close(self, response: object) -> None:
        pass

    def body(self, response: object) -> AsyncBody:
        raise TypeError("a call's result has no body")

    def replace_body(self, response: Any, body: AsyncBody) -> Any:
        return response

    def build(
        self, request: Invocation, status: int, headers: Sequence[tuple[str, str]], body: AsyncBody
    ) -> Any:
        raise TypeError("a call's result cannot be built")


class Resilient(CoreAccess, Generic[P, R]):
    """A guarded callable; also ``guard.call(fn, *args)`` for one-off calls.

    ``host`` names the upstream (the key of its breaker, budget, pacer and bulkhead);
    without it the callable's own name is used. ``idempotent=False``: guarded (breaker,
    limits) but never retried.
    """

    def __init__(
        self,
        fn: AsyncFunction[P, R] | None,
        host: str | None = None,
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
            if fn is None:
                raise ValueError("host names the upstream (the breaker and budget key)")
            host = default_host(fn)
        self._fn = fn
        self.host = host
        self.idempotent = idempotent
        self.retry_on = retry_on
        self._core = ClientCore(
            policy, clock=clock, events=events, breakers=breakers, budgets=budgets
        )
        self._face = AsyncCallFace(self._core, host, idempotent, retry_on)
        if fn is not None:
            functools.update_wrapper(self, fn)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._fn is None:
            raise TypeError("this guard has no function: use guard.call(fn, ...)")
        return await self.call(self._fn, *args, **kwargs)

    async def call(self, fn: AsyncFunction[..., R], *args: Any, **kwargs: Any) -> R:
        result: R = await async_send(self._core, self._face, (fn, args, kwargs))
        return result
