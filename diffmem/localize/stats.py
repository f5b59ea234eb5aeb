"""Activation statistics of value-projection neurons over non-memorized prompts (NeMo, step 1).

For each value layer ``l`` and neuron ``i``: ``mu_i^l`` = mean and ``sigma_i^l`` = unbiased standard
deviation over prompts ``y`` of ``a_i^l(y) = mean_tok |(W_V^l y_tok)_i|`` (Hintersdorf et al.,
"Finding NeMo", NeurIPS 2024, Sec. 3.3). Accumulated in one streaming pass with Chan et al.'s
parallel update of (count, mean, M2) in float64 on the model's device; only the final mean/std are
moved to the CPU. Saved as safetensors with the model fingerprint, layer names and prompt count in the
config (:class:`diffmem.saved.SavedObject`), and refused for another model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from diffmem.conditioning import encode_prompts, prompt_conditioning
from diffmem.fingerprint import fingerprint_problem, model_fingerprint
from diffmem.hooks.neurons import DEFAULT_BLOCKS, value_activations, value_layers
from diffmem.modelio import is_sdxl
from diffmem.saved import SavedObject

#: The header ``format`` of format-1 files (before :class:`~diffmem.saved.SavedObject`), read as legacy.
FORMAT = "diffmem.ValueStats/1"


@dataclass
class ValueStats(SavedObject):
    """Per-layer mean and standard deviation of value-neuron activations, and the model they belong to.

    Saved by :class:`~diffmem.saved.SavedObject`: ``save(x.safetensors)`` (what ``diffmem localize
    --stats`` reads) or ``save_pretrained(folder)``; format-1 files still load.
    """

    config_name: ClassVar[str] = "value_stats_config.json"
    weights_name: ClassVar[str] = "value_stats.safetensors"
    format_version: ClassVar[int] = 2

    fingerprint: str
    layers: list[str]
    mean: list[torch.Tensor]
    std: list[torch.Tensor]
    count: int
    info: dict[str, Any] = field(default_factory=dict)

    def zscores(self, activations: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``z = (a - mu) / sigma`` per layer (NeMo eq. 3); a zero ``sigma`` gives ``z = 0`` where ``a == mu``."""
        out = []
        for a, mu, sd in zip(activations, self.mean, self.std):
            mu, sd = mu.to(a.device), sd.to(a.device)
            out.append((a - mu) / sd.clamp_min(torch.finfo(torch.float32).tiny))
        return out

    def check(self, unet: nn.Module, layers: Sequence[str], source: str = "statistics") -> None:
        """Raise ``ValueError`` unless these statistics were computed on ``unet`` for ``layers``."""

        problem = fingerprint_problem(self.fingerprint, unet, f"{source}: the statistics", "recompute them")
        if problem is not None:
            raise ValueError(problem)
        if list(layers) != self.layers:
            raise ValueError(f"{source}: statistics cover the layers {self.layers}, expected {list(layers)}")

    # ----------------------------------------------------------------------------------- files
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {
            "fingerprint": self.fingerprint,
            "layers": self.layers,
            "count": self.count,
            "info": self.info,
        }
        tensors = {}
        for i, (mu, sd) in enumerate(zip(self.mean, self.std)):
            tensors[f"mean.{i}"] = mu.float().cpu()
            tensors[f"std.{i}"] = sd.float().cpu()
        return config, tensors

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> ValueStats:
        n = len(config["layers"])
        missing = [k for i in range(n) for k in (f"mean.{i}", f"std.{i}") if k not in tensors]
        if missing:
            raise ValueError(f"{source}: {n} layers but no tensor(s) {', '.join(missing[:4])}")
        return cls(
            str(config["fingerprint"]),
            list(config["layers"]),
            [tensors[f"mean.{i}"] for i in range(n)],
            [tensors[f"std.{i}"] for i in range(n)],
            int(config["count"]),
            dict(config.get("info") or {}),
        )

    @classmethod
    def _from_legacy(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
    ) -> ValueStats:
        """Format 1: a .safetensors whose metadata ``diffmem`` holds the JSON header."""
        try:
            header = json.loads(config.get("diffmem", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: unreadable statistics header ({err})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{source}: not diffmem value statistics (no {FORMAT} header)")
        return cls._from_parts(header, tensors, source)


@torch.no_grad()
def compute_value_stats(
    unet: nn.Module,
    text_encoder: nn.Module,
    tokenizer,
    prompts: Iterable[str],
    *,
    blocks: Sequence[str] = DEFAULT_BLOCKS,
    batch_size: int = 64,
    total: int | None = None,
    progress: bool = True,
    conditioning=None,
) -> ValueStats:
    """Mean and unbiased std of every value neuron's activation over ``prompts``, in one streaming pass.

    Only the text encoder and the value projections run (the activations do not depend on the
    latent or timestep). Batches are merged with Chan et al.'s update
    ``M2 = M2_a + M2_b + delta^2 n_a n_b / n`` in float64 on the device. ``conditioning``:
    ``prompts -> (hidden states, unet_kwargs)`` in place of the text encoder (SDXL; see
    :func:`value_stats_of`).
    """
    from tqdm.auto import tqdm

    layers = value_layers(unet, blocks)
    device = next(iter(layers.values())).weight.device
    acc_dtype = torch.float64 if device.type != "mps" else torch.float32
    n = 0
    mean = [torch.zeros(m.out_features, dtype=acc_dtype, device=device) for m in layers.values()]
    m2 = [torch.zeros_like(mu) for mu in mean]
    bar = tqdm(total=total, desc="value statistics", unit="prompt", disable=not progress)

    def flush(batch: list[str]) -> None:
        nonlocal n
        hidden = conditioning(batch)[0] if conditioning else encode_prompts(tokenizer, text_encoder, batch)
        acts = value_activations(layers, hidden)
        nb = len(batch)
        for i, a in enumerate(acts):
            a = a.to(acc_dtype)
            mb = a.mean(0)
            m2b = ((a - mb) ** 2).sum(0)
            delta = mb - mean[i]
            tot = n + nb
            mean[i] += delta * (nb / tot)
            m2[i] += m2b + delta**2 * (n * nb / tot)
        n += nb
        bar.update(nb)

    batch: list[str] = []
    for prompt in prompts:
        batch.append(prompt)
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    bar.close()
    if n < 2:
        raise ValueError(f"value statistics need at least 2 prompts, got {n}")
    std = [(v / (n - 1)).sqrt() for v in m2]
    return ValueStats(
        fingerprint=model_fingerprint(unet),
        layers=list(layers),
        mean=[m.float().cpu() for m in mean],
        std=[s.float().cpu() for s in std],
        count=n,
        info={"blocks": list(blocks)},
    )


def value_stats_of(pipe, prompts: Iterable[str], **kwargs) -> ValueStats:
    """:func:`compute_value_stats` for a pipeline of either family (SD or SDXL conditioning)."""

    conditioning = (lambda batch: prompt_conditioning(pipe, batch)) if is_sdxl(pipe) else None
    return compute_value_stats(
        pipe.unet, pipe.text_encoder, pipe.tokenizer, prompts, conditioning=conditioning, **kwargs
    )
