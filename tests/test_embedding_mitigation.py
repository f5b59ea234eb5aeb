"""Wen et al.'s prompt-embedding optimisation: shrinks the first-step noise gap, stops early, leaves the UNet alone."""

from __future__ import annotations

import pytest
import torch

from diffmem.conditioning import encode_prompts
from diffmem.embedding_mitigation import optimize_prompt_embeds, target_loss_from_threshold
from diffmem.tiny import TinySDConfig, build_components


@pytest.fixture(scope="module")
def parts():
    c = build_components(TinySDConfig(variant="sd1"), seed=0)
    c["scheduler"].set_timesteps(10)
    cond = encode_prompts(c["tokenizer"], c["text_encoder"], ["a photo of an astronaut riding a horse"])
    uncond = encode_prompts(c["tokenizer"], c["text_encoder"], [""])
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    return c, cond, uncond, latents


def _gap(unet, scheduler, e, u, x):
    t = scheduler.timesteps[0]
    with torch.no_grad():
        a = unet(x, t, encoder_hidden_states=e.expand(len(x), -1, -1)).sample
        b = unet(x, t, encoder_hidden_states=u.expand(len(x), -1, -1)).sample
    return float(torch.linalg.vector_norm(a - b))


def test_gap_shrinks_and_model_is_untouched(parts):
    c, cond, uncond, latents = parts
    unet, sched = c["unet"], c["scheduler"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    flags = [p.requires_grad for p in unet.parameters()]
    res = optimize_prompt_embeds(unet, sched, cond, uncond, latents, target_loss=None, lr=0.05, iterations=3)
    assert len(res.losses) == 4 and res.iterations == 3
    assert res.losses[0] == pytest.approx(_gap(unet, sched, cond, uncond, latents), rel=1e-4)
    assert res.losses[-1] < 0.9 * res.losses[0]
    assert _gap(unet, sched, res.prompt_embeds, uncond, latents) == pytest.approx(res.losses[-1], rel=1e-4)
    torch.testing.assert_close(res.prompt_embeds[:, 0], cond[:, 0])  # BOS fixed
    assert not torch.equal(res.prompt_embeds[:, 1:], cond[:, 1:])
    assert res.prompt_embeds.shape == cond.shape and res.prompt_embeds.dtype == cond.dtype
    assert [p.requires_grad for p in unet.parameters()] == flags
    assert all(p.grad is None for p in unet.parameters())
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_early_stop_before_update(parts):
    c, cond, uncond, latents = parts
    first = optimize_prompt_embeds(
        c["unet"], c["scheduler"], cond, uncond, latents, target_loss=None, iterations=0
    )
    # a target above the starting loss: no update at all
    res = optimize_prompt_embeds(
        c["unet"], c["scheduler"], cond, uncond, latents, target_loss=first.losses[0] + 1
    )
    assert res.iterations == 0 and torch.equal(res.prompt_embeds, cond)
    # a target between: stops as soon as it is reached
    full = optimize_prompt_embeds(
        c["unet"], c["scheduler"], cond, uncond, latents, target_loss=None, iterations=4
    )
    target = (full.losses[0] + full.losses[-1]) / 2
    res = optimize_prompt_embeds(
        c["unet"], c["scheduler"], cond, uncond, latents, target_loss=target, iterations=4
    )
    assert res.losses[-1] <= target and all(loss > target for loss in res.losses[:-1])
    assert res.iterations < 4


def test_target_from_threshold():
    assert target_loss_from_threshold(1.5, 4) == pytest.approx(3.0)
