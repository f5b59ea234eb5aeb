"""The field's inference-time mitigations: each one's mechanism on a tiny model with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.mitigations import (
    AttentionRescaleMitigation,
    BrightEndingEmbeddingMitigation,
    EmbeddingMitigation,
    GuidanceDelayMitigation,
    InitialNoiseMitigation,
    available_mitigations,
)

PROMPTS = ["a red circle", "a cat"]
STEPS = 4


@pytest.fixture(scope="module")
def pipes(sd1_pipes):
    return sd1_pipes


def call(pipe, prompts=PROMPTS, **kw):
    gens = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    return pipe(
        prompts, num_inference_steps=STEPS, generator=gens, output_type="np", memorization_window=(0, 1), **kw
    )


@pytest.fixture(scope="module")
def plain(pipes):
    out = call(pipes[1])
    threshold = sum(out.memorization_scores) / 2
    flagged = [s >= threshold for s in out.memorization_scores]
    assert sum(flagged) == 1
    return out, threshold, flagged.index(True), flagged.index(False)


def test_every_method_is_registered():
    assert set(available_mitigations()) >= {
        "nemo",
        "embedding",
        "guidance-delay",
        "attention-rescale",
        "initial-noise",
        "bright-ending-embedding",
        "pad-token",
        "guard",
    }


def test_guidance_off_before_the_transition_gives_the_unconditional_image(pipes, plain):
    """Transition below every timestep: w = 0 throughout, the flagged image is the empty prompt's."""
    stock, guarded = pipes
    out, threshold, k, j = plain
    mitigated = call(
        guarded,
        mitigation=GuidanceDelayMitigation(transition=-1, early_scale=0.0),
        memorization_threshold=threshold,
    )
    np.testing.assert_array_equal(mitigated.images[j], out.images[j])
    empty = stock(
        [""], num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(k)], output_type="np"
    )
    np.testing.assert_allclose(mitigated.images[k], empty.images[0], atol=1e-4)
    assert mitigated.memorization_scores[j] == out.memorization_scores[j]


def test_early_scale_equal_to_the_call_changes_nothing(pipes, plain):
    _, guarded = pipes
    out, threshold, k, _ = plain
    same = call(
        guarded,
        mitigation=GuidanceDelayMitigation(transition=2000, early_scale=7.5),
        memorization_threshold=threshold,
    )
    np.testing.assert_allclose(same.images, out.images, atol=1e-5)
    assert same.mitigations[k]["action"] == "guidance-delay"


def test_dynamic_transition_fires_after_the_first_local_minimum():
    from diffmem.mitigations.guidance import dynamic_weight

    state, weights = {}, []
    for gap in (3.0, 2.0, 1.0, 2.0, 3.0, 0.5):
        u = torch.zeros(1, 4)
        c = torch.tensor([[gap, 0.0, 0.0, 0.0]])
        weights.append(float(dynamic_weight(0.0, u, c, state, 7.5)[0]))
    assert weights == [1.0, 1.0, 1.0, 7.5, 7.5, 7.5]  # the minimum is at index 2; it fires at 3 and stays


def test_attention_rescale_no_op_settings_change_nothing(pipes, plain):
    _, guarded = pipes
    out, threshold, k, j = plain
    same = call(
        guarded,
        mitigation=AttentionRescaleMitigation(bos_scale=1.0, mask_padding=False),
        memorization_threshold=threshold,
    )
    np.testing.assert_allclose(same.images, out.images, atol=1e-4)  # explicit attention: float rounding only
    changed = call(guarded, mitigation=AttentionRescaleMitigation(), memorization_threshold=threshold)
    assert np.abs(changed.images[k] - out.images[k]).max() > 1e-3
    np.testing.assert_allclose(changed.images[j], out.images[j], atol=1e-4)


