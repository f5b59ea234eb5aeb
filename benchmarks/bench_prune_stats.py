"""Benchmark: FFN statistics for subspace pruning accumulated on the device vs copied to the host each call.

Both runs generate the same prompts with the same seeds for the same ``tau`` steps; only how the
statistics are gathered differs:

* ``device``: :func:`diffmem.localize.prune.collect_ffn_stats` (row-normalised column sums of squares
  accumulated in float32 where the model runs, nothing leaves the device);
* ``host copy``: a pre-hook copies every call's full activation to the host, and the same statistic is
  computed there after each generation (the reference implementation's way);
* ``host copy, all steps``: the same without stopping the generation after ``tau`` steps (the reference
  runs every step), to show what the early stop saves.

The two results must agree (checked); the script prints the median time of each over ``--repeats``
runs and their ratio, and can append a line to benchmarks/RESULTS.md's section by hand.

    python benchmarks/bench_prune_stats.py [--model DIR] [--prompts 8] [--tau 10] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from diffmem.benchmark import interleaved
from diffmem.hooks.ffn import StepCounter, ffn_layers
from diffmem.localize.prune import collect_ffn_stats
from diffmem.modelio import load_pipeline
from diffmem.seeding import item_generator


def host_copy_stats(pipe, prompts, tau, steps, guidance_scale, seed, batch_size, early_stop=True):
    """The baseline: every activation copied to the host, then reduced there."""

    layers = ffn_layers(pipe.unet)
    device = pipe._execution_device
    counter = StepCounter(stop_after=tau if early_stop else None)
    sums = {n: torch.zeros(tau, m.in_features) for n, m in layers.items()}
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        captured: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in layers}

        def make(name, captured=captured):
            def hook(_m, inputs):
                if counter.index < tau:
                    captured[name].append((counter.index, inputs[0].detach().to("cpu", copy=True)))

            return hook

        handles = [m.register_forward_pre_hook(make(n)) for n, m in layers.items()]
        counter.reset()
        try:
            pipe(
                batch,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=[item_generator(seed, i, device=device) for i in range(start, start + len(batch))],
                output_type="latent",
                callback_on_step_end=counter.callback,
            )
        finally:
            pipe._interrupt = False
            for h in handles:
                h.remove()
        for name, items in captured.items():
            for t, x in items:
                x = x.reshape(-1, x.shape[-1]).float()
                x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
                sums[name][t] += x.square().sum(0)
    return sums


def stat_runs(pipe, prompts, tau: int, steps: int, batch_size: int) -> dict:
    """The three ways of gathering the statistics, each a callable returning ``{layer: sums}`` on the host."""
    kw = dict(tau=tau, steps=steps, guidance_scale=7.5, seed=0, batch_size=batch_size)

    def run_device():
        stats = collect_ffn_stats(
            pipe,
            prompts,
            num_steps=tau,
            num_inference_steps=steps,
            batch_size=batch_size,
            seed=0,
            progress=False,
        )
        return {n: s.cpu() for n, s in stats.sumsq.items()}

    return {
        "device": run_device,
        "host copy": lambda: host_copy_stats(pipe, prompts, **kw),
        "host copy, all steps": lambda: host_copy_stats(pipe, prompts, **kw, early_stop=False),
    }


def main() -> None:
    from diffusers import StableDiffusionPipeline

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="SD folder (default: the organism, else a tiny model)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tau", type=int, default=10)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    pipe = load_pipeline(args.model, StableDiffusionPipeline, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"benchmark prompt number {i}" for i in range(args.prompts)]
    runs = stat_runs(pipe, prompts, args.tau, args.steps, args.batch_size)
    runs["device"](), runs["host copy"]()  # warm-up
    times, results = interleaved(runs, args.repeats)  # interleaved, so load changes hit all alike
    dev, host = results["device"], results["host copy"]
    worst = max(float(((dev[n] - host[n]).abs() / host[n].abs().clamp_min(1e-6)).max()) for n in dev)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, device {args.device}"
    )
    print(f"model: {args.model or 'default'} ({len(dev)} FFN layers), {args.prompts} prompts, tau {args.tau}")
    for k, v in med.items():
        print(f"  {k:10s} median {v:.3f} s  (runs: {', '.join(f'{x:.3f}' for x in times[k])})")
    print(
        f"  host copy / device = {med['host copy'] / med['device']:.2f}x; max relative difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
