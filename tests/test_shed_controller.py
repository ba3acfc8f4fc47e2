"""The adaptive controller's promises, sample by sample (docs/shedding.md, "The adaptive limit").

Each test feeds :class:`GradientController` windows of samples whose shape states one
documented rule (slow start, the flat band, "in use for at least half the window", spare
concurrency, the baseline, five windows pinned at ``min_limit``) and asserts the outcome of
that rule, not the limit's trajectory. Latencies and times are binary fractions, so a
boundary the documentation names ("within", "at least half") is met exactly.
"""

from __future__ import annotations

import pytest

from seawall.policy.shed import ShedPolicy
from seawall.shed import GradientController

B = 0.125  # the no-load latency of the tests' app


class Feed:
    """A controller and its clock: ``window`` feeds samples 1 ms apart (window_max is far)."""

    def __init__(self, policy: ShedPolicy) -> None:
        self.policy = policy
        self.c = GradientController(policy, now=0.0)
        self.t = 0.0

    def sample(
        self, rtt: float, *, saturated: bool = False, queued: bool = False, in_flight: int = 0
    ) -> None:
        self.t += 0.001
        self.c.on_sample(rtt, now=self.t, saturated=saturated, queued=queued, in_flight=in_flight)

    @property
    def baseline(self) -> float:
        baseline = self.c.baseline
        assert baseline is not None
        return baseline

    def size(self) -> int:
        """A window's samples: ``window_samples`` (the tests keep the limit below it or whole;
        a window spans at least the limit's worth of samples, one round trip)."""
        return max(self.policy.window_samples, self.c.limit)

    def window(
        self,
        rtt: float,
        n: int,
        *,
        saturated: int = 0,
        queued: int = 0,
        in_flight: list[int] | None = None,
    ) -> None:
        """``n`` samples at ``rtt``: the first ``saturated`` at the limit, the first
        ``queued`` with requests waiting, concurrency from ``in_flight`` (default: the limit,
        no spare room)."""
        for i in range(n):
            busy = in_flight[i] if in_flight is not None else max(1, self.c.limit)
            self.sample(rtt, saturated=i < saturated, queued=i < queued, in_flight=busy)


def avoidance(n: int, limit: int = 10, **changes: object) -> Feed:
    """A controller past slow start with baseline ``B``: its first window (n samples at B)
    did not use the limit, which ends slow start and leaves the limit where it was."""
    settings: dict[str, object] = {"min_limit": 1, "max_limit": 1000, **changes}
    f = Feed(ShedPolicy(initial_limit=limit, window_samples=n, **settings))  # type: ignore[arg-type]
    f.window(B, f.size())
    assert f.baseline == B and f.c.limit == limit and f.c.slow_start is False
    return f


# -- slow start ------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(4, 15))
def test_slow_start_adds_one_per_used_flat_sample_and_goes_on_after_a_used_window(
    n: int,
) -> None:
    """Every flat sample taken while the limit was in use adds one; a window that used the
    limit for at least half its samples keeps slow start going, one that did not ends it."""
    for used in range(n):
        f = Feed(ShedPolicy(initial_limit=1, min_limit=1, max_limit=100, window_samples=n))
        f.window(B, n, saturated=used)
        assert f.baseline == B  # the window ended
        assert f.c.limit == 1 + used
        assert f.c.slow_start is (2 * used >= n), (n, used)


def test_slow_start_judges_each_sample_against_the_learned_baseline() -> None:
    """Once a baseline is known, a sample three times slower is not flat: it adds nothing
    (even when the whole window is that slow), and the window ends slow start and shrinks."""
    f = Feed(ShedPolicy(initial_limit=2, min_limit=1, max_limit=100, window_samples=8))
    f.window(B, 8, saturated=5)
    assert f.c.slow_start is True and f.c.limit == 7 and f.baseline == B
    f.window(3 * B, 7, saturated=7)
    assert f.c.limit == 7  # never grew per sample on the way
    f.sample(3 * B, saturated=True, in_flight=7)  # the window ends
    assert f.c.slow_start is False
    assert f.c.limit < 7  # latency tripled: shrunk


