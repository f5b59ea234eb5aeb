"""``diffmem organism data|prompts|train|eval|classifier``: the model organism's data, training, measurements."""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL

from diffmem.cli import UsageError
from diffmem.modelio import check_sd_folder, default_model
from diffmem.organism.data import ROLES, build_organism_data, export_imagefolder
from diffmem.organism.evaluate import run_evaluation, write_labelled_prompts
from diffmem.organism.fidelity import build_caption_classifier
from diffmem.organism.recipe import RECIPES, TINY_RECIPE
from diffmem.train.organism import train_organism
from diffmem.train.organism_bundle import export_run, import_run

NAME = "organism"
HELP = "the model organism: export its training data, train it, measure its memorization"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="organism_command", metavar="<step>")
    p = sub.add_parser("data", help="export the training set as an imagefolder with metadata.jsonl")
    p.add_argument(
        "--out", required=True, help="folder to write (train/*.png, metadata.jsonl, manifest.json)"
    )
    p.add_argument("--seed", type=int, default=0)
    _recipe_argument(p)

    p = sub.add_parser("prompts", help="write the organism's captions as a labelled prompts file (.csv)")
    p.add_argument("--out", required=True, help="CSV to write: caption, role, label (1 = memorized)")
    p.add_argument(
        "--roles",
        default="verbatim,heldout",
        help="comma-separated roles to include (default verbatim,heldout; also template, generic)",
    )
    p.add_argument(
        "--memorized-roles",
        default="verbatim,template",
        help="roles labelled 1 (default verbatim,template: the captions whose images were duplicated)",
    )
    _recipe_argument(p)

    p = sub.add_parser("train", help="train the organism from scratch (resumes from --workdir)")
    p.add_argument("--workdir", default="runs/organism", help="checkpoints and logs (default runs/organism)")
    p.add_argument("--out", default=None, help="pipeline folder to write (default <workdir>/model)")
    p.add_argument("--seed", type=int, default=0)
    _recipe_argument(p)
    p.add_argument("--unet-steps", type=int, default=None, help="override the recipe's UNet steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the recipe's autoencoder steps")
    p.add_argument(
        "--only",
        choices=["vae", "decoder", "unet"],
        default=None,
        help="run only this phase (decoder and unet may run side by side in two processes)",
    )
    p.add_argument("--snapshot-every", type=int, default=None, help="also save the pipeline every N steps")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)"
    )
    p.add_argument("--tiny", action="store_true", help="a seconds-long run of a tiny recipe (smoke test)")
    p.add_argument(
        "--resume-from",
        default=None,
        metavar="BUNDLE",
        help="a run exported with `diffmem organism export-run`: rebuilt in an empty --workdir, then resumed",
    )

    p = sub.add_parser(
        "export-run", help="write a training run's latest checkpoint compactly, to commit and resume"
    )
    p.add_argument("--workdir", required=True, help="the run's --workdir")
    p.add_argument("--out", required=True, help="folder to write (replaced)")
    p.add_argument(
        "--phase",
        choices=["unet", "decoder", "vae"],
        default=None,
        help="export this phase's latest checkpoint (default: the latest phase that has one)",
    )

    p = sub.add_parser("eval", help="measure replication and detection on a trained organism")
    p.add_argument("--model", default=None, help="organism folder (default: the embedded organism)")
    p.add_argument("--out", default="runs/organism-eval", help="folder for results.json and the histogram")
    p.add_argument("--seeds", type=int, default=4, help="generations per caption")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the recipe's)")

    p = sub.add_parser("classifier", help="train the caption classifier that measures caption fidelity")
    p.add_argument("--out", required=True, help="folder to write (model.safetensors, README.md)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--model",
        default=None,
        help="organism whose autoencoder reconstructions are also measured (default: the embedded one)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads")


def _recipe_argument(parser: argparse.ArgumentParser) -> None:

    parser.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        default="v2",
        help="which organism: v2 (every photo 48 copies) or v3 (1-64 copies, trigger prompts); default v2",
    )


def _data(args: argparse.Namespace) -> None:
    data = build_organism_data(RECIPES[args.recipe].with_(seed=args.seed))
    out = export_imagefolder(data, args.out)
    counts = data.manifest()["counts"]
    print(f"wrote {sum(counts['training_samples'].values())} training samples to {out} ({counts})")


def _prompts(args: argparse.Namespace) -> None:
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    memorized = {r.strip() for r in args.memorized_roles.split(",") if r.strip()}
    unknown = sorted((set(roles) | memorized) - set(ROLES))
    if unknown or not roles:
        raise UsageError(
            f"--roles/--memorized-roles: unknown role(s) {unknown}; expected some of {list(ROLES)}"
        )
    n = write_labelled_prompts(args.out, build_organism_data(RECIPES[args.recipe]), roles, memorized)
    print(f"wrote {n} captions ({', '.join(roles)}) to {args.out}")


def _train(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads))
    if args.tiny and args.recipe != "v2":
        raise UsageError("--tiny: a smoke test of the tiny recipe; it takes no --recipe")
    recipe = (TINY_RECIPE if args.tiny else RECIPES[args.recipe]).with_(seed=args.seed)
    if args.unet_steps is not None:
        recipe = recipe.with_(unet_steps=args.unet_steps)
    if args.vae_steps is not None:
        recipe = recipe.with_(vae_steps=args.vae_steps)
    if args.resume_from is not None:
        print(f"[organism] rebuilt {import_run(args.resume_from, args.workdir)} from {args.resume_from}")
    out = train_organism(recipe, args.workdir, args.out, snapshot_every=args.snapshot_every, only=args.only)
    print(f"organism saved to {out}")


def _export_run(args: argparse.Namespace) -> None:
    print(f"run exported to {export_run(args.workdir, args.out, args.phase)}")


def _eval(args: argparse.Namespace) -> None:
    results = run_evaluation(args.model, args.out, seeds=args.seeds, steps=args.steps)
    print(results["summary_text"])


def _classifier(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, args.threads))
    model = args.model or default_model()
    vae = None
    if model is not None:
        vae = AutoencoderKL.from_pretrained(
            str(check_sd_folder(model)), subfolder="vae", use_safetensors=True
        )
    metrics = build_caption_classifier(args.out, steps=args.steps, seed=args.seed, vae=vae)
    for key in ("fresh_renderings", "autoencoder_reconstructions"):
        if key in metrics:
            f = metrics[key]
            print(
                f"{key.replace('_', ' ')}: colour {f['colour']:.1%}, shape {f['shape']:.1%}, both {f['both']:.1%}"
            )
    print(f"caption classifier saved to {args.out}")


#: ``diffmem organism <step>`` -> what it runs.
STEPS = {
    "data": _data,
    "prompts": _prompts,
    "train": _train,
    "export-run": _export_run,
    "eval": _eval,
    "classifier": _classifier,
}


def run(args: argparse.Namespace) -> int:
    step = STEPS.get(args.organism_command)
    if step is None:
        raise UsageError("choose a step: data, prompts, train, eval or classifier")
    step(args)
    return 0
