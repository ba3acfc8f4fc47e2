"""Pure-ASGI rate limiting: 429 with Retry-After and the IETF RateLimit fields.

Add it in one line::

    app.add_middleware(RateLimitMiddleware, policy=RateLimitPolicy(limit="100/minute"))

A refused request gets ``429``, ``Retry-After`` (whole seconds, rounded up, at least 1),
``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers, structured
fields such as ``"default";q=100;w=60`` and ``"default";r=0;t=30``) and a small RFC 9457
problem document. Admitted responses get the two RateLimit fields added to their
``http.response.start`` message, with the body passed through untouched and unbuffered.
When the counter storage fails and the policy fails closed the answer is ``503`` with
``Retry-After``; failing open, requests are decided by in-process limits; no storage error
ever reaches the app or becomes a 500. On lifespan shutdown the middleware closes its
storage's connections, after the app's own shutdown ran.
"""

from __future__ import annotations

from collections.abc import Callable
from math import ceil
from typing import Any

from limits.aio.storage import Storage
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seawall.asgi._http import retry_after_seconds, send_problem
from seawall.clock import SYSTEM_CLOCK, Clock
from seawall.events import EventBus
from seawall.policy.ratelimit import RateLimitPolicy
from seawall.protocol import REFUSED_HEADER
from seawall.ratelimit import Decision, RateLimiter
from seawall.ratelimit_keys import KeyFunc, make_key_func
from seawall.redis_storage import RedisLimitStorage

__all__ = ["RateLimitMiddleware"]

_RETRY_AFTER = b"retry-after"
_RATELIMIT = b"ratelimit"
_RATELIMIT_POLICY = b"ratelimit-policy"
_REFUSED = (REFUSED_HEADER.encode("latin-1"), b"rate-limit")  # the app never ran


class RateLimitMiddleware:
    """Per-key rate limiting in front of any ASGI app (see docs/ratelimit.md).

    ``key_func`` (``scope -> str | None``) overrides the key of the main limit; a None
    result falls back to the client address. ``storage`` injects a ready ``limits.aio``
    storage (tests, shared storages) instead of building one from ``policy.storage``.
    """

    def __init__(
        self,
        app: ASGIApp,
        policy: RateLimitPolicy | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: EventBus | None = None,
        key_func: Callable[[Scope], str | None] | None = None,
        storage: Storage | RedisLimitStorage | None = None,
    ) -> None:
        self.app = app
        self.policy = policy = policy if policy is not None else RateLimitPolicy()
        self.limiter = RateLimiter(policy, storage=storage, clock=clock, events=events)
        opts: dict[str, Any] = {
            "trusted_proxies": policy.trusted_proxies,
            "trusted_proxy_hops": policy.trusted_proxy_hops,
            "proxy_header": policy.proxy_header,
            "ipv6_prefix": policy.ipv6_prefix,
        }
        funcs: list[KeyFunc] = [make_key_func(rule.key, **opts) for rule in self.limiter.rules]
        if key_func is not None:
            funcs[0] = make_key_func(key_func, **opts)
        self._key_funcs = tuple(funcs)
        self._single_key = funcs[0] if len(funcs) == 1 else None
        self._cost = policy.cost_of()
        self._exempt = frozenset(p for p in policy.exempt_paths if not p.endswith("*"))
        self._exempt_prefixes = tuple(p[:-1] for p in policy.exempt_paths if p.endswith("*"))
        self._emit_headers = policy.emit_headers
        self._sync = self.limiter.decides_without_io
        self._hit_now = self.limiter.hit_now
        policy_value = ", ".join(
            f'"{e.label}";q={e.amount};w={e.expiry}' for e in self.limiter.entries
        )
        self._policy_header = (_RATELIMIT_POLICY, policy_value.encode("ascii"))
        self._closed_retry_after = str(retry_after_seconds(policy.closed_retry_after)).encode()
        # One pre-encoded prefix per entry label: b'"default";r='
        self._rl_prefix = {e.label: f'"{e.label}";r='.encode() for e in self.limiter.entries}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if path in self._exempt or (
            self._exempt_prefixes and path.startswith(self._exempt_prefixes)
        ):
            await self.app(scope, receive, send)
            return
        single = self._single_key
        keys = (single(scope),) if single is not None else tuple(f(scope) for f in self._key_funcs)
        if self._sync:
            decision = self._hit_now(keys, self._cost(path))
        else:
            decision = await self.limiter.hit(keys, self._cost(path))
        if not decision.admitted:
            await self._refuse(scope, send, decision)
            return
        if not self._emit_headers or not decision.known:
            await self.app(scope, receive, send)
            return
        extra = (self._policy_header, (_RATELIMIT, self._ratelimit_value(decision)))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # A new dict and list: the app may reuse its own header list across responses.
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan through; close the storage once the app has shut down."""

        async def send_then_close(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, receive, send_then_close)

    async def aclose(self) -> None:
        """Close the storage's connections (lifespan shutdown does it; idempotent)."""
        await self.limiter.aclose()

    def _ratelimit_value(self, d: Decision) -> bytes:
        # ``t`` is delta-seconds: rounded up so a client never retries too early.
        return self._rl_prefix[d.rule] + b"%d;t=%d" % (d.remaining, ceil(d.reset_after))

    async def _refuse(self, scope: Scope, send: Send, d: Decision) -> None:
        head = scope.get("method") == "HEAD"
        if d.storage_failed and not d.known:  # failing closed; a local refusal is a 429
            await send_problem(
                send,
                503,
                "Service Unavailable",
                "The rate-limit store is unavailable; retry later.",
                headers=[(_RETRY_AFTER, self._closed_retry_after), _REFUSED],
                head_only=head,
            )
            return
        wait = retry_after_seconds(d.retry_after)
        headers = [
            (_RETRY_AFTER, str(wait).encode()),
            self._policy_header,
            (_RATELIMIT, self._rl_prefix[d.rule] + b"0;t=%d" % wait),
            _REFUSED,
        ]
        await send_problem(
            send,
            429,
            "Too Many Requests",
            f"Rate limit '{d.rule}' ({d.limit} per {d.window}s) exceeded; retry in {wait}s.",
            headers=headers,
            extra={"policy": d.rule, "retry_after": wait},
            head_only=head,
        )
