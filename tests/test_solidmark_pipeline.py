"""The SolidMark outpainting pipeline on tiny epsilon and v-prediction models, and mitigations really applied."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffmem.pipelines import SolidMarkOutpaintPipeline
from pipeline_mixin import NUM_STEPS, PipelineTesterMixin, as_array, hook_state

from diffmem.generation import keyed_noise, latent_shape
from diffmem.scores.solidmark import frame_mask
from diffmem.solidmark.mitigations import gaussian_embedding_noise
from diffmem.solidmark.scoring import edits_applied, pipeline_outpainter

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_solidmark_outpaint.py"
MASK = frame_mask(32, 32, 8)


def _reference(seed=0, batch=1):
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


class TestSolidMarkOutpaintPipelineMixin(PipelineTesterMixin):
    pipeline_class = SolidMarkOutpaintPipeline

    @pytest.fixture(scope="class")
    def model_dir(self, tiny_sd1_dir):
        return tiny_sd1_dir

    def get_inputs(self, generator):
        return dict(
            prompt="a red circle",
            image=_reference(),
            mask=MASK,
            num_inference_steps=NUM_STEPS,
            generator=generator,
            output_type="np",
        )

    def test_hooks_removed_after_failure(self, pipe):
        # this pipeline works through callback_on_step_end only: it adds no hook or processor at all,
        # so the check is that none is left, also after a failing call
        before = hook_state(pipe)
        state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

        def fail(p, i, t, kwargs):
            assert hook_state(p) == before
            raise RuntimeError("planted failure")

        with pytest.raises(RuntimeError, match="planted failure"):
            self.run(pipe, callback_on_step_end=fail)
        assert hook_state(pipe) == before
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())


@pytest.fixture(scope="module")
def pipes(tiny_sd1_dir, tiny_sd2_dir):
    out = {}
    for variant, path in (("sd1", tiny_sd1_dir), ("sd2", tiny_sd2_dir)):
        pipe = SolidMarkOutpaintPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        out[variant] = pipe
    return out


def _scheduler(pipe, name):
    import diffusers

    base = getattr(pipe, "_ddim_config", None) or pipe.scheduler.config
    pipe._ddim_config = base
    pipe.scheduler = getattr(diffusers, name).from_config(base)


def _latents_of(pipe, images):
    with torch.no_grad():
        return pipe.vae.encode(images * 2 - 1).latent_dist.mode() * pipe.vae.config.scaling_factor


@pytest.mark.parametrize(
    "variant, scheduler",
    [
        ("sd1", "DDIMScheduler"),
        ("sd2", "DDIMScheduler"),
        ("sd1", "EulerDiscreteScheduler"),
        ("sd2", "DPMSolverMultistepScheduler"),
    ],
)
def test_known_region_is_the_reference_and_the_frame_is_generated(pipes, variant, scheduler):
    pipe = pipes[variant]
    _scheduler(pipe, scheduler)
    try:
        ref = _reference(1, batch=2)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        z = pipe(
            ["a cat", "a dog"],
            image=ref,
            mask=MASK,
            num_inference_steps=2,
            generator=gens,
            output_type="latent",
        )
        z_ref = _latents_of(pipe, ref)
        known = ~MASK[::2, ::2]  # the tiny VAE's factor is 2
        assert torch.equal(z.images[..., known], z_ref[..., known])
        assert (z.images[..., ~known] - z_ref[..., ~known]).abs().mean() > 0.05
        if (
            scheduler == "DDIMScheduler"
        ):  # decoded with the reference pasted back: the interior is the reference
            gens = [torch.Generator().manual_seed(i) for i in range(2)]
            x = pipe(["a cat", "a dog"], image=ref, mask=MASK, num_inference_steps=2, generator=gens).images
            assert x.shape == ref.shape and torch.equal(x[..., ~MASK], ref[..., ~MASK])
    finally:
        _scheduler(pipe, "DDIMScheduler")


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_the_frame_depends_on_the_known_interior(pipes, variant):
    pipe = pipes[variant]
    a = _reference(2)
    b = a.clone()
    b[..., ~MASK] = torch.rand(int((~MASK).sum()) * 3, generator=torch.Generator().manual_seed(9)).view(
        1, 3, -1
    )
    out = [
        pipe(
            "a cat", image=x, mask=MASK, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
        ).images
        for x in (a, b)
    ]
    assert (out[0][..., MASK] - out[1][..., MASK]).abs().max() > 1e-3


def test_result_does_not_depend_on_the_batch(pipes):
    pipe = pipes["sd2"]
    ref = _reference(3, batch=2)
    both = pipe(
        ["a cat", "a dog"],
        image=ref,
        mask=MASK,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(s) for s in (5, 6)],
    ).images
    alone = pipe(
        "a dog", image=ref[1:], mask=MASK, num_inference_steps=2, generator=torch.Generator().manual_seed(6)
    )
    torch.testing.assert_close(both[1:], alone.images, atol=1e-4, rtol=0)


def test_passed_mitigations_are_really_applied_and_undone(pipes):
    from diffmem.edits import NeuronSet
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.neurons import value_layers

    pipe = pipes["sd1"]
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    ref = _reference(4)

    def frames(edits):
        outpaint = pipeline_outpainter(pipe, steps=2, guidance_scale=3.0, edits=edits)
        return outpaint(ref, MASK, ["a cat"], [(0, "ref", 0)])[..., MASK]

    plain = frames([])
    layers = list(value_layers(pipe.unet))
    neurons = NeuronSet(model_fingerprint(pipe.unet), layers, [list(range(8))] * len(layers))

    def zero_conv_out(unet):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved = unet.conv_out.weight.detach().clone()
            with torch.no_grad():
                unet.conv_out.weight.zero_()
            try:
                yield
            finally:
                with torch.no_grad():
                    unet.conv_out.weight.copy_(saved)

        return ctx()

    for edit in (neurons, zero_conv_out):
        edited = frames([edit])
        assert (edited - plain).abs().max() > 1e-3, edit
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())
    torch.testing.assert_close(frames([]), plain, atol=0, rtol=0)

    # a prompt-side mitigation (Gaussian noise on the text embedding) is really passed to the pipeline
    def prompt_frames(sigma):
        outpaint = pipeline_outpainter(pipe, steps=2, prompt_mitigation=gaussian_embedding_noise(sigma))
        return outpaint(ref, MASK, ["a cat"], [(0, "ref", 0)])[..., MASK]

    torch.testing.assert_close(prompt_frames(0.0), plain, atol=1e-5, rtol=0)
    assert (prompt_frames(2.0) - plain).abs().max() > 1e-3
    with pytest.raises(TypeError, match="not an edit"):
        with edits_applied(pipe.unet, [42]):
            pass


def _old_generators(keys):
    """What scoring built before the noise went through the one keyed draw: one generator per image,
    seeded with the SHA-256 derivation of (seed, image id, generation), written out here independently."""
    seeds = [
        int.from_bytes(hashlib.sha256(repr((int(k[0]), *map(str, k[1:]))).encode()).digest()[:8], "little")
        & ((1 << 63) - 1)
        for k in keys
    ]
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_keyed_noise_is_bit_identical_to_the_per_image_generators_draw():
    from diffusers.utils.torch_utils import randn_tensor

    keys = [(0, "img0", 0), (0, "img0", 1), (7, "verbatim-rocket", 3)]
    noise, generators = keyed_noise((4, 10, 10), keys)
    old = _old_generators(keys)
    expected = randn_tensor((3, 4, 10, 10), generator=old, dtype=torch.float32)
    assert noise.dtype == torch.float32 and torch.equal(noise, expected)
    # the generators come back just past the draw, where the pipeline's own draw left them
    assert all(torch.equal(g.get_state(), o.get_state()) for g, o in zip(generators, old))
    # half precision: the pipeline cast of the float32 draw is the half draw
    half = randn_tensor((3, 4, 10, 10), generator=_old_generators(keys), dtype=torch.float16)
    assert torch.equal(noise.half(), half)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "EulerAncestralDiscreteScheduler"])
def test_outpainting_from_noise_keys_is_bit_identical_to_per_image_generators(pipes, scheduler):
    # the outpainter hands the pipeline the keyed noise as latents (and the generators past it, for a
    # stochastic sampler's steps): the images are those of the generators the pipeline used to draw from
    pipe = pipes["sd1"]
    _scheduler(pipe, scheduler)
    try:
        ref, keys, prompts = _reference(5, batch=2), [(3, "a", 0), (3, "b", 1)], ["a cat", "a dog"]
        new = pipeline_outpainter(pipe, steps=3)(ref, MASK, prompts, keys)
        old = pipe(prompts, image=ref, mask=MASK, num_inference_steps=3, generator=_old_generators(keys))
        assert torch.equal(new, old.images.float().cpu())
        noise, _ = keyed_noise(latent_shape(pipe, 32, 32), keys)
        given = pipe(prompts, image=ref, mask=MASK, num_inference_steps=3, latents=noise,
                     generator=_old_generators([(9, "other", 0), (9, "other", 1)])).images  # fmt: skip
        if scheduler == "DDIMScheduler":  # deterministic steps: latents fix the result
            assert torch.equal(given, old.images)
        # the mitigation's noise is keyed by the same keys (GNI at sigma 0 changes nothing)
        gni = pipeline_outpainter(pipe, steps=3, prompt_mitigation=gaussian_embedding_noise(0.0))
        torch.testing.assert_close(gni(ref, MASK, prompts, keys), new, atol=1e-5, rtol=0)
    finally:
        _scheduler(pipe, "DDIMScheduler")


def test_gaussian_embedding_noise_draws_from_the_key_of_each_image(pipes):
    # GNI's noise of image b is item_generator(derive_seed(*key_b), "gni")'s draw: what it drew from the
    # generator's seed before, whatever the batch
    pipe = pipes["sd1"]
    keys = [(0, "x", 0), (0, "y", 1)]
    sigma = 0.5
    got = gaussian_embedding_noise(sigma)(pipe, ["a cat", "a dog"], keys)
    cond, _ = pipe.encode_prompt(["a cat", "a dog"], pipe._execution_device, 1, True, negative_prompt=None)
    for b, g in enumerate(_old_generators(keys)):
        eps = torch.randn(cond.shape[1:], generator=torch.Generator().manual_seed(
            int.from_bytes(hashlib.sha256(repr((g.initial_seed(), "gni")).encode()).digest()[:8], "little")
            & ((1 << 63) - 1)))  # fmt: skip
        assert torch.equal(got["prompt_embeds"][b], cond[b] + sigma * eps)
    alone = gaussian_embedding_noise(sigma)(pipe, ["a dog"], keys[1:])
    torch.testing.assert_close(alone["prompt_embeds"][0], got["prompt_embeds"][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mask=frame_mask(40, 40, 8)), "does not match"),
        (dict(image=torch.rand(1, 3, 36, 36), mask=frame_mask(36, 36, 8)), "multiples of 8"),
        (dict(image=torch.rand(1, 3, 32, 32) * 2 - 1), r"\[0, 1\]"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), r"latents of shape \(1, 4, 8, 8\)"),
        (dict(latents=torch.zeros(2, 4, 16, 16)), "latents of shape"),
        (dict(image=None), "needs `image`"),
    ],
)
def test_bad_input_names_the_argument(pipes, kwargs, match):
    call = dict(prompt="a cat", image=_reference(), mask=MASK, num_inference_steps=2)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipes["sd1"](**call)


@pytest.mark.dropin
def test_loads_as_diffusers_custom_pipeline(tiny_sd1_dir, pipes):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "SolidMarkOutpaintPipeline"
    kwargs = dict(image=_reference(), mask=MASK, num_inference_steps=2, output_type="np")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipes["sd1"]("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_array_equal(as_array(a), as_array(b))


@pytest.mark.slow
def test_cli_scores_with_and_without_a_mitigation_and_compares(tmp_path, tiny_sd1_dir, capsys):
    from diffmem.cli import main
    from diffmem.data import write_image_folder
    from diffmem.edits import NeuronSet
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.neurons import value_layers
    from diffmem.solidmark.scoring import read_rows

    rng = np.random.default_rng(0)
    write_image_folder(
        tmp_path / "src",
        [(f"im{i}", f"photo {i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for i in range(4)],
        role="test",
    )
    assert (
        main(
            [
                "solidmark",
                "key",
                "--data",
                str(tmp_path / "src"),
                "--out",
                str(tmp_path / "k"),
                "--frame-width",
                "8",
            ]
        )
        == 0
    )
    pipe = SolidMarkOutpaintPipeline.from_pretrained(tiny_sd1_dir)
    layers = list(value_layers(pipe.unet))
    NeuronSet(model_fingerprint(pipe.unet), layers, [list(range(16))] * len(layers)).save(
        tmp_path / "neurons.json"
    )
    common = [
        "solidmark",
        "score",
        "--model",
        str(tiny_sd1_dir),
        "--data",
        str(tmp_path / "k"),
        "--steps",
        "2",
    ]
    assert main(common + ["--out", str(tmp_path / "base"), "--group-column", "role"]) == 0
    assert main(common + ["--out", str(tmp_path / "nemo"), "--neurons", str(tmp_path / "neurons.json"),
                          "--baseline-run", str(tmp_path / "base")]) == 0  # fmt: skip
    base = {r["id"]: r["predicted_key"] for r in read_rows(tmp_path / "base")}
    nemo = {r["id"]: r["predicted_key"] for r in read_rows(tmp_path / "nemo")}
    assert base.keys() == nemo.keys() and any(abs(base[i] - nemo[i]) > 1e-4 for i in base)
    summary = json.loads((tmp_path / "nemo" / "summary.json").read_text())
    assert [c["delta"] for c in summary["comparison"]] == [0.1, 0.05, 0.005]
    run = json.loads((tmp_path / "nemo" / "run.json").read_text())
    assert run["edits"] and run["edits"][0].startswith("NeuronSet")
    html = (tmp_path / "base" / "report.html").read_text()
    assert "role=test" in html and "chance" in html
    # a finished run is resumed as a no-op; the same folder with a mitigation is refused
    assert main(common + ["--out", str(tmp_path / "base"), "--group-column", "role"]) == 0
    assert main(common + ["--out", str(tmp_path / "base"), "--neurons", str(tmp_path / "neurons.json")]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (
        main(["solidmark", "compare", "--run", str(tmp_path / "nemo"), "--baseline", str(tmp_path / "base")])
        == 0
    )


@pytest.mark.dropin
def test_signature_is_the_stock_one_plus_the_reference(pipes):
    import inspect

    from diffmem.pipelines.pipeline_solidmark_outpaint import FIXED_BY_REFERENCE
    from diffusers import StableDiffusionPipeline

    params = inspect.signature(SolidMarkOutpaintPipeline.__call__).parameters
    stock = set(inspect.signature(StableDiffusionPipeline.__call__).parameters)
    assert stock - set(params) == set(FIXED_BY_REFERENCE)  # only what the reference fixes is left out
    assert {"image", "mask", "paste_reference"} <= set(params)
    assert params["num_inference_steps"].default == 100 and params["guidance_scale"].default == 3.0


@pytest.mark.dropin
def test_return_dict_false_is_the_stock_tuple(pipes):
    call = dict(prompt="a cat", image=_reference(), mask=MASK, num_inference_steps=2, output_type="np")
    out = pipes["sd1"](generator=torch.Generator().manual_seed(0), **call)
    images, nsfw = pipes["sd1"](generator=torch.Generator().manual_seed(0), return_dict=False, **call)
    np.testing.assert_array_equal(images, out.images)
    assert nsfw is None and out.nsfw_content_detected is None and out.mask.shape == MASK.shape
