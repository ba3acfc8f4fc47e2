"""Replay profiles: an incident's timeline as a TOML file that users can write themselves.

A profile gives phases on the incident's own clock (``"10:07"``): from each phase's ``at``
until the next one, the offered load of each traffic class as a multiple of the server's
*base* capacity, and the server's capacity as a fraction of its base. Each phase says how
many seconds it runs (``seconds``; ``quick_seconds`` for ``--quick``).

One time scale: a run is never compressed. A second of a run is a real second for the
simulator, the clients and seawall alike, so every time constant (service times, restart,
freshness, Retry-After, breaker open time, budget windows, docker's retry waits) keeps its
real value. What is shorter than the incident is the profile: an incident hour becomes a
phase of a minute or two, as a shorter incident with the same shape. The incident clock
only labels the charts.
Events mark moments on the charts (``kind = "mark"``) or restart the server
(``kind = "restart"``, the operator's restart of the incident). An optional ``[server]``
table overrides :class:`~seawall.replay.simulator.SimConfig` fields, an optional ``[catalog]``
table the :class:`~seawall.replay.simulator.Catalog` (images, popularity). See docs/replay.md.

Every mistake is a :class:`~seawall.errors.PolicyError` naming the field, e.g.
``phase[2].builds: -1 must be a finite number of at least 0``.
"""

from __future__ import annotations

import importlib.resources
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seawall.errors import PolicyError
from seawall.policy.base import check_int_at_least, check_non_negative, check_positive

__all__ = [
    "CLASSES",
    "Phase",
    "Profile",
    "ProfileEvent",
    "Schedule",
    "load_profile",
    "parse_profile",
    "shipped_profiles",
]

CLASSES = ("builds", "webhooks", "uploads")
"""Traffic classes a phase sets, each as a multiple of the base capacity."""

_TIME = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)$")
_TOP_KEYS = {
    "name",
    "title",
    "description",
    "timeline",
    "server",
    "catalog",
    "phase",
    "event",
    "goals",
}
_CATALOG_KEYS = {"images", "bases", "runtimes", "zipf_s"}
_TIMELINE_KEYS = {"start", "end", "surge"}
_PHASE_KEYS = {"at", "name", "note", "capacity", "seconds", "quick_seconds", *CLASSES}
_COMPRESSION_KEYS = {"seconds_per_hour", "quick_seconds_per_hour"}
_NOT_COMPRESSED = (
    "is no longer a setting: runs are not compressed; give each [[phase]] its length "
    "in real seconds (seconds = 60, quick_seconds = 15), see docs/replay.md"
)
_EVENT_KEYS = {"at", "kind", "label"}
_EVENT_KINDS = ("mark", "restart")


@dataclass(frozen=True, slots=True)
class Phase:
    """From ``at`` (incident hours) until the next phase: offered load and capacity.

    ``seconds`` (``quick_seconds`` under ``--quick``) is how long the phase runs, in real
    seconds.
    """

    at: float
    name: str
    load: Mapping[str, float]
    seconds: float
    quick_seconds: float
    capacity: float = 1.0
    note: str = ""


@dataclass(frozen=True, slots=True)
class ProfileEvent:
    at: float
    kind: str
    label: str


@dataclass(frozen=True, slots=True)
class Profile:
    """A validated profile. Times are incident hours since midnight (10:07 -> 10.1167)."""

    name: str
    title: str
    description: str
    start: float
    end: float
    surge: tuple[float, float]
    phases: tuple[Phase, ...]
    events: tuple[ProfileEvent, ...]
    server: Mapping[str, Any]
    goals: Mapping[str, float] = field(default_factory=dict)
    catalog: Mapping[str, Any] = field(default_factory=dict)

    def schedule(self, *, quick: bool = False) -> Schedule:
        """The profile in seconds from the start of the run."""
        return Schedule(self, quick=quick)


@dataclass(frozen=True, slots=True)
class Segment:
    t0: float
    t1: float
    phase: Phase


