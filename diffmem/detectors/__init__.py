"""Memorization detectors behind one protocol (:class:`Detector`) and one registry.

Built in: ``wen`` (Wen et al., ICLR 2024), ``ren-entropy`` (Ren et al., ECCV 2024), ``bright-ending``
(Chen et al., ICLR 2025), ``sharpness`` (Jeon et al., ICML 2025), ``anisotropy`` (Asthana &
Belagiannis, ICLR 2026), ``broken-memories`` (Huang et al., KDD 2026), ``dsm`` and ``hessian-difference``
(early detection, ICML 2026). ``diffmem bench detection`` ranks them on one ground truth.
"""

from diffmem.detectors.anisotropy import AnisotropyDetector
from diffmem.detectors.attention_entropy import AttentionEntropyDetector
from diffmem.detectors.base import DETECTORS, Detector, available_detectors, get_detector, register_detector
from diffmem.detectors.bright_ending import BrightEndingDetector
from diffmem.detectors.broken_memories import BrokenMemoriesDetector
from diffmem.detectors.dsm import DSMDetector
from diffmem.detectors.hessian_difference import HessianDifferenceDetector
from diffmem.detectors.sharpness import SharpnessDetector
from diffmem.detectors.wen import WenDetector

__all__ = [
    "DETECTORS",
    "AnisotropyDetector",
    "AttentionEntropyDetector",
    "BrightEndingDetector",
    "BrokenMemoriesDetector",
    "DSMDetector",
    "Detector",
    "HessianDifferenceDetector",
    "SharpnessDetector",
    "WenDetector",
    "available_detectors",
    "get_detector",
    "register_detector",
]
