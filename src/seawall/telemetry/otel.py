"""Decision events as OpenTelemetry metrics and span events (``pip install 'seawall[otel]'``).

The same instruments as :mod:`seawall.telemetry.prometheus` (names with dots,
``seawall.retry.wait`` with unit ``s`` for ``seawall_retry_wait_seconds``), through the
OpenTelemetry *API*: the application chooses the SDK, readers and exporters. When a
request is limited, shed, retried, served from the cache or short-circuited by a
breaker, the current span (the request's, if an ASGI or httpx instrumentation made one)
gets an event saying so. Listeners run synchronously in the task that decided, so the
current span is that request's span; a waiter shed by another request's release is the
exception (its event lands on the releasing request's span).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

try:
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "seawall.telemetry.otel needs opentelemetry-api: pip install 'seawall[otel]'"
    ) from exc

from seawall.events import Event
from seawall.telemetry.signals import SIGNALS, Handler, LabelLimiter, Metric, Signal, SignalListener

__all__ = ["OpenTelemetryMetrics"]

_MAX_CACHED = 4096
"""Distinct raw label tuples per event class whose attributes are remembered."""


def _instrument(meter: metrics.Meter, m: Metric) -> Callable[[float, dict[str, str]], None]:
    """The API call that records one value of ``m`` with its attributes."""
    if m.kind == "counter":
        return meter.create_counter(m.otel_name, unit=m.unit, description=m.help).add
    if m.kind == "gauge":
        return meter.create_gauge(m.otel_name, unit=m.unit, description=m.help).set
    return meter.create_histogram(
        m.otel_name,
        unit=m.unit,
        description=m.help,
        explicit_bucket_boundaries_advisory=list(m.buckets) if m.buckets else None,
    ).record


class OpenTelemetryMetrics(SignalListener):
    """A bus listener that records seawall's metrics and span events through the OTel API.

    ``meter_provider`` defaults to the global one (set by the application's SDK set-up);
    ``spans=False`` records metrics only.
    """

    def __init__(
        self,
        meter_provider: metrics.MeterProvider | None = None,
        *,
        spans: bool = True,
        max_label_values: int = 100,
        signals: Sequence[Signal] = SIGNALS,
    ) -> None:
        from seawall import __version__

        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("seawall", __version__)
        self.spans = spans
        super().__init__(signals)
        self._labels = LabelLimiter(max_label_values)
        self._instruments: dict[type[Event], tuple[tuple[Metric, Any], ...]] = {
            s.event: tuple((m, _instrument(meter, m)) for m in s.metrics) for s in signals
        }

    def _handler(self, signal: Signal) -> Handler:
        instruments = self._instruments[signal.event]
        names, labels, limit = signal.label_names, signal.labels, self._labels.values
        span_event = signal.span_event if self.spans else None
        span_attributes = signal.span_attributes

        # raw label values -> attributes per instrument; bounded like the label values
        attributes: dict[tuple[str, ...], tuple[dict[str, str], ...]] = {}

        def resolve(raw: tuple[str, ...]) -> tuple[dict[str, str], ...]:
            values = dict(zip(names, limit(names, raw), strict=True))
            found = tuple({n: values[n] for n in metric.labels} for metric, _ in instruments)
            if len(attributes) < _MAX_CACHED:
                attributes[raw] = found
            return found

        def handle(event: Event) -> None:
            raw = labels(event)
            attrs = attributes.get(raw)
            if attrs is None:
                attrs = resolve(raw)
            for (metric, record), a in zip(instruments, attrs, strict=True):
                record(1 if metric.value is None else metric.value(event), a)
            if span_event is not None:
                span = trace.get_current_span()
                if span.is_recording():
                    extra = span_attributes(event) if span_attributes is not None else None
                    span.add_event(span_event, attributes=extra)

        return handle
