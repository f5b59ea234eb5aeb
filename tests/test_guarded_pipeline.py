"""The guarded pipeline: bit-identical to the stock pipeline, an exact Wen et al. score, clean hooks, clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline
from diffusers import StableDiffusionPipeline
from pipeline_mixin import NUM_STEPS, DiffusersContractMixin, PipelineTesterMixin, as_array, hook_state

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_stable_diffusion_memguard.py"
SCHEDULERS = [
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
]


class TestGuardedPipelineMixin(PipelineTesterMixin, DiffusersContractMixin):
    pipeline_class = StableDiffusionMemGuardPipeline
    stock_class = StableDiffusionPipeline

    @pytest.fixture(scope="class")
    def model_dir(self, tiny_sd1_dir):
        return tiny_sd1_dir

    def get_inputs(self, generator):
        return dict(
            prompt="a red circle", num_inference_steps=NUM_STEPS, generator=generator, output_type="np"
        )

    def hook_call_kwargs(self):
        return {"attention": "naive"}


@pytest.fixture(scope="module")
def pipes(tiny_sd1_dir, tiny_sd2_dir):
    """(stock, guarded) per variant; the guarded one comes from ``from_pipe`` and shares all modules."""
    from diffusers import StableDiffusionPipeline

    out = {}
    for variant, path in (("sd1", tiny_sd1_dir), ("sd2", tiny_sd2_dir)):
        stock = StableDiffusionPipeline.from_pretrained(path)
        stock.set_progress_bar_config(disable=True)
        guarded = StableDiffusionMemGuardPipeline.from_pipe(stock)
        guarded.set_progress_bar_config(disable=True)
        out[variant] = (stock, guarded)
    return out


def use_scheduler(pipe, name: str):
    import diffusers

    ddim_config = (
        pipe.scheduler.config if type(pipe.scheduler).__name__ == "DDIMScheduler" else pipe._ddim_config
    )
    pipe._ddim_config = ddim_config
    # as Stable Diffusion checkpoints configure them: PLMS (no Runge-Kutta warm-up), DPM-Solver++
    kwargs = {
        "DPMSolverMultistepScheduler": {"algorithm_type": "dpmsolver++"},
        "PNDMScheduler": {"skip_prk_steps": True},
    }
    kwargs = kwargs.get(name, {})
    pipe.scheduler = getattr(diffusers, name).from_config(ddim_config, **kwargs)


def run_both(stock, guarded, scheduler="DDIMScheduler", **kwargs):
    use_scheduler(stock, scheduler)
    guarded.scheduler = stock.scheduler
    kwargs.setdefault("num_inference_steps", NUM_STEPS)
    a = stock(generator=torch.Generator().manual_seed(0), **kwargs)
    b = guarded(generator=torch.Generator().manual_seed(0), return_step_scores=True, **kwargs)
    return a, b


def assert_identical(a, b):
    x, y = as_array(a.images), as_array(b.images)
    assert x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# --- bit identity with the stock pipeline ---------------------------------------------------------


@pytest.mark.dropin
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_bit_identical_every_scheduler(pipes, variant, scheduler):
    stock, guarded = pipes[variant]
    a, b = run_both(
        stock, guarded, scheduler, prompt="a red circle", negative_prompt="blurry", output_type="np"
    )
    assert_identical(a, b)
    n_calls = NUM_STEPS + (1 if scheduler == "PNDMScheduler" else 0)  # PLMS: one call per timestep entry
    assert b.memorization_step_scores.shape == (1, n_calls)
    assert np.isfinite(b.memorization_scores[0]) and b.memorization_scores[0] > 0


@pytest.mark.dropin
@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_bit_identical_batched_prompts_and_images_per_prompt(pipes, variant):
    stock, guarded = pipes[variant]
    prompts = ["a red circle", "a blue square"]
    a, b = run_both(
        stock,
        guarded,
        prompt=prompts,
        negative_prompt=["blurry", "green"],
        num_images_per_prompt=2,
        output_type="np",
    )
    assert_identical(a, b)
    assert len(b.memorization_scores) == 4 and b.memorization_step_scores.shape == (4, NUM_STEPS)
    # images are prompt-major ([p0, p0, p1, p1]) and so are the scores: each equals a lone call's score
    alone = guarded(
        prompt=prompts[1],
        negative_prompt="green",
        num_inference_steps=NUM_STEPS,
        output_type="latent",
        latents=b_latents(stock, 4)[2:3],
    )
    batched = guarded(
        prompt=prompts,
        negative_prompt=["blurry", "green"],
        num_images_per_prompt=2,
        num_inference_steps=NUM_STEPS,
        output_type="latent",
        latents=b_latents(stock, 4),
    )
    assert alone.memorization_scores[0] == pytest.approx(batched.memorization_scores[2], rel=1e-5)


def b_latents(pipe, n):
    return torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(5))


@pytest.mark.dropin
@pytest.mark.parametrize(
    "variant, scheduler, guidance_scale",
    [
        ("sd1", "DDIMScheduler", 1.0),
        ("sd2", "DDIMScheduler", 0.0),
        ("sd1", "EulerAncestralDiscreteScheduler", 1.0),  # draws noise from the generator at every step
        ("sd2", "PNDMScheduler", 1.0),
        ("sd2", "DPMSolverMultistepScheduler", 1.0),
    ],
)
def test_bit_identical_without_guidance(pipes, variant, scheduler, guidance_scale):
    """Without guidance the hook's extra unconditional UNet call must leave the images untouched."""
    stock, guarded = pipes[variant]
    a, b = run_both(
        stock, guarded, scheduler, prompt="a red circle", guidance_scale=guidance_scale, output_type="np"
    )
    assert_identical(a, b)
    assert b.memorization_scores[0] > 0


