"""One injectable monotonic clock for every mechanism.

Limiters, breakers, budgets and caches read time only through a :class:`Clock`, so tests
drive time with :class:`ManualClock` instead of sleeping, and no mechanism ever depends
on the wall clock or the machine's time zone. The wall clock is exposed separately
(:meth:`Clock.wall`) for the one thing that needs it: HTTP dates such as ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Protocol, runtime_checkable

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Monotonic time in seconds, plus the ways to wait for it."""

    def now(self) -> float:
        """Monotonic seconds; only differences are meaningful."""
        ...

    def wall(self) -> float:
        """Seconds since the Unix epoch (UTC); used only to read HTTP dates."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` without blocking the event loop."""
        ...

    def sleep_sync(self, seconds: float) -> None:
        """Wait ``seconds`` in a synchronous caller (the sync client faces)."""
        ...

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        """Cancel the enclosed block once ``seconds`` have passed on this clock, raising
        ``TimeoutError`` as ``asyncio.timeout`` does (None: no limit)."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    __slots__ = ()

    # The C functions themselves, not methods that call them: ``clock.now()`` is on every
    # middleware's hot path, several times a request, and a Python frame costs more than
    # the read.
    now = staticmethod(time.monotonic)
    wall = staticmethod(time.time)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)  # the loop's time is time.monotonic, as now()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
"""The process-wide default clock."""


class ManualClock:
    """A clock that moves only when told to: for tests and simulations.

    ``sleep`` advances the clock by the requested amount and yields once to the event
    loop, so code that backs off runs at full speed while observing the time it asked
    for. ``slept`` records every requested wait for assertions. A :meth:`timeout` fires
    when :meth:`advance` or a ``sleep`` moves the clock past its deadline, so a test can
    hold an upstream "hanging" until it moves time on.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self.slept: list[float] = []
        self._deadlines: list[tuple[float, int, _ManualTimeout]] = []
        self._ids = itertools.count()

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward; negative steps are refused (time is monotonic)."""
        if seconds < 0:
            raise ValueError(f"cannot move a monotonic clock backwards by {seconds}")
        self._now += seconds
        self._fire()

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds
        self._fire()
        await asyncio.sleep(0)

    def sleep_sync(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds
        self._fire()

    def timeout(self, seconds: float | None) -> AbstractAsyncContextManager[object]:
        return _ManualTimeout(self, seconds)

    def _arm(self, timer: _ManualTimeout, deadline: float) -> None:
        heapq.heappush(self._deadlines, (deadline, next(self._ids), timer))

    def _fire(self) -> None:
        while self._deadlines and self._deadlines[0][0] <= self._now:
            _, _, timer = heapq.heappop(self._deadlines)
            timer.expire()

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"


class _ManualTimeout:
    """``asyncio.timeout`` on a :class:`ManualClock`: cancels its task when time passes."""

    __slots__ = ("_clock", "_expired", "_seconds", "_task")

    def __init__(self, clock: ManualClock, seconds: float | None) -> None:
        self._clock = clock
        self._seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._expired = False

    async def __aenter__(self) -> None:
        if self._seconds is None:
            return
        self._task = asyncio.current_task()
        if self._seconds <= 0:
            self.expire()
        else:
            self._clock._arm(self, self._clock.now() + self._seconds)

    def expire(self) -> None:
        task = self._task
        if task is not None and not task.done():
            self._expired = True
            task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        task, self._task = self._task, None  # disarmed: a late expiry finds no task
        expired = self._expired and task is not None and task.uncancel() == 0
        if expired and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc
        return False
