"""(Multi-scale) SSIM with the two choices that move NeMo's scores made explicit: data range and border.

SSIM (Wang et al., 2004) with a Gaussian window of ``kernel_size`` taps (standard deviation ``sigma``)
on reflect-padded maps: per position ``l = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1)`` and
``cs = (2 s_ab + C2) / (s_a^2 + s_b^2 + C2)`` with ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``;
SSIM is the mean of ``l * cs``. MS-SSIM (Wang et al., 2003) averages ``cs`` at every scale but the
last and ``l * cs`` at the last, halving the maps (2x2 mean) in between, each clipped at 0 and raised
to its ``beta``; the product is the score. These are torchmetrics' definitions (``normalize="relu"``
for MS-SSIM), computed here because two of its settings are not arguments there:

* ``data_range=None`` infers ``R`` as torchmetrics does when given ``None``, at *every scale*, from the
  batch being compared: ``max(range(a), range(b))``, each range over the whole batch. The batch is
  therefore part of the result; ``groups`` splits the batch into equal consecutive groups that each
  get their own range (as separate calls would). A number fixes ``R`` at every scale.
* ``border``: which positions the ``l * cs`` mean runs over. ``"crop"`` leaves out the positions whose
  window reaches into the padding (torchmetrics <= 1.4.1, incl. 1.3.2, NeMo's pinned version);
  ``"pad"`` averages over every position (torchmetrics >= 1.4.2). The ``cs`` mean is always cropped
  (both versions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

BORDERS = ("crop", "pad")


def gaussian_window(kernel_size: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """The normalised 2-D Gaussian window ``[kernel_size, kernel_size]``, centred (odd ``kernel_size``)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size: expected an odd integer >= 1, got {kernel_size}")
    if not sigma > 0:
        raise ValueError(f"sigma: expected a number > 0, got {sigma}")
    half = (kernel_size - 1) / 2
    x = torch.arange(kernel_size, dtype=dtype, device=device) - half
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _ranges(a: torch.Tensor, b: torch.Tensor, groups: int, data_range: float | None) -> torch.Tensor:
    """``R`` per sample ``[B, 1, 1, 1]``: fixed, or ``max(range(a_g), range(b_g))`` over each group ``g``."""
    if data_range is not None:
        return torch.full((a.shape[0], 1, 1, 1), float(data_range), dtype=a.dtype, device=a.device)
    ga, gb = a.reshape(groups, -1), b.reshape(groups, -1)
    span = torch.maximum(ga.amax(1) - ga.amin(1), gb.amax(1) - gb.amin(1))
    return span.repeat_interleave(a.shape[0] // groups).view(-1, 1, 1, 1)


def _ssim_and_cs(
    a: torch.Tensor, b: torch.Tensor, window: torch.Tensor, rng: torch.Tensor, border: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean SSIM (over the positions ``border`` selects) and mean ``cs`` (cropped)."""
    k = window.shape[-1]
    pad = (k - 1) // 2
    channels = a.shape[1]
    if pad >= min(a.shape[-2:]):
        raise ValueError(
            f"a {k}-tap window needs maps larger than {pad} pixels on a side, got {tuple(a.shape[-2:])}"
        )
    kernel = window.to(a.dtype).expand(channels, 1, k, k)
    stack = torch.cat([a, b, a * a, b * b, a * b])
    stack = F.pad(stack, (pad, pad, pad, pad), mode="reflect")
    mu_a, mu_b, aa, bb, ab = F.conv2d(stack, kernel, groups=channels).split(a.shape[0])
    var_a = (aa - mu_a**2).clamp_min(0)
    var_b = (bb - mu_b**2).clamp_min(0)
    cov = ab - mu_a * mu_b
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    cs = (2 * cov + c2) / (var_a + var_b + c2)
    full = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1) * cs
    inner = (slice(None), slice(None), slice(pad, -pad or None), slice(pad, -pad or None))
    if border == "crop":
        full = full[inner]
    return full.flatten(1).mean(1), cs[inner].flatten(1).mean(1)


def _check(a: torch.Tensor, b: torch.Tensor, groups: int, border: str, data_range: float | None) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two equally shaped N x C x H x W batches, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if groups < 1 or a.shape[0] % groups:
        raise ValueError(f"groups: expected a divisor of the batch size {a.shape[0]}, got {groups}")
    if border not in BORDERS:
        raise ValueError(f"border: expected one of {BORDERS}, got {border!r}")
    if data_range is not None and not data_range > 0:
        raise ValueError(f"data_range: expected a number > 0 or None (inferred), got {data_range}")


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    kernel_size: int = 11,
    sigma: float = 1.5,
    data_range: float | None = None,
    border: str = "crop",
    groups: int = 1,
) -> torch.Tensor:
    """Per-pair SSIM of two ``N x C x H x W`` batches -> ``N`` (module docstring: range, border, groups)."""
    _check(a, b, groups, border, data_range)
    a, b = a.float(), b.float()
    window = gaussian_window(kernel_size, sigma, a.dtype, a.device)
    return _ssim_and_cs(a, b, window, _ranges(a, b, groups, data_range), border)[0]


def ms_ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    betas: Sequence[float] = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333),
    kernel_size: int = 11,
    sigma: float = 1.5,
    data_range: float | None = None,
    border: str = "crop",
    groups: int = 1,
) -> torch.Tensor:
    """Per-pair MS-SSIM of two ``N x C x H x W`` batches -> ``N``, ``len(betas)`` scales (module docstring)."""
    _check(a, b, groups, border, data_range)
    a, b = a.float(), b.float()
    window = gaussian_window(kernel_size, sigma, a.dtype, a.device)
    factors = []
    for level in range(len(betas)):
        sim, cs = _ssim_and_cs(a, b, window, _ranges(a, b, groups, data_range), border)
        factors.append((sim if level == len(betas) - 1 else cs).clamp_min(0))
        if level < len(betas) - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    weights = torch.tensor(list(betas), dtype=a.dtype, device=a.device).view(-1, 1)
    return (torch.stack(factors) ** weights).prod(0)
