"""What a fine-tune trains: LoRA adapters (peft) or the UNet's own weights, in all blocks or a chosen few.

One home for the trainable set of every diffmem trainer (``diffmem train``, adversarial fine-tuning,
MemControl's inner loop). A *block* is a UNet transformer block (a ``Transformer2DModel``: each
``attentions.<j>`` of the down, mid and up blocks; 16 in SD 1.x/2.x, MemControl's ``auto_attention``
search space, Dutt et al., WACV 2025). A block list is saved as a small JSON file
(:func:`save_trainable_blocks`) that ``diffmem train --trainable-blocks FILE`` reads; it names the UNet
architecture it was made for and is refused on another.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from diffmem.io import atomic_write_json
from diffmem.seeding import derive_seed

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "add_lora",
    "architecture_of",
    "load_trainable_blocks",
    "merge_lora",
    "save_trainable_blocks",
    "set_trainable_blocks",
    "transformer_blocks",
]

#: Modules that get LoRA adapters by default: attention projections and the FFN linears.
DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")

#: ``kind`` of a trainable-blocks file.
BLOCKS_KIND = "diffmem-trainable-blocks"


def transformer_blocks(unet: nn.Module) -> list[str]:
    """Names of the UNet's transformer blocks, in module order (down, mid, up), e.g.
    ``down_blocks.0.attentions.0``, ``mid_block.attentions.0``, ``up_blocks.1.attentions.2``."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]


def architecture_of(unet: nn.Module) -> dict:
    """What a block list depends on: the UNet class and its block-structure settings."""
    cfg = getattr(unet, "config", {})
    keys = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block")
    return {"class": type(unet).__name__, **{k: _jsonable(cfg.get(k)) for k in keys if k in cfg}}


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def _check_blocks(unet: nn.Module, blocks: Sequence[str], source: str) -> list[str]:
    known = transformer_blocks(unet)
    unknown = [b for b in blocks if b not in known]
    if unknown:
        raise ValueError(
            f"{source}: {', '.join(map(repr, unknown))} is not a transformer block of this UNet "
            f"(its blocks: {', '.join(known) or 'none'})"
        )
    if not blocks:
        raise ValueError(f"{source}: no block is trainable (expected at least one of {', '.join(known)})")
    return list(blocks)


def add_lora(
    unet: nn.Module,
    rank: int,
    targets: Sequence[str],
    seed: int,
    blocks: Sequence[str] | None = None,
) -> list[nn.Parameter]:
    """Inject LoRA adapters (peft, ``lora_alpha = rank``, Gaussian init from ``seed``) into the ``targets``
    modules of ``unet`` (only those inside ``blocks`` when given); freeze everything else; return the
    trainable parameters."""
    from peft import LoraConfig

    if blocks is not None:
        blocks = _check_blocks(unet, blocks, "trainable blocks")
        inner = "|".join(re.escape(t) for t in targets)
        outer = "|".join(re.escape(b) for b in blocks)
        target_modules: list[str] | str = rf"^(?:{outer})\..*(?:^|\.)(?:{inner})$"
    else:
        target_modules = list(targets)
    torch.manual_seed(derive_seed(seed, "lora-init") % (2**31))
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=target_modules)
    )
    params = []
    for name, p in unet.named_parameters():
        trainable = "lora_" in name
        p.requires_grad_(trainable)
        if trainable:
            params.append(p)
    if not params:
        raise ValueError(
            f"no LoRA parameters were added (target modules {list(targets)} not found in the UNet)"
        )
    return params


def set_trainable_blocks(unet: nn.Module, blocks: Sequence[str] | None) -> list[nn.Parameter]:
    """Full fine-tuning of ``blocks`` only (every parameter inside them; all of the UNet when ``None``);
    the rest is frozen. Returns the trainable parameters."""
    if blocks is None:
        unet.requires_grad_(True)
        return list(unet.parameters())
    blocks = _check_blocks(unet, blocks, "trainable blocks")
    unet.requires_grad_(False)
    params = []
    for name, p in unet.named_parameters():
        if any(name.startswith(b + ".") for b in blocks):
            p.requires_grad_(True)
            params.append(p)
    return params


def merge_lora(unet: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights and remove them (the UNet saves like an ordinary one)."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def save_trainable_blocks(
    path: str | os.PathLike, unet: nn.Module, blocks: Sequence[str], **provenance
) -> Path:
    """Write the block list for ``unet``'s architecture (JSON, atomically), with any provenance."""
    blocks = _check_blocks(unet, blocks, str(path))
    record = {
        "kind": BLOCKS_KIND,
        "blocks": blocks,
        "space": transformer_blocks(unet),
        "architecture": architecture_of(unet),
        **provenance,
    }
    return atomic_write_json(Path(path), record)


def load_trainable_blocks(path: str | os.PathLike, unet: nn.Module) -> list[str]:
    """The block list of ``path``, checked against ``unet`` (its architecture and block names)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--trainable-blocks: {path} does not exist")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--trainable-blocks: {path} is not JSON ({err})") from None
    if (
        not isinstance(record, dict)
        or record.get("kind") != BLOCKS_KIND
        or not isinstance(record.get("blocks"), list)
    ):
        raise ValueError(
            f"--trainable-blocks: {path} is not a trainable-blocks file (expected kind {BLOCKS_KIND!r} and a "
            "list 'blocks', as diffmem memcontrol writes)"
        )
    made_for = record.get("architecture")
    if made_for is not None and made_for != architecture_of(unet):
        raise ValueError(
            f"--trainable-blocks: {path} was made for another UNet architecture ({made_for}); "
            f"this model's is {architecture_of(unet)}"
        )
    return _check_blocks(unet, record["blocks"], f"--trainable-blocks {path}")
