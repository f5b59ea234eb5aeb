"""The optimizers a diffmem fine-tune can use, by name: AdamW, bitsandbytes' 8-bit AdamW, and plain SGD.

``"adamw8bit"`` (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", ICLR 2022) keeps both
Adam moments in 8 bits with per-block scales: 2 bytes of optimizer state per parameter instead of 8,
5.1 GiB less for a full fine-tune of SD-1.5's UNet (860M parameters). It needs the ``bitsandbytes``
package (``pip install 'diffmem[train8bit]'``), which runs on CUDA and, since 0.45, on the CPU.
Its state is plain tensors, so checkpoints (safetensors) and exact resumes work as with AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZERS", "make_optimizer"]

OPTIMIZERS = ("adamw", "adamw8bit", "sgd")


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "adamw",
    *,
    lr: float,
    weight_decay: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW (``"adamw"``), bitsandbytes' ``AdamW8bit`` (``"adamw8bit"``) or plain SGD (``"sgd"``: no momentum,
    ``theta -= lr * (g + weight_decay * theta)``; linear in the gradient, so runs that split a step differently
    can be compared to float rounding) over ``params``."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'diffmem[train8bit]'"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise ValueError(f"--optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
