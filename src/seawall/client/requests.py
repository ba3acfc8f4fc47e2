"""A ``requests`` adapter with the seawall client pipeline, fallback cache included.

``session.mount("https://", ResilientAdapter())`` is all a requests-based registry client
(oras-py, pypi-simple, python-dxf through its session) needs;
``ResilientAdapter(cache=FallbackCache(...))`` adds the fallback cache. The pipeline and
every decision are the ones of the httpx transports (:mod:`seawall.client.core`, driven by
the generated sync pipeline); urllib3's own retries stay off (``max_retries=0``) so that
retries are counted once, against seawall's budget. Bodies stream: the adapter hands
requests a urllib3 response that reads (and records, and releases the bulkhead slot)
as the caller reads.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

try:
    import requests
    from requests.adapters import HTTPAdapter
    from requests.models import PreparedRequest, Response
    from urllib3 import HTTPResponse
    from urllib3._collections import HTTPHeaderDict
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "seawall.client.requests needs the requests package: pip install 'seawall[requests]'"
    ) from exc

from seawall.breaker import BreakerRegistry, CircuitOpenError, Outcome
from seawall.cache.fallback import FallbackCache
from seawall.cache.keys import RequestInfo, is_credential_header
from seawall.client._sync.pipeline import SyncBody, SyncPipeline
from seawall.client.core import ClientCore, CoreAccess, http_may_repeat
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.errors import PolicyError, SeawallError
from seawall.events import EventBus
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.retry import FINAL, RetryBudget, Verdict

__all__ = ["CircuitOpenRequestsError", "ResilientAdapter"]

Timeout = float | tuple[float | None, float | None] | None

_RETRYABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,  # includes ConnectTimeout
    requests.exceptions.ReadTimeout,
    requests.exceptions.ChunkedEncodingError,
)
_NOT_RETRYABLE: tuple[type[BaseException], ...] = (
    requests.exceptions.SSLError,  # a bad certificate stays bad
    requests.exceptions.ProxyError,
)
_CHUNK = 64 * 1024


class CircuitOpenRequestsError(requests.exceptions.ConnectionError, CircuitOpenError):
    """The host's breaker is open: a ``requests.ConnectionError`` that is also seawall's
    :class:`~seawall.breaker.CircuitOpenError` (host, ``retry_in``)."""

    def __init__(self, cause: CircuitOpenError, request: PreparedRequest) -> None:
        requests.exceptions.ConnectionError.__init__(self, str(cause), request=request)
        self.__dict__.update(vars(cause))


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A prepared request with the arguments ``Session.send`` gave the adapter."""

    request: PreparedRequest
    timeout: Timeout
    verify: bool | str
    cert: Any
    proxies: Mapping[str, str] | None


class _RawBody:
    """The unread body of a urllib3 response, as the pipeline moves bodies: raw chunks."""

    __slots__ = ("_raw",)

    def __init__(self, raw: HTTPResponse) -> None:
        self._raw = raw

    def __iter__(self) -> Iterator[bytes]:
        yield from self._raw.stream(_CHUNK, decode_content=False)

    def close(self) -> None:
        self._raw.close()  # a no-op once read to the end: urllib3 released the connection
        self._raw.release_conn()


