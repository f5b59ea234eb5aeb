"""The training-time mitigations compared at one budget on the duplicated-subset ground truth.

Every row fine-tunes the same pretrained model on the same fine-tuning set
(:func:`diffmem.organism.finetune_data.build_duplicated_finetune_set`) with the same
:class:`~diffmem.train.text_to_image.TrainConfig` (steps, batch, seed, lr), and differs only in its mitigation
or in what it trains; each fine-tuned folder is then measured by
:func:`diffmem.train.finetune_eval.evaluate_finetune`. The rows:

- ``base``: the pretrained model, not fine-tuned (what the set's captions give before any training);
- ``none``, ``ambient``, ``wen-filter``: full fine-tunes with ``diffmem train --mitigation``;
- ``caption-replace``, ``caption-insert``, ``caption-gni``: full fine-tunes with ``caption-noise``, one member of
  Somepalli et al.'s family each at the authors' settings (``--trainspecial randrepl`` / ``randwordadd`` with
  ``--trainspecial_prob 0.1``, ``--rand_noise_lam 0.1``);
- ``lora``: LoRA on the default targets of every block, the PEFT baseline of MemControl's row;
- ``memcontrol``: MemControl's chosen blocks at its chosen learning rate, trained as its trials were
  (``memcontrol_mode``: ``lora``, or ``full``, the blocks' own weights, the paper's ``auto_attention``)
  (:func:`diffmem.train.memcontrol.run_memcontrol`, its trials short fine-tunes on the same data, the
  memorization set the duplicated rows, the quality set held-out renderings written from ``heldout_seed``
  for ``heldout-loss``, or the set's generic and held-out captions for ``caption-fidelity``: the captions the
  evaluation reads too, so give the search its own ``memcontrol.seed`` to keep their noise apart).

``wen-filter``'s threshold is fixed before any fine-tune: Wen et al. set ``tau`` where prompts that are not
memorized stay below it, so here ``tau`` is the ``tau_quantile`` quantile of the pretrained model's noise
gaps (:func:`~diffmem.train.memcontrol.data_noise_gaps`) over the set's rows, none of which it has seen.

The goals (compared with ``none``): the duplicated images' replication at most a quarter of ``none``'s, and
caption fidelity on generic and held-out captions no more than 0.05 below ``none``'s. Everything resumes:
a row's fine-tune from its checkpoint, a finished evaluation from ``<row>/evaluation.json``, the search from
its SQLite study; ``study.json`` holds the settings a resumed study must share.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_write_json, first_difference
from diffmem.modelio import load_pipeline, model_resolution, stock_pipeline_class
from diffmem.organism.finetune_data import MANIFEST_FILE, build_duplicated_finetune_set
from diffmem.scores.solidmark import difference_ci
from diffmem.seeding import derive_seed
from diffmem.train.finetune_eval import check_set_size, evaluate_finetune, read_finetune_set
from diffmem.train.memcontrol import MemControlConfig, data_noise_gaps, run_memcontrol
from diffmem.train.mitigations import get_training_mitigation
from diffmem.train.text_to_image import TRAIN_RECORD, TrainConfig, load_training_data, train_text_to_image

#: evaluate_finetune's settings a study may set
EVALUATION_KEYS = (
    "seeds_per_caption",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "negatives",
    "batch_size",
)

__all__ = [
    "MITIGATION_ROWS",
    "ROWS",
    "StudyConfig",
    "goal_verdicts",
    "median_step_seconds",
    "run_mitigation_study",
]

#: The rows that fine-tune with a training mitigation: row -> (mitigation, its default parameters).
MITIGATION_ROWS: dict[str, tuple[str, dict]] = {
    "none": ("none", {}),
    "ambient": ("ambient", {}),
    "wen-filter": ("wen-filter", {}),  # tau: fixed from the pretrained model's gaps (module doc)
    "caption-replace": ("caption-noise", {"replace_prob": 0.1}),
    "caption-insert": ("caption-noise", {"insert_words": 2, "insert_prob": 0.1}),
    "caption-gni": ("caption-noise", {"embedding_sigma": 0.1}),
}
ROWS = ("base", *MITIGATION_ROWS, "lora", "memcontrol")
REPLICATION_GOAL = 0.25  # at most this share of none's replication rate
FIDELITY_GOAL = 0.05  # at most this far below none's caption fidelity


@dataclass(frozen=True)
class StudyConfig:
    """The study's settings; ``train`` is every row's fine-tune (its ``mitigation`` is set per row)."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=2000))
    rows: tuple[str, ...] = ROWS
    mitigation_options: dict = field(default_factory=dict)  # row -> parameters over MITIGATION_ROWS' defaults
    tau_quantile: float = 0.95
    memcontrol: MemControlConfig = field(default_factory=MemControlConfig)
    memcontrol_steps: int = 200  # each trial's fine-tune
    memcontrol_mode: str = "lora"  # or "full": the chosen blocks' own weights (the paper's auto_attention)
    heldout_images: int = 64
    heldout_seed: int = 7
    evaluation: dict = field(default_factory=lambda: {"seeds_per_caption": 4, "num_inference_steps": 25})

    def row_options(self, name: str) -> tuple[str, dict]:
        """The mitigation of row ``name`` and its parameters (the row's defaults, then this study's)."""
        mitigation, defaults = MITIGATION_ROWS[name]
        return mitigation, {**defaults, **self.mitigation_options.get(name, {})}

    def check(self) -> None:
        """Every setting, before anything is trained (a bad one is one error naming it)."""

        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"rows: unknown {', '.join(unknown)}; expected some of {', '.join(ROWS)}")
        stray = [r for r in self.mitigation_options if r not in MITIGATION_ROWS]
        if stray:
            raise ValueError(
                f"mitigation_options: {', '.join(stray)} is not a mitigation row ({', '.join(MITIGATION_ROWS)})"
            )
        for name in MITIGATION_ROWS:
            get_training_mitigation(*self.row_options(name))  # bad parameters are refused here
        bad = [k for k in self.evaluation if k not in EVALUATION_KEYS]
        if bad:
            raise ValueError(
                f"evaluation: unknown {', '.join(bad)}; expected some of {', '.join(EVALUATION_KEYS)}"
            )
        if self.memcontrol_mode not in ("lora", "full"):
            raise ValueError(f"memcontrol_mode: expected lora or full, got {self.memcontrol_mode!r}")
        if not 0.0 < self.tau_quantile <= 1.0:
            raise ValueError(f"tau_quantile: expected a number in (0, 1], got {self.tau_quantile!r}")
        for name in ("memcontrol_steps", "heldout_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")
        self.train.check()
        self.memcontrol.check()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("rows")  # rows may be added to a study, or left out, on resume
        return out


