"""Inference-time mitigations behind one protocol (:class:`Mitigation`) and one registry.

``mitigation="nemo"`` / ``"embedding"`` in a guarded pipeline call, or any :class:`Mitigation` object.
"""

from diffmem.mitigations.base import (
    GuardedBatch,
    Mitigation,
    MitigationPlan,
    available_mitigations,
    get_mitigation,
    register_mitigation,
)
from diffmem.mitigations.embedding import EmbeddingMitigation
from diffmem.mitigations.nemo import NeMoMitigation

__all__ = [
    "EmbeddingMitigation",
    "GuardedBatch",
    "Mitigation",
    "MitigationPlan",
    "NeMoMitigation",
    "available_mitigations",
    "get_mitigation",
    "register_mitigation",
]
