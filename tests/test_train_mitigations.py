"""Training-time mitigations on a tiny SD model: each mechanism, computed independently, and the
fine-tuning ground truth (deterministic, with exactly the duplicated rows it records)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from diffmem.seeding import item_generator
from diffmem.train.mitigations import (
    AmbientMitigation,
    CaptionNoiseMitigation,
    NoMitigation,
    TrainingBatch,
    WenFilterMitigation,
    available_training_mitigations,
    diffusion_draws,
    get_training_mitigation,
    sample_seeds,
)

B = 8


@pytest.fixture(scope="module")
def parts():
    from diffmem.tiny import TinySDConfig, build_components

    return build_components(TinySDConfig(variant="sd1"), seed=0)


def _encode(parts, captions):
    ids = parts["tokenizer"](
        list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return parts["text_encoder"](ids)[0]


@pytest.fixture(scope="module")
def batch(parts):
    g = torch.Generator().manual_seed(0)
    captions = [f"a photo of item number {i}" for i in range(B)]
    return TrainingBatch(
        latents=torch.randn(B, 4, 16, 16, generator=g),
        cond=_encode(parts, captions),
        seeds=sample_seeds(7, range(B), "epoch", 0),
        scheduler=parts["scheduler"],
        ids=[f"img-{i}" for i in range(B)],
        unet=parts["unet"],
        empty_cond=_encode(parts, [""]),
    )


def _rows(batch: TrainingBatch, rows) -> TrainingBatch:
    return TrainingBatch(
        latents=batch.latents[rows],
        cond=batch.cond[rows],
        seeds=[batch.seeds[i] for i in rows],
        scheduler=batch.scheduler,
        ids=[batch.ids[i] for i in rows],
        unet=batch.unet,
        empty_cond=batch.empty_cond,
    )


def _gaps(parts, step, batch):
    """Wen's noise gap, computed here from the UNet directly."""
    unet = parts["unet"]
    with torch.no_grad():
        e_c = unet(step.noisy, step.timesteps, encoder_hidden_states=batch.cond).sample
        e_u = unet(
            step.noisy, step.timesteps, encoder_hidden_states=batch.empty_cond.expand(B, -1, -1)
        ).sample
    return (e_c - e_u).flatten(1).norm(dim=1)


# ------------------------------------------------------------------------------------------ registry


def test_registry_lists_the_four_and_rejects_unknown_names():
    assert available_training_mitigations() == ["ambient", "caption-noise", "none", "wen-filter"]
    assert isinstance(get_training_mitigation(None), NoMitigation)
    assert get_training_mitigation("wen-filter", {"tau": 3}).tau == 3.0
    with pytest.raises(ValueError, match=r"'ambient', 'caption-noise', 'none', 'wen-filter'"):
        get_training_mitigation("dropout")
    with pytest.raises(ValueError, match="tau"):
        get_training_mitigation("wen-filter", {"tau": -1})
    with pytest.raises(ValueError, match="options for 'none'"):
        get_training_mitigation("none", {"tau": 1})


# ------------------------------------------------------------------------------------------ none


def test_none_is_the_standard_epsilon_loss(parts, batch):
    step = NoMitigation().prepare(batch)
    t, eps = diffusion_draws(batch.seeds, (4, 16, 16), 1000)
    assert torch.equal(step.timesteps, t) and torch.equal(step.noise, eps)
    expected_noisy = parts["scheduler"].add_noise(batch.latents, eps, t)
    torch.testing.assert_close(step.noisy, expected_noisy, rtol=1e-6, atol=1e-6)
    assert torch.equal(step.target, eps) and step.cond is batch.cond
    assert torch.equal(step.weight, torch.ones(B)) and not step.skip
    pred = parts["unet"](step.noisy, step.timesteps, encoder_hidden_states=step.cond).sample
    torch.testing.assert_close(step.loss(pred), F.mse_loss(pred, eps), rtol=1e-6, atol=0)
    # the loss keeps its graph
    step.loss(pred).backward()
    assert parts["unet"].conv_in.weight.grad is not None
    parts["unet"].zero_grad(set_to_none=True)


def test_draws_follow_the_seed_not_the_batch():
    a_t, a_eps = diffusion_draws([11, 12, 13], (2, 3, 3), 1000)
    b_t, b_eps = diffusion_draws([13], (2, 3, 3), 1000)
    assert a_t[2] == b_t[0] and torch.equal(a_eps[2], b_eps[0])
    assert sample_seeds(0, ["x"], "epoch", 1) != sample_seeds(0, ["x"], "epoch", 2)


