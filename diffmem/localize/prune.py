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
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffmem.edit import Edit, FingerprintMismatchError
from diffmem.hooks.ffn import StepCounter, ffn_layers, record_ffn_input_norms

FORMAT = "diffmem.weight_mask/1"
STATS_FORMAT = "diffmem.ffn_stats/1"


# ------------------------------------------------------------------------------------------ statistics


@dataclass
class FFNStats:
    """Per-step column statistics of FFN inputs over a prompt set: ``sumsq[layer]`` is ``[T, d_in]`` float32.

    ``norms()`` gives ``a = sqrt(sumsq)`` (root-sum-of-squares over prompts and rows).
    """

    sumsq: dict[str, torch.Tensor]
    num_prompts: int
    settings: dict[str, Any] = field(default_factory=dict)

    def norms(self) -> dict[str, torch.Tensor]:
        return {name: s.clamp_min(0).sqrt() for name, s in self.sumsq.items()}

    @property
    def num_steps(self) -> int:
        return next(iter(self.sumsq.values())).shape[0]

    def save(self, path: str | os.PathLike) -> Path:
        from diffmem.io import atomic_save_tensors

        meta = {
            "format": STATS_FORMAT,
            "num_prompts": str(self.num_prompts),
            "settings": json.dumps(self.settings),
        }
        return atomic_save_tensors(path, {k: v.detach().cpu() for k, v in self.sumsq.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> FFNStats:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATS_FORMAT:
                raise ValueError(f"{path}: not a diffmem FFN statistics file (format {meta.get('format')!r})")
            sumsq = {k: f.get_tensor(k) for k in f.keys()}
        return cls(sumsq, int(meta["num_prompts"]), json.loads(meta.get("settings", "{}")))


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

    Prompt ``i`` gets the generator ``item_generator(seed, i)`` whatever the batch, so the memorized and
    the reference set share their starting noises pairwise and the result does not depend on
    ``batch_size``. The pipeline is interrupted after ``num_steps`` steps (their statistics are all
    that is used), and the statistics stay on the device in float32.
    """
    from tqdm.auto import tqdm

    from diffmem.modelio import model_resolution
    from diffmem.precision import dtype_name
    from diffmem.seeding import item_generator

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
        gens = [item_generator(seed, i, device=device) for i in range(start, start + len(batch))]
        steps.reset()
        with record_ffn_input_norms(
            layers, steps, num_steps, row_normalize=row_normalize, cond_only=cond_only and cfg, root=unet
        ) as rec:
            pipe(
                batch,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=gens,
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


# ------------------------------------------------------------------------------------------ WeightMask


@dataclass
class WeightMask(Edit):
    """Which weights of which layers are pruned: ``masks[layer]`` is bool ``[d_out, d_in]``, True = zeroed.

    Layer names are module names in the UNet, e.g.
    ``up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``; ``fingerprint`` ties the mask to the
    model it was found on (:func:`diffmem.modelio.model_fingerprint`, unchanged by the edit itself).
    It is an edit in the sense of :mod:`diffmem.edit` (``validate``, ``weight_multipliers``,
    ``to_dict``), so ``diffmem.edit.applied`` / ``apply_permanently`` / ``save_edited`` take it like a
    ``NeuronSet``. Saved as safetensors (bool tensors, settings in the metadata): no pickle.
    """

    masks: dict[str, torch.Tensor]
    fingerprint: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def pruned_fraction(self) -> dict[str, float]:
        """Fraction of each layer's weights that the mask zeroes."""
        return {name: float(m.float().mean()) for name, m in self.masks.items()}

    def num_pruned(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def num_weights(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def union(self, other: WeightMask) -> WeightMask:
        """The element-wise OR of two masks (same model required)."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise FingerprintMismatchError(
                f"cannot unite WeightMasks of different models ({self.fingerprint} and {other.fingerprint})"
            )
        masks = {n: m.clone() for n, m in self.masks.items()}
        for n, m in other.masks.items():
            masks[n] = masks[n] | m if n in masks else m.clone()
        return WeightMask(
            masks, self.fingerprint or other.fingerprint, {"union_of": [self.params, other.params]}
        )

    # ----------------------------------------------------------------------------------- the edit protocol
    def validate(self, unet: nn.Module) -> dict[str, nn.Linear]:
        """Check the mask fits ``unet`` (fingerprint, layer names, shapes); returns name -> layer.

        Raises :class:`~diffmem.edit.FingerprintMismatchError` for another model and
        ``ValueError`` naming the layer for a missing layer or a shape mismatch.
        """
        from diffmem.modelio import check_fingerprint

        check_fingerprint(self.fingerprint, unet, "this WeightMask", "run diffmem prune on this model")
        modules = dict(unet.named_modules())
        layers = {}
        for name, mask in self.masks.items():
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"WeightMask: the model has no linear layer {name!r}")
            if tuple(layer.weight.shape) != tuple(mask.shape):
                raise ValueError(
                    f"WeightMask: layer {name} has weight {tuple(layer.weight.shape)}, the mask {tuple(mask.shape)}"
                )
            layers[name] = layer
        return layers

    def weight_multipliers(self, unet: nn.Module, factor: float = 0.0) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> multiplier: ``factor`` at masked weights (0 = pruned), 1 elsewhere; biases untouched."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        for name, layer in self.validate(unet).items():
            mask = self.masks[name].to(layer.weight.device)
            out[layer.weight] = torch.where(mask, torch.tensor(float(factor)), torch.tensor(1.0)).to(
                layer.weight.dtype
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (the masks themselves go to the safetensors file, :meth:`save`)."""
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "num_pruned": self.num_pruned(),
            "num_weights": self.num_weights(),
            "pruned_fraction": self.pruned_fraction(),
            "params": self.params,
        }

    # ----------------------------------------------------------------------------------- files
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"fingerprint": self.fingerprint, "params": self.params, "layers": list(self.masks)}
        return config, {n: m.detach().cpu().bool() for n, m in self.masks.items()}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> WeightMask:
        layers = config.get("layers", list(tensors))
        missing = [name for name in layers if name not in tensors]
        if missing:
            raise ValueError(f"{source}: no mask for layer(s) {', '.join(missing)} in {cls.weights_name}")
        masks = {name: tensors[name].bool() for name in layers}
        return cls(masks, config.get("fingerprint") or None, dict(config.get("params") or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as one .safetensors file (the format ``diffmem prune`` writes)."""
        from diffmem.io import atomic_save_tensors

        meta = {"format": FORMAT, "fingerprint": self.fingerprint or "", "params": json.dumps(self.params)}
        return atomic_save_tensors(path, {n: m.detach().cpu().bool() for n, m in self.masks.items()}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, argument: str = "--mask") -> WeightMask:
        from diffmem.io import load_checked_safetensors

        tensors, meta = load_checked_safetensors(
            path,
            format=FORMAT,
            what="a diffmem WeightMask",
            argument=argument,
            missing_hint="expected a WeightMask .safetensors file",
        )
        masks = {k: t.bool() for k, t in tensors.items()}
        return cls(masks, meta.get("fingerprint") or None, json.loads(meta.get("params", "{}")))


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
    from diffmem.modelio import model_fingerprint

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
