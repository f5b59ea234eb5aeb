"""One tester mixin for every detector: the protocol (shapes, seeds, batch independence, families, cost).

A test class sets ``detector_name`` (and ``options``); the known answer of each method is its own test.
"""

from __future__ import annotations

import pytest
import torch

from diffmem.detectors import get_detector

PROMPTS = ["a red circle", "a photo of a cat on a sofa", "a blue square"]


class DetectorTesterMixin:
    detector_name = ""
    options: dict = {}
    steps = 4

    @pytest.fixture(scope="class")
    def sd(self):
        from diffmem.tiny import TinySDConfig, build_tiny_pipeline

        pipe = build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def make(self):
        return get_detector(self.detector_name, self.options)

    def score(self, pipe, prompts=PROMPTS, **kw):
        kw.setdefault("num_inference_steps", self.steps)
        kw.setdefault("num_gens", 2)
        return self.make().score(pipe, prompts, progress=False, **kw)

    def test_shape_finite_and_cost(self, sd):
        scores = self.score(sd)
        assert scores.shape == (len(PROMPTS), 2) and torch.isfinite(scores).all()
        assert self.make().unet_evals(self.steps) > 0
        assert type(self.make()).reference

    def test_seeded_and_independent_of_the_batch(self, sd):
        a = self.score(sd, batch_size=1)
        b = self.score(sd, batch_size=3)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert not torch.equal(a, self.score(sd, seed=1))

    def test_noise_follows_the_item_id(self, sd):
        forward = self.score(sd, item_ids=["a", "b", "c"])
        backward = self.score(sd, prompts=PROMPTS[::-1], item_ids=["c", "b", "a"])
        torch.testing.assert_close(forward, backward.flip(0), rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("family", ["sd2", "sdxl"])
    def test_runs_on_every_family(self, family):
        from diffmem.tiny import TinySDConfig, build_tiny_pipeline, build_tiny_sdxl_pipeline

        pipe = (
            build_tiny_sdxl_pipeline()
            if family == "sdxl"
            else build_tiny_pipeline(TinySDConfig(variant="sd2"))
        )
        pipe.set_progress_bar_config(disable=True)
        scores = self.score(pipe, prompts=PROMPTS[:2], num_gens=1)
        assert scores.shape == (2, 1) and torch.isfinite(scores).all()

    def test_key_and_registry(self):
        detector = self.make()
        assert detector.key().startswith(self.detector_name)
        assert type(get_detector(detector.name)) is type(detector)