@pytest.mark.parametrize(
    "mitigation",
    [
        NoMitigation(),
        AmbientMitigation(t_n=400),
        WenFilterMitigation(tau=1e6),
        CaptionNoiseMitigation(embedding_sigma=0.1),
    ],
    ids=lambda m: m.name,
)
def test_a_sample_is_the_same_at_batch_size_1_and_4(batch, mitigation):
    rows = [1, 3, 4, 6]
    whole = mitigation.prepare(_rows(batch, rows))
    for k, i in enumerate(rows):
        alone = mitigation.prepare(_rows(batch, [i]))
        for key in ("noisy", "timesteps", "target", "cond", "weight", "noise"):
            torch.testing.assert_close(getattr(alone, key)[0], getattr(whole, key)[k], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ wen-filter


def test_wen_filter_drops_exactly_the_samples_at_or_above_tau(parts, batch):
    base = NoMitigation().prepare(batch)
    gaps = _gaps(parts, base, batch)
    ordered = gaps.sort().values
    assert ordered[4] - ordered[3] > 1e-3  # distinct gaps, so tau can sit between two of them
    tau = float((ordered[3] + ordered[4]) / 2)
    step = WenFilterMitigation(tau=tau).prepare(batch)
    assert torch.equal(step.weight, (gaps < tau).float())
    assert step.weight.sum() == 4 and step.stats["dropped"] == 4 and step.stats["kept"] == 4
    for key in ("noisy", "timesteps", "target", "noise"):  # the same draws as the standard step
        assert torch.equal(getattr(step, key), getattr(base, key))
    # the loss is the MSE of the kept samples only
    pred = torch.randn(base.target.shape, generator=torch.Generator().manual_seed(1))
    kept = gaps < tau
    torch.testing.assert_close(step.loss(pred), F.mse_loss(pred[kept], base.target[kept]), rtol=1e-6, atol=0)
    # tau at a sample's own gap drops it (n_i >= tau)
    at = WenFilterMitigation(tau=float(ordered[5])).prepare(batch)
    assert torch.equal(at.weight, (gaps < ordered[5]).float()) and at.weight.sum() == 5


def test_wen_filter_skips_a_step_when_everything_is_dropped(parts, batch):
    step = WenFilterMitigation(tau=1e-6).prepare(batch)
    assert step.skip and step.loss(torch.zeros_like(step.target)) is None
    with pytest.raises(ValueError, match="unet and empty_cond"):
        WenFilterMitigation().prepare(TrainingBatch(batch.latents, batch.cond, batch.seeds, batch.scheduler))


# ------------------------------------------------------------------------------------------ ambient


def _t_n_splitting(batch) -> int:
    t, _ = diffusion_draws(batch.seeds, (4, 16, 16), 1000)
    return int(t.sort().values[3])  # rows with t <= t_n: the 4 lowest


class _FixedCopy(AmbientMitigation):
    """Ambient with the noisy copies given, so z0 can change while z_{t_n} stays."""

    def __init__(self, z_n, **kw):
        super().__init__(**kw)
        self.z_n = z_n

    def noisy_data(self, latents, ids, scheduler):
        return self.z_n


def test_ambient_never_shows_a_clean_image_above_its_threshold(batch):
    t_n = _t_n_splitting(batch)
    real = AmbientMitigation(t_n=t_n, seed=3)
    z_n = real.noisy_data(batch.latents, batch.ids, batch.scheduler)
    other = TrainingBatch(
        latents=batch.latents
        + 5 * torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(9)),
        cond=batch.cond,
        seeds=batch.seeds,
        scheduler=batch.scheduler,
        ids=batch.ids,
    )
    one, two = _FixedCopy(z_n, t_n=t_n).prepare(batch), _FixedCopy(z_n, t_n=t_n).prepare(other)
    high = one.timesteps > t_n
    assert high.sum() == 4 and one.stats == {"ambient": 4.0, "clean": 4.0}
    # above t_n: input and target are functions of z_{t_n} (and fresh noise) only
    assert torch.equal(one.noisy[high], two.noisy[high]) and torch.equal(one.target[high], two.target[high])
    assert torch.equal(one.weight, two.weight)
    # at or below t_n: the standard clean step
    standard = NoMitigation().prepare(batch)
    assert not torch.equal(one.noisy[~high], two.noisy[~high])
    for key in ("noisy", "target", "timesteps"):
        assert torch.equal(getattr(one, key)[~high], getattr(standard, key)[~high])
    assert torch.equal(one.weight[~high], torch.ones(4))
    # the real mitigation gives the same step as the one with its copies handed in
    ref = real.prepare(batch)
    for key in ("noisy", "target", "weight"):
        assert torch.equal(getattr(ref, key), getattr(one, key))


