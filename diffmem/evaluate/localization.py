"""NeMo's whole flow as one function: statistics -> threshold -> one NeuronSet per prompt -> their union.

1. value-neuron activation statistics of non-memorized ``reference`` prompts (NeMo eq. 3's mean and std);
2. the memorization threshold calibrated on them: mean + 1 std of NeMo's detection score (NeMo's rule,
   :meth:`~diffmem.localize.nemo.NeMo.calibrate_threshold`), unless one is given;
3. :meth:`~diffmem.localize.nemo.NeMo.localize` for every prompt (an empty set when it is not memorized);
4. the union of the sets: the neurons to switch off for all of them at once.

With ``cache_dir`` every stage is a file there (``stats.safetensors``, ``threshold.json``,
``neurons/<id>.json``, ``union.json``), written atomically and reused by a rerun only when it was made
on the same model (fingerprint), from the same prompts and settings (for a prompt's set: the search
settings, budgets included): a killed run resumes at the prompt it was on. Each set records how its
search ended (``info["outcome"]``, :data:`~diffmem.localize.nemo.OUTCOMES`), the union their counts.
``diffmem localize``, the bench's NeMo mitigation and the ``benchmarks/`` evaluations all run through
here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from diffmem.edits import NeuronSet
from diffmem.fingerprint import model_fingerprint
from diffmem.hooks.neurons import value_layers
from diffmem.io import atomic_write_json
from diffmem.localize.nemo import SD14_THRESHOLD, SD14_THRESHOLD_SPREAD, NeMo, NemoConfig, SearchProgress
from diffmem.localize.stats import ValueStats, value_stats_of

__all__ = ["Localization", "calibrated_nemo", "localize_prompts", "neuron_file_name", "random_control"]


@dataclass
class Localization:
    """What :func:`localize_prompts` found: per-prompt sets by id (input order), their union, and how."""

    stats: ValueStats
    threshold: float
    sets: dict[str, NeuronSet]
    union: NeuronSet
    #: prompts localized by this call (the others were read from the cache)
    new: int = 0

    @property
    def memorized(self) -> list[str]:
        """Ids of the prompts NeMo found memorized (flagged; :attr:`outcomes` says which were localized)."""
        return [i for i, s in self.sets.items() if s.info.get("memorized")]

    @property
    def outcomes(self) -> dict[str, int]:
        """How many prompts ended with each ``info["outcome"]`` (``"localized"``, ``"budget_exhausted"``, ...)."""
        return dict(Counter(_outcome(s) for s in self.sets.values()))


def _outcome(found: NeuronSet) -> str:
    """The set's outcome; sets saved before outcomes were recorded: by whether the prompt was memorized."""
    return found.info.get("outcome") or ("localized" if found.info.get("memorized") else "not_memorized")


def neuron_file_name(item_id: str) -> str:
    """A file name for a prompt id: its safe characters, and a short hash when any were replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id))[:100]
    if safe != str(item_id):
        safe += "-" + hashlib.sha256(str(item_id).encode("utf-8")).hexdigest()[:8]
    return safe + ".json"


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()[:16]


#: settings that bound the search but not the detection score a threshold is calibrated on
_BUDGET = ("early_exit", "max_unet_calls", "max_seconds", "max_candidates")


def _search_settings(config: NemoConfig) -> dict:
    """The settings a calibrated threshold depends on (not the threshold itself, the batching or the budget)."""
    d = config.to_dict()
    for key in ("threshold", "threshold_spread", "mask_batch", *_BUDGET):
        d.pop(key)
    return d


def _result_settings(config: NemoConfig) -> dict:
    """The settings a prompt's set depends on: all but the batching (which changes no complete search)."""
    d = config.to_dict()
    d.pop("mask_batch")
    return d


