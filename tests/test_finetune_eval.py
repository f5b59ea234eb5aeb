"""The fine-tune evaluation (diffmem.train.finetune_eval): known answers on a model that copies, and the
organism end to end at a few steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from diffmem.guard.pipeline import MemGuardMixin
from diffmem.organism.finetune_data import build_duplicated_finetune_set

TINY = dict(n_images=12, duplicated=3, repeats=2, seed=0)


@pytest.fixture(scope="module")
def finetune_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("finetune") / "set"
    build_duplicated_finetune_set(path, **TINY)
    return path


@pytest.fixture(scope="module")
def organism():
    from diffmem.guard.auto import load_guarded
    from diffmem.modelio import default_model

    if default_model() is None:
        pytest.skip("weights/diffmem-organism-v2 is not present")
    pipe = load_guarded(None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _UNet(torch.nn.Module):
    """What the evaluation reads of a UNet: its config, dtype and weights (for the fingerprint)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(sample_size=16, in_channels=4)

    @property
    def dtype(self):
        return self.anchor.dtype


class CopyingModel(MemGuardMixin):
    """A "model" whose every generation of a caption is one given image, with a given first-step score."""

    vae_scale_factor = 4
    _execution_device = torch.device("cpu")

    def __init__(self, images: dict[str, np.ndarray], scores: dict[str, float]):
        self.images, self.scores = images, scores
        self.unet = _UNet()
        self._progress_bar_config: dict = {}

    def set_progress_bar_config(self, **kwargs):
        self._progress_bar_config = kwargs

    def __call__(self, prompt, num_images_per_prompt=1, num_inference_steps=25, **kwargs):
        prompts = [p for p in prompt for _ in range(num_images_per_prompt)]
        scores = torch.tensor([self.scores.get(p, 1.0) for p in prompts])
        return SimpleNamespace(
            images=np.stack([self.images[p] for p in prompts]).astype(np.float32) / 255,
            memorization_scores=scores.tolist(),
            memorization_step_scores=scores[:, None].expand(-1, num_inference_steps),
            mitigations=None,
        )


def _copying_model(truth, copy_single_from_other: bool) -> CopyingModel:
    """Duplicated captions give their own training image (score 10), the captions seen once another
    single image's (``copy_single_from_other``) or a fresh rendering of their colour and shape (score 1),
    generic and held-out captions a fresh rendering of what they name."""
    from diffmem.organism.data import render_generic

    fs = truth.finetune
    pixels = {
        i: (truth.training.pixels[k].permute(1, 2, 0) * 255).round().byte().numpy()
        for k, i in enumerate(fs.image_ids)
    }
    singles = truth.single_ids
    images, scores = {}, {}
    for i in fs.image_ids:
        caption = fs.captions[i]
        if i in fs.duplicated_ids:
            images[caption], scores[caption] = pixels[i], 10.0
        elif copy_single_from_other:
            images[caption] = pixels[singles[(singles.index(i) + 1) % len(singles)]]
        else:
            colour, shape = caption.split(",")[0].split()[1:]
            images[caption] = render_generic(colour, shape, 12345 + fs.image_ids.index(i), 64)
    for k, caption in enumerate(fs.generic_captions + fs.heldout_captions):
        _, colour, shape = caption.split()
        images[caption] = render_generic(colour, shape, 999 + k, 64)
    return CopyingModel(images, scores)


def _inside(rate: dict) -> bool:
    low, high = rate["ci"]
    return low - 1e-9 <= rate["rate"] <= high + 1e-9


def test_a_folder_that_is_not_a_finetuning_set_is_refused(tmp_path):
    from diffmem.data import write_image_folder
    from diffmem.train.finetune_eval import evaluate_finetune, read_finetune_set

    with pytest.raises(ValueError, match=r"manifest\.json: not found; expected a fine-tuning set"):
        read_finetune_set(tmp_path / "nowhere")
    write_image_folder(tmp_path / "plain", [("a", "a red circle", np.zeros((64, 64, 3), np.uint8))])
    with pytest.raises(ValueError, match=r"plain/manifest\.json: not found.*build_duplicated_finetune_set"):
        evaluate_finetune(None, tmp_path / "plain")
    (tmp_path / "plain" / "manifest.json").write_text(json.dumps({"duplicated_ids": []}))
    with pytest.raises(ValueError, match="no list heldout_captions, generic_captions"):
        evaluate_finetune(None, tmp_path / "plain")


