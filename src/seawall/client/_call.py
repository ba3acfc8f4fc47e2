"""What the call faces (async and sync callables) share: how a plain call reads to the
client core. A call has no status and no body; an exception that carries an HTTP status
(``httpx.HTTPStatusError``, an SDK's own error with ``status_code``) is judged by it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from seawall.breaker import CircuitOpenError, Outcome, status_of_exception
from seawall.cache.keys import RequestInfo
from seawall.client.core import BulkheadTimeout, ClientCore
from seawall.errors import SeawallError
from seawall.policy.retry import RetryPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.retry import FINAL, Verdict

__all__ = ["CallFaceBase", "Invocation", "default_host", "default_retry_on"]

Invocation = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
"""One call of a guarded callable: the function, its positional and keyword arguments."""


def retry_after_of(exc: BaseException) -> str | bytes | None:
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        return None
    try:
        value = headers.get("retry-after")
    except Exception:
        return None
    return value if isinstance(value, str | bytes) else None


def default_retry_on(exc: BaseException) -> bool:
    """Connection errors and timeouts: the failures worth a second try for any SDK."""
    if isinstance(exc, SeawallError):  # open breaker, local limits: retrying adds nothing
        return False
    return isinstance(exc, ConnectionError | TimeoutError) or (
        type(exc).__module__.startswith("httpx")
        and type(exc).__name__
        in ("ConnectError", "ConnectTimeout", "ReadTimeout", "ReadError", "RemoteProtocolError")
    )


def default_host(fn: Callable[..., Any]) -> str:
    """The breaker and budget key of a callable guarded without ``host=``: its name."""
    module = getattr(fn, "__module__", None) or "call"
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{module}.{name}"


class CallFaceBase:
    """The sans-IO half of the call faces (see :class:`seawall.client.core.Face`)."""

    __slots__ = ("core", "idempotent", "name", "retry_on")

    def __init__(
        self,
        core: ClientCore,
        name: str,
        idempotent: bool,
        retry_on: Callable[[BaseException], bool],
    ) -> None:
        self.core = core
        self.name = name
        self.idempotent = idempotent
        self.retry_on = retry_on

    def host(self, request: Invocation) -> str:
        return self.name

    def method(self, request: Invocation) -> str:
        return "CALL"

    def target(self, request: Invocation) -> str:
        return ""

    def header(self, request: Invocation, name: str) -> str | None:
        return None

    def mark(self, request: Invocation, name: str, value: str) -> None:
        pass  # a call has no headers

    def replayable(self, request: Invocation) -> bool:
        return True  # the arguments can be passed again

    def may_repeat(self, request: Invocation, policy: RetryPolicy) -> bool:
        return self.idempotent

    def status(self, response: object) -> int:
        return 200

    def response_header(self, response: object, name: str) -> str | None:
        return None

    def finished(self, response: object) -> bool:
        return True

    def judge_exception(self, exc: BaseException) -> Verdict:
        status = status_of_exception(exc)
        if status is not None:
            return self.core.judge_status(status, retry_after_of(exc))
        if self.retry_on(exc):
            return Verdict(True, type(exc).__name__)
        return FINAL

    def refused(self, exc: BaseException) -> bool:
        headers = getattr(getattr(exc, "response", None), "headers", None)
        try:
            return headers is not None and headers.get(REFUSED_HEADER) is not None
        except Exception:
            return False

    def breaker_outcome(self, exc: BaseException, policy_outcome: Outcome) -> Outcome:
        return policy_outcome

    def open_error(self, cause: CircuitOpenError, request: Invocation) -> BaseException:
        return cause  # no face types here: seawall's own error as it is

    def no_slot_error(self, host: str, waited: float | None, request: Invocation) -> BaseException:
        return BulkheadTimeout(host, waited)

    def request_info(self, request: Invocation) -> RequestInfo:
        raise TypeError("a call has no HTTP request")

    def response_headers(self, response: object) -> list[tuple[str, str]]:
        return []

    def with_headers(self, request: Invocation, headers: Sequence[tuple[str, str]]) -> Invocation:
        return request

    def is_upstream_failure(self, exc: BaseException) -> bool:
        return False

    def redirect(self, request: Invocation, url: str) -> Invocation:
        raise TypeError("a call has no redirects")
