"""One tester mixin for every diffmem pipeline (in the spirit of diffusers' ``PipelineTesterMixin``).

A test class sets ``pipeline_class``, provides a ``model_dir`` fixture (a saved diffusers folder the
pipeline loads) and ``get_inputs(generator)`` (the call's keyword arguments), and inherits:
save/load round trip, ``from_pipe`` sharing modules, determinism under a generator, every
``output_type``, ``callback_on_step_end``, and "every hook and processor the pipeline adds is gone
after a call, also one that fails". ``hook_call_kwargs()`` names arguments that make the pipeline add
hooks or processors (so that the clean-up test has something to clean up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

NUM_STEPS = 2


def hook_state(pipe) -> dict:
    """Every forward/pre/backward hook and attention processor class of the pipeline's modules."""
    state = {}
    for comp_name, comp in pipe.components.items():
        if not isinstance(comp, torch.nn.Module):
            continue
        for name, m in comp.named_modules():
            counts = tuple(
                len(getattr(m, attr, {}))
                for attr in (
                    "_forward_hooks",
                    "_forward_pre_hooks",
                    "_backward_hooks",
                    "_forward_hooks_with_kwargs",
                )
            )
            if any(counts):
                state[f"{comp_name}.{name}"] = counts
        if hasattr(comp, "attn_processors"):
            for name, proc in comp.attn_processors.items():
                state[f"{comp_name}.{name}"] = type(proc).__name__
    return state


def as_array(images) -> np.ndarray:
    """Images of any ``output_type`` as one float array (pil, np, pt, latent)."""
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu().numpy()
    if isinstance(images, list):
        return np.stack([np.asarray(im) for im in images])
    return np.asarray(images)


class PipelineTesterMixin:
    pipeline_class = None

    def get_inputs(self, generator: torch.Generator) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def hook_call_kwargs(self) -> dict:
        """Extra call arguments that make the pipeline install hooks or processors."""
        return {}

    @pytest.fixture(scope="class")
    def pipe(self, model_dir):
        pipe = self.pipeline_class.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(self, pipe, seed: int = 0, **overrides):
        kwargs = self.get_inputs(torch.Generator().manual_seed(seed))
        kwargs.update(overrides)
        return pipe(**kwargs)

    def test_save_load_round_trip(self, pipe, tmp_path):
        pipe.save_pretrained(tmp_path)
        loaded = self.pipeline_class.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is self.pipeline_class
        np.testing.assert_array_equal(as_array(self.run(pipe).images), as_array(self.run(loaded).images))

    def test_from_pipe_shares_modules(self, model_dir):
        from diffusers import StableDiffusionPipeline

        stock = StableDiffusionPipeline.from_pretrained(model_dir)
        derived = self.pipeline_class.from_pipe(stock)
        assert type(derived) is self.pipeline_class
        for name, component in stock.components.items():
            if name in derived.components and component is not None:
                assert derived.components[name] is component, name

    def test_deterministic_under_generator(self, pipe):
        a, b = as_array(self.run(pipe, seed=0).images), as_array(self.run(pipe, seed=0).images)
        c = as_array(self.run(pipe, seed=1).images)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)

    @pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
    def test_output_types(self, pipe, output_type):
        ref = as_array(self.run(pipe, output_type="np").images)
        images = self.run(pipe, output_type=output_type).images
        if output_type == "pil":
            assert len(images) == ref.shape[0] and images[0].size == (ref.shape[2], ref.shape[1])
            np.testing.assert_array_equal(as_array(images), (ref * 255).round().astype("uint8"))
        elif output_type == "pt":
            np.testing.assert_allclose(as_array(images).transpose(0, 2, 3, 1), ref, atol=1e-6)
        elif output_type == "latent":
            latent_side = ref.shape[1] // pipe.vae_scale_factor
            assert as_array(images).shape[-2:] == (latent_side, latent_side)

    def test_callback_on_step_end_is_called(self, pipe):
        seen = []

        def callback(p, i, t, kwargs):
            seen.append(int(i))
            return {}

        self.run(pipe, callback_on_step_end=callback, **self.hook_call_kwargs())
        assert seen == list(range(len(seen))) and len(seen) >= NUM_STEPS

    def test_hooks_removed_after_call(self, pipe):
        before = hook_state(pipe)
        self.run(pipe, **self.hook_call_kwargs())
        assert hook_state(pipe) == before

    def test_hooks_removed_after_failure(self, pipe):
        before = hook_state(pipe)
        during = {}

        def fail(p, i, t, kwargs):
            during.update(hook_state(p))
            raise RuntimeError("planted failure")

        with pytest.raises(RuntimeError, match="planted failure"):
            self.run(pipe, callback_on_step_end=fail, **self.hook_call_kwargs())
        assert during != before, "the pipeline installed nothing, so this test checks nothing"
        assert hook_state(pipe) == before
