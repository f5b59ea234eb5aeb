"""Early memorization scoring of many prompts, and calibration of the flag threshold.

Wen et al. (ICLR 2024) show that the noise gap of the first denoising step(s) already separates
memorized prompts from ordinary ones, so a scan need not generate images: ``score_prompts`` runs
only the first ``window[1]`` steps of the sampling loop (the pipeline is stopped through
``callback_on_step_end`` and nothing is decoded) and returns the same value the full pipeline's
score over that window would give for the same starting noise. It is the ``wen`` detector of the
registry (:class:`~diffmem.detectors.wen.WenDetector`) over a window, with the prompts checked and an
attention processor chosen; ``detector=`` scores with a detector the guarded pipeline can read from its
own loop instead (``broken-memories``, ``dsm``: :func:`~diffmem.detectors.trajectory.loop_detector`), so a
calibration can be made for it. ``calibrate`` picks the threshold. ``score_to_file`` scores prompt rows into
a JSONL or CSV results file (``diffmem detect``), written after every chunk and resumed from.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffmem.attention import attention_processors
from diffmem.detectors.trajectory import LoopDetector, detector_record, loop_detector
from diffmem.detectors.wen import WenDetector, noise_gap_scores
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_write_text
from diffmem.scores.detection import DetectionMetrics, detection_metrics

__all__ = ["calibrate", "detector_window", "noise_gap_scores", "score_prompts", "score_to_file"]

#: The settings every row of a results file carries; a resume must match them.
SETTINGS = (
    "model_fingerprint",
    "detector",
    "num_gens",
    "window",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "dtype",
)
#: CSV columns that hold JSON
_JSON_COLUMNS = ("scores", "window", "detector")
#: what rows written before a setting was recorded hold
_OLD_ROWS = {"dtype": "float32", "detector": {"name": "wen"}}


def _check_args(prompts, num_gens, window, num_inference_steps, batch_size, item_ids):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    for k, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{k}]: expected a non-empty string, got {p!r}")
    if not isinstance(num_gens, int) or num_gens < 1:
        raise ValueError(f"num_gens: expected an integer >= 1, got {num_gens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(f"window: expected (start, end), got {window!r}") from None
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_inference_steps):
        raise ValueError(
            f"window: expected integers 0 <= start < end <= num_inference_steps={num_inference_steps}, got {window!r}"
        )
    if item_ids is not None:
        if len(item_ids) != len(prompts):
            raise ValueError(
                f"item_ids: {len(item_ids)} ids for {len(prompts)} prompts (expected one per prompt)"
            )
        if len(set(map(str, item_ids))) != len(item_ids):
            raise ValueError("item_ids: ids must be unique (each seeds its prompt's noise)")
    return start, end


def score_prompts(
    pipe,
    prompts: Sequence[str],
    *,
    num_gens: int = 4,
    window: tuple[int, int] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    item_ids: Sequence | None = None,
    batch_size: int = 8,
    progress: bool = True,
    attention: str | None = "auto",
    height: int | None = None,
    width: int | None = None,
    detector: str | LoopDetector = "wen",
    **pipeline_kwargs,
) -> torch.Tensor:
    """Wen et al.'s score of each prompt and generation from the first ``window[1]`` steps only.

    Returns a float32 tensor ``[len(prompts), num_gens]``: entry ``[i, j]`` is the mean over steps
    ``window[0] <= k < window[1]`` of ``||eps(x_k, c_i) - eps(x_k, empty)||_2`` for generation ``j``,
    whose starting noise comes from ``item_generator(seed, item_ids[i], j)`` (``item_ids`` default to
    the prompt indices), so results do not depend on ``batch_size`` (prompts per batch). The prompt's
    score is the row mean. ``pipe`` is any Stable Diffusion pipeline; with diffmem's guarded pipeline
    its own scoring (and mitigation, via ``pipeline_kwargs``) is used. ``attention="auto"`` uses
    xformers on CUDA when installed, else PyTorch SDPA; the model's processors are restored after.
    ``detector`` other than ``"wen"`` (``"broken-memories"``, ``"dsm"`` or such an object) scores with
    it instead (``window``, default ``(0, 1)``, is Wen's: :func:`detector_window`).
    """
    reader = loop_detector(detector, "detector")
    window = detector_window(reader, window)
    start, end = _check_args(prompts, num_gens, window, num_inference_steps, batch_size, item_ids)
    scorer = WenDetector(steps=end, start=start) if reader is None else reader
    with attention_processors(pipe.unet, attention):
        return scorer.score(
            pipe, list(prompts), num_gens=num_gens, seed=seed, item_ids=item_ids,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
            progress=progress, height=height, width=width, **pipeline_kwargs,
        )  # fmt: skip


def detector_window(detector: LoopDetector | None, window: tuple[int, int] | None = None) -> tuple[int, int]:
    """The steps a score reads: ``window`` (default ``(0, 1)``) for Wen's noise gap (``detector=None``); the
    first ``loop_steps()`` for another detector, which takes no other window."""
    if detector is None:
        return (0, 1) if window is None else window
    own = (0, detector.loop_steps())
    if window is not None and tuple(window) != own:
        raise ValueError(
            f"window: the noise gap's (detector='wen'); {detector.name!r} reads the first {own[1]} sampling steps"
        )
    return own


def calibrate(scores, labels) -> DetectionMetrics:
    """AUC, TPR@1%FPR, accuracy and the chosen threshold (Wen et al.'s definitions) from labelled prompts.

    ``scores`` is ``[n]`` or ``[n, num_gens]`` (then averaged over generations, as Wen et al. do);
    ``labels`` are 1 for memorized prompts, 0 otherwise.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    if s.ndim == 2:
        s = s.mean(dim=1)
    return detection_metrics(s, labels)


def read_results(path: Path) -> list[dict]:
    """Rows already in a results file (JSONL or CSV), for resuming."""
    if not path.exists():
        return []
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        for row in rows:
            for key in _JSON_COLUMNS:
                # files written before the detector was recorded have no such column
                if row.get(key) not in (None, ""):
                    row[key] = json.loads(row[key])
            for key in ("num_gens", "num_inference_steps", "seed", "height", "width"):
                row[key] = int(row[key])
            row["score"], row["guidance_scale"] = float(row["score"]), float(row["guidance_scale"])
            if row.get("label") not in (None, ""):
                row["label"] = int(row["label"])
            else:
                row.pop("label", None)
        return rows
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_results(path: Path, rows: list[dict]) -> None:
    """The rows as CSV (``.csv``) or JSONL, atomically."""
    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        fields = ["id", "prompt", "score", "scores", "label", *SETTINGS]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: json.dumps(row[k]) for k in _JSON_COLUMNS}})
        atomic_write_text(path, buf.getvalue())
    else:
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def _resumed(out: Path, settings: dict) -> dict:
    """Rows of ``out`` by id; a row made with other settings is an error naming ``--out``."""
    done = {}
    for row in read_results(out):
        if any(row.get(k, _OLD_ROWS.get(k)) != v for k, v in settings.items()):
            raise ValueError(
                f"--out: {out} holds results made with other settings ({ {k: row.get(k) for k in SETTINGS} }); "
                "use another --out or delete it"
            )
        done[row["id"]] = {**_OLD_ROWS, **row}
    return done


