"""SolidMark outpainting: generate a masked region of a reference image with a stock SD pipeline.

SolidMark (Kriplani et al., arXiv:2503.00592) scores a training image by letting the model
outpaint its keyed frame while the rest of the image is known. Here the known region is imposed
in latent space by known-region replacement: after every scheduler step the latents outside the
mask are overwritten by the reference latents forward-noised to the next timestep,

    z_{t'} <- m * z_{t'} + (1 - m) * add_noise(E(x_ref), eps, t')

with ``m`` the pixel mask max-pooled to the latent grid, ``eps`` one noise draw per image (the call's
``latents``, as in diffusers' inpainting pipeline, or drawn from its ``generator``) and, after
the last step, the clean reference latents. It composes with the unmodified denoising loop of
``StableDiffusionPipeline`` through ``callback_on_step_end``, so every scheduler's own ``add_noise``
(DDIM, Euler, DPM-Solver, ...) and both epsilon and v-prediction models work, with no VAE round
trip per step. Defined here, below the evaluations that build it (the SolidMark evaluation); importable as
``diffmem.pipelines`` and loadable with ``custom_pipeline=`` from ``pipelines/pipeline_solidmark_outpaint.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffmem.guard.signature import extended_call, keyword

__all__ = [
    "FIXED_BY_REFERENCE",
    "SolidMarkOutpaintPipeline",
    "SolidMarkOutpaintPipelineOutput",
    "latent_mask",
]

#: Stock arguments the reference image fixes (the call refuses them).
FIXED_BY_REFERENCE = ("height", "width", "num_images_per_prompt", "timesteps", "sigmas")


@dataclass
class SolidMarkOutpaintPipelineOutput(StableDiffusionPipelineOutput):
    """``images``: the outpainted images (``output_type``); ``nsfw_content_detected`` as the stock
    pipeline's; ``mask``: the pixel mask (True = generated)."""

    mask: torch.Tensor | None = None


