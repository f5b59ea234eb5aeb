"""Evaluation on the model organism: no mitigation / NeMo / subspace pruning / adversarial fine-tuning, each attacked by Dori.

A table like the Finding Dori paper's: for the organism's verbatim-memorized photographs, the SSIM of
generations to the training image (mean ± std over targets; per target the mean over seeds) and the
memorization rate (fraction of targets whose mean SSIM exceeds ``--threshold``), from the caption and
from the Dori trigger; held-out quality as the median SSIM of held-out-caption generations to the
unedited model's (same seeds) and as caption fidelity (the fraction whose colour and shape a
classifier, ``diffmem.organism.fidelity``, reads as the ones named); the false-positive control (the
attack on images the model never saw).

Stages are cached as JSON in ``--out`` (rerun to resume after an interruption):

    python benchmarks/dori_eval.py --model weights/diffmem-organism-v2 --out runs/dori_eval
    python benchmarks/dori_eval.py --quick ...     # fewer targets and seeds, shorter fine-tuning

It prints the markdown table for benchmarks/RESULTS.md and writes it to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from diffmem.scores.replication import ReplicationCriterion


def _mean_std(values):
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _image_tensor(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).float().permute(2, 0, 1) / 255.0


class Stage:
    """A JSON file in the output folder: computed once, reused on reruns."""

    def __init__(self, out: Path, name: str):
        self.path = out / f"{name}.json"

    def done(self) -> bool:
        return self.path.is_file()

    def load(self):
        return json.loads(self.path.read_text())

    def save(self, value):
        from diffmem.io import atomic_write_json

        atomic_write_json(self.path, value)
        return value


def _fidelity_cell(fid: dict | None, which: str) -> str:
    if not fid or which not in fid:
        return "–"
    f = fid[which]
    return f"{f['both']:.2f} ({f['colour']:.2f}, {f['shape']:.2f})"


def main() -> None:  # noqa: C901 (a linear script of stages)
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffmem.attack.dori import DoriConfig, attack_target, ssim_similarity
    from diffmem.commands.attack import edit_context
    from diffmem.commands.finetune import make_surrogates
    from diffmem.io import atomic_save_tensors
    from diffmem.modelio import load_pipeline
    from diffmem.organism.data import build_organism_data, generic_and_heldout_pairs, render_generic
    from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier
    from diffmem.organism.recipe import OrganismRecipe
    from diffmem.organism.replication import REPLICATION_THRESHOLD
    from diffmem.scores.similarity import ssim
    from diffmem.seeding import derive_seed, item_generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="organism folder (default: weights/diffmem-organism-v2)")
    ap.add_argument(
        "--recipe", default=None, help="recipe.json of the organism's data (default: the default recipe)"
    )
    ap.add_argument("--out", default="runs/dori_eval")
    ap.add_argument("--targets", type=int, default=16, help="verbatim targets (default: all 16)")
    ap.add_argument("--controls", type=int, default=8, help="non-memorized control images")
    ap.add_argument("--heldout", type=int, default=8, help="held-out captions for the quality check")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument(
        "--fidelity-captions", type=int, default=16, help="held-out captions for caption fidelity (all 16)"
    )
    ap.add_argument("--fidelity-seeds", type=int, default=4, help="seeds per caption for caption fidelity")
    ap.add_argument(
        "--classifier",
        default=None,
        help="caption classifier folder (default: weights/diffmem-caption-classifier)",
    )
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--attack-steps", type=int, default=50)
    ap.add_argument("--attack-batch", type=int, default=8)
    ap.add_argument(
        "--threshold",
        type=float,
        default=REPLICATION_THRESHOLD,
        help="replication: mean SSIM over seeds above this (default: the organism's SSIM threshold, 0.5)",
    )
    ap.add_argument(
        "--ratios", default="0.01,0.02,0.05,0.1", help="pruning ratios rho to try (first = paper default)"
    )
    ap.add_argument("--tau", type=int, default=10)
    ap.add_argument(
        "--cond-only", action="store_true", help="pruning statistics from the conditional half only"
    )
    ap.add_argument(
        "--reference",
        choices=("empty", "generic"),
        default="empty",
        help="reference prompts for pruning: the empty prompt (paper) or generic training captions",
    )
    ap.add_argument("--prune-steps", type=int, default=50)
    ap.add_argument(
        "--max-heldout-drop",
        type=float,
        default=0.5,
        help="pick a ratio whose held-out median SSIM stays above this",
    )
    ap.add_argument(
        "--neurons", default=None, help="NeuronSet for the NeMo row (default: localize with NeMo here)"
    )
    ap.add_argument(
        "--nemo-sets",
        default=None,
        help="folder of per-target NeuronSets (matched by caption) for the per-target NeMo rows "
        "(default: the ones localized here, OUT/nemo_neurons/)",
    )
    ap.add_argument("--no-nemo", action="store_true")
    ap.add_argument("--finetune-rounds", type=int, default=3)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--retain", type=int, default=64, help="generic training images used as retain data")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument(
        "--no-attack",
        action="store_true",
        help="only captions: no mitigation vs the pruning sweep (no Dori, no FT)",
    )
    ap.add_argument("--quick", action="store_true", help="8 targets, 4 controls, 2 seeds, 2 rounds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.targets, args.controls, args.heldout, args.seeds = 8, 4, 4, 2
        args.finetune_rounds = min(args.finetune_rounds, 2)

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = (
        OrganismRecipe.from_dict(json.loads(Path(args.recipe).read_text()))
        if args.recipe
        else OrganismRecipe()
    )
    data = build_organism_data(recipe)
    verbatim = data.by_role("verbatim")[: args.targets]
    targets = [(im.id, im.caption, _image_tensor(im.pixels)) for im in verbatim]
    _, held_pairs = generic_and_heldout_pairs()
    heldout_captions = data.captions("heldout")[: args.heldout]
    controls = [
        (
            f"control-{c}-{s}",
            f"a {c} {s}",
            _image_tensor(
                render_generic(c, s, derive_seed(recipe.seed, "dori-control", c, s), recipe.image_size)
            ),
        )
        for c, s in held_pairs[: args.controls]
    ]
    pipe = load_pipeline(args.model, StableDiffusionPipeline, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(args.seeds))
    gen_kw = dict(num_inference_steps=args.gen_steps, guidance_scale=args.guidance_scale)
    dori = DoriConfig(steps=args.attack_steps, batch_size=args.attack_batch)

    @torch.no_grad()
    def heldout_images(p, captions=heldout_captions, seeds=seeds) -> torch.Tensor:
        imgs = []
        for i, cap in enumerate(captions):
            for s in seeds:
                res = p(
                    cap,
                    generator=item_generator(s, "heldout", i, device=p._execution_device),
                    output_type="pt",
                    **gen_kw,
                )
                imgs.append(res.images.float().cpu())
        return torch.cat(imgs)

    base_heldout_file = out / "heldout_unedited.safetensors"
    if base_heldout_file.is_file():
        base_heldout = load_file(str(base_heldout_file))["images"]
    else:
        base_heldout = heldout_images(pipe)
        atomic_save_tensors(base_heldout_file, {"images": base_heldout})

    def heldout_quality(p) -> float:
        return float(ssim(heldout_images(p), base_heldout).median())

    classifier = load_caption_classifier(args.classifier)
    fidelity_seeds = list(range(args.fidelity_seeds))
    fidelity_sets = {  # stage prefix -> captions: held-out ones, and as many generic training ones
        "fidelity": data.captions("heldout")[: args.fidelity_captions],
        "fidelity_generic": data.captions("generic")[: args.fidelity_captions],
    }

    def heldout_fidelity(p, name: str, edit=None) -> dict:
        """Colour/shape accuracy (the organism's caption classifier) on held-out and on generic captions."""
        result = {}
        for prefix, captions in fidelity_sets.items():
            labels = [c for c in captions for _ in fidelity_seeds]  # heldout_images' order
            st = Stage(out, f"{prefix}_{name}")
            cached = st.load() if st.done() else None
            if cached is not None and cached["n"] == len(labels):
                result[prefix] = cached
                continue
            with edit_context(p.unet, edit):
                images = heldout_images(p, captions, fidelity_seeds)
            result[prefix] = st.save(caption_fidelity(classifier, images, labels).as_dict())
        return result

    def attack_rows(p, items, edit=None, attack=True):
        rows = []
        with edit_context(p.unet, edit):
            for rid, cap, img in items:
                if attack:
                    o = attack_target(p, rid, cap, img, dori, seeds=seeds, threshold=args.threshold, **gen_kw)
                    rows.append(o.row())
                else:
                    with torch.no_grad():
                        gens = torch.cat(
                            [
                                p(
                                    cap,
                                    generator=item_generator(s, "dori-gen", rid, device=p._execution_device),
                                    output_type="pt",
                                    **gen_kw,
                                )
                                .images.float()
                                .cpu()
                                for s in seeds
                            ]
                        )
                    sims = [float(x) for x in ssim_similarity(gens, img)]
                    rows.append(
                        {
                            "id": rid,
                            "similarity_before": sims,
                            "similarity_before_mean": statistics.fmean(sims),
                        }
                    )
        return rows

    def summarize(rows, key):
        sims = [r[f"similarity_{key}_mean"] for r in rows]
        mean, std = _mean_std(sims)
        rate = float(
            ReplicationCriterion(args.threshold, "mean").memorized(torch.tensor(sims)[:, None]).float().mean()
        )
        return {"ssim_mean": mean, "ssim_std": std, "rate": rate}

    table: list[dict] = []

    def write_table() -> None:
        """Write the table of every stage done so far (called after each stage)."""

        def fmt(v, digits=2):
            return "–" if v is None else f"{v:.{digits}f}"

        lines = [
            f"Model organism ({args.model or 'weights/diffmem-organism-v2'}), {len(targets)} verbatim targets, {len(controls)} "
            f"non-memorized controls, {args.seeds} seeds, {args.gen_steps} DDIM steps, guidance {args.guidance_scale}; "
            f"Dori: {dori.steps} Adam steps, lr {dori.lr}, batch {dori.batch_size}; replication = mean SSIM over seeds > "
            f"{args.threshold}. Machine: {platform.machine()} ({args.device}), {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{(time.time() - t_start) / 60:.1f} min for this run (cached stages excluded). Caption fidelity: "
            f"{len(fidelity_sets['fidelity'])} held-out and {len(fidelity_sets['fidelity_generic'])} generic "
            f"training captions x {len(fidelity_seeds)} seeds, read by the caption classifier "
            f"(`{args.classifier or 'weights/diffmem-caption-classifier'}`).",
            "",
            "| setting | SSIM to training image (mean ± std) | memorization rate | held-out median SSIM to unedited "
            "| held-out caption fidelity: both right (colour, shape) | training-caption fidelity |",
            "|---|---|---|---|---|---|",
        ]
        for r in table:
            if "ssim_mean" not in r:
                lines.append(f"| {r['setting']} | – | – | – | – | – |")
                continue
            fid = r.get("fidelity")
            lines.append(
                f"| {r['setting']} | {fmt(r['ssim_mean'], 3)} ± {fmt(r['ssim_std'], 3)} | {fmt(r['rate'])} "
                f"| {fmt(r.get('heldout'), 3)} | {_fidelity_cell(fid, 'fidelity')} "
                f"| {_fidelity_cell(fid, 'fidelity_generic')} |"
            )
        text = "\n".join(lines) + "\n"
        (out / "table.md").write_text(text)
        Stage(out, "table").save(table)
        print(text)

    # --- no mitigation, and the false-positive control -----------------------------------------
    st = Stage(out, "none_captions" if args.no_attack else "none")
    none_rows = st.load() if st.done() else st.save(attack_rows(pipe, targets, attack=not args.no_attack))
    unedited_fid = heldout_fidelity(pipe, "unedited")
    table.append(
        {
            "setting": "Memorized captions, no mitigation",
            **summarize(none_rows, "before"),
            "heldout": 1.0,
            "fidelity": unedited_fid,
        }
    )
    if not args.no_attack:
        table.append(
            {
                "setting": "No mitigation + Dori",
                **summarize(none_rows, "after"),
                "heldout": 1.0,
                "fidelity": unedited_fid,
            }
        )
    write_table()

    # --- subspace pruning ----------------------------------------------------------------------------
    from diffmem.hooks.ffn import ffn_layers
    from diffmem.localize.prune import FFNStats, WeightMask, collect_ffn_stats, select_memorization_weights
    from diffmem.modelio import model_fingerprint

    stats_files = out / "stats_memorized.safetensors", out / "stats_reference.safetensors"
    if all(f.is_file() for f in stats_files):
        mem, ref = (FFNStats.load(f) for f in stats_files)
    else:
        kw = dict(
            num_steps=args.tau,
            num_inference_steps=args.prune_steps,
            guidance_scale=args.guidance_scale,
            cond_only=args.cond_only,
            progress=False,
        )
        t0 = time.time()
        mem = collect_ffn_stats(pipe, [cap for _, cap, _ in targets], **kw)
        if args.reference == "empty":
            reference = [""] * len(targets)
        else:  # as many generic training captions as targets (|P| = |B| keeps the root-sum-of-squares fair)
            reference = (data.captions("generic") * len(targets))[: len(targets)]
        ref = collect_ffn_stats(pipe, reference, **kw)
        print(f"FFN statistics: {time.time() - t0:.1f} s")
        mem.save(stats_files[0])
        ref.save(stats_files[1])
    layers = ffn_layers(pipe.unet)
    sweep = []
    chosen = None
    for ratio in [float(r) for r in args.ratios.split(",")]:
        masks = select_memorization_weights(
            {n: m.weight for n, m in layers.items()}, mem, ref, ratio=ratio, tau=args.tau
        )
        mask = WeightMask(masks, model_fingerprint(pipe.unet), {"ratio": ratio, "tau": args.tau})
        st = Stage(out, f"prune_{ratio}")
        if st.done():
            res = st.load()
        else:
            rows = attack_rows(pipe, targets, mask, attack=False)
            with edit_context(pipe.unet, mask):
                q = heldout_quality(pipe)
            res = st.save(
                {
                    "rows": rows,
                    "heldout": q,
                    "pruned_fraction": mask.pruned_fraction(),
                    "num_pruned": mask.num_pruned(),
                }
            )
        s = summarize(res["rows"], "before")
        sweep.append(
            {
                "ratio": ratio,
                **s,
                "heldout": res["heldout"],
                "fidelity": heldout_fidelity(pipe, f"prune_{ratio}", mask),
                "num_pruned": res["num_pruned"],
                "pruned_fraction": res["pruned_fraction"],
            }
        )
        base_rate = table[0]["rate"]
        reduction = 1 - s["rate"] / base_rate if base_rate > 0 else float("nan")
        print(
            f"pruning rho={ratio}: rate {s['rate']:.2f} (reduction {reduction:.0%}), held-out median SSIM {res['heldout']:.3f}"
        )
        if chosen is None and reduction >= 0.8 and res["heldout"] >= args.max_heldout_drop:
            chosen = (ratio, mask)
    Stage(out, "prune_sweep").save(sweep)
    if chosen is None:
        ratio = sweep[0]["ratio"]
        masks = select_memorization_weights(
            {n: m.weight for n, m in layers.items()}, mem, ref, ratio=ratio, tau=args.tau
        )
        chosen = (ratio, WeightMask(masks, model_fingerprint(pipe.unet), {"ratio": ratio, "tau": args.tau}))
        print("no ratio reached an 80% reduction with held-out quality kept; attacking the paper default")
    ratio, mask = chosen
    mask.save(out / "weight_mask.safetensors")
    row = next(r for r in sweep if r["ratio"] == ratio)
    for r in sweep:
        table.append(
            {
                "setting": f"Pruning rho={r['ratio']} ({r['num_pruned']} weights)",
                **{k: r[k] for k in ("ssim_mean", "ssim_std", "rate", "heldout", "fidelity")},
            }
        )
    # the ceiling of any FFN pruning: every weight of every FFN second linear layer zeroed
    everything = WeightMask(
        {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()},
        model_fingerprint(pipe.unet),
        {"all_ffn": True},
    )
    st = Stage(out, "prune_all_ffn")
    if st.done():
        res = st.load()
    else:
        rows = attack_rows(pipe, targets, everything, attack=False)
        with edit_context(pipe.unet, everything):
            res = st.save({"rows": rows, "heldout": heldout_quality(pipe)})
    table.append(
        {
            "setting": f"Every FFN weight zeroed ({everything.num_pruned()}, the ceiling of FFN pruning)",
            **summarize(res["rows"], "before"),
            "heldout": res["heldout"],
            "fidelity": heldout_fidelity(pipe, "prune_all_ffn", everything),
        }
    )
    if args.no_attack:  # pruning alone: the cheapest measurement, for slow machines
        write_table()
        return
    st = Stage(out, "prune_attack")
    rows = st.load() if st.done() else st.save(attack_rows(pipe, targets, mask))
    table.append(
        {
            "setting": f"Pruning rho={ratio} + Dori",
            **summarize(rows, "after"),
            "heldout": row["heldout"],
            "fidelity": row["fidelity"],
        }
    )

    write_table()

    # --- the false-positive control ----------------------------------------------------------------
    st = Stage(out, "controls")
    ctrl_rows = st.load() if st.done() else st.save(attack_rows(pipe, controls))
    table.append(
        {"setting": "Non-memorized images, their captions", **summarize(ctrl_rows, "before"), "heldout": None}
    )
    table.append(
        {
            "setting": "Non-memorized images + Dori (false positives)",
            **summarize(ctrl_rows, "after"),
            "heldout": None,
        }
    )
    write_table()

    # --- NeMo ------------------------------------------------------------------------------------
    nemo_set = None
    if not args.no_nemo:
        from diffmem.localize.neuron_set import NeuronSet

        nemo_file = out / "nemo_neurons.json"
        sets_dir = Path(args.nemo_sets) if args.nemo_sets else out / "nemo_neurons"
        if args.neurons:
            nemo_set = NeuronSet.load(args.neurons)
        elif nemo_file.is_file():
            nemo_set = NeuronSet.load(nemo_file)
        else:
            try:
                from diffmem.localize.nemo import NeMo, NemoConfig
                from diffmem.localize.stats import compute_value_stats

                nonmem = data.captions("generic") + data.captions("heldout")
                stats = compute_value_stats(
                    pipe.unet, pipe.text_encoder, pipe.tokenizer, nonmem, progress=False
                )
                probe = NeMo.from_pipe(pipe, stats)
                threshold = probe.calibrate_threshold(nonmem[:16])
                nemo = NeMo.from_pipe(pipe, stats, NemoConfig(threshold=threshold))
                sets = [nemo.localize(cap) for _, cap, _ in targets]
                for (rid, _, _), one in zip(targets, sets):
                    one.save(sets_dir / f"{rid}.json")
                nemo_set = sets[0].union(*sets[1:])
                nemo_set.save(nemo_file)
            except Exception as err:  # report, do not hide: the row says why it is missing
                print(f"NeMo localization failed: {type(err).__name__}: {err}")
                table.append({"setting": f"NeMo: not run ({type(err).__name__}: {err})"})
        if nemo_set is not None:
            st = Stage(out, "nemo")
            rows = st.load() if st.done() else st.save(attack_rows(pipe, targets, nemo_set))
            st_q = Stage(out, "nemo_heldout")
            if st_q.done():
                q = st_q.load()
            else:
                with edit_context(pipe.unet, nemo_set):
                    q = st_q.save(heldout_quality(pipe))
            fid = heldout_fidelity(pipe, "nemo", nemo_set)
            table.append(
                {
                    "setting": f"NeMo ({len(nemo_set)} neurons)",
                    **summarize(rows, "before"),
                    "heldout": q,
                    "fidelity": fid,
                }
            )
            table.append(
                {"setting": "NeMo + Dori", **summarize(rows, "after"), "heldout": q, "fidelity": fid}
            )
        # NeMo as deployed: each memorized caption's own neurons, switched off only for that caption
        # (held-out captions are not flagged, so they are untouched: no held-out columns)
        per_target = {}
        if sets_dir.is_dir():
            by_caption = {}
            for f in sorted(sets_dir.glob("*.json")):
                one = NeuronSet.load(f)
                for prompt in one.prompts:
                    by_caption[prompt] = one
            per_target = {rid: by_caption[cap] for rid, cap, _ in targets if cap in by_caption}
        if len(per_target) == len(targets):
            st = Stage(out, "nemo_per_target")
            if st.done():
                rows = st.load()
            else:
                rows = [attack_rows(pipe, [t], per_target[t[0]])[0] for t in targets]
                st.save(rows)
            sizes = [len(per_target[rid]) for rid, _, _ in targets]
            label = f"NeMo per target (its own {min(sizes)}-{max(sizes)} neurons)"
            table.append({"setting": label, **summarize(rows, "before"), "heldout": None})
            table.append({"setting": f"{label} + Dori", **summarize(rows, "after"), "heldout": None})
        elif per_target or args.nemo_sets:
            print(f"per-target NeMo rows skipped: NeuronSets for {len(per_target)} of {len(targets)} targets")

    write_table()

    # --- adversarial fine-tuning ---------------------------------------------------------------------
    if not args.no_finetune:
        from diffmem.attack.dori import encode_images, encode_prompts
        from diffmem.train.adversarial import (
            AdversarialConfig,
            AdversarialTarget,
            RetainSet,
            adversarial_finetune,
        )

        surrogate_edit = nemo_set if nemo_set is not None else mask
        ids = [rid for rid, _, _ in targets]
        with edit_context(pipe.unet, surrogate_edit):
            surrogates = make_surrogates(
                pipe,
                ids,
                [c for _, c, _ in targets],
                steps=args.gen_steps,
                guidance_scale=args.guidance_scale,
                seed=0,
            )
        with torch.no_grad():
            lat = encode_images(pipe.vae, torch.stack([img for _, _, img in targets]).to(pipe.device)).cpu()
            emb = encode_prompts(pipe, [c for _, c, _ in targets]).cpu()
            generic = data.by_role("generic")
            pick = torch.randperm(len(generic), generator=torch.Generator().manual_seed(0))[
                : args.retain
            ].tolist()
            r_lat = torch.cat(
                [
                    encode_images(
                        pipe.vae,
                        torch.stack([_image_tensor(generic[i].pixels) for i in pick[k : k + 32]]).to(
                            pipe.device
                        ),
                    ).cpu()
                    for k in range(0, len(pick), 32)
                ]
            )
            r_emb = encode_prompts(pipe, [generic[i].caption for i in pick]).cpu()
        adv_targets = [
            AdversarialTarget(i, lat[k : k + 1], surrogates[k : k + 1], emb[k : k + 1])
            for k, i in enumerate(ids)
        ]
        config = AdversarialConfig(
            rounds=args.finetune_rounds, lr=args.finetune_lr, dori=dori, retain_batch_size=8, adv_batch_size=8
        )
        tuned = copy.deepcopy(pipe.unet)
        t0 = time.time()
        log = adversarial_finetune(
            tuned,
            pipe.scheduler,
            adv_targets,
            RetainSet(r_lat, r_emb),
            config,
            checkpoint_dir=out / "finetune_checkpoints",
            on_round=lambda r, e: print(f"fine-tuning round {r}: {e}"),
        )
        print(f"adversarial fine-tuning: {time.time() - t0:.1f} s")
        ft_pipe = StableDiffusionPipeline(**{**pipe.components, "unet": tuned})
        ft_pipe.set_progress_bar_config(disable=True)
        st = Stage(out, f"finetune_attack_r{args.finetune_rounds}")
        rows = st.load() if st.done() else st.save(attack_rows(ft_pipe, targets))
        st_q = Stage(out, f"finetune_heldout_r{args.finetune_rounds}")
        q = st_q.load() if st_q.done() else st_q.save(heldout_quality(ft_pipe))
        fid = heldout_fidelity(ft_pipe, f"finetune_r{args.finetune_rounds}")
        table.append(
            {
                "setting": f"Adversarial FT ({args.finetune_rounds} rounds), captions",
                **summarize(rows, "before"),
                "heldout": q,
                "fidelity": fid,
            }
        )
        table.append(
            {
                "setting": f"Adversarial FT ({args.finetune_rounds} rounds) + Dori",
                **summarize(rows, "after"),
                "heldout": q,
                "fidelity": fid,
            }
        )
        Stage(out, "finetune_log").save(log.rounds)

    write_table()


if __name__ == "__main__":
    main()