class Schedule:
    """A profile mapped to run seconds: what is offered and what capacity, when."""

    def __init__(self, profile: Profile, *, quick: bool = False) -> None:
        self.profile = profile
        self.quick = quick
        # piecewise-linear incident clock for the labels: (incident hour, run second, run
        # seconds per incident hour) per phase, since phases are shortened differently
        self._knots: list[tuple[float, float, float]] = []
        t = 0.0
        for i, ph in enumerate(profile.phases):
            end = profile.phases[i + 1].at if i + 1 < len(profile.phases) else profile.end
            length = ph.quick_seconds if quick else ph.seconds
            self._knots.append((ph.at, t, length / (end - ph.at)))
            t += length
        self.duration = t
        self.seconds_per_hour = t / (profile.end - profile.start)
        """Run seconds per incident hour, on average (labels only: nothing is compressed)."""
        self.segments: list[Segment] = []
        for i, ph in enumerate(profile.phases):
            end = profile.phases[i + 1].at if i + 1 < len(profile.phases) else profile.end
            self.segments.append(Segment(self.to_sim(ph.at), self.to_sim(end), ph))
        self.surge = (self.to_sim(profile.surge[0]), self.to_sim(profile.surge[1]))
        self.events = [(self.to_sim(e.at), e) for e in profile.events]

    def to_sim(self, hours: float) -> float:
        """Simulated seconds since the start at incident time ``hours``."""
        at, t, rate = self._knots[0]
        for knot in self._knots:
            if knot[0] <= hours:
                at, t, rate = knot
        return t + (hours - at) * rate

    def to_hours(self, t: float) -> float:
        """Incident time (hours) at simulated second ``t``."""
        at, t0, rate = self._knots[0]
        for knot in self._knots:
            if knot[1] <= t:
                at, t0, rate = knot
        return at + (t - t0) / rate

    def clock_label(self, t: float) -> str:
        """The incident clock (HH:MM) at simulated time ``t``."""
        return _fmt(self.to_hours(t))

    def phase_at(self, t: float) -> Phase:
        for seg in self.segments:
            if seg.t0 <= t < seg.t1:
                return seg.phase
        return self.segments[-1].phase

    def capacity_changes(self) -> list[tuple[float, float]]:
        """(time, capacity factor) at each phase start where capacity differs."""
        out: list[tuple[float, float]] = []
        current = 1.0
        for seg in self.segments:
            if seg.phase.capacity != current or not out:
                out.append((seg.t0, seg.phase.capacity))
                current = seg.phase.capacity
        return out


