"""What the httpx faces share whatever their colour: how httpx requests, answers and
errors read to the client core, and the error an open breaker raises."""

from __future__ import annotations

import math
from collections.abc import Sequence

import httpx

from seawall.breaker import CircuitOpenError, Outcome
from seawall.cache.keys import RequestInfo, is_credential_header
from seawall.client.core import RateLimitWaitTooLong, http_may_repeat
from seawall.errors import PolicyError, SeawallError
from seawall.policy.retry import RetryPolicy
from seawall.retry import FINAL, Verdict

__all__ = ["CircuitOpenTransportError", "HttpxFaceBase"]

# Errors after which the same idempotent request may well succeed on another attempt.
# PoolTimeout is local (our own pool or bulkhead is full): retrying adds load, not luck.
_RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
_LOCAL_ERRORS: tuple[type[BaseException], ...] = (httpx.PoolTimeout, RateLimitWaitTooLong)


class CircuitOpenTransportError(httpx.TransportError, CircuitOpenError):
    """The host's breaker is open: an ``httpx.TransportError`` (what httpx users catch)
    that is also seawall's :class:`~seawall.breaker.CircuitOpenError` (host, retry_in)."""

    def __init__(self, cause: CircuitOpenError, request: httpx.Request) -> None:
        Exception.__init__(self, str(cause))  # httpx's __init__ chain would reach cause's
        self._request = request
        self.__dict__.update(vars(cause))  # name, retry_at, retry_in, state, reopen_time


def _latin1(raw: Sequence[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]


class HttpxFaceBase:
    """The sans-IO half of the httpx faces (see :class:`seawall.client.core.Face`)."""

    __slots__ = ()

    def host(self, request: httpx.Request) -> str:
        return request.url.netloc.decode("ascii", "replace")

    def method(self, request: httpx.Request) -> str:
        return request.method

    def target(self, request: httpx.Request) -> bytes:
        return request.url.raw_path

    def header(self, request: httpx.Request, name: str) -> str | None:
        value: str | None = request.headers.get(name)
        return value

    def mark(self, request: httpx.Request, name: str, value: str) -> None:
        request.headers[name] = value

    def replayable(self, request: httpx.Request) -> bool:
        return isinstance(request.stream, httpx.ByteStream)

    def may_repeat(self, request: httpx.Request, policy: RetryPolicy) -> bool:
        return http_may_repeat(
            request.method, request.headers.get(policy.idempotency_header), policy
        )

    def status(self, response: httpx.Response) -> int:
        return response.status_code

    def response_header(self, response: httpx.Response, name: str) -> str | None:
        value: str | None = response.headers.get(name)
        return value

    def finished(self, response: httpx.Response) -> bool:
        return response.is_closed

    def judge_exception(self, exc: BaseException) -> Verdict:
        if isinstance(exc, _RETRYABLE_ERRORS):
            return Verdict(True, type(exc).__name__)
        return FINAL

    def refused(self, exc: BaseException) -> bool:
        return False  # a transport's refusals are answers, never errors

    def breaker_outcome(self, exc: BaseException, policy_outcome: Outcome) -> Outcome:
        if isinstance(exc, _LOCAL_ERRORS) or not isinstance(exc, Exception):
            return Outcome.NEUTRAL
        if isinstance(exc, httpx.TimeoutException | httpx.NetworkError | httpx.RemoteProtocolError):
            return Outcome.FAILURE
        return policy_outcome

    def open_error(self, cause: CircuitOpenError, request: httpx.Request) -> BaseException:
        return CircuitOpenTransportError(cause, request)

    def no_slot_error(
        self, host: str, waited: float | None, request: httpx.Request
    ) -> BaseException:
        """A full bulkhead, as httpx reports its own full pool: local, not retried."""
        return httpx.PoolTimeout(
            f"no free slot for {host} (max_concurrency) within {waited}s", request=request
        )

    def request_info(self, request: httpx.Request) -> RequestInfo:
        return RequestInfo(request.method, str(request.url), _latin1(request.headers.raw))

    def response_headers(self, response: httpx.Response) -> list[tuple[str, str]]:
        return _latin1(response.headers.raw)

    def with_headers(
        self, request: httpx.Request, headers: Sequence[tuple[str, str]]
    ) -> httpx.Request:
        copy = request.headers.copy()
        for name, value in headers:
            copy[name] = value
        return httpx.Request(
            request.method,
            request.url,
            headers=copy,
            stream=request.stream,
            extensions=request.extensions,
        )

    def redirect(self, request: httpx.Request, url: str) -> httpx.Request:
        target = httpx.URL(url)
        same_origin = (target.scheme, target.host, target.port) == (
            request.url.scheme,
            request.url.host,
            request.url.port,
        )
        headers = [
            (k, v)
            for k, v in request.headers.multi_items()
            if k.lower() != "host" and (same_origin or not is_credential_header(k.lower()))
        ]
        return httpx.Request("GET", target, headers=headers, extensions=request.extensions)

    def is_upstream_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, httpx.TransportError):
            return True
        return isinstance(exc, SeawallError) and not isinstance(exc, PolicyError)

    @staticmethod
    def cap_timeouts(request: httpx.Request, timeout: float | None) -> None:
        """Bound httpx's own timeouts by the attempt's (the only bound a sync face has)."""
        if timeout is None:
            return
        current = request.extensions.get("timeout") or {}
        capped = {}
        for k in ("connect", "read", "write", "pool"):
            v = current.get(k)
            capped[k] = timeout if v is None or not math.isfinite(v) else min(v, timeout)
        request.extensions["timeout"] = capped
