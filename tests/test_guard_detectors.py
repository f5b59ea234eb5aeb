"""The guarded pipeline flags with a detector that reads only its own loop (``memorization_detector=``):
the registry detector's score, no extra UNet call, the stock images, a calibration that records its detector."""

from __future__ import annotations

import logging
import math
import shutil

import numpy as np
import pytest
import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline, StableDiffusionXLMemGuardPipeline
from diffusers.callbacks import SDCFGCutoffCallback
from pipeline_mixin import as_array, hook_state
from planted import TRIGGER, memorized_image_pipeline

from diffmem.detectors import get_detector
from diffmem.generation import initial_latents
from diffmem.guard.calibration import GuardCalibration
from diffmem.tiny import build_tiny_sdxl_pipeline

STEPS = 4  # the loop detectors read the first 3 steps at their defaults
LOOP_DETECTORS = ["broken-memories", "dsm"]
TRIGGER_PROMPT, ORDINARY_PROMPT = f"a photo of a {TRIGGER}", "a photo of a horse"


@pytest.fixture(scope="module")
def memorized():
    pipe, _ = memorized_image_pipeline()
    return pipe


def guarded_scores(pipe, prompts, num_gens=1, **kwargs):
    """The pipeline's scores from the noise and guidance the registry detectors use (``initial_latents`` of ids
    0, 1, ...; guidance 7.5, which is not SDXL's default)."""
    kwargs.setdefault("guidance_scale", 7.5)
    latents = initial_latents(pipe, list(range(len(prompts))), num_gens, 0)
    out = pipe(
        prompts, num_images_per_prompt=num_gens, num_inference_steps=STEPS, latents=latents,
        output_type="latent", **kwargs,
    )  # fmt: skip
    return out


def count_unet_calls(pipe, **kwargs) -> int:
    """UNet forwards of one call (a hook's own extra pass counted too)."""
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe(
            "a red circle", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
            output_type="latent", **kwargs,
        )  # fmt: skip
    finally:
        handle.remove()
    return len(calls)


# --- the known answer: the registry detector's score, and a threshold between the prompts ----------


@pytest.mark.parametrize("name", LOOP_DETECTORS)
def test_the_score_is_the_registry_detectors_and_flags_the_trigger(memorized, name):
    prompts = [TRIGGER_PROMPT, ORDINARY_PROMPT]
    expected = get_detector(name).score(
        memorized, prompts, num_gens=2, num_inference_steps=STEPS, progress=False
    )
    out = guarded_scores(
        memorized, prompts, num_gens=2, memorization_detector=name, memorization_threshold=0.0
    )
    ours = torch.tensor(out.memorization_scores).view(2, 2)
    torch.testing.assert_close(ours, expected)  # float32 tolerance: the same function on the same tensors
    assert expected[0].min() > 10 * expected[1].max()  # the planted memorization fires
    threshold = float(expected[0].min() + expected[1].max()) / 2
    flagged = guarded_scores(
        memorized, prompts, num_gens=2, memorization_detector=name, memorization_threshold=threshold
    )
    assert flagged.memorized == [True, True, False, False] and flagged.memorization_threshold == threshold


@pytest.mark.parametrize("name", LOOP_DETECTORS)
def test_sdxl_scores_as_the_registry(name):
    pipe = build_tiny_sdxl_pipeline(pipeline_class=StableDiffusionXLMemGuardPipeline)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle", "a photo of a cat"]
    expected = get_detector(name).score(pipe, prompts, num_gens=1, num_inference_steps=STEPS, progress=False)
    out = guarded_scores(pipe, prompts, memorization_detector=name, memorization_threshold=0.0)
    torch.testing.assert_close(torch.tensor(out.memorization_scores), expected[:, 0])


