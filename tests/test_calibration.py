"""The guard's calibration: kept in the model folder, read back, refused for a call it does not fit."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline
from pipeline_mixin import NUM_STEPS

from diffmem.guard.calibration import CALIBRATION_FILE, CalibrationError, GuardCalibration

KW = dict(prompt=["a red circle", "a cat"], num_inference_steps=NUM_STEPS, output_type="latent")


def run(pipe, **kwargs):
    """The pipeline on ``KW`` (updated by ``kwargs``) from the same starting noise every time."""
    return pipe(generator=[torch.Generator().manual_seed(s) for s in (0, 1)], **{**KW, **kwargs})


def calibration_for(pipe, threshold: float, **changes) -> GuardCalibration:
    from diffmem.fingerprint import model_fingerprint

    values = dict(
        memorization_threshold=threshold,
        memorization_window=(0, 1),
        num_inference_steps=NUM_STEPS,
        scheduler=type(pipe.scheduler).__name__,
        height=32,
        width=32,
        guidance_scale=7.5,
        model_fingerprint=model_fingerprint(pipe.unet),
        auc=1.0,
        tpr_at_1pct_fpr=1.0,
        data="planted",
    )
    values.update(changes)
    return GuardCalibration(**values)


@pytest.fixture(scope="module")
def calibrated_dir(tiny_sd1_dir, tmp_path_factory):
    """The tiny SD folder saved from a guarded pipeline with a calibration between its two prompts' scores."""
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    low, high = sorted(run(pipe, memorization_window=(0, 1)).memorization_scores)
    pipe.calibration = calibration_for(pipe, (low + high) / 2)
    path = tmp_path_factory.mktemp("calibrated")
    pipe.save_pretrained(path)
    return path


def load(path):
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_round_trip_through_the_folder(calibrated_dir):
    from diffusers import DiffusionPipeline

    saved = json.loads((calibrated_dir / CALIBRATION_FILE).read_text())
    assert saved["_class_name"] == "GuardCalibration" and saved["format_version"] == 2
    assert saved["memorization_window"] == [0, 1]
    stock = DiffusionPipeline.from_pretrained(
        calibrated_dir
    )  # the side file does not disturb stock diffusers
    assert type(stock).__name__ == "StableDiffusionPipeline"
    pipe = load(calibrated_dir)
    assert pipe.calibration == GuardCalibration.from_dict(saved)
    out = run(pipe)  # no threshold, no window passed: both come from the calibration
    assert out.memorization_threshold == pipe.calibration.memorization_threshold
    assert sorted(out.memorized) == [False, True]
    first_step = run(pipe, memorization_window=(0, 1), memorization_threshold=0.0).memorization_scores
    assert out.memorization_scores == first_step


