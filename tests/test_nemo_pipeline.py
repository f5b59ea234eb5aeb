"""Mitigation in the guarded pipeline, on the planted-neuron model: only flagged images change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_nemo import REFERENCE, TRIGGER, plant_trigger_neuron  # noqa: I001

from diffmem.edits import NeuronSet
from diffmem.fingerprint import FingerprintMismatchError
from diffmem.localize.nemo import NeMo, NemoConfig
from diffmem.localize.stats import compute_value_stats
from diffmem.mitigations.nemo import NeMoMitigation
from diffmem.tiny import TinySDConfig, build_components

PROMPTS = [f"a photo of {TRIGGER}", "a photo of a horse"]
STEPS = 4


@pytest.fixture(scope="module")
def guarded():
    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    c = build_components(TinySDConfig(variant="sd1"), seed=0)
    plant_trigger_neuron(c)
    pipe = StableDiffusionMemGuardPipeline(
        **c, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    stats = compute_value_stats(c["unet"], c["text_encoder"], c["tokenizer"], REFERENCE, progress=False)
    return pipe, stats


def _call(pipe, **kw):
    return pipe(
        PROMPTS, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np", **kw
    )


@pytest.fixture(scope="module")
def baseline(guarded):
    pipe, _ = guarded
    nothing = NeMoMitigation(stats=guarded[1])
    probe = _call(
        pipe, mitigation=nothing, memorization_threshold=1e9
    )  # nothing flagged: only the check runs
    gaps = [r["first_step_score"] for r in probe.mitigations]
    assert gaps[0] > 2 * gaps[1]  # the trigger's first-step gap stands out
    plain = _call(pipe, memorization_threshold=1e9)
    np.testing.assert_array_equal(probe.images, plain.images)  # unflagged = unmitigated, bit for bit
    assert all(r["action"] == "none" and not r["flagged"] for r in probe.mitigations)
    return plain, (gaps[0] + gaps[1]) / 2


def test_nemo_with_a_given_neuron_set(guarded, baseline):
    pipe, stats = guarded
    plain, threshold = baseline
    nemo = NeMo.from_pipe(pipe, stats, NemoConfig(threshold=0.45))
    neurons = nemo.localize(PROMPTS[0])
    assert 1 <= len(neurons) <= 3
    out = _call(
        pipe, mitigation="nemo", mitigation_options={"neuron_set": neurons}, memorization_threshold=threshold
    )
    assert [r["flagged"] for r in out.mitigations] == [True, False]
    assert out.mitigations[0]["action"] == "nemo" and out.mitigations[0]["neurons"] == len(neurons)
    np.testing.assert_array_equal(out.images[1], plain.images[1])
    assert np.abs(out.images[0] - plain.images[0]).mean() > 1e-3
    assert out.memorization_scores[0] < 0.5 * plain.memorization_scores[0]
    assert out.memorization_scores[1] == pytest.approx(plain.memorization_scores[1])


def test_nemo_localizes_automatically(guarded, baseline):
    pipe, stats = guarded
    plain, threshold = baseline
    mitigation = NeMoMitigation(stats=stats, config=NemoConfig(threshold=0.45))
    out = _call(pipe, mitigation=mitigation, memorization_threshold=threshold)
    assert out.mitigations[0]["action"] == "nemo" and 1 <= out.mitigations[0]["neurons"] <= 3
    assert out.memorization_scores[0] < 0.5 * plain.memorization_scores[0]
    assert not hasattr(pipe, "_diffmem_nemo_cache")  # no per-call state on the pipeline
    again = _call(pipe, mitigation=mitigation, memorization_threshold=threshold)  # localized once, cached
    assert len(mitigation._found) == 1
    np.testing.assert_array_equal(again.images, out.images)


def test_embedding_mitigation(guarded, baseline):
    pipe, _ = guarded
    plain, threshold = baseline
    out = _call(pipe, mitigation="embedding", memorization_threshold=threshold)
    first, second = out.mitigations
    assert first["action"] == "embedding" and second["action"] == "none"
    assert first["loss_after"] < first["loss_before"]
    np.testing.assert_array_equal(out.images[1], plain.images[1])
    assert out.memorization_scores[0] < plain.memorization_scores[0]


def test_bad_mitigation_inputs(guarded):
    pipe, _ = guarded
    other = build_components(TinySDConfig(variant="sd1"), seed=5)["unet"]
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.neurons import value_layers

    names = list(value_layers(other))
    foreign = NeuronSet(model_fingerprint(other), names, [[0]] + [[] for _ in names[1:]])
    with pytest.raises(FingerprintMismatchError):
        _call(pipe, mitigation=NeMoMitigation(neuron_set=foreign), memorization_threshold=0.0)
    with pytest.raises(FingerprintMismatchError):  # checked also when no image is flagged
        _call(pipe, mitigation=NeMoMitigation(neuron_set=foreign), memorization_threshold=1e9)
    with pytest.raises(ValueError, match="threshold"):
        _call(pipe, mitigation="embedding")
    with pytest.raises(ValueError, match="needs neuron_set= .* or stats="):
        _call(pipe, mitigation="nemo", memorization_threshold=0.0)
    with pytest.raises(ValueError, match="mitigation="):
        _call(pipe, mitigation="prune")
    with pytest.raises(ValueError, match="mitigation_options for 'embedding'"):
        _call(pipe, mitigation="embedding", mitigation_options={"steps": 3}, memorization_threshold=0.0)