def _reusable(previous: NeuronSet, nemo: NeMo, fingerprint: str, prompt: str) -> bool:
    """Whether a cached set was made by the same search: model, prompt, layers and settings (budgets
    included; a search the budget cut also at the same masks per UNet call)."""
    config = dict(previous.info.get("config") or {})
    config.pop("mask_batch", None)
    return (
        previous.fingerprint == fingerprint
        and previous.prompts == [prompt]
        and previous.info.get("threshold") == nemo.config.threshold
        and list(previous.layers) == list(nemo.layers)
        and config == _result_settings(nemo.config)
        and (
            previous.info.get("outcome") != "budget_exhausted"
            or previous.info.get("mask_batch") == nemo.mask_batch
        )
    )


def _call_bar(bar) -> Callable[[SearchProgress], None]:
    """A :meth:`NeMo.localize` progress callback that shows UNet calls, stage and candidate count on ``bar``."""

    def show(state: SearchProgress) -> None:
        bar.n = state.unet_calls
        bar.set_postfix(stage=state.outcome or state.stage, neurons=state.neurons, refresh=False)
        bar.refresh()

    return show


def _value_stats(pipe, reference, config, cache_dir, progress) -> ValueStats:

    layers = list(value_layers(pipe.unet, config.blocks))
    path = None if cache_dir is None else Path(cache_dir) / "stats.safetensors"
    digest = None if reference is None else _digest(reference)
    if path is not None and path.is_file():
        stats = ValueStats.load(path)
        if reference is None:  # nothing to recompute them from: statistics of another model are an error
            stats.check(pipe.unet, layers, source=str(path))
            return stats
        try:
            stats.check(pipe.unet, layers, source=str(path))
            if stats.info.get("reference") == digest:
                return stats
        except ValueError:
            pass  # a stage of another model, layers or prompts: recomputed below
    if reference is None:
        raise ValueError("reference prompts are needed for the activation statistics (none cached)")
    stats = value_stats_of(
        pipe, list(reference), blocks=config.blocks, total=len(reference), progress=progress
    )
    stats.info["reference"] = digest
    if path is not None:
        stats.save(path)
    return stats


