"""Feed-forward layers of the UNet's transformer blocks: find them, read their input statistics, mask weights.

The layer pruned by subspace pruning (Chavhan et al., "Memorized Images in Diffusion Models share a
Subspace that can be Located and Deleted", 2024) is the second linear layer of every transformer
block's feed-forward network, ``...transformer_blocks.<i>.ff.net.2`` (``W`` of shape ``[d, 4d]``); its
input is the GEGLU output. This module

* discovers those layers from the model (:func:`ffn_layers`; no hard-coded count: SD-1.x has 16,
  SDXL 70, the tiny test models 7), in forward order (down, mid, up);
* accumulates per-column statistics of their inputs per denoising step, on the layers' device in
  float32 (:func:`record_ffn_input_norms`): with row-normalised inputs ``x̂_r = x_r / ‖x_r‖``,
  ``sumsq[t, j] += Σ_r x̂_rj²`` over every token row r of every call at step t;
* indexes steps by the pipeline's step (:class:`StepCounter`, driven by ``callback_on_step_end``),
  never by counting hook calls, so schedulers, step counts and block counts do not matter;

Pruning itself is an edit like any other: a :class:`diffmem.edits.WeightMask` goes through
:mod:`diffmem.edits` (weights scaled by :func:`diffmem.hooks.restore.scaled_weights`, always restored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffmem.hooks.restore import HookNotFiredError

_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
ALL_BLOCKS: tuple[str, ...] = ("down", "mid", "up")


def ffn_layers(unet: nn.Module, blocks: Sequence[str] = ALL_BLOCKS) -> dict[str, nn.Linear]:
    """The second linear layer (``*.ff.net.2``) of each transformer block's FFN in ``blocks``, in forward order.

    Found by name and type on the model (``nn.Linear`` named ``...transformer_blocks.<i>.ff.net.2``),
    down blocks first, then mid, then up; within a part, in module order (= execution order for
    diffusers' UNets). Raises ``ValueError`` when there is none.
    """
    unknown = [b for b in blocks if b not in _BLOCK_PREFIX]
    if unknown:
        raise ValueError(f"blocks: unknown UNet part(s) {unknown}; expected some of {list(_BLOCK_PREFIX)}")
    found: dict[str, nn.Linear] = {}
    modules = list(unet.named_modules())
    for block in ALL_BLOCKS:
        if block not in blocks:
            continue
        for name, module in modules:
            if (
                name.startswith(_BLOCK_PREFIX[block])
                and name.endswith(".ff.net.2")
                and "transformer_blocks." in name
                and isinstance(module, nn.Linear)
            ):
                found[name] = module
    if not found:
        raise ValueError(
            f"the UNet has no transformer-block feed-forward layer (*.transformer_blocks.*.ff.net.2) in {list(blocks)}"
        )
    return found


class StepCounter:
    """The index of the current denoising step, for hooks; advance it from ``callback_on_step_end``.

    ``index`` is 0 during the first step's UNet call(s); the pipeline calls :meth:`callback` after
    step ``i`` and the counter becomes ``i + 1``, however many UNet calls a step makes. With
    ``stop_after`` set, the callback interrupts the pipeline after that many steps (the remaining steps
    skip the UNet), so statistics of the first τ steps cost τ steps.
    """

    def __init__(self, stop_after: int | None = None) -> None:
        self.index = 0
        self.stop_after = stop_after

    def reset(self) -> None:
        self.index = 0

    def callback(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.index = int(step) + 1
        if self.stop_after is not None and self.index >= self.stop_after:
            pipe._interrupt = True
        return callback_kwargs


@dataclass
class FFNInputNorms:
    """Running sums of squared row-normalised FFN inputs: ``sumsq[name]`` is ``[num_steps, d_in]`` float32."""

    sumsq: dict[str, torch.Tensor]
    rows: torch.Tensor  # [num_steps]: token rows accumulated per step (per layer they are the same)
    calls: dict[str, int] = field(default_factory=dict)


def _row_sumsq(x: torch.Tensor, row_normalize: bool) -> torch.Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).float()
    if row_normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x.square().sum(dim=0)


@contextlib.contextmanager
def record_ffn_input_norms(
    layers: Mapping[str, nn.Linear],
    steps: StepCounter,
    num_steps: int,
    *,
    row_normalize: bool = True,
    cond_only: bool = False,
    root: nn.Module | None = None,
) -> Iterator[FFNInputNorms]:
    """Accumulate ``Σ_r x̂_rj²`` of each layer's input at each step ``t < num_steps`` while the block runs.

    Forward pre-hooks read the input of each layer; rows are the token rows of every sample of the
    batch. With ``cond_only`` only the second half of the batch is used (diffusers' classifier-free
    guidance stacks ``[unconditional; conditional]``); otherwise both halves are pooled (the reference
    behaviour). Everything stays on the layers' device, in float32; nothing is copied to the host.
    Calls at steps ``>= num_steps`` are ignored. With ``root`` given, leaving the block after ``root``
    ran while a layer's hook never fired raises :class:`HookNotFiredError`.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    result = FFNInputNorms(
        sumsq={
            name: torch.zeros(num_steps, layer.in_features, device=layer.weight.device, dtype=torch.float32)
            for name, layer in layers.items()
        },
        rows=torch.zeros(num_steps, dtype=torch.long),
        calls={name: 0 for name in layers},
    )
    first = next(iter(layers)) if layers else None
    root_calls = [0]

    def make_hook(name: str):
        def hook(_module, inputs):
            result.calls[name] += 1
            t = steps.index
            if t >= num_steps:
                return None
            x = inputs[0]
            if cond_only:
                if x.shape[0] % 2:
                    raise ValueError(
                        f"cond_only needs a classifier-free-guidance batch [uncond; cond], got batch {x.shape[0]}"
                    )
                x = x[x.shape[0] // 2 :]
            result.sumsq[name][t] += _row_sumsq(x, row_normalize)
            if name == first:
                result.rows[t] += x.numel() // x.shape[-1]
            return None

        return hook

    handles = []
    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(make_hook(name)))
        if root is not None:
            handles.append(
                root.register_forward_pre_hook(lambda *_: root_calls.__setitem__(0, root_calls[0] + 1))
            )
        yield result
    finally:
        for handle in handles:
            handle.remove()
    if root is not None and root_calls[0] > 0:
        silent = [name for name, n in result.calls.items() if n == 0]
        if silent:
            raise HookNotFiredError(
                f"the UNet ran {root_calls[0]} time(s) but the hook(s) on {', '.join(silent[:5])} never fired"
            )
