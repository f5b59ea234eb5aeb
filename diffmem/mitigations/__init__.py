"""Inference-time mitigations behind one protocol (:class:`Mitigation`) and one registry.

``mitigation="nemo"``, ``"embedding"``, ``"guidance-delay"``, ``"attention-rescale"``, ``"initial-noise"``,
``"bright-ending-embedding"``, ``"pad-token"``, ``"guard"`` in a guarded pipeline call, or any :class:`Mitigation` object.
"""

from diffmem.mitigations.attention import AttentionRescaleMitigation
from diffmem.mitigations.base import (
    GuardedBatch,
    Mitigation,
    MitigationPlan,
    available_mitigations,
    get_mitigation,
    register_mitigation,
)
from diffmem.mitigations.bright_ending import BrightEndingEmbeddingMitigation
from diffmem.mitigations.embedding import EmbeddingMitigation
from diffmem.mitigations.guard import GuardMitigation
from diffmem.mitigations.guidance import GuidanceDelayMitigation
from diffmem.mitigations.initial_noise import InitialNoiseMitigation
from diffmem.mitigations.nemo import NeMoMitigation
from diffmem.mitigations.pad_token import PadTokenMitigation

__all__ = [
    "AttentionRescaleMitigation",
    "BrightEndingEmbeddingMitigation",
    "EmbeddingMitigation",
    "GuardMitigation",
    "GuidanceDelayMitigation",
    "InitialNoiseMitigation",
    "GuardedBatch",
    "Mitigation",
    "MitigationPlan",
    "NeMoMitigation",
    "PadTokenMitigation",
    "available_mitigations",
    "get_mitigation",
    "register_mitigation",
]
