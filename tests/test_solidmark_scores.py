"""SolidMark math: mask geometry, value spaces, key distance, chance rate, intervals, shuffled-key null."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffmem.scores.solidmark import (
    binomial_ci,
    center_mask,
    chance_rate,
    difference_ci,
    frame_distance_map,
    frame_mask,
    key_distance,
    memorization_rates,
    pixel_to_space,
    predicted_keys,
    shuffled_keys,
    space_to_pixel,
)
from diffmem.solidmark.keys import add_key, draw_key, frame_key, frame_level


def test_frame_mask_geometry_and_a_real_interior():
    h, w, t = 40, 48, 8
    m = frame_mask(h, w, t)
    # the reference code's empty slice made the mask all ones: here the interior must be known
    assert m.sum() == h * w - (h - 2 * t) * (w - 2 * t)
    assert not m[t : h - t, t : w - t].any()
    assert m[:t].all() and m[-t:].all() and m[:, :t].all() and m[:, -t:].all()
    c = center_mask(32, 32, 8)
    assert c.sum() == 64 and c[12:20, 12:20].all()
    with pytest.raises(ValueError, match="twice the frame width"):
        frame_mask(16, 16, 8)


def test_value_space_round_trip():
    k = torch.tensor([0.0, 0.25, 0.999])
    assert torch.allclose(space_to_pixel(pixel_to_space(k, "model"), "model"), k)
    assert torch.allclose(pixel_to_space(k, "pixel"), k)
    with pytest.raises(ValueError, match="value space"):
        pixel_to_space(k, "normalized")


@pytest.mark.parametrize("space", ["pixel", "model"])
def test_a_perfect_copy_of_the_keyed_image_scores_zero(space):
    keys = [draw_key(42, f"img{i}") for i in range(5)]
    content = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    keyed = np.stack([add_key(c, frame_level(k, space), 8, "border") for c, k in zip(content, keys)])
    x = torch.from_numpy(keyed).permute(0, 3, 1, 2).float() / 255
    mask = frame_mask(32, 32, 8)
    k_hat = predicted_keys(x, mask, space).double().numpy()
    stored = np.array([frame_key(k, space) for k in keys])
    assert key_distance(k_hat, stored).max() < 1e-6
    # the stored key is within half an 8-bit level of the drawn key (in pixel terms)
    assert (
        np.abs(space_to_pixel(stored, space) - space_to_pixel(np.array(keys), space)).max()
        <= 0.5 / 255 + 1e-12
    )
    assert frame_distance_map(x, torch.tensor(stored), mask, space).max() < 1e-6


def test_comparing_across_value_spaces_is_what_breaks_the_reference_code():
    # a perfect memorizer in the model space, read back in pixel space, lands at (1 - k) / 2 from the key
    k = 0.3
    image = torch.full((1, 3, 32, 32), float(space_to_pixel(k, "model")))
    mask = frame_mask(32, 32, 8)
    assert abs(float(predicted_keys(image, mask, "model")[0]) - k) < 1e-6
    assert abs(abs(float(predicted_keys(image, mask, "pixel")[0]) - k) - (1 - k) / 2) < 1e-6


def test_chance_rate_and_wilson_interval():
    assert chance_rate(0.05) == pytest.approx(0.0975)
    assert chance_rate(0.1) == pytest.approx(0.19)
    assert chance_rate(0.005) == pytest.approx(0.009975)
    low, high = binomial_ci(50, 100)
    assert low < 0.5 < high and high - low == pytest.approx(0.192, abs=0.01)
    assert binomial_ci(0, 20)[0] == 0.0
    with pytest.raises(ValueError):
        chance_rate(0.0)


def test_random_keys_give_the_chance_rate_within_its_interval():
    n = 4000
    keys = np.array([draw_key(42, f"img{i}") for i in range(n)])
    assert keys.min() >= 0 and keys.max() < 1
    # a model that knows nothing of the key: predictions independent of it
    predictions = np.array([draw_key(7, f"guess{i}") for i in range(n)])
    for r in memorization_rates(key_distance(predictions, keys)):
        assert r.ci_low <= r.chance <= r.ci_high, r
    # a perfect predictor is at 100 %, and its shuffled-key null back at chance
    perfect = memorization_rates(key_distance(keys, keys))
    assert all(r.rate == 1.0 for r in perfect)
    null = memorization_rates(key_distance(keys, shuffled_keys(keys, seed=0)))
    for r in null:
        assert r.ci_low <= r.chance <= r.ci_high, r


def test_shuffled_keys_never_pair_a_row_with_its_own_group():
    groups = ["a"] * 5 + ["b"] * 3 + [f"s{i}" for i in range(12)]
    keys = np.array([{"a": 0.1, "b": 0.2}.get(g, 0.5 + i / 100) for i, g in enumerate(groups)])
    out = shuffled_keys(keys, seed=3, groups=groups)
    assert sorted(out) == sorted(keys)  # a permutation
    for g, k, s in zip(groups, keys, out):
        assert not (g in "ab" and s == k)
    assert np.array_equal(out, shuffled_keys(keys, seed=3, groups=groups))
    plain = shuffled_keys(np.arange(10.0), seed=1)
    assert not np.any(plain == np.arange(10.0))  # a derangement
    with pytest.raises(ValueError, match="largest group"):
        shuffled_keys(keys[:7], seed=0, groups=groups[:7])


def test_difference_interval():
    d, low, high = difference_ci(40, 100, 40, 100)
    assert d == 0 and low < 0 < high
    d, low, high = difference_ci(10, 100, 80, 100)
    assert d == pytest.approx(-0.7) and high < 0
    assert low < -0.7 < high
