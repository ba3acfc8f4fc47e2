"""Circuit-breaker policy: when a per-host breaker trips, how long it stays open, how it probes.

Defaults are tuned for clients that fetch artifacts (image layers, wheels, tarballs) from
an artifact repository manager that may be overloaded:

* a *time* window of 30 s, because artifact traffic is bursty (an image pull is a manifest
  then dozens of blobs, then nothing for minutes); a count window would judge the next
  burst on failures from an hour ago;
* trip at a 50 % failure rate over at least 10 calls, so one pull's worth of evidence is
  enough but a single unlucky blob is not;
* calls slower than 10 s to the *response headers* count as slow, and 80 % slow calls trip
  the breaker too: queueing is the first sign of an overloaded manager, long before 5xx;
* open for 10 s, doubling on each consecutive trip up to 120 s, with +/-20 % jitter so
  thousands of CI runners do not probe a recovering manager in lock-step;
* 3 half-open probes: one probe is a coin flip on a recovering server, three are still
  negligible load; any failed probe re-opens, three successes close;
* 429 is *not* a failure by default: the upstream is alive and shedding on purpose, often
  per credential, and the retry layer already honours ``Retry-After`` within its budget; a
  per-host breaker tripped by one token's quota would block every other caller of that host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from seawall.errors import PolicyError
from seawall.policy.base import (
    PolicyBase,
    check_fraction,
    check_int_at_least,
    check_non_negative,
    check_positive,
)

__all__ = ["BreakerPolicy", "WindowKind"]

WindowKind = Literal["count", "time"]


def _check_rate_threshold(field: str, value: object) -> None:
    check_fraction(field, value)
    if value == 0:
        raise PolicyError(field, value, "must be greater than 0 (0 would trip on any call)")


@dataclass(frozen=True, slots=True)
class BreakerPolicy(PolicyBase):
    """How a :class:`~seawall.breaker.CircuitBreaker` judges an upstream host.

    ``window`` is ``"count"`` (the last ``window_size`` calls) or ``"time"`` (the calls of
    the last ``window_size`` seconds, in ``time_buckets`` buckets). The breaker trips when
    at least ``minimum_calls`` are in the window and the failure rate or the slow-call rate
    reaches its threshold. An open breaker stays open ``open_duration`` seconds, times
    ``backoff_multiplier`` per consecutive trip, at most ``max_open_duration``, each scaled
    by a random factor in ``[1 - jitter, 1 + jitter]``. Then ``half_open_probes`` probes
    are let through; a probe that has not answered after ``probe_timeout`` seconds counts
    as failed, so a lost permit can never leave the breaker stuck half-open.
    """

    window: WindowKind = "time"
    window_size: float = 30.0
    time_buckets: int = 10
    minimum_calls: int = 10
    failure_rate_threshold: float = 0.5
    slow_call_duration: float | None = 10.0
    slow_call_rate_threshold: float = 0.8
    open_duration: float = 10.0
    backoff_multiplier: float = 2.0
    max_open_duration: float = 120.0
    jitter: float = 0.2
    half_open_probes: int = 3
    probe_timeout: float = 60.0
    count_429_as_failure: bool = False

    def __post_init__(self) -> None:
        if self.window not in ("count", "time"):
            raise PolicyError("window", self.window, "must be 'count' or 'time'")
        if self.window == "count":
            size = self.window_size
            if isinstance(size, float) and size.is_integer():  # the default, 30.0: 30 calls
                object.__setattr__(self, "window_size", int(size))
            check_int_at_least("window_size", self.window_size, 1)
        else:
            check_positive("window_size", self.window_size)
        check_int_at_least("time_buckets", self.time_buckets, 1)
        check_int_at_least("minimum_calls", self.minimum_calls, 1)
        if self.window == "count" and self.minimum_calls > self.window_size:
            raise PolicyError(
                "minimum_calls",
                self.minimum_calls,
                f"exceeds the count window of {self.window_size} calls, so it could never trip",
            )
        _check_rate_threshold("failure_rate_threshold", self.failure_rate_threshold)
        if self.slow_call_duration is not None and self.slow_call_duration != math.inf:
            check_positive("slow_call_duration", self.slow_call_duration)  # inf: TOML's "off"
        _check_rate_threshold("slow_call_rate_threshold", self.slow_call_rate_threshold)
        check_positive("open_duration", self.open_duration)
        check_positive("backoff_multiplier", self.backoff_multiplier)
        if self.backoff_multiplier < 1:
            raise PolicyError(
                "backoff_multiplier", self.backoff_multiplier, "must be at least 1 (no shrinking)"
            )
        check_positive("max_open_duration", self.max_open_duration)
        if self.max_open_duration < self.open_duration:
            raise PolicyError(
                "max_open_duration",
                self.max_open_duration,
                f"is shorter than open_duration ({self.open_duration})",
            )
        check_non_negative("jitter", self.jitter)
        if self.jitter >= 1:
            raise PolicyError("jitter", self.jitter, "must be below 1 (an open period of 0 s)")
        check_int_at_least("half_open_probes", self.half_open_probes, 1)
        check_positive("probe_timeout", self.probe_timeout)
        if not isinstance(self.count_429_as_failure, bool):
            raise PolicyError("count_429_as_failure", self.count_429_as_failure, "is not a boolean")

    def open_duration_for(self, trips: int) -> float:
        """The un-jittered open period after ``trips`` consecutive trips (1 = first trip)."""
        exponent = max(0, trips - 1)
        # Guard the power against overflow: past the cap, more trips change nothing.
        if self.backoff_multiplier > 1 and exponent > math.log(
            self.max_open_duration / self.open_duration, self.backoff_multiplier
        ):
            return self.max_open_duration
        return min(self.max_open_duration, self.open_duration * self.backoff_multiplier**exponent)