def latent_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Max-pool a ``(H, W)`` pixel mask to the latent grid: a latent cell is generated if any of its pixels is."""
    m = mask.to(torch.float32)[None, None]
    return F.max_pool2d(m, kernel_size=factor, stride=factor)[0, 0]


def _as_pixel_tensor(image) -> torch.Tensor:
    """A ``(B, C, H, W)`` float tensor in [0, 1] from a tensor, an array or a list of PIL images."""
    if isinstance(image, torch.Tensor):
        x = image if image.ndim == 4 else image[None]
    else:
        images = image if isinstance(image, (list, tuple)) else [image]
        arrays = [
            np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 if isinstance(im, Image.Image) else im
            for im in images
        ]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    x = x.float()
    if x.min() < 0 or x.max() > 1:
        raise ValueError("image must hold pixel values in [0, 1]")
    return x


class SolidMarkOutpaintPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` that generates only ``mask`` of ``image`` (True = generate).

    Call it like the stock pipeline, plus ``image`` (the reference, ``(B, 3, H, W)`` in [0, 1] or PIL)
    and ``mask`` (``(H, W)`` bool). The paper's settings are the defaults: 100 steps, guidance 3, the
    training caption as prompt. The noise ``eps`` of each image is ``latents`` (``(B, C, H/f, W/f)``,
    standard normal, as diffusers' inpainting pipeline takes it) or else drawn from ``generator``, which may
    be a list, one per image, so a result does not depend on the batch it was computed in; a stochastic
    sampler draws its step noise from ``generator`` in both cases.
    """

    @torch.no_grad()
    def _outpaint(self, call: dict, own: dict, extra: dict):
        image, mask, paste_reference = own["image"], own["mask"], own["paste_reference"]
        num_inference_steps, generator, noise = (
            call["num_inference_steps"],
            call["generator"],
            call["latents"],
        )
        output_type, return_dict = call["output_type"], call["return_dict"]
        callback_on_step_end = call["callback_on_step_end"]
        if image is None or mask is None:
            raise ValueError(
                "SolidMarkOutpaintPipeline needs `image` (the reference) and `mask` (True = generate)"
            )
        for name in FIXED_BY_REFERENCE:
            if extra.get(name) is not None:
                raise ValueError(
                    f"`{name}` cannot be set in SolidMarkOutpaintPipeline (the reference fixes it)"
                )
        device = self._execution_device
        ref = _as_pixel_tensor(image).to(device)
        batch, _, height, width = ref.shape
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if tuple(mask.shape) != (height, width):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not match images of {height}x{width} px"
            )
        factor = self.vae_scale_factor
        if height % 8 or width % 8:
            raise ValueError(f"image sides must be multiples of 8 for Stable Diffusion, got {width}x{height}")
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"{len(generator)} generators for {batch} images")

        # reference latents (the posterior mode: deterministic), scaled as the UNet sees them
        vae_dtype = self.vae.dtype
        posterior = self.vae.encode((ref * 2 - 1).to(vae_dtype)).latent_dist
        z_ref = posterior.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        z_ref = ((z_ref - shift) * self.vae.config.scaling_factor).to(self.unet.dtype)
        m = latent_mask(mask, factor).to(device, z_ref.dtype)
        if m.shape != z_ref.shape[-2:]:
            raise ValueError(f"image of {width}x{height} px is not divisible by the VAE factor {factor}")
        if noise is None:
            noise = randn_tensor(z_ref.shape, generator=generator, device=device, dtype=z_ref.dtype)
        elif tuple(noise.shape) != tuple(z_ref.shape):
            raise ValueError(
                f"latents of shape {tuple(noise.shape)} for {batch} images whose latents are {tuple(z_ref.shape)}"
            )
        else:
            noise = noise.to(device=device, dtype=z_ref.dtype)

        # the timesteps the loop will use (set again, identically, by the stock pipeline)
        scheduler = self.scheduler
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps.clone()
        z0_known = scheduler.add_noise(z_ref, noise, timesteps[:1].repeat(batch))
        latents = (m * noise + (1 - m) * z0_known / scheduler.init_noise_sigma).to(z_ref.dtype)

        def replace_known(pipe, i, t, callback_kwargs):
            lat = callback_kwargs["latents"]
            if i + 1 < len(timesteps):
                known = pipe.scheduler.add_noise(z_ref, noise, timesteps[i + 1 : i + 2].repeat(batch))
            else:
                known = z_ref
            callback_kwargs["latents"] = m * lat + (1 - m) * known.to(lat.dtype)
            if callback_on_step_end is not None:
                callback_kwargs.update(callback_on_step_end(pipe, i, t, callback_kwargs) or {})
            return callback_kwargs

        tensor_inputs = list(call["callback_on_step_end_tensor_inputs"] or ["latents"])
        if "latents" not in tensor_inputs:
            tensor_inputs.append("latents")
        stock = {
            **call,
            **{k: v for k, v in extra.items() if k not in FIXED_BY_REFERENCE},
            "height": height,
            "width": width,
            "latents": latents,
            "output_type": "latent" if output_type == "latent" else "pt",
            "return_dict": True,
            "callback_on_step_end": replace_known,
            "callback_on_step_end_tensor_inputs": tensor_inputs,
        }
        out = super().__call__(**stock)
        images = out.images
        if output_type != "latent":
            images = images.to(ref.dtype)
            if paste_reference:
                pm = mask.to(images.dtype)
                images = pm * images + (1 - pm) * ref
            if output_type in ("np", "pil"):
                images = self.image_processor.pt_to_numpy(images)
                if output_type == "pil":
                    images = self.image_processor.numpy_to_pil(images)
            elif output_type != "pt":
                raise ValueError(f"output_type must be 'pt', 'np', 'pil' or 'latent', got {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, out.nsfw_content_detected)
        return SolidMarkOutpaintPipelineOutput(
            images=images, nsfw_content_detected=out.nsfw_content_detected, mask=mask
        )

    __call__ = extended_call(
        StableDiffusionPipeline.__call__,
        [keyword("image", None), keyword("mask", None), keyword("paste_reference", True, "bool")],
        _outpaint,
        doc="""Outpaint ``mask`` of ``image`` (the stock call's arguments, less those the reference fixes).

        Args:
            image: the reference, ``(B, 3, H, W)`` in [0, 1], an array or PIL image(s).
            mask (`torch.Tensor`): ``(H, W)`` bool, True = generate.
            paste_reference (`bool`, defaults to ``True``): paste the reference back outside the mask.
            latents (`torch.Tensor`, *optional*): the noise of each image, ``(B, C, H/f, W/f)`` standard
                normal (the known region is this noise on top of the reference latents, the frame starts
                from it); drawn from ``generator`` when not given.

        Returns ``SolidMarkOutpaintPipelineOutput`` (``images``, ``nsfw_content_detected``, ``mask``), or
        with ``return_dict=False`` the stock tuple ``(images, nsfw_content_detected)``.
        """,
        drop=FIXED_BY_REFERENCE,
        defaults={"num_inference_steps": 100, "guidance_scale": 3.0, "output_type": "pt"},
    )
