"""Prompt-side mitigations for SolidMark runs: anything that changes the text conditioning of a call.

A *prompt mitigation* is a callable ``(pipe, prompts, generators) -> dict`` of extra pipeline call
arguments (``prompt_embeds`` / ``negative_prompt_embeds``) that replace the prompts; UNet-side
mitigations (NeMo neurons, pruning masks) are edits (see :func:`diffmem.solidmark.scoring.edits_applied`).
The reference code computed its Gaussian-noise mitigation and never passed it to the pipeline, so
its "mitigated" rows were baseline reruns; here the returned embeddings are what the pipeline uses,
and the tests check that they change the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffmem.seeding import item_generator

PromptMitigation = Callable[[object, Sequence[str], Sequence[torch.Generator]], dict]


def gaussian_embedding_noise(sigma: float) -> PromptMitigation:
    """GNI (Somepalli et al. 2023, as evaluated by SolidMark): ``e <- e + sigma * N(0, I)`` on the conditional
    text embedding, the noise drawn from each image's own generator seed (independent of the batch)."""
    if sigma < 0:
        raise ValueError(f"--gni must be >= 0, got {sigma}")

    def mitigate(pipe, prompts, generators):
        cond, uncond = pipe.encode_prompt(
            list(prompts), pipe._execution_device, 1, True, negative_prompt=None
        )
        noise = torch.stack(
            [
                torch.randn(
                    cond.shape[1:], generator=item_generator(g.initial_seed(), "gni"), dtype=torch.float32
                )
                for g in generators
            ]
        ).to(cond)
        return {"prompt_embeds": cond + sigma * noise, "negative_prompt_embeds": uncond}

    mitigate.__name__ = f"gaussian_embedding_noise(sigma={sigma})"
    return mitigate
