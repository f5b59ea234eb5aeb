"""MemControl (Dutt et al., WACV 2025): search which UNet transformer blocks a fine-tune may train.

Outer loop: an Optuna study with two objectives, both minimised, over a binary mask of the UNet's
transformer blocks (one ``suggest_int(block, 0, 1)`` each, the paper's ``auto_attention`` space; at least one
block on) and the learning rate (log-uniform in ``[lr_low, lr_high]``, the paper's ``[1e-5, 1e-3]``):

- memorization (``memorization=``): ``noise-gap``, MemControl's (Wen et al.'s noise gap on the memorization
  set, with training images): ``m = mean_i || eps(z_t,i, t_i, c_i) - eps(z_t,i, t_i, empty) ||_2``, ``z_t``
  from the memorized rows' latents at seeded ``t`` and noise (the same draws for every trial);
  ``replication``, measured: the share of generations from the memorized captions that copy their own
  training image (:func:`replication_metric`, the project's one replication criterion); or a detector of
  the harness's registry at generation time on the memorized captions (:func:`detector_metric`);
- quality (``quality=``): ``heldout-loss``, the denoising loss on held-out data
  ``mean_i || eps - eps_theta(z_t,i, t_i, c_i) ||^2`` (seeded draws); or ``caption-fidelity``, one minus the
  share of generations from held-out captions that the organism's caption classifier reads as named
  (:func:`fidelity_metric`). The paper uses FID, which needs Inception weights (not available offline).

The paper's sampler is Optuna's default NSGA-II, whose first generation (50 trials) is random: with its 10
trials the paper's search is a random search. Here NSGA-II's population is ``population`` (default half the
trials), so the second half of a search is bred from the first.

Inner loop: :func:`diffmem.train.text_to_image.train_text_to_image` of the masked blocks (LoRA by default).
The study lives in SQLite (``study.db``) and each trial's fine-tune in ``trials/<hash of its parameters>``,
so a killed search resumes: a trial left running is marked failed and its parameters are run again, and
its fine-tune resumes from its own checkpoint; the sampler is seeded by the number of trials done, so the
resumed search draws the trials an uninterrupted one draws (tested with a SIGKILL). The Pareto front is written to ``pareto.json`` and the chosen
mask (the front's trial with the smallest sum of objectives, each scaled to [0, 1] over the front) to
``trainable_blocks.json``, for ``diffmem train --trainable-blocks``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from diffmem.detectors import available_detectors, get_detector
from diffmem.generation import generate
from diffmem.guard.auto import as_guarded
from diffmem.io import atomic_write_json, check_out_path
from diffmem.modelio import load_pipeline, stock_pipeline_class
from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier, parse_caption
from diffmem.organism.replication import replicates
from diffmem.seeding import derive_seed
from diffmem.train.adapters import save_trainable_blocks, transformer_blocks
from diffmem.train.mitigations import WenFilterMitigation, diffusion_draws
from diffmem.train.text_to_image import (
    TRAIN_RECORD,
    TrainConfig,
    TrainingData,
    caption_conditioning,
    encode_latents,
    train_text_to_image,
)

__all__ = [
    "MEMORIZATION_OBJECTIVES",
    "QUALITY_OBJECTIVES",
    "MemControlConfig",
    "data_noise_gaps",
    "detector_metric",
    "fidelity_metric",
    "memorization_metric",
    "replication_metric",
    "run_memcontrol",
    "validation_loss",
]

STUDY_NAME = "memcontrol"
#: the memorization objectives besides the registry's detectors, and the quality objectives
MEMORIZATION_OBJECTIVES = ("noise-gap", "replication")
QUALITY_OBJECTIVES = ("heldout-loss", "caption-fidelity")
#: classifier-free guidance of the objectives that generate (evaluate_finetune's default)
GUIDANCE_SCALE = 7.5


@dataclass(frozen=True)
class MemControlConfig:
    """The search's settings (the paper's defaults: 10 trials, NSGA-II, lr in [1e-5, 1e-3])."""

    trials: int = 10
    sampler: str = "nsga2"  # or "random", "tpe"
    lr_low: float = 1e-5
    lr_high: float = 1e-3
    seed: int = 0
    memorization: str = "noise-gap"  # "replication", or a registry detector, e.g. "wen"
    quality: str = "heldout-loss"  # or "caption-fidelity"
    generations: int = 4  # generations per memorized caption (replication, a detector)
    fidelity_generations: int = 1  # generations per caption of caption-fidelity
    inference_steps: int = 25  # the sampling steps of the objectives that generate
    population: int | None = None  # NSGA-II's population (default: half the trials, at least 2)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def generates(self) -> bool:
        """Whether an objective generates images (``generations`` and ``inference_steps`` matter)."""
        return self.memorization != "noise-gap" or self.quality == "caption-fidelity"

    def population_size(self) -> int:
        return self.population if self.population is not None else max(2, self.trials // 2)

    def check(self) -> None:

        if self.trials < 1 or not 0 < self.lr_low <= self.lr_high:
            raise ValueError("--trials must be at least 1 and 0 < --lr-low <= --lr-high")
        choices = (*MEMORIZATION_OBJECTIVES, *available_detectors())
        if self.memorization not in choices:
            raise ValueError(
                f"--memorization: expected one of {', '.join(choices)}, got {self.memorization!r}"
            )
        if self.quality not in QUALITY_OBJECTIVES:
            raise ValueError(
                f"--quality: expected one of {', '.join(QUALITY_OBJECTIVES)}, got {self.quality!r}"
            )
        if min(self.generations, self.fidelity_generations, self.inference_steps) < 1:
            raise ValueError("--generations, --fidelity-generations and --inference-steps must be at least 1")
        if self.population is not None and self.population < 2:
            raise ValueError(f"--population: expected an integer >= 2, got {self.population!r}")


def _draws(latents: torch.Tensor, scheduler, seed: int, scope: str) -> tuple[torch.Tensor, torch.Tensor]:

    seeds = [derive_seed(seed, "memcontrol", scope, i) for i in range(len(latents))]
    t, eps = diffusion_draws(seeds, latents.shape[1:], scheduler.config.num_train_timesteps)
    a = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    return t, a.sqrt() * latents + (1 - a).sqrt() * eps, eps


def _conds(pipe, data: TrainingData, captions):
    """``(encoder_hidden_states, added_cond_kwargs)`` of ``captions`` for ``pipe`` (SDXL's added conditions
    at the data's size)."""
    return caption_conditioning(pipe, captions, pipe.device, tuple(data.pixels.shape[1:3]))


def data_noise_gaps(pipe, data: TrainingData, seed: int = 0, batch: int = 32, scope: str = "memorization"):
    """Wen et al.'s noise gap of every row of ``data`` at a seeded training draw (``t`` and noise from
    ``(seed, scope, row)``): ``n_i = || eps(z_t,i, t_i, c_i) - eps(z_t,i, t_i, empty) ||_2``, ``[N]`` float32."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = encode_latents(pipe.vae, data.pixels, pipe.device)
    t, zt, _ = _draws(latents, scheduler, seed, scope)
    empty, empty_added = _conds(pipe, data, [""])
    gaps = []
    for i in range(0, len(data), batch):
        cond, added = _conds(pipe, data, data.captions[i : i + batch])
        gaps.append(
            WenFilterMitigation.noise_gaps(
                pipe.unet, zt[i : i + batch].to(cond.device), t[i : i + batch].to(cond.device), cond, empty,
                added, empty_added,
            ).cpu()
        )  # fmt: skip
    return torch.cat(gaps)


def memorization_metric(pipe, data: TrainingData, seed: int = 0, batch: int = 32) -> float:
    """MemControl's memorization objective on ``data`` (the memorization set): the mean noise gap."""
    return float(data_noise_gaps(pipe, data, seed, batch).mean())


def detector_metric(
    pipe, captions: list[str], detector: str, seed: int = 0, generations: int = 4, inference_steps: int = 25
) -> float:
    """A registry detector's mean score over ``generations`` generations of each caption (generation ``j`` of
    caption ``c`` from ``item_generator(seed, c, j)``): the harness's measure of memorization as a MemControl
    objective (higher = more memorized, minimised)."""

    pipe = as_guarded(pipe)  # detectors read the guarded pipeline's step scores
    captions = list(dict.fromkeys(captions))
    scores = get_detector(detector).score(
        pipe, captions, num_gens=generations, seed=seed, item_ids=captions,
        num_inference_steps=inference_steps, progress=False,
    )  # fmt: skip
    return float(scores.float().mean())


def _generate(pipe, captions: list[str], generations: int, seed: int, inference_steps: int) -> torch.Tensor:
    """``generations`` images of each caption, ``[len(captions) * generations, 3, H, W]`` in [0, 1],
    caption-major; generation ``j`` of caption ``c`` from ``item_generator(seed, c, j)``
    (:func:`diffmem.generation.generate`, the loop every evaluation of the project uses)."""
    images, _ = generate(
        pipe, captions, item_ids=captions, num_gens=generations, seed=seed, batch_size=max(1, 32 // generations),
        num_inference_steps=inference_steps, guidance_scale=GUIDANCE_SCALE,
    )  # fmt: skip
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def replication_metric(
    pipe, memorized: TrainingData, seed: int = 0, generations: int = 4, inference_steps: int = 25
) -> float:
    """Measured replication on the memorization set: the share of the ``generations`` generations of each
    distinct memorized caption whose SSIM to one of that caption's own training images is at least
    :data:`~diffmem.organism.replication.REPLICATION_THRESHOLD` (:func:`~diffmem.organism.replication.replicates`,
    Somepalli et al., CVPR 2023's copy criterion as the project defines it)."""

    own: dict[str, dict[str, int]] = {}  # caption -> its distinct images (first row of each)
    for i, (caption, image_id) in enumerate(zip(memorized.captions, memorized.image_ids)):
        own.setdefault(caption, {}).setdefault(image_id, i)
    captions = list(own)
    images = _generate(pipe, captions, generations, seed, inference_steps)
    reference = torch.from_numpy(memorized.pixels).permute(0, 3, 1, 2).float() / 255.0
    if tuple(images.shape[-2:]) != tuple(reference.shape[-2:]):
        raise ValueError(
            f"{memorized.source}: images are {reference.shape[-2]}x{reference.shape[-1]} px but the model "
            f"generates {images.shape[-2]}x{images.shape[-1]} px; give the data at the model's size"
        )
    copied = []
    for k, caption in enumerate(captions):
        gens = images[k * generations : (k + 1) * generations]
        hits = torch.stack([replicates(gens, reference[i : i + 1]) for i in own[caption].values()])
        copied += hits.any(0).tolist()
    return float(sum(copied) / len(copied))


def fidelity_metric(
    pipe, captions: list[str], seed: int = 0, generations: int = 1, inference_steps: int = 25, classifier=None
) -> float:
    """One minus caption fidelity (:func:`diffmem.organism.fidelity.caption_fidelity`: the share of the
    generations of ``captions``, "a <colour> <shape>", whose colour and shape the caption classifier reads as
    named; ``classifier`` default ``weights/diffmem-caption-classifier``), so lower is better."""

    check_fidelity_captions(captions)
    classifier = classifier if classifier is not None else load_caption_classifier()
    images = _generate(pipe, list(captions), generations, seed, inference_steps)
    labels = [c for c in captions for _ in range(generations)]
    return 1.0 - caption_fidelity(classifier, images, labels).both


def check_fidelity_captions(captions: list[str], argument: str = "--fidelity-captions") -> None:
    """Refuse, in one line naming ``argument``, an empty list or a caption the classifier cannot read."""

    if not captions:
        raise ValueError(f"{argument}: no caption for the caption-fidelity objective")
    for i, caption in enumerate(captions):
        try:
            parse_caption(caption)
        except ValueError as err:
            raise ValueError(f"{argument}: caption {i + 1}: {err}") from None


def validation_loss(pipe, data: TrainingData, seed: int = 0, batch: int = 32) -> float:
    """The epsilon (or v) denoising loss on held-out ``data`` with seeded draws (the quality objective)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latents = encode_latents(pipe.vae, data.pixels, pipe.device)
    t, zt, eps = _draws(latents, scheduler, seed, "validation")
    if scheduler.config.prediction_type == "v_prediction":
        a = scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        eps = a.sqrt() * eps - (1 - a).sqrt() * latents
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            cond, added = _conds(pipe, data, data.captions[i : i + batch])
            dtype = pipe.unet.dtype
            pred = pipe.unet(
                zt[i : i + batch].to(cond.device, dtype), t[i : i + batch].to(cond.device),
                encoder_hidden_states=cond.to(dtype), added_cond_kwargs=added,
            ).sample.float().cpu()  # fmt: skip
            total += float((pred - eps[i : i + batch]).square().flatten(1).mean(1).sum())
    return total / len(data)


def _sampler(config: MemControlConfig, seed: int | None = None):
    import optuna

    samplers = {
        "nsga2": optuna.samplers.NSGAIISampler,
        "random": optuna.samplers.RandomSampler,
        "tpe": optuna.samplers.TPESampler,
    }
    if config.sampler not in samplers:
        raise ValueError(f"--sampler: expected one of {', '.join(samplers)}, got {config.sampler!r}")
    seed = config.seed if seed is None else seed
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size(), seed=seed)
    return samplers[config.sampler](seed=seed)


def _trial_dir(out: Path, params: dict) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return out / "trials" / key


#: the first bytes of every SQLite 3 database file
_SQLITE_MAGIC = b"SQLite format 3\x00"


def check_search_folder(out: str | os.PathLike) -> Path:
    """``out`` as a search folder: a folder (new or to resume) whose ``study.db``, if there, is SQLite."""
    out = check_out_path(out)
    study = out / "study.db"
    if study.exists():
        with open(study, "rb") as f:
            head = f.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC and (head or study.stat().st_size):
            raise ValueError(
                f"--out: {study} is not a SQLite database (the optuna study memcontrol resumes from); "
                "use another --out, or delete it to start the search again"
            )
    return out


def run_memcontrol(
    model: str | os.PathLike | None,
    train_data: TrainingData,
    memorized: TrainingData,
    heldout: TrainingData,
    out: str | os.PathLike,
    config: MemControlConfig | None = None,
    inner: TrainConfig | None = None,
    progress: bool = True,
    device: str | None = None,
    fidelity_captions: list[str] | None = None,
) -> dict:
    """Run (or resume) the search; returns ``{"front": [...], "chosen": {...}, "trials": [...]}``.

    ``train_data`` is what each trial fine-tunes on, ``memorized`` its memorization set (e.g. the duplicated
    rows), ``heldout`` the quality data (``heldout-loss``); ``fidelity_captions`` the captions of the
    ``caption-fidelity`` objective (default: ``heldout``'s); ``inner`` the fine-tune's settings (its lr and
    blocks are searched); ``device`` where the objectives run (the fine-tunes: accelerate's device). One
    process: a multi-process launch would add every rank's trials to one study, so it is refused.
    """
    import optuna

    config = config or MemControlConfig()
    inner = inner or TrainConfig(steps=200, mode="lora")
    config.check()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(
            "memcontrol runs in one process (its trials share one study); launch it without torchrun"
        )
    out = check_search_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    search = {k: v for k, v in config.to_dict().items() if k != "trials"}  # --trials may grow on resume
    used = {
        "generations": config.memorization != "noise-gap",
        "fidelity_generations": config.quality == "caption-fidelity",
        "inference_steps": config.generates,
        "population": config.sampler == "nsga2",
    }
    search = {k: v for k, v in search.items() if used.get(k, True)}  # settings that mean nothing here: out
    settings = {
        "model": str(model), "search": search, "inner": inner.to_dict(), "data": train_data.describe(),
        "memorized": memorized.describe(), "heldout": heldout.describe(),
    }  # fmt: skip
    if config.quality == "caption-fidelity":
        where = "--fidelity-captions"
        if fidelity_captions is None:
            fidelity_captions, where = (
                heldout.captions,
                f"--heldout {heldout.source} (--fidelity-captions not given)",
            )
        fidelity_captions = list(fidelity_captions)
        check_fidelity_captions(fidelity_captions, where)
        settings["fidelity_captions"] = fidelity_captions
    settings = json.loads(json.dumps(settings))
    settings_file = out / "memcontrol.json"
    if settings_file.is_file() and json.loads(settings_file.read_text(encoding="utf-8")) != settings:
        raise ValueError(
            f"--out: {out} holds a search with other settings (only --trials may change); use another --out"
        )
    atomic_write_json(settings_file, settings)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=_sampler(config),
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(
            trial._trial_id, optuna.trial.TrialState.FAIL
        )  # killed mid-trial
        study.enqueue_trial(
            trial.params
        )  # the same parameters again; its fine-tune resumes from its checkpoint
    base = load_pipeline(model, stock_pipeline_class(model), device=device)
    blocks = transformer_blocks(base.unet)

    generation = dict(
        seed=config.seed, generations=config.generations, inference_steps=config.inference_steps
    )

    def memorization(pipe) -> float:
        if config.memorization == "noise-gap":
            return memorization_metric(pipe, memorized, config.seed)
        if config.memorization == "replication":
            return replication_metric(pipe, memorized, **generation)
        return detector_metric(pipe, memorized.captions, config.memorization, **generation)

    classifier = None
    if config.quality == "caption-fidelity":
        classifier = load_caption_classifier()

    def quality(pipe) -> float:
        if config.quality == "heldout-loss":
            return validation_loss(pipe, heldout, config.seed)
        return fidelity_metric(pipe, fidelity_captions, config.seed, config.fidelity_generations,
                               config.inference_steps, classifier)  # fmt: skip

    def objective(trial) -> tuple[float, float]:
        mask = [trial.suggest_int(b, 0, 1) for b in blocks]
        lr = trial.suggest_float("lr", config.lr_low, config.lr_high, log=True)
        if not any(mask):
            raise optuna.TrialPruned("no block is trainable")
        chosen = tuple(b for b, m in zip(blocks, mask) if m)
        params = {"blocks": list(chosen), "lr": lr}
        pipe = load_pipeline(model, stock_pipeline_class(model))
        folder = train_text_to_image(
            model,
            train_data,
            _trial_dir(out, params),
            replace(inner, lr=lr, trainable_blocks=chosen),
            pipe=pipe,
            progress=progress,
        )
        t0 = time.time()
        if device is not None:
            pipe.to(device)  # the saved pipeline is left on the CPU
        pipe.unet.eval()
        values = memorization(pipe), quality(pipe)
        # the fine-tune's own record counts its time over every resume of it
        train_seconds = json.loads((Path(folder) / TRAIN_RECORD).read_text(encoding="utf-8"))["run"][
            "seconds"
        ]
        trial.set_user_attr("model", str(folder))
        trial.set_user_attr("seconds", round(train_seconds + time.time() - t0, 1))
        return values

    def done() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    while done() < config.trials:
        # the sampler is seeded by how many trials are done: a resumed search draws what an uninterrupted one would
        study.sampler = _sampler(config, derive_seed(config.seed, "memcontrol-sampler", done()) % 2**32)
        study.optimize(objective, n_trials=1, catch=())
    baseline = memorization(base), quality(base)
    trials = [
        {
            "number": t.number,
            "blocks": [b for b in blocks if t.params.get(b)],
            "lr": t.params.get("lr"),
            "memorization": t.values[0],
            "quality_loss": t.values[1],
            "seconds": t.user_attrs.get("seconds"),
            "model": t.user_attrs.get("model"),
        }
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    ]
    if not trials:
        raise ValueError("memcontrol: every trial was pruned (no block trainable); run more --trials")
    front_numbers = {t.number for t in study.best_trials}
    front = [t for t in trials if t["number"] in front_numbers]

    def scaled(key: str, value: float) -> float:
        low, high = min(t[key] for t in front), max(t[key] for t in front)
        return 0.0 if high == low else (value - low) / (high - low)

    chosen = min(
        front,
        key=lambda t: scaled("memorization", t["memorization"]) + scaled("quality_loss", t["quality_loss"]),
    )
    save_trainable_blocks(
        out / "trainable_blocks.json",
        base.unet,
        chosen["blocks"],
        source="diffmem memcontrol",
        trial=chosen["number"],
        lr=chosen["lr"],
        objectives={"memorization": chosen["memorization"], "quality_loss": chosen["quality_loss"]},
    )
    result = {
        "objectives": {"memorization": config.memorization, "quality": config.quality},
        "baseline": {"memorization": baseline[0], "quality_loss": baseline[1]},
        "front": front,
        "chosen": chosen,
        "trials": trials,
        "search_seconds": round(sum(t["seconds"] or 0 for t in trials), 1),
    }
    atomic_write_json(out / "pareto.json", result)
    return result
