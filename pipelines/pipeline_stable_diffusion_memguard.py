"""``StableDiffusionMemGuardPipeline``, importable as ``diffmem.pipelines`` and loadable on its own with diffusers'
``custom_pipeline=`` mechanism (``StableDiffusion...Pipeline.from_pretrained(path, custom_pipeline="<this file>")``).

The class is defined in :mod:`diffmem.guard.stable_diffusion`, below the flows that build it (scans, evaluations):
the core never imports this entry point.
"""

from diffmem.guard.stable_diffusion import (
    StableDiffusionMemGuardPipeline,
    StableDiffusionMemGuardPipelineOutput,
)

__all__ = ["StableDiffusionMemGuardPipeline", "StableDiffusionMemGuardPipelineOutput"]
