"""LoadShedMiddleware: pure ASGI face of :class:`seawall.shed.ConcurrencyLimiter`.

Why pure ASGI: a rejection must cost microseconds (no request object, no body read, no
task) and a streamed blob must stay streamed. A shed request gets ``503`` with
``Retry-After``, a problem+json body and ``x-seawall-refused: shed`` so that a fallback
cache outside, and a client, can tell "seawall refused before the app ran" from "the app
failed".

What the limit counts is *work*: a request holds its slot from the moment the app starts
until its ``http.response.start`` (the latency sample is that time to first byte). A 2 GB
layer streamed to a slow runner, or an upload whose client sends slowly, is I/O that says
nothing about server overload and must not hold the places short requests need: while a
body streams (out after the response started, or in while the app reads an upload) the
request holds a *stream* instead, and streams have their own cap (``max_streams``). An
upload's work after its body arrived takes a slot again without queueing (it was admitted
at the door). A request body that stalls ``body_timeout`` seconds gets ``408``.

Build steps: a GET/HEAD that continues a step already admitted (same ``x-seawall-step``,
or without it the same client and repository recently) is ranked as a continuation, so
under a surge new steps are refused at their first request and started ones finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from mypy_extensions import mypyc_attr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seawall.asgi._http import header_map, retry_after_seconds, send_problem
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.lru import remember
from seawall.policy.shed import RequestClass, ShedPolicy
from seawall.protocol import REFUSED_HEADER, STEP_HEADER
from seawall.shed import ConcurrencyLimiter, ConcurrencySlot, Rejection, StepTracker, Waiter

__all__ = ["LoadShedMiddleware", "RequestBodyStalled"]

_REFUSED = (REFUSED_HEADER.encode("latin-1"), b"shed")
"""Response header set on every 503 produced by shedding."""
_STEP = STEP_HEADER.encode("latin-1")
_READS = frozenset({"GET", "HEAD"})
_OCI_REPOSITORY = re.compile(r"^/v2/(.+?)/(?:manifests|blobs|tags)/")


@mypyc_attr(native_class=False)  # an Event: a slotted dataclass, built only for listeners
@dataclass(frozen=True, slots=True, kw_only=True)
class RequestBodyStalled(Event):
    """A request body sent nothing for ``seconds``: the app got a disconnect, the client 408."""

    name: ClassVar[str] = "shed.body_stalled"
    path: str
    seconds: float


@dataclass  # no slots=True: mypyc rejects it (a compiled class's fields are fixed anyway)
class _Request:
    """What admission needs from the request line and headers (read once)."""

    accept: str
    body: int | None  # declared size: 0 without a body, None when streamed with no length
    step: str | None
    tenant: Hashable


def _read(scope: Scope, method: str, tenants: dict[bytes, bytes]) -> _Request:
    """What admission needs, from a map of the headers (a few lookups, not a loop).

    ``tenants`` remembers the digest of recent credentials: a client sends the same token
    for a whole step, and blake2b of a 700-byte token costs a microsecond. It holds the raw
    credentials (at most 1,024 of at most 4 KiB) as long as its middleware lives."""
    headers = header_map(scope)
    if headers is not None:
        accept = headers.get(b"accept")
        step = headers.get(_STEP)
        auth = headers.get(b"authorization")
        chunked = b"transfer-encoding" in headers
        declared = headers.get(b"content-length")
        length: int | None = None
        if declared is not None:
            try:
                length = max(0, int(declared))
            except ValueError:
                chunked = True  # unreadable: treat as a body of unknown size
    else:
        accept, step, auth, chunked, length = _walk(scope.get("headers") or ())
    if length is not None and not chunked:
        body: int | None = length
    elif chunked:
        body = None
    elif scope.get("http_version", "1.1").startswith(("2", "3")) and method not in _READS:
        body = None  # HTTP/2 and 3 may send a body without any length
    else:
        body = 0
    tenant: Hashable
    if auth is not None:  # the credential names the tenant; steps keep only a digest of it
        tenant = tenants.get(auth)
        if tenant is None:
            digest = hashlib.blake2b(auth, digest_size=16).digest()
            tenant = remember(tenants, auth, digest, 1024) if len(auth) <= 4096 else digest
    else:
        client = scope.get("client")
        tenant = client[0] if client else None
    return _Request(
        "" if accept is None else accept.decode("latin-1"),
        body,
        None if step is None else step.decode("latin-1")[:200],
        tenant,
    )


def _walk(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[bytes | None, bytes | None, bytes | None, bool, int | None]:
    """(accept, step, authorization, chunked, length) of a header list whose names repeat:
    the last value of each counts, and any unreadable length or transfer coding makes the
    body's size unknown, as a map of the same list would say when nothing repeats."""
    accept = step = auth = None
    chunked = False
    length: int | None = None
    for key, value in headers:
        if key == b"accept":
            accept = value
        elif key == b"content-length":
            try:
                length = max(0, int(value))
            except ValueError:
                length = None
                chunked = True
        elif key == b"transfer-encoding":
            chunked = True
        elif key == _STEP:
            step = value
        elif key == b"authorization":
            auth = value
    return accept, step, auth, chunked, length


