"""The guard's calibration: a flag threshold and the conditions it was measured under, kept in the model folder.

Wen et al.'s score is a norm of a noise-prediction gap, so a threshold only means something under the
conditions it was found: the same detector (Wen's noise gap, or a detector that reads the sampling loop:
``broken-memories``, ``dsm``, each with its settings), the same model, score window, schedule (scheduler and number of steps),
resolution (the norm grows with the latent area: on SD-1.5's architecture the same prompts score
about 9-10 at 512 px and 4-5 at 256 px) and, for windows past the first step, guidance scale. A
``GuardCalibration`` records all of them with the measured AUC / TPR@1%FPR and the data it came from.
It lives beside the model as ``diffmem_calibration.json`` (stock diffusers ignores the file), is
written by ``diffmem detect --labels ... --save-calibration MODEL_DIR`` (labelled prompts) or ``diffmem
detect --fpr 0.01 --save-calibration MODEL_DIR`` (ordinary prompts only: the threshold at a target
false-positive rate, ``threshold_at_fpr``, with the rate's interval, ``fpr_summary``) and read back by the guarded
pipelines' ``from_pretrained``. :meth:`GuardCalibration.mismatch` says why a call's settings do not
fit; the pipeline then refuses the calibration for that call (``memorized`` stays ``None`` and a
warning names the setting) instead of applying it silently.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from diffmem.saved import SavedObject
from diffmem.scores.solidmark import binomial_ci

#: Name of the calibration file inside a model folder.
CALIBRATION_FILE = "diffmem_calibration.json"
#: The ``format`` of format-1 calibration files (before :class:`~diffmem.saved.SavedObject`), read as legacy.
FORMAT = "diffmem.GuardCalibration/1"


def threshold_at_fpr(scores, fpr: float) -> float:
    """The lowest flag threshold (flag: score ``>=`` it) at which at most ``floor(fpr * n)`` of ``n``
    ordinary scores are flagged: midway between the last score flagged and the first one not, or just
    above the first one not flagged where they tie (``fpr < 1/n``: just above the largest score)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise CalibrationError("threshold_at_fpr: expected one or more finite scores")
    if not 0 <= fpr < 1:
        raise CalibrationError(f"fpr: expected 0 <= fpr < 1, got {fpr}")
    k = int(math.floor(fpr * s.size + 1e-9))  # false positives allowed
    first_out = s[k]
    if k > 0 and s[k - 1] > first_out:
        return float((s[k - 1] + first_out) / 2)
    return float(np.nextafter(first_out, np.inf))


def fpr_summary(image_scores, prompt_of_image, threshold: float) -> dict[str, Any]:
    """The false-positive rate a threshold has on ordinary prompts: over images (what the pipeline flags)
    and over prompts (any of its images flagged: the independent unit), each with its Wilson 95 % interval
    and the counts it rests on."""
    flagged = np.asarray(image_scores, dtype=np.float64) >= threshold
    prompts = np.asarray(prompt_of_image)
    by_prompt = {p: False for p in prompts.tolist()}
    for p, f in zip(prompts.tolist(), flagged.tolist()):
        by_prompt[p] = by_prompt[p] or f
    n_img, k_img = int(flagged.size), int(flagged.sum())
    n_pr, k_pr = len(by_prompt), int(sum(by_prompt.values()))
    return {
        "n_images": n_img,
        "images_flagged": k_img,
        "fpr": k_img / n_img,
        "fpr_ci95": list(binomial_ci(k_img, n_img)),
        "n_prompts": n_pr,
        "prompts_flagged": k_pr,
        "prompt_fpr": k_pr / n_pr,
        "prompt_fpr_ci95": list(binomial_ci(k_pr, n_pr)),
    }


class CalibrationError(ValueError):
    """A calibration file that cannot be read, or a calibration that does not fit a call."""


