"""The pad-token fix (arXiv 2605.02908): its mechanism on planted and tiny models with known answers."""

from __future__ import annotations

import pytest
import torch

from diffmem.mitigations import GuardedBatch, PadTokenMitigation, get_mitigation

PROMPTS = ["a red circle", "a photo of a cat on a sofa"]


def call(pipe, prompts=PROMPTS, **kw):
    gens = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    kw.setdefault("num_inference_steps", 4)
    return pipe(prompts, generator=gens, output_type="latent", memorization_threshold=0.0, **kw).images


@pytest.fixture(scope="module")
def guarded(sd1_pipes):
    return sd1_pipes[1]


def test_registered_with_its_options():
    mitigation = get_mitigation("pad-token", {"strategy": "partial", "pad_fraction": 0.25})
    assert isinstance(mitigation, PadTokenMitigation) and mitigation.pad_fraction == 0.25
    assert mitigation.config() == {"name": "pad-token", "strategy": "partial", "pad_fraction": 0.25}
    with pytest.raises(ValueError, match=r"pad_fraction: expected a number in \[0, 1\], got 1.5"):
        PadTokenMitigation(pad_fraction=1.5)
    with pytest.raises(ValueError, match="strategy: expected 'repad' or 'partial', got 'nope'"):
        PadTokenMitigation(strategy="nope")


def test_memorization_carried_by_the_end_token_copies_is_removed():
    """Planted: the trigger is memorized only with >= 10 end-token copies (SD-1's padding); re-padding removes it."""
    from planted import memorized_image_pipeline

    pipe, x_mem = memorized_image_pipeline(eot_copies=10)
    prompts = ["a photo of a pikachu", "a photo of a horse"]

    def distance(**kw):
        out = call(pipe, prompts, num_inference_steps=10, guidance_scale=1.0, **kw)
        return (out - x_mem).flatten(1).pow(2).mean(1).sqrt()

    before, after = distance(), distance(mitigation="pad-token")
    assert before[0] < 0.1  # the exact one-image denoiser lands on the memorized latent
    assert after[0] > 50 * before[0]  # re-padded: the trigger alone no longer recalls it
    assert before[1] > 1 and after[1] > 1  # the ordinary prompt was never memorized


def test_repadding_keeps_the_embeddings_up_to_the_end_token(guarded):
    """CLIP's text encoder is causal: re-padding changes the padding positions only."""
    from diffmem.conditioning import encode_prompts
    from diffmem.mitigations.pad_token import repadded_ids

    stock = encode_prompts(guarded.tokenizer, guarded.text_encoder, PROMPTS)
    with torch.no_grad():
        repadded = guarded.text_encoder(repadded_ids(guarded, PROMPTS, "!"))[0]
    for i, p in enumerate(PROMPTS):
        end = len(guarded.tokenizer(p).input_ids) - 1
        torch.testing.assert_close(repadded[i, : end + 1], stock[i, : end + 1], rtol=1e-5, atol=1e-6)
        assert (repadded[i, end + 1 :] - stock[i, end + 1 :]).abs().max() > 1e-3


def test_partial_masking_of_no_pad_is_no_change(guarded):
    same = call(guarded, mitigation=PadTokenMitigation(strategy="partial", pad_fraction=0.0))
    assert torch.equal(same, call(guarded))
    assert not torch.equal(call(guarded, mitigation=PadTokenMitigation(strategy="partial")), same)


def make_batch(pipe, flagged, guidance=True):
    n = len(flagged)
    embeds = torch.zeros(n, 77, 8)
    return GuardedBatch(
        pipe=pipe,
        prompts=PROMPTS[:n],
        prompt_index=list(range(n)),
        prompt_embeds=embeds,
        negative_prompt_embeds=embeds,
        latents=torch.zeros(n, 4, 8, 8),
        timesteps=torch.tensor([1]),
        guidance=guidance,
        threshold=0.0,
        flagged=flagged,
    )


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("strategy", ["repad", "partial"])
def test_the_logits_of_flagged_conditional_rows_only(guarded, guidance, strategy):
    """repad: <eot> -inf; partial: the first half of the pads -inf; on the flagged conditional row only."""
    batch = make_batch(guarded, [False, True], guidance)
    end = len(guarded.tokenizer(PROMPTS[1]).input_ids) - 1
    rows = 4 if guidance else 2
    scores = torch.randn(rows, 2, 5, 77, generator=torch.Generator().manual_seed(0))
    out = PadTokenMitigation(strategy=strategy).logits_for(batch)("attn2", scores)
    k = rows - 1  # the flagged image's conditional row
    torch.testing.assert_close(out[:k], scores[:k], rtol=0, atol=0)
    masked = [end] if strategy == "repad" else list(range(end + 1, end + 1 + round((76 - end) / 2)))
    kept = [j for j in range(77) if j not in masked]
    assert torch.isneginf(out[k][..., masked]).all()
    torch.testing.assert_close(out[k][..., kept], scores[k][..., kept], rtol=0, atol=0)


def test_repadded_ids(guarded):
    from diffmem.mitigations.pad_token import repadded_ids

    ids = repadded_ids(guarded, ["a cat"], "!")
    bang = guarded.tokenizer("!", add_special_tokens=False).input_ids[0]
    eot = guarded.tokenizer.eos_token_id
    assert ids[0, 3] == eot and (ids[0, 4:] == bang).all() and ids.shape == (1, 77)
    with pytest.raises(ValueError, match="pad_token: expected one token of the tokenizer's vocabulary"):
        repadded_ids(guarded, ["a cat"], "two words")


def test_refusals(guarded):
    batch = make_batch(guarded, [True, False])
    batch.prompts = [None, None]
    with pytest.raises(ValueError, match="needs the prompts"):
        PadTokenMitigation().plan(batch)
    from diffmem.tiny import build_tiny_sdxl_pipeline

    with pytest.raises(ValueError, match="supports SD-1/2 pipelines"):
        PadTokenMitigation().plan(make_batch(build_tiny_sdxl_pipeline(), [True, False]))
    assert PadTokenMitigation().plan(make_batch(guarded, [False, False])).report == {}
