"""Prompt-side mitigations for SolidMark runs: anything that changes the text conditioning of a call.

A *prompt mitigation* is a callable ``(pipe, prompts, noise_keys) -> dict`` of extra pipeline call
arguments (``prompt_embeds`` / ``negative_prompt_embeds``) that replace the prompts; UNet-side
mitigations (NeMo neurons, pruning masks) are edits (see :func:`diffmem.solidmark.scoring.edits_applied`).
``noise_keys[b]`` is ``(seed, image id, generation)`` of the outpainted image ``b``
(:mod:`diffmem.solidmark.scoring`): a mitigation that draws noise keys it by them, through the one keyed
draw :func:`diffmem.generation.keyed_noise`, so it does not depend on the batch either.
The reference code computed its Gaussian-noise mitigation and never passed it to the pipeline, so
its "mitigated" rows were baseline reruns; here the returned embeddings are what the pipeline uses,
and the tests check that they change the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from diffmem.generation import keyed_noise
from diffmem.seeding import derive_seed

PromptMitigation = Callable[[object, Sequence[str], Sequence[tuple]], dict]


def gaussian_embedding_noise(sigma: float) -> PromptMitigation:
    """GNI (Somepalli et al. 2023, as evaluated by SolidMark): ``e <- e + sigma * N(0, I)`` on the conditional
    text embedding, the noise of image ``b`` keyed ``(derive_seed(*noise_keys[b]), "gni")`` (independent of
    the batch; the seed of its outpainting noise, then "gni")."""
    if sigma < 0:
        raise ValueError(f"--gni must be >= 0, got {sigma}")

    def mitigate(pipe, prompts, noise_keys):
        cond, uncond = pipe.encode_prompt(
            list(prompts), pipe._execution_device, 1, True, negative_prompt=None
        )
        noise, _ = keyed_noise(cond.shape[1:], [(derive_seed(*key), "gni") for key in noise_keys])
        noise = noise.to(cond)
        return {"prompt_embeds": cond + sigma * noise, "negative_prompt_embeds": uncond}

    mitigate.__name__ = f"gaussian_embedding_noise(sigma={sigma})"
    return mitigate
