"""A ``requests`` adapter with the seawall client pipeline.

``session.mount("https://", ResilientAdapter())`` is all a requests-based registry client
(oras-py, python-dxf, pypi-simple) needs. The pipeline and decisions are the ones of the
httpx transports (:mod:`seawall.client._pipeline`); urllib3's own retries stay off
(``max_retries=0``) so that retries are counted once, against seawall's budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response

from seawall.breaker import BreakerRegistry, CircuitOpenError
from seawall.client._pipeline import Admission, ClientCore, CoreAccess, FaceHooks
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.policy.retry import ClientPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.retry import FINAL, RetryBudget, Verdict

__all__ = ["CircuitOpenRequestsError", "ResilientAdapter"]

_RETRYABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,  # includes ConnectTimeout
    requests.exceptions.ReadTimeout,
    requests.exceptions.ChunkedEncodingError,
)
_NOT_RETRYABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.SSLError,  # a bad certificate stays bad
    requests.exceptions.ProxyError,
)


class CircuitOpenRequestsError(requests.exceptions.ConnectionError, CircuitOpenError):
    """The host's breaker is open: a ``requests.ConnectionError`` that is also seawall's
    :class:`~seawall.breaker.CircuitOpenError` (host, ``retry_in``)."""

    def __init__(self, cause: CircuitOpenError, request: PreparedRequest) -> None:
        requests.exceptions.ConnectionError.__init__(self, str(cause), request=request)
        self.__dict__.update(vars(cause))


def _judge_exception(exc: BaseException) -> Verdict:
    if isinstance(exc, _RETRYABLE) and not isinstance(exc, _NOT_RETRYABLE):
        return Verdict(True, type(exc).__name__)
    return FINAL


def _replayable(body: object) -> bool:
    return body is None or isinstance(body, bytes | str | bytearray)


def _host(url: str | None) -> str:
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


class ResilientAdapter(CoreAccess, HTTPAdapter):
    """``HTTPAdapter`` with budgeted retries, a per-host breaker, and optional limits."""

    def __init__(
        self,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        breakers: BreakerRegistry | None = None,
        budgets: RetryBudget | None = None,
        **adapter_kwargs: Any,
    ) -> None:
        adapter_kwargs.setdefault("max_retries", 0)
        super().__init__(**adapter_kwargs)
        self._core = ClientCore(
            policy, clock=clock, events=events, breakers=breakers, budgets=budgets
        )

    @property
    def policy(self) -> ClientPolicy:
        return self._core.policy

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float | None, float | None] | None = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        core = self._core
        host = _host(request.url)
        deadline_at = core.start(host)
        allowed = _replayable(request.body) and core.may_retry(
            request.method or "GET", request.headers
        )

        def attempt() -> Response:
            return self._attempt(request, host, deadline_at, stream, timeout, verify, cert, proxies)

        first: Response | BaseException
        try:
            first = attempt()
        except Exception as exc:
            if not allowed or not _judge_exception(exc).retryable:
                raise
            first = exc
        else:
            if not allowed or not self._judge_response(first).retryable:
                return first
        call = core.retry_call(host, deadline_at, self._judge_response, _judge_exception)
        return call.resume_sync(first, attempt, Response.close)

    def _judge_response(self, response: Response) -> Verdict:
        return self._core.judge_response(response.status_code, response.headers)

    def _attempt(
        self,
        request: PreparedRequest,
        host: str,
        deadline_at: float,
        stream: bool,
        timeout: float | tuple[float | None, float | None] | None,
        verify: bool | str,
        cert: Any,
        proxies: Mapping[str, str] | None,
    ) -> Response:
        with Admission(self._core, host, deadline_at, request, _HOOKS) as admission:
            limit = admission.wait_sync()
            response = super().send(
                request,
                stream,
                _cap(timeout, limit),  # type: ignore[arg-type]
                verify,
                cert,
                proxies,
            )
            admission.succeeded(response.status_code, shed=REFUSED_HEADER in response.headers)
        return response  # requests: the bulkhead covered the time to the headers


def _no_slot(
    host: str, limit: float | None, request: PreparedRequest
) -> requests.exceptions.ConnectTimeout:
    """A full bulkhead, as requests reports a connection not made in time (breaker: NEUTRAL)."""
    return requests.exceptions.ConnectTimeout(
        f"no free slot for {host} (max_concurrency) within {limit}s", request=request
    )


_HOOKS = FaceHooks(CircuitOpenRequestsError, _no_slot)


def _cap(
    timeout: float | tuple[float | None, float | None] | None, limit: float | None
) -> float | tuple[float | None, float | None] | None:
    if limit is None:
        return timeout
    if timeout is None:
        return limit
    if isinstance(timeout, tuple):
        connect, read = timeout
        return (
            limit if connect is None else min(connect, limit),
            limit if read is None else min(read, limit),
        )
    if isinstance(timeout, int | float):
        return min(timeout, limit)
    return timeout  # a urllib3 Timeout object: the caller's own, left as given