def test_ambient_noisy_copy_is_fixed_per_image(batch):
    mit = AmbientMitigation(t_n=100, seed=3)
    a_n = batch.scheduler.alphas_cumprod[100]
    ids = ["img-0", "img-1", "img-0"]  # two copies of one image share its noisy copy
    z0 = batch.latents[[0, 1, 0]]
    z_n = mit.noisy_data(z0, ids, batch.scheduler)
    eta = torch.randn(4, 16, 16, generator=item_generator(3, "ambient", "img-0"))
    torch.testing.assert_close(z_n[0], a_n.sqrt() * z0[0] + (1 - a_n).sqrt() * eta)
    assert torch.equal(z_n[0], z_n[2]) and not torch.equal(z_n[0], z_n[1])
    # the same at every step (other seeds), another with another mitigation seed
    assert torch.equal(mit.noisy_data(z0, ids, batch.scheduler), z_n)
    assert not torch.equal(AmbientMitigation(t_n=100, seed=4).noisy_data(z0, ids, batch.scheduler), z_n)


def test_ambient_loss_is_the_papers_in_ve_units(batch):
    """w ||eps_theta - target||^2 = SNR(t) || E[x_n | x_t] - x_n ||^2 with x = z / sqrt(a), computed as the
    authors' code maps an x0 prediction to the noisy copy's level (variance exploding)."""
    t_n = _t_n_splitting(batch)
    mit = AmbientMitigation(t_n=t_n)
    step = mit.prepare(batch)
    z_n = mit.noisy_data(batch.latents, batch.ids, batch.scheduler)
    pred = torch.randn(step.target.shape, generator=torch.Generator().manual_seed(2))
    ours = step.weight * step.per_sample_loss(pred)
    alphas = batch.scheduler.alphas_cumprod.double()
    a_n = alphas[t_n]
    for i in range(B):
        t = int(step.timesteps[i])
        if t <= t_n:
            continue
        a_t = alphas[t]
        z_t, eps = step.noisy[i].double(), pred[i].double()
        x0 = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x_t = z_t / a_t.sqrt()
        var_t, var_n = (1 - a_t) / a_t, (1 - a_n) / a_n
        xn_pred = ((var_t - var_n) * x0 + var_n * x_t) / var_t
        paper = (a_t / (1 - a_t)) * (xn_pred - z_n[i].double() / a_n.sqrt()).square().mean()
        torch.testing.assert_close(ours[i].double(), paper, rtol=1e-4, atol=1e-7)
        # and the input is the forward process from the copy: x_t - x_n has variance var_t - var_n
        torch.testing.assert_close(
            (x_t - z_n[i].double() / a_n.sqrt()).var(), var_t - var_n, rtol=0.25, atol=0
        )


def test_ambient_needs_ids_and_an_epsilon_model(batch):
    with pytest.raises(ValueError, match="ids"):
        AmbientMitigation().prepare(TrainingBatch(batch.latents, batch.cond, batch.seeds, batch.scheduler))
    from diffmem.tiny import sd_ddim_scheduler

    vbatch = TrainingBatch(
        batch.latents, batch.cond, batch.seeds, sd_ddim_scheduler("v_prediction"), ids=batch.ids
    )
    with pytest.raises(ValueError, match="epsilon only"):
        AmbientMitigation().prepare(vbatch)
    with pytest.raises(ValueError, match="t_n"):
        AmbientMitigation(t_n=1.5)


# ------------------------------------------------------------------------------------------ caption-noise


CAPTIONS = [f"a red circle, catalogue plate {i}" for i in range(400)]
SEEDS = sample_seeds(0, range(400), "epoch", 0)


def test_caption_noise_off_changes_nothing(parts, batch):
    mit = CaptionNoiseMitigation()
    captions, stats = mit.edit_captions(CAPTIONS, SEEDS, parts["tokenizer"])
    assert captions == CAPTIONS and stats == {"replaced": 0.0, "inserted": 0.0}
    step = mit.prepare(batch)
    assert torch.equal(step.cond, batch.cond)
    zero = CaptionNoiseMitigation(replace_prob=0.0, insert_words=2, insert_prob=0.0)
    assert zero.edit_captions(CAPTIONS, SEEDS, parts["tokenizer"])[0] == CAPTIONS


