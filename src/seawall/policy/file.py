"""One policy file for every mechanism: ``seawall.toml``.

Each table configures one mechanism with the same validation as keyword arguments::

    [ratelimit]
    limit = "100/minute"

    [shed]
    max_limit = 200

    [client.retry]
    attempts = 3

    [cache]
    max_stale = 86400

A missing table means "not configured" (``None``), so a caller can tell a user's choice
from a default. Unknown tables or keys are errors that name the file and the path.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seawall.errors import PolicyError
from seawall.policy.base import PolicyBase
from seawall.policy.cache import CachePolicy
from seawall.policy.ratelimit import RateLimitPolicy
from seawall.policy.retry import ClientPolicy
from seawall.policy.shed import ShedPolicy

__all__ = ["Policies", "load_policies"]


@dataclass(frozen=True, slots=True)
class Policies(PolicyBase):
    """The policies a ``seawall.toml`` holds; a table left out is ``None``."""

    ratelimit: RateLimitPolicy | None = None
    shed: ShedPolicy | None = None
    client: ClientPolicy | None = None
    cache: CachePolicy | None = None

    def __post_init__(self) -> None:
        expected = {
            "ratelimit": RateLimitPolicy,
            "shed": ShedPolicy,
            "client": ClientPolicy,
            "cache": CachePolicy,
        }
        for name, kind in expected.items():
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise PolicyError(name, value, f"is not a table of {kind.__name__} settings")


def load_policies(path: str | Path) -> Policies:
    """Read and validate a policy file; errors name the file and the setting."""
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(str(path), str(path), f"cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(str(path), str(path), f"is not valid TOML: {exc}") from None
    try:
        return Policies.from_dict(data)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc.field}", exc.value, exc.problem) from None
