"""``solidmark``: SolidMark on the model organism, from its training set to per-image memorization rates.

Key the organism's training set, fine-tune the organism on the keyed set, score every verbatim-duplicated
photo and a sample of the other images against chance, a shuffled-key null, a freshly initialized UNet
and the unkeyed organism; optionally before and after NeMo and adversarial fine-tuning. Every stage
resumes in ``--out`` (``--workdir``, default ``runs/solidmark-organism``):

1. ``data``: the organism's training set (``diffmem organism data``), duplicates as separate rows, with
   its ``role`` and ``image_id`` columns.
2. ``keyed``: a SolidMark frame of ``--frame-width`` px around every image (copies of one photo share one
   key: with a fresh key per copy no single key could be memorized).
3. ``finetune``: the organism's UNet (and with ``--train-text-encoder`` its text encoder) fine-tuned on the
   keyed set, saved to ``--out-model`` with a model card; the VAE stays frozen.
4. ``score-*``: outpainting runs (DDIM, ``--score-steps``, the training caption) of the keyed model, a
   freshly initialized UNet and the unkeyed organism; one copy of each distinct image.
5. ``nemo`` (optional): the NeMo neurons of every verbatim caption on the keyed model, switched off
   during a scoring run.
6. ``adversarial`` (optional): the keyed model fine-tuned against the Dori attack
   (:func:`diffmem.train.adversarial_model.adversarial_finetune_pipeline`), then the verbatim photos scored again.

``--constructed`` scores the keyed data with two constructed models whose answer is known instead.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from diffmem.attack.targets import load_targets
from diffmem.attention import use_attention_processor
from diffmem.edits import NeuronSet
from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.evaluate.localization import localize_prompts
from diffmem.evaluate.solidmark_report import (
    REPOSITORY,
    fmt_rate,
    shown,
    solidmark_markdown,
    target_line,
    write_model_card,
    write_results_section,
)
from diffmem.guard.auto import load_guarded
from diffmem.guard.solidmark_outpaint import SolidMarkOutpaintPipeline
from diffmem.io import atomic_write_text
from diffmem.modelio import (
    ORGANISM_NAME,
    check_device,
    default_model,
    load_pipeline,
    model_resolution,
    weights_dir,
)
from diffmem.organism.data import build_organism_data, export_imagefolder
from diffmem.organism.recipe import TINY_RECIPE, OrganismRecipe
from diffmem.precision import torch_dtype
from diffmem.seeding import item_generator
from diffmem.solidmark import key_dataset
from diffmem.solidmark.run import load_score_items, run_score
from diffmem.solidmark.scoring import read_rows, score_items
from diffmem.solidmark.summary import compare_runs, summarize
from diffmem.train.adversarial import AdversarialConfig
from diffmem.train.adversarial_model import adversarial_finetune_pipeline
from diffmem.train.keyed_finetune import PROVENANCE_FILE, FinetuneConfig, finetune_keyed
from diffmem.train.organism import FLOAT16_COMPONENTS, store_float16, train_organism

__all__ = ["SolidMarkEvaluation", "constructed_cases", "select_items"]

#: ``--smoke``: the tiny recipe, a few steps (checks the pipeline of stages)
SMOKE = dict(finetune_steps=2, batch_size=4, score_steps=2, rest_sample=4)


def select_items(keyed: Path, rest_sample: int, seed: int = 0):
    """One copy of every verbatim photo, and a seeded sample of the other distinct images."""
    manifest, items = load_score_items(keyed, keyed / "solidmark_manifest.json", one_per_group=True)
    verbatim = [it for it in items if it.extra.get("role") == "verbatim"]
    rest = [it for it in items if it.extra.get("role") != "verbatim"]
    if rest_sample < len(rest):
        pick = sorted(np.random.default_rng(seed).choice(len(rest), rest_sample, replace=False).tolist())
        rest = [rest[i] for i in pick]
    return manifest, verbatim + rest


def constructed_cases(keyed: Path, work: Path) -> str:
    """Score the keyed organism data with two constructed models whose answer is known, no diffusion model:
    a perfect copier (reproduces the reference frame: must score 0, with its shuffled-key null at chance)
    and a key-blind guesser (a uniform grey frame drawn from each image's noise key: must be at chance)."""
    manifest, items = load_score_items(keyed, keyed / "solidmark_manifest.json", one_per_group=True)

    def copier(images, mask, prompts, noise_keys):
        return images.clone()

    def guesser(images, mask, prompts, noise_keys):
        out = images.clone()
        for j, key in enumerate(noise_keys):
            out[j][:, mask] = torch.rand(1, generator=item_generator(*key)).item()
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
                f"| {name} | {e['delta']} | {fmt_rate(e)} | {e['chance']:.4f} | "
                f"{e['shuffled_rate']:.3f} [{e['shuffled_ci_low']:.3f}, {e['shuffled_ci_high']:.3f}] |"
            )
    return "\n".join(lines) + "\n"