@pytest.mark.dropin
@pytest.mark.parametrize("variant, guidance_scale", [("sd1", 7.5), ("sd2", 1.0)])
def test_bit_identical_with_prompt_embeds(pipes, variant, guidance_scale):
    stock, guarded = pipes[variant]
    embeds, negative = stock.encode_prompt(["a red circle"], "cpu", 1, True, negative_prompt=["noise"])
    a, b = run_both(
        stock,
        guarded,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        guidance_scale=guidance_scale,
        num_images_per_prompt=2,
        output_type="np",
    )
    assert_identical(a, b)
    assert len(b.memorization_scores) == 2


@pytest.mark.dropin
@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_bit_identical_every_output_type(pipes, output_type):
    stock, guarded = pipes["sd1"]
    a, b = run_both(stock, guarded, prompt="a red circle", output_type=output_type)
    assert_identical(a, b)
    assert len(b.memorization_scores) == 1


@pytest.mark.dropin
def test_user_callback_still_works(pipes):
    """A callback that rewrites the latents acts on both pipelines alike."""
    stock, guarded = pipes["sd1"]
    steps = []

    def halve(p, i, t, kw):
        steps.append(i)
        return {"latents": kw["latents"] * 0.5}

    a, b = run_both(stock, guarded, prompt="a red circle", output_type="np", callback_on_step_end=halve)
    assert_identical(a, b)
    assert steps == list(range(NUM_STEPS)) * 2


@pytest.mark.dropin
def test_return_dict_false_is_the_stock_tuple(pipes):
    stock, guarded = pipes["sd1"]
    kw = dict(prompt="a cat", num_inference_steps=NUM_STEPS, output_type="np", return_dict=False)
    a = stock(generator=torch.Generator().manual_seed(0), **kw)
    b = guarded(generator=torch.Generator().manual_seed(0), memorization_threshold=0, **kw)
    assert type(a) is type(b) is tuple and len(a) == len(b) == 2
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] is None and b[1] is None
    images, nsfw = b  # the stock unpacking works


# --- the score -----------------------------------------------------------------------------------


