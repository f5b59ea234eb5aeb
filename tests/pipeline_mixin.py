"""Tester mixins for diffmem's pipelines (in the spirit of diffusers' ``PipelineTesterMixin``).

``DiffusersContractMixin`` (below) is the drop-in contract, run on the stock and the guarded pipeline alike.

A test class sets ``pipeline_class``, provides a ``model_dir`` fixture (a saved diffusers folder the
pipeline loads) and ``get_inputs(generator)`` (the call's keyword arguments), and inherits:
save/load round trip, ``from_pipe`` sharing modules, determinism under a generator, every
``output_type``, ``callback_on_step_end``, and "every hook and processor the pipeline adds is gone
after a call, also one that fails". ``hook_call_kwargs()`` names arguments that make the pipeline add
hooks or processors (so that the clean-up test has something to clean up).
"""

from __future__ import annotations

import inspect
import json

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
    # every test class built on a mixin is part of the drop-in contract (`make test-diffusers-matrix`)
    pytestmark = pytest.mark.dropin
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

        stock = (getattr(self, "stock_class", None) or StableDiffusionPipeline).from_pretrained(model_dir)
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


# ------------------------------------------------------------------------------------------------
# The drop-in contract: what diffusers' own pipeline tests ask of a text-to-image pipeline
# (``PipelineTesterMixin`` and the SD/SDXL fast tests), written for this project. Every test runs on the
# stock pipeline and on the guarded one alike, so a difference shows as a failure on the guarded one only.

#: Parameters every text-to-image pipeline's ``__call__`` must have (diffusers' ``TEXT_TO_IMAGE_PARAMS``).
TEXT_TO_IMAGE_PARAMS = {
    "prompt",
    "height",
    "width",
    "guidance_scale",
    "negative_prompt",
    "prompt_embeds",
    "negative_prompt_embeds",
    "cross_attention_kwargs",
}
#: ... and these with defaults.
REQUIRED_OPTIONAL_PARAMS = {
    "num_inference_steps",
    "num_images_per_prompt",
    "generator",
    "latents",
    "output_type",
    "return_dict",
    "callback_on_step_end",
    "callback_on_step_end_tensor_inputs",
    "ip_adapter_image",
    "ip_adapter_image_embeds",
}


