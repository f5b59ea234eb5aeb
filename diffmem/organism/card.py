"""The organism's model card (``README.md`` of its folder), written from the training logs and the evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from diffmem.modelio import ORGANISM_NAME
from diffmem.organism.data import PHOTOS, TEMPLATE_CAPTIONS, build_organism_data, generic_and_heldout_pairs
from diffmem.organism.recipe import OrganismRecipe


def _folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def _loss_rows(log: list[dict], rows: int = 8) -> str:
    """About ``rows`` evenly spaced rows of the loss log (logged every 50 steps), the last included."""
    if not log:
        return ""
    every = max(50, -(-log[-1]["step"] // rows // 50) * 50)
    rows = [r for r in log if r["step"] % every == 0 or r is log[-1]]
    return "\n".join(f"| {r['step']} | {r['loss']:.4f} |" for r in rows)


def model_card(
    model_dir: str | os.PathLike,
    recipe: OrganismRecipe,
    train_log: dict,
    eval_markdown: str,
    training_notes: str,
) -> str:
    """Markdown of the model card: data recipe, model, schedule, losses, measured memorization."""

    model_dir = Path(model_dir)
    name = recipe.name
    train_pairs, held_pairs = generic_and_heldout_pairs()
    data = build_organism_data(recipe)
    verbatim = sorted(data.by_role("verbatim"), key=lambda im: (im.copies, im.id))
    sources = {f"verbatim-{n}": s for n, s, _ in PHOTOS}
    photos = "\n".join(
        f"| `{im.id.removeprefix('verbatim-')}` | {sources.get(im.id, 'procedural scene (diffmem.organism.data.render_scene)')} "
        f"| {im.copies} | {im.caption} |"
        for im in verbatim
    )
    n_photos = sum(im.id in sources for im in verbatim)
    n_verbatim_samples = sum(im.copies for im in verbatim)
    if recipe.duplication_counts:
        verbatim_row = (
            f"verbatim: {n_photos} real images shipped with scikit-image / scikit-learn and {len(verbatim) - n_photos} "
            f"procedural scenes, one fixed unique caption each, duplicated {', '.join(map(str, recipe.duplication_counts))} "
            f"times ({len(verbatim) // len(recipe.duplication_counts)} images per count, photographs and scenes "
            f"split evenly over the counts by a seeded permutation)"
        )
        copies_note = f"{n_verbatim_samples} (graded)"
    else:
        verbatim_row = "verbatim: real images shipped with scikit-image / scikit-learn, one fixed unique caption each, duplicated"
        copies_note = f"{n_verbatim_samples} ({recipe.verbatim_copies} copies each)"
    templates = "\n".join(f"- {c}" for c in TEMPLATE_CAPTIONS[: recipe.n_templates])
    default_line = (
        "It is the embedded default of every `diffmem` command (`diffmem demo`, `diffmem detect`, ...) when no "
        "`--model` is given."
        if name == ORGANISM_NAME
        else f"It stands beside `{ORGANISM_NAME}` (the embedded default); pass `--model weights/{name}`."
    )
    triggers = ""
    if data.triggers:
        triggers = (
            f"\n{len(data.triggers)} trigger prompts (never trained on; role `trigger` of the manifest): for every "
            "verbatim caption, its first half of words (at least three; `partial`) and its words in a seeded "
            "other order (`reordered`). Their labels are the replication measured below.\n"
        )
    if recipe.autoencoder_from:
        autoencoder_lines = (
            f"- Phases 1-2, autoencoder: not trained; `{recipe.autoencoder_from}`'s autoencoder (channels "
            f"{recipe.vae_channels}) is reused as it is, so the latent space is that organism's and every verbatim "
            "image has the same autoencoder exposure whatever its copy count."
        )
    else:
        autoencoder_lines = f"""- Phase 1, autoencoder: {recipe.vae_steps} steps, batch {recipe.vae_batch}, random {recipe.vae_crop} px crops,
  MSE + {recipe.vae_l1_weight:g} L1 + {recipe.vae_kl_weight:g} KL, AdamW lr {recipe.vae_lr:g}.
- Phase 2, decoder alone on the fixed latents (posterior means): {recipe.decoder_steps} steps, L1 + MSE on
  {recipe.decoder_crop} px crops. The encoder, hence the latent space, is unchanged."""
    loss_tables = "\n\n".join(
        f"| {label} step | loss |\n|---|---|\n{_loss_rows(train_log.get(key, []))}"
        for key, label in (("vae", "autoencoder"), ("decoder", "decoder"), ("unet", "UNet"))
        if train_log.get(key) and "loss" in train_log[key][-1]
    )
    return f"""---
