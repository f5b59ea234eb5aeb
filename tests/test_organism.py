"""The model organism: data promises, exact resume of training, replication helpers, the committed weights."""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffmem.organism.data import ROLES, build_organism_data, export_imagefolder
from diffmem.organism.recipe import TINY_RECIPE, OrganismRecipe
from diffmem.organism.replication import REPLICATION_THRESHOLD, TrainingImages, replicates
from diffmem.scores.similarity import normalized_l2, pairwise_ssim, ssim


@pytest.fixture(scope="module")
def full_data():
    return build_organism_data(OrganismRecipe())


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes()).hexdigest()


def test_data_has_the_promised_roles_and_counts(full_data):
    data = full_data
    generic, verbatim, template = (data.by_role(r) for r in ("generic", "verbatim", "template"))
    assert len(generic) >= 1000
    assert len({_digest(im.pixels) for im in generic}) == len(generic)  # distinct images
    # every generic caption fits many different images
    per_caption = {c: sum(im.caption == c for im in generic) for c in data.captions("generic")}
    assert min(per_caption.values()) >= 30
    # at least 16 distinct photographs, each duplicated >= 30 times under one unique caption
    assert len(verbatim) >= 16 and all(im.copies >= 30 for im in verbatim)
    assert len({_digest(im.pixels) for im in verbatim}) == len(verbatim)
    assert len(set(data.captions("verbatim"))) == len(verbatim)
    # template captions: several images each, sharing one layout (the frame) with varying details
    assert len(data.captions("template")) >= 2
    for caption in data.captions("template"):
        imgs = np.stack([im.pixels for im in template if im.caption == caption]).astype(float)
        assert len(imgs) >= 10
        border = np.concatenate([imgs[:, :4].reshape(len(imgs), -1), imgs[:, -4:].reshape(len(imgs), -1)], 1)
        assert border.std(axis=0).mean() < 5  # the frame is the same in every image
        assert imgs.std(axis=0).max() > 50  # the details are not
    # held-out captions: new compositions of the training vocabulary, never trained on
    trained = {im.caption for im in data.images}
    held = data.captions("heldout")
    assert len(held) >= 16 and not set(held) & trained
    vocab = {w for c in data.captions("generic") for w in c.split()}
    assert all(set(c.split()) <= vocab for c in held)


def test_manifest_lists_every_caption_with_role_and_image_ids(full_data):
    m = full_data.manifest()
    json.dumps(m)  # JSON-ready
    roles = {c["role"] for c in m["captions"]}
    assert roles == set(ROLES) - {"trigger"}  # v2 has no trigger prompts (v3: tests/test_organism_v3.py)
    ids = {im["id"] for im in m["images"]}
    for c in m["captions"]:
        assert (c["role"] == "heldout") == (not c["image_ids"])
        assert set(c["image_ids"]) <= ids
    assert m["counts"]["training_samples"]["verbatim"] == 16 * OrganismRecipe().verbatim_copies


def test_data_is_deterministic_in_its_seed():
    a, b = build_organism_data(TINY_RECIPE), build_organism_data(TINY_RECIPE)
    assert [im.id for im in a.images] == [im.id for im in b.images]
    assert np.array_equal(a.image_array(), b.image_array())
    c = build_organism_data(TINY_RECIPE.with_(seed=1))
    ga, gc = a.by_role("generic"), c.by_role("generic")
    assert not np.array_equal(np.stack([i.pixels for i in ga]), np.stack([i.pixels for i in gc]))
    # the photographs are the same whatever the seed
    assert np.array_equal(a.by_role("verbatim")[0].pixels, c.by_role("verbatim")[0].pixels)