def test_attention_rescale_moves_attention_back_to_the_start_token():
    """On the planted sink model, C = 1.25 raises the start token's share and masks the padding."""
    from planted import TRIGGER, attention_sink_pipeline

    from diffmem.hooks.attention import cross_attention_probes
    from diffmem.mitigations.base import GuardedBatch

    pipe = attention_sink_pipeline()
    prompt = f"a photo of a {TRIGGER}"
    cond, neg = pipe.encode_prompt([prompt], "cpu", 1, True)
    batch = GuardedBatch(
        pipe=pipe, prompts=[prompt], prompt_index=[0], prompt_embeds=cond, negative_prompt_embeds=neg,
        latents=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), timesteps=torch.tensor([981]),
        guidance=True, threshold=0.0, flagged=[True],
    )  # fmt: skip
    shares = {}
    for label, logits in (("plain", None), ("rescaled", AttentionRescaleMitigation().logits_for(batch))):
        seen = []

        def record(name, probs, seen=seen):  # the conditional row, mean over heads and pixels: [77]
            seen.append(probs[1].mean(dim=(0, 1)))

        with torch.no_grad(), cross_attention_probes(pipe.unet, logits=logits, record=record):
            x = torch.cat([batch.latents] * 2)
            pipe.unet(x, 981, encoder_hidden_states=torch.cat([neg, cond]))
        probs = torch.stack(seen).mean(dim=0)
        shares[label] = probs
    length = len(pipe.tokenizer(prompt).input_ids)
    assert shares["rescaled"][0] > shares["plain"][0]  # more on the start token
    assert float(shares["rescaled"][length:].sum()) == 0.0 and float(shares["plain"][length:].sum()) > 0


def test_initial_noise_moves_flagged_images_only(pipes, plain):
    _, guarded = pipes
    out, threshold, k, j = plain
    mitigated = call(guarded, mitigation=InitialNoiseMitigation(), memorization_threshold=threshold)
    report = mitigated.mitigations[k]
    assert report["action"] == "initial-noise" and report["gap_after"] != report["gap_before"]
    np.testing.assert_array_equal(mitigated.images[j], out.images[j])
    assert np.abs(mitigated.images[k] - out.images[k]).max() > 1e-3


def test_bright_ending_embedding_with_a_constant_mask_is_wen_embedding(pipes, plain):
    """Uniform attention in the mask's layers: the localized loss is Wen's loss, so the same images come out."""
    from diffmem.detectors.bright_ending import bright_ending_layers

    _, guarded = pipes
    out, threshold, k, _ = plain
    layers = bright_ending_layers(guarded.unet)
    saved = {n: guarded.unet.get_submodule(n).to_q.weight.clone() for n in layers}
    try:
        with torch.no_grad():
            for n in layers:
                guarded.unet.get_submodule(n).to_q.weight.zero_()
        localized = call(
            guarded, mitigation=BrightEndingEmbeddingMitigation(), memorization_threshold=threshold
        )
        wen = call(guarded, mitigation=EmbeddingMitigation(), memorization_threshold=threshold)
    finally:
        with torch.no_grad():
            for n in layers:
                guarded.unet.get_submodule(n).to_q.weight.copy_(saved[n])
    assert localized.mitigations[k]["action"] == "bright-ending-embedding"
    np.testing.assert_allclose(localized.images, wen.images, atol=1e-4)
    assert localized.mitigations[k]["loss_before"] == pytest.approx(
        wen.mitigations[k]["loss_before"], rel=1e-4
    )


@pytest.mark.parametrize(
    "mitigation", ["guidance-delay", "attention-rescale", "initial-noise", "bright-ending-embedding"]
)
def test_guidance_is_required(pipes, mitigation):
    _, guarded = pipes
    with pytest.raises(ValueError, match="needs classifier-free guidance"):
        call(guarded, mitigation=mitigation, memorization_threshold=0.0, guidance_scale=1.0)


def test_initial_noise_update_is_a_descent_step_on_a_symmetric_gap():
    """For ``e(x) = D x`` with ``D`` symmetric, one step is ``x - gamma rho ||x|| D^2 x / ||D x||``, lowering ||D x||."""
    from diffmem.mitigations.initial_noise import adjust_initial_noise

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen)
    d = a @ a.T / 16

    def direction(x):
        return x @ d.T

    x = torch.randn(3, 16, generator=gen)
    out = adjust_initial_noise(direction, x, rho=0.05, gamma=0.5, iterations=1)
    e = direction(x)
    expected = x - 0.5 * 0.05 * (x.norm(dim=1) / e.norm(dim=1))[:, None] * direction(e)
    torch.testing.assert_close(out, expected)
    assert (direction(out).norm(dim=1) < e.norm(dim=1)).all()
