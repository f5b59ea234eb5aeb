"""GUARD (arXiv 2603.00133): its statistical test, its guidance and the mitigation on a planted model."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.mitigations import GuardMitigation, get_mitigation
from diffmem.mitigations.guard import guard_layers, guard_prediction, spike_tokens

PROMPTS = ["a photo of a pikachu", "a photo of a horse"]  # the trigger is token 5 of the first


@pytest.fixture(scope="module")
def planted():
    from planted import attention_memorized_pipeline

    return attention_memorized_pipeline()


def call(pipe, **kw):
    gens = [torch.Generator().manual_seed(s) for s in range(len(PROMPTS))]
    kw.setdefault("guidance_scale", 3.0)
    return pipe(
        PROMPTS,
        generator=gens,
        output_type="latent",
        num_inference_steps=10,
        memorization_window=(0, 1),
        **kw,
    )


@pytest.fixture(scope="module")
def plain(planted):
    pipe, x_mem = planted
    out = call(pipe)
    threshold = sum(out.memorization_scores) / 2
    assert [s >= threshold for s in out.memorization_scores] == [True, False]
    return out, threshold


def distance(images, x_mem):
    return (images - x_mem).flatten(1).pow(2).mean(1).sqrt()


def test_registered_with_its_options():
    guard = get_mitigation("guard", {"repulsion": 1.5, "schedule": "constant", "layers": "all"})
    assert isinstance(guard, GuardMitigation)
    assert guard.config() == {
        "name": "guard", "repulsion": 1.5, "attenuation": 0.3, "threshold": 0.1, "layers": "all",
        "schedule": "constant", "orthogonalize": False,
    }  # fmt: skip
    with pytest.raises(ValueError, match="schedule: expected 'cosine' or 'constant', got 'linear'"):
        GuardMitigation(schedule="linear")
    with pytest.raises(ValueError, match="repulsion: expected a finite number, got nan"):
        GuardMitigation(repulsion=float("nan"))
    with pytest.raises(ValueError, match="layers: expected 'early', 'all' or a list of attn2 names"):
        GuardMitigation(layers="late")


def test_the_test_picks_the_one_outlying_position():
    """One position's logits stand out in every head: it alone is a spike; the start token never is."""
    scores = torch.randn(2, 3, 16, 77, generator=torch.Generator().manual_seed(0)) * 0.1
    scores[0, :, :, 9] += 5.0
    scores[1] = 0.0  # equal logits everywhere: z = 0, no spike
    scores[:, :, :, 0] += 20.0  # the start token (the sink) is left out of the test
    spikes = spike_tokens(scores, threshold=3.0)
    assert spikes[0].nonzero()[:, 1].unique().tolist() == [9] and spikes[0, :, 9].all()
    assert not spikes[1].any() and not spikes[..., 0].any()


def test_the_guided_prediction():
    gen = torch.Generator().manual_seed(0)
    u, c, p = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    torch.testing.assert_close(guard_prediction(u, c, p, 7.5, 2.0), u + 7.5 * (p - u) - 2.0 * (c - u))
    near = c + 0.01 * (p - c)  # cosine of (near - u, c - u) above 0.9: its component along c - u goes
    out = guard_prediction(u, c, near, 7.5, 0.0, orthogonalize=True)
    attract = (out - u).flatten(1) / 7.5
    assert (attract * (c - u).flatten(1)).sum(1).abs().max() < 1e-4
    far = u - (c - u)  # cosine -1: kept as it is
    torch.testing.assert_close(guard_prediction(u, c, far, 7.5, 0.0, orthogonalize=True), u + 7.5 * (far - u))


def test_repulsion_schedule():
    cosine, constant = GuardMitigation(repulsion=2.0), GuardMitigation(repulsion=2.0, schedule="constant")
    assert cosine.repulsion_at(0, 10) == 2.0 and cosine.repulsion_at(5, 10) == pytest.approx(
        2 * math.cos(math.pi / 4)
    )
    assert (
        cosine.repulsion_at(10, 10) == pytest.approx(0.0, abs=1e-12) and constant.repulsion_at(7, 10) == 2.0
    )


