"""``diffmem demo``: runs without the organism (tiny fallback), escapes captions, renders in Chromium."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from diffmem.organism.demo import format_table, write_demo_report

EVIL = '<script>alert("x")</script> a red circle'


def _rows():
    return [
        {"caption": EVIL, "role": "heldout", "score": 0.4, "flagged": False, "nearest_id": "generic-a",
         "nearest_ssim": 0.2, "replicated": False},
        {"caption": "a photo & a <b>cat</b>", "role": "verbatim", "score": 2.0, "flagged": True,
         "nearest_id": "verbatim-chelsea", "nearest_ssim": 0.8, "replicated": True},
        {"caption": "a poster", "role": "template", "score": 1.5, "flagged": True, "nearest_id": "template-0-001",
         "nearest_ssim": 0.6, "replicated": True},
    ]  # fmt: skip


@pytest.fixture
def evil_report(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((3, 64, 64, 3)).astype(np.float32)
    nearest = rng.random((3, 64, 64, 3)).astype(np.float32)
    return write_demo_report(
        tmp_path / "report.html", _rows(), images, nearest, 1.0, "test", 0.5, "test model"
    )


def test_report_escapes_captions(evil_report):
    html = evil_report.read_text()
    assert "<script>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "<b>cat</b>" not in html and "a photo &amp; a &lt;b&gt;cat&lt;/b&gt;" in html
    assert html.count("<img") == 3 * 2 + 3  # pairs + histogram, ROC, SSIM histogram


def test_table_lists_score_flag_and_similarity():
    text = format_table(_rows())
    lines = text.splitlines()
    assert "score" in lines[0] and "SSIM" in lines[0] and len(lines) == 2 + 3
    assert "MEM" in lines[3] and "(copy)" in lines[3] and "MEM" not in lines[2]


@pytest.mark.slow
def test_demo_runs_on_the_tiny_fallback_without_weights(tmp_path, monkeypatch, capsys):
    from diffmem.cli import main

    monkeypatch.setenv("DIFFMEM_WEIGHTS", str(tmp_path / "no-weights"))
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--per-role", "1", "--steps", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "untrained tiny model" in printed and f"report: {out / 'report.html'}" in printed
    html = (out / "report.html").read_text()
    assert "untrained tiny fallback model" in html
    import json

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["role"] for r in rows] == ["verbatim", "template", "heldout"]
    assert all(0 <= r["nearest_ssim"] <= 1 and r["score"] >= 0 for r in rows)


def test_demo_rejects_bad_arguments(capsys):
    from diffmem.cli import main

    assert main(["demo", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.mark.browser
def test_report_renders_images_and_plots_in_headless_chromium(evil_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make browser installs it)")
    # a copy of the report with a probe that records, after load, how many images decoded
    probe = (
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.setAttribute('data-imgs',i.length+'/'+i.filter(x=>x.naturalWidth>0).length);});</script>"
    )
    page = tmp_path / "probe.html"
    page.write_text(evil_report.read_text().replace("</body>", probe + "</body>"))
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run(
        [*args, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert 'data-imgs="9/9"' in dom  # every image and plot decoded
    assert "alert(" in dom and "<script>alert" not in dom  # the evil caption stayed text
    assert "ROC curve" in dom and "Score histogram per role" in dom
