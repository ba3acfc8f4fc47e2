"""seawall: keep artifact fetches alive when an artifact repository manager is overloaded."""

from seawall.clock import SYSTEM_CLOCK, Clock, ManualClock, SystemClock
from seawall.errors import PolicyError, SeawallError
from seawall.events import DEFAULT_BUS, Event, EventBus

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUS",
    "SYSTEM_CLOCK",
    "Clock",
    "Event",
    "EventBus",
    "ManualClock",
    "PolicyError",
    "SeawallError",
    "SystemClock",
    "__version__",
]