def score_to_file(
    pipe,
    rows: Sequence[dict],
    out: str | Path,
    *,
    num_gens: int = 4,
    window: tuple[int, int] | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 8,
    chunk: int = 64,
    height: int,
    width: int,
    dtype: str = "float32",
    progress: bool = True,
    log: Callable[[str], None] = print,
    detector: str | LoopDetector = "wen",
) -> list[dict]:
    """Score ``rows`` (``id``, ``prompt``, optional ``label``) with ``score_prompts`` into ``out``
    (``.jsonl`` or ``.csv``), written after every ``chunk`` prompts; rows already there are kept.

    Returns the result rows in the order of ``rows``: the row, ``score`` (mean over generations),
    ``scores`` (one per generation) and the settings (``SETTINGS``; ``detector`` as a calibration records
    it). ``pipe``'s attention is used as it is.
    """
    out = Path(out)
    reader = loop_detector(detector, "detector")
    window = detector_window(reader, window)
    settings = {
        "model_fingerprint": model_fingerprint(pipe.unet),
        "detector": detector_record(reader),
        "num_gens": num_gens,
        "window": list(window),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "height": height,
        "width": width,
        "dtype": dtype,
    }
    done = _resumed(out, settings)
    todo = [r for r in rows if r["id"] not in done]
    if done:
        log(f"resuming: {len(done)} of {len(rows)} prompts already scored in {out}")
    with tqdm(
        total=len(rows), initial=len(rows) - len(todo), desc="detect", unit="prompt", disable=not progress
    ) as bar:
        for c in range(0, len(todo), chunk):
            part = todo[c : c + chunk]
            scores = score_prompts(
                pipe,
                [r["prompt"] for r in part],
                num_gens=num_gens,
                window=tuple(window),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                seed=seed,
                item_ids=[r["id"] for r in part],
                batch_size=batch_size,
                progress=False,
                attention=None,
                height=height,
                width=width,
                detector="wen" if reader is None else reader,
            )
            for r, s in zip(part, scores.tolist()):
                done[r["id"]] = {**r, "score": sum(s) / len(s), "scores": s, **settings}
            write_results(out, [done[r["id"]] for r in rows if r["id"] in done])
            bar.update(len(part))
    return [done[r["id"]] for r in rows]
