"""NeMo's whole flow as one function: statistics -> threshold -> one NeuronSet per prompt -> their union.

1. value-neuron activation statistics of non-memorized ``reference`` prompts (NeMo eq. 3's mean and std);
2. the memorization threshold calibrated on them: mean + 1 std of NeMo's detection score (NeMo's rule,
   :meth:`~diffmem.localize.nemo.NeMo.calibrate_threshold`), unless one is given;
3. :meth:`~diffmem.localize.nemo.NeMo.localize` for every prompt (an empty set when it is not memorized);
4. the union of the sets: the neurons to switch off for all of them at once.

With ``cache_dir`` every stage is a file there (``stats.safetensors``, ``threshold.json``,
``neurons/<id>.json``, ``union.json``), written atomically and reused by a rerun only when it was made
on the same model (fingerprint), from the same prompts and settings: a killed run resumes at the prompt
it was on. ``diffmem localize``, the bench's NeMo mitigation and the ``benchmarks/`` evaluations all run
through here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from diffmem.localize.nemo import SD14_THRESHOLD, NeMo, NemoConfig
from diffmem.localize.neuron_set import NeuronSet
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
        """Ids of the prompts NeMo found memorized (a non-empty set)."""
        return [i for i, s in self.sets.items() if s.info.get("memorized")]


def neuron_file_name(item_id: str) -> str:
    """A file name for a prompt id: its safe characters, and a short hash when any were replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id))[:100]
    if safe != str(item_id):
        safe += "-" + hashlib.sha256(str(item_id).encode("utf-8")).hexdigest()[:8]
    return safe + ".json"


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode("utf-8")).hexdigest()[:16]


def _search_settings(config: NemoConfig) -> dict:
    """The settings a calibrated threshold depends on (not the threshold itself, nor the batching)."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
    d.pop("threshold")
    d.pop("mask_batch")
    return d


def _value_stats(pipe, reference, config, cache_dir, progress) -> ValueStats:
    from diffmem.hooks.neurons import value_layers

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
    the threshold is NeMo's SD-1.4 value (0.428), right only for SD-1.4.
    """
    from diffmem.hooks.neurons import value_layers
    from diffmem.io import atomic_write_json
    from diffmem.modelio import model_fingerprint

    config = config or NemoConfig()
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
            if saved.get("key") == key:
                threshold = float(saved["threshold"])
        if threshold is None and calibration is None:
            threshold = SD14_THRESHOLD
        elif threshold is None:
            threshold = NeMo.from_pipe(pipe, stats, config).calibrate_threshold(
                calibration, progress=progress
            )
            if path is not None:
                atomic_write_json(path, {"key": key, "threshold": threshold, "rule": "mean + 1 std"})
    return NeMo.from_pipe(pipe, stats, replace(config, threshold=float(threshold)))


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
    >>> with diffmem.edit.applied(pipe.unet, run.union): ...
    """
    from tqdm.auto import tqdm

    from diffmem.modelio import model_fingerprint

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
    for item_id, prompt in tqdm(pairs, desc="localize", unit="prompt", disable=not progress):
        path = None if folder is None else folder / neuron_file_name(item_id)
        if path is not None and path.is_file():
            previous = NeuronSet.load(path)
            if (
                previous.fingerprint == fingerprint
                and previous.prompts == [prompt]
                and previous.info.get("threshold") == threshold
                and list(previous.layers) == list(nemo.layers)
            ):
                sets[item_id] = previous
                continue
        found = nemo.localize(prompt)
        found.info["id"] = item_id
        if path is not None:
            found.save(path)
        sets[item_id] = found
        new += 1
    found = list(sets.values())
    union = found[0].union(*found[1:]) if found else NeuronSet.empty(fingerprint, list(nemo.layers))
    union.info.update(threshold=threshold, memorized=sum(bool(s.info.get("memorized")) for s in found))
    if cache_dir is not None:
        union.save(Path(cache_dir) / "union.json")
    return Localization(nemo.stats, threshold, sets, union, new)


def random_control(neuron_set: NeuronSet, unet, seed: int = 0) -> NeuronSet:
    """As many neurons as ``neuron_set`` has in each layer, drawn at random (seeded): the control that
    tells "these neurons carry the memorization" from "switching off this many neurons hurts"."""
    import torch

    from diffmem.modelio import model_fingerprint

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
