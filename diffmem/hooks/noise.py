"""Capture the noise-prediction gap ``||eps(x_t, c) - eps(x_t, empty)||_2`` from a UNet's forward calls.

A forward hook on the UNet reads its output at every call of a sampling loop. Under classifier-free
guidance diffusers batches ``[unconditional/negative, text]`` in one call: the hook splits the halves
and costs no extra UNet call. Without guidance it runs one extra unconditional call per step on the
same input (the empty-prompt embedding), which leaves the loop's own result untouched. The hook is
removed when the context ends, also on an exception.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from diffmem.scores.noise_gap import noise_gap, v_to_epsilon_gap_scale

__all__ = [
    "NoiseGapRecord",
    "UNetCall",
    "capture_noise_gap",
    "in_side_pass",
    "recorded_guidance_gaps",
    "recorded_unet_calls",
    "side_pass",
]

# ids of UNets that are running a hook's own extra call (no recursion, no double count)
_EXTRA_PASS_ACTIVE: set[int] = set()


@contextlib.contextmanager
def side_pass(unet: torch.nn.Module) -> Iterator[None]:
    """Mark the calls of ``unet`` inside the block as a hook's own extra pass, not a sampling step: the
    loop's recorders (:func:`capture_noise_gap`, :func:`recorded_unet_calls`) and hooks that check
    :func:`in_side_pass` leave them alone. Nested blocks keep the mark until the outermost one ends."""
    key = id(unet)
    added = key not in _EXTRA_PASS_ACTIVE
    _EXTRA_PASS_ACTIVE.add(key)
    try:
        yield
    finally:
        if added:
            _EXTRA_PASS_ACTIVE.discard(key)


def in_side_pass(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` is running a hook's own extra pass (:func:`side_pass`)."""
    return id(unet) in _EXTRA_PASS_ACTIVE


@dataclass
class NoiseGapRecord:
    """Per-call gaps as the hook saw them: ``steps[k]`` is a ``[batch]`` tensor for the k-th UNet call."""

    steps: list[torch.Tensor] = field(default_factory=list)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def as_tensor(self) -> torch.Tensor:
        """All gaps as a float32 CPU tensor ``[batch, n_calls]`` (``[0, 0]`` when nothing was recorded)."""
        if not self.steps:
            return torch.zeros(0, 0)
        return torch.stack([s.detach().float().cpu() for s in self.steps], dim=1)


