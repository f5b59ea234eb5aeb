"""Chen et al.'s Bright Ending detector (ICLR 2025, arXiv:2410.21665): the end token's attention as a local mask.

At the last denoising step, a memorized image's pixels still attend strongly to the prompt's end
token (the first end-of-text position after the prompt): the bright ending. Its cross-attention map
``m`` (conditional branch, mean over heads and over the highest-resolution down-block ``attn2`` layers,
``down_blocks.0`` on SD at 512 px; upsampled to the latent by nearest neighbour where it is coarser)
localizes the memorized region, and Wen et al.'s gap is measured inside it:

    score = mean_t || m * (eps(x_t, y) - eps(x_t, empty)) ||_2 / mean(m)

(higher = memorized; a constant mask gives Wen's all-step score exactly). The mask is the raw map, as
in the authors' code: no threshold, no normalisation. It needs the whole guided generation (the mask
comes from its last step), 2 UNet evaluations per step; the code runs two generations, one suffices
since the per-step gaps are kept. :func:`bright_ending_mask` gives the mask for the localized
embedding mitigation.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from diffmem.detectors.base import Detector, register_detector
from diffmem.hooks.attention import cross_attention_layers, cross_attention_probes
from diffmem.hooks.noise import recorded_guidance_gaps

__all__ = ["BrightEndingDetector", "bright_ending_layers", "end_token_positions"]


def bright_ending_layers(unet) -> list[str]:
    """The cross-attention layers of the first down block that has any (the highest resolution with attention)."""

    names = [n for n in cross_attention_layers(unet) if n.startswith("down_blocks.")]
    if not names:
        return cross_attention_layers(unet)[:1]
    first = names[0].split(".")[1]
    return [n for n in names if n.split(".")[1] == first]


def end_token_positions(pipe, prompts: list[str]) -> torch.Tensor:
    """Position of the first end-of-text token of each prompt (tokens counted with BOS and EOS, at most 77)."""
    tokenizer = pipe.tokenizer if getattr(pipe, "tokenizer", None) is not None else pipe.tokenizer_2
    limit = tokenizer.model_max_length
    lengths = [min(len(tokenizer(p, truncation=True, max_length=limit).input_ids), limit) for p in prompts]
    return torch.tensor([n - 1 for n in lengths])


@contextlib.contextmanager
def bright_ending_capture(pipe, prompts: list[str], num_gens: int):
    """Record the per-step noise-prediction gaps and the last step's end-token map while a guided loop runs.

    Yields a dict that holds, after the loop, ``gaps`` (list of ``[n, C, H, W]``) and ``mask``
    (``[n, H, W]`` at latent size).
    """
    ends = end_token_positions(pipe, prompts).repeat_interleave(num_gens)
    state: dict[str, Any] = {"maps": {}}
    v_pred = pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction"

    def record(
        name, probs
    ):  # [2n, H, P, T]: keep the conditional rows' end-token column, overwrite each call
        cond = probs[probs.shape[0] // 2 :]
        idx = ends.to(cond.device).view(-1, 1, 1, 1).expand(-1, cond.shape[1], cond.shape[2], 1)
        state["maps"][name] = cond.gather(3, idx)[..., 0].mean(dim=1)  # [n, P]

    alphas = pipe.scheduler.alphas_cumprod if v_pred else None
    with (
        recorded_guidance_gaps(pipe.unet, alphas) as gaps,
        cross_attention_probes(pipe.unet, bright_ending_layers(pipe.unet), record=record),
    ):
        state["gaps"] = gaps
        yield state
    h, w = state["gaps"][-1].shape[-2:]
    masks = []
    for flat in state["maps"].values():
        side = int(round(flat.shape[1] ** 0.5 * (h / w) ** 0.5))
        grid = flat.view(flat.shape[0], 1, side, flat.shape[1] // side)
        masks.append(torch.nn.functional.interpolate(grid, size=(h, w), mode="nearest")[:, 0])
    state["mask"] = torch.stack(masks).mean(dim=0).cpu()


def masked_gap_score(gaps: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """``mean_t ||m * gap_t|| / mean(m)`` per image."""
    m = mask.unsqueeze(1)
    norms = torch.stack([(m * g).flatten(1).norm(dim=1) for g in gaps], dim=1)
    return norms.mean(dim=1) / m.flatten(1).mean(dim=1).clamp_min(1e-12)


@register_detector
class BrightEndingDetector(Detector):
    """Wen's gap inside the last step's end-token attention map, over the whole generation (Chen et al.)."""

    name = "bright-ending"
    reference = "Chen et al., ICLR 2025"

    def unet_evals(self, num_inference_steps: int) -> float:
        return 2.0 * num_inference_steps

    @torch.no_grad()
    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:
        if settings["guidance_scale"] <= 1:
            raise ValueError("bright-ending: needs classifier-free guidance (guidance_scale > 1)")
        stock = getattr(type(pipe), "stock_pipeline_class", None) or type(
            pipe
        )  # a guarded one wraps a stock class
        with bright_ending_capture(pipe, list(prompts), settings["num_gens"]) as state:
            stock.__call__(
                pipe,
                prompt=list(prompts),
                num_images_per_prompt=settings["num_gens"],
                num_inference_steps=settings["num_inference_steps"],
                guidance_scale=settings["guidance_scale"],
                latents=latents,
                output_type="latent",
            )
        return masked_gap_score(state["gaps"], state["mask"])
