"""Organism v4's recipe: compositional generic scenes whose captions name what is drawn, held-out pairs
never drawn in training, duplicated images a small share of the samples, and a training run (reused
autoencoder with its decoder fine-tuned, progressive growing) that resumes exactly after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffmem.organism.compositional import COLOURS, SHAPES, heldout_pair, render_scene_image, sample_scene
from diffmem.organism.data import build_organism_data
from diffmem.organism.recipe import TINY_RECIPE, V4_RECIPE
from diffmem.train.organism import train_organism


def test_captions_name_every_drawn_object_and_held_out_pairs_stay_out_of_training():
    for seed in range(200):
        scene = sample_scene(seed)
        caption = scene.caption()
        for obj in scene.objects:
            assert obj.colour in caption and obj.shape in caption and obj.place in caption
            assert not heldout_pair(obj.colour, obj.shape)
        held = sample_scene(seed, heldout=True)
        assert heldout_pair(held.objects[0].colour, held.objects[0].shape)
        assert not any(heldout_pair(o.colour, o.shape) for o in held.objects[1:])
    pairs = {(c, s) for c in COLOURS for s in SHAPES}
    held_pairs = {p for p in pairs if heldout_pair(*p)}
    assert 0 < len(held_pairs) < len(pairs) / 5
    # every colour and every shape word still occurs in training pairs
    assert {c for c, _ in pairs - held_pairs} == set(COLOURS) and {s for _, s in pairs - held_pairs} == set(
        SHAPES
    )


def test_scene_rendering_is_deterministic_in_its_seed():
    scene = sample_scene(7)
    a, b = render_scene_image(scene, 7, 64), render_scene_image(scene, 7, 64)
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, render_scene_image(scene, 8, 64))  # unnamed details come from the seed


@pytest.mark.slow
def test_v4_data_duplicates_a_small_share_and_regenerates_identically():
    small = V4_RECIPE.with_(generic_images=300, image_size=32)
    data = build_organism_data(small)
    again = build_organism_data(small)
    assert [im.caption for im in data.images] == [im.caption for im in again.images]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(data.images, again.images))
    full = build_organism_data(V4_RECIPE.with_(image_size=32))  # the full recipe's counts (small pixels)
    samples = full.training_samples()
    duplicated = sum(im.copies for im in full.images if im.copies > 1)
    assert len(samples) == 10_000 + 508 + 160
    assert duplicated / len(samples) <= 0.05
    copies = sorted(im.copies for im in full.by_role("verbatim"))
    assert copies == sorted([c for c in (1, 2, 4, 8, 16, 32, 64) for _ in range(4)])
    trained = {im.caption for im in full.images}
    assert full.heldout_captions and not trained & set(full.heldout_captions)
    assert len({im.caption for im in full.by_role("generic")}) > 9_000  # nearly every caption unique


def _weights(folder):
    out = {}
    for component, name in (
        ("unet", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
        ("vae", "diffusion_pytorch_model"),
    ):
        out.update(
            {
                f"{component}.{k}": v
                for k, v in load_file(str(folder / component / f"{name}.safetensors")).items()
            }
        )
    return out


@pytest.mark.slow
def test_v4_shaped_training_resumes_exactly_across_the_growth_step(tmp_path):
    base = TINY_RECIPE.with_(generic_style="compositional", generic_images=6, heldout_prompts=2)
    autoencoder = train_organism(base, tmp_path / "base")  # a tiny organism whose autoencoder is reused
    recipe = base.with_(
        autoencoder_from=str(autoencoder), reused_decoder_steps=2, unet_steps=5, low_res_steps=2
    )
    full = train_organism(recipe, tmp_path / "full")
    part = tmp_path / "part"
    train_organism(recipe, part, until_step=1)  # killed in the low-resolution steps
    train_organism(recipe, part, until_step=3)  # ... and again after the growth step
    assert (part / "latents.safetensors").is_file() and (part / "latents-half.safetensors").is_file()
    resumed = train_organism(recipe, part)
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the decoder was fine-tuned, the encoder (the latent space) kept
    reused = _weights(autoencoder)
    assert all(torch.equal(a[k], reused[k]) for k in a if k.startswith("vae.encoder."))
    assert any(not torch.equal(a[k], reused[k]) for k in a if k.startswith("vae.decoder."))


@pytest.mark.slow
def test_an_exported_run_resumes_on_another_machine_to_the_same_weights(tmp_path):
    from diffmem.train.organism_bundle import export_run, import_run

    recipe = TINY_RECIPE.with_(
        generic_style="compositional", generic_images=6, heldout_prompts=2, unet_steps=5
    )
    full = train_organism(recipe, tmp_path / "full")
    train_organism(recipe, tmp_path / "here", until_step=2)
    bundle = export_run(tmp_path / "here", tmp_path / "bundle")
    # the unused rows of the 49,408-token embedding are stored as nothing: the bundle is smaller
    size = sum(p.stat().st_size for p in (bundle / "checkpoint").glob("*.safetensors"))
    plain = sum(
        p.stat().st_size for p in (tmp_path / "here" / "checkpoints" / "unet").glob("step-*/*.safetensors")
    )
    assert size < plain / 3
    import_run(bundle, tmp_path / "there")  # a fresh workdir: no latents, no checkpoints
    with pytest.raises(ValueError, match="already holds a run"):
        import_run(bundle, tmp_path / "there")
    resumed = train_organism(recipe, tmp_path / "there")
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_run_exported_before_its_unet_phase_carries_its_decoder_phase(tmp_path):
    from diffmem.train.organism_bundle import export_run, import_run

    base = TINY_RECIPE.with_(generic_style="compositional", generic_images=6, heldout_prompts=2)
    autoencoder = train_organism(base, tmp_path / "base")
    recipe = base.with_(autoencoder_from=str(autoencoder), reused_decoder_steps=3, unet_steps=3)
    full = train_organism(recipe, tmp_path / "full")
    train_organism(recipe, tmp_path / "here", only="decoder")
    bundle = export_run(tmp_path / "here", tmp_path / "bundle")
    # the finished decoder travels as its final weights, with no checkpoint
    assert json.loads((bundle / "bundle.json").read_text())["phase"] is None
    assert (bundle / "decoder-final.safetensors").is_file() and not (bundle / "checkpoint").exists()
    import_run(bundle, tmp_path / "there")
    resumed = train_organism(recipe, tmp_path / "there")
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
