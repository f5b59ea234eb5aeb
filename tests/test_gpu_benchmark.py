"""``benchmarks/gpu.py --smoke``: the GPU benchmark's every section runs (on a tiny model, on the CPU), so
the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_smoke.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu.py"), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == {"guard", "detection", "nemo", "scan", "faiss"}
    assert not any("error" in s for s in sections.values())
    guard = sections["guard"]
    assert guard["sdpa"]["images_bit_identical"] and guard["naive"]["images_bit_identical"]
    assert [r["batch_size"] for r in sections["detection"]["first_step"]] == [1, 4]
    nemo = sections["nemo"]
    assert nemo["candidate_scores_max_abs_diff"] < 1e-5  # batched masks score exactly as one at a time
    runs = nemo["search"]["runs"].values()
    assert nemo["search"]["same_neurons"] and all(r["planted_found"] for r in runs)  # the known answer
    assert sections["scan"]["generations"] == 4 * sections["scan"]["captions"]
    ivfpq = sections["faiss"]["ivfpq"]  # a prebuilt index searched as a scan does
    assert ivfpq["factory"].startswith("IVF") and ivfpq["cpu_top1_is_source"] >= 0.95