def unet_output(output) -> torch.Tensor:
    """The noise prediction of a UNet forward's output (a tuple or a ``UNet2DConditionOutput``)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return output.sample


def timestep_of(args: tuple, kwargs: dict):
    """The timestep a UNet forward was called with (second positional argument or ``timestep=``)."""
    return args[1] if len(args) > 1 else kwargs["timestep"]


def alpha_bar(alphas_cumprod: torch.Tensor, timestep) -> torch.Tensor:
    """alpha-bar at ``timestep`` (linear interpolation for the fractional timesteps of Euler-type schedulers)."""
    t = torch.as_tensor(timestep).detach().float().cpu().reshape(-1).numpy()
    acp = alphas_cumprod.detach().float().cpu().numpy()
    return torch.from_numpy(np.interp(t, np.arange(acp.shape[0]), acp).astype(np.float32))


@contextlib.contextmanager
def capture_noise_gap(
    unet: torch.nn.Module,
    *,
    guidance: bool,
    uncond_embeds: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
    alphas_cumprod: torch.Tensor | None = None,
    uncond_added_cond: dict[str, torch.Tensor] | None = None,
) -> Iterator[NoiseGapRecord]:
    """Record the per-sample noise gap of every call of ``unet`` while the context is open.

    Args:
        unet: the denoiser (a diffusers ``UNet2DConditionModel`` or anything called the same way:
            ``unet(sample, timestep, encoder_hidden_states=..., ...)``).
        guidance: ``True`` when each call carries a classifier-free-guidance batch
            ``[uncond, text]`` (the halves are split); ``False`` when it carries text only, in which
            case the hook runs one extra call with ``uncond_embeds``.
        uncond_embeds: the unconditional (empty-prompt) text embedding ``[1 or batch, seq, dim]``;
            required when ``guidance`` is ``False``.
        prediction_type: the UNet's output: ``"epsilon"`` as is; ``"v_prediction"`` is turned into
            the noise-prediction gap (times ``sqrt(alpha_bar_t)``, which needs ``alphas_cumprod``);
            ``"sample"`` is recorded as is.
        uncond_added_cond: entries of ``added_cond_kwargs`` that the extra unconditional call
            replaces (SDXL's pooled ``text_embeds`` of the empty prompt, ``[1 or batch, ...]``).
    """
    if not guidance and uncond_embeds is None:
        raise ValueError("capture_noise_gap: uncond_embeds is required when guidance is False")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"capture_noise_gap: prediction_type={prediction_type!r} (expected epsilon, v_prediction or sample)"
        )
    if prediction_type == "v_prediction" and alphas_cumprod is None:
        raise ValueError("capture_noise_gap: alphas_cumprod is required for prediction_type='v_prediction'")
    record = NoiseGapRecord()

    def hook(module, args, kwargs, output):
        if in_side_pass(module):
            return None
        out = unet_output(output)
        if guidance:
            if out.shape[0] % 2:
                raise RuntimeError(
                    f"capture_noise_gap: guidance=True but the UNet batch has odd size {out.shape[0]} "
                    "(expected [uncond, text] halves)"
                )
            eps_uncond, eps_text = out.detach().chunk(2)
        else:
            eps_text = out.detach()
            emb = uncond_embeds.to(device=eps_text.device)
            hidden = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            if hidden is not None:
                emb = emb.to(dtype=hidden.dtype)
            if emb.shape[0] != eps_text.shape[0]:
                emb = emb.expand(eps_text.shape[0], *emb.shape[1:])
            call_kwargs = {k: v for k, v in kwargs.items() if k != "encoder_hidden_states"}
            call_kwargs["return_dict"] = False
            if uncond_added_cond:
                added = dict(call_kwargs.get("added_cond_kwargs") or {})
                for name, value in uncond_added_cond.items():
                    value = value.to(device=eps_text.device)
                    if name in added:
                        value = value.to(dtype=added[name].dtype)
                    added[name] = (
                        value.expand(eps_text.shape[0], *value.shape[1:]) if value.shape[0] == 1 else value
                    )
                call_kwargs["added_cond_kwargs"] = added
            with torch.no_grad(), side_pass(module):
                eps_uncond = unet_output(module(*args[:2], encoder_hidden_states=emb, **call_kwargs))
        gap = noise_gap(eps_text, eps_uncond.detach())
        if prediction_type == "v_prediction":
            gap = gap * v_to_epsilon_gap_scale(alpha_bar(alphas_cumprod, timestep_of(args, kwargs))).to(
                gap.device
            )
        record.steps.append(gap)
        return None

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


@contextlib.contextmanager
def recorded_guidance_gaps(
    unet: torch.nn.Module, alphas_cumprod: torch.Tensor | None = None
) -> Iterator[list]:
    """While open, every guidance call ``[u, c]`` of ``unet`` appends its gap map ``c - u`` (float32, CPU) to
    the yielded list; with ``alphas_cumprod`` (a v-prediction model) the gap is scaled by ``sqrt(alpha_bar_t)``
    into noise units, as :func:`capture_noise_gap` does."""
    gaps: list[torch.Tensor] = []

    def hook(module, args, kwargs, output):
        u, c = unet_output(output).detach().float().chunk(2)
        gap = c - u
        if alphas_cumprod is not None:
            scale = alpha_bar(alphas_cumprod, timestep_of(args, kwargs)).sqrt()
            gap = gap * scale.to(gap.device).view(-1, 1, 1, 1)
        gaps.append(gap.cpu())

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield gaps
    finally:
        handle.remove()


@dataclass
class UNetCall:
    """One UNet forward as a hook saw it: its input ``sample``, ``timestep`` and output (float32, detached)."""

    sample: torch.Tensor
    timestep: torch.Tensor
    output: torch.Tensor


@contextlib.contextmanager
def recorded_unet_calls(unet: torch.nn.Module) -> Iterator[list[UNetCall]]:
    """While open, every forward of ``unet`` appends a :class:`UNetCall` to the yielded list (the tensors stay
    on their device; a guidance call keeps its ``[u, c]`` halves together; the extra unconditional pass of
    :func:`capture_noise_gap` is not recorded)."""
    calls: list[UNetCall] = []

    def hook(module, args, kwargs, output):
        if in_side_pass(
            module
        ):  # a hook's own extra pass (capture_noise_gap's unconditional one) is no loop call
            return None
        sample = args[0] if args else kwargs["sample"]
        calls.append(
            UNetCall(
                sample.detach().float(),
                torch.as_tensor(timestep_of(args, kwargs)).detach(),
                unet_output(output).detach().float(),
            )
        )

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()
