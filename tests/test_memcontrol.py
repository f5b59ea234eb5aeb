"""MemControl: the study over block masks, its objectives, resume after a trial was killed, the mask file."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from diffmem.train.adapters import load_trainable_blocks, transformer_blocks
from diffmem.train.memcontrol import (
    STUDY_NAME,
    MemControlConfig,
    check_fidelity_captions,
    detector_metric,
    fidelity_metric,
    memorization_metric,
    replication_metric,
    run_memcontrol,
)
from diffmem.train.text_to_image import TrainConfig, TrainingData


def _data(n: int, seed: int, prefix: str) -> TrainingData:
    rng = np.random.default_rng(seed)
    ids = [f"{prefix}{i}" for i in range(n)]
    return TrainingData(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), [f"{prefix} photo {i}" for i in range(n)],
                        ids, ids, prefix)  # fmt: skip


def test_memorization_metric_is_the_noise_gap_and_zero_for_empty_captions(tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    data = _data(3, 0, "m")
    m = memorization_metric(pipe, data, seed=1)
    assert m > 0 and m == memorization_metric(pipe, data, seed=1)
    empty = TrainingData(data.pixels, ["", "", ""], data.row_ids, data.image_ids)
    assert memorization_metric(pipe, empty, seed=1) == pytest.approx(0.0, abs=1e-6)


def test_a_detector_as_the_memorization_objective(tiny_sd1_dir):
    from diffmem.pipelines import StableDiffusionMemGuardPipeline
    from diffusers import StableDiffusionPipeline

    from diffmem.detectors import get_detector

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    kw = dict(seed=2, generations=2, inference_steps=3)
    m = detector_metric(pipe, ["a photo", "a cat", "a photo"], "wen", **kw)  # distinct captions
    guarded = StableDiffusionMemGuardPipeline.from_pipe(pipe)
    own = get_detector("wen").score(guarded, ["a photo", "a cat"], num_gens=2, seed=2, item_ids=["a photo", "a cat"],
                                    num_inference_steps=3, progress=False)  # fmt: skip
    assert m == pytest.approx(float(own.mean()), rel=1e-6) and m > 0
    with pytest.raises(ValueError, match="--memorization: expected one of noise-gap, .*wen"):
        MemControlConfig(memorization="loss").check()


def test_search_resumes_a_killed_trial_and_writes_a_usable_mask(tmp_path, tiny_sd1_dir):
    from diffusers import UNet2DConditionModel

    train, memorized, heldout = _data(6, 0, "t"), _data(2, 0, "t"), _data(3, 1, "h")
    inner = TrainConfig(steps=2, batch_size=2, mode="lora", checkpoint_every=1)
    config = MemControlConfig(trials=2, sampler="random", seed=0)
    first = run_memcontrol(tiny_sd1_dir, train, memorized, heldout, tmp_path, config, inner, progress=False)
    assert 1 <= len(first["trials"]) <= 2 and first["front"]
    # a trial killed mid-way: left RUNNING in the SQLite study
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")
    blocks = transformer_blocks(unet)
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'study.db'}")
    killed = study.ask()
    for b in blocks:
        killed.suggest_int(b, 0, 1)
    killed.suggest_float("lr", 1e-5, 1e-3, log=True)
    killed_params = dict(killed.params)
    if not any(killed_params[b] for b in blocks):
        pytest.skip("the drawn mask is empty")  # pragma: no cover (seeded: does not happen)
    again = run_memcontrol(tiny_sd1_dir, train, memorized, heldout, tmp_path,
                           MemControlConfig(trials=3, sampler="random", seed=0), inner, progress=False)  # fmt: skip
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'study.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == 1
    assert any(t.params == killed_params for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    done = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(done) == 3
    saved = json.loads((tmp_path / "pareto.json").read_text())
    assert saved["chosen"]["number"] in {t["number"] for t in saved["front"]}
    assert all(np.isfinite([t["memorization"], t["quality_loss"]]).all() for t in again["trials"])
    assert load_trainable_blocks(tmp_path / "trainable_blocks.json", unet) == again["chosen"]["blocks"]
    with pytest.raises(ValueError, match="other settings"):
        run_memcontrol(tiny_sd1_dir, train, memorized, heldout, tmp_path, config,
                       TrainConfig(steps=3, batch_size=2, mode="lora"), progress=False)  # fmt: skip
    assert np.isfinite(again["baseline"]["memorization"]) and again["search_seconds"] > 0


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_to_the_uninterrupted_result(tmp_path, tiny_sd1_dir):
    """`diffmem memcontrol` SIGKILLed inside its second trial's fine-tune, then rerun: the same trials (blocks,
    lr, both objectives, to the last bit) and the same chosen mask as a search that was never interrupted."""
    import os
    import signal
    import subprocess
    import sys

    from diffmem.data import ImageFolderWriter

    rng = np.random.default_rng(0)
    for name, n in (("data", 6), ("heldout", 3)):
        with ImageFolderWriter(tmp_path / name) as writer:
            for i in range(n):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                writer.add(f"{name}{i}", f"{name} photo {i}", pixels, memorized=int(name == "data" and i < 2))
    args = ["memcontrol", "--model", str(tiny_sd1_dir), "--data", str(tmp_path / "data"), "--heldout",
            str(tmp_path / "heldout"), "--trials", "3", "--sampler", "random", "--steps", "4", "--batch-size", "2",
            "--checkpoint-every", "2", "--no-progress"]  # fmt: skip
    straight = subprocess.run([sys.executable, "-m", "diffmem", *args, "--out", str(tmp_path / "a")],
                              capture_output=True, text=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    killer = (
        "import os, signal, sys; import diffmem.train.text_to_image as t; orig = t.save_checkpoint; first = []\n"
        "def save(root, step, *a, **k):\n"
        "    first.append(first[0] if first else root)\n"
        "    if step == 4 and root != first[0]: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(root, step, *a, **k)\n"
        "t.save_checkpoint = save\n"
        "from diffmem.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, *args, "--out", str(tmp_path / "b")],
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "b" / "pareto.json").exists()
    resumed = subprocess.run([sys.executable, "-m", "diffmem", *args, "--out", str(tmp_path / "b")],
                             capture_output=True, text=True, env=dict(os.environ))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "pareto.json").read_text()) for d in ("a", "b"))

    def trials(result):
        return [(t["blocks"], t["lr"], t["memorization"], t["quality_loss"]) for t in result["trials"]]

    assert len(a["trials"]) == 3 and trials(a) == trials(b)
    assert (a["chosen"]["blocks"], a["chosen"]["lr"]) == (b["chosen"]["blocks"], b["chosen"]["lr"])
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'b' / 'study.db'}")
    assert [t.state for t in study.trials].count(optuna.trial.TrialState.FAIL) == 1


@pytest.fixture(scope="module")
def organism():
    """The committed organism (v2) and four of its verbatim images, which it replicates."""
    from diffmem.guard.auto import load_guarded
    from diffmem.organism.data import build_organism_data
    from diffmem.organism.recipe import OrganismRecipe

    data = build_organism_data(OrganismRecipe(seed=0))
    rows = [i for i, im in enumerate(data.images) if im.role == "verbatim"][:4]
    ids = [data.images[i].id for i in rows]
    verbatim = TrainingData(
        data.image_array()[rows], [data.images[i].caption for i in rows], ids, ids, "verbatim"
    )
    return load_guarded(None), verbatim


def test_replication_objective_counts_copies_of_each_captions_own_image(organism):
    pipe, verbatim = organism
    kw = dict(seed=0, generations=4, inference_steps=25)
    copied = replication_metric(pipe, verbatim, **kw)
    assert copied >= 0.75  # the organism copies its verbatim images (RESULTS: organism v2)
    # the same captions with each other's images: no generation is a copy of its caption's image
    shuffled = TrainingData(
        verbatim.pixels[[1, 2, 3, 0]], verbatim.captions, verbatim.row_ids, verbatim.image_ids
    )
    assert replication_metric(pipe, shuffled, **kw) == 0.0
    # rows that repeat an image count it once: the rate is over captions' generations, not rows
    doubled = verbatim.subset([0, 0, 1, 1, 2, 3], "doubled")
    assert replication_metric(pipe, doubled, **kw) == copied
    small = TrainingData(
        verbatim.pixels[:, :32, :32], verbatim.captions, verbatim.row_ids, verbatim.image_ids, "s"
    )
    with pytest.raises(ValueError, match="s: images are 32x32 px but the model generates 64x64"):
        replication_metric(pipe, small, **kw)


def test_fidelity_objective_is_low_for_the_organism_and_one_without_its_text_encoder(organism):
    import copy

    import torch

    from diffmem.organism.fidelity import COLOURS, SHAPES

    pipe, _ = organism
    captions = [f"a {c} {s}" for c, s in zip(COLOURS, SHAPES)]
    kw = dict(seed=0, generations=4, inference_steps=10)
    assert fidelity_metric(pipe, captions, **kw) <= 0.7
    blind = copy.deepcopy(pipe)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a text encoder of noise: images no longer follow their captions
        for p in blind.text_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * p.std().clamp_min(1e-3))
    assert fidelity_metric(blind, captions, **kw) >= 0.9
    with pytest.raises(ValueError, match=r"--fidelity-captions: caption 2: caption 'a photo' is not"):
        check_fidelity_captions(["a red circle", "a photo"])
    with pytest.raises(ValueError, match="--quality: expected one of heldout-loss, caption-fidelity"):
        MemControlConfig(quality="fid").check()


def test_nsga2_breeds_after_its_population():
    from diffmem.train.memcontrol import _sampler

    config = MemControlConfig(trials=8)
    assert config.population_size() == 4 and MemControlConfig(trials=2).population_size() == 2
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=_sampler(config))
    for done in range(8):  # as run_memcontrol does: a new sampler every trial, seeded by the trials done
        study.sampler = _sampler(config, done)
        study.optimize(
            lambda t: (t.suggest_float("x", 0, 1), 1 - t.suggest_float("x", 0, 1) ** 2), n_trials=1
        )
    generations = [t.system_attrs.get("NSGAIISampler:generation") for t in study.trials]
    assert generations == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="--population: expected an integer >= 2"):
        MemControlConfig(population=1).check()


def test_a_search_with_measured_objectives_records_each_trials_own_values(tmp_path, organism):
    """replication + caption-fidelity: each trial's values are the metrics of the model it saved."""
    from diffmem.guard.auto import load_guarded

    _, verbatim = organism
    captions = ["a red circle", "a blue square"]
    config = MemControlConfig(trials=1, sampler="random", memorization="replication", quality="caption-fidelity",
                              generations=1, fidelity_generations=2, inference_steps=5)  # fmt: skip
    inner = TrainConfig(steps=2, batch_size=2, mode="lora")
    result = run_memcontrol(None, verbatim, verbatim, verbatim, tmp_path, config, inner, progress=False,
                            fidelity_captions=captions)  # fmt: skip
    assert result["objectives"] == {"memorization": "replication", "quality": "caption-fidelity"}
    (trial,) = result["trials"]
    trained = load_guarded(trial["model"])
    assert trial["memorization"] == replication_metric(trained, verbatim, 0, 1, 5)
    assert trial["quality_loss"] == pytest.approx(fidelity_metric(trained, captions, 0, 2, 5))
    settings = json.loads((tmp_path / "memcontrol.json").read_text())
    assert settings["fidelity_captions"] == captions and "population" not in settings["search"]
    with pytest.raises(ValueError, match="--fidelity-captions: caption 1"):
        run_memcontrol(None, verbatim, verbatim, verbatim, tmp_path / "b", config, inner, progress=False,
                       fidelity_captions=["not a colour caption"])  # fmt: skip
