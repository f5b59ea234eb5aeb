"""Robustness to the Finding Dori attack (Kowalczuk et al., ICML 2026): every removal method, one table.

For a model and its memorized targets ``(id, caption, training image)``, each *setting* (no mitigation,
a NeMo ``NeuronSet``, a pruning ``WeightMask``, an adversarially fine-tuned UNet, ...) is measured from
the captions and, unless ``attack=False``, from a Dori trigger searched against that setting:

* the SSIM of the generations to the training image: per target the mean over ``seeds``, then the
  mean ± std over targets;
* the memorization rate: the share of targets memorized under ``criterion`` (default
  :data:`~diffmem.scores.replication.PRESETS` ``"organism-mean"``, mean SSIM over seeds >= 0.7), with
  its Wilson 95 % interval;
* held-out quality: the median SSIM of held-out-caption generations to the unedited model's (same
  seeds), and optionally caption fidelity (a caption classifier's colour/shape accuracy).

Non-memorized controls give the attack's false-positive rate. Every measurement is a stage of a
:class:`~diffmem.evaluate.stages.StageCache` keyed by its settings, so a rerun resumes and a changed
setting recomputes only what depends on it. ``benchmarks/dori_eval.py`` is this class on the organism.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffmem.attack.dori import (
    DoriConfig,
    attack_target,
    encode_images,
    encode_prompts,
    generate_from_embeds,
    ssim_similarity,
)
from diffmem.edits import WeightMask, applied
from diffmem.evaluate.metrics import ReplicationRate
from diffmem.evaluate.stages import StageCache
from diffmem.fingerprint import model_fingerprint
from diffmem.generation import generate
from diffmem.hooks.ffn import ffn_layers
from diffmem.localize.prune import FFNStats, collect_ffn_stats, select_memorization_weights
from diffmem.organism.fidelity import caption_fidelity
from diffmem.scores.replication import PRESETS, ReplicationCriterion
from diffmem.scores.similarity import ssim
from diffmem.train.adversarial import (
    AdversarialConfig,
    AdversarialTarget,
    RetainSet,
    adversarial_finetune,
    make_surrogates,
)

__all__ = ["RobustnessEvaluation", "RobustnessSettings", "Target"]


@dataclass(frozen=True)
class Target:
    """One memorized (or control) item: its id, caption and training image ``[3, H, W]`` in ``[0, 1]``."""

    id: str
    caption: str
    image: torch.Tensor


@dataclass(frozen=True)
class RobustnessSettings:
    """Generation, attack and replication settings shared by every row of the table."""

    seeds: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    criterion: ReplicationCriterion = field(default_factory=lambda: PRESETS["organism-mean"])
    dori: DoriConfig = field(default_factory=DoriConfig)

    def key(self) -> dict:
        return {
            "seeds": self.seeds,
            "steps": self.num_inference_steps,
            "guidance": self.guidance_scale,
            "criterion": self.criterion.to_dict(),
            "dori": {k: v for k, v in asdict(self.dori).items() if k != "gradient_checkpointing"},
        }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


class RobustnessEvaluation:
    """The table's rows, measured on ``pipe`` (an SD pipeline) and cached in ``cache_dir``.

    ``heldout_captions``: captions the model did not memorize, for held-out quality.
    ``fidelity``: optional ``(classifier, {name: captions}, seeds)`` for caption fidelity per setting.
    """

    def __init__(
        self,
        pipe,
        targets: Sequence[Target],
        cache_dir: str | Path,
        *,
        heldout_captions: Sequence[str] = (),
        settings: RobustnessSettings = RobustnessSettings(),
        fidelity: tuple[Any, dict[str, list[str]], int] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.pipe, self.targets, self.settings = pipe, list(targets), settings
        self.heldout_captions = list(heldout_captions)
        self.fidelity_spec = fidelity
        self.stages = StageCache(cache_dir)
        self.rows: list[dict] = []
        #: the memorization rate of the targets' captions on the unedited model, once measured
        self.unedited_rate: float | None = None
        self.log = log
        self._heldout_reference: torch.Tensor | None = None

    # ---------------------------------------------------------------------------------- measurements
    @torch.no_grad()
    def generate(self, pipe, captions: Sequence[str], seeds: Sequence[int], stream: str) -> torch.Tensor:
        """``[len(captions) * len(seeds), 3, H, W]`` in ``[0, 1]``; caption ``i``, seed ``s`` starts from the
        noise of ``item_generator(s, stream, i)``, so the images do not depend on the order."""

        images, _ = generate(
            pipe,
            [c for c in captions for _ in seeds],
            item_ids=[(i, s) for i in range(len(captions)) for s in seeds],
            noise_key=lambda item, _j: (item[1], stream, item[0]),
            batch_size=1,
            num_inference_steps=self.settings.num_inference_steps,
            guidance_scale=self.settings.guidance_scale,
        )
        return torch.from_numpy(images).permute(0, 3, 1, 2)

    def attack(self, pipe, items: Sequence[Target], attack: bool = True) -> list[dict]:
        """Per item: similarities per seed from the caption (``before``) and, attacked, from the trigger."""

        seeds = list(range(self.settings.seeds))
        rows = []
        for t in items:
            if attack:
                outcome = attack_target(
                    pipe,
                    t.id,
                    t.caption,
                    t.image,
                    self.settings.dori,
                    seeds=seeds,
                    threshold=self.settings.criterion.threshold,
                    num_inference_steps=self.settings.num_inference_steps,
                    guidance_scale=self.settings.guidance_scale,
                )
                row = outcome.row()
                del row["replicated_before"], row["replicated_after"]  # the table's criterion decides
                rows.append(row)
                continue
            with torch.no_grad():
                gens = generate_from_embeds(
                    pipe,
                    encode_prompts(pipe, [t.caption]),
                    seeds,
                    key=("dori-gen", t.id),
                    num_inference_steps=self.settings.num_inference_steps,
                    guidance_scale=self.settings.guidance_scale,
                )
            sims = [float(x) for x in ssim_similarity(gens, t.image)]
            rows.append(
                {"id": t.id, "similarity_before": sims, "similarity_before_mean": statistics.fmean(sims)}
            )
        return rows

    def heldout_reference(self) -> torch.Tensor:
        """The unedited model's held-out generations (computed once, cached)."""
        if self._heldout_reference is None:
            self._heldout_reference = self.stages.tensor(
                "heldout_unedited",
                lambda: self.generate(
                    self.pipe, self.heldout_captions, range(self.settings.seeds), "heldout"
                ),
                key={**self.settings.key(), "captions": self.heldout_captions},
            )
        return self._heldout_reference

    def heldout_quality(self, pipe) -> float:
        """Median SSIM of ``pipe``'s held-out generations to the unedited model's (same seeds); call
        :meth:`heldout_reference` before applying an edit to the evaluation's own pipeline."""

        reference = self.heldout_reference()
        images = self.generate(pipe, self.heldout_captions, range(self.settings.seeds), "heldout")
        return float(ssim(images, reference).median())

    def fidelity(self, pipe, stage: str) -> dict | None:
        """Caption fidelity of ``pipe`` on each caption set of ``fidelity`` (None without one)."""
        if self.fidelity_spec is None:
            return None

        classifier, caption_sets, n_seeds = self.fidelity_spec
        seeds = list(range(n_seeds))
        result = {}
        for name, captions in caption_sets.items():
            labels = [c for c in captions for _ in seeds]  # generate()'s order
            result[name] = self.stages.value(
                f"{name}_{stage}",
                lambda captions=captions, labels=labels: caption_fidelity(
                    classifier, self.generate(pipe, captions, seeds, "heldout"), labels
                ).as_dict(),
                key={**self.settings.key(), "captions": captions, "seeds": n_seeds},
            )
        return result

    def summarize(self, rows: Sequence[dict], which: str) -> dict:
        """SSIM mean ± std over targets and the memorization rate (``which``: ``before`` or ``after``)."""

        sims = [r[f"similarity_{which}"] for r in rows]
        mean, std = _mean_std(statistics.fmean(s) for s in sims)
        rate = ReplicationRate()
        for s in sims:
            rate.update(self.settings.criterion.memorized(torch.tensor(s)))
        r = rate.compute()
        return {"ssim_mean": mean, "ssim_std": std, "rate": r["rate"], "rate_ci": r["ci"], "n": r["n"]}

    # -------------------------------------------------------------------------------------- settings
    def add_setting(
        self,
        label: str,
        stage: str,
        *,
        edit=None,
        per_item_edits: dict[str, Any] | None = None,
        pipe=None,
        items: Sequence[Target] | None = None,
        attack: bool = True,
        quality: bool = True,
        caption_row: bool = True,
        key: Any = None,
    ) -> list[dict]:
        """Measure one setting (``edit`` applied to ``pipe``, default the evaluation's pipeline) and add its
        rows: ``label`` from the captions and, attacked, ``label + Dori``. ``per_item_edits`` (id -> edit)
        measures each item with its own edit instead (NeMo as deployed: a caption's own neurons off for
        that caption only; no held-out columns, held-out captions are untouched). ``key``: what else
        identifies the setting for the cache (e.g. the edit's parameters); ``caption_row=False`` adds the
        attacked row only (its caption row is in the table already). Returns the per-item rows."""

        pipe = pipe or self.pipe
        items = self.targets if items is None else list(items)
        base_key = {**self.settings.key(), "setting": key, "items": [t.id for t in items], "attack": attack}
        if per_item_edits is not None:
            quality, edit = False, None  # each item's own edit is applied inside measure()
        unedited = edit is None and per_item_edits is None and pipe is self.pipe
        if quality and self.heldout_captions:
            self.heldout_reference()  # from the unedited model, before any edit is applied

        def measure() -> list[dict]:
            if per_item_edits is None:
                return self.attack(pipe, items, attack)
            rows = []
            for t in items:
                with applied(pipe.unet, per_item_edits[t.id]):
                    rows += self.attack(pipe, [t], attack)
            return rows

        with applied(pipe.unet, edit):
            rows = self.stages.value(stage, measure, key=base_key)
            heldout = fidelity = None
            if quality and self.heldout_captions:
                heldout = (
                    1.0
                    if unedited
                    else self.stages.value(
                        f"{stage}_heldout", lambda: self.heldout_quality(pipe), key=base_key
                    )
                )
            if quality:
                fidelity = self.fidelity(pipe, "unedited" if unedited else stage)
        common = {"heldout": heldout, "fidelity": fidelity}
        if unedited and items == self.targets:
            self.unedited_rate = self.summarize(rows, "before")["rate"]
        if caption_row or not attack:
            self.rows.append({"setting": label, **self.summarize(rows, "before"), **common})
        if attack:
            self.rows.append({"setting": f"{label} + Dori", **self.summarize(rows, "after"), **common})
        self.log(
            f"{label}: rate {self.rows[-1]['rate']:.2f}"
            + ("" if heldout is None else f", held-out {heldout:.3f}")
        )
        return rows

    def note(self, label: str) -> None:
        """A row with no measurement (a setting that could not run, and why)."""
        self.rows.append({"setting": label})

    def pruning_sweep(
        self,
        ratios: Sequence[float],
        *,
        tau: int = 10,
        reference: Sequence[str] | None = None,
        num_inference_steps: int = 50,
        cond_only: bool = False,
        min_reduction: float = 0.8,
        min_heldout: float = 0.5,
    ):
        """Subspace pruning (Chavhan et al.) at each ratio, from the captions; then the ceiling of FFN
        pruning (every FFN weight zeroed). Returns the first ratio's mask that cuts the rate by
        ``min_reduction`` with held-out quality >= ``min_heldout``, else the first ratio's (the paper's)."""

        captions = [t.caption for t in self.targets]
        reference = [""] * len(captions) if reference is None else list(reference)
        stats_kw = dict(
            num_steps=tau,
            num_inference_steps=num_inference_steps,
            guidance_scale=self.settings.guidance_scale,
            cond_only=cond_only,
        )
        files = [self.stages.folder / f"ffn_stats_{n}.safetensors" for n in ("memorized", "reference")]
        key = {**stats_kw, "memorized": captions, "reference": reference}
        stored = [FFNStats.load(f) for f in files if f.is_file()]
        if len(stored) == 2 and all(s.settings.get("diffmem_key") == key for s in stored):
            mem, ref = stored
        else:
            mem, ref = (
                collect_ffn_stats(self.pipe, p, progress=False, **stats_kw) for p in (captions, reference)
            )
            for s, f in zip((mem, ref), files):
                s.settings["diffmem_key"] = key
                s.save(f)
        layers = ffn_layers(self.pipe.unet)
        weights = {n: m.weight for n, m in layers.items()}
        fingerprint = model_fingerprint(self.pipe.unet)
        unmitigated = self.unedited_rate
        chosen = first = None
        for ratio in ratios:
            masks = select_memorization_weights(weights, mem, ref, ratio=ratio, tau=tau)
            mask = WeightMask(masks, fingerprint, {"ratio": ratio, "tau": tau})
            first = first or mask
            self.add_setting(
                f"Pruning rho={ratio} ({mask.num_pruned()} weights)",
                f"prune_{ratio}",
                edit=mask,
                attack=False,
                key={"stats": key, "ratio": ratio, "tau": tau},
            )
            row = self.rows[-1]
            reduction = 1 - row["rate"] / unmitigated if unmitigated else float("nan")
            if chosen is None and reduction >= min_reduction and (row["heldout"] or 0) >= min_heldout:
                chosen = mask
        everything = WeightMask(
            {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()},
            fingerprint,
            {"all_ffn": True},
        )
        self.add_setting(
            f"Every FFN weight zeroed ({everything.num_pruned()}, the ceiling of FFN pruning)",
            "prune_all_ffn",
            edit=everything,
            attack=False,
            key="all-ffn",
        )
        if chosen is None:
            self.log("no ratio reached the reduction with held-out quality kept; the first ratio is attacked")
        return chosen or first

    def adversarial_finetune(
        self,
        surrogate_edit,
        retain: Sequence[Target],
        *,
        rounds: int = 3,
        lr: float = 1e-4,
        checkpoint_dir: str | Path | None = None,
    ):
        """Adversarial fine-tuning (:mod:`diffmem.train.adversarial`) of a copy of the UNet against fresh
        Dori triggers, surrogates made once with ``surrogate_edit`` applied, ``retain`` as retain data;
        then the fine-tuned model's rows. Returns the fine-tuned pipeline."""
        pipe = self.pipe
        ids, captions = [t.id for t in self.targets], [t.caption for t in self.targets]
        with applied(pipe.unet, surrogate_edit):
            surrogates = make_surrogates(
                pipe,
                ids,
                captions,
                steps=self.settings.num_inference_steps,
                guidance_scale=self.settings.guidance_scale,
                seed=0,
            )
        device = pipe._execution_device

        def latents(items: Sequence[Target]) -> torch.Tensor:
            return torch.cat(
                [
                    encode_images(
                        pipe.vae, torch.stack([t.image for t in items[k : k + 32]]).to(device)
                    ).cpu()
                    for k in range(0, len(items), 32)
                ]
            )

        with torch.no_grad():
            lat, emb = latents(self.targets), encode_prompts(pipe, captions).cpu()
            r_lat, r_emb = latents(retain), encode_prompts(pipe, [t.caption for t in retain]).cpu()
        adv = [
            AdversarialTarget(i, lat[k : k + 1], surrogates[k : k + 1], emb[k : k + 1])
            for k, i in enumerate(ids)
        ]
        config = AdversarialConfig(
            rounds=rounds, lr=lr, dori=self.settings.dori, retain_batch_size=8, adv_batch_size=8
        )
        tuned = copy.deepcopy(pipe.unet)
        log = adversarial_finetune(
            tuned,
            pipe.scheduler,
            adv,
            RetainSet(r_lat, r_emb),
            config,
            checkpoint_dir=checkpoint_dir or self.stages.folder / "finetune_checkpoints",
            on_round=lambda r, e: self.log(f"fine-tuning round {r}: {e}"),
        )
        tuned_pipe = type(pipe)(**{**pipe.components, "unet": tuned})
        tuned_pipe.set_progress_bar_config(disable=True)
        key = {
            "rounds": rounds,
            "lr": lr,
            "retain": [t.id for t in retain],
            "surrogate": getattr(surrogate_edit, "to_dict", dict)(),
        }
        self.add_setting(f"Adversarial FT ({rounds} rounds)", f"finetune_r{rounds}", pipe=tuned_pipe, key=key)
        self.stages.value(f"finetune_log_r{rounds}", lambda: log.rounds, key=key)
        return tuned_pipe

    # ------------------------------------------------------------------------------------------ table
    def markdown(self, header: str = "") -> str:
        """The rows as a Markdown table (rates with their Wilson 95 % interval)."""

        def num(v, digits=2):
            return "–" if v is None else f"{v:.{digits}f}"

        def fid(f, name):
            if not f or name not in f:
                return "–"
            x = f[name]
            return f"{x['both']:.2f} ({x['colour']:.2f}, {x['shape']:.2f})"

        names = list(self.fidelity_spec[1]) if self.fidelity_spec else []
        head = [
            "setting",
            "SSIM to training image (mean ± std)",
            "memorization rate [95 % CI]",
            "held-out median SSIM to unedited",
        ]
        head += [f"caption fidelity, {n}: both right (colour, shape)" for n in names]
        lines = ([header, ""] if header else []) + ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            if "rate" not in r:
                lines.append(f"| {r['setting']} |" + " – |" * (len(head) - 1))
                continue
            lo, hi = r["rate_ci"]
            cells = [
                r["setting"],
                f"{num(r['ssim_mean'], 3)} ± {num(r['ssim_std'], 3)}",
                f"{num(r['rate'])} [{lo:.2f}, {hi:.2f}]",
                num(r.get("heldout"), 3),
            ] + [fid(r.get("fidelity"), n) for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