@dataclass(frozen=True)
class GuardCalibration(SavedObject):
    """A memorization flag threshold with the conditions it holds under.

    Saved by :class:`~diffmem.saved.SavedObject` as ``diffmem_calibration.json`` in a model folder
    (``save_pretrained(model_dir)``); format-1 files and the organism's first files still load.

    Args:
        memorization_threshold: flag an image when its score is ``>=`` this.
        memorization_window: ``(start, end)`` UNet calls averaged by the score (``(0, 1)``: first step).
        num_inference_steps: length of the schedule the scores were taken on.
        scheduler: class name of the scheduler (``"DDIMScheduler"``, ...).
        height, width: image size in pixels.
        guidance_scale: classifier-free guidance of the scoring runs (matters only past the first step).
        model_fingerprint: :func:`diffmem.fingerprint.model_fingerprint` of the UNet it was measured on.
        auc, tpr_at_1pct_fpr, n_positive, n_negative: the calibration's measured detection quality
            (over single images, what the pipeline flags; ``extra["per_prompt"]`` has Wen et al.'s
            per-prompt figures when ``diffmem detect`` wrote it).
        num_gens, seed: noise draws per prompt and base seed of the scoring runs.
        data: where the labelled prompts came from.
        memorization_detector: the detector the threshold is for, as
            :func:`diffmem.detectors.trajectory.detector_record` gives it (``{"name": "dsm", "step": 1}``);
            ``None`` (files before it was recorded) is Wen's noise gap. :attr:`detector` reads it.
        extra: anything else worth keeping (free-form, JSON).
    """

    config_name: ClassVar[str] = CALIBRATION_FILE
    format_version: ClassVar[int] = 2

    memorization_threshold: float
    memorization_window: tuple[int, int]
    num_inference_steps: int | None = None
    scheduler: str | None = None
    height: int | None = None
    width: int | None = None
    guidance_scale: float | None = None
    model_fingerprint: str | None = None
    auc: float | None = None
    tpr_at_1pct_fpr: float | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    num_gens: int | None = None
    seed: int | None = None
    data: str | None = None
    rescaled_from: tuple[int, int] | None = None
    memorization_detector: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.memorization_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise CalibrationError(f"memorization_threshold: expected a finite number >= 0, got {t!r}")
        try:
            start, end = (int(v) for v in self.memorization_window)
        except (TypeError, ValueError):
            raise CalibrationError(
                f"memorization_window: expected [start, end], got {self.memorization_window!r}"
            ) from None
        if not 0 <= start < end:
            raise CalibrationError(f"memorization_window: expected 0 <= start < end, got {[start, end]}")
        record = self.memorization_detector
        if record is not None and not (isinstance(record, dict) and isinstance(record.get("name"), str)):
            raise CalibrationError(
                f"memorization_detector: expected an object with the detector's name, got {record!r}"
            )
        object.__setattr__(self, "memorization_window", (start, end))
        object.__setattr__(self, "memorization_threshold", float(t))
        if self.rescaled_from is not None:
            object.__setattr__(self, "rescaled_from", tuple(int(v) for v in self.rescaled_from))

    @property
    def detector(self) -> dict[str, Any]:
        """The detector the threshold is for (``{"name": "wen"}`` when the file does not say)."""
        return dict(self.memorization_detector or {"name": "wen"})

    # ----------------------------------------------------------------------------------- checks
    def mismatch(
        self,
        *,
        window: tuple[int, int],
        num_inference_steps: int,
        scheduler: str,
        height: int,
        width: int,
        guidance_scale: float,
        negative_prompt: bool = False,
        detector: dict[str, Any] | None = None,
    ) -> str | None:
        """``None`` when a call with these settings can use the threshold, else the reason it cannot.

        The first step's gap does not depend on the guidance scale (the loop has not yet moved), so
        the guidance scale is compared only for windows that end after the first UNet call (and for
        every detector other than Wen's, which read the guided loop's latents). A negative prompt changes
        what the gap is measured against, so it refuses the calibration. ``detector`` (default Wen's) is
        the call's :func:`~diffmem.detectors.trajectory.detector_record`: a threshold holds only for the
        score it was set on.
        """
        missing = [
            name
            for name in ("num_inference_steps", "scheduler", "height", "width")
            if getattr(self, name) is None
        ]
        if missing:
            return (
                f"the calibration does not record its {', '.join(missing)} (an old calibration file); "
                "recalibrate with `diffmem detect --labels COLUMN --save-calibration MODEL_DIR`"
            )
        found = []
        detector = dict(detector or {"name": "wen"})
        if detector != self.detector:
            found.append(f"memorization_detector {detector} (calibrated: {self.detector})")
        if tuple(window) != self.memorization_window:
            found.append(f"memorization_window {tuple(window)} (calibrated: {self.memorization_window})")
        if num_inference_steps != self.num_inference_steps:
            found.append(
                f"num_inference_steps={num_inference_steps} (calibrated: {self.num_inference_steps})"
            )
        if scheduler != self.scheduler:
            found.append(f"scheduler {scheduler} (calibrated: {self.scheduler})")
        guided = self.memorization_window[1] > 1 or self.detector["name"] != "wen"
        if guided and self.guidance_scale is not None:
            if not math.isclose(guidance_scale, self.guidance_scale):
                found.append(f"guidance_scale={guidance_scale} (calibrated: {self.guidance_scale})")
        if (height, width) != (self.height, self.width):
            found.append(
                f"{height}x{width} px (calibrated: {self.height}x{self.width}; scores grow with the "
                "resolution; `calibration.rescaled(height, width)` gives an approximate threshold)"
            )
        if negative_prompt:
            found.append("a negative prompt (the score is then measured against it, not the empty prompt)")
        if not found:
            return None
        return "the call differs from the calibration in " + "; ".join(found)

    def rescaled(self, height: int, width: int) -> GuardCalibration:
        """The calibration moved to another resolution: threshold times ``sqrt(area / calibrated area)``.

        An approximation (the gap is an L2 norm over the latent, so it grows as the square root of its
        size when the per-element gap stays the same); the result records ``rescaled_from``.
        """
        if self.height is None or self.width is None:
            raise CalibrationError("this calibration records no resolution; it cannot be re-scaled")
        if height <= 0 or width <= 0:
            raise CalibrationError(f"rescaled: expected positive height and width, got {height}x{width}")
        factor = math.sqrt((height * width) / (self.height * self.width))
        values = asdict(self)
        values.update(
            memorization_threshold=self.memorization_threshold * factor,
            height=int(height),
            width=int(width),
            rescaled_from=self.rescaled_from or (self.height, self.width),
        )
        return GuardCalibration(**values)

    # ----------------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (what the saved config holds after its header)."""
        out = asdict(self)
        out["memorization_window"] = list(self.memorization_window)
        if self.rescaled_from is not None:
            out["rescaled_from"] = list(self.rescaled_from)
        if self.memorization_detector is None:  # Wen's, as every file written before the field reads
            del out["memorization_detector"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "calibration") -> GuardCalibration:
        """The calibration from a saved config of any version (with or without the header) or :meth:`to_dict`."""
        if not isinstance(data, dict):
            raise CalibrationError(f"{source}: expected a JSON object")
        try:
            return cls._from_config(data, {}, source)
        except CalibrationError:
            raise
        except ValueError as err:
            raise CalibrationError(str(err)) from None

    def _parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.to_dict(), {}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, Any], source: str) -> GuardCalibration:
        return cls._from_fields(config, source, first_files=False)

    @classmethod
    def _from_legacy(cls, config: dict[str, Any], tensors: dict[str, Any], source: str) -> GuardCalibration:
        """Format 1 (``"format": "diffmem.GuardCalibration/1"``) and the organism's first files (no
        ``format``: threshold and window, the AUC under another name)."""
        fields_ = {k: v for k, v in config.items() if k != "format"}
        return cls._from_fields(fields_, source, first_files=config.get("format") != FORMAT)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], source: str, first_files: bool) -> GuardCalibration:
        if "memorization_threshold" not in data:
            raise CalibrationError(f"{source}: no memorization_threshold")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("memorization_window", [0, 1])
        legacy = {k: v for k, v in data.items() if k not in known}
        if first_files:  # AUC under another name, the rest as extra
            values.setdefault("auc", legacy.pop("first_step_auc", None))
            values.setdefault("tpr_at_1pct_fpr", legacy.pop("first_step_tpr_at_1pct_fpr", None))
            values.setdefault("data", legacy.pop("calibrated_on", None))
        values["extra"] = {**legacy, **dict(values.get("extra") or {})}
        try:
            return cls(**values)
        except (CalibrationError, TypeError) as err:
            raise CalibrationError(f"{source}: {err}") from None

    @classmethod
    def from_pretrained(
        cls, pretrained_path: str | os.PathLike, argument: str | None = None
    ) -> GuardCalibration | None:
        """The calibration of a local model folder (or the JSON file itself), or ``None`` when it has none.

        A file that is not a calibration raises :class:`CalibrationError` naming it.
        """
        path = Path(pretrained_path)
        if not (path / CALIBRATION_FILE if path.is_dir() else path).is_file():
            return None
        try:
            return super().from_pretrained(path, argument)
        except CalibrationError:
            raise
        except ValueError as err:
            raise CalibrationError(str(err)) from None
