"""Guidance rewritten per image: a forward hook on the UNet's classifier-free-guidance batch.

Used by the guidance-delay and initial-noise mitigations (Jain et al., CVPR 2025; Chen et al., ICLR 2025):
for flagged rows the conditional output is rewritten so the stock loop's ``u + s (c - u)`` applies another
weight ``w(t)`` instead of the call's scale ``s``. Always removed when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from diffmem.hooks.noise import timestep_of, unet_output

__all__ = ["guidance_schedule_hook"]


@contextlib.contextmanager
def guidance_schedule_hook(
    unet: torch.nn.Module, flagged: torch.Tensor, weight: Callable, guidance_scale: Callable[[], float]
) -> Iterator[dict[str, Any]]:
    """While open, the UNet's guidance outputs ``[u, c]`` have ``c`` of the ``flagged`` rows rewritten so
    the loop applies ``weight(t, u, c, state, s) -> [n_flagged]`` instead of its scale ``s`` (read with
    ``guidance_scale()`` at every call, so a callback that changes the guidance is followed)."""
    rows = flagged.nonzero().flatten()
    state: dict[str, Any] = {}

    def hook(module, args, kwargs, output):
        out = unet_output(output)
        if out.shape[0] != 2 * flagged.numel():
            return None  # not the loop's guidance batch
        scale = float(guidance_scale())
        u, c = out.chunk(2)
        t = float(torch.as_tensor(timestep_of(args, kwargs)).reshape(-1)[0])
        w = weight(t, u[rows], c[rows], state, scale).to(out.device, out.dtype)
        w = w.view(-1, *([1] * (out.dim() - 1)))
        new_c = c.clone()
        new_c[rows] = u[rows] + (w / scale) * (c[rows] - u[rows])
        new = torch.cat([u, new_c])
        if isinstance(output, (tuple, list)):
            return (new, *output[1:])
        output.sample = new
        return output

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()
