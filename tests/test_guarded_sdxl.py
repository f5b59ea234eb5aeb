"""The guarded SDXL pipeline: the drop-in contract, bit identity with stock SDXL, the score, mitigations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffmem.pipelines import StableDiffusionXLMemGuardPipeline
from diffusers import StableDiffusionXLPipeline
from pipeline_mixin import NUM_STEPS, DiffusersContractMixin, PipelineTesterMixin, as_array

SCHEDULERS = [
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
]


class TestGuardedSDXLMixin(PipelineTesterMixin, DiffusersContractMixin):
    pipeline_class = StableDiffusionXLMemGuardPipeline
    stock_class = StableDiffusionXLPipeline
    stock_tuple_length = 1  # SDXL returns (images,)

    @pytest.fixture(scope="class")
    def model_dir(self, tiny_sdxl_dir):
        return tiny_sdxl_dir

    def get_inputs(self, generator):
        return dict(
            prompt="a red circle", num_inference_steps=NUM_STEPS, generator=generator, output_type="np"
        )

    def hook_call_kwargs(self):
        return {"attention": "naive"}

    def embeds_inputs(self, pipe, prompt):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, device="cpu")
        return dict(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
        )


@pytest.fixture(scope="module")
def pipes(tiny_sdxl_dir):
    stock = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    stock.set_progress_bar_config(disable=True)
    guarded = StableDiffusionXLMemGuardPipeline.from_pipe(stock)
    guarded.set_progress_bar_config(disable=True)
    return stock, guarded


def use_scheduler(stock, guarded, name: str):
    import diffusers

    base = stock.__dict__.setdefault("_euler_config", stock.scheduler.config)
    kwargs = {"algorithm_type": "dpmsolver++"} if name == "DPMSolverMultistepScheduler" else {}
    stock.scheduler = getattr(diffusers, name).from_config(base, **kwargs)
    guarded.scheduler = stock.scheduler


@pytest.mark.dropin
@pytest.mark.parametrize("guidance_scale", [5.0, 1.0])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_bit_identical_to_stock_sdxl(pipes, scheduler, guidance_scale):
    stock, guarded = pipes
    use_scheduler(stock, guarded, scheduler)
    kw = dict(
        prompt=["a red circle", "a blue square"],
        negative_prompt=["blurry", "green"] if guidance_scale > 1 else None,
        num_images_per_prompt=2,
        num_inference_steps=NUM_STEPS,
        guidance_scale=guidance_scale,
        output_type="np",
    )
    a = stock(generator=torch.Generator().manual_seed(0), **kw)
    b = guarded(generator=torch.Generator().manual_seed(0), return_step_scores=True, **kw)
    np.testing.assert_array_equal(a.images, b.images)
    assert b.memorization_step_scores.shape == (4, NUM_STEPS)
    assert all(np.isfinite(s) and s > 0 for s in b.memorization_scores)


@pytest.mark.parametrize("guidance", [True, False])
def test_score_equals_direct_unet_computation(pipes, guidance):
    """First-step gap ``||eps(x_T, c) - eps(x_T, negative)||`` with SDXL's pooled embeddings and time ids."""
    stock, guarded = pipes
    use_scheduler(stock, guarded, "EulerDiscreteScheduler")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    out = guarded(
        "a red circle",
        num_inference_steps=3,
        guidance_scale=5.0 if guidance else 1.0,
        latents=latents,
        memorization_window=(0, 1),
        output_type="latent",
    )
    sched = guarded.scheduler
    sched.set_timesteps(3)
    t = sched.timesteps[0]
    text, _, pooled, _ = guarded.encode_prompt(
        "a red circle", device="cpu", do_classifier_free_guidance=False
    )
    neg = torch.zeros_like(text)  # force_zeros_for_empty_prompt: SDXL's empty negative is zeros
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    x = sched.scale_model_input(latents * sched.init_noise_sigma, t)
    with torch.no_grad():
        eps_c = guarded.unet(
            x, t, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
        eps_u = guarded.unet(
            x, t, neg, added_cond_kwargs={"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}
        ).sample
    expected = float((eps_c - eps_u).flatten().norm())
    assert out.memorization_scores[0] == pytest.approx(expected, rel=1e-4)


def test_value_layers_read_from_the_sdxl_unet(pipes):
    """NeMo's layers are every cross-attention value projection, also with several transformer layers."""
    from diffmem.hooks.neurons import value_layers

    _, guarded = pipes
    layers = value_layers(guarded.unet, ("down", "mid", "up"))
    expected = [n for n, _ in guarded.unet.named_modules() if n.endswith("attn2.to_v")]
    assert sorted(layers) == sorted(expected) and len(expected) == 8  # down 1x2, mid 1x2, up 2x2
    parts = [name.split(".")[0] for name in layers]
    assert parts == sorted(parts, key=["down_blocks", "mid_block", "up_blocks"].index)  # forward order
    assert any(".transformer_blocks.1." in n for n in layers)


def test_mitigations_change_only_flagged_images(pipes):
    from diffmem.edits import NeuronSet
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.neurons import value_layers

    stock, guarded = pipes
    use_scheduler(stock, guarded, "EulerDiscreteScheduler")
    kw = dict(
        prompt=["a red circle", "a blue square"],
        num_inference_steps=NUM_STEPS,
        output_type="np",
        memorization_window=(0, 1),
    )
    plain = guarded(generator=torch.Generator().manual_seed(0), **kw)
    high, low = max(plain.memorization_scores), min(plain.memorization_scores)
    threshold = (high + low) / 2
    flagged = [s >= threshold for s in plain.memorization_scores]
    assert sum(flagged) == 1
    layers = list(value_layers(guarded.unet, ("down", "mid", "up")))
    neurons = NeuronSet(model_fingerprint(guarded.unet), layers, [list(range(16))] * len(layers))
    for mitigation, options in (("embedding", {}), ("nemo", {"neuron_set": neurons})):
        out = guarded(
            generator=torch.Generator().manual_seed(0),
            mitigation=mitigation,
            mitigation_options=options,
            memorization_threshold=threshold,
            **kw,
        )
        assert [r["flagged"] for r in out.mitigations] == flagged
        assert [r["action"] for r in out.mitigations] == [mitigation if f else "none" for f in flagged]
        k, j = flagged.index(True), flagged.index(False)
        np.testing.assert_array_equal(out.images[j], plain.images[j])
        assert not np.array_equal(out.images[k], plain.images[k])
        assert out.memorization_scores[k] < plain.memorization_scores[k]


def test_calibration_in_the_sdxl_folder_flags(tiny_sdxl_dir, tmp_path):
    from diffmem.guard.calibration import GuardCalibration

    pipe = StableDiffusionXLMemGuardPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=NUM_STEPS, output_type="latent")
    score = pipe(memorization_window=(0, 1), **kw).memorization_scores[0]
    pipe.calibration = GuardCalibration(
        memorization_threshold=score * 0.5,
        memorization_window=(0, 1),
        num_inference_steps=NUM_STEPS,
        scheduler="EulerDiscreteScheduler",
        height=32,
        width=32,
    )
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionXLMemGuardPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    out = loaded(**kw)
    assert loaded.calibration == pipe.calibration
    assert out.memorized == [True] and out.memorization_threshold == pytest.approx(score * 0.5)
    assert as_array(out.images).shape[-1] == 16


@pytest.mark.dropin
def test_prompt_conditioning_is_what_the_stock_loop_feeds_the_unet(pipes):
    """NeMo's and its statistics' view of an SDXL prompt: exactly the stock pipeline's UNet inputs."""
    from diffmem.conditioning import prompt_conditioning

    stock, guarded = pipes
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("hidden", kwargs["encoder_hidden_states"].clone())
        seen.setdefault("added", {k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()})

    handle = stock.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        stock("a red circle", num_inference_steps=1, guidance_scale=1.0, output_type="latent")
    finally:
        handle.remove()
    hidden, kwargs = prompt_conditioning(guarded, ["a red circle"])
    torch.testing.assert_close(hidden, seen["hidden"])
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(kwargs["added_cond_kwargs"][key], seen["added"][key])


def test_nemo_localizes_on_sdxl_and_mitigates(pipes):
    """The whole NeMo path on SDXL: statistics, localization (criterion forced to fire), blocking in the loop."""
    from diffmem.localize.nemo import NeMo, NemoConfig
    from diffmem.localize.stats import value_stats_of
    from diffmem.mitigations.nemo import NeMoMitigation

    _, guarded = pipes
    use_scheduler(guarded, guarded, "DDIMScheduler")
    blocks = ("down", "mid", "up")
    stats = value_stats_of(
        guarded, ["a dog", "a red car", "two cats", "a soup"], blocks=blocks, progress=False
    )
    # threshold -1 is unreachable: NeMo's fallback set (early_exit would rightly stop at "not_localizable")
    config = NemoConfig(
        threshold=-1.0, n_seeds=3, num_inference_steps=4, theta0=1.5, blocks=blocks, early_exit=False
    )
    found = NeMo.from_pipe(guarded, stats, config).localize("a red circle")
    found.validate(guarded.unet)
    assert found.info["memorized"] and len(found) > 0  # threshold -1: every seed counts as memorized
    out = guarded(
        ["a red circle", "a cat"],
        num_inference_steps=NUM_STEPS,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="np",
        mitigation=NeMoMitigation(neuron_set=found),
        memorization_threshold=0.0,
        memorization_window=(0, 1),
    )
    assert [r["neurons"] for r in out.mitigations] == [len(found)] * 2
