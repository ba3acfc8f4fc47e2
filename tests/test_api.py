"""The public API is what docs/api.md says it is."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import seawall

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def documented_names() -> list[str]:
    return re.findall(r"^\| `([A-Za-z_][A-Za-z0-9_]*)` \|", DOC.read_text(), flags=re.M)


def test_all_is_exactly_what_the_docs_list() -> None:
    names = documented_names()
    assert len(names) == len(set(names)), "a name is documented twice"
    assert sorted(names) == sorted(seawall.__all__)


def test_every_exported_name_exists() -> None:
    missing = [name for name in seawall.__all__ if not hasattr(seawall, name)]
    assert missing == []


def test_importing_seawall_does_not_import_requests() -> None:
    code = "import sys, seawall; print('requests' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_readme_one_liner_works() -> None:
    from starlette.applications import Starlette

    from seawall import RateLimitMiddleware, RateLimitPolicy

    app = Starlette()
    app.add_middleware(RateLimitMiddleware, policy=RateLimitPolicy(limit="100/minute"))
    assert app.user_middleware[0].cls is RateLimitMiddleware