def calibrated_nemo(
    pipe,
    reference: Sequence[str] | None,
    *,
    config: NemoConfig | None = None,
    stats: ValueStats | None = None,
    threshold: float | None = None,
    calibration_prompts: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> NeMo:
    """Stages 1-2: NeMo on ``pipe`` with statistics of ``reference`` and its threshold calibrated on them.

    ``stats``/``threshold`` given are used as they are; with neither reference prompts nor a threshold
    the threshold is NeMo's SD-1.4 value (0.428), right only for SD-1.4. The threshold's spread (the std
    of the calibration scores; SD-1.4: 0.07; a given threshold: ``config.threshold_spread``) goes into
    the config: a search that misses the threshold by less is ``"near_miss"``.
    """

    config = config or NemoConfig()
    spread = config.threshold_spread
    if stats is None:
        stats = _value_stats(pipe, reference, config, cache_dir, progress)
    else:
        stats.check(pipe.unet, list(value_layers(pipe.unet, config.blocks)))
    if threshold is None:
        calibration = None if reference is None else list(reference)[:calibration_prompts]
        key = {
            "fingerprint": model_fingerprint(pipe.unet),
            "prompts": None if calibration is None else _digest(calibration),
            "search": _search_settings(config),
        }
        path = None if cache_dir is None else Path(cache_dir) / "threshold.json"
        if path is not None and path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("key") == key and "spread" in saved:
                threshold, spread = float(saved["threshold"]), float(saved["spread"])
        if threshold is None and calibration is None:
            threshold, spread = SD14_THRESHOLD, SD14_THRESHOLD_SPREAD
        elif threshold is None:
            found = NeMo.from_pipe(pipe, stats, config).threshold_calibration(calibration, progress=progress)
            threshold, spread = found["threshold"], found["std"]
            if path is not None:
                atomic_write_json(
                    path,
                    {
                        "key": key,
                        "threshold": threshold,
                        "spread": spread,
                        "mean": found["mean"],
                        "rule": "mean + 1 std",
                    },
                )
    return NeMo.from_pipe(pipe, stats, replace(config, threshold=float(threshold), threshold_spread=spread))


def localize_prompts(
    pipe,
    prompts: Sequence[tuple[str, str]] | Sequence[str],
    reference: Sequence[str] | None = None,
    *,
    config: NemoConfig | None = None,
    stats: ValueStats | None = None,
    threshold: float | None = None,
    calibration_prompts: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> Localization:
    """Stages 1-4 for ``prompts`` (``(id, prompt)`` pairs, or prompts whose ids are their positions).

    >>> run = localize_prompts(pipe, memorized_captions, generic_captions, cache_dir="runs/nemo")
    >>> with diffmem.edits.applied(pipe.unet, run.union): ...
    """
    from tqdm.auto import tqdm

    pairs = [(str(i), p) if isinstance(p, str) else (str(p[0]), p[1]) for i, p in enumerate(prompts)]
    if len({i for i, _ in pairs}) != len(pairs):
        raise ValueError("prompts: the ids must be unique")
    nemo = calibrated_nemo(
        pipe,
        reference,
        config=config,
        stats=stats,
        threshold=threshold,
        calibration_prompts=calibration_prompts,
        cache_dir=cache_dir,
        progress=progress,
    )
    threshold = nemo.config.threshold
    fingerprint = model_fingerprint(pipe.unet)
    folder = None if cache_dir is None else Path(cache_dir) / "neurons"
    sets: dict[str, NeuronSet] = {}
    new = 0
    bar = tqdm(pairs, desc="localize", unit="prompt", disable=not progress)
    for item_id, prompt in bar:
        path = None if folder is None else folder / neuron_file_name(item_id)
        previous = None if path is None or not path.is_file() else NeuronSet.load(path)
        if previous is not None and _reusable(previous, nemo, fingerprint, prompt):
            found = previous
        else:
            with tqdm(
                desc=f"  {item_id}"[:40],
                unit="call",
                total=nemo.config.max_unet_calls,
                leave=False,
                disable=not progress,
            ) as calls:
                found = nemo.localize(prompt, progress=_call_bar(calls) if progress else None)
            found.info["id"] = item_id
            if path is not None:
                found.save(path)
            new += 1
            bar.set_postfix_str(f"{item_id}: {found.info['outcome']} ({found.info['unet_calls']} calls)")
        sets[item_id] = found
    found = list(sets.values())
    # a search cut before it met the criterion holds up to every searched neuron: not a localization
    cut = [
        i for i, s in sets.items() if _outcome(s) == "budget_exhausted" and not s.info.get("criterion_met")
    ]
    kept = [s for i, s in sets.items() if i not in cut]
    union = kept[0].union(*kept[1:]) if kept else NeuronSet.empty(fingerprint, list(nemo.layers))
    union.info.update(
        threshold=threshold,
        left_out=cut,
        memorized=sum(bool(s.info.get("memorized")) for s in found),
        outcomes=dict(Counter(_outcome(s) for s in found)),
    )
    if cache_dir is not None:
        union.save(Path(cache_dir) / "union.json")
    return Localization(nemo.stats, threshold, sets, union, new)


def random_control(neuron_set: NeuronSet, unet, seed: int = 0) -> NeuronSet:
    """As many neurons as ``neuron_set`` has in each layer, drawn at random (seeded): the control that
    tells "these neurons carry the memorization" from "switching off this many neurons hurts"."""
    import torch

    neuron_set.validate(unet)
    generator = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    picks = [
        sorted(torch.randperm(modules[name].out_features, generator=generator)[: len(idx)].tolist())
        if idx
        else []
        for name, idx in zip(neuron_set.layers, neuron_set.neurons)
    ]
    return NeuronSet(
        model_fingerprint(unet), list(neuron_set.layers), picks, info={"control": "random", "seed": seed}
    )