def test_a_detector_object_carries_its_settings(memorized):
    detector = get_detector("dsm", {"step": 0})
    expected = detector.score(
        memorized, [TRIGGER_PROMPT], num_gens=1, num_inference_steps=STEPS, progress=False
    )
    out = guarded_scores(
        memorized, [TRIGGER_PROMPT], memorization_detector=detector, memorization_threshold=0.0
    )
    torch.testing.assert_close(torch.tensor(out.memorization_scores), expected[0])
    default = guarded_scores(
        memorized, [TRIGGER_PROMPT], memorization_detector="dsm", memorization_threshold=0.0
    )
    assert default.memorization_scores != out.memorization_scores  # step 1 -> 2 is another number


# --- no extra UNet call, the stock images ----------------------------------------------------------


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_no_extra_unet_call(sd1_pipes, guidance_scale):
    stock, guarded = sd1_pipes
    n_stock = count_unet_calls(stock, guidance_scale=guidance_scale)
    n_wen = count_unet_calls(guarded, guidance_scale=guidance_scale, memorization_threshold=0.0)
    assert n_stock == STEPS
    for name in LOOP_DETECTORS:
        n = count_unet_calls(
            guarded, guidance_scale=guidance_scale, memorization_detector=name, memorization_threshold=0.0
        )
        assert n == n_stock, name
    # under guidance Wen's gap is free too; without it Wen's hook makes one unconditional call a step
    assert n_wen == (n_stock if guidance_scale > 1 else 2 * n_stock)


@pytest.mark.dropin
@pytest.mark.parametrize("name", LOOP_DETECTORS)
def test_images_are_the_stock_ones_with_the_callers_callback(sd1_pipes, name):
    """The reading callback runs after the caller's (a function, or a diffusers PipelineCallback object):
    the images are the stock pipeline's with the same callback, and the caller's callback sees every step."""
    stock, guarded = sd1_pipes
    seen = []

    def halve(p, i, t, kw):
        seen.append(i)
        return {"latents": kw["latents"] * 0.5}

    for callback in (None, halve, SDCFGCutoffCallback(cutoff_step_ratio=0.5)):
        kw = dict(
            prompt="a red circle", num_inference_steps=STEPS, output_type="np", callback_on_step_end=callback
        )
        a = stock(generator=torch.Generator().manual_seed(0), **kw)
        before = hook_state(guarded)
        b = guarded(generator=torch.Generator().manual_seed(0), memorization_detector=name, **kw)
        assert hook_state(guarded) == before
        np.testing.assert_array_equal(as_array(a.images), as_array(b.images))
        assert math.isfinite(b.memorization_scores[0])
    assert seen == list(range(STEPS)) * 2


def test_a_loop_that_stops_before_the_steps_read_scores_nan(sd1_pipes):
    _, guarded = sd1_pipes

    def stop(p, i, t, kw):
        p._interrupt = True
        return {}

    out = guarded("a red circle", num_inference_steps=STEPS, output_type="latent", callback_on_step_end=stop,
                  memorization_detector="dsm", memorization_threshold=0.0)  # fmt: skip
    assert math.isnan(out.memorization_scores[0]) and out.memorized == [False]


def test_a_mitigation_picks_images_by_its_own_threshold(memorized):
    """With a loop detector a mitigation needs mitigation_threshold (the first step's noise gap picks the images
    before the loop); the flag is the detector's score of the loop as run, and an image not picked comes out
    as without mitigation, score included."""
    prompts = [TRIGGER_PROMPT, ORDINARY_PROMPT]
    plain = guarded_scores(memorized, prompts, memorization_detector="dsm", memorization_threshold=0.0)
    out = guarded_scores(memorized, prompts, memorization_detector="dsm", memorization_threshold=0.0,
                         mitigation="guidance-delay", mitigation_threshold=2.0)  # fmt: skip
    assert [m["action"] for m in out.mitigations] == ["guidance-delay", "none"]
    assert out.memorization_scores[1] == plain.memorization_scores[1]
    assert out.memorization_scores[0] != plain.memorization_scores[0]


# --- settings: the pipeline attribute, from_pipe, bad input ------------------------------------------