def _finetuned(out_model: Path, config: FinetuneConfig) -> bool:
    """Whether ``out_model`` is a finished keyed fine-tune with exactly ``config`` (the stage is done)."""
    path = out_model / PROVENANCE_FILE
    if not path.is_file():
        return False
    done = json.loads(path.read_text(encoding="utf-8"))
    return done.get("config") == config.to_dict() and done.get("steps_done") == config.steps


def _nemo_neurons(model, captions_mem, captions_generic, out: Path) -> NeuronSet:
    """The union of NeMo's neurons of ``captions_mem`` on ``model`` (statistics and threshold from
    ``captions_generic``), saved to ``out`` and read from there on a rerun."""
    if out.is_file():
        return NeuronSet.load(out)
    run = localize_prompts(load_guarded(model), captions_mem, captions_generic, cache_dir=out.parent / "nemo")
    union = run.union
    union.info["calibrated_threshold"] = run.threshold
    union.save(out)
    return union


def _verbatim_at05(block: dict) -> dict | None:
    rates = block.get("groups", {}).get("verbatim", {}).get("rates", [])
    return next((e for e in rates if e["delta"] == 0.05), None)


@register_evaluation
class SolidMarkEvaluation(Evaluation):
    name = "solidmark"
    help = (
        "SolidMark on the organism: key its training set, fine-tune on it, score the verbatim photos against "
        "chance, shuffled keys, a random-init UNet and the unkeyed model (optionally NeMo, adversarial FT)"
    )
    default_out = "runs/solidmark-organism"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--workdir", dest="out", default=argparse.SUPPRESS, help="the same as --out (the script's name)"
        )
        parser.add_argument(
            "--out-model",
            default=str(weights_dir() / f"{ORGANISM_NAME}-solidmark"),
            help="where the keyed model is saved (default weights/diffmem-organism-v2-solidmark)",
        )
        parser.add_argument(
            "--recipe", default=None, help="organism recipe JSON (default: the model's, else the default)"
        )
        parser.add_argument("--frame-width", type=int, default=8, help="key frame in px (default 8)")
        parser.add_argument("--finetune-steps", type=int, default=4000)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--lr", type=float, default=3e-4)
        parser.add_argument(
            "--lr-scheduler", default="constant", help="diffusers get_scheduler name (e.g. linear)"
        )
        parser.add_argument(
            "--train-text-encoder",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="fine-tune the text encoder with the UNet (default; it recalls keys better)",
        )
        parser.add_argument("--score-steps", type=int, default=50)
        parser.add_argument("--guidance-scale", type=float, default=3.0)
        parser.add_argument(
            "--rest-sample", type=int, default=64, help="distinct non-verbatim images to score"
        )
        parser.add_argument(
            "--generations",
            type=int,
            default=10,
            help="generations per image (default 10, the paper's duplication study); per-image rates average them",
        )
        parser.add_argument(
            "--nemo", action="store_true", help="also score with the NeMo neurons of the verbatim captions"
        )
        parser.add_argument(
            "--neurons", default=None, help="use this NeuronSet instead of localizing with NeMo"
        )
        parser.add_argument(
            "--adversarial",
            action="store_true",
            help="also score after adversarial fine-tuning of the keyed model (Finding Dori; surrogates from "
            "the keyed model with the NeMo neurons off; implies --nemo)",
        )
        parser.add_argument(
            "--adversarial-rounds", type=int, default=5, help="rounds (default 5, the paper's epochs)"
        )
        parser.add_argument("--adversarial-lr", type=float, default=1e-4)
        parser.add_argument(
            "--adversarial-retain", type=int, default=64, help="generic keyed images as retain data"
        )
        parser.add_argument(
            "--write-results", action="store_true", help="replace the SolidMark section of RESULTS.md"
        )
        parser.add_argument(
            "--smoke", action="store_true", help="tiny recipe, a few steps: checks the pipeline of stages"
        )
        parser.add_argument(
            "--constructed",
            action="store_true",
            help="only the statistics on constructed models (perfect copier, key-blind guesser) on the keyed data",
        )

    def check(self) -> None:
        args = self.args
        self.model = args.model or default_model() or str(weights_dir() / ORGANISM_NAME)
        if args.smoke:
            args.frame_width = min(args.frame_width, 8)
            for key, value in SMOKE.items():
                setattr(args, key, value)
        elif not args.constructed and not Path(self.model, "model_index.json").is_file():
            raise ValueError(
                f"--model: {self.model} is missing: train the organism first (diffmem organism train)"
            )
        self.recipe = self._recipe()

    def _recipe(self) -> OrganismRecipe:
        if self.args.smoke:
            return TINY_RECIPE
        for candidate in (
            self.args.recipe,
            Path(self.model) / "recipe.json",
            REPOSITORY / "runs" / "organism" / "recipe.json",
        ):
            if candidate and Path(candidate).is_file():
                return OrganismRecipe.from_dict(json.loads(Path(candidate).read_text()))
        return OrganismRecipe()

    def _score(self, model, manifest, items, out: Path, edits=(), **kwargs) -> dict:
        """One outpainting run of ``model`` on ``items`` into ``out`` (resumed there); its summary."""
        args = self.args
        pipe = load_pipeline(
            model, SolidMarkOutpaintPipeline, dtype=torch_dtype(args.dtype), device=check_device(args.device)
        )
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
            edits=list(edits),
            run_info={"model": shown(str(model))},
            **kwargs,
        )
        summary["seconds"] = round(time.time() - t0, 1)
        return summary

    def _keyed_model(self, work: Path, keyed: Path, model: str) -> Path:
        """The ``finetune`` stage: the organism fine-tuned on the keyed set (reused when done with these settings)."""
        args = self.args
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
            print(f"{shown(str(out_model))}: already fine-tuned with these settings, reused")
            return out_model
        finetune_keyed(model, keyed, work / "finetune", out_model, config)
        frozen = [n for n in FLOAT16_COMPONENTS if not (n == "text_encoder" and args.train_text_encoder)]
        for name in frozen:  # frozen, and float16 in the organism already: lossless, and smaller
            store_float16(out_model / name)
        return out_model

    def _adversarial_model(self, model: Path, keyed: Path, verbatim, neurons: NeuronSet, out: Path) -> Path:
        """The keyed model fine-tuned against the Dori attack on the verbatim keyed photos (one copy each),
        the NeMo neurons off for the surrogates; retain data: the first ``--adversarial-retain`` generic keyed
        images, read from the metadata alone. Returns the model folder (reused when it is there)."""
        args = self.args
        model_dir = out / "model"
        if (model_dir / "model_index.json").is_file():
            return model_dir
        rows = list(map(json.loads, (keyed / "metadata.jsonl").open()))
        by_id = {r["id"]: r for r in rows}
        first_copy: dict[str, dict] = {}
        for r in rows:
            if r["role"] == "generic":
                first_copy.setdefault(r["image_id"], r)
        chosen = {
            "targets": [by_id[it.id] for it in verbatim],
            "retain": list(first_copy.values())[: args.adversarial_retain],
        }
        tables = {}
        for name, picked in chosen.items():  # the tables stay beside the run: what it was trained on
            tables[name] = out.parent / f"adversarial-{name}.jsonl"
            table_rows = (
                {"file_name": str((keyed / r["file_name"]).resolve()), "id": r["id"], "text": r["text"]}
                for r in picked
            )
            atomic_write_text(tables[name], "".join(json.dumps(r) + "\n" for r in table_rows))
        pipe = load_pipeline(
            model, StableDiffusionPipeline, device=check_device(args.device) or self._default_device()
        )  # trained: float32 master weights
        use_attention_processor(pipe.unet, args.attention)
        pipe.set_progress_bar_config(disable=True)
        config = AdversarialConfig(
            rounds=args.adversarial_rounds, lr=args.adversarial_lr, adv_batch_size=8, retain_batch_size=8
        )
        return adversarial_finetune_pipeline(
            pipe,
            load_targets(tables["targets"], "--targets"),
            load_targets(tables["retain"], "--retain"),
            out,
            config,
            size=model_resolution(pipe),
            edit=neurons,
        )

    @staticmethod
    def _default_device() -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        """The stages above, each reused by a rerun; the models are loaded from the folders each stage makes."""
        args = self.args
        if args.threads is None:  # more than 2 threads only slows this CPU-bound study down
            torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        work = Path(args.out)
        work.mkdir(parents=True, exist_ok=True)
        data = work / "data"
        if not (data / "metadata.jsonl").is_file():
            export_imagefolder(build_organism_data(self.recipe), data)
        keyed = work / "keyed"
        if not (keyed / "solidmark_manifest.json").is_file():
            key_dataset(
                data,
                keyed,
                frame_width=args.frame_width,
                duplicate_keys="shared",
                seed=42,
                progress=not args.no_progress,
            )
        if args.constructed:  # no diffusion model involved
            return self._constructed(keyed, work)
        model = str(train_organism(self.recipe, work / "tiny-organism")) if args.smoke else self.model
        out_model = self._keyed_model(work, keyed, model)

        runs, comparisons = self._score_runs(work, keyed, model, out_model)
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
            "target": target_line(
                _verbatim_at05(runs["keyed"]),
                _verbatim_at05(runs["keyed"].get("per_image", {})),
                args.generations,
            ),
        }
        markdown = solidmark_markdown(results)
        if not args.smoke:
            done = work / "constructed.md"
            markdown += "\n" + (done.read_text() if done.is_file() else constructed_cases(keyed, work))
        atomic_write_text(work / "results.md", markdown)
        if not args.smoke:
            write_model_card(out_model, results, args)
            if args.write_results:
                write_results_section(markdown)
        return EvaluationResult(results, markdown, [str(work / "results.md")])

    def _score_runs(self, work: Path, keyed: Path, model: str, out_model: Path) -> tuple[dict, dict]:
        """The ``score-*`` stages (and the optional NeMo and adversarial ones): each run's summary, and the
        verbatim photos' differences of rates between runs."""
        args = self.args
        manifest, items = select_items(keyed, args.rest_sample)
        runs = {
            "keyed": self._score(out_model, manifest, items, work / "score-keyed"),
            "random-init UNet": self._score(
                out_model, manifest, items, work / "score-random-init", random_init=True
            ),
            "unkeyed organism": self._score(model, manifest, items, work / "score-unkeyed"),
        }
        levels = ("generation", "image") if args.generations > 1 else ("generation",)

        def verbatim_against_keyed(name: str) -> list[dict]:
            return [c for level in levels for c in compare_runs(read_rows(work / name), keyed_v, level=level)]

        comparisons = {}
        verbatim = [it for it in items if it.extra.get("role") == "verbatim"]
        keyed_v = [r for r in read_rows(work / "score-keyed") if r.get("role") == "verbatim"]
        if args.nemo or args.neurons or args.adversarial:
            neurons_file = Path(args.neurons) if args.neurons else work / "nemo-neurons.json"
            generic = sorted({it.caption for it in items if it.extra.get("role") == "generic"})
            neurons = (
                NeuronSet.load(neurons_file)
                if args.neurons
                else _nemo_neurons(out_model, sorted({it.caption for it in verbatim}), generic, neurons_file)
            )
            runs["keyed + NeMo"] = self._score(
                out_model, manifest, verbatim, work / "score-keyed-nemo", edits=[neurons]
            )
            comparisons["Verbatim photos: keyed + NeMo − keyed"] = verbatim_against_keyed("score-keyed-nemo")
        if args.adversarial:
            tuned = self._adversarial_model(out_model, keyed, verbatim, neurons, work / "adversarial")
            runs["keyed + adversarial FT"] = self._score(
                tuned, manifest, verbatim, work / "score-keyed-adversarial"
            )
            comparisons["Verbatim photos: keyed + adversarial FT − keyed"] = verbatim_against_keyed(
                "score-keyed-adversarial"
            )
        init_v = [r for r in read_rows(work / "score-random-init") if r.get("role") == "verbatim"]
        comparisons["Verbatim photos: keyed model − random-init UNet"] = [
            c for level in levels for c in compare_runs(keyed_v, init_v, level=level)
        ]
        return runs, comparisons

    def _constructed(self, keyed: Path, work: Path) -> EvaluationResult:
        """``--constructed``: the table goes to ``constructed.md`` (which a full run appends); ``results.json``
        keeps a full run's numbers, with the table under ``constructed``."""
        text = constructed_cases(keyed, work)
        atomic_write_text(work / "constructed.md", text)
        previous = work / "results.json"
        results = json.loads(previous.read_text(encoding="utf-8")) if previous.is_file() else {}
        results["constructed"] = text
        return EvaluationResult(results, text, [str(work / "constructed.md")])
