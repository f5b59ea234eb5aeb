"""``evaluate.sd_likeness.nemo_floors``: NeMo's empty-prompt floor per caption (also ``benchmarks/nemo_floor.py``)."""

from __future__ import annotations

import pytest

from diffmem.evaluate.sd_likeness import nemo_floors
from diffmem.localize.nemo import NemoConfig
from diffmem.tiny import TinySDConfig, build_tiny_pipeline

CONFIG = NemoConfig(n_seeds=4)


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0)


def test_the_empty_prompt_is_its_own_floor_and_a_given_tau_is_used(pipe):
    captions = ["", "a red circle"]
    out = nemo_floors(pipe, (), captions, config=CONFIG, threshold=2.0)
    assert out["tau"] == 2.0 and out["below_tau"] == [True, True]
    assert out["floors"][0] == pytest.approx(1.0, abs=1e-4)  # same seed, same noise differences
    assert out["floors"][1] < out["floors"][0]
    mid = (out["floors"][0] + out["floors"][1]) / 2
    between = nemo_floors(pipe, (), captions, config=CONFIG, threshold=mid)
    assert between["floors"] == out["floors"] and between["below_tau"] == [False, True]


def test_without_a_tau_it_is_calibrated_on_the_references_and_the_floors_do_not_change(pipe):
    given = nemo_floors(pipe, (), ["a red circle"], config=CONFIG, threshold=0.5)
    calibrated = nemo_floors(
        pipe, ["a blue square", "a green star", "two dogs"], ["a red circle"], config=CONFIG
    )
    assert calibrated["floors"] == given["floors"]
    assert 0 < calibrated["tau"] <= 1 and calibrated["tau"] != 0.5
