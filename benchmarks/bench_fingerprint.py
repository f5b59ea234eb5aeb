"""Benchmark: the cost of the model fingerprint (every weight hashed) on SD-1.5's 860M-parameter UNet.

Random weights in SD-1.5's architecture (``diffmem.tiny.build_sd15_architecture_pipeline``). Reported
as ratios against one UNet call of the same run (batch 2, 64x64 latents, i.e. one guided step at
512 px): the full content hash (``content_fingerprint``, computed once per load), a cached
``model_fingerprint`` check (every edit validation), ``diffmem.edits.applied`` entered and left on a
NeuronSet, and the old names/shapes/input-layers fingerprint it replaces.

    .venv/bin/python benchmarks/bench_fingerprint.py [--repeats 3] [--json benchmarks/results/bench_fingerprint.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time

import torch
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.edits import NeuronSet, applied
from diffmem.fingerprint import content_fingerprint, legacy_fingerprint, model_fingerprint
from diffmem.hooks.neurons import value_layers
from diffmem.io import atomic_write_json
from diffmem.tiny import build_sd15_architecture_pipeline


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    unet = build_sd15_architecture_pipeline().unet.eval()
    x = torch.randn(2, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1))

    def unet_call():
        with torch.no_grad():
            unet(x, 500, encoder_hidden_states=text)

    unet_call()  # warm-up
    base = _median_seconds(unet_call, args.repeats)
    full = _median_seconds(lambda: content_fingerprint(unet), args.repeats)
    model_fingerprint(unet)
    cached = _median_seconds(lambda: model_fingerprint(unet), 20)
    names = list(value_layers(unet))
    neurons = NeuronSet(model_fingerprint(unet), names, [[0, 1]] + [[] for _ in names[1:]])

    def edit_round_trip():
        with applied(unet, neurons):
            pass

    edit = _median_seconds(edit_round_trip, 5)
    legacy = _median_seconds(lambda: legacy_fingerprint(unet), args.repeats)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {cpu_model()}, {args.threads} threads, torch {torch.__version__}",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "seconds": {
            "unet_call_b2_64x64": base,
            "content_fingerprint": full,
            "cached_check": cached,
            "applied_round_trip": edit,
            "legacy_fingerprint": legacy,
        },
        "ratio_to_unet_call": {
            "content_fingerprint": full / base,
            "cached_check": cached / base,
            "applied_round_trip": edit / base,
            "legacy_fingerprint": legacy / base,
        },
    }
    print(json.dumps(results, indent=1))
    if args.json:
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
