"""Policies: frozen, validated dataclasses with artifact-tuned defaults.

One module per mechanism; ``file.py`` reads them all from one ``seawall.toml``.
"""

from seawall.policy.base import PolicyBase
from seawall.policy.breaker import BreakerPolicy
from seawall.policy.cache import CachePolicy
from seawall.policy.file import Policies, load_policies
from seawall.policy.ratelimit import LimitRule, RateLimitPolicy
from seawall.policy.retry import ClientPolicy, RetryPolicy
from seawall.policy.shed import RequestClass, ShedPolicy

__all__ = [
    "BreakerPolicy",
    "CachePolicy",
    "ClientPolicy",
    "LimitRule",
    "Policies",
    "PolicyBase",
    "RateLimitPolicy",
    "RequestClass",
    "RetryPolicy",
    "ShedPolicy",
    "load_policies",
]
