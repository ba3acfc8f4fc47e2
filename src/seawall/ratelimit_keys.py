"""Rate-limit client keys from an ASGI scope (who is this request?), safe against hostile input.

Three rules keep keys trustworthy and cheap:

* The client address comes from the socket peer. ``X-Forwarded-For`` / ``Forwarded`` are
  read only when that peer is one of the configured trusted proxies (addresses or CIDRs,
  like uvicorn's ``forwarded_allow_ips`` and nginx's ``set_real_ip_from``; default none:
  a spoofed header changes nothing, and a client that reaches the app directly is keyed
  by its own address whatever it writes). Through a trusted peer the header is read from
  the right, skipping entries that are trusted proxies themselves (nginx's
  ``real_ip_recursive``), or, with ``trusted_proxy_hops=N``, the N-th entry from the right;
  anything the client wrote to the left of it is ignored. A short or malformed header
  falls back to the peer address.
* Every key is namespaced by its kind (``ip:``, ``h:``, ``fn:``, ``*``), so a tenant
  called ``ip:10.0.0.1`` cannot share a counter with that address.
* Keys are bounded: values that are long or hold anything outside a safe character set
  are replaced by a hash, so a 1 MB header costs one hash, not a 1 MB storage key.

Nothing here raises on request data: malformed, empty, huge or non-UTF-8 headers all
produce a key.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import Any

from starlette.types import Scope

from seawall.lru import remember

__all__ = ["KeyFunc", "ProxyTrust", "bounded", "client_address", "make_key_func"]

log = logging.getLogger("seawall.ratelimit_keys")

KeyFunc = Callable[[Scope], str]

MAX_KEY_VALUE = 64
"""Longest key value kept verbatim; longer values are hashed."""

MAX_HEADER_SCAN = 8192
"""Only the rightmost this-many bytes of a forwarding header are ever parsed."""

_SAFE = re.compile(r"^[A-Za-z0-9_.:@+=~-]{1,64}$")
_NO_CLIENT = "ip:unknown"

# Possessive quantifiers: no backtracking, whatever quotes and commas a client sends.
_FORWARDED_ELEMENT = re.compile(r'(?:[^,"]++|"(?:[^"\\]++|\\.)*+"?)++')

_ip_cache: dict[str, str] = {}
_IP_CACHE_MAX = 4096


def bounded(kind: str, value: str | bytes) -> str:
    """``kind:value`` when value is short and safe, else ``kind#<hash>`` (no collisions).

    The safe character set has no ``#`` and no ``/``, so a verbatim value can never look
    like a hashed one, and ``limits`` (which joins identifiers with ``/``) sees one token.
    """
    if isinstance(value, str) and _SAFE.match(value):
        return f"{kind}:{value}"
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return f"{kind}#{hashlib.blake2b(raw, digest_size=16).hexdigest()}"


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_CANONICAL_IPV4 = re.compile(rf"(?:{_OCTET}\.){{3}}{_OCTET}")


def _normalize_ip(text: str, ipv6_prefix: int) -> str | None:
    """Canonical address text (IPv6 grouped by prefix), or None when it is no address."""
    if _CANONICAL_IPV4.fullmatch(text):
        return text  # the common case, without building an address object
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix < 128:
            net = ipaddress.IPv6Network((int(addr), ipv6_prefix), strict=False)
            return f"{net.network_address}~{ipv6_prefix}"  # no "/": limits joins with it
    return str(addr)


class ProxyTrust:
    """Which peers may set forwarding headers: addresses or networks, or ``*`` for any."""

    __slots__ = ("_any", "_cache", "_networks")

    def __init__(self, proxies: Any = ()) -> None:
        if isinstance(proxies, ProxyTrust):
            proxies = proxies.spec
        self._any = "*" in proxies
        self._networks = tuple(
            ipaddress.ip_network(p, strict=False) for p in sorted(proxies) if p != "*"
        )
        self._cache: dict[str, bool] = {}

    @property
    def spec(self) -> tuple[str, ...]:
        return ("*",) if self._any else tuple(str(n) for n in self._networks)

    def __bool__(self) -> bool:
        return self._any or bool(self._networks)

    def __contains__(self, host: object) -> bool:
        """True when ``host`` (address text) is a trusted proxy; never raises."""
        if self._any:
            return True
        if not isinstance(host, str) or not self._networks or len(host) > 64:
            return False
        known = self._cache.get(host)
        if known is None:
            try:
                addr = ipaddress.ip_address(host.strip().strip("[]"))
            except ValueError:
                known = False
            else:
                mapped = getattr(addr, "ipv4_mapped", None)
                if mapped is not None:
                    addr = mapped
                known = any(addr in net for net in self._networks)
            remember(self._cache, host, known, _IP_CACHE_MAX)
        return known


_NO_TRUST = ProxyTrust()


def _peer_host(scope: Scope) -> str | None:
    client = scope.get("client")
    if not client:
        return None
    try:
        host = client[0]
    except (TypeError, IndexError, KeyError):
        return None
    return host if isinstance(host, str) and host else None


def _peer_key(scope: Scope, ipv6_prefix: int) -> str:
    client = scope.get("client")
    if not client:
        return _NO_CLIENT
    try:
        host = client[0]
    except (TypeError, IndexError, KeyError):
        return _NO_CLIENT
    if not isinstance(host, str) or not host:
        return _NO_CLIENT
    cache_key = host if ipv6_prefix == 64 else f"{host}|{ipv6_prefix}"
    key = _ip_cache.get(cache_key)
    if key is None:
        ip = _normalize_ip(host, ipv6_prefix) if len(host) <= 64 else None
        # Not an address (a unix socket path, a test client name): still a stable key.
        key = f"ip:{ip}" if ip is not None else bounded("peer", host)
        remember(_ip_cache, cache_key, key, _IP_CACHE_MAX)
    return key


def _strip_port(token: str) -> str:
    """``1.2.3.4:80`` -> ``1.2.3.4``; ``[::1]:80`` -> ``::1``; bare IPv6 kept."""
    token = token.strip().strip('"')
    if token.startswith("["):
        end = token.find("]")
        return token[1:end] if end > 0 else token
    if token.count(":") == 1:
        return token.split(":", 1)[0]
    return token


def _header_values(scope: Scope, name: bytes) -> str | None:
    """All values of a request header joined by ``,`` (RFC 9110 list semantics), as latin-1."""
    found: list[bytes] = []
    for key, value in scope.get("headers") or ():
        if key == name and isinstance(value, bytes | bytearray):
            found.append(bytes(value))
    if not found:
        return None
    joined = b",".join(found)
    if len(joined) > MAX_HEADER_SCAN:
        joined = joined[-MAX_HEADER_SCAN:]  # only the rightmost (trusted) end matters
    return joined.decode("latin-1")


def _xff_entries(text: str, hops: int) -> list[str]:
    return [p.strip() for p in text.rsplit(",", hops)[-hops:]]


def _forwarded_entries(text: str, hops: int) -> list[str]:
    """The ``for=`` value of the rightmost ``hops`` elements of an RFC 7239 header.

    Elements are split on commas outside quoted strings by one regex (C speed even for
    the 8 KiB a hostile client may send); empty list elements are ignored (RFC 9110 5.6.1).
    """
    elements = [e for e in _FORWARDED_ELEMENT.findall(text) if not e.isspace()]
    out: list[str] = []
    for element in elements[-hops:]:
        value = ""
        for pair in element.split(";"):
            name, sep, val = pair.partition("=")
            if sep and name.strip().lower() == "for":
                value = val.strip()
        out.append(value)
    return out


MAX_FORWARDED_ENTRIES = 64
"""Entries read from the right of a forwarding header when skipping trusted proxies."""


def client_address(
    scope: Scope,
    *,
    trusted_proxies: ProxyTrust | Any = (),
    trusted_proxy_hops: int = 0,
    proxy_header: str = "x-forwarded-for",
    ipv6_prefix: int = 64,
) -> str:
    """The namespaced client-address key (``ip:...``) for ``scope``; never raises.

    Forwarding headers count only when the socket peer is in ``trusted_proxies``.
    """
    try:
        trust = trusted_proxies if isinstance(trusted_proxies, ProxyTrust) else None
        if trust is None:
            trust = ProxyTrust(trusted_proxies) if trusted_proxies else _NO_TRUST
        if not trust or _peer_host(scope) not in trust:
            return _peer_key(scope, ipv6_prefix)
        name = b"forwarded" if proxy_header == "forwarded" else b"x-forwarded-for"
        text = _header_values(scope, name)
        if text is None:
            return _peer_key(scope, ipv6_prefix)
        wanted = trusted_proxy_hops if trusted_proxy_hops > 0 else MAX_FORWARDED_ENTRIES
        if name == b"forwarded":
            entries = _forwarded_entries(text, wanted)
        else:
            entries = _xff_entries(text, wanted)
        if trusted_proxy_hops > 0:
            if len(entries) < trusted_proxy_hops:
                return _peer_key(scope, ipv6_prefix)  # did not pass through all our proxies
            candidate = _strip_port(entries[0])
        else:
            # From the right: the first entry that is not one of our proxies is the client.
            candidate = ""
            for entry in reversed(entries):
                candidate = _strip_port(entry)
                if candidate not in trust:
                    break
        ip = _normalize_ip(candidate, ipv6_prefix) if 0 < len(candidate) <= 64 else None
        if ip is None:
            return _peer_key(scope, ipv6_prefix)
        return f"ip:{ip}"
    except Exception:  # pragma: no cover - defensive: hostile input must never raise
        log.debug("could not derive a client address", exc_info=True)
        return _NO_CLIENT


def make_key_func(
    source: Any,
    *,
    trusted_proxies: Any = (),
    trusted_proxy_hops: int = 0,
    proxy_header: str = "x-forwarded-for",
    ipv6_prefix: int = 64,
) -> KeyFunc:
    """Build ``scope -> key`` for a key source: client, global, ``header:<name>``, callable.

    A missing header or a callable that returns None or raises falls back to the client
    address, so an anonymous request is still limited, under a different namespace.
    """
    trust = ProxyTrust(trusted_proxies)

    def client(scope: Scope) -> str:
        return client_address(
            scope,
            trusted_proxies=trust,
            trusted_proxy_hops=trusted_proxy_hops,
            proxy_header=proxy_header,
            ipv6_prefix=ipv6_prefix,
        )

    if not trust:
        cache = _ip_cache

        def client(scope: Scope) -> str:
            # Hot path: one dict lookup for an address seen before.
            try:
                key = cache.get(scope["client"][0])
            except Exception:
                key = None
            if key is None or ipv6_prefix != 64:
                return _peer_key(scope, ipv6_prefix)
            return key

    if source == "client":
        return client
    if source == "global":
        return _global
    if isinstance(source, str) and source.startswith("header:"):
        wanted = source[len("header:") :].lower().encode("latin-1")

        def from_header(scope: Scope) -> str:
            try:
                for key, value in scope.get("headers") or ():
                    if key == wanted and isinstance(value, bytes | bytearray) and value:
                        text = bytes(value).decode("latin-1").strip()
                        if text:
                            return bounded("h", text)
            except Exception:  # pragma: no cover - headers that are not pairs
                pass
            return client(scope)

        return from_header
    if callable(source):
        func = source

        def from_callable(scope: Scope) -> str:
            try:
                value = func(scope)
            except Exception:
                log.warning("rate-limit key function %r failed", func, exc_info=True)
                return client(scope)
            if value is None or value == "" or not isinstance(value, str | bytes):
                return client(scope)
            return bounded("fn", value)

        return from_callable
    raise ValueError(f"unknown key source {source!r}")


def _global(_scope: Scope) -> str:
    return "*"
