"""NeMo's similarity on constructed maps, against a direct computation written out here (numpy, float64).

The direct computation follows the definitions (Gaussian window on the reflect-padded map, local means,
variances and covariance, ``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``, ``cs`` averaged over the positions
whose window lies inside the map, ``l * cs`` over those (``crop``) or over all (``pad``), 2x2 means
between scales, ``R`` inferred per scale as ``max(range(a), range(b))`` over the whole batch) with a
loop over window offsets, not the implementation's convolution. The pinned numbers are what it gives.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.localize.nemo import LEGACY_SIMILARITY, NemoConfig, NoiseSimilarity
from diffmem.scores.msssim import ms_ssim, ssim


def _maps() -> tuple[np.ndarray, np.ndarray]:
    """Two pairs of 2 x 16 x 16 maps, each channel min-max normalised to [0, 1] (as NeMo's noise differences)."""
    y, x = np.mgrid[0:16, 0:16].astype(np.float64)
    a = np.stack(
        [
            [np.sin(0.7 * x + 0.3 * y) + 2 * ((x + y) % 2), np.cos(0.5 * x * y / 7 + 1.0)],
            [(x * 7 + y * 3) % 5 - np.sin(y), np.sin(0.9 * y) * np.cos(0.4 * x) + (x % 2) * (y % 2)],
        ]
    )
    b = np.stack(
        [
            [
                np.sin(0.7 * x + 0.3 * y + 0.8) + 1.5 * ((x + y) % 2),
                np.cos(0.45 * x * y / 7) + 0.3 * np.sin(2.1 * x),
            ],
            [(x * 5 + y * 3) % 7 - np.sin(x), np.sin(0.9 * y + 0.5) * np.cos(0.4 * x)],
        ]
    )
    lo, hi = a.min(axis=(2, 3), keepdims=True), a.max(axis=(2, 3), keepdims=True)
    a = (a - lo) / (hi - lo)
    lo, hi = b.min(axis=(2, 3), keepdims=True), b.max(axis=(2, 3), keepdims=True)
    b = (b - lo) / (hi - lo)
    return a, b


def _direct(a, b, k, sigma, levels, rng, border):
    """Per-pair (MS-)SSIM of numpy batches [N, C, H, W]; ``rng=None``: inferred per scale."""
    half = k // 2
    g = np.exp(-0.5 * ((np.arange(k) - half) / sigma) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    factors = []
    for level in range(levels):
        r = max(np.ptp(a), np.ptp(b)) if rng is None else rng
        c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
        pa = np.pad(a, ((0, 0), (0, 0), (half, half), (half, half)), mode="reflect")
        pb = np.pad(b, ((0, 0), (0, 0), (half, half), (half, half)), mode="reflect")
        h, wd = a.shape[2:]
        stats = {name: np.zeros_like(a) for name in ("ma", "mb", "aa", "bb", "ab")}
        for i in range(k):
            for j in range(k):
                sa, sb = pa[:, :, i : i + h, j : j + wd], pb[:, :, i : i + h, j : j + wd]
                stats["ma"] += w[i, j] * sa
                stats["mb"] += w[i, j] * sb
                stats["aa"] += w[i, j] * sa * sa
                stats["bb"] += w[i, j] * sb * sb
                stats["ab"] += w[i, j] * sa * sb
        ma, mb = stats["ma"], stats["mb"]
        va = np.maximum(stats["aa"] - ma**2, 0)
        vb = np.maximum(stats["bb"] - mb**2, 0)
        cs = (2 * (stats["ab"] - ma * mb) + c2) / (va + vb + c2)
        full = (2 * ma * mb + c1) / (ma**2 + mb**2 + c1) * cs
        inside = (slice(None), slice(None), slice(half, h - half), slice(half, wd - half))
        sim = (full[inside] if border == "crop" else full).mean(axis=(1, 2, 3))
        last = level == levels - 1
        factors.append(np.maximum(sim if last else cs[inside].mean(axis=(1, 2, 3)), 0))
        n, c = a.shape[:2]
        a = a.reshape(n, c, h // 2, 2, wd // 2, 2).mean(axis=(3, 5))
        b = b.reshape(n, c, h // 2, 2, wd // 2, 2).mean(axis=(3, 5))
    return np.prod(np.stack(factors) ** 0.33, axis=0) if levels > 1 else factors[0]


SIGMA3 = 1.5 * 3 / 11  # the organism's window: 3 taps at 16x16, 3 scales
#: what the direct computation gives on ``_maps()``: MS-SSIM, 3 scales, betas 0.33, 3-tap window
PINNED = {
    ("inferred", "crop"): [0.48227, 0.38487],
    ("inferred", "pad"): [0.52911, 0.37450],
    (1.0, "crop"): [0.48837, 0.40398],
    (1.0, "pad"): [0.53406, 0.39338],
}


@pytest.mark.parametrize("rng, border", list(PINNED))
def test_ms_ssim_known_answer(rng, border):
    a, b = _maps()
    value = None if rng == "inferred" else rng
    direct = _direct(a, b, 3, SIGMA3, 3, value, border)
    np.testing.assert_allclose(direct, PINNED[(rng, border)], atol=1e-5)
    ours = ms_ssim(
        torch.from_numpy(a),
        torch.from_numpy(b),
        betas=(0.33,) * 3,
        kernel_size=3,
        sigma=SIGMA3,
        data_range=value,
        border=border,
    )
    np.testing.assert_allclose(ours.numpy(), direct, rtol=2e-5)
    # NeMo's similarity as configured: the code's default, and diffmem's earlier one as the named option
    sim = NoiseSimilarity(16, 11, (0.33,) * 3, value, border)
    assert (sim.kernel_size, sim.kind) == (3, "ms_ssim")
    np.testing.assert_allclose(sim(torch.from_numpy(a), torch.from_numpy(b)).numpy(), direct, rtol=2e-5)


def test_defaults_are_the_codes_similarity_and_the_old_one_is_named():
    config = NemoConfig()
    assert config.data_range is None and config.ssim_border == "crop"
    old = NemoConfig(**LEGACY_SIMILARITY)
    assert old.data_range == 1.0 and old.ssim_border == "pad"
    with pytest.raises(ValueError, match="ssim_border"):
        NemoConfig(ssim_border="reflect")
    with pytest.raises(ValueError, match="data_range"):
        NemoConfig(data_range=0.0)


def test_range_is_inferred_per_group_as_separate_calls():
    """One comparison per group of pairs: the same numbers as calling once per group, not as one call."""
    a, b = _maps()
    a2, b2 = a.copy(), b.copy()
    a2[1] = a2[1] * 0.5  # the second pair's maps span [0, 0.5]: a range of their own
    ta, tb = torch.from_numpy(a2), torch.from_numpy(b2)
    kw = dict(betas=(0.33,) * 3, kernel_size=3, sigma=SIGMA3)
    grouped = ms_ssim(ta, tb, groups=2, **kw)
    separate = torch.cat([ms_ssim(ta[i : i + 1], tb[i : i + 1], **kw) for i in range(2)])
    torch.testing.assert_close(grouped, separate)
    direct = [_direct(a2[i : i + 1], b2[i : i + 1], 3, SIGMA3, 3, None, "crop")[0] for i in range(2)]
    np.testing.assert_allclose(grouped.numpy(), direct, rtol=2e-5)
    together = ms_ssim(ta, tb, **kw)
    assert not torch.allclose(together, grouped, atol=1e-3)  # the batch is part of the result


def test_single_scale_and_the_sd_window():
    """SSIM (one scale, 5 taps) and the SD-1.x window (11 taps on 64x64 maps: 3 scales fit)."""
    a, b = _maps()
    for border in ("crop", "pad"):
        direct = _direct(a, b, 5, 1.5 * 5 / 11, 1, None, border)
        got = ssim(torch.from_numpy(a), torch.from_numpy(b), kernel_size=5, sigma=1.5 * 5 / 11, border=border)
        np.testing.assert_allclose(got.numpy(), direct, rtol=2e-5)
    big_a, big_b = np.tile(a, (1, 1, 4, 4)), np.tile(b[:, :, ::-1], (1, 1, 4, 4)).copy()
    direct = _direct(big_a, big_b, 11, 1.5, 3, None, "crop")
    sim = NoiseSimilarity(64)
    assert (sim.kernel_size, sim.kind, sim.sigma) == (11, "ms_ssim", 1.5)
    np.testing.assert_allclose(
        sim(torch.from_numpy(big_a), torch.from_numpy(big_b)).numpy(), direct, rtol=2e-5
    )


def test_border_is_diffmems_choice_whatever_torchmetrics_does():
    """torchmetrics <= 1.4.1 crops the border, >= 1.4.2 averages over it; diffmem's result is the one
    asked for with either, and equals torchmetrics' where the two agree."""
    import torchmetrics
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm_ms

    a, b = (torch.from_numpy(m) for m in _maps())
    version = tuple(int(v) for v in torchmetrics.__version__.split(".")[:3])
    theirs = "pad" if version >= (1, 4, 2) else "crop"
    kw = dict(kernel_size=3, sigma=SIGMA3, betas=(0.33,) * 3)
    reference = tm_ms(a, b, data_range=None, reduction="none", **kw)
    torch.testing.assert_close(
        ms_ssim(a, b, border=theirs, **kw).double(), reference.double(), atol=5e-5, rtol=0
    )
    np.testing.assert_allclose(
        ms_ssim(a, b, border="crop", **kw).numpy(), PINNED[("inferred", "crop")], atol=3e-5
    )


def test_replication_ssim_keeps_torchmetrics_border():
    """The replication SSIM (``diffmem.scores.similarity``, torchmetrics, data range 1) averages over the
    padded border, as torchmetrics >= 1.4.2 (pyproject's floor) does; this fails if that changes."""
    from diffmem.scores.similarity import ssim as replication_ssim

    a, b = (torch.from_numpy(m).float() for m in _maps())
    # an 11-tap window fits 16x16 maps at one scale: torchmetrics' default window
    padded = ssim(a, b, data_range=1.0, border="pad")
    torch.testing.assert_close(replication_ssim(a, b), padded, atol=1e-5, rtol=0)
    assert (padded - ssim(a, b, data_range=1.0, border="crop")).abs().max() > 0.01