def test_a_latency_exactly_sqrt_tolerance_times_the_baseline_is_still_flat() -> None:
    """Samples "within sqrt(tolerance) of the baseline" include its edge: with tolerance 4,
    twice the baseline still grows slow start, per sample and at the window's end."""
    f = Feed(
        ShedPolicy(initial_limit=2, min_limit=1, max_limit=100, window_samples=8, tolerance=4.0)
    )
    f.window(B, 8, saturated=5)
    assert f.c.slow_start is True and f.c.limit == 7 and f.baseline == B
    # the window spans the limit's worth of samples (one round trip), growing with it: it
    # ends at window_max
    for _ in range(5):
        f.sample(2 * B, saturated=True, in_flight=7)
    assert f.c.limit == 12
    f.t += f.policy.window_max
    f.sample(2 * B, saturated=True, in_flight=12)
    assert f.c.limit == 13 and f.c.slow_start is True
    assert f.baseline == B  # the window ended (a higher mean never raises a baseline)
    f.sample(2 * B + 0.001, saturated=True, in_flight=13)  # just outside: adds nothing
    assert f.c.limit == 13


def test_slow_start_ends_at_max_limit() -> None:
    f = Feed(ShedPolicy(initial_limit=4, min_limit=1, max_limit=6, window_samples=20))
    f.sample(B, saturated=True, in_flight=4)
    assert f.c.slow_start is True and f.c.limit == 5
    f.sample(B, saturated=True, in_flight=5)
    assert f.c.limit == 6 and f.c.slow_start is False  # nothing left to grow into
    f.sample(B, saturated=True, in_flight=6)
    assert f.c.limit == 6


@pytest.mark.parametrize("tolerance", [1.5, 1.0])
def test_a_flat_window_with_a_queue_returns_to_slow_start(tolerance: float) -> None:
    """Demand waits and the app shows no queue of its own: the limit doubles again. With
    the least tolerance, 1, latency equal to the baseline is still flat (the band's edge)."""
    f = avoidance(10, tolerance=tolerance)
    f.window(B, 10, saturated=10, queued=10)
    assert f.c.slow_start is True and f.c.limit == 10
    f.sample(B, saturated=True, queued=True, in_flight=10)
    assert f.c.limit == 11  # growing per sample again


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_window_in_which_nobody_waited_never_returns_to_slow_start(n: int) -> None:
    """Small windows (window_samples 1: one round trip of a limit of 2): nobody waited
    in them, so flat latency alone does not restart slow start, first window or later."""
    f = Feed(ShedPolicy(initial_limit=2, min_limit=1, max_limit=100, window_samples=n))
    for _ in range(6):
        f.window(B, max(n, 2))
        assert f.c.slow_start is False and f.c.limit == 2


def test_a_slower_window_ends_slow_start_and_shrinks_the_limit() -> None:
    f = Feed(ShedPolicy(initial_limit=4, min_limit=1, max_limit=100, window_samples=8))
    f.window(B, 8, saturated=4)
    assert f.c.slow_start is True and f.c.limit == 8
    f.window(0.5, 8)  # four times slower, not used (a slowdown, not demand)
    assert f.c.slow_start is False and f.c.limit < 8


