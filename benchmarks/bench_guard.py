"""Benchmark: the guarded pipeline (scoring on) against the stock pipeline, and early scoring against generation.

1. Overhead of scoring (and, separately, its cost with guidance off, where it needs one extra
   unconditional UNet call per step): ``StableDiffusionMemGuardPipeline`` vs ``StableDiffusionPipeline`` on the same
   model (shared modules, ``from_pipe``), same prompt and seed, runs interleaved in ABBA order;
   medians of wall-clock and process CPU time; the images are checked bit-identical.
2. Throughput: prompts per second of first-step scoring (``diffmem.detect.score_prompts``,
   ``window=(0, 1)`` of a 50-step schedule) against full 50-step generation with the guarded pipeline.

The model is a tiny SD-1.x-like pipeline (diffmem.tiny's text encoder, tokenizer, VAE and DDIM
scheduler) or, with ``--family sdxl``, a tiny SDXL (two text encoders, ``text_time``
micro-conditioning, Euler), both at 64x64 latents (128 px images) with a UNet that has attention
only at 16x16 and below: attention over 64x64 = 4,096 tokens is impractically slow on a CPU.

    .venv/bin/python benchmarks/bench_guard.py [--family sdxl] [--repeats 7] [--steps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline, StableDiffusionXLMemGuardPipeline
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.benchmark import compare_pipelines, first_step_throughput
from diffmem.io import atomic_write_json
from diffmem.tiny import TinySDConfig, TinySDXLConfig, build_components, build_sdxl_components


def unet_64(**family):
    """The benchmark UNet at 64x64 latents: (32, 64, 64) channels, attention at 16x16 and below only."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        norm_num_groups=32,
        **family,
    ).eval()


def build_pipeline():
    from diffusers import StableDiffusionPipeline

    components = build_components(TinySDConfig(variant="sd1", sample_size=128), seed=0)
    components["unet"] = unet_64(cross_attention_dim=32, attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_pipeline():
    """A tiny SDXL (diffmem.tiny's two text encoders, VAE, Euler) at 64x64 latents, attention at 16x16 only."""
    from diffusers import StableDiffusionXLPipeline

    config = TinySDXLConfig(sample_size=128)
    components = build_sdxl_components(config, seed=0)
    components["unet"] = unet_64(
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=2 * config.text_hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + config.text_hidden,
    )
    pipe = StableDiffusionXLPipeline(**components, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--score-prompts", type=int, default=8)
    parser.add_argument("--generate-prompts", type=int, default=2)
    parser.add_argument("--num-gens", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    parser.add_argument("--json", default=None, help="also write the results here (atomically)")
    parser.add_argument(
        "--family", choices=["sd", "sdxl"], default="sd", help="tiny SD-1.x (default) or tiny SDXL"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    if args.family == "sdxl":
        stock, guarded_class = build_sdxl_pipeline(), StableDiffusionXLMemGuardPipeline
    else:
        stock, guarded_class = build_pipeline(), StableDiffusionMemGuardPipeline
    guarded = guarded_class.from_pipe(stock)
    guarded.set_progress_bar_config(disable=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": args.threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "family": args.family,
        "overhead": compare_pipelines(stock, guarded, args.repeats, num_inference_steps=args.steps),
        # guidance off: the score needs one extra unconditional UNet call per step (about 2x the UNet time)
        "overhead_guidance_off": compare_pipelines(
            stock, guarded, max(3, args.repeats // 2), num_inference_steps=args.steps, guidance_scale=1.0
        ),
        "throughput": first_step_throughput(
            guarded, [args.score_prompts], args.generate_prompts, args.num_gens
        ),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
