"""Every registered detector under the tester mixin, each with its known answer."""

from __future__ import annotations

import math

import pytest
import torch
from detector_mixin import PROMPTS, DetectorTesterMixin

from diffmem.detectors import available_detectors, get_detector


def test_registry_lists_the_field():
    assert available_detectors() == [
        "anisotropy",
        "bright-ending",
        "broken-memories",
        "dsm",
        "hessian-difference",
        "ren-entropy",
        "sharpness",
        "wen",
    ]
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


@pytest.fixture(scope="module")
def memorized():
    from planted import memorized_image_pipeline

    pipe, _ = memorized_image_pipeline()
    return pipe


MEMORIZED = ["a photo of a pikachu", "pikachu on a sofa"]
NOT_MEMORIZED = ["a photo of a horse", "a red circle"]


def assert_memorized_prompts_score_higher(detector, pipe):
    """Every generation of a trigger prompt scores above every generation of an ordinary prompt, by 10x."""
    kw = dict(num_gens=3, num_inference_steps=10, progress=False)
    hit = detector.score(pipe, MEMORIZED, **kw)
    miss = detector.score(pipe, NOT_MEMORIZED, item_ids=[2, 3], **kw)
    assert hit.min() > 10 * miss.max()


def unet_calls_of(detector, pipe, steps: int) -> list:
    from diffmem.hooks.noise import recorded_unet_calls

    with recorded_unet_calls(pipe.unet) as calls:
        detector.score(pipe, PROMPTS[:2], num_gens=1, num_inference_steps=steps, progress=False)
    return calls


def constant_prediction(unet, value: float):
    """Make ``unet`` predict ``value`` everywhere (conv_out weight 0, bias ``value``); returns a restorer."""
    weight, bias = unet.conv_out.weight.clone(), unet.conv_out.bias.clone()
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(value)

    def restore():
        with torch.no_grad():
            unet.conv_out.weight.copy_(weight)
            unet.conv_out.bias.copy_(bias)

    return restore


class TestBrokenMemories(DetectorTesterMixin):
    detector_name = "broken-memories"

    def test_planted_memorization_fires(self, memorized):
        assert_memorized_prompts_score_higher(self.make(), memorized)

    def test_a_constant_prediction_gives_the_ddim_update(self, sd):
        """eps = b everywhere: x_1 = sqrt(abar_1) (x_0 - sqrt(1 - abar_0) b) / sqrt(abar_0) + sqrt(1 - abar_1) b."""
        from diffmem.generation import initial_latents

        b = 0.3
        restore = constant_prediction(sd.unet, b)
        try:
            scores = get_detector("broken-memories", {"steps": 1}).score(
                sd, PROMPTS, num_gens=1, num_inference_steps=self.steps, progress=False
            )
        finally:
            restore()
        sd.scheduler.set_timesteps(self.steps)
        t0, t1 = (int(t) for t in sd.scheduler.timesteps[:2])
        a0, a1 = sd.scheduler.alphas_cumprod[t0], sd.scheduler.alphas_cumprod[t1]
        x0 = initial_latents(sd, [0, 1, 2], 1, 0).float()
        x1 = a1.sqrt() * (x0 - (1 - a0).sqrt() * b) / a0.sqrt() + (1 - a1).sqrt() * b
        expected = (x1 - x0).flatten(1).norm(dim=1) / x0[0].numel() ** 0.5
        torch.testing.assert_close(scores[:, 0], expected, rtol=1e-4, atol=1e-6)

    def test_the_window_maximum(self, sd):
        """steps=3, start=1 is the larger of the 2nd and 3rd steps' updates."""
        kw = dict(num_gens=2, num_inference_steps=self.steps, progress=False)
        second = get_detector("broken-memories", {"steps": 2, "start": 1}).score(sd, PROMPTS, **kw)
        third = get_detector("broken-memories", {"steps": 3, "start": 2}).score(sd, PROMPTS, **kw)
        both = get_detector("broken-memories", {"steps": 3, "start": 1}).score(sd, PROMPTS, **kw)
        torch.testing.assert_close(both, torch.maximum(second, third))

    def test_the_cost_is_the_loop_it_runs(self, sd):
        calls = unet_calls_of(self.make(), sd, steps=self.steps)
        assert sum(c.output.shape[0] for c in calls) / 2 == self.make().unet_evals(self.steps) == 6

    def test_too_many_steps_is_refused(self, sd):
        with pytest.raises(ValueError, match="needs 3 sampling steps; num_inference_steps=2"):
            self.score(sd, num_inference_steps=2)


