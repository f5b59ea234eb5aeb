"""The mitigation protocol and registry: a new mitigation is one class, plugged in by name."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from pipeline_mixin import NUM_STEPS, hook_state

from diffmem.mitigations import (
    Mitigation,
    MitigationPlan,
    available_mitigations,
    get_mitigation,
    register_mitigation,
)

PROMPTS = ["a red circle", "a cat"]


@register_mitigation
class EmptyPromptForFlagged(Mitigation):
    """Known answer: a flagged image gets the empty prompt's embedding, so it is the image of prompt ""."""

    name = "test-empty-prompt"
    kind = "embedding"

    def __init__(self, marker: str = "swapped"):
        self.marker = marker
        self.entered = self.exited = 0

    @contextlib.contextmanager
    def _context(self):
        self.entered += 1
        try:
            yield
        finally:
            self.exited += 1

    def plan(self, batch):
        rows = [k for k, f in enumerate(batch.flagged) if f]
        batch.prompt_embeds = batch.prompt_embeds.clone()
        batch.prompt_embeds[rows] = batch.negative_prompt_embeds[rows]
        return MitigationPlan(
            context=self._context(), report={k: {"action": self.name, "note": self.marker} for k in rows}
        )


@pytest.fixture(scope="module")
def pipes(sd1_pipes):
    return sd1_pipes


def call(pipe, prompts=PROMPTS, **kw):
    gens = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    return pipe(prompts, num_inference_steps=NUM_STEPS, generator=gens, output_type="np", **kw)


def test_a_registered_class_is_found_by_name(pipes):
    stock, guarded = pipes
    assert {"nemo", "embedding", "test-empty-prompt"} <= set(available_mitigations())
    plain = call(guarded, memorization_window=(0, 1))
    threshold = sum(plain.memorization_scores) / 2
    flagged = [s >= threshold for s in plain.memorization_scores]
    assert sum(flagged) == 1
    out = call(
        guarded,
        mitigation="test-empty-prompt",
        mitigation_options={"marker": "m"},
        memorization_threshold=threshold,
        memorization_window=(0, 1),
    )
    k, j = flagged.index(True), flagged.index(False)
    assert out.mitigations[k]["action"] == "test-empty-prompt" and out.mitigations[k]["note"] == "m"
    assert out.mitigations[j]["action"] == "none" and "note" not in out.mitigations[j]
    np.testing.assert_array_equal(out.images[j], plain.images[j])  # unflagged: untouched
    empty = stock(
        [""], num_inference_steps=NUM_STEPS, generator=[torch.Generator().manual_seed(k)], output_type="np"
    )
    # flagged: the empty prompt's image (to float rounding: it was computed in a batch of two)
    np.testing.assert_allclose(out.images[k], empty.images[0], atol=1e-5)
    assert out.memorization_scores[k] == 0.0


def test_the_plan_context_is_undone_also_on_failure(pipes):
    _, guarded = pipes
    mitigation = EmptyPromptForFlagged()
    before = hook_state(guarded)

    def fail(p, i, t, kw):
        assert mitigation.entered == 1 and mitigation.exited == 0
        raise RuntimeError("planted failure")

    with pytest.raises(RuntimeError, match="planted failure"):
        call(guarded, mitigation=mitigation, memorization_threshold=0.0, callback_on_step_end=fail)
    assert mitigation.exited == 1 and hook_state(guarded) == before


def test_registry_errors():
    with pytest.raises(ValueError, match="registered already"):

        @register_mitigation
        class Again(EmptyPromptForFlagged):
            name = "test-empty-prompt"

    with pytest.raises(TypeError, match="Mitigation subclass"):
        register_mitigation(int)
    with pytest.raises(ValueError, match="not registered; registered: .*'embedding'"):
        get_mitigation("nope")
    with pytest.raises(ValueError, match="set them on the object"):
        get_mitigation(EmptyPromptForFlagged(), {"marker": "x"})
    with pytest.raises(ValueError, match="mitigation_options for 'test-empty-prompt'"):
        get_mitigation("test-empty-prompt", {"bogus": 1})
    assert get_mitigation(None) is None
    assert repr(get_mitigation("embedding", {"lr": 0.1})).startswith("EmbeddingMitigation(lr=0.1")
