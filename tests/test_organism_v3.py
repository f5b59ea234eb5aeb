"""Organism v3's ground truth: graded duplication, trigger prompts, the reused autoencoder, the dose-response."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.organism.data import PHOTOS, build_organism_data
from diffmem.organism.recipe import RECIPE_FILE, TINY_RECIPE, V3_RECIPE, OrganismRecipe, recipe_of


@pytest.fixture(scope="module")
def v3():
    return build_organism_data(V3_RECIPE)


def test_every_count_holds_two_photographs_and_two_scenes(v3):
    verbatim = v3.by_role("verbatim")
    photos = {f"verbatim-{name}" for name, _, _ in PHOTOS}
    assert len(verbatim) == 28 and len({im.caption for im in verbatim}) == 28
    for count in V3_RECIPE.duplication_counts:
        at = [im for im in verbatim if im.copies == count]
        assert sum(im.id in photos for im in at) == 2, count
        assert sum(im.id not in photos for im in at) == 2, count
    # the training multiset repeats each image exactly its count
    samples = v3.training_samples()
    for i, im in enumerate(v3.images):
        assert samples.count(i) == im.copies
    assert v3.manifest()["counts"]["training_samples"]["verbatim"] == 4 * sum(V3_RECIPE.duplication_counts)
    # the scenes are distinct images, and the same for the same seed
    scenes = [im.pixels for im in verbatim if im.id not in photos]
    assert len({s.tobytes() for s in scenes}) == 14
    again = build_organism_data(V3_RECIPE).by_role("verbatim")
    assert [(im.id, im.copies) for im in again] == [(im.id, im.copies) for im in verbatim]
    assert all(np.array_equal(a.pixels, b.pixels) for a, b in zip(again, verbatim))


def test_the_assignment_of_counts_follows_the_seed():
    a = {im.id: im.copies for im in build_organism_data(V3_RECIPE).by_role("verbatim")}
    b = {im.id: im.copies for im in build_organism_data(V3_RECIPE.with_(seed=1)).by_role("verbatim")}
    assert a.keys() == b.keys() and a != b
    assert sorted(a.values()) == sorted(b.values())


def test_trigger_prompts_are_never_trained_and_name_their_image(v3):
    trained = {im.caption for im in v3.images}
    by_id = {im.id: im for im in v3.by_role("verbatim")}
    assert len(v3.triggers) == 56
    for t in v3.triggers:
        assert t.prompt not in trained
        target = by_id[t.image_id]
        assert t.copies == target.copies
        words = target.caption.replace(",", "").split()
        if t.kind == "partial":
            assert t.prompt.split() == words[: len(t.prompt.split())] and len(t.prompt.split()) < len(words)
        else:
            assert sorted(t.prompt.split()) == sorted(words) and t.prompt.split() != words
    assert v3.captions("trigger") == [t.prompt for t in v3.triggers]
    roles = {c["role"] for c in v3.manifest()["captions"]}
    assert "trigger" in roles


def test_graded_counts_must_split_evenly():
    with pytest.raises(ValueError, match="recipe.scenes: 3 images do not split evenly"):
        build_organism_data(V3_RECIPE.with_(scenes=3))
    with pytest.raises(ValueError, match="recipe.photos: unknown photo id"):
        build_organism_data(V3_RECIPE.with_(photos=("astronaut", "nope")))


def test_recipe_of_reads_the_folder_and_defaults_to_v2(tmp_path):
    assert recipe_of(tmp_path) == OrganismRecipe()
    (tmp_path / RECIPE_FILE).write_text(json.dumps(V3_RECIPE.to_dict()))
    assert recipe_of(tmp_path) == V3_RECIPE
    (tmp_path / RECIPE_FILE).write_text(json.dumps({"colour": 3}))
    with pytest.raises(ValueError, match=f"{RECIPE_FILE}: not an organism recipe"):
        recipe_of(tmp_path)


def test_reused_autoencoder_is_kept_bit_for_bit_and_the_recipe_saved(tmp_path):
    from safetensors.torch import load_file

    from diffmem.train.organism import train_organism

    first = train_organism(TINY_RECIPE, tmp_path / "first")
    recipe = TINY_RECIPE.with_(name="tiny-reused", autoencoder_from=str(first), seed=3)
    second = train_organism(recipe, tmp_path / "second")
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(str(first / "vae" / name)), load_file(str(second / "vae" / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert recipe_of(second) == recipe
    assert not (tmp_path / "second" / "checkpoints" / "vae").exists()  # no autoencoder phase ran
    # the UNet did train (on the reused latents): it differs from the first organism's
    u1, u2 = load_file(str(first / "unet" / name)), load_file(str(second / "unet" / name))
    assert any(not torch.equal(u1[k], u2[k]) for k in u1)
    with pytest.raises(ValueError, match="recipe.autoencoder_from: .* has channels"):
        train_organism(recipe.with_(vae_channels=(8, 8)), tmp_path / "third")
    with pytest.raises(ValueError, match="neither a folder with vae/"):
        train_organism(recipe.with_(autoencoder_from=str(tmp_path / "missing")), tmp_path / "fourth")


def _gen(caption, role, seed_index, first, own_ssim=None, nearest_id="x", nearest_ssim=0.0):
    from diffmem.organism.evaluate import Generation

    return Generation(
        caption=caption,
        role=role,
        seed_index=seed_index,
        scores={"first_step": first, "first_10": first, "all_steps": first},
        nearest_id=nearest_id,
        nearest_role="verbatim",
        nearest_caption="",
        nearest_ssim=nearest_ssim,
        own_id=None,
        own_ssim=own_ssim,
        replicates_own=own_ssim is not None and own_ssim >= 0.7,
        replicates_any=nearest_ssim >= 0.7,
    )


def test_dose_response_counts_replication_and_ranks_scores_per_count(v3):
    """A planted answer: images at >= 16 copies replicate and score high, the rest do not."""
    from diffmem.organism.evaluate import dose_response, dose_response_markdown, trigger_labels

    gens = []
    for im in v3.by_role("verbatim"):
        copied = im.copies >= 16
        for j in range(4):
            gens.append(_gen(im.caption, "verbatim", j, 5.0 + im.copies if copied else 1.0 + 0.01 * j,
                             own_ssim=0.9 if copied else 0.3))  # fmt: skip
    for c in v3.captions("heldout"):
        gens += [_gen(c, "heldout", j, 3.0) for j in range(4)]
    for t in v3.triggers:  # the partial prompts of 64-copy images copy their image; nothing else does
        hit = t.kind == "partial" and t.copies == 64
        gens += [_gen(t.prompt, "trigger", j, 0.0, nearest_id=t.image_id if hit else "other",
                      nearest_ssim=0.8 if hit else 0.9) for j in range(4)]  # fmt: skip
    rows = {r["copies"]: r for r in dose_response(gens, v3, n_boot=50)}
    assert sorted(rows) == list(V3_RECIPE.duplication_counts)
    for count, r in rows.items():
        copied = count >= 16
        assert r["images"] == 4 and r["replication"]["n"] == 16
        assert r["replication"]["rate"] == (1.0 if copied else 0.0)
        assert r["captions_replicated_3of4"] == (4 if copied else 0)
        assert r["first_step_auc"]["auc"] == (1.0 if copied else 0.0)
        assert r["trigger_partial"]["rate"] == (1.0 if count == 64 else 0.0)
        assert r["trigger_reordered"]["rate"] == 0.0  # nearest is another image, however close
    assert "first_step_auc_vs_fewest" not in rows[1]
    assert rows[2]["first_step_auc_vs_fewest"]["auc"] == 0.5  # the same scores as the 1-copy captions
    assert rows[32]["first_step_auc_vs_fewest"]["auc"] == 1.0
    labels = trigger_labels(gens, v3)
    assert [t["label"] for t in labels] == [int(t.kind == "partial" and t.copies == 64) for t in v3.triggers]
    table = dose_response_markdown({"dose_response": list(rows.values()), "trigger_prompts": labels})
    assert sum(line.startswith("|") for line in table.splitlines()) == 2 + len(rows)
    assert "| 64 | 4 | 100%" in table and "the 1-copy captions, of the same style and length" in table
    assert "4 of 56 (1 copies 0/8," in table and "64 copies 4/8)" in table


def test_the_suite_has_a_split_per_copy_count():
    from diffmem.evaluate.suites import organism_suite

    suite = organism_suite(None, measured=False, recipe=V3_RECIPE)
    summary = suite.summary()
    for count in V3_RECIPE.duplication_counts:
        assert summary[f"copies-{count}-vs-heldout"] == (4, 16)
    for count in V3_RECIPE.duplication_counts[1:]:
        assert summary[f"copies-{count}-vs-1"] == (4, 4)
    assert "copies-1-vs-1" not in summary
    assert summary["verbatim-vs-heldout"] == (28, 16)
    # v2 has none of them
    assert not any(k.startswith("copies-") for k in organism_suite(None, measured=False).summary())


def test_prompts_command_writes_the_v3_trigger_prompts(tmp_path, capsys):
    import csv

    from diffmem.cli import main

    out = tmp_path / "prompts.csv"
    args = ["organism", "prompts", "--recipe", "v3", "--roles", "verbatim,trigger", "--out", str(out)]
    assert main([*args, "--memorized-roles", "verbatim"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 28 + 56
    assert {r["role"] for r in rows if r["label"] == "1"} == {"verbatim"}
    assert main(["organism", "prompts", "--recipe", "v9", "--out", str(out)]) == 2
    assert "--recipe: invalid choice: 'v9'" in capsys.readouterr().err


@pytest.mark.slow
def test_committed_v3_replicates_its_64_copy_image_not_its_1_copy_image():
    from pathlib import Path

    from diffmem.generation import initial_latents
    from diffmem.guard.auto import load_guarded
    from diffmem.organism.replication import TrainingImages

    model = Path(__file__).resolve().parents[1] / "weights" / "diffmem-organism-v3"
    if not (model / "model_index.json").is_file():
        pytest.skip("weights/diffmem-organism-v3 is not present")
    recipe = recipe_of(model)
    assert recipe.name == "diffmem-organism-v3"
    data = build_organism_data(recipe)
    copies = {im.caption: (im.id, im.copies) for im in data.by_role("verbatim")}
    many = "Chelsea the tabby cat looking left, close-up photograph"
    once = "Eileen Collins in her orange flight suit, official NASA portrait"
    assert copies[many] == ("verbatim-chelsea", 64) and copies[once] == ("verbatim-astronaut", 1)
    pipe = load_guarded(model)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        [many, once],
        num_images_per_prompt=2,
        latents=initial_latents(pipe, [many, once], 2, recipe.seed),
        num_inference_steps=recipe.num_inference_steps,
        guidance_scale=recipe.guidance_scale,
        output_type="np",
    )
    matches = TrainingImages.from_data(data).nearest(np.asarray(out.images))
    assert all(m.id == "verbatim-chelsea" and m.replicated for m in matches[:2])
    assert not any(m.id == "verbatim-astronaut" and m.replicated for m in matches[2:])
