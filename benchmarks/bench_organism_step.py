"""Benchmark: where one UNet-phase step of the organism's training goes, and what the speedups buy.

The model is organism v4's (``V4_RECIPE``: the UNet and the 128-wide, 6-layer CLIP text encoder, built by
:func:`diffmem.train.organism.build_organism_components`, random init), trained on synthetic latents
(smooth random fields, one distinct caption per image) at the recipe's batch size; a step is the
trainer's own (:func:`~diffmem.train.organism.unet_batch`, :func:`~diffmem.train.organism.unet_loss`,
backward, gradient clipping, AdamW, the lr schedule, ``zero_grad(set_to_none=True)``, the logged loss).
Every variant starts from the same weights and runs the same steps, interleaved in ABBA order, so
the ratios hold under a drifting load; at the end each variant's losses and weights are compared
with the baseline's, bit for bit. ``--loss-steps N``: then float32 and bfloat16 autocast train N more
steps each from one fresh init, to compare their losses.

Variants: ``float32`` (the baseline: the trainer before issue #31, stock ``torch.optim.AdamW``),
``touched_rows`` (the trainer now: :class:`~diffmem.train.optimizers.TouchedRowsAdamW` skips the
token-embedding rows no caption uses), ``channels_last`` (UNet and input in NHWC), ``adamw_foreach`` /
``adamw_fused`` (AdamW's multi-tensor / fused CPU kernels), ``bf16`` (forward passes under
``torch.autocast("cpu", dtype=torch.bfloat16)``, float32 master weights) and ``bf16_eager`` (the same
with the attention computed by matmul + softmax instead of PyTorch's CPU flash-attention kernel);
``bf16_eager_fused`` adds the fused AdamW.

    python benchmarks/bench_organism_step.py [--latents 16 32] [--rounds 6] [--steps-per-round 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.benchmark import interleaved
from diffmem.organism.recipe import V4_RECIPE
from diffmem.train.checkpoint import save_checkpoint
from diffmem.train.optimizers import TouchedRowsAdamW
from diffmem.train.organism import (
    _lr_lambda,
    _tokenize,
    build_organism_components,
    unet_batch,
)

PHASES = (
    "batch",
    "text encoder",
    "UNet forward + loss",
    "backward",
    "clip",
    "AdamW + lr",
    "zero_grad",
    "log",
)
VARIANTS = (
    "float32",
    "touched_rows",
    "channels_last",
    "adamw_foreach",
    "adamw_fused",
    "bf16",
    "bf16_eager",
    "bf16_eager_fused",
)


class Run:
    """One variant's model, optimizer and per-phase clock; ``steps(k)`` runs its next ``k`` steps."""

    def __init__(self, variant: str, base: dict, recipe, data, lr_warmup: int):
        self.variant, self.recipe, self.data = variant, recipe, data
        self.unet, self.text = copy.deepcopy(base["unet"]), copy.deepcopy(base["text_encoder"])
        if variant == "channels_last":
            self.unet.to(memory_format=torch.channels_last)
        if variant.startswith("bf16_eager"):
            self.unet.set_attn_processor(AttnProcessor())
            self.text.set_attn_implementation("eager")
        self.params = list(self.unet.parameters()) + list(self.text.parameters())
        kw = (
            {"foreach": True} if variant == "adamw_foreach" else {"fused": True} if "fused" in variant else {}
        )
        if variant == "touched_rows":
            emb = self.text.get_input_embeddings().weight
            self.opt = TouchedRowsAdamW(self.params, lr=recipe.unet_lr, weight_decay=0.0, row_sparse=[emb])
        else:
            self.opt = torch.optim.AdamW(self.params, lr=recipe.unet_lr, weight_decay=0.0, **kw)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(recipe.unet_steps, lr_warmup))
        self.unet.train(), self.text.train()
        self.step, self.losses = 0, []
        self.clock = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0

    def _tick(self, phase: str, t0: float) -> float:
        t = time.perf_counter()
        self.clock[phase] += t - t0
        return t

    def steps(self, k: int) -> None:
        samples, latents, tokens, empty, alphas = self.data
        bf16 = self.variant.startswith("bf16")
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        for _ in range(k):
            t0 = time.perf_counter()
            zt, t, ids, noise = unet_batch(self.recipe, self.step, samples, latents, tokens, empty, alphas)
            if self.variant == "channels_last":
                zt = zt.contiguous(memory_format=torch.channels_last)
            t0 = self._tick("batch", t0)
            with amp:
                cond = self.text(ids)[0]
                t0 = self._tick("text encoder", t0)
                loss = F.mse_loss(self.unet(zt, t, cond).sample.float(), noise)
            t0 = self._tick("UNet forward + loss", t0)
            loss.backward()
            t0 = self._tick("backward", t0)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            t0 = self._tick("clip", t0)
            self.opt.step()
            self.sched.step()
            t0 = self._tick("AdamW + lr", t0)
            self.opt.zero_grad(set_to_none=True)
            t0 = self._tick("zero_grad", t0)
            self.losses.append(float(loss.detach()))
            self._tick("log", t0)
            self.step += 1
            self.timed_steps += 1

    def reset_clock(self) -> None:
        self.clock = dict.fromkeys(PHASES, 0.0)
        self.timed_steps = 0

    def weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]