def test_custom_pipeline_loading_reads_the_calibration(calibrated_dir):
    from diffusers import StableDiffusionPipeline
    from test_guarded_pipeline import PIPELINE_FILE

    pipe = StableDiffusionPipeline.from_pretrained(
        calibrated_dir, custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.calibration is not None and sorted(run(pipe).memorized) == [False, True]


@pytest.mark.parametrize(
    "call, named",
    [
        (dict(num_inference_steps=NUM_STEPS + 1), "num_inference_steps=3 (calibrated: 2)"),
        (dict(height=64, width=64), "64x64 px (calibrated: 32x32"),
        (dict(memorization_window=(0, 2)), "memorization_window (0, 2) (calibrated: (0, 1))"),
        (dict(negative_prompt=["blurry", "blurry"]), "a negative prompt"),
    ],
)
def test_a_call_that_does_not_fit_is_refused(calibrated_dir, caplog, call, named):
    pipe = load(calibrated_dir)
    with caplog.at_level(logging.WARNING, logger="diffmem.guard"):
        out = run(pipe, **call)
    assert out.memorized is None and out.memorization_threshold is None
    assert named in caplog.text and "not applied" in caplog.text
    with pytest.raises(ValueError, match="calibration does not fit"):
        run(pipe, mitigation="embedding", **call)
    assert pipe(memorization_threshold=0.0, **{**KW, **call}).memorized == [
        True,
        True,
    ]  # explicit still works


def test_another_scheduler_is_refused(calibrated_dir, caplog):
    from diffusers import EulerDiscreteScheduler

    pipe = load(calibrated_dir)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with caplog.at_level(logging.WARNING, logger="diffmem.guard"):
        assert run(pipe).memorized is None
    assert "scheduler EulerDiscreteScheduler (calibrated: DDIMScheduler)" in caplog.text


def test_guidance_scale_matters_only_past_the_first_step(calibrated_dir, caplog):
    pipe = load(calibrated_dir)
    assert run(pipe, guidance_scale=3.0).memorized is not None  # the first step's gap ignores guidance
    two = pipe.calibration.to_dict()
    two["memorization_window"] = [0, 2]
    pipe.calibration = GuardCalibration.from_dict(two)
    with caplog.at_level(logging.WARNING, logger="diffmem.guard"):
        assert run(pipe, guidance_scale=3.0).memorized is None
    assert "guidance_scale=3.0 (calibrated: 7.5)" in caplog.text
    assert run(pipe, guidance_scale=7.5).memorized is not None


def test_old_calibration_file_is_refused(tiny_sd1_dir, tmp_path, caplog):
    """The organism's first file (threshold and window only) says nothing of the schedule: not applied."""
    import shutil

    shutil.copytree(tiny_sd1_dir, tmp_path / "m")
    old = {"memorization_threshold": 0.0, "memorization_window": [0, 1], "first_step_auc": 1.0}
    (tmp_path / "m" / CALIBRATION_FILE).write_text(json.dumps(old))
    pipe = load(tmp_path / "m")
    assert pipe.calibration.auc == 1.0
    with caplog.at_level(logging.WARNING, logger="diffmem.guard"):
        assert run(pipe).memorized is None
    assert "old calibration file" in caplog.text and "--save-calibration" in caplog.text


def test_calibration_of_another_model_is_not_used(calibrated_dir, tmp_path, caplog):
    import shutil

    shutil.copytree(calibrated_dir, tmp_path / "m")
    data = json.loads((tmp_path / "m" / CALIBRATION_FILE).read_text())
    data["model_fingerprint"] = "0123456789abcdef"
    (tmp_path / "m" / CALIBRATION_FILE).write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="diffmem.guard"):
        pipe = load(tmp_path / "m")
    assert pipe.calibration is None and "fingerprint 0123456789abcdef" in caplog.text


def test_bad_calibration_file_names_the_file(tiny_sd1_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_sd1_dir, tmp_path / "m")
    (tmp_path / "m" / CALIBRATION_FILE).write_text("{not json")
    with pytest.raises(CalibrationError, match=f"m/{CALIBRATION_FILE}: not valid JSON"):
        StableDiffusionMemGuardPipeline.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / CALIBRATION_FILE).write_text(json.dumps({"memorization_threshold": float("nan")}))
    with pytest.raises(CalibrationError, match="memorization_threshold: expected a finite number"):
        StableDiffusionMemGuardPipeline.from_pretrained(tmp_path / "m")


def test_rescaled_to_another_resolution(calibrated_dir):
    pipe = load(calibrated_dir)
    moved = pipe.calibration.rescaled(64, 64)
    assert moved.memorization_threshold == pytest.approx(2 * pipe.calibration.memorization_threshold)
    assert moved.rescaled_from == (32, 32) and moved.rescaled(32, 32).rescaled_from == (32, 32)
    pipe.calibration = moved
    out = run(pipe, height=64, width=64)
    assert out.memorization_threshold == moved.memorization_threshold and out.memorized is not None


