"""diffusers pipelines of diffmem, importable as ``diffmem.pipelines``.

Each file here is also loadable on its own with diffusers' ``custom_pipeline=`` mechanism.
"""

from diffmem.pipelines.pipeline_solidmark_outpaint import (
    SolidMarkOutpaintPipeline,
    SolidMarkOutpaintPipelineOutput,
)
from diffmem.pipelines.pipeline_stable_diffusion_xl_memguard import (
    StableDiffusionXLMemGuardPipeline,
    StableDiffusionXLMemGuardPipelineOutput,
)

from diffmem.guard.stable_diffusion import (
    StableDiffusionMemGuardPipeline,
    StableDiffusionMemGuardPipelineOutput,
)

__all__ = ["StableDiffusionMemGuardPipeline", "StableDiffusionMemGuardPipelineOutput"]
__all__ += ["StableDiffusionXLMemGuardPipeline", "StableDiffusionXLMemGuardPipelineOutput"]
__all__ += ["SolidMarkOutpaintPipeline", "SolidMarkOutpaintPipelineOutput"]
