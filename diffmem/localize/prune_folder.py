"""Subspace pruning into a folder (``diffmem prune``): the WeightMask, both statistics, optionally the
pruned model, and a report (``report.json``, ``report.html``) of what was pruned, per layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffmem.edits import WeightMask, save_edited
from diffmem.io import atomic_write_json
from diffmem.localize.prune import find_weight_mask
from diffmem.report import table_html, write_html


def _layers(mask: WeightMask) -> list[dict]:
    return [
        {
            "layer": name,
            "shape": list(m.shape),
            "pruned": int(m.sum()),
            "pruned_fraction": float(m.float().mean()),
        }
        for name, m in mask.masks.items()
    ]


def _write_report(path: Path, summary: dict, n_memorized: int, n_reference: int) -> None:
    overview = {
        "weights pruned": summary["num_pruned"],
        "of the FFN layers": summary["pruned_fraction_of_ffn_layers"],
        "of the UNet": summary["pruned_fraction_of_unet"],
        "memorized prompts": n_memorized,
        "reference prompts": n_reference,
    }
    write_html(
        path,
        "diffmem prune",
        [("Summary", table_html([overview])), ("Pruned fraction per layer", table_html(summary["layers"]))],
    )


def prune_to_folder(
    pipe,
    memorized: Sequence[str],
    reference: Sequence[str] | None,
    out: str | Path,
    *,
    model: str | None = None,
    save_model: bool = False,
    **search: Any,
) -> dict:
    """Find the WeightMask of ``memorized`` against ``reference`` (``find_weight_mask`` with ``search``)
    and write ``weight_mask.safetensors``, ``stats_memorized.safetensors``, ``stats_reference.safetensors``,
    with ``save_model`` the pruned model (``model/``), and the report; returns the summary
    (``report.json``: counts, fractions of the FFN layers and of the UNet, one row per layer)."""
    mask, mem, ref = find_weight_mask(pipe, memorized, reference, **search)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mask.save(out / "weight_mask.safetensors")
    mem.save(out / "stats_memorized.safetensors")
    ref.save(out / "stats_reference.safetensors")
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    summary = {
        "model": model,
        "fingerprint": mask.fingerprint,
        "num_pruned": mask.num_pruned(),
        "pruned_fraction_of_ffn_layers": mask.num_pruned() / max(1, mask.num_weights()),
        "pruned_fraction_of_unet": mask.num_pruned() / unet_params,
        "params": mask.params,
        "layers": _layers(mask),
    }
    if save_model:
        save_edited(pipe, mask, out / "model")
        summary["pruned_model"] = str(out / "model")
    atomic_write_json(out / "report.json", summary)
    _write_report(out / "report.html", summary, len(memorized), len(reference or memorized))
    return summary
