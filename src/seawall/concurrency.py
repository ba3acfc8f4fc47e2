"""The colour boundary: the few primitives that differ between async and sync code.

seawall writes its I/O code once, as async (``seawall/*/_async/``), and generates the sync
twin with unasync (``scripts/generate_sync.py``; ``make test`` checks the copy is current).
unasync renames ``Async*`` names to ``Sync*``, so each primitive here exists in both
colours under those two names. This module is the only hand-kept pair, and each half
is a few lines: locks, events, semaphores with a timeout, an attempt deadline on the
injected clock, running blocking work off the event loop, and background work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import Any, TypeVar

from seawall.clock import Clock

__all__ = [
    "ASYNC_DEADLINES_CANCEL",
    "SYNC_DEADLINES_CANCEL",
    "AsyncEvent",
    "AsyncLock",
    "AsyncSemaphore",
    "AsyncTasks",
    "SyncEvent",
    "SyncLock",
    "SyncSemaphore",
    "SyncTasks",
    "async_deadline",
    "async_offload",
    "sync_deadline",
    "sync_offload",
]

T = TypeVar("T")


class AsyncLock:
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()


class SyncLock:
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class AsyncEvent:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


class SyncEvent:
    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def wait(self) -> None:
        self._event.wait()


class AsyncSemaphore:
    """A bulkhead: ``acquire`` waits at most ``timeout`` seconds (None: for ever)."""

    __slots__ = ("_sem", "in_use")

    def __init__(self, value: int) -> None:
        self._sem = asyncio.Semaphore(value)
        self.in_use = 0  # slots taken (a bulkhead in use is never forgotten)

    async def acquire(self, timeout: float | None, clock: Clock) -> bool:
        """True once a slot is taken; False after ``timeout`` s of ``clock`` without one."""
        try:
            async with clock.timeout(timeout):
                await self._sem.acquire()
        except TimeoutError:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self._sem.release()


class SyncSemaphore:
    __slots__ = ("_count", "_sem", "in_use")

    def __init__(self, value: int) -> None:
        self._sem = threading.BoundedSemaphore(value)
        self._count = threading.Lock()
        self.in_use = 0

    def acquire(self, timeout: float | None, clock: Clock) -> bool:
        """A thread waits on the real clock: ``clock`` cannot interrupt it."""
        if not self._sem.acquire(timeout=timeout):
            return False
        with self._count:
            self.in_use += 1
        return True

    def release(self) -> None:
        with self._count:
            self.in_use -= 1
        self._sem.release()


ASYNC_DEADLINES_CANCEL = True
"""An async attempt is cancelled when its deadline passes (:func:`async_deadline`)."""

SYNC_DEADLINES_CANCEL = False
"""A sync attempt cannot be cancelled from outside: a sync face passes the time left to
its HTTP library's own timeouts instead."""


def async_deadline(clock: Clock, seconds: float | None) -> AbstractAsyncContextManager[object]:
    """Cancel the block after ``seconds`` of the injected clock (raises ``TimeoutError``)."""
    return clock.timeout(seconds)


def sync_deadline(clock: Clock, seconds: float | None) -> AbstractContextManager[object]:
    """Bounds nothing by itself (see :data:`SYNC_DEADLINES_CANCEL`)."""
    return contextlib.nullcontext()


async def async_offload(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn`` in a worker thread when it may block (disk), else right here."""
    if blocking:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def sync_offload(blocking: bool, fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class AsyncTasks:
    """Background work owned by the object that starts it and cancelled by its ``aclose``."""

    __slots__ = ("_tasks",)
    background = True

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(
        self,
        work: Callable[[], Coroutine[Any, Any, None]],
        done: Callable[[], None] | None = None,
    ) -> None:
        """Run ``work`` in a task; ``done`` runs when it ends, even when it was cancelled
        before its first step (when a ``finally`` inside it never runs)."""
        task = asyncio.get_running_loop().create_task(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if done is not None:
            task.add_done_callback(lambda _task: done())

    async def join(self) -> None:
        """Wait for the work started so far (tests, and a graceful shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


class SyncTasks:
    """A sync caller has no loop to work in the background: the work runs now, inline
    (``background`` False: a caller that can wait for it does the work itself)."""

    __slots__ = ()
    background = False

    def start(self, work: Callable[[], None], done: Callable[[], None] | None = None) -> None:
        try:
            with contextlib.suppress(Exception):
                work()
        finally:
            if done is not None:
                done()

    def join(self) -> None:
        pass

    def close(self) -> None:
        pass
