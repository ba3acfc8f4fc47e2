"""Hypothesis drives seawall's breaker and a deliberately naive model side by side.

The model keeps every call in a plain list and recomputes everything from scratch, so
it shares no code (ring buffers, buckets, counters) with the implementation. Permits are
recorded in any order, late, twice or never, which is where real races hide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from seawall.breaker import (
    BreakerState,
    BreakerStateChanged,
    CircuitBreaker,
    CircuitOpenError,
    Outcome,
    Permit,
)
from seawall.clock import ManualClock
from seawall.events import Event, EventBus
from seawall.policy.breaker import BreakerPolicy

JITTER_DRAW = 0.75  # the rng always returns this: open periods are base * 1.1


@dataclass
class ModelPermit:
    generation: int
    probe: bool
    admitted_at: float
    done: bool = False


@dataclass
class Model:
    policy: BreakerPolicy
    now: float
    state: BreakerState = BreakerState.CLOSED
    generation: int = 0
    trips: int = 0
    open_until: float = 0.0
    calls: list[tuple[float, bool, bool]] = field(default_factory=list)
    probes: dict[int, float] = field(default_factory=dict)  # outstanding: id -> admitted
    slots: int = 0
    successes: int = 0
    opens: int = 0

    def change(self, new: BreakerState) -> None:
        self.state = new
        self.generation += 1
        self.probes = {}
        self.slots = 0
        self.successes = 0
        if new is BreakerState.CLOSED:
            self.trips = 0
        if new is not BreakerState.HALF_OPEN:
            self.calls = []

    def trip(self) -> None:
        self.trips += 1
        p = self.policy
        base = min(p.max_open_duration, p.open_duration * p.backoff_multiplier ** (self.trips - 1))
        self.open_until = self.now + base * (1 + p.jitter * (2 * JITTER_DRAW - 1))
        self.opens += 1
        self.change(BreakerState.OPEN)

    def refresh(self) -> None:
        if self.state is BreakerState.OPEN and self.now >= self.open_until:
            self.change(BreakerState.HALF_OPEN)
        elif self.state is BreakerState.HALF_OPEN and any(
            self.now - t >= self.policy.probe_timeout for t in self.probes.values()
        ):
            self.trip()

    def window(self) -> list[tuple[float, bool, bool]]:
        p = self.policy
        if p.window == "count":
            return self.calls[-int(p.window_size) :]
        width = p.window_size / p.time_buckets
        oldest = math.floor(self.now / width) - p.time_buckets + 1
        return [c for c in self.calls if math.floor(c[0] / width) >= oldest]

    def admit(self, ident: int) -> ModelPermit | None:
        self.refresh()
        if self.state is BreakerState.CLOSED:
            return ModelPermit(self.generation, False, self.now)
        if self.state is BreakerState.HALF_OPEN and self.slots < self.policy.half_open_probes:
            self.slots += 1
            self.probes[ident] = self.now
            return ModelPermit(self.generation, True, self.now)
        return None

    def record(self, ident: int, permit: ModelPermit, outcome: Outcome, duration: float) -> None:
        if permit.done:
            return
        permit.done = True
        self.refresh()
        if permit.generation != self.generation:
            return
        p = self.policy
        slow = p.slow_call_duration is not None and duration >= p.slow_call_duration
        if permit.probe:
            del self.probes[ident]
            if outcome is Outcome.NEUTRAL:
                self.slots -= 1
            elif outcome is Outcome.FAILURE or slow:
                self.trip()
            else:
                self.successes += 1
                if self.successes >= p.half_open_probes:
                    self.change(BreakerState.CLOSED)
            return
        if outcome is Outcome.NEUTRAL:
            return
        self.calls.append((self.now, outcome is Outcome.FAILURE, slow))
        window = self.window()
        if len(window) < p.minimum_calls:
            return
        failures = sum(c[1] for c in window)
        slows = sum(c[2] for c in window)
        if failures / len(window) >= p.failure_rate_threshold or (
            slows and slows / len(window) >= p.slow_call_rate_threshold
        ):
            self.trip()


class BreakerMachine(RuleBasedStateMachine):
    policy = BreakerPolicy(
        window="count",
        window_size=6,
        minimum_calls=4,
        failure_rate_threshold=0.5,
        slow_call_duration=1.0,
        slow_call_rate_threshold=0.75,
        open_duration=5.0,
        backoff_multiplier=2.0,
        max_open_duration=20.0,
        jitter=0.2,
        half_open_probes=2,
        probe_timeout=7.0,
    )

    permits = Bundle("permits")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.bus = EventBus()
        self.opened: list[Event] = []
        self.bus.subscribe(
            lambda e: (
                self.opened.append(e)
                if isinstance(e, BreakerStateChanged) and e.new is BreakerState.OPEN
                else None
            )
        )
        self.breaker = CircuitBreaker(
            "model", self.policy, clock=self.clock, events=self.bus, rng=lambda: JITTER_DRAW
        )
        self.model = Model(self.policy, self.clock.now())
        self.next_id = 0
        self.outstanding = 0

    @rule(target=permits)
    def admit(self) -> tuple[int, Permit, ModelPermit] | object:
        self.next_id += 1
        expected = self.model.admit(self.next_id)
        try:
            permit = self.breaker.admit()
        except CircuitOpenError as exc:
            assert expected is None, f"rejected, model admitted in {self.model.state}"
            assert exc.retry_in >= 0
            if self.model.state is BreakerState.OPEN:
                assert exc.retry_at == self.model.open_until
            return multiple()
        assert expected is not None, f"admitted, model rejected in {self.model.state}"
        assert permit.probe == expected.probe
        assert permit.generation == expected.generation
        return (self.next_id, permit, expected)

    @rule(
        entry=consumes(permits),
        outcome=st.sampled_from(list(Outcome)),
        duration=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    )
    def record(
        self, entry: tuple[int, Permit, ModelPermit], outcome: Outcome, duration: float
    ) -> None:
        ident, permit, expected = entry
        self.breaker.record(permit, outcome, duration)
        self.model.record(ident, expected, outcome, duration)

    @rule(
        entry=permits,
        outcome=st.sampled_from(list(Outcome)),
    )
    def record_again_or_early(
        self, entry: tuple[int, Permit, ModelPermit], outcome: Outcome
    ) -> None:
        """Record a permit that may stay in the bundle: a later record must be a no-op."""
        ident, permit, expected = entry
        self.breaker.record(permit, outcome, 0.0)
        self.model.record(ident, expected, outcome, 0.0)

    @rule(dt=st.sampled_from([0.0, 0.1, 1.0, 2.5, 5.0, 7.0, 11.0, 30.0]))
    def advance(self, dt: float) -> None:
        self.clock.advance(dt)
        self.model.now = self.clock.now()

    @rule()
    def look(self) -> None:
        self.model.refresh()
        assert self.breaker.state is self.model.state

    @invariant()
    def agrees_with_model(self) -> None:
        # Read private fields: observing through .state would move time-driven transitions.
        assert self.breaker._state is self.model.state
        assert self.breaker.generation == self.model.generation
        assert self.breaker.consecutive_trips == self.model.trips
        assert len(self.opened) == self.model.opens  # exactly one event per trip
        assert self.breaker._probe_slots <= self.policy.half_open_probes
        assert len(self.breaker._probes) <= self.breaker._probe_slots
        if self.model.state is BreakerState.OPEN:
            assert self.breaker.retry_at == self.model.open_until
        if self.model.state is BreakerState.CLOSED:
            window = self.model.window()
            calls, _, _ = self.breaker._window.totals(self.clock.now())
            assert calls == len(window)


class TimeWindowMachine(BreakerMachine):
    policy = BreakerMachine.policy.replace(
        window="time", window_size=10.0, time_buckets=5, minimum_calls=3
    )


SETTINGS = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestBreakerCountWindow = BreakerMachine.TestCase
TestBreakerCountWindow.settings = SETTINGS
TestBreakerTimeWindow = TimeWindowMachine.TestCase
TestBreakerTimeWindow.settings = SETTINGS
