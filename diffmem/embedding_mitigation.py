"""Inference-time mitigation by prompt-embedding optimisation (Wen et al., ICLR 2024, arXiv:2407.21720).

A memorized prompt makes the text-conditional noise prediction far from the unconditional one.
Before generating, the conditional embedding ``e`` is adjusted to shrink that gap at the first step:

    L(e) = || eps(x_T, t_0, e) - eps(x_T, t_0, e_empty) ||_2      (one norm over the whole batch of latents)

minimised with AdamW (lr 0.05, at most 10 iterations), stopping as soon as ``L <= target_loss``
(checked before each update); the gradient of the first (BOS) token is zeroed, the other positions
(padding included) are free (the BOS row is also reset after each step, since AdamW's weight decay
would otherwise shrink it); the unconditional embedding and the UNet stay fixed. The same ``x_T``
is then used for the full generation with ``prompt_embeds = e``.

Differences from the authors' code (kept deliberately): float32 instead of bf16; the UNet's weights
never receive gradients (they are frozen for the call and restored); ``target_loss`` must be given on
the model's own scale (the code's 3.0 is calibrated on SD-1.4 with 4 latents of 4x64x64; use
``target_loss_from_threshold`` for another model). The optional distance regulariser of the code is
off there by default and not implemented here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

#: Wen et al.'s target for SD-1.4 (batch norm over 4 latents of 4x64x64).
SD14_TARGET_LOSS = 3.0


@dataclass
class EmbeddingMitigationResult:
    """Optimised conditional embeddings and the loss before each update (the last entry is the final loss)."""

    prompt_embeds: torch.Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def iterations(self) -> int:
        return max(0, len(self.losses) - 1)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Parameters of ``module`` do not require gradients inside the block; their flags are restored after."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def target_loss_from_threshold(threshold: float, n_latents: int) -> float:
    """A batch-norm target equivalent to a per-image noise-gap ``threshold``: ``threshold * sqrt(n_latents)``."""
    return float(threshold) * float(n_latents) ** 0.5


def optimize_prompt_embeds(
    unet: nn.Module,
    scheduler,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    latents: torch.Tensor,
    *,
    target_loss: float | None = SD14_TARGET_LOSS,
    lr: float = 0.05,
    iterations: int = 10,
    timestep: torch.Tensor | int | None = None,
    freeze_bos: bool = True,
    unet_kwargs: dict | None = None,
    negative_unet_kwargs: dict | None = None,
    loss_mask: torch.Tensor | None = None,
) -> EmbeddingMitigationResult:
    """Minimise the first-step noise gap ``L(e)`` over the conditional embedding (Wen et al.'s mitigation).

    ``prompt_embeds`` / ``negative_prompt_embeds``: ``[1, tokens, dim]`` (or one per latent);
    ``latents``: the initial ``x_T`` of the images to generate (``[n, C, H, W]``, already scaled by the
    scheduler's ``init_noise_sigma``); ``timestep``: default the scheduler's first timestep (set
    ``scheduler.set_timesteps`` beforehand); ``unet_kwargs`` / ``negative_unet_kwargs``: extra
    arguments of the conditional / unconditional UNet calls (SDXL's ``added_cond_kwargs``, one row
    per latent); ``loss_mask`` ``[n, H, W]``: the loss becomes ``||m (eps_c - eps_u)|| / mean(m)`` (Chen
    et al.'s Bright-Ending-localized variant). Returns embeddings of the input's shape and dtype.
    """
    n = latents.shape[0]
    if timestep is None:
        timestep = scheduler.timesteps[0]
    dtype = prompt_embeds.dtype
    x = scheduler.scale_model_input(latents, timestep).detach()
    param_dtype = next(unet.parameters()).dtype

    def expand(e: torch.Tensor) -> torch.Tensor:
        return e.expand(n, -1, -1) if e.shape[0] == 1 else e

    with torch.no_grad():
        uncond = unet(
            x,
            timestep,
            encoder_hidden_states=expand(negative_prompt_embeds).to(param_dtype),
            **(negative_unet_kwargs or {}),
        ).sample.float()
    e = prompt_embeds.detach().float().clone().requires_grad_(True)
    bos = e[:, 0].detach().clone()
    optim = torch.optim.AdamW([e], lr=lr)
    losses: list[float] = []
    with frozen(unet), torch.enable_grad():
        for it in range(iterations + 1):
            cond = unet(
                x, timestep, encoder_hidden_states=expand(e).to(param_dtype), **(unet_kwargs or {})
            ).sample.float()
            if loss_mask is None:
                loss = torch.linalg.vector_norm(cond - uncond)
            else:
                m = loss_mask.to(cond.device, cond.dtype).unsqueeze(1)
                loss = torch.linalg.vector_norm(m * (cond - uncond)) / m.mean().clamp_min(1e-12)
            losses.append(float(loss.detach()))
            if (target_loss is not None and losses[-1] <= target_loss) or it == iterations:
                break
            optim.zero_grad(set_to_none=True)
            loss.backward()
            if freeze_bos:
                e.grad[:, 0] = 0
            optim.step()
            if freeze_bos:  # AdamW's weight decay would still shrink it
                with torch.no_grad():
                    e[:, 0] = bos
    return EmbeddingMitigationResult(prompt_embeds=e.detach().to(dtype), losses=losses)
