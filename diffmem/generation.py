"""The one seeded generation loop: every evaluation, scan, objective and benchmark generates through here.

Generation ``j`` of the prompt with id ``i`` starts from the noise of
``diffmem.seeding.item_generator(seed, i, j)`` (:func:`initial_latents`), so an image depends on its
prompt's id, its generation index and the seed only: not on the batch size, the order of the prompts or
the number of processes a job is split over. The loop calls any Stable Diffusion pipeline (stock or
guarded) with any of its options and hands back each batch's images with the pipeline's own output (the
guard's scores, flags and mitigation records).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.seeding import item_generator

__all__ = [
    "GeneratedBatch",
    "NoiseKey",
    "generate",
    "generate_batches",
    "initial_latents",
    "keyed_noise",
    "latent_shape",
    "noise_keys",
]

#: ``noise_key(item_id, j) -> (base_seed, *keys)``: the key of generation ``j`` of an item, whose noise is
#: drawn from ``item_generator(base_seed, *keys)``. The default is ``(seed, item_id, j)``; a study that
#: keys its noise otherwise (e.g. the robustness evaluation's ``(seed_j, stream, i)``) passes its own.
NoiseKey = Callable[[Hashable, int], tuple]


def keyed_noise(shape: Sequence[int], keys: Sequence[tuple]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The one keyed noise draw: row ``k`` of the standard normal ``[len(keys), *shape]`` is the first draw
    of ``diffmem.seeding.item_generator(*keys[k])``, on the CPU in float32.

    The generators, left just after that draw, come back too: a diffusers pipeline given them as its
    per-image ``generator`` (with the noise as ``latents``) draws a stochastic sampler's step noise
    exactly as it would had it drawn the initial noise from them itself.
    """
    generators = [item_generator(*key) for key in keys]
    if not generators:
        return torch.empty((0, *shape)), generators
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]), generators


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    """``(C, h, w)`` of one image's latents in ``pipe`` at ``height x width`` pixels (default: the UNet's
    sample size times the VAE factor)."""
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    return (pipe.unet.config.in_channels, height // scale, width // scale)


def initial_latents(
    pipe,
    item_ids: Sequence,
    num_gens: int,
    seed: int,
    height: int | None = None,
    width: int | None = None,
    noise_key: NoiseKey | None = None,
) -> torch.Tensor:
    """Starting noise ``[len(item_ids) * num_gens, C, h, w]`` (item-major), generation j of item i from
    ``diffmem.seeding.item_generator(seed, item_id, j)`` (or ``item_generator(*noise_key(item_id, j))``),
    drawn on the CPU (:func:`keyed_noise`): independent of batch size, order and device."""
    noise, _ = keyed_noise(latent_shape(pipe, height, width), noise_keys(item_ids, num_gens, seed, noise_key))
    return noise


def noise_keys(
    item_ids: Sequence, num_gens: int, seed: int, noise_key: NoiseKey | None = None
) -> list[tuple]:
    """The noise keys of ``num_gens`` generations of each item, item-major: ``(seed, item_id, j)`` or
    ``noise_key(item_id, j)``."""
    key = noise_key or (lambda i, j: (seed, i, j))
    return [key(i, j) for i in item_ids for j in range(num_gens)]


@dataclass
class GeneratedBatch:
    """One batch of :func:`generate_batches`: prompts ``start:start + len(prompts)`` of the call."""

    start: int
    prompts: list[str]
    item_ids: list
    num_gens: int
    images: Any  # the pipeline's ``images`` (an ``[n * num_gens, H, W, 3]`` float array for output_type "np")
    output: Any  # the pipeline's whole output (the guarded pipeline's scores, flags, mitigation records)
    seconds: float  # wall time of the pipeline call


def generate_batches(
    pipe,
    prompts: Sequence[str],
    *,
    item_ids: Sequence | None = None,
    num_gens: int = 1,
    seed: int = 0,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "np",
    progress: bool = False,
    desc: str = "generating",
    noise_key: NoiseKey | None = None,
    **call_kwargs,
) -> Iterator[GeneratedBatch]:
    """Generate ``num_gens`` images of each prompt, ``batch_size`` prompts per pipeline call, yielding each
    batch as it is done.

    ``item_ids`` (default: the prompts' positions) seed the noise (:func:`initial_latents`, keyed by
    ``noise_key`` where given), and a stochastic sampler's step noise continues from the same generators
    (:func:`keyed_noise`), so it too is independent of batch size and global random state; the other
    keywords go to the pipeline call (``num_inference_steps``, ``guidance_scale``, ``mitigation``, ...).
    The pipeline's own progress bar is off during the loop (``progress`` shows one over the prompts).
    """
    ids = list(range(len(prompts))) if item_ids is None else list(item_ids)
    if len(ids) != len(prompts):
        raise ValueError(f"item_ids: {len(ids)} ids for {len(prompts)} prompts (expected one per prompt)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
            for b in range(0, len(prompts), batch_size):
                chunk, chunk_ids = list(prompts[b : b + batch_size]), ids[b : b + batch_size]
                latents, generators = keyed_noise(
                    latent_shape(pipe, height, width), noise_keys(chunk_ids, num_gens, seed, noise_key)
                )
                start = time.perf_counter()
                with torch.no_grad():
                    out = pipe(
                        chunk,
                        num_images_per_prompt=num_gens,
                        latents=latents.to(device=pipe._execution_device, dtype=pipe.unet.dtype),
                        generator=generators,  # a stochastic sampler's step noise, keyed like the latents
                        height=height,
                        width=width,
                        output_type=output_type,
                        **call_kwargs,
                    )
                seconds = time.perf_counter() - start
                yield GeneratedBatch(b, chunk, chunk_ids, num_gens, out.images, out, seconds)
                bar.update(len(chunk))
    finally:
        pipe._progress_bar_config = old_bar


def generate(pipe, prompts: Sequence[str], **kwargs) -> tuple[np.ndarray, list[GeneratedBatch]]:
    """All images of :func:`generate_batches` as one ``[len(prompts) * num_gens, H, W, 3]`` float32 array
    in [0, 1] (prompt-major), and the batches (their pipeline outputs and times)."""
    batches = list(generate_batches(pipe, prompts, **kwargs))
    if not batches:
        raise ValueError("prompts: expected at least one prompt")
    return np.concatenate([np.asarray(b.images, dtype=np.float32) for b in batches]), batches