class _BodyReader(io.RawIOBase):
    """A pipeline body as the file object a urllib3 response reads from."""

    def __init__(self, body: SyncBody) -> None:
        self._body: SyncBody | None = body
        self._chunks: Iterator[bytes] | None = None
        self._left = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._left:
            if self._body is None:
                return 0
            if self._chunks is None:
                self._chunks = iter(self._body)
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._left = chunk
        n = min(len(view), len(self._left))
        view[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            body.close()
        super().close()


def _raw_response(
    status: int,
    headers: Sequence[tuple[str, str]],
    body: SyncBody,
    method: str | None,
    url: str | None,
    reason: str | None = None,
) -> HTTPResponse:
    kept = HTTPHeaderDict()
    for name, value in headers:
        if name.lower() != "transfer-encoding":  # the body is already de-chunked
            kept.add(name, value)
    return HTTPResponse(
        body=_BodyReader(body),
        headers=kept,
        status=status,
        reason=reason,
        preload_content=False,
        decode_content=True,
        request_method=method,
        request_url=url,
    )


def _host(url: str | None) -> str:
    parts = urlsplit(url or "")
    host = parts.hostname or ""
    return f"{host}:{parts.port}" if parts.port else host


class _RequestsFace:
    """requests to the client pipeline (see :class:`seawall.client.core.Face`)."""

    __slots__ = ("_adapter",)

    def __init__(self, adapter: ResilientAdapter) -> None:
        self._adapter = adapter

    # -- reading requests, answers and errors (no I/O)

    def host(self, request: _Outgoing) -> str:
        return _host(request.request.url)

    def method(self, request: _Outgoing) -> str:
        return (request.request.method or "GET").upper()

    def target(self, request: _Outgoing) -> str:
        return request.request.path_url

    def header(self, request: _Outgoing, name: str) -> str | None:
        value = request.request.headers.get(name)
        return value if isinstance(value, str) else None

    def mark(self, request: _Outgoing, name: str, value: str) -> None:
        request.request.headers[name] = value

    def replayable(self, request: _Outgoing) -> bool:
        body = request.request.body
        return body is None or isinstance(body, bytes | str | bytearray)

    def may_repeat(self, request: _Outgoing, policy: RetryPolicy) -> bool:
        key = self.header(request, policy.idempotency_header)
        return http_may_repeat(self.method(request), key, policy)

    def status(self, response: Response) -> int:
        return int(response.status_code)

    def response_header(self, response: Response, name: str) -> str | None:
        value = response.headers.get(name)
        return value if isinstance(value, str) else None

    def finished(self, response: Response) -> bool:
        return False  # the adapter never reads a body; requests or the caller will

    def judge_exception(self, exc: BaseException) -> Verdict:
        if isinstance(exc, _RETRYABLE) and not isinstance(exc, _NOT_RETRYABLE):
            return Verdict(True, type(exc).__name__)
        return FINAL

    def refused(self, exc: BaseException) -> bool:
        return False  # an adapter's refusals are answers, never errors

    def breaker_outcome(self, exc: BaseException, policy_outcome: Outcome) -> Outcome:
        return policy_outcome

    def open_error(self, cause: CircuitOpenError, request: _Outgoing) -> BaseException:
        return CircuitOpenRequestsError(cause, request.request)

    def no_slot_error(self, host: str, waited: float | None, request: _Outgoing) -> BaseException:
        """A full bulkhead, as requests reports a connection not made in time (local)."""
        return requests.exceptions.ConnectTimeout(
            f"no free slot for {host} (max_concurrency) within {waited}s",
            request=request.request,
        )

    def request_info(self, request: _Outgoing) -> RequestInfo:
        prepared = request.request
        headers = [(str(k).lower(), str(v)) for k, v in prepared.headers.items()]
        return RequestInfo(self.method(request), prepared.url or "", headers)

    def response_headers(self, response: Response) -> list[tuple[str, str]]:
        raw = response.raw
        items = raw.headers.items() if raw is not None else response.headers.items()
        return [(str(k).lower(), str(v)) for k, v in items]

    def with_headers(self, request: _Outgoing, headers: Sequence[tuple[str, str]]) -> _Outgoing:
        copy = request.request.copy()
        for name, value in headers:
            copy.headers[name] = value
        return replace(request, request=copy)

    def redirect(self, request: _Outgoing, url: str) -> _Outgoing:
        old = urlsplit(request.request.url or "")
        new = urlsplit(url)
        same_origin = (old.scheme, old.hostname, old.port) == (new.scheme, new.hostname, new.port)
        copy = request.request.copy()
        copy.method = "GET"
        copy.body = None
        copy.prepare_url(url, None)
        for name in list(copy.headers):
            low = name.lower()
            if low in ("host", "content-length", "content-type") or (
                not same_origin and is_credential_header(low)
            ):
                del copy.headers[name]
        return replace(request, request=copy)

    def is_upstream_failure(self, exc: BaseException) -> bool:
        if isinstance(exc, requests.exceptions.RequestException):
            return not isinstance(exc, (*_NOT_RETRYABLE, requests.exceptions.InvalidURL))
        return isinstance(exc, SeawallError) and not isinstance(exc, PolicyError)

    # -- I/O (sync)

    def send(self, request: _Outgoing, timeout: float | None) -> Response:
        return HTTPAdapter.send(
            self._adapter,
            request.request,
            stream=True,
            timeout=_cap(request.timeout, timeout),  # type: ignore[arg-type]
            verify=request.verify,
            cert=request.cert,
            proxies=dict(request.proxies) if request.proxies is not None else None,
        )

    def close(self, response: Response) -> None:
        response.close()

    def body(self, response: Response) -> SyncBody:
        return _RawBody(response.raw)

    def replace_body(self, response: Response, body: SyncBody) -> Response:
        old = response.raw
        response.raw = _raw_response(
            response.status_code,
            list(old.headers.items()),
            body,
            self.method_of(response),
            response.url,
            old.reason,
        )
        return response

    def build(
        self,
        request: _Outgoing,
        status: int,
        headers: Sequence[tuple[str, str]],
        body: SyncBody,
    ) -> Response:
        prepared = request.request
        raw = _raw_response(status, headers, body, prepared.method, prepared.url)
        return self._adapter.build_response(prepared, raw)

    @staticmethod
    def method_of(response: Response) -> str | None:
        return response.request.method if response.request is not None else None


class ResilientAdapter(CoreAccess, HTTPAdapter):
    """``HTTPAdapter`` with budgeted retries, a per-host breaker, optional limits and an
    optional fallback cache (``cache=FallbackCache(...)``)."""

    def __init__(
        self,
        policy: ClientPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        breakers: BreakerRegistry | None = None,
        budgets: RetryBudget | None = None,
        cache: FallbackCache | None = None,
        **adapter_kwargs: Any,
    ) -> None:
        adapter_kwargs.setdefault("max_retries", 0)
        super().__init__(**adapter_kwargs)
        self._core = ClientCore(
            policy, clock=clock, events=events, breakers=breakers, budgets=budgets
        )
        self.cache = cache
        self._pipeline: SyncPipeline[_Outgoing, Response] = SyncPipeline(
            self._core, _RequestsFace(self), cache
        )

    def send(
        self,
        request: PreparedRequest,
        stream: bool = False,
        timeout: Timeout = None,
        verify: bool | str = True,
        cert: Any = None,
        proxies: Mapping[str, str] | None = None,
    ) -> Response:
        return self._pipeline.handle(_Outgoing(request, timeout, verify, cert, proxies))

    def close(self) -> None:
        self._pipeline.close()
        super().close()


def _cap(timeout: Timeout, limit: float | None) -> Timeout:
    """The caller's timeout, never beyond the attempt's (a urllib3 Timeout is left as is)."""
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
