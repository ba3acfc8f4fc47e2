"""One injectable monotonic clock for every mechanism.

Limiters, breakers, budgets and caches read time only through a :class:`Clock`, so tests
drive time with :class:`ManualClock` instead of sleeping, and no mechanism ever depends
on the wall clock or the machine's time zone. The wall clock is exposed separately
(:meth:`Clock.wall`) for the one thing that needs it: HTTP dates such as ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time
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


class SystemClock:
    """The real clock: ``time.monotonic`` and ``asyncio.sleep``."""

    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    def sleep_sync(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()
"""The process-wide default clock."""


class ManualClock:
    """A clock that moves only when told to: for tests and simulations.

    ``sleep`` advances the clock by the requested amount and yields once to the event
    loop, so code that backs off runs at full speed while observing the time it asked
    for. ``slept`` records every requested wait for assertions.
    """

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._wall_offset = float(wall_start) - float(start)
        self.slept: list[float] = []

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def advance(self, seconds: float) -> None:
        """Move time forward; negative steps are refused (time is monotonic)."""
        if seconds < 0:
            raise ValueError(f"cannot move a monotonic clock backwards by {seconds}")
        self._now += seconds

    async def sleep(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds
        await asyncio.sleep(0)

    def sleep_sync(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.slept.append(seconds)
        self._now += seconds

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now})"
