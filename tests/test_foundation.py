"""The bottom layer: clock, events, errors and the policy base."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import ClassVar

import pytest

from seawall.clock import SYSTEM_CLOCK, Clock, ManualClock
from seawall.errors import PolicyError
from seawall.events import Event, EventBus
from seawall.policy.base import (
    PolicyBase,
    check_fraction,
    check_int_at_least,
    check_non_negative,
    check_positive,
)


def test_manual_clock_moves_only_when_told(clock: ManualClock) -> None:
    start = clock.now()
    assert clock.now() == start
    clock.advance(2.5)
    assert clock.now() == start + 2.5
    with pytest.raises(ValueError, match="backwards"):
        clock.advance(-1)


async def test_manual_clock_sleep_advances_and_records(clock: ManualClock) -> None:
    start = clock.now()
    await clock.sleep(3)
    clock.sleep_sync(-1)  # negative waits are clamped, never move time back
    assert clock.now() == start + 3
    assert clock.slept == [3, 0]


def test_wall_moves_with_monotonic_time(clock: ManualClock) -> None:
    wall = clock.wall()
    clock.advance(10)
    assert clock.wall() == wall + 10


def test_both_clocks_satisfy_the_protocol() -> None:
    assert isinstance(SYSTEM_CLOCK, Clock)
    assert isinstance(ManualClock(), Clock)


async def test_system_clock_is_monotonic() -> None:
    a = SYSTEM_CLOCK.now()
    await SYSTEM_CLOCK.sleep(0)
    assert SYSTEM_CLOCK.now() >= a


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Poked(Event):
    name: ClassVar[str] = "test.poked"
    who: str


def test_bus_delivers_and_unsubscribes() -> None:
    bus = EventBus()
    assert not bus.active
    seen: list[Event] = []
    unsubscribe = bus.subscribe(seen.append)
    assert bus.active
    bus.emit(Poked(at=1.0, who="a"))
    unsubscribe()
    bus.emit(Poked(at=2.0, who="b"))
    assert seen == [Poked(at=1.0, who="a")]
    assert not bus.active


def test_a_failing_listener_never_breaks_the_emitter(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("exporter down")

    bus.subscribe(broken)
    bus.subscribe(seen.append)
    with caplog.at_level(logging.ERROR, logger="seawall.events"):
        bus.emit(Poked(who="x"))
    assert len(seen) == 1, "the next listener still runs"
    assert "exporter down" in caplog.text


def test_policy_error_names_field_and_value() -> None:
    err = PolicyError("limit", "ten per sec", "is not a rate like '100/second'")
    assert str(err) == "limit: 'ten per sec' is not a rate like '100/second'"
    assert isinstance(err, ValueError)
    assert (err.field, err.value) == ("limit", "ten per sec")


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (check_positive, [0.1, 5], [0, -1, float("inf"), float("nan"), True, "1"]),
        (check_non_negative, [0, 3], [-0.1, float("inf"), None]),
        (check_fraction, [0, 0.5, 1], [-0.1, 1.01, "half"]),
    ],
)
def test_number_checks(check: object, good: list[object], bad: list[object]) -> None:
    assert callable(check)
    for value in good:
        check("f", value)
    for value in bad:
        with pytest.raises(PolicyError, match=r"^f: "):
            check("f", value)


def test_int_check() -> None:
    check_int_at_least("n", 3, 1)
    for value in (0, 2.5, True, "3"):
        with pytest.raises(PolicyError, match="whole number of at least 1"):
            check_int_at_least("n", value, 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Inner(PolicyBase):
    size: int = 1

    def __post_init__(self) -> None:
        check_int_at_least("size", self.size, 1)


@dataclasses.dataclass(frozen=True, slots=True)
class Outer(PolicyBase):
    ratio: float = 0.5
    inner: Inner = Inner()
    many: tuple[Inner, ...] = ()
    methods: frozenset[str] = frozenset({"GET"})

    def __post_init__(self) -> None:
        check_fraction("ratio", self.ratio)


def test_from_dict_builds_nested_policies() -> None:
    policy = Outer.from_dict(
        {"ratio": 0.2, "inner": {"size": 4}, "many": [{"size": 2}, {}], "methods": ["GET", "HEAD"]}
    )
    assert policy == Outer(0.2, Inner(4), (Inner(2), Inner()), frozenset({"GET", "HEAD"}))
    assert Outer.from_dict(policy.to_dict()) == policy


def test_unknown_keys_are_errors_at_any_depth() -> None:
    with pytest.raises(PolicyError, match=r"^ratoi: 0\.2 is not a setting of Outer; known: ratio"):
        Outer.from_dict({"ratoi": 0.2})
    with pytest.raises(PolicyError, match=r"^inner\.sise: "):
        Outer.from_dict({"inner": {"sise": 1}})


def test_nested_validation_errors_carry_the_path() -> None:
    with pytest.raises(PolicyError, match=r"^many\[1\]\.size: 0 must be a whole number"):
        Outer.from_dict({"many": [{"size": 1}, {"size": 0}]})
    with pytest.raises(PolicyError, match="is not a table of settings"):
        Outer.from_dict(["not", "a", "table"])  # type: ignore[arg-type]


def test_replace_validates() -> None:
    with pytest.raises(PolicyError, match=r"^ratio: 2"):
        Outer().replace(ratio=2)


def test_event_loop_is_free_while_manual_clock_sleeps(clock: ManualClock) -> None:
    async def main() -> list[str]:
        order: list[str] = []

        async def sleeper() -> None:
            await clock.sleep(100)
            order.append("slept")

        async def other() -> None:
            order.append("other")

        await asyncio.gather(sleeper(), other())
        return order

    assert asyncio.run(main()) == ["other", "slept"]
