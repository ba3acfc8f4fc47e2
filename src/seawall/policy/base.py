"""What every policy shares: construction from a dict or TOML, and field validation.

Policies are frozen dataclasses that validate themselves in ``__post_init__``; the
helpers here keep every error message in one shape (``field: value problem``) and make
unknown keys an error instead of a silent no-op, at any depth.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Self

from seawall.errors import PolicyError

__all__ = [
    "PolicyBase",
    "check_fraction",
    "check_int_at_least",
    "check_non_negative",
    "check_positive",
]


class PolicyBase:
    """Mixin for frozen policy dataclasses: ``from_dict``, ``to_dict``, ``replace``."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "") -> Self:
        """Build from a mapping (a TOML table); unknown keys and bad values raise PolicyError."""
        if not isinstance(data, Mapping):
            raise PolicyError(where or cls.__name__, data, "is not a table of settings")
        known = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                raise PolicyError(
                    f"{where}{key}",
                    data[key],
                    f"is not a setting of {cls.__name__}; known: {', '.join(known)}",
                )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _convert(hints[k], v, f"{where}{k}") for k, v in data.items()}
        try:
            return cls(**kwargs)
        except PolicyError as exc:
            if where and not exc.field.startswith(where):
                raise PolicyError(f"{where}{exc.field}", exc.value, exc.problem) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        """The policy as plain data (what ``from_dict`` accepts)."""
        return _plain(self)  # type: ignore[no-any-return]

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed, validated like a new policy."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, PolicyBase) and isinstance(value, Mapping):
        return hint.from_dict(value, where=f"{where}.")
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(hint):
            if isinstance(arg, type) and issubclass(arg, PolicyBase) and isinstance(value, Mapping):
                return arg.from_dict(value, where=f"{where}.")
        if isinstance(value, list):
            for arg in typing.get_args(hint):
                if typing.get_origin(arg) in (tuple, frozenset):
                    return _convert(arg, value, where)
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(hint)
        item = args[0] if args else Any
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is frozenset and isinstance(value, list | tuple | set | frozenset):
        return frozenset(value)
    return value


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, frozenset | set):
        return sorted(_plain(v) for v in value)
    return value


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise PolicyError(field, value, "is not a number")
    return float(value)


def check_positive(field: str, value: Any) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not (0 < _number(field, value) < math.inf):
        raise PolicyError(field, value, "must be a finite number greater than 0")


def check_non_negative(field: str, value: Any) -> None:
    """Raise unless ``value`` is a finite number >= 0."""
    if not (0 <= _number(field, value) < math.inf):
        raise PolicyError(field, value, "must be a finite number of at least 0")


def check_fraction(field: str, value: Any) -> None:
    """Raise unless ``value`` is a number between 0 and 1 inclusive."""
    if not (0 <= _number(field, value) <= 1):
        raise PolicyError(field, value, "must be a fraction between 0 and 1")


def check_int_at_least(field: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PolicyError(field, value, f"must be a whole number of at least {minimum}")


MAX_WINDOW = 10 * 365 * 24 * 3600
"""Longest window of any rate (ten years): Redis refuses key TTLs past its range."""


def check_statuses(field: str, value: Any, low: int, high: int) -> frozenset[int]:
    """The HTTP statuses in ``value`` as a frozenset; raise unless it is a list of them
    between ``low`` and ``high``. A bare number is refused (it used to raise a TypeError)."""
    if isinstance(value, str | bytes) or not isinstance(value, set | frozenset | list | tuple):
        raise PolicyError(field, value, "must be a list of HTTP statuses, e.g. [503]")
    for status in value:
        if isinstance(status, bool) or not isinstance(status, int) or not low <= status <= high:
            raise PolicyError(field, status, f"must be an HTTP status between {low} and {high}")
    return frozenset(value)