def test_the_pipeline_attribute_is_the_default_and_from_pipe_keeps_it(memorized):
    explicit = guarded_scores(
        memorized, [TRIGGER_PROMPT], memorization_detector="dsm", memorization_threshold=0.0
    )
    derived = StableDiffusionMemGuardPipeline.from_pipe(memorized)
    derived.set_progress_bar_config(disable=True)
    derived.memorization_detector = "dsm"
    again = StableDiffusionMemGuardPipeline.from_pipe(derived)
    assert again.memorization_detector == "dsm"
    out = guarded_scores(again, [TRIGGER_PROMPT], memorization_threshold=0.0)
    assert out.memorization_scores == explicit.memorization_scores


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(memorization_detector="hessian-difference"), r"memorization_detector='hessian-difference': expected one of 'wen', 'broken-memories', 'dsm'"),
        (dict(memorization_detector="nope"), "memorization_detector='nope': expected one of"),
        (dict(memorization_detector=3), "memorization_detector='int': expected one of"),
        (dict(memorization_detector="dsm", memorization_window=(0, 1)), "memorization_window: a setting of Wen's"),
        (dict(memorization_detector="dsm", return_step_scores=True), "return_step_scores: a setting of Wen's"),
        (dict(memorization_detector="dsm", num_inference_steps=2), "reads the first 3 sampling steps; num_inference_steps=2"),
        (dict(memorization_detector="broken-memories", mitigation="guidance-delay", memorization_threshold=1.0), "mitigation_threshold: needed with"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(sd1_pipes, kwargs, match):
    _, guarded = sd1_pipes
    before = hook_state(guarded)
    kwargs = {"num_inference_steps": STEPS, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        guarded("a cat", output_type="latent", **kwargs)
    assert len(str(err.value).splitlines()) == 1
    assert hook_state(guarded) == before


def test_a_scheduler_with_two_calls_a_step_is_refused(sd1_pipes):
    from diffusers import HeunDiscreteScheduler

    _, guarded = sd1_pipes
    derived = StableDiffusionMemGuardPipeline.from_pipe(guarded)
    derived.scheduler = HeunDiscreteScheduler.from_config(guarded.scheduler.config)
    with pytest.raises(
        ValueError,
        match="memorization_detector='dsm': reads one UNet call per sampling step; HeunDiscreteScheduler makes 2",
    ):
        derived("a cat", num_inference_steps=STEPS, output_type="latent", memorization_detector="dsm")  # fmt: skip


# --- calibrated like Wen's ---------------------------------------------------------------------------


def load(path):
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_calibration_is_for_one_detector(tiny_sd1_dir, tmp_path, caplog):
    """``set_guard_threshold(..., detector=)`` saves the detector with the threshold; the reloaded folder
    flags with it by default and refuses (one warning line, ``memorized`` None) to flag with another."""
    pipe = load(tiny_sd1_dir)
    prompts = ["a red circle", "a cat"]
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    kw = dict(num_inference_steps=STEPS, output_type="latent")
    low, high = sorted(pipe(prompts, generator=gens, memorization_detector="broken-memories", memorization_threshold=0.0, **kw).memorization_scores)  # fmt: skip
    assert low < high
    with pytest.raises(ValueError, match="guidance_scale: needed"):
        pipe.set_guard_threshold(1.0, num_inference_steps=STEPS, detector="broken-memories")
    with pytest.raises(ValueError, match="window: the noise gap's"):
        pipe.set_guard_threshold(
            1.0, num_inference_steps=STEPS, detector="dsm", window=(0, 1), guidance_scale=7.5
        )
    with pytest.raises(ValueError, match="detector='hessian-difference': expected one of"):
        pipe.set_guard_threshold(
            1.0, num_inference_steps=STEPS, detector="hessian-difference", guidance_scale=7.5
        )
    calibration = pipe.set_guard_threshold((low + high) / 2, num_inference_steps=STEPS, detector="broken-memories", guidance_scale=7.5)  # fmt: skip
    assert calibration.detector == {"name": "broken-memories", "steps": 3, "start": 0}
    assert calibration.memorization_window == (0, 3)
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")
    assert reloaded.calibration == calibration

    def run(**more):
        return reloaded(prompts, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **kw, **more)

    out = run()  # no detector, no threshold: both from the calibration
    assert sorted(out.memorization_scores) == [low, high] and sorted(out.memorized) == [False, True]
    assert out.memorization_threshold == calibration.memorization_threshold
    for other in ("wen", "dsm", get_detector("broken-memories", {"steps": 2})):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="diffmem"):
            refused = run(memorization_detector=other)
        assert refused.memorized is None and refused.memorization_threshold is None
        lines = [r.getMessage() for r in caplog.records]
        assert (
            len(lines) == 1
            and "memorization_detector" in lines[0]
            and "calibrated: {'name': 'broken-memories'" in lines[0]
        )
    # the guidance scale matters from the first step on: the latents are the guided loop's
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        assert run(guidance_scale=5.0).memorized is None
    # a calibration file from before detectors were recorded is Wen's: a loop detector is refused with it
    wen = GuardCalibration(
        **{**calibration.to_dict(), "memorization_detector": None, "memorization_window": (0, 1)}
    )
    assert wen.detector == {"name": "wen"}
    reloaded.calibration = wen
    assert run().memorized is not None and run(memorization_detector="dsm").memorized is None


def test_detect_writes_a_calibration_for_the_detector(tiny_sd1_dir, tmp_path, capsys):
    """``diffmem detect --detector dsm --labels ... --save-calibration``: the folder then flags with dsm, and the
    pipeline's scores are detect's for the same noise; ``--fpr`` too. Usage errors are one line."""
    import json

    from diffmem.cli import main

    model = tmp_path / "m"
    shutil.copytree(tiny_sd1_dir, model)
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption,label\na red circle,1\na cat,0\na dog,0\nthe red circle,1\n")
    out = tmp_path / "s.jsonl"
    base = ["detect", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--num-gens", "1",
            "--num-inference-steps", str(STEPS), "--no-progress", "--detector", "dsm"]  # fmt: skip
    assert main([*base, "--labels", "label", "--save-calibration", str(model)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["detector"] == {"name": "dsm", "step": 1} and rows[0]["window"] == [0, 3]
    calibration = GuardCalibration.from_pretrained(model)
    assert calibration.detector == {"name": "dsm", "step": 1} and calibration.memorization_window == (0, 3)
    pipe = load(model)
    ids = list(range(4))
    latents = initial_latents(pipe, ids, 1, 0)
    flagged = pipe(
        [r["prompt"] for r in rows], num_inference_steps=STEPS, latents=latents, output_type="latent"
    )
    np.testing.assert_allclose(flagged.memorization_scores, [r["score"] for r in rows], rtol=1e-5)
    assert flagged.memorized == [r["score"] >= calibration.memorization_threshold for r in rows]
    # a rerun with another detector refuses the results file; unlabelled: the FPR calibration records it
    capsys.readouterr()
    assert main([*base[:-1], "broken-memories", "--labels", "label"]) == 2
    assert "holds results made with other settings" in capsys.readouterr().err
    fpr_out = ["--out", str(tmp_path / "f.csv")]
    assert (
        main([*base[:-1], "broken-memories", *fpr_out, "--fpr", "0.25", "--save-calibration", str(model)])
        == 0
    )
    assert GuardCalibration.from_pretrained(model).detector == {
        "name": "broken-memories",
        "steps": 3,
        "start": 0,
    }
    assert (
        main([*base[:-1], "broken-memories", *fpr_out, "--fpr", "0.25", "--save-calibration", str(model)])
        == 0
    )  # resumed from the CSV
    for extra, needle in (
        (["--steps", "3"], "--start/--steps"),
        (["--detector", "hessian-difference"], "--detector"),
    ):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1], err
