"""Policies: frozen, validated dataclasses with artifact-tuned defaults (see base.py)."""

from seawall.policy.base import PolicyBase

__all__ = ["PolicyBase"]
