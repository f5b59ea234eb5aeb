"""The scan end to end on a tiny model whose "memorized" captions are known.

Planted memorization: for three captions the training image *is* the tiny model's own generation 0 for
that caption and seed (what a verbatim-memorizing model would produce), the other training images are
unrelated. A correct scan must find exactly those three, with the right nearest training ids, and set
aside every kind of bad row without stopping.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmem.data import ImageFolderWriter
from diffmem.scan.results import load_results
from diffmem.scan.runner import ScanConfig, run_scan
from diffmem.seeding import derive_seed

CAPTIONS = [
    "a red kettle on a table",
    'a <script>alert("x")</script> & friends',
    "a map of an island",
    "two dogs in the snow",
    "a blue bicycle",
    "a bowl of green apples",
    "a lighthouse at night",
    "an old wooden door",
]
PLANTED = {"c0", "c3", "c6"}
SCAN = dict(
    num_gens=2,
    steps=2,
    shard_size=2,
    batch_size=2,
    pixel_size=16,
    tiled_l2=True,
    keep_images=2,
    ssim_rerank=2,
)
BAD = {  # the row with an empty caption ("blank") is no bad row: its image is a training image
    "missing_file": 1,
    "duplicate_id": 1,
    "corrupt_image": 1,
    "cmyk_image": 1,
    "high_bit_depth": 1,
}


def _pipe(model_dir):
    from diffmem.guard.auto import load_guarded

    pipe = load_guarded(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a loaded 2-core machine, two OpenMP threads per process run ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_sd1_dir):
    """An image folder: 8 captions (3 with planted copies, labelled), plus one row of each bad kind."""
    from diffmem.generation import initial_latents

    pipe = _pipe(tiny_sd1_dir)
    folder = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    with ImageFolderWriter(folder) as w:
        for i, caption in enumerate(CAPTIONS):
            cid = f"c{i}"
            if cid in PLANTED:
                latents = initial_latents(pipe, [cid], SCAN["num_gens"], 0)
                image = pipe(
                    prompt=[caption],
                    num_images_per_prompt=SCAN["num_gens"],
                    latents=latents,
                    num_inference_steps=SCAN["steps"],
                    guidance_scale=7.5,
                    output_type="np",
                ).images[0]
                arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            else:
                arr = np.asarray(
                    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32))
                )
            w.add(cid, caption, arr, memorized=int(cid in PLANTED))
            if i == 2:  # bad rows in the middle of the data
                w.add("dup", "a duplicate id", arr, memorized=0)
                w.add("dup", "the same id again", arr, memorized=0)
    Image.new("CMYK", (32, 32), (0, 50, 100, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((32, 32), 30000, dtype=np.uint16)).save(folder / "deep.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
        for row in [
            {"file_name": "cmyk.jpg", "id": "cmyk", "text": "a cmyk photo", "memorized": 0},
            {"file_name": "deep.png", "id": "deep", "text": "a 16-bit photo", "memorized": 0},
            {"file_name": "broken.png", "id": "broken", "text": "a broken file", "memorized": 0},
            {"file_name": "nowhere.png", "id": "nowhere", "text": "a missing file", "memorized": 0},
            {"file_name": "c1.png", "id": "blank", "text": "", "memorized": 0},
        ]:
            f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="module")
def reference(planted, tiny_sd1_dir, tmp_path_factory):
    """An uninterrupted single-process scan of the planted folder."""
    out = tmp_path_factory.mktemp("scan") / "ref"
    cfg = ScanConfig(data=str(planted), out=str(out), model=str(tiny_sd1_dir), progress=False, **SCAN)
    summary = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    return out, summary, cfg


def _rows(out):
    res = load_results(out)
    gens = sorted(res["gens"].to_pylist(), key=lambda r: (r["row"], r["gen"]))
    scores = sorted(res["scores"].to_pylist(), key=lambda r: r["row"])
    return gens, scores


def test_scan_finds_the_planted_copies(reference):
    out, summary, cfg = reference
    gens, scores = _rows(out)
    ids = ["c0", "c1", "c2", "dup", "c3", "c4", "c5", "c6", "c7"]
    assert [s["id"] for s in scores] == ids  # bad rows neither scored nor generated
    assert len(gens) == 18 and summary["generations"] == 18
    best = {}
    for g in gens:
        assert g["seed"] == derive_seed(0, g["id"], g["gen"])
        if g["id"] not in best or g["similarity"] > best[g["id"]]["similarity"]:
            best[g["id"]] = g
    for cid, g in best.items():
        if cid in PLANTED:
            assert g["gen"] == 0 and g["nn_id"] == cid and g["similarity"] > 0.99 and g["verbatim"]
            assert g["ssim_nn_id"] == cid and g["ssim"] > 0.95 and g["ssim_replicated"]
        else:
            assert g["similarity"] < 0.8 and not g["replicated"]
    assert max(g["ssim"] for g in gens if g["id"] not in PLANTED) < 0.5
    assert summary["flags_verbatim"]["precision"] == 1.0 and summary["flags_verbatim"]["recall"] == 1.0
    assert summary["captions_verbatim"] == 3 and summary["max_similarity_auc"] == 1.0
    assert summary["flags_ssim"]["precision"] == 1.0 and summary["flags_ssim"]["recall"] == 1.0
    # Somepalli et al.'s statistics, from the rows themselves
    sims = np.array([g["similarity"] for g in gens])
    assert summary["sim_mean"] == pytest.approx(sims.mean(), abs=1e-6)
    assert summary["sim_95pc"] == pytest.approx(np.percentile(sims, 95), abs=1e-6)
    assert summary["sim_gt_0.8"] == pytest.approx((sims > 0.8).mean())
    # "dup" reuses c2's image, "blank" (no caption) c1's: the background sees them
    assert summary["bg_n"] == 10 and summary["bg_max"] > 0.99
    assert summary["training_images_without_caption"] == 1
    # every bad row recorded with its reason; the scan went on
    assert summary["bad_rows_by_reason"] == BAD and summary["rows_read"] == 8 + 2 + 5
    # the generation's own first-step score equals the scoring stage's for the same noise
    by_id = {s["id"]: s for s in scores}
    for g in gens:
        assert g["score"] == pytest.approx(by_id[g["id"]]["gen_scores"][g["gen"]], rel=1e-4)
    # Carlini's check ran (distinct noise gives distinct images on this model: no clique of 2)
    assert all(g["carlini_clique"] == 1 for g in gens) and summary["captions_carlini"] == 0
    # kept images for the report: every planted copy is among them
    assert {g["id"] for g in gens if g["image_file"] and g["verbatim"]} == PLANTED
    assert all((out / g["image_file"]).is_file() for g in gens if g["image_file"])


def test_rerun_is_a_no_op_and_settings_must_match(reference, tiny_sd1_dir):
    out, summary, cfg = reference
    before = {p: p.stat().st_mtime_ns for p in (out / "gens").iterdir()}
    again = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in (out / "gens").iterdir()} == before
    other = ScanConfig(**{**cfg.__dict__, "seed": 1})
    with pytest.raises(ValueError, match="--out: .* other settings \\(seed"):
        run_scan(other, pipe=_pipe(tiny_sd1_dir))


def test_two_stage_generates_only_the_top_fraction(reference, planted, tiny_sd1_dir, tmp_path):
    ref_out, _, cfg = reference
    _, ref_scores = _rows(ref_out)
    top = ScanConfig(**{**cfg.__dict__, "out": str(tmp_path / "top"), "generate": "top", "top_fraction": 0.5})
    summary = run_scan(top, pipe=_pipe(tiny_sd1_dir))
    gens, scores = _rows(tmp_path / "top")
    assert scores == ref_scores  # the first stage scores everything, identically
    ranked = sorted(ref_scores, key=lambda s: (-s["score"], s["id"]))
    expected = {s["id"] for s in ranked[:5]}  # ceil(0.5 * 9)
    assert {g["id"] for g in gens} == expected
    ts = summary["two_stage"]
    assert ts["generation_saved_fraction"] == pytest.approx(4 / 9) and ts["captions_generated"] == 5
    assert set(ts["memorized_not_generated_ids"]) == PLANTED - expected
    # the same generations as the full scan's (batches differ, so floats agree to rounding)
    ref_gens = [g for g in _rows(ref_out)[0] if g["id"] in expected]
    exact = ("row", "id", "gen", "seed", "nn_row", "nn_id", "verbatim", "replicated", "carlini_clique")
    assert [{k: g[k] for k in exact} for g in gens] == [{k: g[k] for k in exact} for g in ref_gens]
    for a, b in zip(gens, ref_gens):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-5)
        assert a["score"] == pytest.approx(b["score"], rel=1e-5)


def test_scores_only_mode_reads_caption_tables(tmp_path, tiny_sd1_dir):
    table = tmp_path / "captions.csv"
    table.write_text("id,caption\na,one caption\nb,\nc,another caption\na,dup\nd,one caption\n")
    common = dict(model=str(tiny_sd1_dir), generate="none", progress=False, **SCAN)
    cfg = ScanConfig(data=str(table), out=str(tmp_path / "o"), **common)
    summary = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    assert summary["bad_rows_by_reason"] == {"duplicate_id": 1, "empty_caption": 1}
    # "d" repeats the caption of "a": scored once, at its first row
    assert summary["captions_scored"] == 2 and summary["usable_rows_not_scored"] == 1
    assert load_results(tmp_path / "o")["scores"].column("id").to_pylist() == ["a", "c"]
    every = ScanConfig(data=str(table), out=str(tmp_path / "all"), unique_captions=False, **common)
    assert run_scan(every, pipe=_pipe(tiny_sd1_dir))["captions_scored"] == 3
    assert "generations" not in summary and (tmp_path / "o" / "report.html").is_file()


def test_cli_errors_name_the_argument(tmp_path, capsys):
    from diffmem.cli import main

    assert main(["scan", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["scan", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--num-gens", "0"]) == 2
    assert "--num-gens" in capsys.readouterr().err


def _cli(planted, model, out) -> list[str]:
    return [
        "scan", "--data", str(planted), "--out", str(out), "--model", str(model), "--num-gens", "2", "--steps", "2",
        "--shard-size", "2", "--batch-size", "2", "--pixel-size", "16", "--tiled-l2", "--keep-images", "2", "--ssim-rerank", "2",
        "--no-progress",
    ]  # fmt: skip


def _same_results(a: Path, b: Path) -> None:
    ga, sa = _rows(a)
    gb, sb = _rows(b)
    assert sa == sb
    assert gb == ga
    ja = json.loads((a / "summary.json").read_text())
    jb = json.loads((b / "summary.json").read_text())
    assert ja == jb


@pytest.mark.slow
def test_sigkilled_scan_resumes_to_the_same_rows(reference, planted, tiny_sd1_dir, tmp_path):
    ref_out, _, _ = reference
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "diffmem", *_cli(planted, tiny_sd1_dir, out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    gens = out / "gens"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if gens.is_dir() and len(list(gens.glob("gens-*.parquet"))) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the scan finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list(gens.glob("gens-*.parquet")))
    assert 1 <= done_at_kill < 6  # killed in the middle of the generation stage
    assert not (out / "summary.json").exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _same_results(ref_out, out)


@pytest.mark.slow
def test_accelerate_two_processes_merge_to_the_single_process_result(
    reference, planted, tiny_sd1_dir, tmp_path
):
    ref_out, _, _ = reference
    out = tmp_path / "two"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmem", *_cli(planted, tiny_sd1_dir, out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # shard k is written by process k % 2; the merged run is whole: 13 catalog rows (15 read less the
    # missing file, the duplicate id; the caption-less "blank" is one) in shards of 2
    assert ShardCount(out) == ShardCount(ref_out) == 7
    _same_results(ref_out, out)


def ShardCount(out: Path) -> int:  # noqa: N802
    return len(list((out / "gens").glob("gens-*.parquet")))


@pytest.mark.browser
def test_report_renders_in_headless_chromium(reference, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make browser installs it)")
    out, summary, _ = reference
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [*args, "--dump-dom", (out / "report.html").as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    assert "Worst offenders" in dom and "Similarity against the background" in dom and "ROC" in dom
    assert "<script>" not in dom  # the caption stayed text: no script element was created
    assert dom.count("<img") >= 2 * 3 + 3  # planted pairs (generation + training image) and the plots
    shot = tmp_path / "report.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1000,1400", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    assert shot.is_file()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.std() > 10  # something was drawn
