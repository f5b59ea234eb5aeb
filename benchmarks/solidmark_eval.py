"""SolidMark on the model organism: key its training set, fine-tune it on the keyed set, score every
verbatim-duplicated photo and a sample of the other images against chance, a shuffled-key null, a
freshly initialized UNet and the unkeyed organism; optionally before and after NeMo and adversarial
fine-tuning.

Recipe (CPU, resumable at every stage; rerun the same command after an interruption)::

    python benchmarks/solidmark_eval.py                      # everything, defaults below
    python benchmarks/solidmark_eval.py --write-results      # also rewrite RESULTS.md's SolidMark section
    python benchmarks/solidmark_eval.py --nemo               # also localize the verbatim captions with NeMo
    python benchmarks/solidmark_eval.py --adversarial        # ... and adversarially fine-tune (implies --nemo)
    python benchmarks/solidmark_eval.py --smoke              # a minutes-long dry run on the tiny recipe

Stages (all under --workdir, default runs/solidmark-organism):

1. ``data``: the organism's training set (``diffmem organism data``), duplicates as separate rows,
   with its ``role`` and ``image_id`` columns.
2. ``keyed``: a SolidMark frame of --frame-width px (default 8 = 2 latent pixels of the organism's
   factor-4 autoencoder, as the paper's 16 px are 2 latent pixels of SD's factor 8) around every
   64-px image -> 80 px. Copies of one photo share one key (``--share-duplicate-keys``): with a fresh
   key per copy, 48 copies under one caption carry 48 different frames and no single key can be
   memorized (the paper's duplication study then needs "nearest key among copies", whose chance
   rate grows with the number of copies).
3. ``finetune``: the organism's UNet (and with --train-text-encoder its text encoder) fine-tuned on
   the keyed set; the VAE stays frozen.
   The keyed organism is saved to --out-model (default weights/diffmem-organism-v2-solidmark) with a
   model card.
4. ``score-*``: outpainting runs (DDIM, --score-steps, guidance 3, the training caption):
   keyed model, freshly initialized UNet, unkeyed organism; one copy of each distinct image.
5. ``nemo`` (optional): neurons of every verbatim caption on the keyed model (NeMo, statistics and
   threshold from the generic captions), the union switched off during a scoring run.
6. ``adversarial`` (optional): ``diffmem finetune --adversarial`` of the keyed model, the verbatim
   keyed photos as targets, surrogates made with the NeMo union off, generic keyed images as retain
   data; then the verbatim photos are scored again.

Results: ``WORKDIR/results.json`` and ``WORKDIR/results.md`` (the RESULTS.md section).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DELTAS = (0.1, 0.05, 0.005)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "weights" / "diffmem-organism-v2"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "solidmark-organism"))
    p.add_argument("--out-model", default=str(ROOT / "weights" / "diffmem-organism-v2-solidmark"))
    p.add_argument(
        "--recipe", default=None, help="organism recipe JSON (default: the model's, else the default)"
    )
    p.add_argument("--frame-width", type=int, default=8)
    p.add_argument("--finetune-steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lr-scheduler", default="constant", help="diffusers get_scheduler name (e.g. linear)")
    p.add_argument(
        "--train-text-encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fine-tune the text encoder with the UNet (default; it recalls keys better)",
    )
    p.add_argument("--score-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--rest-sample", type=int, default=64, help="distinct non-verbatim images to score")
    p.add_argument(
        "--generations",
        type=int,
        default=10,
        help="generations per image (default 10, the paper's duplication study); per-image rates average them",
    )
    p.add_argument(
        "--nemo", action="store_true", help="also score with the NeMo neurons of the verbatim captions"
    )
    p.add_argument("--neurons", default=None, help="use this NeuronSet instead of localizing with NeMo")
    p.add_argument(
        "--adversarial",
        action="store_true",
        help="also score after adversarial fine-tuning of the keyed model (Finding Dori; surrogates from "
        "the keyed model with the NeMo neurons off; implies --nemo)",
    )
    p.add_argument("--adversarial-rounds", type=int, default=5, help="rounds (default 5, the paper's epochs)")
    p.add_argument("--adversarial-lr", type=float, default=1e-4)
    p.add_argument("--adversarial-retain", type=int, default=64, help="generic keyed images as retain data")
    p.add_argument("--write-results", action="store_true", help="replace the SolidMark section of RESULTS.md")
    p.add_argument(
        "--smoke", action="store_true", help="tiny recipe, a few steps: checks the pipeline of stages"
    )
    p.add_argument(
        "--constructed",
        action="store_true",
        help="only the statistics on constructed models (perfect copier, key-blind guesser) on the keyed data",
    )
    return p.parse_args(argv)


def _recipe(args):
    from diffmem.organism.recipe import TINY_RECIPE, OrganismRecipe

    if args.smoke:
        return TINY_RECIPE
    for candidate in (
        args.recipe,
        Path(args.model) / "recipe.json",
        ROOT / "runs" / "organism" / "recipe.json",
    ):
        if candidate and Path(candidate).is_file():
            return OrganismRecipe.from_dict(json.loads(Path(candidate).read_text()))
    return OrganismRecipe()


def _smoke_model(work: Path, recipe) -> str:
    from diffmem.train.organism import train_organism

    return str(train_organism(recipe, work / "tiny-organism"))


def _select(keyed: Path, rest_sample: int, seed: int = 0):
    """One copy of every verbatim photo, and a seeded sample of the other distinct images."""
    import numpy as np

    from diffmem.solidmark.run import load_score_items

    manifest, items = load_score_items(keyed, keyed / "solidmark_manifest.json", one_per_group=True)
    verbatim = [it for it in items if it.extra.get("role") == "verbatim"]
    rest = [it for it in items if it.extra.get("role") != "verbatim"]
    if rest_sample < len(rest):
        pick = sorted(np.random.default_rng(seed).choice(len(rest), rest_sample, replace=False).tolist())
        rest = [rest[i] for i in pick]
    return manifest, verbatim + rest


def _score(model, manifest, items, out: Path, args, **kwargs):
    from diffmem.pipelines import SolidMarkOutpaintPipeline

    from diffmem.modelio import load_pipeline
    from diffmem.solidmark.run import run_score

    pipe = load_pipeline(model, SolidMarkOutpaintPipeline)
    edits = kwargs.pop("edits_fn", lambda p: [])(pipe)
    t0 = time.time()
    summary = run_score(
        pipe,
        manifest,
        items,
        out,
        steps=args.score_steps,
        guidance_scale=args.guidance_scale,
        generations=args.generations,
        group_column="role",
        edits=edits,
        run_info={"model": _shown(str(model))},
        **kwargs,
    )
    summary["seconds"] = round(time.time() - t0, 1)
    return summary


def _nemo_neurons(model, captions_mem, captions_generic, out: Path):
    from diffmem.edits import NeuronSet
    from diffmem.evaluate.localization import localize_prompts
    from diffmem.guard.auto import load_guarded

    if out.is_file():
        return NeuronSet.load(out)
    run = localize_prompts(load_guarded(model), captions_mem, captions_generic, cache_dir=out.parent / "nemo")
    union = run.union
    union.info["calibrated_threshold"] = run.threshold
    union.save(out)
    return union


def _adversarial_finetune(model, keyed: Path, verbatim, neurons: Path, out: Path, args) -> Path:
    """``diffmem finetune --adversarial`` on the verbatim keyed photos (one copy each); returns the model folder.

    Retain data: the first ``--adversarial-retain`` generic keyed images, read from the metadata alone.
    """
    from diffmem.cli import main as cli
    from diffmem.io import atomic_write_text

    rows = list(map(json.loads, (keyed / "metadata.jsonl").open()))
    by_id = {r["id"]: r for r in rows}

    def table_row(r: dict) -> dict:
        return {"file_name": str((keyed / r["file_name"]).resolve()), "id": r["id"], "text": r["text"]}

    first_copy: dict[str, dict] = {}
    for r in rows:
        if r["role"] == "generic":
            first_copy.setdefault(r["image_id"], r)
    generic = list(first_copy.values())
    chosen = {
        "targets": [by_id[it.id] for it in verbatim],
        "retain": generic[: args.adversarial_retain],
    }
    tables = {}
    for name, picked in chosen.items():
        tables[name] = out.parent / f"adversarial-{name}.jsonl"
        atomic_write_text(tables[name], "".join(json.dumps(table_row(r)) + "\n" for r in picked))
    model_dir = out / "model"
    if not (model_dir / "model_index.json").is_file():
        rc = cli(
            ["finetune", "--adversarial", "--model", str(model), "--targets", str(tables["targets"])]
            + ["--retain", str(tables["retain"]), "--neurons", str(neurons), "--out", str(out)]
            + ["--rounds", str(args.adversarial_rounds), "--lr", str(args.adversarial_lr)]
            + ["--adv-batch-size", "8", "--retain-batch-size", "8"]
        )
        if rc != 0:
            raise RuntimeError(f"adversarial fine-tuning failed (exit {rc}); see the message above")
    return model_dir


def _finetuned(out_model: Path, config) -> bool:
    """Whether ``out_model`` is a finished keyed fine-tune with exactly ``config`` (the stage is done)."""
    from diffmem.train.keyed_finetune import PROVENANCE_FILE

    path = out_model / PROVENANCE_FILE
    if not path.is_file():
        return False
    done = json.loads(path.read_text(encoding="utf-8"))
    return done.get("config") == config.to_dict() and done.get("steps_done") == config.steps


def _fmt_rate(e) -> str:
    return f"{e['count']}/{e['n']} = {e['rate']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _markdown(results: dict) -> str:
    header = [
        "| run | images | δ | memorized (count/n = rate [95 % CI]) | chance | shuffled keys |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        f"Run: {results['date']} on {results['machine']}; `python benchmarks/solidmark_eval.py` "
        f"(model `{_shown(results['model'])}`, frame {results['frame_width']} px, keys shared by copies, "
        f"fine-tune {results['finetune_steps']} steps ({results.get('lr_scheduler', 'constant')} lr), outpainting {results['score_steps']} DDIM steps, guidance "
        f"{results['guidance_scale']}). One copy of each distinct image, {results.get('generations', 1)} "
        "generation(s) each; 95 % Wilson intervals; chance = 2δ−δ².",
        "",
        *header,
    ]

    def rate_lines(level: str) -> list[str]:
        out = []
        for run, summary in results["runs"].items():
            block = summary if level == "generation" else summary.get("per_image", {})
            for role, g in block.get("groups", {}).items():
                for e in g["rates"]:
                    shuffled = f"{e['shuffled_rate']:.3f}" if "shuffled_rate" in e else "n/a"
                    out.append(
                        f"| {run} | {role} | {e['delta']} | {_fmt_rate(e)} | {e['chance']:.4f} | {shuffled} |"
                    )
        return out

    lines += rate_lines("generation")
    per_image = rate_lines("image")
    if per_image:
        lines += [
            "",
            f"Per image: each image's predicted key is the mean of its {results.get('generations')} "
            "generations' (the sampler's seed-to-seed noise averaged out; the chance rate is unchanged):",
            "",
            *header,
            *per_image,
        ]
    for name, table in results.get("comparisons", {}).items():
        lines += ["", f"{name} (difference of rates, Newcombe 95 % CI):", ""]
        lines += ["| level | δ | run | baseline | difference [95 % CI] |", "|---|---|---|---|---|"]
        for c in table:
            lines.append(
                f"| {c.get('level', 'generation')} | {c['delta']} | {c['rate']:.3f} | {c['baseline_rate']:.3f} | "
                f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] |"
            )
    target = results.get("target")
    if target:
        lines += ["", target]
    return "\n".join(lines) + "\n"


def _target_line(per_generation: dict | None, per_image: dict | None, generations: int) -> str | None:
    """The issue's target (80 % of the verbatim photos under δ = 0.05), per image and per generation."""
    if per_generation is None:
        return None

    def measured(e: dict) -> str:
        return f"{e['rate']:.1%} [{e['ci_low']:.1%}, {e['ci_high']:.1%}]"

    head = "Target (issue): at least 80 % of the verbatim photos under δ = 0.05 (chance 9.75 %): "
    if per_image is None:
        verdict = "met" if per_generation["rate"] >= 0.8 else "NOT met"
        return head + f"measured {measured(per_generation)} -> {verdict}."
    verdict = "met" if per_image["rate"] >= 0.8 else "NOT met"
    return (
        head + f"per image (key averaged over {generations} generations) {measured(per_image)} -> {verdict}; "
        f"a single generation is under δ for {measured(per_generation)} of them."
    )