def synthetic_data(recipe, tokenizer, size: int, n: int = 512, seed: int = 0):
    """``(samples, latents, tokens, empty, alphas)`` as the trainer builds them, for ``n`` synthetic
    images: latents are smooth random fields (bilinearly upsampled 4x4 noise) of unit std."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, recipe.latent_channels, 4, 4, generator=g)
    latents = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    latents = (latents / latents.std()).contiguous()
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
    shapes = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "moon")
    captions = [
        f"a {colours[i % 8]} {shapes[(i // 8) % 8]} and a {colours[(i // 64) % 8]} thing, number {i}"
        for i in range(n)
    ]
    tokens = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]
    return torch.arange(n), latents, tokens, empty, torch.linspace(0.9999, 0.005, 1000)


def checkpoint_seconds(run: Run, recipe) -> float:
    """One checkpoint of the run's modules and optimizer (as the trainer writes every ``checkpoint_every``)."""
    with tempfile.TemporaryDirectory(prefix="bench-organism-step-") as tmp:
        t0 = time.perf_counter()
        save_checkpoint(
            tmp, run.step, {"unet": run.unet, "text_encoder": run.text}, {"adamw": run.opt}, {"lr": run.sched}
        )
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--latents", type=int, nargs="+", default=[16, 32], help="latent sizes (16: 64 px, 32: 128 px)"
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=6, help="ABBA rounds (after one warm-up round)")
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--loss-steps", type=int, default=0, help="then float32 vs bf16 over this many steps")
    ap.add_argument("--loss-variant", default="bf16_eager", choices=["bf16", "bf16_eager"])
    ap.add_argument("--warmup", type=int, default=10, help="lr warm-up steps (the recipe's is 200)")
    ap.add_argument(
        "--profile", type=int, default=0, help="then torch.profiler's top N ops of 2 float32 steps"
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = V4_RECIPE
    base = build_organism_components(recipe)
    print(
        f"# organism v4 UNet step, batch {recipe.unet_batch}, {args.threads} thread(s), {cpu_model()}, "
        f"torch {torch.__version__}, {datetime.date.today()}"
    )
    for size in args.latents:
        data = synthetic_data(recipe, base["tokenizer"], size)
        runs = {
            v: Run(v, base, recipe, data, args.warmup)
            for v in ["float32"] + [v for v in args.variants if v != "float32"]
        }
        for r in runs.values():  # warm-up round, untimed
            r.steps(args.steps_per_round)
            r.reset_clock()
        times, _ = interleaved(
            {v: (lambda r=r: r.steps(args.steps_per_round)) for v, r in runs.items()}, args.rounds, abba=True
        )
        base_run = runs["float32"]
        ckpt = checkpoint_seconds(base_run, recipe)
        print(
            f"\n## latents {size}x{size} ({size * 4} px): per step, ms (median over rounds / ratio to float32)"
        )
        per_step = {v: statistics.median(t) / args.steps_per_round for v, t in times.items()}
        ratios = {v: statistics.median(b / x for b, x in zip(times["float32"], times[v])) for v in times}
        head = "| phase | " + " | ".join(runs) + " |"
        print(head + "\n|" + "---|" * (len(runs) + 1))
        for ph in PHASES:
            cells = [f"{r.clock[ph] / r.timed_steps * 1000:.1f}" for r in runs.values()]
            print(f"| {ph} | " + " | ".join(cells) + " |")
        ck = ckpt / recipe.checkpoint_every * 1000
        print(
            f"| checkpoint ({ckpt:.2f} s / {recipe.checkpoint_every} steps) | "
            + " | ".join(f"{ck:.1f}" for _ in runs)
            + " |"
        )
        print(
            "| **step (wall, median)** | " + " | ".join(f"**{per_step[v] * 1000:.0f}**" for v in runs) + " |"
        )
        print(
            "| speedup vs float32 (median of paired ratios) | "
            + " | ".join(f"{ratios[v]:.2f}x" for v in runs)
            + " |"
        )
        ref_w, ref_l = base_run.weights(), base_run.losses
        same = []
        for r in runs.values():
            w = r.weights()
            ident = r.losses == ref_l and all(torch.equal(a, b) for a, b in zip(ref_w, w))
            diff = max(float((a - b).abs().max()) for a, b in zip(ref_w, w))
            same.append(f"{'yes' if ident else 'no'} (max |dw| {diff:.1e})")
        print(f"| bit-identical to float32 after {base_run.step} steps | " + " | ".join(same) + " |")
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                base_run.steps(2)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
        if args.loss_steps:  # float32, a float32 that differs by rounding only (fused AdamW), and bf16
            names = ("float32", "adamw_fused", args.loss_variant)
            fresh = {v: Run(v, base, recipe, data, args.warmup) for v in names}
            for r in fresh.values():
                r.steps(args.loss_steps)
            init = list(base["unet"].parameters()) + list(base["text_encoder"].parameters())
            ref = fresh["float32"]
            moved = sum(float((x - w.detach()).square().sum()) for x, w in zip(ref.weights(), init)) ** 0.5
            tail = max(1, args.loss_steps // 5)
            print(
                f"\nfrom one init, {args.loss_steps} steps on the same batches (lr warm-up {args.warmup} steps):"
            )
            for v, r in fresh.items():
                apart = sum(float((x - y).square().sum()) for x, y in zip(ref.weights(), r.weights())) ** 0.5
                print(
                    f"- {v}: mean loss of the last {tail} steps {statistics.mean(r.losses[-tail:]):.4f}, first "
                    f"{r.losses[0]:.4f}; |w - w_float32| / |w_float32 - w_init| = {apart / moved:.1e}; losses "
                    + " ".join(f"{x:.3f}" for i, x in enumerate(r.losses) if (i + 1) % 10 == 0)
                )


if __name__ == "__main__":
    main()