class TestDSM(DetectorTesterMixin):
    detector_name = "dsm"

    def test_planted_memorization_fires(self, memorized):
        assert_memorized_prompts_score_higher(self.make(), memorized)

    def test_equals_the_definition(self, sd):
        """||eps_c(x_1) - eps_c(x_0)||^2 with x_1 the guided DDIM step from x_0, by hand."""
        from diffmem.conditioning import guidance_batch
        from diffmem.generation import initial_latents

        scores = get_detector("dsm", {"step": 0}).score(
            sd, PROMPTS, num_gens=1, num_inference_steps=self.steps, progress=False
        )
        embeds, _ = guidance_batch(sd, PROMPTS, 1)
        x = initial_latents(sd, [0, 1, 2], 1, 0)
        sd.scheduler.set_timesteps(self.steps)
        t0, t1 = sd.scheduler.timesteps[:2]
        with torch.no_grad():
            u0, c0 = sd.unet(torch.cat([x, x]), t0, encoder_hidden_states=embeds).sample.chunk(2)
            x1 = sd.scheduler.step(u0 + 7.5 * (c0 - u0), t0, x).prev_sample
            _, c1 = sd.unet(torch.cat([x1, x1]), t1, encoder_hidden_states=embeds).sample.chunk(2)
        torch.testing.assert_close(scores[:, 0], (c1 - c0).flatten(1).pow(2).sum(1), rtol=1e-4, atol=1e-6)

    def test_a_constant_prediction_scores_zero(self, sd):
        restore = constant_prediction(sd.unet, 0.3)
        try:
            scores = self.score(sd)
        finally:
            restore()
        torch.testing.assert_close(scores, torch.zeros_like(scores), atol=1e-10, rtol=0)

    def test_the_cost_is_the_loop_it_runs(self, sd):
        calls = unet_calls_of(self.make(), sd, steps=self.steps)
        assert sum(c.output.shape[0] for c in calls) / 2 == self.make().unet_evals(self.steps) == 6


class TestHessianDifference(DetectorTesterMixin):
    detector_name = "hessian-difference"

    def test_planted_memorization_fires(self, memorized):
        assert_memorized_prompts_score_higher(self.make(), memorized)

    def test_the_empty_prompt_scores_zero(self, sd):
        torch.testing.assert_close(self.score(sd, prompts=[""]), torch.zeros(1, 2), atol=1e-10, rtol=0)

    def test_the_gradient_matches_a_central_difference(self, sd):
        """<grad E, v> = (E(x + h v) - E(x - h v)) / 2h for E = 1/2 ||eps_c||^2 - 1/2 ||eps_u||^2."""
        from diffmem.conditioning import guidance_batch
        from diffmem.detectors.hessian_difference import energy_gap_gradient
        from diffmem.generation import initial_latents

        settings = {"num_gens": 1, "num_inference_steps": self.steps}
        x = initial_latents(sd, [0, 1], 1, 0)
        grad = energy_gap_gradient(sd, PROMPTS[:2], x, settings)
        embeds, _ = guidance_batch(sd, PROMPTS[:2], 1)
        t = sd.scheduler.timesteps[0]
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

        def energy(z):
            with torch.no_grad():
                u, c = sd.unet(torch.cat([z, z]).float(), t, encoder_hidden_states=embeds).sample.chunk(2)
            return 0.5 * (c.double().pow(2).flatten(1).sum(1) - u.double().pow(2).flatten(1).sum(1))

        h = 1e-2
        numeric = (energy(x + h * v) - energy(x - h * v)) / (2 * h)
        exact = (grad.double() * v).flatten(1).sum(1)
        torch.testing.assert_close(exact, numeric, rtol=2e-2, atol=1e-6)


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
