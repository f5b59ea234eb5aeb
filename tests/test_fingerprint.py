"""The model fingerprint: every weight counts, it is cached, diffmem's own edits keep it, old ids get a clear line."""

from __future__ import annotations

import copy

import pytest
import torch

from diffmem.edits import NeuronSet, WeightMask, applied
from diffmem.fingerprint import (
    FINGERPRINT_PREFIX,
    FingerprintMismatchError,
    content_fingerprint,
    legacy_fingerprint,
    model_fingerprint,
)
from diffmem.hooks.ffn import ffn_layers
from diffmem.hooks.neurons import value_layers
from diffmem.tiny import TinySDConfig, build_components


@pytest.fixture()
def unet():
    return build_components(TinySDConfig(variant="sd1"), seed=0)["unet"]


def _fine_tune_one_weight(unet, name: str) -> None:
    """What a fine-tune that moved only ``name`` does (an optimizer step: an in-place update)."""
    with torch.no_grad():
        unet.get_parameter(name).add_(1e-3)


def _edits(unet):
    names = list(value_layers(unet))
    neurons = NeuronSet(model_fingerprint(unet), names, [[0]] + [[] for _ in names[1:]])
    layer = next(iter(ffn_layers(unet)))
    mask = torch.zeros_like(ffn_layers(unet)[layer].weight, dtype=torch.bool)
    mask[0, 0] = True
    return neurons, WeightMask({layer: mask}, model_fingerprint(unet))


def test_any_weight_changes_it_and_the_old_one_did_not(unet):
    before, legacy = model_fingerprint(unet), legacy_fingerprint(unet)
    assert before.startswith(FINGERPRINT_PREFIX) and model_fingerprint(unet) == before  # cached, stable
    # a weight far from conv_in/time_embedding: the old fingerprint missed exactly this
    name = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight"
    _fine_tune_one_weight(unet, name)
    assert model_fingerprint(unet) != before and legacy_fingerprint(unet) == legacy
    assert model_fingerprint(unet) == content_fingerprint(unet)  # the cache saw the in-place step


def test_edits_of_the_model_are_refused_by_its_fine_tune_on_every_path(unet, tiny_sd1_dir):
    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    from diffmem.mitigations.nemo import NeMoMitigation

    neurons, mask = _edits(unet)
    tuned = copy.deepcopy(unet)
    _fine_tune_one_weight(tuned, "mid_block.resnets.0.conv1.weight")
    for edit in (neurons, mask):
        edit.validate(unet)
        with pytest.raises(FingerprintMismatchError, match="not for this one"):
            edit.validate(tuned)
        with pytest.raises(FingerprintMismatchError):
            with applied(tuned, edit):
                pass
    # the guarded pipeline checks a NeuronSet on every call, flagged or not
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    foreign = NeuronSet(model_fingerprint(tuned), neurons.layers, neurons.neurons)
    with pytest.raises(FingerprintMismatchError):
        pipe(
            "a photo",
            num_inference_steps=2,
            output_type="np",
            mitigation=NeMoMitigation(neuron_set=foreign),
            memorization_threshold=1e9,  # nothing is flagged
        )


def test_applied_edits_keep_the_identity_and_nest(unet):
    neurons, mask = _edits(unet)
    identity = model_fingerprint(unet)
    with applied(unet, neurons):
        assert model_fingerprint(unet) == identity and content_fingerprint(unet) != identity
        with applied(unet, mask):  # a second edit of the same model validates inside the first
            assert model_fingerprint(unet) == identity
    assert model_fingerprint(unet) == identity == content_fingerprint(unet)


def test_float16_load_agrees_with_float32(unet):
    half = copy.deepcopy(unet).to(torch.float16)
    assert model_fingerprint(half) == model_fingerprint(unet)


def test_old_fingerprints_name_what_to_do(unet):
    neurons, _ = _edits(unet)
    old = NeuronSet(legacy_fingerprint(unet), neurons.layers, neurons.neurons)
    with pytest.raises(
        FingerprintMismatchError, match="old fingerprint .* cannot tell this model from a fine-tune"
    ):
        old.validate(unet)
    other = NeuronSet("0123456789abcdef", neurons.layers, neurons.neurons)
    with pytest.raises(
        FingerprintMismatchError, match="made for another model \\(old fingerprint 0123456789abcdef\\)"
    ):
        other.validate(unet)


def test_a_saved_pipeline_with_a_loaded_edit_keeps_its_identity_and_calibration(tiny_sd1_dir, tmp_path):
    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    from diffmem.guard.calibration import GuardCalibration

    pipe = StableDiffusionMemGuardPipeline.from_pretrained(tiny_sd1_dir)
    identity = model_fingerprint(pipe.unet)
    pipe.calibration = GuardCalibration(
        memorization_threshold=0.5, memorization_window=(0, 1), model_fingerprint=identity
    )
    neurons, _ = _edits(pipe.unet)
    pipe.load_edit(neurons)
    assert model_fingerprint(pipe.unet) == identity
    pipe.save_pretrained(tmp_path / "edited")
    pipe.unload_edit()
    assert model_fingerprint(pipe.unet) == identity == content_fingerprint(pipe.unet)
    again = StableDiffusionMemGuardPipeline.from_pretrained(tmp_path / "edited")
    assert model_fingerprint(again.unet) == identity != content_fingerprint(again.unet)
    assert again.calibration is not None and again.calibration.memorization_threshold == 0.5
    neurons.validate(again.unet)


def test_loading_the_same_files_again_is_not_hashed_again(tiny_sd1_dir, tmp_path, monkeypatch):
    import shutil

    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    import diffmem.fingerprint as modelio

    folder = shutil.copytree(tiny_sd1_dir, tmp_path / "m")
    first = model_fingerprint(StableDiffusionMemGuardPipeline.from_pretrained(folder).unet)
    calls = []
    real = modelio.content_fingerprint
    monkeypatch.setattr(modelio, "content_fingerprint", lambda unet: calls.append(1) or real(unet))
    assert model_fingerprint(StableDiffusionMemGuardPipeline.from_pretrained(folder).unet) == first
    assert calls == []  # remembered by the files' identity
    # a fine-tune written over the same file is another identity: hashed, and another fingerprint
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(folder)
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.5)
    pipe.unet.save_pretrained(folder / "unet")
    tuned = StableDiffusionMemGuardPipeline.from_pretrained(folder).unet
    assert calls and model_fingerprint(tuned) != first


def test_a_bfloat16_load_of_a_folder_is_the_folders_model(tiny_sd1_dir):
    """bfloat16 rounds differently from float16: its identity comes from the files it was loaded from."""
    from diffmem.guard.auto import load_guarded

    full = load_guarded(tiny_sd1_dir)
    half = load_guarded(tiny_sd1_dir, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16
    assert content_fingerprint(half.unet) != model_fingerprint(full.unet)  # the rounding alone differs
    assert model_fingerprint(half.unet) == model_fingerprint(full.unet)
    with torch.no_grad():
        next(half.unet.parameters()).add_(1.0)  # changed after loading: no longer the folder's model
    assert model_fingerprint(half.unet) != model_fingerprint(full.unet)