def test_the_duplicated_images_themselves_replicate_and_others_do_not(finetune_dir):
    """Replication counting on given images: a training image replicates itself (own and any); another
    caption's training image replicates only the image it is (any, not own); a fresh rendering of the same
    colour and shape replicates nothing."""
    from diffmem.organism.evaluate import generate_and_measure
    from diffmem.train.finetune_eval import read_finetune_set, replication_rates

    truth = read_finetune_set(finetune_dir)
    fs = truth.finetune
    assert len(fs.image_ids) == 12 and len(fs.duplicated_ids) == 3 and fs.rows == 12 - 3 + 3 * 2
    assert {truth.copies[i] for i in fs.duplicated_ids} == {2} and {
        truth.copies[i] for i in truth.single_ids
    } == {1}
    captions = [(fs.captions[i], r) for i, r in zip(fs.image_ids, truth.training.roles)]
    for copy_other, single_any in ((True, 1.0), (False, 0.0)):
        model = _copying_model(truth, copy_single_from_other=copy_other)
        gens, _ = generate_and_measure(model, captions, truth.training, num_gens=2, progress=False)
        rates, per_image = replication_rates(gens, truth)
        dup, single = rates["duplicated"], rates["single"]
        assert dup["own"] == {
            "rate": 1.0,
            "ci": dup["own"]["ci"],
            "count": 6,
            "n": 6,
            "ci_images": [1.0, 1.0],
        }
        assert dup["any"]["rate"] == 1.0 and single["own"]["rate"] == 0.0 and single["own"]["n"] == 18
        assert single["any"]["rate"] == single_any
        assert all(_inside(r) for group in (dup, single) for r in group.values())
        assert rates["difference"]["difference"] == 1.0
        low, high = rates["difference"]["ci"]
        assert 0 < low <= 1.0 <= high + 1e-9
        rows = {r["image_id"]: r for r in per_image}
        assert set(rows) == set(fs.image_ids)
        for i in fs.duplicated_ids:
            assert (
                rows[i]["replicated_own"] == 2 and rows[i]["replicated_ids"] == [i] and rows[i]["copies"] == 2
            )
            assert rows[i]["mean_own_ssim"] == pytest.approx(1.0, abs=1e-4)
        for i in truth.single_ids:
            assert rows[i]["replicated_own"] == 0 and not rows[i]["duplicated"]
            assert rows[i]["replicated_any"] == (2 if copy_other else 0)
            if copy_other:  # the image it was given: the next single image's
                given = truth.single_ids[(truth.single_ids.index(i) + 1) % len(truth.single_ids)]
                assert rows[i]["replicated_ids"] == [given]
            else:
                assert rows[i]["replicated_ids"] == []


def test_the_interval_over_images_is_wider_when_generations_cluster_by_image():
    """Half the images replicate in every generation, half in none: 40 generations but 10 independent images.
    Wilson's interval over the generations understates the uncertainty; the bootstrap over images does not."""
    from diffmem.scores.solidmark import binomial_ci
    from diffmem.train.finetune_eval import image_bootstrap_ci

    counts, ns = [4] * 5 + [0] * 5, [4] * 10
    low, high = image_bootstrap_ci(counts, ns, seed=0)
    w_low, w_high = binomial_ci(20, 40)
    assert low < 0.5 < high and (high - low) > 1.3 * (w_high - w_low)
    assert image_bootstrap_ci(counts, ns, seed=0) == [low, high]  # seeded
    # independent generations (every image replicates in half of its generations): no wider than Wilson
    b_low, b_high = image_bootstrap_ci([2] * 10, ns, seed=0)
    assert (b_high - b_low) < (w_high - w_low)


