"""The rules the compiled build asks of its modules (docs/design.md, "The compiled build").

`make test-compiled` runs the whole suite on the mypyc build; these checks hold on the
source, so a change that breaks a rule fails `make test` too, before anything compiles.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
COMPILED = HOOK["targets"]["wheel"]["hooks"]["mypyc"]["include"]


def awaits_in_finally(source: str) -> list[int]:
    """Lines of every ``await`` (or ``async for`` / ``async with``) inside a ``finally:``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Try | ast.TryStar):
            for stmt in node.finalbody:
                for inner in ast.walk(stmt):
                    if isinstance(inner, ast.Await | ast.AsyncFor | ast.AsyncWith):
                        found.append(inner.lineno)
    return found


def test_the_check_finds_an_await_in_a_finally() -> None:
    source = "async def f(w):\n    try:\n        pass\n    finally:\n        await w\n"
    assert awaits_in_finally(source) == [5]
    assert awaits_in_finally(source.replace("finally", "except BaseException")) == []


@pytest.mark.parametrize("path", COMPILED)
def test_no_await_inside_finally_in_a_compiled_module(path: str) -> None:
    # mypyc 2.4.1 let a caught CancelledError escape such a block in the shedder's wait
    assert awaits_in_finally((ROOT / path).read_text()) == []


def test_the_compiled_modules_are_the_server_stacks_hot_path() -> None:
    # storage.py stays out: compiled, a user's subclass of BoundedMemoryStorage breaks
    assert sorted(COMPILED) == [
        "src/seawall/asgi/_http.py",
        "src/seawall/asgi/cache.py",
        "src/seawall/asgi/ratelimit.py",
        "src/seawall/asgi/shed.py",
        "src/seawall/lru.py",
        "src/seawall/ratelimit.py",
        "src/seawall/shed.py",
    ]