def _repository(path: str, cls: RequestClass | None) -> str | None:
    """The repository a read belongs to: the OCI name, else the class (one index)."""
    m = _OCI_REPOSITORY.match(path)
    if m is not None:
        return "oci:" + m.group(1)
    if cls is not None:
        return "class:" + cls.name
    return None


class LoadShedMiddleware:
    """Admit at most the adaptive limit of working requests; queue; shed under overload."""

    def __init__(
        self,
        app: ASGIApp,
        policy: ShedPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
    ) -> None:
        self.app = app
        self.policy = policy = policy if policy is not None else ShedPolicy()
        self.clock = clock
        self.events = events if events is not None else DEFAULT_BUS
        self.limiter = ConcurrencyLimiter(policy, clock=clock, events=events)
        self.steps = StepTracker(policy.step_idle, policy.step_memory)
        self._shed_responses: dict[tuple[int, str, int, bool], tuple[Message, ...]] = {}
        # class and repository of recent reads (bounded; a registry sees the same paths again)
        self._classes: dict[tuple[str, str, str], tuple[RequestClass | None, str | None]] = {}
        self._tenants: dict[bytes, bytes] = {}  # credential -> its digest (see _read)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method: str = scope.get("method", "GET")
        path: str = scope.get("path", "/")
        request = _read(scope, method, self._tenants)
        policy = self.policy
        cls: RequestClass | None
        repository: str | None = None
        if request.body == 0:  # a read: its class and repository depend on the request line
            memo = (method, path, request.accept)
            known = self._classes.get(memo)
            if known is None:
                cls = policy.classify(method, path, request.accept, 0)
                repository = _repository(path, cls)
                if len(path) < 1024:
                    remember(self._classes, memo, (cls, repository), 4096)
            else:
                cls, repository = known
        else:
            cls = policy.classify(method, path, request.accept, request.body)
        if cls is None:
            priority = policy.default_priority
            stream = False
        elif cls.never_shed:
            await self.app(scope, receive, send)
            return
        else:
            priority = cls.priority
            stream = cls.stream
        step_key: Hashable | None = None
        if method in _READS:
            step = request.step
            if step is not None:
                step_key = (request.tenant, "step", step)
            else:
                if request.body != 0:  # a read with a body: not memoised above
                    repository = _repository(path, cls)
                if repository is not None:
                    step_key = (request.tenant, repository)
        now = self.clock.now()  # one reading for the whole admission
        if (
            step_key is not None
            and priority < policy.continuation_priority
            and self.steps.started(step_key, now)
        ):
            priority = policy.continuation_priority
        first = self.limiter.try_acquire(priority, stream=stream, now=now)
        outcome: ConcurrencySlot | Rejection | None
        if isinstance(first, Waiter):
            outcome, receive = await self._wait(first, receive)
            if outcome is None:
                return  # the client left while queued: the app never runs for it
            now = self.clock.now()
        else:
            outcome = first
        if isinstance(outcome, Rejection):
            await self._reject(send, outcome, head_only=method == "HEAD")
            return
        if step_key is not None:
            self.steps.admitted(step_key, now)
        # the admitted request runs here, not in a helper coroutine: one frame less a request
        run = _Run(self, outcome, send, path, now)
        app_receive = run.watch_body(receive) if request.body != 0 else receive
        try:
            await self.app(scope, app_receive, run.send)
        except Exception:
            if not run.timed_out:
                raise
            # the app saw the disconnect we gave it for a stalled body and failed on it;
            # the client already has its 408, so there is nobody to tell
        finally:
            run.finish()

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
            messages = remember(self._shed_responses, key, tuple(captured), 256)
        for message in messages:
            await send(dict(message))

    async def _wait(
        self, waiter: Waiter, receive: Receive
    ) -> tuple[ConcurrencySlot | Rejection | None, Receive]:
        """Wait for a slot while watching for ``http.disconnect``.

        Returns ``(None, receive)`` when the client left (its place is freed). A request
        message received while watching is kept and replayed to the app; once a message
        says ``more_body`` the watch stops, so the body is never read ahead.
        """
        limiter = self.limiter
        fut = waiter.future()
        kept: deque[Message] = deque()
        watch: asyncio.Future[Message] | None = None
        watching = True
        left = False
        try:
            while not fut.done():
                if watching and watch is None:
                    watch = asyncio.ensure_future(receive())
                waitables: tuple[asyncio.Future[Any], ...] = (
                    (fut, watch) if watch is not None else (fut,)
                )
                await asyncio.wait(
                    waitables,
                    timeout=limiter.wake_in(waiter),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if watch is not None and watch.done():
                    message = watch.result()
                    watch = None
                    if message["type"] == "http.disconnect":
                        left = True
                        break
                    kept.append(message)
                    if message.get("more_body", False):
                        watching = False
                if not fut.done():
                    limiter.expire(waiter)
        except BaseException:
            limiter.cancel(waiter)
            await _stop_watching(watch, kept)
            raise
        if left:
            limiter.cancel(waiter)
            return None, receive
        # only reached when the wait itself ended normally: a slot was handed over
        if await _stop_watching(watch, kept):
            limiter.cancel(waiter)  # gives back the slot it was handed, exactly once
            raise asyncio.CancelledError
        result = fut.result()
        if kept and isinstance(result, ConcurrencySlot):
            if any(m["type"] == "http.disconnect" for m in kept):
                limiter.release(result)
                return None, receive
            return result, _replaying(kept, receive)
        return result, receive


class _Run:
    """One admitted request in the app: which of work or stream it holds, and when.

    Work: from the app's start (or the end of an upload's body) to the response start,
    holding a slot and giving the controller its latency sample. Stream: while a body
    flows, counted against ``max_streams`` only.
    """

    __slots__ = (
        "_answered",
        "_limiter",
        "_mw",
        "_path",
        "_priority",
        "_send",
        "_slot",
        "_streams",
        "_work_started",
        "started",
        "timed_out",
    )

    def __init__(
        self, mw: LoadShedMiddleware, slot: ConcurrencySlot, send: Send, path: str, now: float
    ) -> None:
        self._mw = mw
        self._path = path
        self._priority = slot.priority
        self._limiter = mw.limiter
        self._slot: ConcurrencySlot | None = slot
        self._send = send
        self._work_started = now  # admitted now (after its wait, for a request that queued)
        self._streams = 0  # 0, or 1 while a body (in or out) holds a stream
        self._answered = False  # we sent the 408 ourselves
        self.started = False  # the response started
        self.timed_out = False

    def _end_work(self, *, sample: bool) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            latency = self._mw.clock.now() - self._work_started if sample else None
            self._limiter.release(slot, latency=latency)

    def _open_stream(self) -> None:
        if self._streams == 0:
            self._streams = 1
            self._limiter.open_stream()

    def _close_stream(self) -> None:
        if self._streams:
            self._streams = 0
            self._limiter.close_stream()

    async def send(self, message: Message) -> None:
        if self._answered:
            return  # the client has its 408; the app's late answer goes nowhere
        kind = message["type"]
        if kind == "http.response.start":
            self.started = True
            slot = self._slot  # _end_work(sample=True) and _open_stream(), inlined: hot
            if slot is not None:
                self._slot = None
                now = self._mw.clock.now()
                self._limiter.release(slot, latency=now - self._work_started, now=now)
            if self._streams == 0:
                self._streams = 1
                self._limiter._streams += 1
        elif kind == "http.response.body" and self._streams and not message.get("more_body"):
            self._streams = 0  # _close_stream(), inlined
            self._limiter.close_stream()
        await self._send(message)

    def watch_body(self, receive: Receive) -> Receive:
        """``receive`` for a request with a body: phases, and a 408 when it stalls."""
        mw = self._mw
        clock = mw.clock
        timeout = mw.policy.body_timeout
        complete = False

        async def receive_body() -> Message:
            nonlocal complete
            if complete or self.timed_out:
                return await receive()
            message = await _within(receive(), lambda: clock.sleep(timeout))
            if message is None:
                return await self._stalled(timeout)
            if message["type"] != "http.request":
                return message
            if message.get("more_body", False):
                if self._slot is not None and not self.started:
                    self._end_work(sample=False)  # the body streams in: I/O, not work
                    self._open_stream()
            else:
                complete = True
                if self._slot is None and not self.started:
                    self._close_stream()  # the body is in: what follows is work again
                    slot = self._limiter.acquire_now(self._priority)
                    self._slot = slot
                    self._work_started = slot.started
            return message

        return receive_body

    async def _stalled(self, seconds: float) -> Message:
        self.timed_out = True
        mw = self._mw
        if mw.events.active:
            mw.events.emit(RequestBodyStalled(at=mw.clock.now(), path=self._path, seconds=seconds))
        if not self.started:
            self.started = True
            self._end_work(sample=False)
            self._close_stream()
            await send_problem(
                self._send,
                408,
                "Request Timeout",
                f"The request body sent nothing for {seconds:g} s.",
                headers=((b"connection", b"close"),),
            )
            self._answered = True
        return {"type": "http.disconnect"}

    def finish(self) -> None:
        if self._slot is not None:  # an answered request has given back both already
            self._end_work(sample=False)
        if self._streams:
            self._close_stream()


async def _within(
    receiving: Awaitable[Message], timer: Callable[[], Awaitable[None]]
) -> Message | None:
    """The message, or None when ``timer`` ends first (a stalled body).

    A message that is already there (the usual case) costs one loop turn and no timer.
    """
    got = asyncio.ensure_future(receiving)
    try:
        await asyncio.sleep(0)
    except BaseException:
        got.cancel()
        raise
    if got.done():
        return got.result()
    clock = asyncio.ensure_future(timer())
    try:
        await asyncio.wait((got, clock), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        got.cancel()
        clock.cancel()
        raise
    clock.cancel()
    if got.done():
        return got.result()
    got.cancel()
    return None


async def _stop_watching(watch: asyncio.Future[Message] | None, kept: deque[Message]) -> bool:
    """Keep what the watch received, or cancel it and let it wind down.

    True when the request itself was cancelled while the watch wound down. Called after
    the ``try`` and from its ``except``, never from a ``finally:``: compiled by mypyc
    2.4.1, the ``await`` below in a ``finally:`` let a caught CancelledError escape a
    normal return (docs/design.md).
    """
    if watch is None:
        return False
    if watch.done():
        if not watch.cancelled() and watch.exception() is None:
            kept.append(watch.result())
        return False
    watch.cancel()
    try:
        await watch
    except asyncio.CancelledError:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0
    except Exception:  # the server's receive failed; the app will see it
        pass
    return False


def _replaying(kept: deque[Message], receive: Receive) -> Receive:
    """A ``receive`` that first returns the messages read while the request was queued."""

    async def replay() -> Message:
        if kept:
            return kept.popleft()
        return await receive()

    return replay
