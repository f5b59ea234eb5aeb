"""Value-projection neurons of the UNet's cross-attention: find the layers, read and switch off neurons.

A *neuron* (NeMo, Hintersdorf et al., NeurIPS 2024) is one output channel ``i`` of a cross-attention
value projection ``attn2.to_v``: its activation for a prompt is ``a_i(y) = mean_tok |(W_V y_tok)_i|``
over all 77 token positions (padding included). Because ``to_v`` only sees the text embedding, the
activation does not depend on the timestep or the latent, so it is computed from the text encoder's
output and the projection alone (:func:`value_activations`), without running the UNet.

Switching neurons off multiplies their output channel by a factor (0 = off) at every timestep and on
both classifier-free-guidance branches: by forward hooks (:func:`scaled_value_neurons` with
``mode="hook"``; each group of samples in a batch may get its own mask, which is what makes batched
candidate evaluation possible) or by scaling rows of ``to_v.weight`` in place (``mode="weight"``,
robust to any attention processor). Both always restore the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from diffmem.hooks.restore import output_hooks, scaled_weights

#: UNet parts NeMo searches by default (the paper's 7 SD-1.x layers are exactly these).
DEFAULT_BLOCKS: tuple[str, ...] = ("down", "mid")
_BLOCK_PREFIX = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}


def value_layers(unet: nn.Module, blocks: Sequence[str] = DEFAULT_BLOCKS) -> dict[str, nn.Linear]:
    """The cross-attention value projections (``...attn2.to_v``) of ``unet`` in ``blocks``, in forward order.

    The list is read from the model (module names such as
    ``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v``), down blocks first, then mid, then
    up; for SD-1.x and ``blocks=("down", "mid")`` it is NeMo's 7 layers (5,760 neurons).
    """
    unknown = [b for b in blocks if b not in _BLOCK_PREFIX]
    if unknown:
        raise ValueError(f"blocks: unknown UNet part(s) {unknown}; expected some of {list(_BLOCK_PREFIX)}")
    found: dict[str, nn.Linear] = {}
    for block in ("down", "mid", "up"):
        if block not in blocks:
            continue
        for name, module in unet.named_modules():
            if not name.startswith(_BLOCK_PREFIX[block]) or not name.endswith("attn2"):
                continue
            if not getattr(module, "is_cross_attention", True):
                continue
            to_v = getattr(module, "to_v", None)
            if isinstance(to_v, nn.Linear):
                found[f"{name}.to_v"] = to_v
    if not found:
        raise ValueError(f"the UNet has no cross-attention value projection (attn2.to_v) in {list(blocks)}")
    return found


def value_activations(
    layers: Mapping[str, nn.Linear], encoder_hidden_states: torch.Tensor
) -> list[torch.Tensor]:
    """Per-neuron activations ``a_i^l(y) = mean_tok |to_v^l(y)_tok,i|`` for a batch of text embeddings.

    ``encoder_hidden_states``: ``[batch, tokens, dim]``. Returns one ``[batch, d_l]`` float32 tensor per
    layer, on the layers' device.
    """
    out = []
    for layer in layers.values():
        x = encoder_hidden_states.to(device=layer.weight.device, dtype=layer.weight.dtype)
        out.append(layer(x).abs().float().mean(dim=1))
    return out


@contextlib.contextmanager
def record_value_activations(layers: Mapping[str, nn.Linear]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record ``mean_tok |to_v(y)|`` (``[batch, d]``) of every call of each layer while the block runs.

    Yields name -> list of tensors (one per call). Use it when the layers' inputs are only reachable
    through a full forward pass; otherwise :func:`value_activations` is cheaper.
    """
    records: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def rewrite(name: str, output: torch.Tensor) -> torch.Tensor:
        records[name].append(output.detach().abs().float().mean(dim=1))
        return output

    with output_hooks(layers, rewrite, require_fired=False):
        yield records


def _channel_scale(output: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Multiply the last dim of ``output`` (``[B, ..., d]``) by ``scale`` ``[d]`` or per group ``[G, d]``."""
    scale = scale.to(device=output.device, dtype=output.dtype)
    if scale.dim() == 1:
        return output * scale
    groups, batch = scale.shape[0], output.shape[0]
    if batch % groups:
        raise ValueError(f"a batch of {batch} samples cannot be split into {groups} mask groups")
    scale = scale.repeat_interleave(batch // groups, dim=0)
    return output * scale.view(batch, *([1] * (output.dim() - 2)), scale.shape[-1])


@contextlib.contextmanager
def scaled_value_neurons(
    unet: nn.Module,
    layers: Mapping[str, nn.Linear],
    scales: Mapping[str, torch.Tensor],
    mode: str = "hook",
) -> Iterator[None]:
    """Multiply value neurons' outputs by ``scales`` (name -> ``[d]``, or ``[G, d]`` in hook mode) while the block runs.

    ``mode="hook"``: forward hooks on ``to_v``; with ``[G, d]`` scales the batch is split into ``G``
    consecutive groups of equal size, each with its own mask (batched candidate evaluation). On exit it
    checks that every hook fired if the UNet ran (fused projections would bypass them).
    ``mode="weight"``: rows of ``to_v.weight`` (and bias) are scaled in place and restored on exit;
    works with any attention processor; ``[d]`` scales only.
    """
    unknown = [name for name in scales if name not in layers]
    if unknown:
        raise KeyError(f"no value layer named {unknown[0]!r}")
    if mode == "hook":
        hooked = {name: layers[name] for name in scales}
        with output_hooks(hooked, lambda name, out: _channel_scale(out, scales[name]), root=unet):
            yield
    elif mode == "weight":
        multipliers: dict[torch.Tensor, torch.Tensor] = {}
        for name, scale in scales.items():
            if scale.dim() != 1:
                raise ValueError(
                    "mode='weight' takes one mask per layer ([d]); per-group masks need mode='hook'"
                )
            layer = layers[name]
            multipliers[layer.weight] = scale.view(-1, 1)
            if layer.bias is not None:
                multipliers[layer.bias] = scale
        with scaled_weights(multipliers):
            yield
    else:
        raise ValueError(f"mode must be 'hook' or 'weight', got {mode!r}")