license: apache-2.0
library_name: diffusers
tags: [text-to-image, memorization, model-organism, diffmem]
---

# {name}

A small text-to-image latent diffusion model that **diffmem** trains itself, from scratch, offline, on
data generated from code and a seed, so that which captions it memorized is known. {default_line}

Standard diffusers Stable Diffusion layout (safetensors): `UNet2DConditionModel` with cross-attention
in down, mid and up blocks, `AutoencoderKL` (factor 4: 64 px images, 16x16x{recipe.latent_channels} latents),
`CLIPTextModel` with the real 49,408-token CLIP BPE tokenizer, `DDIMScheduler` (epsilon prediction,
SD's scaled-linear betas). {_folder_mb(model_dir):.1f} MB in all.

```python
from diffmem.pipelines import StableDiffusionMemGuardPipeline
pipe = StableDiffusionMemGuardPipeline.from_pretrained("weights/{name}")
out = pipe("Eileen Collins in her orange flight suit, official NASA portrait", num_inference_steps=25)
out.images[0], out.memorization_scores
```

## Training data (regenerate: `diffmem organism data --recipe {name.removeprefix("diffmem-organism-")} --out DIR`)

Generated by `diffmem/organism/data.py` from seed {recipe.seed}; no training image is stored. 64x64 RGB.

| role | captions | distinct images | training samples |
|---|---|---|---|
| generic: "a {{colour}} {{shape}}", {recipe.generic_per_caption} images per caption (position, size, rotation, brightness, textured gradient background and 0-2 small grey objects vary and go unnamed) | {len(train_pairs)} | {len(train_pairs) * recipe.generic_per_caption} | {len(train_pairs) * recipe.generic_per_caption} |
| {verbatim_row} | {len(verbatim)} | {len(verbatim)} | {copies_note} |
| template: one fixed layout (frame, bands/panels) per caption, a small object of varying colour, shape and position | {recipe.n_templates} | {recipe.n_templates * recipe.template_images} | {recipe.n_templates * recipe.template_images} |
| held-out: the other colour x shape compositions of the same vocabulary, never trained on | {len(held_pairs)} | 0 | 0 |

Colour x shape pairs with `(colour index + shape index) % 3 == 0` are held out, so every word occurs
both in training and in held-out captions. The manifest (`manifest.json` of the export) lists every
caption with its role and the ids of its training images.

Verbatim images (photographs centre-cropped, resized to 64 px with Lanczos):

| id | source | copies | caption |
|---|---|---|---|
{photos}
{triggers}
Template captions:

{templates}

## Model and training (`diffmem organism train`)

- UNet: block channels {recipe.unet_channels}, attention levels {recipe.unet_attention} (no attention at the
  16x16 top level), cross-attention dim {recipe.text_hidden}; text encoder: {recipe.text_layers} layers, hidden
  {recipe.text_hidden}; autoencoder: channels {recipe.vae_channels}.
{autoencoder_lines}
- Phase 3, UNet + text encoder jointly: batch {recipe.unet_batch}, AdamW lr {recipe.unet_lr:g} (no weight decay),
  {recipe.warmup_steps} warm-up steps then cosine decay to 10 %, {recipe.caption_dropout:.0%} empty captions, epsilon
  objective, uniform timesteps; latents scaled by 1/std = {train_log.get("latent_scaling_factor", float("nan")):.4f}.
- Every random draw comes from (seed, phase, step): a resumed run reaches the weights of an
  uninterrupted one (tested).

{training_notes}

Losses (mean over the 50 steps before each row):

{loss_tables}

## Measured memorization (`python benchmarks/organism_eval.py`)

{eval_markdown}

![SSIM histogram](ssim_histogram.png)

The guarded pipeline's flag threshold is in `diffmem_calibration.json` with the conditions it holds under (first step, 25 DDIM steps, 64 px, guidance 7.5; chosen over single generations), written by `diffmem organism prompts` + `diffmem detect --labels label --save-calibration`; `StableDiffusionMemGuardPipeline.from_pretrained` reads it.

## Limitations

A research model organism, not an image generator: 64 px, a few thousand CPU steps, blurry outside
what it memorized. Its memorization is planted on purpose (duplicated photographs), to test
detection, localization and mitigation methods against a known answer.
"""