# -- avoidance -------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(16, 23))
def test_a_flat_window_grows_the_limit_only_if_it_was_in_use_half_the_window(n: int) -> None:
    """Docs: "below it, it grows only if the limit was in use for half the window's
    samples", window after window, whatever the previous one did."""
    for first in range(n + 1):
        for second in (n // 2 - 1, n // 2, (n + 1) // 2, n):
            f = avoidance(n)
            f.window(B, n, saturated=first)
            grew = f.c.limit > 10
            assert grew is (2 * first >= n), (n, first)
            before = f.c.limit
            f.window(B, n, saturated=second)
            assert (f.c.limit > before) is (2 * second >= n), (n, first, second)
            assert f.c.slow_start is False  # nobody waited: no return to slow start


def test_a_window_above_the_tolerance_shrinks_the_limit_in_proportion() -> None:
    shrunk = []
    for slower in (2.0, 3.0, 4.0):
        f = avoidance(40, limit=40)
        f.window(slower * B, 40, saturated=40)
        assert f.c.limit < 40
        assert f.c.limit >= 40 * (1 - f.policy.smoothing / 2)  # at most halved, smoothed
        shrunk.append(f.c.limit)
    assert shrunk[0] > shrunk[1] >= shrunk[2]  # in proportion to how much latency grew


def test_a_window_of_zero_latency_moves_nothing() -> None:
    """A clock too coarse to time a request gives 0: such a window says nothing about
    load (and must not divide by zero), nor about the baseline."""
    f = avoidance(10, limit=20)
    f.window(0.0, 20, saturated=20)
    f.window(-0.5, 20, saturated=20, in_flight=[1] * 20)  # negative counts as 0; spare room
    assert f.c.limit == 20 and f.baseline == B


def test_a_first_window_of_zero_latency_leaves_the_controller_unlearned() -> None:
    """Found by mutation testing: a zero first window set the baseline to 0, and every
    later window was skipped for it, freezing the limit at ``initial_limit`` for good."""
    f = Feed(ShedPolicy(initial_limit=10, min_limit=1, max_limit=1000, window_samples=10))
    f.window(0.0, 10)
    assert f.c.baseline is None
    f.window(B, 10)  # the first window that timed anything: learned as a fresh one
    assert f.baseline == B and f.c.slow_start is False
    f.window(4 * B, 10, saturated=10)
    assert f.c.limit < 10  # the limit moves again


# -- the baseline ----------------------------------------------------------------------


def test_a_window_with_spare_concurrency_moves_the_baseline_towards_its_mean() -> None:
    """Mean concurrency below half the limit: nothing of ours queued inside the app, so
    its latency is the no-load latency, up or down; at or above half, a slower window
    is our queueing and leaves the baseline alone."""
    # limit 3, windows of 3: concurrency 1, 1, 2 is a mean of 4/3, below 1.5
    f = avoidance(3, limit=3)
    f.window(2 * B, 3, in_flight=[1, 1, 2])
    assert B < f.baseline < 2 * B
    up = f.baseline
    f.window(B / 2, 3, in_flight=[1, 1, 2])
    assert B / 2 < f.baseline < up
    # 1, 2, 2: a mean of 5/3, above half the limit: not spare
    f = avoidance(3, limit=3)
    f.window(2 * B, 3, in_flight=[1, 2, 2])
    assert f.baseline == B
    # spare room but the limit in use (a burst at the limit, then idle): not spare
    f = avoidance(4, limit=4)
    f.window(2 * B, 4, saturated=2, in_flight=[1, 1, 1, 1])
    assert f.baseline == B


def test_a_caller_that_does_not_count_concurrency_feeds_one_request_at_a_time() -> None:
    """``in_flight`` defaults to 1: a lone request, spare room below a limit of 3."""
    c = GradientController(
        ShedPolicy(initial_limit=3, min_limit=1, max_limit=100, window_samples=3), now=0.0
    )
    for i in range(3):
        c.on_sample(B, now=0.001 * i, saturated=False)
    for i in range(3):
        c.on_sample(2 * B, now=0.01 + 0.001 * i, saturated=False)
    assert c.baseline is not None and B < c.baseline < 2 * B


def test_a_lower_window_lowers_the_baseline_towards_it() -> None:
    f = avoidance(10)
    f.window(B / 2, 10)
    assert f.baseline is not None and B / 2 < f.baseline < B


def test_five_windows_in_a_row_at_min_limit_relearn_the_baseline() -> None:
    """The service got slower: pinned at ``min_limit`` for five windows in a row, the next
    window's latency becomes the baseline; a window above ``min_limit`` restarts the count."""
    f = avoidance(8, limit=4, min_limit=4)
    slow = 4 * B
    for _ in range(5):  # pinned: each window four times slower shrinks to the floor
        f.window(slow, 8)
        assert f.c.limit == 4 and f.baseline == B
    f.window(slow, 8)
    assert f.baseline == slow  # re-learned
    # in a row: four pinned, one window that lifts the limit, then five pinned again
    for _ in range(4):
        f.window(4 * slow, 8)
        assert f.baseline == slow
    f.window(slow, 8, saturated=8)  # flat and used: the limit rises off the floor
    assert f.c.limit > 4 and f.baseline == slow
    for _ in range(5):
        f.window(4 * slow, 8)
        assert f.c.limit == 4 and f.baseline == slow
    f.window(4 * slow, 8)
    assert f.baseline == 4 * slow
    # and once more: the count starts again from zero after a re-learn
    for _ in range(5):
        f.window(16 * slow, 8)
        assert f.baseline == 4 * slow
    f.window(16 * slow, 8)
    assert f.baseline == 16 * slow


# -- windows ---------------------------------------------------------------------------


def test_a_window_ends_after_window_max_seconds_under_light_traffic() -> None:
    c = GradientController(ShedPolicy(window_samples=20, window_max=1.0), now=0.0)
    c.on_sample(B, now=1000.0, saturated=False)
    c.on_sample(B, now=1000.5, saturated=False)
    assert c.baseline is None  # two samples in half a second: the window is still open
    c.on_sample(B, now=1001.0, saturated=False)
    assert c.baseline == B  # window_max after its first sample: ended
