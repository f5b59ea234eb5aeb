"""Attention processors: xformers on CUDA when it is installed and loads, PyTorch SDPA otherwise.

``attention_processors(unet, "auto")`` swaps the plain attention processors of a UNet for the fast
one of this machine and puts the original processors back when the context ends (also on an error).
Processors that do more than attention (LoRA, IP-Adapter, a user's own) are left alone. torch is
imported where it is used, so the command line can read :data:`ATTENTION_CHOICES` cheaply.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "ATTENTION_CHOICES",
    "attention_processors",
    "fast_attention_processor",
    "use_attention_processor",
    "xformers_usable",
]

#: ``None``: keep the model's processors; ``"auto"``: xformers on CUDA if usable, else SDPA.
ATTENTION_CHOICES = (None, "auto", "sdpa", "xformers", "naive")


def xformers_usable(device: torch.device | str) -> bool:
    """True when ``device`` is CUDA and xformers imports with its compiled memory-efficient kernel."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401

        return True
    except Exception:  # xformers built for another CUDA raises all sorts of errors
        return False


def fast_attention_processor(kind: str, device: torch.device | str):
    """The processor for ``kind`` (``"auto"``, ``"sdpa"``, ``"xformers"``, ``"naive"``) on ``device``."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    if kind == "auto":
        kind = "xformers" if xformers_usable(device) else "sdpa"
    if kind == "xformers":
        if not xformers_usable(device):
            raise ValueError(
                f"attention='xformers' needs a CUDA device and an installed xformers (device is {device}); "
                "use attention='auto' to fall back to PyTorch scaled-dot-product attention"
            )
        return XFormersAttnProcessor()
    if kind == "sdpa":
        return AttnProcessor2_0()
    if kind == "naive":
        return AttnProcessor()
    raise ValueError(f"attention={kind!r}: expected one of {', '.join(map(repr, ATTENTION_CHOICES))}")


def _is_plain(processor) -> bool:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    return type(processor) in (AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor)


def use_attention_processor(unet: torch.nn.Module, kind: str | None = "auto") -> dict:
    """Set the attention processor ``kind`` on every plain attention layer of ``unet``; the previous ones.

    Processors that do more than attention (LoRA, IP-Adapter, a probe of diffmem's) are kept.
    ``kind=None`` changes nothing. Give the returned dict to ``unet.set_attn_processor`` to undo.
    """
    original = dict(unet.attn_processors)
    if kind is None:
        return original
    new = fast_attention_processor(kind, next(unet.parameters()).device)
    unet.set_attn_processor({name: (new if _is_plain(proc) else proc) for name, proc in original.items()})
    return original


@contextlib.contextmanager
def attention_processors(unet: torch.nn.Module, kind: str | None = "auto") -> Iterator[None]:
    """Use the attention processor ``kind`` in ``unet`` inside the context; restore the originals after.

    ``kind=None`` changes nothing.
    """
    original = use_attention_processor(unet, kind)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it is given
