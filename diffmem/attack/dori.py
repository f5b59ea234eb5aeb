"""The Finding Dori attack: search the text-embedding space for a trigger that re-creates a training image.

Method (Kowalczuk et al., "Finding DoRI: Discovery of Retained Images in Diffusion Models", ICML 2026,
arXiv 2507.16880). With the (possibly edited) model frozen and a known training image ``x``, optimize the
text conditioning ``y`` (the text encoder's output, ``[1, 77, d]``) from the caption's embedding by
Adam on the ordinary denoising loss::

    z = E(x) · scaling_factor
    L(y) = (1/|b|) Σ_{(ε,t)∈b} ‖ target(z, ε, t) − f_θ(add_noise(z, ε, t), t, y) ‖²

with ``b`` a fresh batch of ``(ε, t)`` pairs at every step (ε ~ N(0, I), t ~ U[t_min, t_max]) and
``target`` = ε for ε-prediction, ``v = √ᾱ_t ε − √(1−ᾱ_t) z`` (``scheduler.get_velocity``) for
v-prediction. Defaults: 50 steps, lr 0.1, batch 8, no norm bound. Then generate with
``prompt_embeds = y`` and measure similarity to ``x``.

The attack takes a UNet and a scheduler and knows nothing of how the model was edited: run it inside
an edit's context (``diffmem.edits``) or on a saved edited model. A UNet in float16/bfloat16 is
attacked as it is: ``y`` and Adam's state stay float32, only the UNet's inputs are cast to its dtype,
and the noising and the loss are computed in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from diffmem.modelio import model_resolution
from diffmem.scores.replication import ReplicationCriterion
from diffmem.scores.similarity import ssim
from diffmem.seeding import item_generator


@dataclass(frozen=True)
class DoriConfig:
    """Settings of the trigger search (defaults: the Finding Dori paper's)."""

    steps: int = 50
    lr: float = 0.1
    batch_size: int = 8
    t_min: int = 1
    t_max: int | None = None  # None: num_train_timesteps - 1
    init: str = "prompt"  # "prompt" (the caption's embedding) or "gaussian" (N(0, I))
    eps_ball: float | None = None  # optional L2 bound on ‖y − y_0‖ per token; off in the paper
    eval_pairs: int = 16  # fixed (ε, t) pairs on which the loss before/after is reported
    seed: int = 0
    gradient_checkpointing: bool = False  # recompute UNet activations in backward: less memory, same result


@dataclass
class DoriResult:
    """The found embedding and the loss on fixed evaluation pairs before (``initial_loss``) and after."""

    embeds: torch.Tensor  # [1, tokens, dim], detached, float32
    initial_loss: float
    final_loss: float
    losses: list[float] = field(default_factory=list)  # training loss per step (fresh pairs each step)


# ----------------------------------------------------------------------------------------- diffusion math


def denoising_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the model is trained to predict: ε, or v (``get_velocity``) for v-prediction, or the clean latent."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported scheduler prediction_type {kind!r}")


def denoising_loss(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """``‖target − f_θ(add_noise(z, ε, t), t, y)‖²`` averaged (``reduction="mean"``) or per sample (``"none"``).

    ``latents`` ``[B, C, h, w]`` (or ``[1, ...]``, broadcast to the batch of ``noise``), ``embeds``
    ``[B, tokens, dim]`` (or ``[1, ...]``), ``noise`` ``[B, C, h, w]``, ``timesteps`` ``[B]``. Noising,
    target and loss are float32; the UNet gets its inputs in its own dtype (:func:`module_dtype`).
    """
    batch = noise.shape[0]
    latents, noise = latents.float(), noise.float()
    if latents.shape[0] != batch:
        latents = latents.expand(batch, *latents.shape[1:])
    if embeds.shape[0] != batch:
        embeds = embeds.expand(batch, *embeds.shape[1:])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = denoising_target(scheduler, latents, noise, timesteps)
    dtype = module_dtype(unet)
    pred = unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype)).sample
    per = (pred.float() - target).square().flatten(1).mean(dim=1)
    return per.mean() if reduction == "mean" else per