def test_the_trigger_is_found_and_its_image_leaves_the_memorized_one(planted, plain):
    """Planted: memorization needs the trigger's share of one down-block attn2. GUARD's test finds exactly
    the trigger's position, and the flagged image moves off the memorized latent; the other is bit-identical."""
    pipe, x_mem = planted
    out, threshold = plain
    mitigated = call(pipe, mitigation="guard", memorization_threshold=threshold)
    before, after = distance(out.images, x_mem), distance(mitigated.images, x_mem)
    assert before[0] < 0.1  # the one-image denoiser lands on the memorized latent
    assert after[0] > 100 * before[0]
    report = mitigated.mitigations
    assert report[0]["action"] == "guard" and report[0]["spike_positions"] == [5]
    assert report[1]["action"] == "none"
    assert torch.equal(mitigated.images[1], out.images[1])  # the unflagged prompt: bit for bit
    assert mitigated.memorization_scores == out.memorization_scores  # the score is read before the rewrite


def test_an_ordinary_prompt_has_no_spike_and_no_op_settings_change_nothing(planted, plain):
    pipe, _ = planted
    out, _ = plain
    forced = call(pipe, mitigation="guard", mitigation_threshold=0.0, memorization_threshold=0.0)
    assert [r["spike_positions"] for r in forced.mitigations] == [[5], []]
    same = call(
        pipe,
        mitigation=GuardMitigation(repulsion=0.0, attenuation=1.0),
        mitigation_threshold=0.0,
        memorization_threshold=0.0,
    )
    torch.testing.assert_close(same.images, out.images, rtol=1e-5, atol=1e-5)  # float rounding only


def test_attenuation_alone_is_what_frees_the_image(planted, plain):
    """Without attenuation the attractive target is the memorized prediction itself: the image stays."""
    pipe, x_mem = planted
    out, threshold = plain
    repel_only = call(pipe, mitigation=GuardMitigation(attenuation=1.0), memorization_threshold=threshold)
    assert distance(repel_only.images, x_mem)[0] < 0.1


def test_layers_and_refusals(planted):
    pipe, _ = planted
    early = guard_layers(pipe.unet, "early")
    assert early and all(n.startswith(("down_blocks", "mid_block")) for n in early)
    assert len(guard_layers(pipe.unet, "all")) > len(early)
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        call(pipe, mitigation="guard", memorization_threshold=0.0, guidance_scale=1.0)
    with pytest.raises(ValueError, match="layers: no cross-attention layer named 'nope'"):
        call(pipe, mitigation=GuardMitigation(layers=["nope"]), memorization_threshold=0.0)


def test_sdxl_rows_carry_their_added_conditioning(tiny_sdxl_dir):
    """SDXL's extra pass takes the flagged rows' ``text_embeds``/``time_ids``: only the flagged image changes."""
    from diffmem.pipelines import StableDiffusionXLMemGuardPipeline

    pipe = StableDiffusionXLMemGuardPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(
        prompt=["a red circle", "a blue square"], num_inference_steps=3, output_type="latent",
        memorization_window=(0, 1),
    )  # fmt: skip
    plain = pipe(generator=torch.Generator().manual_seed(0), **kw)
    threshold = sum(plain.memorization_scores) / 2
    out = pipe(
        generator=torch.Generator().manual_seed(0), mitigation="guard", memorization_threshold=threshold, **kw
    )
    k = [r["flagged"] for r in out.mitigations].index(True)
    assert out.mitigations[k]["action"] == "guard" and out.mitigations[1 - k]["action"] == "none"
    assert torch.equal(out.images[1 - k], plain.images[1 - k])
    assert not torch.equal(out.images[k], plain.images[k])
