"""Decision events as log lines under the ``seawall`` logger, repeats rate-limited.

Why rate-limited: during an outage every request is limited, shed or retried; a line
per request would drown the logs (and cost more than the decision). Each kind of line
(event class and its bounded labels) is written at most once per ``interval``, with the
number of repeats it stood for in the next line. State changes (a breaker opening, a
store that stops writing) are written every time. Time is the event's own ``at`` (the
mechanism's clock), so a test drives this with ``ManualClock`` like any mechanism.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from seawall.events import DEFAULT_BUS, Event, EventBus
from seawall.telemetry.signals import LabelLimiter, Signal, signal_for

__all__ = ["EventLogger"]


class _Route:
    """A signal's log line, compiled: its logger, label positions and the line itself."""

    __slots__ = ("key_at", "key_names", "line", "logger", "signal")

    def __init__(self, signal: Signal) -> None:
        assert signal.log is not None
        self.signal = signal
        self.line = signal.log
        self.logger = logging.getLogger(signal.log.logger)
        self.key_names = signal.log.key
        self.key_at = tuple(signal.label_names.index(n) for n in signal.log.key)


class EventLogger:
    """A bus listener that logs decisions; ``interval`` seconds between repeated lines.

    ``EventLogger().attach()`` logs what every middleware and transport on the default
    bus decides. Lines go to ``seawall.ratelimit``, ``seawall.shed``,
    ``seawall.breaker``, ``seawall.retry`` and ``seawall.cache`` (children of
    ``seawall``), at INFO (rate limits, retries, breaker transitions) or WARNING (load
    shed, budget spent, stale copies served, failed verification). At most ``max_keys``
    kinds of line are tracked (least recently seen forgotten).
    """

    def __init__(
        self, interval: float = 60.0, *, max_keys: int = 1024, max_label_values: int = 100
    ) -> None:
        if not interval > 0:
            raise ValueError("interval must be greater than 0 seconds")
        self.interval = float(interval)
        self._max_keys = max_keys
        self._labels = LabelLimiter(max_label_values)
        self._lock = threading.Lock()
        self._routes: dict[type[Event], _Route | None] = {}
        # key -> [time of the last line written, repeats not written since]
        self._last: OrderedDict[tuple[object, ...], list[float]] = OrderedDict()

    def attach(self, bus: EventBus = DEFAULT_BUS) -> Callable[[], None]:
        """Subscribe to ``bus``; returns the function that unsubscribes."""
        return bus.subscribe(self)

    def _route(self, cls: type[Event]) -> _Route | None:
        signal = signal_for(cls)
        route = _Route(signal) if signal is not None and signal.log is not None else None
        self._routes[cls] = route
        return route

    def __call__(self, event: Event) -> None:
        cls = type(event)
        route = self._routes[cls] if cls in self._routes else self._route(cls)
        if route is None:
            return
        line = route.line
        if not route.logger.isEnabledFor(line.level):
            return
        if line.every:
            route.logger.log(line.level, "%s", line.message(event))
            return
        raw = route.signal.labels(event)
        with self._lock:  # events come from worker threads too (sync faces, disk I/O)
            key = (
                cls,
                *(self._labels(route.key_names[i], raw[j]) for i, j in enumerate(route.key_at)),
            )
            state = self._last.get(key)
            if state is not None and event.at - state[0] < self.interval:
                state[1] += 1
                return
            repeats = 0 if state is None else int(state[1])
            if state is None:
                self._last[key] = [event.at, 0]
                if len(self._last) > self._max_keys:
                    self._last.popitem(last=False)
            else:
                state[0], state[1] = event.at, 0
                self._last.move_to_end(key)
        text = line.message(event)
        if repeats:
            text += f" ({repeats} more like it in the last {self.interval:g} s)"
        route.logger.log(line.level, "%s", text)