class DiffusersContractMixin:
    """Contract tests; a test class sets ``stock_class``, ``pipeline_class``, ``stock_tuple_length``, a
    ``model_dir`` fixture and ``get_inputs(generator)``, and for SDXL ``embeds_inputs(pipe, prompt)``."""

    pytestmark = pytest.mark.dropin
    stock_class = None
    pipeline_class = None
    #: what the stock ``__call__`` returns with ``return_dict=False`` (SD: images and NSFW flags)
    stock_tuple_length = 2

    def embeds_inputs(self, pipe, prompt: str) -> dict:
        """The call arguments that replace ``prompt`` by what ``encode_prompt`` returns (SD's two tensors)."""
        embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    @pytest.fixture(scope="class", params=["stock", "guarded"])
    def contract_pipe(self, request, model_dir):
        cls = self.stock_class if request.param == "stock" else self.pipeline_class
        pipe = cls.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def call(self, pipe, seed: int = 0, **overrides):
        kwargs = self.get_inputs(torch.Generator().manual_seed(seed))
        kwargs.update(overrides)
        return pipe(**kwargs)

    def test_call_signature(self, contract_pipe):
        params = inspect.signature(type(contract_pipe).__call__).parameters
        names = set(params) - {"self", "kwargs"}
        assert TEXT_TO_IMAGE_PARAMS <= names, TEXT_TO_IMAGE_PARAMS - names
        with_default = {k for k, p in params.items() if p.default is not inspect.Parameter.empty}
        assert REQUIRED_OPTIONAL_PARAMS <= with_default, REQUIRED_OPTIONAL_PARAMS - with_default
        assert not any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())
        stock = set(inspect.signature(self.stock_class.__call__).parameters)
        assert stock <= set(params), stock - set(params)  # nothing of the stock call is hidden
        assert "num_inference_steps" in (inspect.getdoc(type(contract_pipe).__call__) or "")

    def test_dict_and_tuple_outputs_equivalent(self, contract_pipe):
        as_dict = self.call(contract_pipe)
        as_tuple = self.call(contract_pipe, return_dict=False)
        assert isinstance(as_tuple, tuple)
        assert len(as_tuple) == self.stock_tuple_length
        np.testing.assert_array_equal(as_array(as_dict[0]), as_array(as_tuple[0]))
        np.testing.assert_array_equal(as_array(as_dict.images), as_array(as_tuple[0]))

    def test_batch_and_single_identical(self, contract_pipe):
        prompts = ["a red circle", "a blue square on grass"]
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        batched = self.call(contract_pipe, prompt=prompts, generator=gens, output_type="np").images
        for k, prompt in enumerate(prompts):
            single = self.call(
                contract_pipe, prompt=prompt, generator=torch.Generator().manual_seed(k + 1), output_type="np"
            ).images
            np.testing.assert_allclose(batched[k], single[0], atol=1e-4)

    @pytest.mark.parametrize("batch_size", [1, 2])
    @pytest.mark.parametrize("per_prompt", [1, 2])
    def test_num_images_per_prompt(self, contract_pipe, batch_size, per_prompt):
        prompts = ["a red circle", "a blue square"][:batch_size]
        out = self.call(contract_pipe, prompt=prompts, num_images_per_prompt=per_prompt, output_type="np")
        assert len(out.images) == batch_size * per_prompt

    def test_guidance_on_and_off(self, contract_pipe):
        off = as_array(self.call(contract_pipe, guidance_scale=1.0, output_type="np").images)
        on = as_array(self.call(contract_pipe, guidance_scale=7.5, output_type="np").images)
        assert off.shape == on.shape and not np.array_equal(off, on)

    def test_callback_tensor_inputs(self, contract_pipe):
        allowed = set(contract_pipe._callback_tensor_inputs)
        seen = []

        def only_latents(pipe, i, t, kwargs):
            seen.append(set(kwargs))
            return {}

        self.call(
            contract_pipe, callback_on_step_end=only_latents, callback_on_step_end_tensor_inputs=["latents"]
        )
        assert seen and all(keys == {"latents"} for keys in seen)

        def all_inputs(pipe, i, t, kwargs):
            assert set(kwargs) == allowed
            last = i == pipe.num_timesteps - 1
            return {"latents": torch.zeros_like(kwargs["latents"])} if last else {}

        out = self.call(
            contract_pipe,
            callback_on_step_end=all_inputs,
            callback_on_step_end_tensor_inputs=sorted(allowed),
            output_type="latent",
        )
        assert float(as_array(out.images).__abs__().sum()) == 0.0  # the callback's latents are the output

    def test_callback_changes_guidance(self, contract_pipe):
        def louder(pipe, i, t, kwargs):
            pipe._guidance_scale += 1.0
            return {}

        start = 3.0
        self.call(contract_pipe, guidance_scale=start, callback_on_step_end=louder)
        assert contract_pipe.guidance_scale == start + NUM_STEPS

    def test_prompt_embeds_equal_prompt(self, contract_pipe):
        """``encode_prompt`` works in isolation: its outputs in place of the prompt give the same images."""
        with torch.no_grad():
            embeds = self.embeds_inputs(contract_pipe, "a red circle")
        by_prompt = as_array(self.call(contract_pipe, prompt="a red circle", output_type="np").images)
        by_embeds = as_array(self.call(contract_pipe, prompt=None, output_type="np", **embeds).images)
        np.testing.assert_allclose(by_prompt, by_embeds, atol=1e-5)

    def test_saved_folder_loads_in_stock_diffusers(self, contract_pipe, tmp_path):
        from diffusers import DiffusionPipeline

        contract_pipe.save_pretrained(tmp_path)
        index = json.loads((tmp_path / "model_index.json").read_text())
        assert index["_class_name"] == self.stock_class.__name__
        ref = as_array(self.call(contract_pipe, output_type="np").images)
        for loader in (DiffusionPipeline, self.stock_class, self.pipeline_class):
            loaded = loader.from_pretrained(tmp_path)
            loaded.set_progress_bar_config(disable=True)
            assert isinstance(loaded, self.stock_class)
            np.testing.assert_array_equal(as_array(self.call(loaded, output_type="np").images), ref)

    def test_lora_and_ip_adapter_entry_points(self, contract_pipe):
        for name in (
            "load_lora_weights",
            "unload_lora_weights",
            "fuse_lora",
            "load_ip_adapter",
            "unload_ip_adapter",
        ):
            assert callable(getattr(contract_pipe, name, None)), name

    def test_attention_slicing_keeps_the_output(self, contract_pipe):
        ref = as_array(self.call(contract_pipe, output_type="np").images)
        contract_pipe.enable_attention_slicing(slice_size=1)
        try:
            sliced = as_array(self.call(contract_pipe, output_type="np").images)
        finally:
            contract_pipe.disable_attention_slicing()
        np.testing.assert_allclose(sliced, ref, atol=1e-4)