def direct_step_gaps(pipe, prompt, latents, steps, guidance):
    """Wen et al.'s per-step gap computed independently: DDIM by hand, the UNet called directly."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    text, uncond = pipe.encode_prompt([prompt], "cpu", 1, True, negative_prompt=[""])
    x = latents * sched.init_noise_sigma
    gaps = []
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
            eps_c = pipe.unet(x, t, encoder_hidden_states=text).sample
            gap = (eps_c - eps_u).flatten(1).norm(dim=1)
            if sched.config.prediction_type == "v_prediction":
                gap = gap * sched.alphas_cumprod[int(t)].sqrt()
            gaps.append(gap)
            scale = 7.5 if guidance else 1.0
            guided = eps_u + scale * (eps_c - eps_u) if guidance else eps_c
            x = sched.step(guided, t, x).prev_sample
    return torch.stack(gaps, dim=1)


@pytest.mark.parametrize("variant, guidance", [("sd1", True), ("sd2", True), ("sd2", False)])
def test_score_equals_direct_unet_computation(pipes, variant, guidance):
    stock, guarded = pipes[variant]
    use_scheduler(stock, "DDIMScheduler")
    guarded.scheduler = stock.scheduler
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    steps = 3
    out = guarded(
        "a red circle",
        num_inference_steps=steps,
        guidance_scale=7.5 if guidance else 1.0,
        latents=latents,
        return_step_scores=True,
        memorization_window=(1, 3),
        output_type="latent",
    )
    expected = direct_step_gaps(guarded, "a red circle", latents, steps, guidance)
    torch.testing.assert_close(out.memorization_step_scores, expected, rtol=1e-4, atol=1e-5)
    assert out.memorization_scores[0] == pytest.approx(float(expected[0, 1:3].mean()), rel=1e-4)


def test_memorized_flag_follows_threshold(pipes):
    _, guarded = pipes["sd1"]

    def call(**kw):
        g = torch.Generator().manual_seed(0)
        return guarded(
            ["a red circle", "a cat"], num_inference_steps=NUM_STEPS, output_type="latent", generator=g, **kw
        )

    free = call()
    assert free.memorized is None
    low, high = sorted(free.memorization_scores)
    assert low < high
    flagged = call(memorization_threshold=high)
    assert flagged.memorization_scores == free.memorization_scores
    assert flagged.memorized == [s >= high for s in free.memorization_scores] and sum(flagged.memorized) == 1
    guarded.memorization_threshold = low  # the pipeline's default threshold, e.g. from calibration
    try:
        assert call().memorized == [True, True]
    finally:
        guarded.memorization_threshold = None


def test_scores_same_under_every_attention_processor(pipes):
    from diffusers.models.attention_processor import AttnProcessor2_0

    _, guarded = pipes["sd2"]
    kw = dict(prompt=["a red circle", "a cat"], num_inference_steps=NUM_STEPS, output_type="latent")
    before = hook_state(guarded)
    naive = guarded(generator=torch.Generator().manual_seed(0), attention="naive", **kw)
    sdpa = guarded(generator=torch.Generator().manual_seed(0), attention="sdpa", **kw)
    np.testing.assert_allclose(naive.memorization_scores, sdpa.memorization_scores, rtol=1e-4)
    assert hook_state(guarded) == before
    assert all(isinstance(p, AttnProcessor2_0) for p in guarded.unet.attn_processors.values())


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.dropin
def test_loads_as_diffusers_custom_pipeline(tiny_sd1_dir, pipes):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionMemGuardPipeline"
    out = pipe(
        "a red circle",
        num_inference_steps=NUM_STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    stock, _ = pipes["sd1"]
    use_scheduler(stock, "DDIMScheduler")
    ref = stock(
        "a red circle",
        num_inference_steps=NUM_STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    np.testing.assert_array_equal(out.images, ref.images)
    assert len(out.memorization_scores) == 1


# --- bad input -----------------------------------------------------------------------------------


def test_rejects_a_folder_that_is_not_stable_diffusion(tmp_path):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*model_index.json"):
        StableDiffusionMemGuardPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained_model_name_or_path"):
        StableDiffusionMemGuardPipeline.from_pretrained(tmp_path / "missing")


def test_rejects_a_folder_with_a_missing_component(tiny_sd1_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ValueError, match="unet"):
        StableDiffusionMemGuardPipeline.from_pretrained(broken)
    index = json.loads((tiny_sd1_dir / "model_index.json").read_text())
    assert "unet" in index


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=None), "prompt: expected"),
        (dict(prompt=""), "prompt: expected a non-empty string"),
        (dict(prompt=[]), "prompt: expected"),
        (dict(prompt=["a cat", "  "]), r"prompt\[1\]"),
        (dict(prompt="a cat", memorization_threshold=float("nan")), "memorization_threshold"),
        (dict(prompt="a cat", memorization_threshold=-1.0), "memorization_threshold"),
        (dict(prompt="a cat", memorization_window=(0, NUM_STEPS + 1)), "memorization_window"),
        (dict(prompt="a cat", memorization_window=(2, 1)), "memorization_window"),
        (dict(prompt="a cat", mitigation="prune"), "mitigation='prune' is not registered"),
        (dict(prompt="a cat", mitigation="embedding"), "needs memorization_threshold"),
        (dict(prompt="a cat", attention="flash"), "attention="),
    ],
)
def test_bad_input_names_the_argument(pipes, kwargs, match):
    _, guarded = pipes["sd1"]
    before = hook_state(guarded)
    with pytest.raises(ValueError, match=match):
        guarded(num_inference_steps=NUM_STEPS, output_type="latent", **kwargs)
    assert hook_state(guarded) == before


# --- attention processors ------------------------------------------------------------------------


def test_attention_choice_on_this_machine():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from diffmem.attention import fast_attention_processor, xformers_usable

    assert not xformers_usable("cpu")
    assert isinstance(fast_attention_processor("auto", "cpu"), AttnProcessor2_0)  # SDPA without CUDA
    assert type(fast_attention_processor("naive", "cpu")) is AttnProcessor
    with pytest.raises(ValueError, match="attention='xformers' needs a CUDA device"):
        fast_attention_processor("xformers", "cpu")


def test_attention_context_restores_processors_and_leaves_custom_ones(pipes):
    from diffusers.models.attention_processor import AttnProcessor

    from diffmem.attention import attention_processors

    _, guarded = pipes["sd1"]
    unet = guarded.unet
    original = dict(unet.attn_processors)

    class Custom(AttnProcessor):
        pass

    first = next(iter(original))
    unet.set_attn_processor({**original, first: Custom()})
    try:
        with pytest.raises(RuntimeError, match="inside"):
            with attention_processors(unet, "naive"):
                inside = unet.attn_processors
                assert type(inside[first]) is Custom  # a processor that is not plain attention stays
                assert all(type(p) is AttnProcessor for k, p in inside.items() if k != first)
                raise RuntimeError("inside")
        assert type(unet.attn_processors[first]) is Custom
        assert all(unet.attn_processors[k] is p for k, p in original.items() if k != first)
    finally:
        unet.set_attn_processor(dict(original))