def test_caption_replacement_with_its_probability(parts):
    tok = parts["tokenizer"]
    mit = CaptionNoiseMitigation(replace_prob=0.3)
    captions, stats = mit.edit_captions(CAPTIONS, SEEDS, tok)
    changed = [a != b for a, b in zip(captions, CAPTIONS)]
    assert sum(changed) == stats["replaced"] and 0.22 < sum(changed) / 400 < 0.38
    assert all(len(c.split(" ")) == 4 for c, ch in zip(captions, changed) if ch)
    assert mit.edit_captions(CAPTIONS, SEEDS, tok)[0] == captions  # deterministic
    # per-sample seeds: a caption's fate does not depend on the others in its batch
    assert mit.edit_captions(CAPTIONS[5:9], SEEDS[5:9], tok)[0] == captions[5:9]
    assert mit.edit_captions(CAPTIONS[7:8], SEEDS[7:8], tok)[0] == captions[7:8]
    every = CaptionNoiseMitigation(replace_prob=1.0).edit_captions(CAPTIONS[:20], SEEDS[:20], tok)[0]
    assert all(a != b for a, b in zip(every, CAPTIONS[:20]))
    with pytest.raises(ValueError, match="tokenizer"):
        mit.edit_captions(CAPTIONS, SEEDS)


def test_word_insertion_adds_k_words_with_its_probability(parts):
    tok = parts["tokenizer"]
    captions, stats = CaptionNoiseMitigation(insert_words=2, insert_prob=0.5).edit_captions(
        CAPTIONS, SEEDS, tok
    )
    n_inserted = 0
    for new, old in zip(captions, CAPTIONS):
        words, orig = new.split(" "), old.split(" ")
        if new == old:
            continue
        n_inserted += 1
        assert len(words) == len(orig) + 2
        it = iter(words)  # the original words are still there, in order
        assert all(w in it for w in orig)
    assert n_inserted == stats["inserted"] and 0.4 < n_inserted / 400 < 0.6
    again = CaptionNoiseMitigation(insert_words=2, insert_prob=0.5).edit_captions(
        CAPTIONS[:4], SEEDS[:4], tok
    )
    assert again[0] == captions[:4]


def test_embedding_noise_is_per_sample_gaussian(batch):
    sigma = 0.2
    step = CaptionNoiseMitigation(embedding_sigma=sigma).prepare(batch)
    delta = step.cond - batch.cond
    assert abs(float(delta.std()) - sigma) < 0.01 and abs(float(delta.mean())) < 0.01
    for i in (0, 5):
        expected = sigma * torch.randn(77, 32, generator=item_generator(batch.seeds[i], "gni"))
        torch.testing.assert_close(delta[i], expected, rtol=1e-5, atol=1e-6)
    # only the conditioning changes
    base = NoMitigation().prepare(batch)
    assert torch.equal(step.noisy, base.noisy) and torch.equal(step.target, base.target)


# ------------------------------------------------------------------------------------------ fine-tuning data


def test_duplicated_finetune_set_is_deterministic_and_exact(tmp_path):
    from diffmem.data import open_dataset
    from diffmem.organism.finetune_data import build_duplicated_finetune_set
    from diffmem.records import Record

    kw = dict(n_images=12, duplicated=3, repeats=4, seed=5, image_size=32)
    one = build_duplicated_finetune_set(tmp_path / "a", **kw)
    two = build_duplicated_finetune_set(tmp_path / "b", **kw)
    build_duplicated_finetune_set(tmp_path / "c", **{**kw, "seed": 6})
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert one.duplicated_ids == two.duplicated_ids and len(one.duplicated_ids) == 3
    png = sorted(p for p in (tmp_path / "a").glob("*.png"))[0].name
    assert (tmp_path / "a" / png).read_bytes() != (tmp_path / "c" / png).read_bytes()

    rows = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == one.rows == 12 - 3 + 3 * 4
    dup = [r for r in rows if r["memorized"] == 1]
    assert len(dup) == 3 * 4 and {r["image_id"] for r in dup} == set(one.duplicated_ids)
    for image_id in one.image_ids:
        mine = [r for r in rows if r["image_id"] == image_id]
        n = 4 if image_id in one.duplicated_ids else 1
        assert len(mine) == n and all(r["copies"] == n for r in mine)
        # the copies of an image are identical files
        assert len({(tmp_path / "a" / r["file_name"]).read_bytes() for r in mine}) == 1
        assert {r["text"] for r in mine} == {one.captions[image_id]}
    assert len(set(one.captions.values())) == 12  # one caption per image

    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["duplicated_ids"] == one.duplicated_ids and manifest["rows"] == one.rows
    heldout = (tmp_path / "a" / "heldout_captions.txt").read_text().splitlines()
    assert heldout == one.heldout_captions and heldout
    assert not set(heldout) & set(one.generic_captions)
    assert not any(c.startswith(h + ",") for c in one.captions.values() for h in heldout)
    records = list(open_dataset(tmp_path / "a"))  # readable as the datasets diffmem reads
    assert len(records) == one.rows and all(isinstance(r, Record) for r in records)
    with pytest.raises(ValueError, match="not empty"):
        build_duplicated_finetune_set(tmp_path / "a", **kw)
