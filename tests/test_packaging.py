"""What a user expects of a package: a version, a licence, metadata, helpful missing extras."""

from __future__ import annotations

import os
import sys
from importlib.metadata import metadata
from pathlib import Path

import pytest

import seawall
from seawall.cli import compiled_modules, main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_says_which_build_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    if os.environ.get("SEAWALL_EXPECT_COMPILED") == "1":  # `make test-compiled`
        assert compiled_modules() == sorted(
            [
                "seawall.asgi._http",
                "seawall.asgi.cache",
                "seawall.asgi.ratelimit",
                "seawall.asgi.shed",
                "seawall.lru",
                "seawall.ratelimit",
                "seawall.shed",
            ]
        )
        assert out == f"seawall {seawall.__version__} (7 modules compiled)"
    else:
        assert compiled_modules() == []
        assert out == f"seawall {seawall.__version__} (pure Python)"


def test_installed_metadata_matches_the_package() -> None:
    meta = metadata("seawall")
    assert meta["Version"] == seawall.__version__
    assert meta["License-Expression"] == "MIT" or meta["License"] == "MIT"
    classifiers = meta.get_all("Classifier") or []
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"prometheus", "otel", "lab", "redis", "requests", "docs"} <= extras


def test_license_and_changelog_ship() -> None:
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{seawall.__version__}]" in changelog or "## [Unreleased]" in changelog


def test_replay_charts_without_the_lab_extra_name_the_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    argv = ["replay", "december-2022", "--quick", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pip install 'seawall[lab]'" in err and "ModuleNotFoundError" not in err
    assert len(err.strip().splitlines()) == 1


def test_optional_exporters_name_their_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "seawall.telemetry.prometheus", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'seawall\[prometheus\]'"):
        import seawall.telemetry.prometheus
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.delitem(sys.modules, "seawall.telemetry.otel", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'seawall\[otel\]'"):
        import seawall.telemetry.otel  # noqa: F401


def test_replay_errors_are_one_unbroken_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "40")
    pol = tmp_path / "a-rather-long-directory-name-for-a-policy" / "p.toml"
    pol.parent.mkdir()
    pol.write_text("[shed]\nmin_limit = 0\n")
    assert main(["replay", "december-2022", "--policy", str(pol)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "shed.min_limit: 0 must be" in err
