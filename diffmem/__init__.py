"""diffmem: find, measure, localize and remove training-data memorization in text-to-image diffusion models.

Imports are lazy: ``import diffmem`` is cheap; the heavy modules (torch, diffusers) load when used.
"""

__version__ = "0.1.0"