def _paired_image_difference(
    row: list[dict], none: list[dict], seed: int = 0, draws: int = 2000
) -> list[float]:
    """95 % interval of ``rate(row) - rate(none)`` over the duplicated images, resampled together (the same
    images in both models: a paired bootstrap over images)."""
    a = {r["image_id"]: r for r in row if r["duplicated"]}
    b = {r["image_id"]: r for r in none if r["duplicated"]}
    ids = sorted(set(a) & set(b))
    if not ids:
        return [float("nan"), float("nan")]
    ca, na = (np.array([a[i][k] for i in ids], float) for k in ("replicated_own", "n"))
    cb, nb = (np.array([b[i][k] for i in ids], float) for k in ("replicated_own", "n"))
    picks = np.random.default_rng(derive_seed(seed, "paired-image-bootstrap")).integers(
        0, len(ids), (draws, len(ids))
    )
    diffs = ca[picks].sum(1) / na[picks].sum(1) - cb[picks].sum(1) / nb[picks].sum(1)
    return [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def goal_verdicts(rows: dict[str, dict]) -> dict[str, dict]:
    """Each row against ``none`` (``rows``: name -> :class:`FinetuneEvaluation` dict): the duplicated images'
    replication rate (own image) as a share of ``none``'s, their difference with its 95 % intervals (Newcombe's
    over generations; a paired bootstrap over images where the rows have ``per_image``), caption fidelity
    differences (generic, held-out), and whether each goal is met (point estimates)."""

    if "none" not in rows:
        return {}
    ref = rows["none"]
    r0 = ref["replication"]["duplicated"]["own"]
    out = {}
    for name, ev in rows.items():
        if name == "none":
            continue
        r = ev["replication"]["duplicated"]["own"]
        diff, low, high = difference_ci(r["count"], r["n"], r0["count"], r0["n"])
        verdict = {
            "replication": r["rate"],
            "replication_none": r0["rate"],
            "share_of_none": r["rate"] / r0["rate"] if r0["rate"] > 0 else None,
            "difference": diff,
            "difference_ci": [low, high],
            "replication_goal_met": r["rate"] <= REPLICATION_GOAL * r0["rate"] if r0["rate"] > 0 else None,
        }
        if ev.get("per_image") and ref.get("per_image"):
            verdict["difference_ci_images"] = _paired_image_difference(ev["per_image"], ref["per_image"])
        for kind in ("generic", "heldout"):
            delta = ev["fidelity"][kind]["both"] - ref["fidelity"][kind]["both"]
            verdict[f"fidelity_{kind}_difference"] = delta
            verdict[f"fidelity_{kind}_goal_met"] = delta >= -FIDELITY_GOAL - 1e-6  # the shares are float32
        out[name] = verdict
    return out


def median_step_seconds(log: list[dict]) -> float | None:
    """The median over the log's windows (rows ``step``, cumulative ``seconds``) of seconds per step: a
    training's speed that a window slowed by another job on the machine does not move."""
    rates = [
        (b["seconds"] - a["seconds"]) / (b["step"] - a["step"])
        for a, b in zip([{"step": 0, "seconds": 0.0}, *log], log)
        if b["step"] > a["step"]
    ]
    return float(np.median(rates)) if rates else None


def _settings_check(workdir: Path, settings: dict) -> None:

    path = workdir / "study.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old != settings:
            raise ValueError(
                f"--out: {workdir} holds a study with other settings ({first_difference(old, settings)}); "
                "use another --out"
            )
    atomic_write_json(path, settings)


def _trained(workdir: Path) -> Path | None:
    model = workdir / "model"
    return model if (model / TRAIN_RECORD).is_file() else None


def build_set_once(folder: Path, **settings) -> Path:
    """:func:`~diffmem.organism.finetune_data.build_duplicated_finetune_set` into ``folder`` unless it is
    there; written beside it and renamed into place, so a kill never leaves half a set."""
    if (folder / MANIFEST_FILE).is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    build_duplicated_finetune_set(tmp, **settings)
    os.replace(tmp, folder)
    return folder


def run_mitigation_study(
    model: str | os.PathLike | None,
    finetune_folder: str | os.PathLike,
    workdir: str | os.PathLike,
    config: StudyConfig | None = None,
    *,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run (or resume) the study; returns and writes (``results.json``) ``{"rows": {row: {"training",
    "evaluation"}}, "goals": goal_verdicts(...), "wen_filter_tau", "memcontrol"}``. ``device``: where the
    evaluations and objectives run (training: accelerate's device)."""
    config = config or StudyConfig()
    config.check()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    truth = read_finetune_set(finetune_folder)
    pipeline_class = stock_pipeline_class(model)
    base = load_pipeline(model, pipeline_class, device=device)
    check_set_size(base, truth)
    settings = json.loads(json.dumps({
        "model": str(model), "model_fingerprint": model_fingerprint(base.unet), "finetune_set": str(finetune_folder),
        "finetune_settings": truth.settings, **config.to_dict(),
    }))  # fmt: skip
    _settings_check(workdir, settings)
    size = model_resolution(base)[0]
    data = load_training_data(finetune_folder, size, group_column="image_id")
    results: dict = {"rows": {}, "settings": settings}

    def trained(name: str, train: TrainConfig) -> Path:
        folder = _trained(workdir / name)
        if folder is not None:
            record = json.loads((folder / TRAIN_RECORD).read_text(encoding="utf-8"))
            if record.get("config") != json.loads(json.dumps(train.to_dict())):
                raise ValueError(f"{folder}: trained with other settings than this study's {name} row")
        else:
            log(f"{name}: fine-tuning ({train.steps} steps, {train.mode}, mitigation {train.mitigation})")
            pipe = load_pipeline(model, pipeline_class)
            folder = train_text_to_image(model, data, workdir / name, train, pipe=pipe, progress=progress)
        return folder

    tau = None
    if "wen-filter" in config.rows and "tau" not in config.mitigation_options.get("wen-filter", {}):
        tau_file = (
            workdir / "wen_filter_tau.json"
        )  # kept: a resume must not depend on recomputing it bit for bit
        if tau_file.is_file():
            results["wen_filter_tau"] = json.loads(tau_file.read_text(encoding="utf-8"))
        else:
            gaps = data_noise_gaps(base, data, seed=config.train.seed, scope="wen-filter-tau")
            results["wen_filter_tau"] = {
                "tau": float(gaps.quantile(config.tau_quantile)), "quantile": config.tau_quantile, "rows": len(gaps),
            }  # fmt: skip
            atomic_write_json(tau_file, results["wen_filter_tau"])
        tau = results["wen_filter_tau"]["tau"]
    folders: dict[str, Path | str | None] = {}
    for name in config.rows:
        if name == "base":
            folders[name] = model
        elif name in MITIGATION_ROWS:
            mitigation, options = config.row_options(name)
            if name == "wen-filter" and tau is not None:
                options["tau"] = tau
            folders[name] = trained(
                name, replace(config.train, mitigation=mitigation, mitigation_options=options)
            )
        elif name == "lora":
            folders[name] = trained(name, replace(config.train, mode="lora"))
        else:  # memcontrol
            dup = set(truth.finetune.duplicated_ids)
            memorized = data.subset(
                [i for i, g in enumerate(data.image_ids) if g in dup], f"{finetune_folder} (duplicated)"
            )
            heldout_dir = build_set_once(
                workdir / "heldout", n_images=config.heldout_images, duplicated=0, seed=config.heldout_seed,
                image_size=size,
            )  # fmt: skip
            heldout = load_training_data(heldout_dir, size, group_column="image_id")
            mode = config.memcontrol_mode
            inner = replace(config.train, steps=config.memcontrol_steps, mode=mode)
            log(f"memcontrol: {config.memcontrol.trials} trials of {inner.steps} {mode} steps")
            search = run_memcontrol(
                model, data, memorized, heldout, workdir / "memcontrol", config.memcontrol, inner, progress,
                device=device, fidelity_captions=truth.finetune.generic_captions + truth.finetune.heldout_captions,
            )  # fmt: skip
            results["memcontrol"] = search
            chosen = search["chosen"]
            folders[name] = trained(
                name,
                replace(config.train, mode=mode, trainable_blocks=tuple(chosen["blocks"]), lr=chosen["lr"]),
            )
    for name, folder in folders.items():
        path = workdir / name / "evaluation.json"
        # an evaluation belongs to the model it measured: the trained folder's record, or the base model
        made_by = (
            settings["model_fingerprint"]
            if name == "base"
            else hashlib.sha256((Path(folder) / TRAIN_RECORD).read_bytes()).hexdigest()
        )
        kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if kept is not None and kept.get("made_by") == made_by:
            evaluation = kept["evaluation"]
        else:
            log(f"{name}: evaluating")
            pipe = base if name == "base" else load_pipeline(folder, pipeline_class, device=device)
            evaluation = evaluate_finetune(
                pipe, finetune_folder, progress=progress, **config.evaluation
            ).to_dict()
            atomic_write_json(path, {"made_by": made_by, "evaluation": evaluation})
        row = {"evaluation": evaluation, "model": None if folder is None else str(folder)}
        if name != "base":
            record = json.loads((Path(folder) / TRAIN_RECORD).read_text(encoding="utf-8"))
            run = record["run"]
            row["training"] = {
                "config": record.get("config"),
                **{k: v for k, v in run.items() if k != "log"},
                "median_seconds_per_step": median_step_seconds(run["log"]),
            }
        results["rows"][name] = row
    results["goals"] = goal_verdicts({k: v["evaluation"] for k, v in results["rows"].items()})
    atomic_write_json(workdir / "results.json", results)
    return results