def test_evaluate_finetune_known_answers_on_a_model_that_copies(finetune_dir):
    """End to end on a "model" whose generations of the duplicated captions ARE their images and whose
    first-step score separates them: replication 1 vs 0, AUC 1."""
    from diffmem.organism.fidelity import load_caption_classifier
    from diffmem.train.finetune_eval import evaluate_finetune, read_finetune_set

    truth = read_finetune_set(finetune_dir)
    model = _copying_model(truth, copy_single_from_other=False)
    classifier = load_caption_classifier()
    ev = evaluate_finetune(
        model, finetune_dir, seeds_per_caption=2, num_inference_steps=3, classifier=classifier
    )
    d = json.loads(json.dumps(ev.to_dict()))  # JSON-able
    assert set(d) == {
        "settings", "finetune_set", "replication", "per_image", "fidelity", "detection", "seconds",
    }  # fmt: skip
    assert (
        d["replication"]["duplicated"]["own"]["rate"] == 1.0
        and d["replication"]["single"]["own"]["rate"] == 0.0
    )
    det = d["detection"]
    assert det["auc"] == 1.0 and det["chance_auc"] == 0.5 and det["n_positive"] == det["n_negative"] == 3
    assert set(det["negative_ids"]) <= set(truth.single_ids) and len(set(det["negative_ids"])) == 3
    assert {i: det["scores"][i] for i in truth.finetune.duplicated_ids} == dict.fromkeys(
        truth.finetune.duplicated_ids, 10.0
    )
    # fresh renderings of what the captions name: the classifier reads nearly all of them right
    for name, n in (("generic", 32 * 2), ("heldout", 16 * 2), ("all", 48 * 2)):
        f = d["fidelity"][name]
        assert f["n"] == n and f["both"] >= 0.9
        assert f["both_ci"][0] <= f["both"] <= f["both_ci"][1]
    assert "duplicated images: 100.0%" in ev.summary_text()
    # the negatives are drawn from the seed: another seed, another draw (here, of 9 choose 3)
    other = evaluate_finetune(
        model, finetune_dir, seeds_per_caption=1, num_inference_steps=3, seed=1, classifier=classifier
    )
    assert other.detection["negative_ids"] != det["negative_ids"]
    with pytest.raises(ValueError, match="negatives: 10 asked.*only 9 images seen once"):
        evaluate_finetune(model, finetune_dir, negatives=10, classifier=classifier)


def test_a_set_at_another_size_is_refused(tmp_path):
    from diffmem.train.finetune_eval import evaluate_finetune, read_finetune_set

    build_duplicated_finetune_set(tmp_path / "small", **TINY, image_size=32)
    assert read_finetune_set(tmp_path / "small").training.pixels.shape[-2:] == (32, 32)
    with pytest.raises(ValueError, match="32x32 px but the model generates 64x64 px"):
        evaluate_finetune(CopyingModel({}, {}), tmp_path / "small")


@pytest.mark.slow
def test_evaluate_finetune_on_the_organism(organism, finetune_dir):
    """The real organism at 4 steps and one seed: the structure, intervals around their values, scores
    that repeat for the same seed and change with another, and a stock pipeline measured the same."""
    from diffmem.train.finetune_eval import evaluate_finetune

    kw = dict(seeds_per_caption=1, num_inference_steps=4)
    ev = evaluate_finetune(organism, finetune_dir, **kw)
    d = json.loads(json.dumps(ev.to_dict()))
    assert d["settings"]["replication_threshold"] == 0.7 and d["finetune_set"]["settings"] == {
        **TINY,
        "image_size": 64,
    }
    rep = d["replication"]
    assert rep["duplicated"]["own"]["n"] == 3 and rep["single"]["own"]["n"] == 9
    assert all(_inside(r) for group in ("duplicated", "single") for r in rep[group].values())
    assert len(d["per_image"]) == 12 and sum(r["first_step_score"] is not None for r in d["per_image"]) == 6
    det = d["detection"]
    assert 0.0 <= det["auc"] <= 1.0 and det["chance_auc"] == 0.5
    assert det["auc_ci"][0] <= det["auc"] <= det["auc_ci"][1]
    assert {k: v["n"] for k, v in d["fidelity"].items()} == {"generic": 32, "heldout": 16, "all": 48}
    again = evaluate_finetune(organism, finetune_dir, **kw).to_dict()
    assert again["detection"]["scores"] == det["scores"] and again["fidelity"] == d["fidelity"]
    other = evaluate_finetune(organism, finetune_dir, seed=1, **kw).to_dict()
    assert other["detection"]["scores"] != det["scores"]
    # a stock diffusers pipeline is measured the same (it is wrapped in the guarded one)
    from diffusers import StableDiffusionPipeline

    stock = evaluate_finetune(StableDiffusionPipeline.from_pipe(organism), finetune_dir, **kw).to_dict()
    for i, s in det["scores"].items():
        assert stock["detection"]["scores"][i] == pytest.approx(s, rel=1e-5)
    assert stock["replication"] == d["replication"]
