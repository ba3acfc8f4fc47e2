"""Every Python code block in README.md and docs/*.md runs as written.

Each block runs alone in a fresh interpreter (as a reader would paste it), in a scratch
directory with HOME pointing there, so it needs its own imports and its own ``app``.
When the block defines an ASGI ``app``, one request is sent through it, which builds the
middleware stack (Starlette builds it lazily: a wrong keyword would pass unnoticed).

A block that is deliberately not runnable (a fragment showing a pattern) is marked by
the line ``<!-- docs-test: skip (why) -->`` right above its fence; use it sparingly.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b.*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")

# Blocks of pages other helpers are editing, failing when this test landed: the lead
# fixes them after merging (an entry that starts passing fails here: remove it then).
KNOWN_FAILING: dict[str, str] = {}

DRIVER = """
import asyncio, runpy, sys
namespace = runpy.run_path(sys.argv[1], run_name="__main__")
app = namespace.get("app")
if callable(app):
    import httpx

    async def probe():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://docs") as client:
            response = await client.get("/")
            assert response.status_code < 500, response.status_code

    asyncio.run(probe())
"""


@dataclass(frozen=True)
class Block:
    page: str
    index: int  # 1-based among the page's Python blocks
    line: int
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}"


def python_blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        start, lang = i, m.group(1)
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if lang not in ("python", "py"):
            continue
        above = lines[start - 1] if start > 0 else ""
        skip = above if SKIP.match(above) else None
        page = path.relative_to(ROOT).as_posix()
        blocks.append(Block(page, len(blocks) + 1, start + 1, "\n".join(body), skip))
    return blocks


BLOCKS = [b for page in PAGES for b in python_blocks(page)]


def test_blocks_are_found() -> None:
    assert any(b.page == "README.md" for b in BLOCKS)
    assert any(b.page == "docs/operations.md" for b in BLOCKS)
    assert all(key in {b.id for b in BLOCKS} for key in KNOWN_FAILING), "stale entry"


def test_the_parser_sees_fences_and_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    page = tmp_path / "p.md"
    page.write_text(
        "```sh\nmake\n```\n\n```python\nx = 1\n```\n<!-- docs-test: skip (a fragment) -->\n"
        "```python\ny\n```\n"
    )
    first, second = python_blocks(page)
    assert (first.code, first.skip, first.line) == ("x = 1", None, 5)
    assert second.skip is not None and second.index == 2


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b,
            id=b.id,
            marks=[pytest.mark.xfail(reason=KNOWN_FAILING[b.id], strict=True)]
            if b.id in KNOWN_FAILING
            else [],
        )
        for b in BLOCKS
    ],
)
def test_code_block_runs(block: Block, tmp_path: Path) -> None:
    if block.skip:
        pytest.skip(f"{block.page}:{block.line} marked {block.skip}")
    script = tmp_path / "block.py"
    script.write_text(block.code + "\n", encoding="utf-8")
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{block.page}:{block.line} fails:\n{result.stderr[-2000:]}"
