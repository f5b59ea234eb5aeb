"""GUARD: Guidance Using Attractive-Repulsive Dynamics (Zhao, Triantafillou & Triantafillou, ICML 2026,
arXiv 2603.00133), its CA-in-GUARD instance, as an inference-time mitigation.

For each flagged image, at every step, the guided prediction is

    g = u + s (p - u) - r_t (c - u)

with ``u`` the unconditional (negative-prompt) prediction, ``c`` the prompt's stock conditional prediction
(the repulsive target: the memorized direction), ``s`` the call's guidance scale and ``p`` the attractive
target: the same prompt with its cross-attention spikes attenuated. ``p`` comes from one more UNet pass on
the flagged rows, in which every ``attn2`` of the chosen layers (default: the down and mid blocks) tests,
per image and head, the per-position maxima of the pre-softmax logits over pixels,

    M_i = max_q l_{q,i},    z_i = (M_i - mean_{j>=1} M_j) / (std_{j>=1} M_j + 1e-6),

and multiplies the logits of every position with ``z_i > threshold`` by ``attenuation`` (the start token,
position 0, is never tested). The repulsion decays as ``r_t = r cos(pi/2 i/N)`` over the ``N`` steps
(``schedule="cosine"``, the authors' code) or stays ``r`` (``"constant"``). With ``orthogonalize`` the
attractive direction loses its component along ``c - u`` where the two are closer than cosine 0.9 (the
coefficient clipped to [-2, 2]), as the authors' ``dual_guidance_call`` does by default.

Applied through :func:`~diffmem.hooks.guidance.extra_branch_hook`: the stock loop runs unchanged and only
the flagged rows' conditional output is rewritten, so unflagged images are bit-identical to the
unmitigated ones. Costs one UNet evaluation per flagged image and step (explicit attention in it).
``output.mitigations[k]["spike_positions"]`` lists, once the first step has run, the positions attenuated
in at least half of the (layer, head) tests of that step.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffmem.hooks.attention import cross_attention_layers, cross_attention_probes
from diffmem.hooks.guidance import extra_branch_hook
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation

__all__ = ["GuardMitigation", "guard_layers", "guard_prediction", "spike_tokens"]

#: the authors' cosine threshold and coefficient clip of their optional orthogonalization
ORTHO_COSINE, ORTHO_CLIP = 0.9, 2.0


def spike_tokens(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """GUARD's statistical test: ``[B, H, P, T]`` pre-softmax logits -> ``[B, H, T]``, True where the
    position's maximum over pixels has a z-score above ``threshold`` among positions ``1..T-1`` (position 0,
    the start token, is never a spike)."""
    peak = scores.float().amax(dim=2)
    rest = peak[..., 1:]
    z = (peak - rest.mean(dim=-1, keepdim=True)) / (rest.std(dim=-1, keepdim=True) + 1e-6)
    spikes = z > threshold
    spikes[..., 0] = False
    return spikes


def guard_prediction(
    u: torch.Tensor,
    c: torch.Tensor,
    p: torch.Tensor,
    scale: float,
    repulsion: float,
    orthogonalize: bool = False,
) -> torch.Tensor:
    """``u + scale (p - u) - repulsion (c - u)`` per image (rows of ``u``, ``c``, ``p``); with
    ``orthogonalize``, ``p - u`` first loses ``k (c - u)``, ``k = <p-u, c-u> / ||c-u||^2`` clipped to
    [-2, 2], in rows where their cosine exceeds 0.9 (the authors' code)."""
    attract, repel = p - u, c - u
    if orthogonalize:
        a, b = attract.flatten(1).float(), repel.flatten(1).float()
        dot = (a * b).sum(dim=1)
        cosine = dot / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
        coef = (dot / (b * b).sum(dim=1).clamp_min(1e-12)).clamp(-ORTHO_CLIP, ORTHO_CLIP)
        coef = torch.where(cosine > ORTHO_COSINE, coef, torch.zeros_like(coef))
        attract = attract - coef.to(repel.dtype).view(-1, *([1] * (repel.dim() - 1))) * repel
    return u + scale * attract - repulsion * repel


def guard_layers(unet: torch.nn.Module, layers: str | list[str]) -> list[str]:
    """The ``attn2`` layers GUARD attenuates: ``"early"`` (down and mid blocks), ``"all"``, or names."""
    names = cross_attention_layers(unet)
    if layers == "all":
        return names
    if layers == "early":
        return [n for n in names if n.startswith(("down_blocks", "mid_block"))]
    return list(layers)


@register_mitigation
class GuardMitigation(Mitigation):
    """Attract to the spike-attenuated prediction, repel from the prompt's own (see the module docstring)."""

    name = "guard"
    kind = "guidance"

    def __init__(
        self,
        repulsion: float = 2.0,
        attenuation: float = 0.3,
        threshold: float = 0.1,
        layers: str | list[str] = "early",
        schedule: str = "cosine",
        orthogonalize: bool = False,
    ):
        for label, value in (
            ("repulsion", repulsion),
            ("attenuation", attenuation),
            ("threshold", threshold),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{label}: expected a finite number, got {value!r}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule: expected 'cosine' or 'constant', got {schedule!r}")
        if isinstance(layers, str):
            if layers not in ("early", "all"):
                raise ValueError(f"layers: expected 'early', 'all' or a list of attn2 names, got {layers!r}")
        elif not (isinstance(layers, (list, tuple)) and layers and all(isinstance(n, str) for n in layers)):
            raise ValueError(f"layers: expected 'early', 'all' or a list of attn2 names, got {layers!r}")
        self.repulsion, self.attenuation, self.threshold = (
            float(repulsion),
            float(attenuation),
            float(threshold),
        )
        self.layers = layers if isinstance(layers, str) else list(layers)
        self.schedule, self.orthogonalize = schedule, bool(orthogonalize)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "repulsion": self.repulsion,
            "attenuation": self.attenuation,
            "threshold": self.threshold,
            "layers": self.layers,
            "schedule": self.schedule,
            "orthogonalize": self.orthogonalize,
        }

    def repulsion_at(self, step: int, num_steps: int) -> float:
        """``r_t`` at the loop's ``step``-th guidance call of ``num_steps``."""
        if self.schedule == "constant":
            return self.repulsion
        return self.repulsion * math.cos(math.pi / 2 * min(step, num_steps) / max(num_steps, 1))

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        if not any(batch.flagged):
            return MitigationPlan()
        if not batch.guidance:
            raise ValueError("mitigation 'guard' needs classifier-free guidance (guidance_scale > 1)")
        unet = batch.pipe.unet
        layers = guard_layers(unet, self.layers)
        if not layers:
            raise ValueError("layers: no cross-attention layer in the down or mid blocks of this UNet")
        known = set(cross_attention_layers(unet))
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise ValueError(f"layers: no cross-attention layer named {unknown[0]!r} in this UNet")
        rows = [k for k, f in enumerate(batch.flagged) if f]
        report = {k: {"action": self.name, "spike_positions": []} for k in rows}
        first = {"counts": None, "tests": 0, "done": False}

        def logits(name, scores):  # the extra pass: [n_flagged, H, P, T]
            spikes = spike_tokens(scores, self.threshold)
            if not first["done"]:
                counts = spikes.sum(dim=1).cpu()
                first["counts"] = counts if first["counts"] is None else first["counts"] + counts
                first["tests"] += spikes.shape[1]
            if self.attenuation == 1.0 or not spikes.any():
                return scores
            return torch.where(spikes[:, :, None, :], scores * self.attenuation, scores)

        num_steps = len(batch.timesteps)

        def combine(u, c, p, state, scale):
            step = state.get("step", 0)
            state["step"] = step + 1
            if not first["done"] and first["counts"] is not None:
                share = first["counts"].float() / max(first["tests"], 1)
                for j, k in enumerate(rows):
                    report[k]["spike_positions"].extend((share[j] >= 0.5).nonzero().flatten().tolist())
            first["done"] = True
            return guard_prediction(u, c, p, scale, self.repulsion_at(step, num_steps), self.orthogonalize)

        context = extra_branch_hook(
            unet,
            torch.tensor(batch.flagged),
            lambda: cross_attention_probes(unet, layers, logits=logits),
            combine,
            batch.current_guidance_scale,
        )
        return MitigationPlan(context=context, report=report)
