"""``SolidMarkOutpaintPipeline``, importable as ``diffmem.pipelines`` and loadable on its own with diffusers'
``custom_pipeline=`` mechanism (``StableDiffusionPipeline.from_pretrained(path, custom_pipeline="<this file>")``).

The class is defined in :mod:`diffmem.guard.solidmark_outpaint`, below the SolidMark evaluation that builds it:
the core never imports this entry point.
"""

from diffmem.guard.solidmark_outpaint import (
    FIXED_BY_REFERENCE,
    SolidMarkOutpaintPipeline,
    SolidMarkOutpaintPipelineOutput,
    latent_mask,
)

__all__ = [
    "FIXED_BY_REFERENCE",
    "SolidMarkOutpaintPipeline",
    "SolidMarkOutpaintPipelineOutput",
    "latent_mask",
]
