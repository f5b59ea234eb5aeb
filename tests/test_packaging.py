"""Every package folder is listed in pyproject (diffmem.pipelines lives in pipelines/, so the list is explicit)."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffmem").rglob("__init__.py")}
    found.add("diffmem.pipelines")
    assert found == listed


def test_cli_help_lists_commands():
    from diffmem.cli import build_parser

    text = build_parser().format_help()
    assert "diffmem" in text


def test_public_surface_is_lazy_and_complete():
    """``import diffmem`` loads no torch; every exported name resolves."""
    import subprocess
    import sys

    code = "import sys, diffmem; assert 'torch' not in sys.modules; [getattr(diffmem, n) for n in diffmem.__all__]"
    subprocess.run([sys.executable, "-c", code], check=True)