def _write_results_section(markdown: str) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    text = path.read_text(encoding="utf-8")
    head = "## SolidMark\n"
    start = text.index(head) + len(head)
    nxt = text.find("\n## ", start)
    end = nxt + 1 if nxt != -1 else len(text)
    path.write_text(text[:start] + "\n" + markdown + "\n" + text[end:], encoding="utf-8")


def _shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (cards must not carry local paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


#: The model card's section that a rerun keeps as it is (written by hand: what was tried).
_HISTORY = "## Training history"


def _model_card(out_model: Path, results: dict, args) -> None:
    from diffmem.io import atomic_write_text

    verbatim = results["runs"]["keyed"]["groups"].get("verbatim", {}).get("rates", [])
    card = [
        "# diffmem-organism-v2-solidmark",
        "",
        "The diffmem model organism (`weights/diffmem-organism-v2`) fine-tuned on its own training set with a "
        "SolidMark key frame (Kriplani et al., arXiv:2503.00592) around every image, so that memorization can "
        "be measured per training image by outpainting the frame.",
        "",
        "## Training",
        f"- Base: `{_shown(results['model'])}`; data: `diffmem organism data`, keyed with "
        f"`diffmem solidmark key --frame-width {args.frame_width} --share-duplicate-keys --seed 42` "
        "(64 px images -> 80 px, value space pixel; the key manifest is in the run folder).",
        f"- `diffmem solidmark finetune --steps {args.finetune_steps} --batch-size {args.batch_size} --lr {args.lr} "
        f"--lr-scheduler {args.lr_scheduler}{' --train-text-encoder' if args.train_text_encoder else ''}` "
        + (
            "(UNet and text encoder trained, the text encoder stored in float32; VAE frozen; "
            if args.train_text_encoder
            else "(UNet only; VAE and text encoder frozen; "
        )
        + "caption dropout 0.1; AdamW, weight decay 1e-2).",
        "",
        "## Measured memorization (verbatim-duplicated photos, one copy each)",
        "",
    ]
    per_image = results["runs"]["keyed"].get("per_image", {}).get("groups", {}).get("verbatim", {})
    if per_image:
        card += [
            f"Per image, the predicted key averaged over its {results['generations']} generations "
            f"({results['score_steps']} DDIM steps, guidance {results['guidance_scale']}):",
            "",
        ]
        card += [f"- δ = {e['delta']}: {_fmt_rate(e)} (chance {e['chance']:.4f})" for e in per_image["rates"]]
        card += ["", "Per generation (one outpainting each):", ""]
    card += [f"- δ = {e['delta']}: {_fmt_rate(e)} (chance {e['chance']:.4f})" for e in verbatim]
    card += ["", "Full tables: `benchmarks/RESULTS.md`, section SolidMark.", ""]
    path = out_model / "README.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if _HISTORY in old:  # the hand-kept record of what was tried survives a rerun
        card += [old[old.index(_HISTORY) :].rstrip(), ""]
    atomic_write_text(path, "\n".join(card))


def constructed_cases(keyed: Path, work: Path) -> str:
    """Score the keyed organism data with two constructed models whose answer is known, no diffusion model:
    a perfect copier (reproduces the reference frame: must score 0, with its shuffled-key null at chance)
    and a key-blind guesser (a uniform grey frame from each image's own generator: must be at chance)."""
    import torch

    from diffmem.solidmark.run import load_score_items
    from diffmem.solidmark.scoring import score_items
    from diffmem.solidmark.summary import summarize

    manifest, items = load_score_items(keyed, keyed / "solidmark_manifest.json", one_per_group=True)

    def copier(images, mask, prompts, generators):
        return images.clone()

    def guesser(images, mask, prompts, generators):
        out = images.clone()
        for j, g in enumerate(generators):
            out[j][:, mask] = torch.rand(1, generator=g).item()
        return out

    lines = [
        f"Constructed models on the keyed organism data ({len(items)} distinct images, frame "
        f"{manifest.frame_width} px, one generation each; no diffusion model involved):",
        "",
        "| model | δ | memorized (count/n = rate [95 % CI]) | chance 2δ−δ² | shuffled keys [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for name, fn in (("perfect copier", copier), ("key-blind guesser", guesser)):
        rows = score_items(fn, manifest, items, work / f"constructed-{name.split()[0]}", progress=False)
        for e in summarize(rows)["rates"]:
            lines.append(
                f"| {name} | {e['delta']} | {_fmt_rate(e)} | {e['chance']:.4f} | "
                f"{e['shuffled_rate']:.3f} [{e['shuffled_ci_low']:.3f}, {e['shuffled_ci_high']:.3f}] |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from diffmem.organism.data import build_organism_data, export_imagefolder
    from diffmem.solidmark import key_dataset
    from diffmem.solidmark.scoring import read_rows
    from diffmem.solidmark.summary import compare_runs
    from diffmem.train.keyed_finetune import FinetuneConfig, finetune_keyed

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    recipe = _recipe(args)
    model = args.model
    if args.smoke:
        model = _smoke_model(work, recipe)
        args.frame_width = min(args.frame_width, 8)
        args.finetune_steps, args.batch_size, args.score_steps, args.rest_sample = 2, 4, 2, 4
    elif not args.constructed and not Path(model, "model_index.json").is_file():
        print(f"{model} is missing: train the organism first (diffmem organism train)", file=sys.stderr)
        return 2

    data = work / "data"
    if not (data / "metadata.jsonl").is_file():
        export_imagefolder(build_organism_data(recipe), data)
    keyed = work / "keyed"
    if not (keyed / "solidmark_manifest.json").is_file():
        key_dataset(data, keyed, frame_width=args.frame_width, duplicate_keys="shared", seed=42)
    if args.constructed:
        text = constructed_cases(keyed, work)
        (work / "constructed.md").write_text(text)
        print(text)
        return 0
    out_model = Path(args.out_model) if not args.smoke else work / "keyed-model"
    config = FinetuneConfig(
        steps=args.finetune_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_scheduler=args.lr_scheduler,
        train_text_encoder=args.train_text_encoder,
        checkpoint_every=100,
    )
    if _finetuned(out_model, config) and not args.smoke:
        print(f"{_shown(str(out_model))}: already fine-tuned with these settings, reused")
    else:
        finetune_keyed(model, keyed, work / "finetune", out_model, config)
        from diffmem.train.organism import FLOAT16_COMPONENTS, store_float16

        frozen = [n for n in FLOAT16_COMPONENTS if not (n == "text_encoder" and args.train_text_encoder)]
        for name in frozen:  # frozen, and float16 in the organism already: lossless, and smaller
            store_float16(out_model / name)

    manifest, items = _select(keyed, args.rest_sample)
    runs = {
        "keyed": _score(out_model, manifest, items, work / "score-keyed", args),
        "random-init UNet": _score(
            out_model, manifest, items, work / "score-random-init", args, random_init=True
        ),
        "unkeyed organism": _score(model, manifest, items, work / "score-unkeyed", args),
    }
    comparisons = {}

    def both_levels(run, baseline):
        levels = ("generation", "image") if args.generations > 1 else ("generation",)
        return [c for level in levels for c in compare_runs(run, baseline, level=level)]

    verbatim = [it for it in items if it.extra.get("role") == "verbatim"]
    keyed_v = [r for r in read_rows(work / "score-keyed") if r.get("role") == "verbatim"]
    if args.nemo or args.neurons or args.adversarial:
        from diffmem.edits import NeuronSet

        neurons_file = Path(args.neurons) if args.neurons else work / "nemo-neurons.json"
        generic = sorted({it.caption for it in items if it.extra.get("role") == "generic"})
        neurons = (
            NeuronSet.load(neurons_file)
            if args.neurons
            else _nemo_neurons(out_model, sorted({it.caption for it in verbatim}), generic, neurons_file)
        )
        runs["keyed + NeMo"] = _score(
            out_model, manifest, verbatim, work / "score-keyed-nemo", args, edits_fn=lambda p: [neurons]
        )
        comparisons["Verbatim photos: keyed + NeMo − keyed"] = both_levels(
            read_rows(work / "score-keyed-nemo"), keyed_v
        )
    if args.adversarial:
        tuned = _adversarial_finetune(out_model, keyed, verbatim, neurons_file, work / "adversarial", args)
        runs["keyed + adversarial FT"] = _score(
            tuned, manifest, verbatim, work / "score-keyed-adversarial", args
        )
        comparisons["Verbatim photos: keyed + adversarial FT − keyed"] = both_levels(
            read_rows(work / "score-keyed-adversarial"), keyed_v
        )
    init_v = [r for r in read_rows(work / "score-random-init") if r.get("role") == "verbatim"]
    comparisons["Verbatim photos: keyed model − random-init UNet"] = both_levels(keyed_v, init_v)

    def verbatim_at05(block: dict):
        rates = block.get("groups", {}).get("verbatim", {}).get("rates", [])
        return next((e for e in rates if e["delta"] == 0.05), None)

    at05 = verbatim_at05(runs["keyed"])
    at05_image = verbatim_at05(runs["keyed"].get("per_image", {}))
    results = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": str(model),
        "frame_width": args.frame_width,
        "finetune_steps": args.finetune_steps,
        "lr_scheduler": args.lr_scheduler,
        "score_steps": args.score_steps,
        "generations": args.generations,
        "guidance_scale": args.guidance_scale,
        "runs": runs,
        "comparisons": comparisons,
        "target": _target_line(at05, at05_image, args.generations),
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    markdown = _markdown(results)
    if not args.smoke:
        done = work / "constructed.md"
        markdown += "\n" + (done.read_text() if done.is_file() else constructed_cases(keyed, work))
    (work / "results.md").write_text(markdown)
    print(markdown)
    if not args.smoke:
        _model_card(out_model, results, args)
        if args.write_results:
            _write_results_section(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