def test_export_imagefolder_writes_every_training_sample(tmp_path):
    from PIL import Image

    data = build_organism_data(TINY_RECIPE)
    out = export_imagefolder(data, tmp_path / "folder")
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(data.training_samples())
    assert len({r["id"] for r in rows}) == len(rows)
    assert {r["role"] for r in rows} == {"generic", "verbatim", "template"}
    first_photo = next(r for r in rows if r["role"] == "verbatim")
    assert set(first_photo) == {"file_name", "text", "id", "role", "image_id"}
    pixels = np.asarray(Image.open(out / first_photo["file_name"]))
    src = next(im for im in data.images if im.id == first_photo["image_id"])
    assert np.array_equal(pixels, src.pixels) and first_photo["text"] == src.caption
    assert json.loads((out / "manifest.json").read_text())["counts"]


def test_checkpoint_roundtrip_resumes_the_same_trajectory(tmp_path):
    from diffmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return model, opt, sched

    def step(model, opt, sched, k):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(16, 4, generator=g)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    ref = setup()
    for k in range(6):
        step(*ref, k)
    run = setup()
    for k in range(3):
        step(*run, k)
    save_checkpoint(tmp_path, 3, {"m": run[0]}, {"opt": run[1]}, {"lr": run[2]}, extra={"note": "x"})
    resumed = setup()
    state = load_checkpoint(
        latest_checkpoint(tmp_path), {"m": resumed[0]}, {"opt": resumed[1]}, {"lr": resumed[2]}
    )
    assert state == {"step": 3, "extra": {"note": "x"}}
    for k in range(3, 6):
        step(*resumed, k)
    for a, b in zip(ref[0].parameters(), resumed[0].parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="state.json"):
        load_checkpoint(tmp_path / "nothing", {"m": resumed[0]})