def _fmt(hours: float) -> str:
    minutes = round(hours * 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _time(field: str, value: Any) -> float:
    if not isinstance(value, str) or not (m := _TIME.match(value)):
        raise PolicyError(field, value, "is not a time of day like '10:07'")
    return int(m.group(1)) + int(m.group(2)) / 60


def _str(field: str, value: Any, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise PolicyError(field, value, "is not a string")
    return value


def _unknown(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            raise PolicyError(
                f"{where}{key}",
                data[key],
                f"is not a profile setting; known: {', '.join(sorted(known))}",
            )


def _compressed(where: str, data: Mapping[str, Any]) -> None:
    for key in _COMPRESSION_KEYS & set(data):
        raise PolicyError(f"{where}{key}", data[key], _NOT_COMPRESSED)


def _table(field: str, value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(field, value, "is not a table")
    return value


def parse_profile(data: Mapping[str, Any], *, default_name: str = "profile") -> Profile:
    """Validate a parsed TOML document into a :class:`Profile`."""
    _unknown("", data, _TOP_KEYS)
    name = _str("name", data.get("name"), default_name)
    tl = _table("timeline", data.get("timeline"))
    _compressed("timeline.", tl)
    _unknown("timeline.", tl, _TIMELINE_KEYS)
    start = _time("timeline.start", tl.get("start"))
    end = _time("timeline.end", tl.get("end"))
    if end <= start:
        raise PolicyError("timeline.end", tl.get("end"), "must be after timeline.start")
    surge_raw = tl.get("surge")
    if not isinstance(surge_raw, list) or len(surge_raw) != 2:
        raise PolicyError(
            "timeline.surge", surge_raw, "is not a pair of times like ['10:07', '12:07']"
        )
    surge = (_time("timeline.surge[0]", surge_raw[0]), _time("timeline.surge[1]", surge_raw[1]))
    if not start <= surge[0] < surge[1] <= end:
        raise PolicyError("timeline.surge", surge_raw, "must be a window inside the timeline")

    raw_phases = data.get("phase")
    if not isinstance(raw_phases, list) or not raw_phases:
        raise PolicyError("phase", raw_phases, "must be a list of [[phase]] tables (at least one)")
    phases: list[Phase] = []
    for i, raw in enumerate(raw_phases):
        where = f"phase[{i}]."
        raw = _table(f"phase[{i}]", raw)
        _compressed(where, raw)
        _unknown(where, raw, _PHASE_KEYS)
        at = _time(f"{where}at", raw.get("at"))
        if i == 0 and at != start:
            raise PolicyError(
                f"{where}at", raw.get("at"), "must equal timeline.start (first phase)"
            )
        if phases and at <= phases[-1].at:
            raise PolicyError(f"{where}at", raw.get("at"), "must be after the previous phase")
        if at >= end:
            raise PolicyError(f"{where}at", raw.get("at"), "must be before timeline.end")
        load: dict[str, float] = {}
        for cls in CLASSES:
            value = raw.get(cls, 0.0)
            check_non_negative(f"{where}{cls}", value)
            load[cls] = float(value)
        capacity = raw.get("capacity", 1.0)
        check_positive(f"{where}capacity", capacity)
        if capacity > 10:
            raise PolicyError(f"{where}capacity", capacity, "must be at most 10 (x base capacity)")
        if "seconds" not in raw:
            raise PolicyError(f"{where}seconds", None, "is required: how long the phase runs")
        seconds = raw["seconds"]
        check_positive(f"{where}seconds", seconds)
        quick = raw.get("quick_seconds", seconds / 4)
        check_positive(f"{where}quick_seconds", quick)
        phases.append(
            Phase(
                at=at,
                name=_str(f"{where}name", raw.get("name"), f"phase {i}"),
                load=load,
                seconds=float(seconds),
                quick_seconds=float(quick),
                capacity=float(capacity),
                note=_str(f"{where}note", raw.get("note")),
            )
        )

    events: list[ProfileEvent] = []
    raw_events = data.get("event", [])
    if not isinstance(raw_events, list):
        raise PolicyError("event", raw_events, "must be a list of [[event]] tables")
    for i, raw in enumerate(raw_events):
        where = f"event[{i}]."
        raw = _table(f"event[{i}]", raw)
        _unknown(where, raw, _EVENT_KEYS)
        at = _time(f"{where}at", raw.get("at"))
        if not start <= at <= end:
            raise PolicyError(f"{where}at", raw.get("at"), "must be inside the timeline")
        kind = _str(f"{where}kind", raw.get("kind"), "mark")
        if kind not in _EVENT_KINDS:
            raise PolicyError(f"{where}kind", kind, f"is not one of {', '.join(_EVENT_KINDS)}")
        events.append(ProfileEvent(at, kind, _str(f"{where}label", raw.get("label"), kind)))

    server = data.get("server", {})
    server = dict(_table("server", server))
    _check_server(server)
    goals = _goals(data.get("goals", {}))
    catalog = dict(_table("catalog", data.get("catalog", {})))
    _unknown("catalog.", catalog, _CATALOG_KEYS)
    for key in ("images", "bases", "runtimes"):
        if key in catalog:
            check_int_at_least(f"catalog.{key}", catalog[key], 1)
    if "zipf_s" in catalog:
        check_non_negative("catalog.zipf_s", catalog["zipf_s"])
    return Profile(
        name=name,
        title=_str("title", data.get("title"), name),
        description=_str("description", data.get("description")),
        start=start,
        end=end,
        surge=surge,
        phases=tuple(phases),
        events=tuple(events),
        server=server,
        goals=goals,
        catalog=catalog,
    )


def _goals(raw: Any) -> dict[str, float]:
    from seawall.replay.metrics import GOALS

    table = _table("goals", raw)
    _unknown("goals.", table, set(GOALS))
    out: dict[str, float] = {}
    for key, value in table.items():
        check_non_negative(f"goals.{key}", value)
        out[key] = float(value)
    return out


def _check_server(server: dict[str, Any]) -> None:
    try:
        sim_config_from(server)
    except TypeError as exc:
        raise PolicyError("server", server, f"has an unknown setting ({exc})") from None
    except PolicyError as exc:
        raise PolicyError(f"server.{exc.field}", exc.value, exc.problem) from None


def sim_config_from(server: Mapping[str, Any], **overrides: Any) -> Any:
    """A SimConfig from a profile's ``[server]`` table (``service`` may be a sub-table)."""
    from seawall.replay.simulator import ServiceTimes, SimConfig

    data = dict(server)
    service = data.pop("service", None)
    if service is not None:
        data["service"] = ServiceTimes(**_table("service", service))
    data.update(overrides)
    return SimConfig(**data)


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with seawall (``seawall replay NAME``)."""
    files = importlib.resources.files("seawall.replay").joinpath("profiles")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".toml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (``december-2022``) or a TOML file by path."""
    text: str
    name = str(name_or_path)
    if name in shipped_profiles():
        res = importlib.resources.files("seawall.replay").joinpath("profiles", f"{name}.toml")
        text = res.read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise PolicyError(
                "profile",
                name,
                f"is neither a shipped profile ({', '.join(shipped_profiles())}) nor a file",
            )
        text = path.read_text(encoding="utf-8")
        name = path.stem
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError("profile", name, f"is not valid TOML: {exc}") from None
    return parse_profile(data, default_name=name)
