"""Guidance rewritten per image: a forward hook on the UNet's classifier-free-guidance batch.

Used by the guidance-delay and initial-noise mitigations (Jain et al., CVPR 2025; Chen et al., ICLR 2025):
for flagged rows the conditional output is rewritten so the stock loop's ``u + s (c - u)`` applies another
weight ``w(t)`` instead of the call's scale ``s``. :func:`extra_branch_hook` (GUARD, arXiv 2603.00133) runs
one more UNet pass on the flagged rows' conditional inputs, under a context of its own (e.g. attention
processors), and lets the guided prediction combine the three. Always removed when the ``with`` block ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from diffmem.hooks.noise import in_side_pass, side_pass, timestep_of, unet_output

__all__ = ["extra_branch_hook", "guidance_schedule_hook"]


@contextlib.contextmanager
def _forward_hook(unet: torch.nn.Module, hook: Callable) -> Iterator[None]:
    """``hook`` (with kwargs) on ``unet``'s forward while open; removed however the block ends."""
    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _rewritten_conditional(
    output, u: torch.Tensor, c: torch.Tensor, rows: torch.Tensor, new_rows: torch.Tensor
):
    """The UNet ``output`` (tuple or dataclass, as it came) with the guidance batch ``[u, c]`` replaced by
    ``[u, c']``, ``c'`` being ``c`` with ``rows`` set to ``new_rows``."""
    new_c = c.clone()
    new_c[rows] = new_rows
    new = torch.cat([u, new_c])
    if isinstance(output, (tuple, list)):
        return (new, *output[1:])
    output.sample = new
    return output


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
        return _rewritten_conditional(output, u, c, rows, u[rows] + (w / scale) * (c[rows] - u[rows]))

    with _forward_hook(unet, hook):
        yield state


def rows_of(value, rows: torch.Tensor, batch: int):
    """``value`` with every tensor whose first dimension is ``batch`` cut to ``rows`` (dicts, lists and tuples
    are followed; anything else, e.g. a scalar timestep, is kept)."""
    if isinstance(value, torch.Tensor):
        return value[rows.to(value.device)] if value.dim() and value.shape[0] == batch else value
    if isinstance(value, dict):
        return {k: rows_of(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(rows_of(v, rows, batch) for v in value)
    return value


@contextlib.contextmanager
def extra_branch_hook(
    unet: torch.nn.Module,
    flagged: torch.Tensor,
    branch: Callable[[], contextlib.AbstractContextManager],
    combine: Callable,
    guidance_scale: Callable[[], float],
) -> Iterator[dict[str, Any]]:
    """While open, every guidance call ``[u, c]`` of ``unet`` runs one more pass on the ``flagged`` rows'
    conditional inputs inside ``branch()`` (a :func:`~diffmem.hooks.noise.side_pass`: no loop recorder sees
    it), giving ``p``; then ``c`` of those rows is rewritten so the loop's ``u + s (c' - u)`` is
    ``combine(u, c, p, state, s)`` (``[n_flagged, ...]`` each; exact for ``guidance_rescale=0``). Other rows
    and calls are untouched. Costs one UNet evaluation per flagged image and step."""
    rows = flagged.nonzero().flatten()
    n = flagged.numel()
    state: dict[str, Any] = {}

    def hook(module, args, kwargs, output):
        out = unet_output(output)
        if in_side_pass(module) or out.shape[0] != 2 * n or rows.numel() == 0:
            return None  # the extra pass itself, or not the loop's guidance batch
        scale = float(guidance_scale())
        cond = (rows + n).to(out.device)
        extra_args = rows_of(tuple(args), cond, 2 * n)
        extra_kwargs = {**rows_of(dict(kwargs), cond, 2 * n), "return_dict": False}
        with torch.no_grad(), side_pass(module), branch():
            p = unet_output(module(*extra_args, **extra_kwargs))
        u, c = out.chunk(2)
        picked = rows.to(out.device)
        guided = combine(u[picked], c[picked], p.to(out.dtype), state, scale)
        return _rewritten_conditional(output, u, c, picked, u[picked] + (guided - u[picked]) / scale)

    with _forward_hook(unet, hook):
        yield state
