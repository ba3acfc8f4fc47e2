"""Exceptions that seawall raises on purpose."""

from __future__ import annotations

from typing import Any

__all__ = ["PolicyError", "SeawallError"]


class SeawallError(Exception):
    """Base class of every exception seawall raises deliberately."""


class PolicyError(SeawallError, ValueError):
    """A policy value is invalid. The message names the field and the value.

    >>> str(PolicyError("limit", "ten per sec", "is not a rate like '100/second'"))
    "limit: 'ten per sec' is not a rate like '100/second'"
    """

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}: {value!r} {problem}")
