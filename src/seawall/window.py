"""One bucketed sliding window of counts, for every mechanism that counts over time.

The retry budget (first attempts and retries per host) and the time-based breaker window
(calls, failures, slow calls) both count "the last ``size`` seconds" in ``buckets`` slices
of ``size / buckets`` seconds, with running totals, so adding and reading cost O(1). A
slice counts while its index is within the last ``buckets`` indices: the window spans
between ``size * (buckets - 1) / buckets`` and ``size`` seconds.
"""

from __future__ import annotations

import math

__all__ = ["SlidingCounts"]


class SlidingCounts:
    """``fields`` counters over a sliding window; time comes from the caller (no clock)."""

    __slots__ = ("_head", "_n", "_ring", "_totals", "_width")

    def __init__(self, size: float, buckets: int, fields: int) -> None:
        if not size > 0 or buckets < 1 or fields < 1:
            raise ValueError("size > 0, buckets >= 1 and fields >= 1")
        self._n = buckets
        self._width = size / buckets
        self._ring = [[0] * fields for _ in range(buckets)]
        self._totals = [0] * fields
        self._head: int | None = None  # index of the newest slice

    def _roll(self, now: float) -> list[int]:
        """The slice for ``now``, after dropping the slices that left the window."""
        index = math.floor(now / self._width)
        head = self._head
        if head is None or index - head >= self._n:
            self.clear()
        elif index > head:
            totals = self._totals
            for i in range(head + 1, index + 1):
                expired = self._ring[i % self._n]
                for f, value in enumerate(expired):
                    if value:
                        totals[f] -= value
                        expired[f] = 0
        else:
            index = head  # time never runs backwards here: late adds go to the newest slice
        self._head = index
        return self._ring[index % self._n]

    def add(self, now: float, *amounts: int) -> tuple[int, ...]:
        """Add ``amounts`` (one per field) at ``now``; returns the window's totals."""
        bucket = self._roll(now)
        totals = self._totals
        for f, amount in enumerate(amounts):
            if amount:
                bucket[f] += amount
                totals[f] += amount
        return tuple(totals)

    def totals(self, now: float) -> tuple[int, ...]:
        """The window's totals at ``now``."""
        self._roll(now)
        return tuple(self._totals)

    def clear(self) -> None:
        for bucket in self._ring:
            for f in range(len(bucket)):
                bucket[f] = 0
        for f in range(len(self._totals)):
            self._totals[f] = 0
        self._head = None
