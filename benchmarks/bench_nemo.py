"""Benchmark: NeMo localization with batched candidate evaluation against the one-candidate-at-a-time algorithm.

Both run in the same process on the same model, statistics and threshold, prompt by prompt in
alternating order (ABBA), so machine load hits both alike. ``mask_batch=1`` is the original
algorithm (one UNet call per candidate set, at the kept seeds); ``mask_batch=B`` evaluates ``B``
candidate sets per UNet call and the greedy refinement speculatively (``diffmem.localize.nemo``).
Reported: seconds per prompt, UNet calls, candidate sets evaluated, and whether the neurons found
are identical.

Models: ``--model DIR`` (e.g. the organism, with its verbatim captions as prompts and its generic
captions as non-memorized references), or by default the planted-neuron tiny model of the tests
with several trigger words.

    .venv/bin/python benchmarks/bench_nemo.py [--model weights/diffmem-organism-v2] [--mask-batch 8]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.benchmark import timed
from diffmem.io import atomic_write_json
from diffmem.localize.nemo import MemorizationProbe, NeMo, NemoConfig
from diffmem.localize.stats import compute_value_stats
from diffmem.modelio import load_pipeline
from diffmem.organism.data import build_organism_data
from diffmem.tiny import TinySDConfig, build_components

ROOT = Path(__file__).resolve().parents[1]


class ReferenceCostProbe:
    """Mixin: the cost of the authors' evaluation: one candidate per call, all seeds, plus the forward at
    ``timesteps[0]`` whose result their loop discards. The scores are the same."""

    def scores(self, blocked):
        out = []
        for mask in blocked.to(self.device):
            t = self.t
            self.t = self.scheduler.timesteps[0]
            try:
                self._deltas(self.latents, mask[None])  # the discarded first forward
            finally:
                self.t = t
            deltas = self._deltas(self.latents, mask[None])[0]
            out.append(self.similarity(deltas, self.base)[self.kept].max())
        return torch.stack(out)


def planted_setup():
    """The tests' planted-neuron model, with the trigger in several prompts."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_nemo import REFERENCE, TRIGGER, plant_trigger_neuron

    c = build_components(TinySDConfig(variant="sd1"), seed=0)
    plant_trigger_neuron(c)
    prompts = [
        f"a photo of {TRIGGER}",
        f"{TRIGGER} on a bike",
        f"a painting of {TRIGGER} at night",
        f"{TRIGGER} and a dog",
    ]
    return c, prompts, REFERENCE, "tiny SD-1.x with a planted trigger neuron (tests/test_nemo.py)"


def organism_setup(model: str, limit: int):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(model, pipeline_class=StableDiffusionPipeline)
    data = build_organism_data()
    prompts = data.captions("verbatim")[:limit]
    reference = data.captions("generic")
    c = {k: getattr(pipe, k) for k in ("unet", "scheduler", "text_encoder", "tokenizer")}
    return c, prompts, reference, f"{model} (verbatim captions)"


def nemo_runs(c: dict, reference, threshold: float | None, mask_batch: int, theta0: float):
    """``(threshold, {name: NeMo})``: the reference-cost, one-at-a-time and batched localizers on the same
    value statistics and threshold (calibrated on ``reference`` when ``threshold`` is None)."""
    stats = compute_value_stats(c["unet"], c["text_encoder"], c["tokenizer"], reference, progress=False)
    parts = (c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], stats)
    if threshold is None:
        threshold = NeMo(*parts, NemoConfig()).calibrate_threshold(reference[:12])
    ref = NeMo(*parts, NemoConfig(threshold=threshold, mask_batch=1, theta0=theta0))
    ref.probe_class = type("RefProbe", (ReferenceCostProbe, MemorizationProbe), {})
    return threshold, {
        "reference_cost": ref,
        "one_at_a_time": NeMo(*parts, NemoConfig(threshold=threshold, mask_batch=1, theta0=theta0)),
        "batched": NeMo(*parts, NemoConfig(threshold=threshold, mask_batch=mask_batch, theta0=theta0)),
    }


def timed_localizations(runs: dict, prompts) -> list[dict]:
    """Every localizer on every prompt, in alternating order (ABBA): time, UNet calls, neurons found."""
    rows = []
    for i, prompt in enumerate(prompts):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # ABBA
        row = {"prompt": prompt}
        for name in order:
            wall, cpu, res = timed(lambda name=name, prompt=prompt: runs[name].localize(prompt))
            row[name] = {
                "seconds": wall,
                "cpu_seconds": cpu,
                "unet_calls": res.info["unet_calls"],
                "masks": res.info.get("masks_evaluated", 0),
                "neurons": res.items(),
                "memorized": res.info["memorized"],
            }
            print(
                f"{name:14s} {wall:7.2f} s (cpu {cpu:7.2f} s)  calls {row[name]['unet_calls']:4d}  "
                f"neurons {len(row[name]['neurons'])}  {prompt!r}",
                flush=True,
            )
        row["same_neurons"] = all(row[name]["neurons"] == row["batched"]["neurons"] for name in runs)
        rows.append(row)
    return rows


def summary(rows: list[dict], names) -> dict:
    """Means over the prompts the batched run found memorized: seconds, CPU seconds, UNet calls, speed-ups."""
    mem = [r for r in rows if r["batched"]["memorized"]]

    def mean(key, empty=float("nan")):
        return {name: statistics.mean(r[name][key] for r in mem) if mem else empty for name in names}

    t = mean("seconds")
    return {
        "memorized_prompts": len(mem),
        "seconds_per_prompt": t,
        "cpu_seconds_per_prompt": mean("cpu_seconds"),
        "speedup_vs_one_at_a_time": t["one_at_a_time"] / t["batched"] if mem else None,
        "speedup_vs_reference_cost": t["reference_cost"] / t["batched"] if mem else None,
        "unet_calls_per_prompt": mean("unet_calls", None),
        "same_neurons": all(r["same_neurons"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="SD folder (default: the planted tiny model)")
    parser.add_argument("--limit", type=int, default=4, help="prompts (organism: first N verbatim captions)")
    parser.add_argument("--mask-batch", type=int, default=8)
    parser.add_argument(
        "--theta0", type=float, default=5.0, help="start of the OOD schedule (lower: more candidates)"
    )
    parser.add_argument("--threshold", type=float, default=None, help="default: calibrated on the references")
    parser.add_argument("--json", default=str(ROOT / "benchmarks/results/bench_nemo.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    c, prompts, reference, label = organism_setup(args.model, args.limit) if args.model else planted_setup()
    threshold, runs = nemo_runs(c, reference, args.threshold, args.mask_batch, args.theta0)
    rows = timed_localizations(runs, prompts[: args.limit])
    s = summary(rows, runs)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores (shared), torch {torch.__version__}, threads {torch.get_num_threads()}",
        "model": label,
        "threshold": threshold,
        "mask_batch": args.mask_batch,
        "memorized_prompts": s["memorized_prompts"],
        "theta0": args.theta0,
        **s,
        "rows": rows,
    }
    atomic_write_json(args.json, result)
    t = s["seconds_per_prompt"]
    t_one, t_bat = t["one_at_a_time"], t["batched"]
    print(
        f"\n{label}: {s['memorized_prompts']}/{len(rows)} memorized prompts; one-at-a-time {t_one:.2f} s/prompt, "
        f"batched (x{args.mask_batch}) {t_bat:.2f} s/prompt, speed-up {t_one / t_bat:.2f}x; reference-cost "
        f"{t['reference_cost']:.2f} s/prompt ({t['reference_cost'] / t_bat:.2f}x); "
        f"same neurons: {s['same_neurons']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
