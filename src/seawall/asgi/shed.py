"""LoadShedMiddleware: pure ASGI face of :class:`seawall.shed.ConcurrencyLimiter`.

Why pure ASGI: a rejection must cost microseconds (no request object, no body read, no
task) and a streamed blob must stay streamed. A shed request gets ``503`` with
``Retry-After``, a problem+json body and ``X-Seawall-Shed: 1`` so that a fallback cache
outside can tell "seawall refused" from "the app failed".

Latency sample: from the moment the app is started to its ``http.response.start``
(time to first byte). The permit is held until the response is complete, but a 2 GB
layer streamed to a slow runner says nothing about server overload, while the time to
first byte grows as soon as the app queues internally.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seawall.asgi._http import retry_after_seconds, send_problem
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.policy.shed import ShedPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.shed import ConcurrencyLimiter, Permit, Rejection, Waiter

__all__ = ["LoadShedMiddleware"]

_REFUSED = (REFUSED_HEADER.encode("latin-1"), b"shed")
"""Response header set on every 503 produced by shedding (value ``1``)."""


class LoadShedMiddleware:
    """Admit at most the adaptive limit of HTTP requests; queue briefly; shed the rest."""

    def __init__(
        self,
        app: ASGIApp,
        policy: ShedPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.app = app
        self.policy = policy if policy is not None else ShedPolicy()
        self.clock = clock
        self.limiter = ConcurrencyLimiter(self.policy, clock=clock, events=events)
        self._shed_responses: dict[tuple[int, str, int, bool], tuple[Message, ...]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope.get("method", "GET")
        cls = self.policy.classify(method, scope.get("path", "/"))
        if cls is None:
            priority = self.policy.default_priority
        elif cls.never_shed:
            await self.app(scope, receive, send)
            return
        else:
            priority = cls.priority
        first = self.limiter.try_acquire(priority)
        outcome: Permit | Rejection | None
        if isinstance(first, Waiter):
            outcome, receive = await self._wait(first, receive)
            if outcome is None:
                return  # the client left while queued: the app never runs for it
        else:
            outcome = first
        if isinstance(outcome, Rejection):
            await self._reject(send, outcome, head_only=method == "HEAD")
            return
        await self._run(outcome, scope, receive, send)

    async def _run(self, permit: Permit, scope: Scope, receive: Receive, send: Send) -> None:
        clock = self.clock
        started = clock.now()
        latency: float | None = None

        async def send_timed(message: Message) -> None:
            nonlocal latency
            if latency is None and message["type"] == "http.response.start":
                latency = clock.now() - started
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            self.limiter.release(permit, latency=latency)

    async def _reject(self, send: Send, rejection: Rejection, *, head_only: bool) -> None:
        seconds = retry_after_seconds(rejection.retry_after)
        key = (seconds, rejection.reason, rejection.priority, head_only)
        messages = self._shed_responses.get(key)
        if messages is None:
            # send_problem renders the response once; refusals then cost no JSON encoding
            captured: list[Message] = []

            async def capture(message: Message) -> None:
                captured.append(message)

            await send_problem(
                capture,
                503,
                "Service overloaded",
                f"The server is at its concurrency limit; retry in {seconds} s.",
                headers=((b"retry-after", str(seconds).encode()), _REFUSED),
                extra={"reason": rejection.reason, "priority": rejection.priority},
                head_only=head_only,
            )
            if len(self._shed_responses) >= 256:
                self._shed_responses.clear()
            messages = self._shed_responses[key] = tuple(captured)
        for message in messages:
            await send(dict(message))

    async def _wait(
        self, waiter: Waiter, receive: Receive
    ) -> tuple[Permit | Rejection | None, Receive]:
        """Wait for a permit while watching for ``http.disconnect``.

        Returns ``(None, receive)`` when the client left (its place is freed). A request
        message received while watching is kept and replayed to the app; once a message
        says ``more_body`` the watch stops, so the body is never read ahead.
        """
        limiter = self.limiter
        fut = waiter.future()
        kept: deque[Message] = deque()
        watch: asyncio.Future[Message] | None = None
        watching = True
        cancelled_while_tidying = False
        try:
            while not fut.done():
                if watching and watch is None:
                    watch = asyncio.ensure_future(receive())
                waitables: tuple[asyncio.Future[Any], ...] = (
                    (fut, watch) if watch is not None else (fut,)
                )
                await asyncio.wait(
                    waitables,
                    timeout=max(limiter.time_left(waiter), 0.001),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if watch is not None and watch.done():
                    message = watch.result()
                    watch = None
                    if message["type"] == "http.disconnect":
                        limiter.cancel(waiter)
                        return None, receive
                    kept.append(message)
                    if message.get("more_body", False):
                        watching = False
                if not fut.done():
                    limiter.expire(waiter)
        except BaseException:
            limiter.cancel(waiter)
            raise
        finally:
            if watch is not None:
                if watch.done():
                    if not watch.cancelled() and watch.exception() is None:
                        kept.append(watch.result())
                else:
                    watch.cancel()
                    try:
                        await watch
                    except asyncio.CancelledError:
                        task = asyncio.current_task()
                        # the request itself was cancelled while the watch wound down
                        cancelled_while_tidying = task is not None and task.cancelling() > 0
                    except Exception:  # the server's receive failed; the app will see it
                        pass
        if cancelled_while_tidying:  # only reached when the wait itself ended normally
            limiter.cancel(waiter)  # gives back the permit it was handed, exactly once
            raise asyncio.CancelledError
        result = fut.result()
        if kept and isinstance(result, Permit):
            if any(m["type"] == "http.disconnect" for m in kept):
                limiter.release(result)
                return None, receive
            return result, _replaying(kept, receive)
        return result, receive


def _replaying(kept: deque[Message], receive: Receive) -> Receive:
    """A ``receive`` that first returns the messages read while the request was queued."""

    async def replay() -> Message:
        if kept:
            return kept.popleft()
        return await receive()

    return replay
