"""Seeds derived from item identity, so results never depend on batch size, order or process count."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(base_seed: int, *keys: object) -> int:
    """A 63-bit seed from ``base_seed`` and any keys (item id, generation index, ...): SHA-256 of their reprs."""
    h = hashlib.sha256(repr((int(base_seed),) + tuple(str(k) for k in keys)).encode())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def item_generator(base_seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``derive_seed(base_seed, *keys)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(base_seed, *keys))
