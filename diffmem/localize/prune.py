"""Subspace pruning of memorization: FFN statistics -> Wanda-style selection -> a serialisable ``WeightMask``.

Method (Chavhan et al., "Memorized Images in Diffusion Models share a Subspace that can be Located and
Deleted", arXiv 2406.18566, 2024; scores from Wanda, Sun et al. 2023). For each FFN second linear layer
``l`` (``W ∈ R^{d×4d}``), denoising step ``t`` and prompt set ``Q`` (memorized ``P`` or reference ``B``)::

    a_j^{l,t}(Q)  = sqrt( Σ_{q∈Q} Σ_rows x̂_{rj}^{l,t}(q)² )          (x̂: row-normalised layer input)
    S_ij^{l,t}(Q) = |W_ij| · a_j^{l,t}(Q)
    M_ij^{l,t}    = [j ∈ TopK_k(S_{i,:}^{l,t}(P))] · [S_ij^{l,t}(P) > S_ij^{l,t}(B)],   k = floor(ρ·d_in)
    M^l           = [ Σ_{t<τ} M^{l,t} > s·τ ]                          (s = 0: the union over the first τ steps)

then ``W ← W ⊙ (1 − M)``. Defaults are the reference's: ρ = 0.01, τ = 10, s = 0, no per-layer cap.
Statistics come from :mod:`diffmem.hooks.ffn` (on the device, fp32); the selection is a pure function.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffmem.edits import WeightMask
from diffmem.fingerprint import model_fingerprint
from diffmem.generation import initial_latents
from diffmem.hooks.ffn import StepCounter, ffn_layers, record_ffn_input_norms
from diffmem.modelio import model_resolution
from diffmem.precision import dtype_name
from diffmem.saved import SavedObject

#: The ``format`` of format-1 statistics files (before :class:`~diffmem.saved.SavedObject`), read as legacy.
STATS_FORMAT = "diffmem.ffn_stats/1"


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class FFNStats(SavedObject):
    """Per-step column statistics of FFN inputs over a prompt set: ``sumsq[layer]`` is ``[T, d_in]`` float32.

    ``norms()`` gives ``a = sqrt(sumsq)`` (root-sum-of-squares over prompts and rows). Saved by
    :class:`~diffmem.saved.SavedObject` (``save(x.safetensors)`` or ``save_pretrained(folder)``);
    format-1 files still load.
    """

    config_name: ClassVar[str] = "ffn_stats_config.json"
    weights_name: ClassVar[str] = "ffn_stats.safetensors"
    format_version: ClassVar[int] = 2

    sumsq: dict[str, torch.Tensor]
    num_prompts: int
    settings: dict[str, Any] = field(default_factory=dict)

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: s.clamp_min(0).sqrt() for name, s in self.sumsq.items()}

    @property
    def num_steps(self) -> int:
        return next(iter(self.sumsq.values())).shape[0]

    # ----------------------------------------------------------------------------------- files
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"num_prompts": self.num_prompts, "settings": self.settings, "layers": list(self.sumsq)}
        return config, {k: v.detach().cpu() for k, v in self.sumsq.items()}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> FFNStats:
        missing = [name for name in config["layers"] if name not in tensors]
        if missing:
            raise ValueError(f"{source}: no statistics for layer(s) {', '.join(missing)} among its tensors")
        sumsq = {name: tensors[name] for name in config["layers"]}
        return cls(sumsq, int(config["num_prompts"]), dict(config.get("settings") or {}))

    @classmethod
    def _from_legacy(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> FFNStats:
        """Format 1: a .safetensors with ``format``, ``num_prompts`` and ``settings`` (JSON) as metadata."""
        if config.get("format") != STATS_FORMAT:
            raise ValueError(f"{source}: not a diffmem FFN statistics file (format {config.get('format')!r})")
        try:
            settings = json.loads(config.get("settings", "{}"))
            return cls(dict(tensors), int(config["num_prompts"]), settings)
        except (json.JSONDecodeError, KeyError, ValueError) as err:
            raise ValueError(f"{source}: unreadable FFN statistics metadata ({err!r})") from None


def collect_ffn_stats(
    pipe,
    prompts: Sequence[str],
    *,
    num_steps: int = 10,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    cond_only: bool = False,
    row_normalize: bool = True,
    seed: int = 0,
    batch_size: int = 4,
    blocks: Sequence[str] = ("down", "mid", "up"),
    progress: bool = True,
    **pipe_kwargs,
) -> FFNStats:
    """Run ``pipe`` on ``prompts`` and accumulate FFN input statistics of the first ``num_steps`` steps.

    Prompt ``i`` starts from the noise of ``item_generator(seed, i)`` (``generation.initial_latents``)
    whatever the batch, so the memorized and the reference set share their starting noises pairwise and
    the result does not depend on ``batch_size``. The pipeline is interrupted after ``num_steps`` steps (their statistics are all
    that is used), and the statistics stay on the device in float32.
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ValueError("collect_ffn_stats: no prompts")
    if num_steps > num_inference_steps:
        raise ValueError(f"num_steps ({num_steps}) exceeds num_inference_steps ({num_inference_steps})")
    unet = pipe.unet
    layers = ffn_layers(unet, blocks)
    device = pipe._execution_device
    steps = StepCounter(stop_after=num_steps)
    cfg = guidance_scale > 1.0
    total: dict[str, torch.Tensor] | None = None
    bar = tqdm(total=len(prompts), desc="FFN statistics", unit="prompt", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        # prompt i starts from item_generator(seed, i)'s noise, drawn by the one function that draws noise
        latents = initial_latents(
            pipe, range(start, start + len(batch)), 1, seed, pipe_kwargs.get("height"), pipe_kwargs.get("width"),
            noise_key=lambda i, _j: (seed, i),
        )  # fmt: skip
        steps.reset()
        with record_ffn_input_norms(
            layers, steps, num_steps, row_normalize=row_normalize, cond_only=cond_only and cfg, root=unet
        ) as rec:
            pipe(
                batch,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                latents=latents.to(device=device, dtype=unet.dtype),
                output_type="latent",
                callback_on_step_end=steps.callback,
                **pipe_kwargs,
            )
        pipe._interrupt = False
        if total is None:
            total = rec.sumsq
        else:
            for name in total:
                total[name] += rec.sumsq[name]
        bar.update(len(batch))
    bar.close()
    settings = {
        "num_steps": num_steps,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "cond_only": cond_only,
        "row_normalize": row_normalize,
        "seed": seed,
        "scheduler": type(pipe.scheduler).__name__,
        "resolution": list(model_resolution(pipe, pipe_kwargs.get("height"), pipe_kwargs.get("width"))),
        "dtype": dtype_name(pipe.unet.dtype),
    }
    return FFNStats(total, len(prompts), settings)


# ------------------------------------------------------------------------------------------ selection


def select_memorization_weights(
    weights: Mapping[str, torch.Tensor],
    memorized: FFNStats,
    reference: FFNStats,
    *,
    ratio: float = 0.01,
    tau: int = 10,
    select_ratio: float = 0.0,
    max_layer_fraction: float | None = None,
) -> dict[str, torch.Tensor]:
    """Wanda-style memorization masks (formula in the module docstring); name -> bool ``[d_out, d_in]``.

    ``weights``: name -> ``W`` ``[d_out, d_in]`` of each FFN layer. For steps ``t < tau``: keep the
    ``floor(ratio·d_in)`` largest ``|W_ij|·a_j(P)`` of each row ``i`` where ``a_j(P) > a_j(B)``; a weight
    is pruned when it is kept in more than ``select_ratio·tau`` steps. ``max_layer_fraction`` caps each
    layer's pruned fraction, keeping the weights selected in the most steps (ties: highest summed score).
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if tau < 1 or tau > memorized.num_steps or tau > reference.num_steps:
        raise ValueError(
            f"tau={tau} needs statistics of at least tau steps (memorized: {memorized.num_steps}, "
            f"reference: {reference.num_steps})"
        )
    if max_layer_fraction is not None and not 0 <= max_layer_fraction <= 1:
        raise ValueError(f"max_layer_fraction must be in [0, 1], got {max_layer_fraction}")
    norms_p, norms_b = memorized.norms(), reference.norms()
    masks: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        if name not in norms_p or name not in norms_b:
            raise KeyError(f"no statistics for layer {name!r}")
        w = weight.detach().abs().float()
        a_p = norms_p[name].to(w.device)
        a_b = norms_b[name].to(w.device)
        d_out, d_in = w.shape
        k = math.floor(ratio * d_in)
        count = torch.zeros(d_out, d_in, dtype=torch.int32, device=w.device)
        priority = torch.zeros(d_out, d_in, dtype=torch.float32, device=w.device)
        if k > 0:
            for t in range(tau):
                score = w * a_p[t]
                top = torch.zeros(d_out, d_in, dtype=torch.bool, device=w.device)
                top.scatter_(1, score.topk(k, dim=1).indices, True)
                sel = top & (a_p[t] > a_b[t]).unsqueeze(0)
                count += sel.int()
                priority += score * sel
        mask = count > select_ratio * tau
        if max_layer_fraction is not None:
            limit = math.floor(max_layer_fraction * mask.numel())
            if int(mask.sum()) > limit:
                key = count.float() + priority / (priority.max() * 1.001 + 1e-30)
                key = torch.where(mask, key, torch.full_like(key, -1.0))
                keep = key.flatten().topk(limit).indices
                mask = torch.zeros(mask.numel(), dtype=torch.bool, device=w.device)
                mask[keep] = True
                mask = mask.view(d_out, d_in)
        masks[name] = mask.cpu()
    return masks


def find_weight_mask(
    pipe,
    memorized_prompts: Sequence[str],
    reference_prompts: Sequence[str] | None = None,
    *,
    ratio: float = 0.01,
    tau: int = 10,
    select_ratio: float = 0.0,
    max_layer_fraction: float | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    cond_only: bool = False,
    seed: int = 0,
    batch_size: int = 4,
    blocks: Sequence[str] = ("down", "mid", "up"),
    progress: bool = True,
    **pipe_kwargs,
) -> tuple[WeightMask, FFNStats, FFNStats]:
    """Statistics over memorized and reference prompts, then :func:`select_memorization_weights`.

    ``reference_prompts`` defaults to the reference's base set: the empty prompt, as many times as
    there are memorized prompts. Returns the mask and both statistics.
    """

    if reference_prompts is None:
        reference_prompts = [""] * len(memorized_prompts)
    common = dict(
        num_steps=tau,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        cond_only=cond_only,
        seed=seed,
        batch_size=batch_size,
        blocks=blocks,
        progress=progress,
        **pipe_kwargs,
    )
    mem = collect_ffn_stats(pipe, memorized_prompts, **common)
    ref = collect_ffn_stats(pipe, reference_prompts, **common)
    layers = ffn_layers(pipe.unet, blocks)
    masks = select_memorization_weights(
        {n: m.weight for n, m in layers.items()},
        mem,
        ref,
        ratio=ratio,
        tau=tau,
        select_ratio=select_ratio,
        max_layer_fraction=max_layer_fraction,
    )
    params = {
        "method": "wanda-memorization (Chavhan et al. 2024)",
        "ratio": ratio,
        "tau": tau,
        "select_ratio": select_ratio,
        "max_layer_fraction": max_layer_fraction,
        "num_memorized_prompts": len(memorized_prompts),
        "num_reference_prompts": len(reference_prompts),
        **mem.settings,
    }
    return WeightMask(masks, model_fingerprint(pipe.unet), params), mem, ref
