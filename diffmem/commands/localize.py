"""``diffmem localize``: find the value neurons that carry each memorized prompt (NeMo); resumable per prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline

from diffmem.commands.options import add_runtime_arguments, check_runtime_arguments, load_model, resolution
from diffmem.evaluate.localization import Localization, localize_prompts
from diffmem.localize.nemo import NemoConfig
from diffmem.localize.stats import ValueStats
from diffmem.prompt_sets import read_prompt_file

NAME = "localize"
HELP = (
    "localize the cross-attention value neurons that carry memorized prompts (NeMo), one NeuronSet per prompt"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    parser.add_argument(
        "--prompts", required=True, help="prompts to localize: .txt (one per line), .jsonl or .csv"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (neurons/<id>.json per prompt, union.json)"
    )
    parser.add_argument(
        "--caption-column", default="caption", help="prompt column of a .jsonl/.csv (default caption)"
    )
    parser.add_argument("--id-column", default=None, help="id column of a .jsonl/.csv (default: row number)")
    parser.add_argument(
        "--reference-prompts",
        default=None,
        help="non-memorized prompts: activation statistics, and the threshold unless --threshold is given",
    )
    parser.add_argument(
        "--stats", default=None, help="reuse activation statistics (.safetensors) written earlier"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="memorization threshold on the noise-difference MS-SSIM (default: calibrated on "
        "--reference-prompts as mean + 1 std; 0.428 = NeMo's SD-1.4 value when there are none)",
    )
    parser.add_argument(
        "--calibration-prompts", type=int, default=100, help="reference prompts used to calibrate"
    )
    parser.add_argument("--seeds", type=int, default=10, help="initial latents per prompt (default 10)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the latents (default 1, as NeMo)")
    parser.add_argument(
        "--steps", type=int, default=50, help="scheduler steps; the criterion uses timesteps[1]"
    )
    parser.add_argument(
        "--mask-batch",
        type=int,
        default=None,
        help="candidate masks per UNet call (1 = unbatched; default 8 on CUDA, 1 on CPU)",
    )
    parser.add_argument(
        "--blocks", default="down,mid", help="UNet parts searched: down,mid (default) or down,mid,up"
    )
    budget = parser.add_argument_group("search budget per prompt (outcome budget_exhausted when one ends it)")
    budget.add_argument("--max-unet-calls", type=int, default=None, help="UNet calls, all counted")
    budget.add_argument("--max-seconds", type=float, default=None, help="seconds of search")
    budget.add_argument(
        "--max-candidates",
        type=int,
        default=None,
        help="skip the one-neuron-at-a-time refinement when more neurons than this are left",
    )
    budget.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop when blocking every searched neuron leaves the prompt memorized (a heuristic that can skip "
        "a localizable prompt; default off: NeMo's full search and fallback set)",
    )
    parser.add_argument(
        "--ssim-range",
        default="inferred",
        help="MS-SSIM data range: inferred (per scale, NeMo's code; default) or a number (1 = diffmem before 2026-12-06)",
    )
    parser.add_argument(
        "--ssim-border",
        choices=("crop", "pad"),
        default="crop",
        help="SSIM mean over windows inside the map (crop, NeMo's torchmetrics 1.3.2; default) or every position (pad)",
    )
    add_runtime_arguments(parser)
    parser.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _data_range(text: str) -> float | None:
    """``--ssim-range``: ``inferred`` -> ``None``, else a number > 0."""
    if text == "inferred":
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"--ssim-range: expected 'inferred' or a number > 0, got {text!r}")
    return value


def _reference_prompts(args: argparse.Namespace) -> list[str] | None:
    if not args.reference_prompts:
        return None
    rows = read_prompt_file(args.reference_prompts, args.caption_column, argument="--reference-prompts")
    return [r["prompt"] for r in rows]


def _stats(path: str | None) -> ValueStats | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"--stats: {path} does not exist")
    return ValueStats.load(path)


def _config(args: argparse.Namespace, data_range: float | None, latent_size: tuple[int, int]) -> NemoConfig:
    return NemoConfig(
        n_seeds=args.seeds,
        seed=args.seed,
        num_inference_steps=args.steps,
        mask_batch=args.mask_batch,
        blocks=tuple(b.strip() for b in args.blocks.split(",") if b.strip()),
        latent_size=latent_size,
        early_exit=args.early_exit,
        data_range=data_range,
        ssim_border=args.ssim_border,
        max_unet_calls=args.max_unet_calls,
        max_seconds=args.max_seconds,
        max_candidates=args.max_candidates,
    )


def _print_result(run: Localization, out: Path, height: int, width: int) -> None:
    found = list(run.sets.values())
    localized = [
        s for s in found if s.info.get("outcome", "localized") == "localized" and s.info.get("memorized")
    ]
    counts = sorted(len(s) for s in localized)
    median = counts[len(counts) // 2] if counts else 0
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(run.outcomes.items()))
    print(
        f"{len(found)} prompt(s) ({run.new} new) at threshold {run.threshold:.3f} and {height}x{width} px: "
        f"{outcomes}; neurons per localized prompt: median {median}, max {counts[-1] if counts else 0}; "
        f"union {len(run.union)} neurons -> {out / 'union.json'}"
    )
    if run.outcomes.get("budget_exhausted"):
        left = run.union.info.get("left_out") or []
        print(
            f"budget_exhausted sets are larger than minimal (info.stopped_by in neurons/<id>.json); "
            f"{len(left)} that did not meet the criterion are left out of the union: {', '.join(map(str, left))}"
        )


def run(args: argparse.Namespace) -> int:
    check_runtime_arguments(args)
    data_range = _data_range(args.ssim_range)
    if args.seeds < 2:
        raise ValueError("--seeds: the criterion compares seeds pairwise, expected at least 2")
    if args.steps < 2:
        raise ValueError(
            f"--steps: NeMo's criterion reads timesteps[1], expected at least 2, got {args.steps}"
        )
    rows = read_prompt_file(args.prompts, args.caption_column, args.id_column)
    if args.limit is not None:
        rows = rows[: args.limit]
    reference = _reference_prompts(args)
    if args.stats is None and reference is None:
        raise ValueError(
            "--reference-prompts or --stats: activation statistics of non-memorized prompts are needed"
        )
    pipe = load_model(args, StableDiffusionPipeline)
    height, width = resolution(args, pipe)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stats = _stats(args.stats)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    result = localize_prompts(
        pipe,
        [(r["id"], r["prompt"]) for r in rows],
        reference,
        config=_config(args, data_range, latent_size),
        stats=stats,
        threshold=args.threshold,
        calibration_prompts=args.calibration_prompts,
        cache_dir=out,
        progress=not args.no_progress,
    )
    _print_result(result, out, height, width)
    return 0
