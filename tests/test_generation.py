"""The one seeded generation loop: an image depends on its prompt's id, its generation index and the seed,
never on the batch size, the order of the prompts or which call made it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler

from diffmem.generation import generate, generate_batches, initial_latents
from diffmem.guard.auto import load_guarded
from diffmem.seeding import item_generator

PROMPTS = ["a red circle", "a blue square", "a green star"]
SETTINGS = dict(num_inference_steps=2, guidance_scale=7.5)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_dir):
    return load_guarded(tiny_sd1_dir)


def test_initial_latents_are_drawn_from_item_and_generation(pipe):
    latents = initial_latents(pipe, ["a", "b"], 2, seed=3)
    size = pipe.unet.config.sample_size
    assert latents.shape == (4, pipe.unet.config.in_channels, size, size)
    expected = torch.randn((1, *latents.shape[1:]), generator=item_generator(3, "b", 1))
    assert torch.equal(latents[3:4], expected)  # item-major: row 3 is item "b", generation 1
    assert not torch.equal(latents[0], latents[1])
    # a study keyed otherwise (the robustness evaluation: seed s of caption i from (s, stream, i))
    keyed = initial_latents(
        pipe, [(0, 5), (1, 7)], 1, seed=0, noise_key=lambda item, j: (item[1], "held", item[0])
    )
    assert torch.equal(
        keyed[1:2], torch.randn((1, *latents.shape[1:]), generator=item_generator(7, "held", 1))
    )


def test_a_noise_key_gives_what_the_pipeline_draws_from_that_generator(pipe):
    """Handing the pipeline the keyed latents is the same as handing it the keyed generator."""
    keyed, _ = generate(pipe, ["a red circle"], item_ids=[0], noise_key=lambda i, j: (9, "s", i), **SETTINGS)
    direct = pipe("a red circle", generator=item_generator(9, "s", 0), output_type="np", **SETTINGS).images
    np.testing.assert_array_equal(keyed, direct)


def test_images_do_not_depend_on_batch_size_or_order(pipe):
    one_by_one, _ = generate(pipe, PROMPTS, item_ids=PROMPTS, num_gens=2, batch_size=1, **SETTINGS)
    together, batches = generate(pipe, PROMPTS, item_ids=PROMPTS, num_gens=2, batch_size=3, **SETTINGS)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    assert one_by_one.shape[0] == 6 and len(batches) == 1
    reversed_, _ = generate(pipe, PROMPTS[::-1], item_ids=PROMPTS[::-1], num_gens=2, batch_size=2, **SETTINGS)
    np.testing.assert_allclose(reversed_.reshape(3, 2, *reversed_.shape[1:])[::-1].reshape(one_by_one.shape),
                               one_by_one, atol=1e-5)  # fmt: skip


def test_a_stochastic_sampler_draws_its_step_noise_from_the_keyed_generators(tiny_sd1_dir):
    """Euler ancestral adds fresh noise at every step: it comes from the same keyed generators as the
    latents, so images still depend on (seed, id, generation) only, not on the batch or global RNG."""
    stochastic = load_guarded(tiny_sd1_dir)
    stochastic.scheduler = EulerAncestralDiscreteScheduler.from_config(stochastic.scheduler.config)
    torch.manual_seed(1)
    one_by_one, _ = generate(stochastic, PROMPTS[:2], num_gens=2, batch_size=1, **SETTINGS)
    torch.manual_seed(2)
    together, _ = generate(stochastic, PROMPTS[:2], num_gens=2, batch_size=2, **SETTINGS)
    np.testing.assert_allclose(one_by_one, together, atol=1e-5)
    direct = stochastic(PROMPTS[1], generator=item_generator(0, 1, 1), output_type="np", **SETTINGS).images
    np.testing.assert_allclose(together[3:4], direct, atol=1e-5)


def test_same_noise_as_a_direct_pipeline_call(pipe):
    images, _ = generate(pipe, PROMPTS[:1], item_ids=["x"], num_gens=2, seed=5, **SETTINGS)
    direct = pipe(
        PROMPTS[:1],
        num_images_per_prompt=2,
        latents=initial_latents(pipe, ["x"], 2, 5),
        output_type="np",
        **SETTINGS,
    ).images
    np.testing.assert_allclose(images, np.asarray(direct, dtype=np.float32), atol=1e-6)


def test_batches_carry_the_guard_output_and_restore_the_progress_bar(pipe):
    pipe.set_progress_bar_config(desc="mine")
    batches = list(generate_batches(pipe, PROMPTS, num_gens=1, batch_size=2, **SETTINGS))
    assert [b.start for b in batches] == [0, 2] and [len(b.prompts) for b in batches] == [2, 1]
    assert all(len(b.output.memorization_scores) == len(b.prompts) for b in batches)
    assert pipe._progress_bar_config == {"desc": "mine"}


def test_bad_arguments_name_the_argument(pipe):
    with pytest.raises(ValueError, match="item_ids: 1 ids for 3 prompts"):
        generate(pipe, PROMPTS, item_ids=["a"], **SETTINGS)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 1"):
        generate(pipe, PROMPTS, batch_size=0, **SETTINGS)
