"""Telemetry: seawall's decision events as Prometheus or OpenTelemetry metrics and as logs.

Every exporter is a listener on an :class:`~seawall.events.EventBus` (``DEFAULT_BUS``
unless the middleware or transport was given its own), and reads the one table of
:mod:`seawall.telemetry.signals`. Nothing here is imported by the mechanisms or faces:
telemetry attaches from the outside, and a process that attaches nothing pays one
attribute read per decision.

- :class:`EventLogger` (no extra): one line per state change under the ``seawall``
  logger, repeats rate-limited.
- ``seawall.telemetry.prometheus.PrometheusMetrics`` (``pip install 'seawall[prometheus]'``).
- ``seawall.telemetry.otel.OpenTelemetryMetrics`` (``pip install 'seawall[otel]'``):
  metrics, and span events on the current span.
"""

from seawall.telemetry.logs import EventLogger
from seawall.telemetry.signals import SIGNALS, LabelLimiter, Signal, signal_for

__all__ = ["SIGNALS", "EventLogger", "LabelLimiter", "Signal", "signal_for"]