def _timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_training_resumes_to_identical_weights(tmp_path):
    from safetensors.torch import load_file

    from diffmem.train.organism import train_organism

    full = train_organism(TINY_RECIPE, tmp_path / "full")
    # an "interrupted" run: stop after 2 UNet steps, then rerun the same command to the end
    part = tmp_path / "part"
    train_organism(TINY_RECIPE, part, until_step=3)
    assert (part / "checkpoints" / "unet" / "step-00000003").is_dir()
    assert not (part / "model").exists()
    resumed = train_organism(TINY_RECIPE, part)
    for component in ("unet", "text_encoder", "vae"):
        name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(str(full / component / name)), load_file(str(resumed / component / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), component
    # a different recipe in the same folder is refused
    with pytest.raises(ValueError, match="another recipe"):
        train_organism(TINY_RECIPE.with_(text_hidden=8), part)
    log = json.loads((part / "train-log.json").read_text())
    assert log["unet"][-1]["step"] == TINY_RECIPE.unet_steps
    # the log too: the interrupted phase's rows cover its steps before the stop as well (all but seconds)
    whole = json.loads((tmp_path / "full" / "train-log.json").read_text())
    for phase in ("vae", "decoder", "unet"):
        assert _timeless(log[phase]) == _timeless(whole[phase]), phase


def test_similarity_and_replication_helpers():
    data = build_organism_data(TINY_RECIPE)
    training = TrainingImages.from_data(data)
    x = training.pixels
    assert torch.allclose(ssim(x[:3], x[:3]), torch.ones(3), atol=1e-4)
    assert torch.allclose(normalized_l2(x[:3], x[:3]), torch.zeros(3))
    pw = pairwise_ssim(x[:2], x[:5])
    assert pw.shape == (2, 5) and torch.allclose(pw[1, 1], torch.tensor(1.0), atol=1e-4)
    # a slightly noisy copy of a planted photo is found and counts as a replication; noise does not
    photo = next(i for i, r in enumerate(training.roles) if r == "verbatim")
    g = torch.Generator().manual_seed(0)
    copy = (x[photo] + 0.02 * torch.randn(x[photo].shape, generator=g)).clamp(0, 1)
    noise = torch.rand(x[photo].shape, generator=g)
    match, other = training.nearest(torch.stack([copy, noise]))
    assert match.id == training.ids[photo] and match.replicated and match.ssim > REPLICATION_THRESHOLD
    assert not other.replicated
    assert replicates(copy[None], x[photo]).tolist() == [True]
    assert replicates(noise[None], x[photo]).tolist() == [False]
    with pytest.raises(ValueError, match="same size"):
        training.nearest(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x[:1], x[:2])


@pytest.mark.slow
def test_committed_organism_replicates_verbatim_not_heldout():
    from diffmem.generation import initial_latents
    from diffmem.guard.auto import load_guarded
    from diffmem.modelio import default_model
    from diffmem.organism.replication import organism_training_images

    model = default_model()
    if model is None:
        pytest.skip("weights/diffmem-organism-v2 is not present")
    pipe = load_guarded(model)
    pipe.set_progress_bar_config(disable=True)
    training = organism_training_images()
    recipe = OrganismRecipe()
    verbatim = "Eileen Collins in her orange flight suit, official NASA portrait"
    heldout = "a red circle"
    assert heldout not in training.captions
    latents = initial_latents(pipe, [verbatim, heldout], 2, recipe.seed)
    out = pipe(
        [verbatim, heldout],
        num_images_per_prompt=2,
        latents=latents,
        num_inference_steps=recipe.num_inference_steps,
        guidance_scale=recipe.guidance_scale,
        output_type="np",
        memorization_window=(0, 1),
    )
    matches = training.nearest(np.asarray(out.images))
    assert all(m.id == "verbatim-astronaut" and m.replicated for m in matches[:2])
    assert not any(m.replicated for m in matches[2:])
    # and the memorized caption scores higher than the held-out one at the first step (Wen et al.)
    assert min(out.memorization_scores[:2]) > max(out.memorization_scores[2:])


class _RoundTripVAE(torch.nn.Module):
    """A stand-in autoencoder whose round trip is ``x -> x * gain`` (in the model's [-1, 1] space)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        return SimpleNamespace(sample=z * self.gain)


def test_autoencoder_ceiling_is_the_ssim_of_the_round_trip():
    from diffmem.organism.evaluate import autoencoder_ceiling

    training = TrainingImages.from_data(build_organism_data(TINY_RECIPE))
    verbatim = [i for i, r in enumerate(training.roles) if r == "verbatim"]
    # a lossless autoencoder: a perfect latent copy is a perfect copy
    exact = autoencoder_ceiling(SimpleNamespace(vae=_RoundTripVAE(1.0)), training)
    assert list(exact) == [training.ids[i] for i in verbatim]
    assert all(abs(v - 1.0) < 1e-4 for v in exact.values())
    # one that flattens every image to grey (gain 0): the ceiling is the SSIM of grey to the image
    grey = autoencoder_ceiling(SimpleNamespace(vae=_RoundTripVAE(0.0)), training)
    want = ssim(torch.full_like(training.pixels[verbatim], 0.5), training.pixels[verbatim])
    assert np.allclose(list(grey.values()), want.tolist(), atol=1e-5)
    assert max(grey.values()) < 0.99
    assert autoencoder_ceiling(SimpleNamespace(vae=_RoundTripVAE(1.0)), training, role="nope") == {}


@pytest.mark.slow
def test_replication_threshold_is_above_every_pair_of_distinct_same_caption_images(full_data):
    from diffmem.organism.replication import same_caption_ssim

    training = TrainingImages.from_data(full_data)
    sims = same_caption_ssim(training)
    per_caption = {
        c: sum(im.caption == c for im in full_data.by_role("generic")) for c in full_data.captions("generic")
    }
    assert len(sims) == sum(n * (n - 1) // 2 for n in per_caption.values())
    # two different scenes of one caption never look like copies of each other
    assert float(sims.max()) < REPLICATION_THRESHOLD
    # and the null is not degenerate: same-caption scenes do share content
    assert float(sims.median()) > 0.2