def _pairs(
    latents: torch.Tensor,
    n: int,
    t_min: int,
    t_max: int,
    generator: torch.Generator,
    stratified: bool = False,
):
    shape = (n, *latents.shape[1:])
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    if stratified:
        timesteps = torch.linspace(t_min, t_max, n).round().long()
    else:
        timesteps = torch.randint(t_min, t_max + 1, (n,), generator=generator, device=generator.device)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE latents ``mean(E(x)) · scaling_factor`` of images ``[B, 3, H, W]`` in ``[0, 1]``."""
    x = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder outputs ``[B, 77, d]`` of ``prompts`` (what ``prompt_embeds`` takes)."""
    embeds, _ = pipe.encode_prompt(list(prompts), pipe._execution_device, 1, False)
    return embeds


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype ``module`` computes in: its ``dtype`` (diffusers models), else its first floating parameter's."""
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextlib.contextmanager
def gradient_checkpointing(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Turn on diffusers' gradient checkpointing of ``module`` while the block runs; restore its state on exit.

    diffusers (>= 0.32) recomputes a block's activations in the backward pass whenever
    ``torch.is_grad_enabled() and block.gradient_checkpointing``, in train and eval mode alike, so it
    also applies to a frozen UNet whose input (an embedding being optimized) needs gradients. Less
    memory, more compute, the same results. With ``enabled=False``, or when it is on already, the module
    is left as it is.
    """
    was_on = bool(getattr(module, "is_gradient_checkpointing", False))
    if not enabled or was_on:
        yield
        return
    if not hasattr(module, "enable_gradient_checkpointing"):
        raise ValueError(
            f"{type(module).__name__} has no enable_gradient_checkpointing (not a diffusers model)"
        )
    module.enable_gradient_checkpointing()
    try:
        yield
    finally:
        module.disable_gradient_checkpointing()


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` of every parameter while the block runs; restore the flags on exit."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ----------------------------------------------------------------------------------------- the search


def dori_search(
    unet: nn.Module,
    scheduler,
    latents: torch.Tensor,
    init_embeds: torch.Tensor,
    config: DoriConfig = DoriConfig(),
    *,
    key: Sequence[object] = (),
    progress: Callable[[int, float], None] | None = None,
) -> DoriResult:
    """Adam on ``y`` (from ``init_embeds``, or N(0, I) with ``init="gaussian"``) to minimise ``L(y)`` on ``latents``.

    The UNet is frozen (its parameters and mode are restored afterwards); only ``y`` moves. Every
    random draw comes from ``item_generator(config.seed, "dori", *key)``, so a target's search does not
    depend on what ran before it. ``initial_loss``/``final_loss`` are measured on ``config.eval_pairs``
    fixed pairs (timesteps spread evenly over the range) with the same noise before and after. With
    ``config.gradient_checkpointing`` the UNet recomputes activations in the backward pass (restored after).
    """
    if config.steps < 0 or config.batch_size < 1 or config.lr <= 0:
        raise ValueError(f"invalid DoriConfig {config}")
    t_max = config.t_max if config.t_max is not None else scheduler.config.num_train_timesteps - 1
    if not 0 <= config.t_min <= t_max:
        raise ValueError(f"t range [{config.t_min}, {t_max}] is empty")
    device = latents.device
    latents = latents.detach().float()
    gen = item_generator(config.seed, "dori", *key, device=device)
    eval_gen = item_generator(config.seed, "dori-eval", *key, device=device)
    init = init_embeds.detach().float().to(device)
    if config.init == "gaussian":
        init = torch.randn(init.shape, generator=gen, device=device)
    elif config.init != "prompt":
        raise ValueError(f"init must be 'prompt' or 'gaussian', got {config.init!r}")
    eval_noise, eval_t = _pairs(latents, config.eval_pairs, config.t_min, t_max, eval_gen, stratified=True)
    was_training = unet.training
    unet.eval()
    try:
        with frozen(unet), gradient_checkpointing(unet, config.gradient_checkpointing):
            with torch.no_grad():
                initial = float(denoising_loss(unet, scheduler, latents, init, eval_noise, eval_t))
            y = init.clone().requires_grad_(True)
            opt = torch.optim.Adam([y], lr=config.lr)
            losses = []
            for step in range(config.steps):
                noise, t = _pairs(latents, config.batch_size, config.t_min, t_max, gen)
                with torch.enable_grad():
                    loss = denoising_loss(unet, scheduler, latents, y, noise, t)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                if config.eps_ball is not None:
                    with torch.no_grad():
                        delta = y - init
                        norm = delta.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                        y.copy_(init + delta * (config.eps_ball / norm).clamp(max=1.0))
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step, losses[-1])
            with torch.no_grad():
                final = float(denoising_loss(unet, scheduler, latents, y, eval_noise, eval_t))
    finally:
        unet.train(was_training)
    return DoriResult(y.detach(), initial, final, losses)


# ----------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_from_embeds(
    pipe,
    embeds: torch.Tensor,
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    key: Sequence[object] = (),
    **pipe_kwargs,
) -> torch.Tensor:
    """Images ``[len(seeds), 3, H, W]`` in ``[0, 1]`` generated with ``prompt_embeds = embeds``.

    The negative embedding is the encoding of ``""`` (as in the pipeline's own classifier-free
    guidance); image ``s`` uses ``item_generator(s, *key)``, independent of the others.
    """
    device = pipe._execution_device
    embeds = embeds.to(device=device, dtype=pipe.unet.dtype)
    negative = encode_prompts(pipe, [""]).to(embeds.dtype)
    images = []
    for s in seeds:
        out = pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=item_generator(s, *key, device=device),
            output_type="pt",
            **pipe_kwargs,
        )
        images.append(out.images.float().cpu())
    return torch.cat(images)


# ----------------------------------------------------------------------------------------- one target


def ssim_similarity(generated: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """SSIM (:func:`diffmem.scores.similarity.ssim`) of each generated image ``[N, 3, H, W]`` to one reference ``[3, H', W']``."""
    import torch.nn.functional as F

    ref = reference.float().unsqueeze(0)
    gen = generated.float()
    if gen.shape[-2:] != ref.shape[-2:]:
        ref = F.interpolate(ref, size=gen.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    return ssim(gen, ref.expand(gen.shape[0], -1, -1, -1).contiguous())


@dataclass
class AttackOutcome:
    """One target's attack: similarities per seed from the caption (before) and from the trigger (after)."""

    id: str
    caption: str
    initial_loss: float
    final_loss: float
    similarity_before: list[float]
    similarity_after: list[float]
    threshold: float
    embeds: torch.Tensor | None = None
    images_before: torch.Tensor | None = None
    images_after: torch.Tensor | None = None

    @property
    def criterion(self):
        """Finding Dori's replication rule: the mean SSIM over seeds ``>= threshold``."""

        return ReplicationCriterion(self.threshold, "mean")

    @property
    def replicated_before(self) -> bool:
        return bool(self.criterion.memorized(self.similarity_before)[0])

    @property
    def replicated_after(self) -> bool:
        return bool(self.criterion.memorized(self.similarity_after)[0])

    def row(self) -> dict:
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        return {
            "id": self.id,
            "caption": self.caption,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "similarity_before_mean": mean(self.similarity_before),
            "similarity_before_max": max(self.similarity_before),
            "similarity_after_mean": mean(self.similarity_after),
            "similarity_after_max": max(self.similarity_after),
            "replicated_before": self.replicated_before,
            "replicated_after": self.replicated_after,
            "similarity_before": self.similarity_before,
            "similarity_after": self.similarity_after,
        }


def attack_target(
    pipe,
    item_id: str,
    caption: str,
    image: torch.Tensor,
    config: DoriConfig = DoriConfig(),
    *,
    seeds: Sequence[int] = (0, 1, 2, 3),
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = ssim_similarity,
    threshold: float = 0.5,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    keep_images: bool = False,
    **pipe_kwargs,
) -> AttackOutcome:
    """Attack one (caption, training image): generate from the caption, search a trigger, generate from it.

    ``image``: ``[3, H, W]`` in ``[0, 1]``, resized to the generations' size (``height``/``width`` in
    ``pipe_kwargs``, else the model's) for the search. Replication = mean similarity over
    ``seeds`` above ``threshold``. Whatever edit is active on ``pipe`` (a context from
    ``diffmem.edits``, or a saved edited model) is what is attacked.
    """

    device = pipe._execution_device
    size = model_resolution(pipe, pipe_kwargs.get("height"), pipe_kwargs.get("width"))
    img = image.float().unsqueeze(0)
    if tuple(img.shape[-2:]) != size:
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True)
    latents = encode_images(pipe.vae, img.to(device))
    init = encode_prompts(pipe, [caption])
    result = dori_search(pipe.unet, pipe.scheduler, latents, init, config, key=(item_id,))
    gen_kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, **pipe_kwargs)
    before = generate_from_embeds(pipe, init, seeds, key=("dori-gen", item_id), **gen_kwargs)
    after = generate_from_embeds(pipe, result.embeds, seeds, key=("dori-gen", item_id), **gen_kwargs)
    return AttackOutcome(
        id=item_id,
        caption=caption,
        initial_loss=result.initial_loss,
        final_loss=result.final_loss,
        similarity_before=[float(s) for s in similarity(before, image)],
        similarity_after=[float(s) for s in similarity(after, image)],
        threshold=threshold,
        embeds=result.embeds.cpu(),
        images_before=before if keep_images else None,
        images_after=after if keep_images else None,
    )