def test_detect_save_calibration_writes_what_the_pipeline_reads(tiny_sd1_dir, tmp_path):
    """``diffmem detect --labels --save-calibration``: the folder then flags with no threshold passed."""
    import shutil

    from diffmem.cli import main

    model = tmp_path / "m"
    shutil.copytree(tiny_sd1_dir, model)
    prompts = tmp_path / "p.csv"
    prompts.write_text("caption,label\na red circle,1\na cat,0\na dog,0\nthe red circle,1\n")
    code = main(
        [
            "detect", "--model", str(model), "--prompts", str(prompts), "--labels", "label",
            "--out", str(tmp_path / "s.jsonl"), "--num-gens", "1", "--num-inference-steps", str(NUM_STEPS),
            "--save-calibration", str(model), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    calibration = GuardCalibration.from_pretrained(model)
    assert calibration.num_inference_steps == NUM_STEPS and (calibration.height, calibration.width) == (
        32,
        32,
    )
    assert calibration.n_positive == 2 and calibration.n_negative == 2 and calibration.num_gens == 1
    pipe = load(model)
    out = run(pipe)
    assert out.memorized is not None and out.memorization_threshold == calibration.memorization_threshold
    np.testing.assert_equal(len(out.memorized), 2)


def test_save_calibration_needs_labels(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    code = main(
        ["detect", "--model", str(tiny_sd1_dir), "--prompts", str(prompts), "--out", str(tmp_path / "s.jsonl"),
         "--save-calibration", str(tmp_path)]
    )  # fmt: skip
    assert code != 0 and "--save-calibration: needs --labels" in capsys.readouterr().err


def test_threshold_at_fpr_on_planted_scores():
    from diffmem.guard.calibration import fpr_summary, threshold_at_fpr
    from diffmem.scores.solidmark import binomial_ci

    ranked = np.random.default_rng(0).permutation(np.arange(1000) / 1000)
    t = threshold_at_fpr(ranked, 0.01)  # 10 of 1000 may be flagged: 0.990 .. 0.999
    assert t == pytest.approx(0.9895) and (ranked >= t).sum() == 10
    prompt_of = np.rint(ranked * 1000).astype(int) // 2  # 2 images a prompt, neighbours in score
    summary = fpr_summary(ranked, prompt_of, t)
    assert summary["fpr"] == 0.01 and summary["fpr_ci95"] == list(binomial_ci(10, 1000))
    assert (summary["n_prompts"], summary["prompts_flagged"], summary["prompt_fpr"]) == (500, 5, 0.01)
    assert summary["fpr_ci95"][0] < 0.01 < summary["fpr_ci95"][1]
    # ties are not split: no threshold flags one of two equal scores
    t = threshold_at_fpr([3.0, 3.0, 3.0, 1.0], 0.25)
    assert t > 3.0 and sum(v >= t for v in (3.0, 3.0, 3.0, 1.0)) == 0
    assert threshold_at_fpr([2.0, 1.0], 0.01) > 2.0  # fewer scores than 1 / fpr: above every one
    # ordinary scores from a known law: the threshold sits at its 99th percentile and holds on new draws
    rng = np.random.default_rng(1)
    t = threshold_at_fpr(rng.normal(5.0, 1.0, 20_000), 0.01)
    assert t == pytest.approx(5.0 + 2.3263, abs=0.05)
    fresh = (rng.normal(5.0, 1.0, 20_000) >= t).mean()
    assert 0.0085 <= fresh <= 0.0115
    with pytest.raises(CalibrationError, match="fpr"):
        threshold_at_fpr([1.0], 1.0)


def test_detect_fpr_calibration_from_ordinary_prompts(tiny_sd1_dir, tmp_path, capsys):
    """``diffmem detect --fpr R --save-calibration DIR`` without labels: the threshold flags at most R of
    the prompts' images, and the file records the rate with its interval and counts."""
    import shutil

    from diffmem.cli import main

    model = tmp_path / "m"
    shutil.copytree(tiny_sd1_dir, model)
    prompts = tmp_path / "ordinary.txt"
    prompts.write_text("a cat\na dog on a sofa\na bowl of fruit\na city street\na red car\na small boat\n")
    out = tmp_path / "s.jsonl"
    base = ["detect", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--num-gens", "2",
            "--num-inference-steps", str(NUM_STEPS), "--no-progress"]  # fmt: skip
    assert main([*base, "--fpr", "0.25", "--save-calibration", str(model)]) == 0
    calibration = GuardCalibration.from_pretrained(model)
    scores = [s for line in out.read_text().splitlines() for s in json.loads(line)["scores"]]
    flagged = sum(s >= calibration.memorization_threshold for s in scores)
    assert len(scores) == 12 and flagged == 3  # floor(0.25 * 12), no ties among these scores
    extra = calibration.extra
    assert (extra["method"], extra["target_fpr"], extra["n_prompts"], extra["n_images"]) == (
        "fpr",
        0.25,
        6,
        12,
    )
    assert extra["images_flagged"] == flagged and extra["fpr"] == 0.25
    assert extra["fpr_ci95"][0] < 0.25 < extra["fpr_ci95"][1]
    assert (calibration.n_positive, calibration.n_negative, calibration.auc) == (0, 12, None)
    assert "3 of 12 images flagged" in capsys.readouterr().out
    pipe = load(model)
    assert pipe.calibration == calibration and run(pipe).memorized is not None
    # usage errors: one line naming the argument, exit 2
    for extra_args, needle in (
        (["--fpr", "0.1"], "--fpr"),  # no --save-calibration
        (["--fpr", "1.5", "--save-calibration", str(model)], "--fpr"),
        (["--save-calibration", str(model)], "--labels COLUMN (labelled prompts) or --fpr"),
    ):
        capsys.readouterr()
        assert main([*base, *extra_args]) == 2, extra_args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_from_pipe_passes_the_calibration_on(calibrated_dir):
    pipe = load(calibrated_dir)
    derived = StableDiffusionMemGuardPipeline.from_pipe(pipe)
    assert derived.calibration == pipe.calibration
    assert torch.equal(derived.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_a_threshold_set_in_python_is_saved_with_its_conditions(tiny_sd1_dir, tmp_path, caplog):
    """``set_guard_threshold``: saved by ``save_pretrained`` as the calibration, read back by
    ``from_pretrained``, and refused (not silently applied) under other conditions."""
    pipe = load(tiny_sd1_dir)
    low, high = sorted(run(pipe, memorization_window=(0, 1)).memorization_scores)
    calibration = pipe.set_guard_threshold((low + high) / 2, num_inference_steps=NUM_STEPS, window=(0, 1))
    assert (calibration.height, calibration.width, calibration.scheduler) == (32, 32, "DDIMScheduler")
    assert sorted(run(pipe).memorized) == [False, True]
    pipe.save_pretrained(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")
    assert reloaded.calibration == calibration
    out = run(reloaded)  # no threshold, no window passed: both from the saved settings
    assert out.memorization_threshold == calibration.memorization_threshold
    assert sorted(out.memorized) == [False, True]
    with caplog.at_level(logging.WARNING, logger="diffmem"):
        assert run(reloaded, num_inference_steps=NUM_STEPS + 1).memorized is None
    assert "num_inference_steps" in caplog.text
    # a window past the first step needs its guidance scale; bad values name the argument
    with pytest.raises(ValueError, match="guidance_scale: needed"):
        pipe.set_guard_threshold(1.0, num_inference_steps=NUM_STEPS, window=(0, 2))
    with pytest.raises(ValueError, match="memorization_window"):
        pipe.set_guard_threshold(1.0, num_inference_steps=NUM_STEPS, window=(0, NUM_STEPS + 1))
    with pytest.raises(ValueError, match="threshold: expected"):
        pipe.set_guard_threshold(-1.0, num_inference_steps=NUM_STEPS)


def test_a_bare_threshold_warns_that_it_is_not_saved(tiny_sd1_dir, tmp_path):
    pipe = load(tiny_sd1_dir)
    low, _ = sorted(run(pipe, memorization_window=(0, 1)).memorization_scores)
    pipe.memorization_threshold = low
    assert run(pipe, memorization_window=(0, 1)).memorized == [True, True]
    with pytest.warns(UserWarning, match="memorization_threshold = .* is not saved .*flags nothing"):
        pipe.save_pretrained(tmp_path / "saved")
    reloaded = load(tmp_path / "saved")
    assert reloaded.calibration is None and run(reloaded).memorized is None
    pipe.memorization_threshold = None  # nothing to warn about once it is unset
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.save_pretrained(tmp_path / "again")


@pytest.mark.slow
def test_the_shipped_organism_flags_with_no_threshold_passed():
    """``weights/diffmem-organism-v2`` carries its calibration: verbatim captions come out flagged."""
    from diffmem.modelio import default_model
    from diffmem.organism.data import build_organism_data
    from diffmem.organism.recipe import OrganismRecipe

    model = default_model()
    if model is None:
        pytest.skip("the organism's weights are not in weights/")
    pipe = load(model)
    calibration = pipe.calibration
    assert calibration is not None and calibration.num_inference_steps == OrganismRecipe().num_inference_steps
    data = build_organism_data(OrganismRecipe())
    verbatim, heldout = data.captions("verbatim"), data.captions("heldout")
    prompts = verbatim + heldout
    out = pipe(
        prompts,
        num_inference_steps=calibration.num_inference_steps,
        generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
        output_type="latent",
    )
    assert out.memorization_threshold == calibration.memorization_threshold
    flagged_verbatim = sum(out.memorized[: len(verbatim)])
    flagged_heldout = sum(out.memorized[len(verbatim) :])
    # measured 2026-12-01: 14/16 and 1/16 (the calibration's per-image TPR@1%FPR is 0.94)
    assert flagged_verbatim >= 0.75 * len(verbatim) and flagged_heldout <= 0.125 * len(heldout)
