"""The one sliding window (seawall.window) against a naive model of what it promises."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from seawall.window import SlidingCounts

steps = st.lists(
    st.tuples(st.floats(0, 7, allow_nan=False), st.integers(0, 1), st.integers(0, 3)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, buckets=st.integers(1, 8), size=st.sampled_from([1.0, 2.5, 10.0]))
def test_totals_are_what_fell_in_the_last_buckets_slices(
    steps: list[tuple[float, int, int]], buckets: int, size: float
) -> None:
    window = SlidingCounts(size, buckets, fields=2)
    width = size / buckets
    now = 100.0
    added: list[tuple[int, int, int]] = []  # (slice index, field, amount)
    for dt, field, amount in steps:
        now += dt
        amounts = [0, 0]
        amounts[field] = amount
        window.add(now, *amounts)
        added.append((math.floor(now / width), field, amount))
        index = math.floor(now / width)
        expected = [sum(a for i, f, a in added if f == k and i > index - buckets) for k in range(2)]
        assert list(window.totals(now)) == expected


def test_a_gap_longer_than_the_window_forgets_everything() -> None:
    window = SlidingCounts(10.0, 10, fields=3)
    assert window.add(0.0, 1, 1, 0) == (1, 1, 0)
    assert window.add(5.0, 1, 0, 1) == (2, 1, 1)
    assert window.totals(10.5) == (1, 0, 1)  # the first slice left the window
    assert window.totals(100.0) == (0, 0, 0)


def test_a_window_needs_a_size_a_slice_and_a_field() -> None:
    import pytest

    for size, buckets, fields in [(0.0, 1, 1), (-1.0, 1, 1), (1.0, 0, 1), (1.0, 1, 0)]:
        with pytest.raises(ValueError, match=r"^size > 0, buckets >= 1 and fields >= 1$"):
            SlidingCounts(size, buckets, fields)
    smallest = SlidingCounts(0.5, 1, 1)
    assert smallest.add(0.1, 2) == (2,)
    assert smallest.totals(0.6) == (0,)


def test_a_late_add_counts_in_the_newest_slice_and_leaves_with_it() -> None:
    window = SlidingCounts(10.0, 10, fields=1)
    window.add(50.0, 1)
    assert window.add(45.0, 1) == (2,)  # time never runs backwards inside the window
    assert window.totals(55.0) == (2,)  # both leave with the slice of 50 s, not of 45 s
    assert window.totals(59.9) == (2,)
    assert window.totals(60.0) == (0,)


def test_clearing_forgets_every_field_and_slice() -> None:
    window = SlidingCounts(10.0, 5, fields=2)
    window.add(1.0, 1, 2)
    window.add(3.0, 3, 4)
    window.clear()
    assert window.totals(3.0) == (0, 0)
    assert window.add(5.0, 1, 0) == (1, 0)  # and starts over cleanly
    assert window.totals(9.9) == (1, 0)


def test_a_reused_slice_starts_from_zero() -> None:
    window = SlidingCounts(10.0, 10, fields=1)
    window.add(0.0, 1)
    window.add(9.0, 1)
    assert window.add(10.0, 1) == (2,)  # the slice of 0 s left; its slot holds 10 s now
    assert window.totals(19.5) == (1,)
    assert window.totals(20.5) == (0,)
    assert window.add(20.5, 2) == (2,)
