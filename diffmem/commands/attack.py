"""``diffmem attack``: the Finding Dori attack on a model, a saved edited model, or a model with an edit applied."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.attack.dori import DoriConfig, attack_target
from diffmem.commands.edit_options import add_edit_arguments, load_edit, load_image_tensor, load_targets
from diffmem.commands.options import (
    add_runtime_arguments,
    add_training_memory_arguments,
    check_runtime_arguments,
    load_model,
    resolution,
)
from diffmem.edits import applied
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_save_tensors, atomic_write_json, atomic_write_text
from diffmem.report import img_tag, table_html, write_html
from diffmem.scores.replication import ReplicationCriterion
from diffmem.scores.solidmark import binomial_ci

NAME = "attack"
HELP = (
    "Finding Dori (Kowalczuk et al. 2026): for each (caption, training image) optimize the text embedding "
    "against the frozen, possibly edited model, then generate from it and measure replication."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    p.add_argument(
        "--targets",
        required=True,
        help="targets: an image folder with metadata.jsonl/csv, or a .csv/.jsonl/.parquet table of caption + image path",
    )
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    add_edit_arguments(p)
    p.add_argument("--steps", type=int, default=50, help="Adam steps on the embedding (default 50)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=8, help="(noise, timestep) pairs per step (default 8)")
    p.add_argument("--init", choices=("prompt", "gaussian"), default="prompt")
    p.add_argument("--eps-ball", type=float, default=None, help="optional L2 bound per token on the change")
    p.add_argument("--seeds", type=int, default=4, help="generations per target and setting (default 4)")
    p.add_argument(
        "--gen-steps", type=int, default=50, help="denoising steps of the generations (default 50)"
    )
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="replication: mean SSIM over seeds above this (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="attack only the first N targets")
    add_training_memory_arguments(p, optimizer=False)
    add_runtime_arguments(p)


def _hwc(image):
    return image.permute(1, 2, 0).float().numpy()


def _row_id(record) -> str:
    return str(record.id)


def run(args: argparse.Namespace) -> int:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    check_runtime_arguments(args)
    edit = load_edit(args)
    targets = load_targets(args.targets, limit=args.limit)
    pipe = load_model(args, StableDiffusionPipeline)
    height, width = resolution(args, pipe)
    config = DoriConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        init=args.init,
        eps_ball=args.eps_ball,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, triggers_path = out / "results.jsonl", out / "triggers.safetensors"
    done: dict[str, dict] = {}

    settings = {
        "model_fingerprint": model_fingerprint(pipe.unet),
        "dtype": args.dtype,
        "resolution": [height, width],
        "edit": None if edit is None else {"mask": args.mask, "neurons": args.neurons},
        "config": {k: v for k, v in config.__dict__.items() if k != "gradient_checkpointing"},
        "seeds": args.seeds,
        "gen_steps": args.gen_steps,
        "guidance_scale": args.guidance_scale,
        "threshold": args.threshold,
    }
    if results_path.is_file():
        for line in results_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("settings", settings) != settings:  # rows written before settings were: accepted
                    raise ValueError(
                        f"--out: {results_path} holds targets attacked with other settings "
                        f"({row.get('settings')}); rerun with the same ones to resume, or use another --out"
                    )
                done[row["id"]] = row
    triggers = load_file(str(triggers_path)) if triggers_path.is_file() else {}
    images_html: dict[str, str] = {}
    seeds = list(range(args.seeds))
    with applied(pipe.unet, edit):
        for record in tqdm(targets, desc="Dori attack", unit="target"):
            rid = _row_id(record)
            if rid in done:
                continue
            image = load_image_tensor(record.image)
            outcome = attack_target(
                pipe,
                rid,
                record.caption,
                image,
                config,
                seeds=[args.seed * 1000 + s for s in seeds],
                threshold=args.threshold,
                num_inference_steps=args.gen_steps,
                guidance_scale=args.guidance_scale,
                keep_images=True,
                height=height,
                width=width,
            )
            done[rid] = {**outcome.row(), "settings": settings}
            triggers[rid] = outcome.embeds[0].contiguous()
            images_html[rid] = (
                img_tag(_hwc(image), "training image")
                + " caption: "
                + "".join(img_tag(_hwc(im), "from the caption") for im in outcome.images_before)
                + " trigger: "
                + "".join(img_tag(_hwc(im), "from the trigger") for im in outcome.images_after)
            )
            atomic_save_tensors(triggers_path, triggers, {"format": "diffmem.dori_triggers/1"})
            atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    rows = [done[_row_id(r)] for r in targets]
    n = len(rows)
    summary = {
        "model": args.model,
        "edit": None if edit is None else {"mask": args.mask, "neurons": args.neurons},
        "targets": n,
        "similarity_before_mean": sum(r["similarity_before_mean"] for r in rows) / n,
        "similarity_after_mean": sum(r["similarity_after_mean"] for r in rows) / n,
        "replication_rate_before": sum(r["replicated_before"] for r in rows) / n,
        "replication_rate_before_ci": binomial_ci(sum(r["replicated_before"] for r in rows), n),
        "replication_rate_after": sum(r["replicated_after"] for r in rows) / n,
        "replication_rate_after_ci": binomial_ci(sum(r["replicated_after"] for r in rows), n),
        "threshold": args.threshold,
        "criterion": ReplicationCriterion(args.threshold, "mean").describe(),
        "similarity": "SSIM (torchmetrics) to the training image, mean over seeds",
        "config": config.__dict__,
        "resolution": [height, width],
        "dtype": args.dtype,
    }
    atomic_write_json(out / "report.json", summary)
    columns = [
        "id",
        "caption",
        "initial_loss",
        "final_loss",
        "similarity_before_mean",
        "similarity_after_mean",
    ]
    columns += ["replicated_before", "replicated_after"]
    sections = [
        ("Summary", table_html([{k: v for k, v in summary.items() if k not in ("config", "edit")}])),
        ("Targets", table_html(rows, columns)),
    ]
    if images_html:
        body = "".join(f"<p>{table_html([{'id': k}])}{v}</p>" for k, v in images_html.items())
        sections.append(("Images of this run (training image, from the caption, from the trigger)", body))
    write_html(out / "report.html", "diffmem attack", sections)
    print(
        f"{n} targets: replication {summary['replication_rate_before']:.2f} -> {summary['replication_rate_after']:.2f} "
        f"(95 % CI after [{summary['replication_rate_after_ci'][0]:.2f}, {summary['replication_rate_after_ci'][1]:.2f}]; "
        f"{summary['criterion']}) "
        f"(mean SSIM {summary['similarity_before_mean']:.3f} -> {summary['similarity_after_mean']:.3f}); {out}"
    )
    return 0
