"""Every registered detector under the tester mixin, each with its known answer."""

from __future__ import annotations

import math

import pytest
import torch
from detector_mixin import PROMPTS, DetectorTesterMixin

from diffmem.detectors import available_detectors, get_detector


def test_registry_lists_the_field():
    assert available_detectors() == ["anisotropy", "bright-ending", "ren-entropy", "sharpness", "wen"]
    with pytest.raises(ValueError, match="detector='nope' is not registered"):
        get_detector("nope")
    with pytest.raises(ValueError, match="detector_options for 'wen'"):
        get_detector("wen", {"window": 3})


class TestWen(DetectorTesterMixin):
    detector_name = "wen"

    def test_equals_the_pipeline_score(self, sd):
        from diffmem.detect import score_prompts

        ours = self.score(sd, item_ids=[0, 1, 2])
        theirs = score_prompts(
            sd, PROMPTS, num_gens=2, num_inference_steps=self.steps, progress=False, attention=None
        )
        torch.testing.assert_close(ours, theirs)


class TestRenEntropy(DetectorTesterMixin):
    detector_name = "ren-entropy"

    def test_uniform_attention_gives_ln_77(self, sd):
        """With every query zero, attention is uniform over the 77 positions: entropy ln 77 exactly."""
        unet = sd.unet
        saved = {n: m.to_q.weight.clone() for n, m in unet.named_modules() if n.endswith("attn2")}
        try:
            with torch.no_grad():
                for n, m in unet.named_modules():
                    if n.endswith("attn2"):
                        m.to_q.weight.zero_()
            scores = self.score(sd)
        finally:
            with torch.no_grad():
                for n, m in unet.named_modules():
                    if n.endswith("attn2"):
                        m.to_q.weight.copy_(saved[n])
        torch.testing.assert_close(scores, torch.full_like(scores, math.log(77)), rtol=1e-5, atol=1e-5)

    def test_a_planted_trigger_spreads_attention_off_the_sink(self):
        from planted import TRIGGER, attention_sink_pipeline

        pipe = attention_sink_pipeline()
        scores = self.score(pipe, prompts=["a photo of a horse", f"a photo of a {TRIGGER}"]).mean(dim=1)
        assert scores[1] > scores[0] + 0.3  # the trigger takes attention from the start token: higher entropy
        assert scores[0] < 2.0  # most attention on the start token


class TestAnisotropy(DetectorTesterMixin):
    detector_name = "anisotropy"

    def test_a_too_short_schedule_is_refused(self, sd):
        with pytest.raises(ValueError, match="low_index=-3 needs a schedule of at least 3 steps"):
            self.score(sd, num_inference_steps=2)

    def test_norm_term_alone_is_wen_first_step(self, sd):
        norm_only = get_detector("anisotropy", {"gamma_angle": 0.0})
        wen = get_detector("wen")
        kw = dict(num_gens=2, num_inference_steps=self.steps, progress=False)
        torch.testing.assert_close(
            norm_only.score(sd, PROMPTS, **kw), wen.score(sd, PROMPTS, **kw), rtol=1e-4, atol=1e-6
        )

    def test_the_empty_prompt_scores_zero(self, sd):
        """Conditional = unconditional: no gap and no angle (the cosine with a zero vector is 0)."""
        torch.testing.assert_close(self.score(sd, prompts=[""]), torch.zeros(1, 2), atol=1e-6, rtol=0)


class TestSharpness(DetectorTesterMixin):
    detector_name = "sharpness"

    def test_jvp_equals_a_finite_difference(self, sd):
        exact = self.score(sd, num_gens=1)
        approx = get_detector("sharpness", {"method": "finite-difference"}).score(
            sd, PROMPTS, num_gens=1, num_inference_steps=self.steps, progress=False
        )
        torch.testing.assert_close(exact, approx, rtol=2e-2, atol=1e-6)

    def test_the_empty_prompt_scores_zero(self, sd):
        torch.testing.assert_close(self.score(sd, prompts=[""]), torch.zeros(1, 2), atol=1e-6, rtol=0)


class TestBrightEnding(DetectorTesterMixin):
    detector_name = "bright-ending"

    def test_a_constant_mask_gives_wen_over_all_steps(self, sd):
        """Uniform attention in the mask's layers makes the mask constant: the score is Wen's all-step mean."""
        from diffmem.detect import score_prompts
        from diffmem.detectors.bright_ending import bright_ending_layers

        unet = sd.unet
        layers = bright_ending_layers(unet)
        saved = {n: unet.get_submodule(n).to_q.weight.clone() for n in layers}
        try:
            with torch.no_grad():
                for n in layers:
                    unet.get_submodule(n).to_q.weight.zero_()
            be = self.score(sd)
            wen = score_prompts(
                sd,
                PROMPTS,
                num_gens=2,
                window=(0, self.steps),
                num_inference_steps=self.steps,
                progress=False,
                attention=None,
            )
        finally:
            with torch.no_grad():
                for n in layers:
                    unet.get_submodule(n).to_q.weight.copy_(saved[n])
        torch.testing.assert_close(be, wen, rtol=1e-4, atol=1e-6)

    def test_end_token_positions(self, sd):
        from diffmem.detectors.bright_ending import end_token_positions

        assert end_token_positions(sd, ["a photo of a cat", "x " * 100]).tolist() == [6, 76]

    def test_needs_guidance(self, sd):
        with pytest.raises(ValueError, match="needs classifier-free guidance"):
            self.score(sd, guidance_scale=1.0)


@pytest.mark.slow
def test_every_detector_at_sd15_size():
    """The plumbing at real width: SD-1.5's architecture (random weights), 64 px, every detector."""
    from diffmem.hooks.attention import cross_attention_layers
    from diffmem.hooks.neurons import value_layers
    from diffmem.tiny import build_sd15_architecture_pipeline

    pipe = build_sd15_architecture_pipeline(image_size=64)
    pipe.set_progress_bar_config(disable=True)
    assert len(cross_attention_layers(pipe.unet)) == 16
    assert sum(m.out_features for m in value_layers(pipe.unet).values()) == 5760
    assert get_detector("ren-entropy").resolve_layers(pipe.unet) == [
        "down_blocks.1.attentions.1.transformer_blocks.0.attn2"
    ]
    for name in available_detectors():
        scores = get_detector(name).score(
            pipe, ["a photo of a cat"], num_gens=1, num_inference_steps=3, progress=False
        )
        assert scores.shape == (1, 1) and torch.isfinite(scores).all(), name
