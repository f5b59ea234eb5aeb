"""diffmem: find, measure, localize and remove training-data memorization in text-to-image diffusion models.

Imports are lazy (as diffusers' are): ``import diffmem`` is cheap; ``diffmem.StableDiffusionMemGuardPipeline``
and the other names below load torch and diffusers the first time they are used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: public name -> the module that defines it, one block per capability
_EXPORTS = {
    # the drop-in pipelines, their calibration, edits
    "StableDiffusionMemGuardPipeline": "diffmem.pipelines",
    "StableDiffusionXLMemGuardPipeline": "diffmem.pipelines",
    "SolidMarkOutpaintPipeline": "diffmem.pipelines",
    "GuardCalibration": "diffmem.guard.calibration",
    "Edit": "diffmem.edits",
    "load_edit": "diffmem.edits",
    "load_pipeline": "diffmem.modelio",
    "load_guarded": "diffmem.guard.auto",
    # detection
    "Detector": "diffmem.detectors",
    "get_detector": "diffmem.detectors",
    "available_detectors": "diffmem.detectors",
    "score_prompts": "diffmem.detect",
    "calibrate": "diffmem.detect",
    # mitigation
    "Mitigation": "diffmem.mitigations",
    "get_mitigation": "diffmem.mitigations",
    "available_mitigations": "diffmem.mitigations",
    # localization and removal
    "NeMo": "diffmem.localize.nemo",
    "NemoConfig": "diffmem.localize.nemo",
    "NeuronSet": "diffmem.edits",
    "WeightMask": "diffmem.edits",
    "value_stats_of": "diffmem.localize.stats",
    "find_weight_mask": "diffmem.localize.prune",
    "localize_prompts": "diffmem.evaluate.localization",
    "model_fingerprint": "diffmem.fingerprint",
    # evaluation
    "ReplicationCriterion": "diffmem.scores.replication",
    "evaluate_detectors": "diffmem.evaluate.detection",
    "evaluate_mitigations": "diffmem.evaluate.mitigation",
    "organism_suite": "diffmem.evaluate.suites",
    "RobustnessEvaluation": "diffmem.evaluate.robustness",
    "EditReplication": "diffmem.evaluate.edit_replication",
    "read_prompt_set": "diffmem.prompt_sets",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'diffmem' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # for type checkers and IDEs
    from diffmem.detect import calibrate, score_prompts  # noqa: F401
    from diffmem.detectors import Detector, available_detectors, get_detector  # noqa: F401
    from diffmem.edits import Edit, load_edit  # noqa: F401
    from diffmem.guard.auto import load_guarded  # noqa: F401
    from diffmem.guard.calibration import GuardCalibration  # noqa: F401
    from diffmem.mitigations import Mitigation, available_mitigations, get_mitigation  # noqa: F401
    from diffmem.pipelines import (  # noqa: F401
        SolidMarkOutpaintPipeline,
        StableDiffusionMemGuardPipeline,
        StableDiffusionXLMemGuardPipeline,
    )
