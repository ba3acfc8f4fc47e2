"""Decision events as Prometheus metrics (``pip install 'seawall[prometheus]'``).

Counters are ``seawall_..._total`` and durations and sizes are in base units (seconds,
bytes), as Prometheus names them. Labels are bounded (see :mod:`seawall.telemetry.signals`):
a flood of distinct clients adds no series, and an unbounded label source (upstream
hosts named by users) is capped at ``max_label_values`` values, the rest counted as
``other``.

    metrics = PrometheusMetrics()          # on prometheus_client's default REGISTRY
    metrics.attach()                       # DEFAULT_BUS: every middleware and transport
    app.mount("/metrics", prometheus_client.make_asgi_app())
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "seawall.telemetry.prometheus needs prometheus-client: pip install 'seawall[prometheus]'"
    ) from exc

from seawall.events import Event
from seawall.telemetry.signals import SIGNALS, Handler, LabelLimiter, Metric, Signal, SignalListener

__all__ = ["PrometheusMetrics"]

_MAX_CACHED = 4096
"""Distinct raw label tuples per event class whose metric children are remembered."""


class _Instrument:
    """One Prometheus metric fed by a signal, with its label children cached."""

    __slots__ = ("children", "label_at", "metric", "prom", "update")

    def __init__(self, metric: Metric, signal: Signal, registry: CollectorRegistry) -> None:
        self.metric = metric
        self.label_at = tuple(signal.label_names.index(n) for n in metric.labels)
        kwargs: dict[str, Any] = {"labelnames": metric.labels, "registry": registry}
        prom: Counter | Gauge | Histogram
        if metric.kind == "counter":
            prom = Counter(metric.name, metric.help, **kwargs)
        elif metric.kind == "gauge":
            prom = Gauge(metric.name, metric.help, **kwargs)
        else:
            buckets = metric.buckets or Histogram.DEFAULT_BUCKETS
            prom = Histogram(metric.name, metric.help, buckets=buckets, **kwargs)
        self.prom = prom
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, values: tuple[str, ...]) -> Any:
        if not self.label_at:
            return self.prom
        key = tuple(values[i] for i in self.label_at)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self.prom.labels(*key)
        return child


class PrometheusMetrics(SignalListener):
    """A bus listener that keeps seawall's metrics in a Prometheus registry.

    One instance per registry (Prometheus refuses a metric name twice); attach the same
    instance to several buses if components use their own.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        max_label_values: int = 100,
        signals: Sequence[Signal] = SIGNALS,
    ) -> None:
        self.registry = registry if registry is not None else REGISTRY
        super().__init__(signals)
        self._labels = LabelLimiter(max_label_values)
        self._instruments = {
            s.event: tuple(_Instrument(m, s, self.registry) for m in s.metrics) for s in signals
        }

    def _handler(self, signal: Signal) -> Handler:
        instruments = self._instruments[signal.event]
        names, labels, limit = signal.label_names, signal.labels, self._labels.values
        # raw label values -> what to update; bounded (past the cap, looked up each time)
        updates: dict[tuple[str, ...], tuple[tuple[Any, str, Any], ...]] = {}

        def resolve(raw: tuple[str, ...]) -> tuple[tuple[Any, str, Any], ...]:
            values = limit(names, raw)
            found = tuple(
                (inst.child(values), inst.metric.kind, inst.metric.value) for inst in instruments
            )
            if len(updates) < _MAX_CACHED:
                updates[raw] = found
            return found

        def handle(event: Event) -> None:
            raw = labels(event)
            todo = updates.get(raw)
            if todo is None:
                todo = resolve(raw)
            for child, kind, amount in todo:
                if kind == "counter":
                    child.inc(1 if amount is None else amount(event))
                elif kind == "gauge":
                    child.set(amount(event))
                else:
                    child.observe(amount(event))

        return handle
