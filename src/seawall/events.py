"""Typed decision events and the bus that delivers them to listeners.

Every decision a mechanism takes (admit, limit, shed, trip, retry, serve stale...) is a
frozen :class:`Event` subclass defined next to the mechanism that emits it. Listeners are
plain callables; metrics and tracing exporters are listeners too. Emitting is cheap when
nobody listens: callers check :attr:`EventBus.active` before building an event, and a
listener that raises is logged and never breaks the request that caused the event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = ["DEFAULT_BUS", "Event", "EventBus", "Listener"]

log = logging.getLogger("seawall.events")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of all seawall events. ``at`` is the mechanism's monotonic clock time."""

    name: ClassVar[str] = "event"
    at: float = field(default=0.0)


Listener = Callable[[Event], None]


class EventBus:
    """Synchronous fan-out of events to listeners, isolated from their failures."""

    __slots__ = ("_listeners",)

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()

    @property
    def active(self) -> bool:
        """True when at least one listener is registered (check before building events)."""
        return bool(self._listeners)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register ``listener``; returns a function that unsubscribes it."""
        self._listeners = (*self._listeners, listener)

        def unsubscribe() -> None:
            self._listeners = tuple(x for x in self._listeners if x is not listener)

        return unsubscribe

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a broken exporter must never break a request
                log.exception("seawall event listener %r failed on %s", listener, event.name)


DEFAULT_BUS = EventBus()
"""The process-wide bus used by every component that is not given its own."""
