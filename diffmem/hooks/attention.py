"""Read and change cross-attention (``attn2``) probabilities through an attention processor.

The attention-based detectors and mitigations (Ren et al., ECCV 2024; Chen et al.'s Bright Ending,
ICLR 2025) need the post-softmax cross-attention ``A = softmax(q k^T / sqrt(d) + mask)`` of the UNet's
``attn2`` layers, ``[batch * heads, pixels, tokens]``, which fused kernels (SDPA, xformers) never
materialise. :class:`CrossAttentionProbe` is a processor that computes attention explicitly (the
standard attention of ``AttnProcessor``, so the layer's output is unchanged up to float rounding), lets
a ``logits`` callback rewrite the pre-softmax scores and a ``record`` callback read the probabilities.
:func:`cross_attention_probes` installs it on chosen layers and restores the original processors when
the context ends, also on an error. Forward hooks on ``to_q``/``to_k``/``to_v`` (NeMo) still fire.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

__all__ = ["CrossAttentionProbe", "cross_attention_layers", "cross_attention_probes"]

_BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")


def cross_attention_layers(unet: nn.Module) -> list[str]:
    """Names of the UNet's cross-attention modules (``...attn2``) in forward order (down, mid, up).

    (``unet.attn_processors`` lists them in registration order, where the mid block comes last.)
    """
    names = [
        n for n, m in unet.named_modules() if n.endswith("attn2") and getattr(m, "is_cross_attention", True)
    ]
    if not names:
        raise ValueError("the UNet has no cross-attention layer (attn2)")
    return sorted(
        names, key=lambda n: _BLOCK_ORDER.index(n.split(".")[0]) if n.split(".")[0] in _BLOCK_ORDER else 3
    )


class CrossAttentionProbe:
    """An attention processor computing attention explicitly, with hooks on the logits and the probabilities.

    Args:
        name: the layer's module name (passed to the callbacks).
        logits: ``logits(name, scores [B, H, P, T]) -> scores`` before the softmax (``None``: unchanged).
        record: ``record(name, probs [B, H, P, T])`` after the softmax (float32; ``None``: nothing read).
    """

    def __init__(
        self,
        name: str,
        logits: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        record: Callable[[str, torch.Tensor], None] | None = None,
    ):
        self.name, self.logits, self.record = name, logits, record

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        four_d = hidden_states.ndim == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens = context.shape[0], context.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        heads = attn.heads

        def split(x):  # [B, N, H*d] -> [B, H, N, d]
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(query), split(key), split(value)
        dtype = torch.float32 if attn.upcast_attention or q.dtype != torch.float32 else q.dtype
        scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * attn.scale
        if attention_mask is not None:
            scores = scores + attention_mask.view(batch, heads, -1, tokens).to(dtype)
        if self.logits is not None:
            scores = self.logits(self.name, scores)
        probs = scores.softmax(dim=-1)
        if self.record is not None:
            self.record(self.name, probs.detach().float())
        out = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(batch, -1, heads * v.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        if four_d:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def cross_attention_probes(
    unet: nn.Module,
    layers: Sequence[str] | None = None,
    *,
    logits: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    record: Callable[[str, torch.Tensor], None] | None = None,
) -> Iterator[list[str]]:
    """Install :class:`CrossAttentionProbe` on ``layers`` (default: every ``attn2``); yields the layer names.

    The original processors are put back when the context ends, also on an error.
    """
    names = list(layers) if layers is not None else cross_attention_layers(unet)
    known = set(cross_attention_layers(unet))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"no cross-attention layer named {unknown[0]!r} in this UNet")
    original = dict(unet.attn_processors)
    replaced = dict(original)
    for name in names:
        replaced[f"{name}.processor"] = CrossAttentionProbe(name, logits=logits, record=record)
    unet.set_attn_processor(replaced)
    try:
        yield names
    finally:
        unet.set_attn_processor(original)
