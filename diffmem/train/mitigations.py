"""Training-time memorization mitigations behind one interface (:class:`TrainingMitigation`) and one registry.

A fine-tuning loop runs every step the same way, whatever the mitigation (no branch on its name)::

    captions, caption_stats = mitigation.edit_captions(captions, seeds, tokenizer)
    cond = text_encoder(tokenize(captions))[0]  # the trainer's own caption dropout included
    step = mitigation.prepare(TrainingBatch(latents=z0, cond=cond, seeds=seeds, scheduler=sched,
                                            ids=image_ids, unet=unet, empty_cond=empty))
    if not step.skip:  # skip: every sample is left out of this step's loss
        pred = unet(step.noisy, step.timesteps, step.cond, added_cond_kwargs=step.added_cond).sample
        loss = step.loss(pred)  # sum_i w_i ||pred_i - target_i||^2 / #{i : w_i > 0}

``edit_captions`` changes the text before it is encoded; ``prepare`` returns what the UNet step uses: its
noisy input, timesteps, target, conditioning and a per-sample loss weight (0 = left out), with a few
statistics of the step. Every random draw of sample ``i`` comes from its own seed ``seeds[i]``
(:mod:`diffmem.seeding`), so a sample's step does not depend on the batch it is in; :func:`sample_seeds`
derives such seeds from a run seed and sample keys. Built-in: ``none``, ``ambient``, ``wen-filter``,
``caption-noise`` (see ``docs/train.md``); register more with :func:`register_training_mitigation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
from torch import nn

from diffmem.attack.dori import module_dtype
from diffmem.registry import Registry
from diffmem.seeding import derive_seed, item_generator

__all__ = [
    "TRAINING_MITIGATIONS",
    "AmbientMitigation",
    "CaptionNoiseMitigation",
    "NoMitigation",
    "TrainingBatch",
    "TrainingMitigation",
    "TrainingStep",
    "WenFilterMitigation",
    "available_training_mitigations",
    "diffusion_draws",
    "get_training_mitigation",
    "register_training_mitigation",
    "sample_seeds",
    "standard_step",
]


@dataclass
class TrainingBatch:
    """One training step's batch, as a mitigation sees it (every tensor has one row per sample).

    Attributes:
        latents: ``z0`` ``[B, C, H, W]``, the VAE latents times the scaling factor.
        cond: ``[B, tokens, dim]``, the text encoder's outputs for the (edited) captions.
        seeds: one seed per sample for this step (every random draw of the sample comes from it).
        scheduler: the noise scheduler (``alphas_cumprod``, ``config.num_train_timesteps``,
            ``config.prediction_type``).
        ids: the identity of each sample's training image (``ambient`` keys its fixed noisy copy on it;
            give the copies of a duplicated image one id to give them one noisy copy).
        unet: the UNet being trained (``wen-filter`` runs it without gradients).
        empty_cond: the empty caption's embedding, ``[1 or B, tokens, dim]`` (``wen-filter``).
        added_cond / empty_added_cond: SDXL's added conditions of the captions / of the empty caption
            (``text_embeds``, the pooled embedding, and ``time_ids``, one row per sample or one for all);
            ``None`` for SD 1.x/2.x.
    """

    latents: torch.Tensor
    cond: torch.Tensor
    seeds: Sequence[int]
    scheduler: Any
    ids: Sequence[object] | None = None
    unet: nn.Module | None = None
    empty_cond: torch.Tensor | None = None
    added_cond: dict[str, torch.Tensor] | None = None
    empty_added_cond: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        n = self.latents.shape[0]
        if self.cond.shape[0] != n or len(self.seeds) != n:
            raise ValueError(
                f"training batch: {n} latents, {self.cond.shape[0]} embeddings and {len(self.seeds)} seeds "
                "(expected one of each per sample)"
            )
        if self.ids is not None and len(self.ids) != n:
            raise ValueError(f"training batch: {len(self.ids)} ids for {n} samples")

    @property
    def size(self) -> int:
        return self.latents.shape[0]


@dataclass
class TrainingStep:
    """What the UNet step uses: ``unet(noisy, timesteps, cond, added_cond_kwargs=added_cond)`` is compared
    with ``target``.

    ``weight`` ``[B]`` (float32): sample ``i``'s loss weight, 0 where it is left out of this step's loss;
    ``noise`` the fresh diffusion noise drawn for the step; ``stats`` a few numbers for the log.
    """

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    cond: torch.Tensor
    weight: torch.Tensor
    noise: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    added_cond: dict[str, torch.Tensor] | None = None  # SDXL's added conditions, passed through

    @property
    def skip(self) -> bool:
        """True when every sample is left out (the trainer skips the step)."""
        return not bool((self.weight > 0).any())

    def per_sample_loss(self, pred: torch.Tensor) -> torch.Tensor:
        """``||pred_i - target_i||^2`` averaged over each sample's elements, float32, ``[B]``."""
        return (pred.float() - self.target.float()).square().flatten(1).mean(dim=1)

    def loss(self, pred: torch.Tensor) -> torch.Tensor | None:
        """``sum_i w_i l_i / #{i : w_i > 0}``, the mean over the samples kept; ``None`` when none is kept."""
        kept = self.weight > 0
        if not bool(kept.any()):
            return None
        weight = self.weight.to(pred.device)
        return (weight * self.per_sample_loss(pred)).sum() / kept.to(pred.device).sum()


def sample_seeds(seed: int, keys: Sequence[object], *scope: object) -> list[int]:
    """One seed per sample, ``derive_seed(seed, *scope, key)`` (e.g. ``scope = ("epoch", 3)``, keys = row ids)."""
    return [derive_seed(seed, *scope, key) for key in keys]


def diffusion_draws(
    seeds: Sequence[int], shape: Sequence[int], num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, from ``item_generator(seed, "diffusion")``: ``t ~ U{0, ..., T-1}``, then ``eps ~ N(0, I)``
    of ``shape`` (one sample's). Returns ``t`` ``[B]`` (long) and ``eps`` ``[B, *shape]`` (float32, CPU)."""
    ts, noises = [], []
    for s in seeds:
        g = item_generator(int(s), "diffusion")
        ts.append(torch.randint(0, num_train_timesteps, (1,), generator=g))
        noises.append(torch.randn(tuple(shape), generator=g))
    return torch.cat(ts), torch.stack(noises)


def _alphas(scheduler, t: torch.Tensor, device) -> torch.Tensor:
    """``a_t`` (cumulative product of ``1 - beta``) as ``[B, 1, 1, 1]`` float32."""
    return scheduler.alphas_cumprod.float().to(device)[t.to(device)].view(-1, 1, 1, 1)


def _standard(batch: TrainingBatch) -> tuple[torch.Tensor, ...]:
    """``(t, eps, a_t, z_t, target)`` of the standard loss for the batch's seeds."""
    z0 = batch.latents.float()
    t, eps = diffusion_draws(batch.seeds, z0.shape[1:], batch.scheduler.config.num_train_timesteps)
    t, eps = t.to(z0.device), eps.to(z0.device)
    a = _alphas(batch.scheduler, t, z0.device)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    kind = batch.scheduler.config.prediction_type
    if kind == "epsilon":
        target = eps
    elif kind == "v_prediction":
        target = a.sqrt() * eps - (1 - a).sqrt() * z0
    else:
        raise ValueError(f"prediction type {kind!r} is not supported (epsilon or v_prediction)")
    return t, eps, a, zt, target


def standard_step(batch: TrainingBatch) -> TrainingStep:
    """The standard denoising step: ``z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps``, target ``eps`` (or
    ``v = sqrt(a_t) eps - sqrt(1 - a_t) z0``), the batch's conditioning, every weight 1."""
    t, eps, _, zt, target = _standard(batch)
    return TrainingStep(
        noisy=zt,
        timesteps=t,
        target=target,
        cond=batch.cond,
        weight=torch.ones(batch.size),
        noise=eps,
        added_cond=batch.added_cond,
    )


class TrainingMitigation(ABC):
    """Base class of training-time mitigations (see the module docstring for the contract)."""

    #: registry name
    name: ClassVar[str] = ""
    #: the paper, for tables
    reference: ClassVar[str] = ""

    def edit_captions(
        self, captions: Sequence[str], seeds: Sequence[int], tokenizer=None
    ) -> tuple[list[str], dict[str, float]]:
        """The captions to encode for this step (default: unchanged) and statistics of the change."""
        return list(captions), {}

    @abstractmethod
    def prepare(self, batch: TrainingBatch) -> TrainingStep:
        """The UNet step for ``batch``."""

    def config(self) -> dict[str, Any]:
        """The settings, as recorded in model cards and results (keys are ``__init__`` arguments)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


#: The registry of training-time mitigations.
TRAINING_MITIGATIONS = Registry("training_mitigation", TrainingMitigation, ("diffmem.train.mitigations",))


def register_training_mitigation(cls: type[TrainingMitigation]) -> type[TrainingMitigation]:
    """Class decorator: make ``cls`` available as ``get_training_mitigation(cls.name)``."""
    return TRAINING_MITIGATIONS.register(cls)


def available_training_mitigations() -> list[str]:
    """Names of the registered training mitigations, sorted."""
    return TRAINING_MITIGATIONS.names()


def get_training_mitigation(
    spec: str | TrainingMitigation | None, options: Mapping[str, Any] | None = None
) -> TrainingMitigation:
    """A mitigation from a registry name (built with ``options``) or an object; ``None`` is ``none``."""
    return TRAINING_MITIGATIONS.create("none" if spec is None else spec, options)


@register_training_mitigation
class NoMitigation(TrainingMitigation):
    """The standard loss ``|| eps - eps_theta(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) ||^2``, unchanged."""

    name = "none"

    def prepare(self, batch: TrainingBatch) -> TrainingStep:
        return standard_step(batch)


@register_training_mitigation
class WenFilterMitigation(TrainingMitigation):
    """Wen et al. (ICLR 2024), training-time: leave out of the loss the samples whose text-conditional
    noise gap, on the step's own ``z_t`` and ``t`` and without gradients,

        n_i = || eps_theta(z_t, t, c_i) - eps_theta(z_t, t, c_empty) ||_2   (over the flattened latent)

    is ``>= tau``: ``w_i = [n_i < tau]``. The step is skipped when every sample is left out. ``tau``
    depends on the latent size (Wen's README: 2 for SD-1.4's 4x64x64 latents)."""

    name = "wen-filter"
    reference = "Wen et al., ICLR 2024"

    def __init__(self, tau: float = 2.0):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or tau <= 0:
            raise ValueError(f"tau: expected a number > 0, got {tau!r}")
        self.tau = float(tau)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "tau": self.tau}

    @staticmethod
    def noise_gaps(
        unet: nn.Module,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        empty: torch.Tensor,
        added: dict[str, torch.Tensor] | None = None,
        empty_added: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``n_i`` ``[B]`` (float32), two UNet calls without gradients (``added`` / ``empty_added``: SDXL's
        added conditions of the captions and of the empty caption)."""

        dtype = module_dtype(unet)
        x = noisy.to(dtype)
        n = cond.shape[0]

        def rows(c: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            if c is None:
                return None
            return {k: v.to(cond.device, dtype).expand(n, *v.shape[1:]) for k, v in c.items()}

        empty = empty.to(cond.device, dtype).expand(n, *empty.shape[-2:])
        with torch.no_grad():
            e_c = unet(
                x, t, encoder_hidden_states=cond.detach().to(dtype), added_cond_kwargs=rows(added)
            ).sample
            e_u = unet(x, t, encoder_hidden_states=empty, added_cond_kwargs=rows(empty_added)).sample
        return (e_c.float() - e_u.float()).flatten(1).norm(dim=1)

    def prepare(self, batch: TrainingBatch) -> TrainingStep:
        if batch.unet is None or batch.empty_cond is None:
            raise ValueError(
                "wen-filter needs the batch's unet and empty_cond (the empty caption's embedding)"
            )
        step = standard_step(batch)
        gaps = self.noise_gaps(
            batch.unet, step.noisy, step.timesteps, batch.cond, batch.empty_cond, batch.added_cond,
            batch.empty_added_cond,
        ).cpu()  # fmt: skip
        keep = gaps < self.tau
        stats = {
            "kept": float(keep.sum()),
            "dropped": float((~keep).sum()),
            "gap_mean": float(gaps.mean()),
            "gap_max": float(gaps.max()),
        }
        return replace(step, weight=keep.float(), stats=stats)


@register_training_mitigation
class AmbientMitigation(TrainingMitigation):
    """Ambient diffusion for memorization (Shah, Kalavasis, Klivans & Daras, "Does Generation Require
    Memorization? Creative Diffusion Models using Ambient Diffusion", ICML 2025, arXiv:2502.21278): clean
    data only at low noise, a fixed noisy copy of each image at high noise.

    The threshold is a **timestep index** ``t_n`` (the noise level of the copies, ``sigma_n =
    sqrt(1 - a_{t_n})``; ``sqrt((1 - a)/a)`` in the paper's variance-exploding units). Each training
    image ``id`` has one noisy copy, drawn once from ``(seed, id)`` and the same at every step::

        z_n = sqrt(a_n) z0 + sqrt(1 - a_n) eta_id

    For ``t <= t_n`` the step is the standard one (``z_t`` from ``z0``, target ``eps``, weight 1). For
    ``t > t_n`` the model sees only ``z_n``: with ``s = sqrt(a_t / a_n)``, ``c = sqrt(1 - a_t / a_n)``
    and fresh noise ``xi``::

        z_t = s z_n + c xi,   target = (sigma_t / c) xi,   w = (c / sigma_t)^4

    so ``w ||eps_theta - target||^2 = SNR(t) || E_theta[x_n | x_t] - x_n ||^2`` in the paper's units
    (``x = z / sqrt(a)``; ``E_theta[x_n | x_t] = ((sigma_t^2 - sigma_n^2) x0_theta + sigma_n^2 x_t) / sigma_t^2``,
    ``x0_theta`` from ``eps_theta`` by Tweedie): the ambient loss, weighted as the clean loss (``SNR(t)``
    times the clean-image error) as the authors' code weights both terms alike. Epsilon models only.
    """

    name = "ambient"
    reference = "Shah et al., ICML 2025 (arXiv:2502.21278)"

    def __init__(self, t_n: int = 100, seed: int = 0):
        if isinstance(t_n, bool) or not isinstance(t_n, int) or t_n < 0:
            raise ValueError(f"t_n: expected a timestep index >= 0, got {t_n!r}")
        self.t_n, self.seed = t_n, int(seed)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "t_n": self.t_n, "seed": self.seed}

    def _check(self, scheduler) -> None:
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(
                f"ambient: prediction type {scheduler.config.prediction_type!r} is not supported (epsilon only)"
            )
        if self.t_n >= scheduler.config.num_train_timesteps:
            raise ValueError(
                f"ambient: t_n={self.t_n} is past the schedule's {scheduler.config.num_train_timesteps} timesteps"
            )

    def noisy_data(self, latents: torch.Tensor, ids: Sequence[object], scheduler) -> torch.Tensor:
        """The fixed noisy copies ``z_n = sqrt(a_n) z0 + sqrt(1 - a_n) eta_id`` (float32)."""
        z0 = latents.float()
        eta = torch.stack(
            [torch.randn(tuple(z0.shape[1:]), generator=item_generator(self.seed, "ambient", i)) for i in ids]
        ).to(z0.device)
        a_n = scheduler.alphas_cumprod.float()[self.t_n].to(z0.device)
        return a_n.sqrt() * z0 + (1 - a_n).sqrt() * eta

    def prepare(self, batch: TrainingBatch) -> TrainingStep:
        if batch.ids is None:
            raise ValueError(
                "ambient needs the batch's ids (each sample's training image, for its noisy copy)"
            )
        self._check(batch.scheduler)
        t, xi, a_t, z_clean, target_clean = _standard(batch)
        z_n = self.noisy_data(batch.latents, batch.ids, batch.scheduler)
        a_n = batch.scheduler.alphas_cumprod.float()[self.t_n].to(a_t.device)
        high = (t > self.t_n).view(-1, 1, 1, 1)
        ratio = a_t / a_n
        c = torch.where(high, (1 - ratio).clamp_min(0).sqrt(), torch.ones_like(ratio))
        sigma_t = (1 - a_t).sqrt()
        noisy = torch.where(high, ratio.sqrt() * z_n + c * xi, z_clean)
        target = torch.where(high, (sigma_t / c) * xi, target_clean)
        weight = torch.where(high, (c / sigma_t) ** 4, torch.ones_like(c)).flatten().cpu()
        n_high = int(high.sum())
        stats = {"ambient": float(n_high), "clean": float(batch.size - n_high)}
        return TrainingStep(noisy, t, target, batch.cond, weight, xi, stats, batch.added_cond)


@register_training_mitigation
class CaptionNoiseMitigation(TrainingMitigation):
    """Somepalli et al.'s caption randomization ("Understanding and Mitigating Copying in Diffusion Models",
    NeurIPS 2023), any subset of:

    * random caption replacement: with probability ``replace_prob`` the caption becomes ``replace_tokens``
      random token ids of the tokenizer, decoded;
    * random word insertion: with probability ``insert_prob``, ``insert_words`` random tokens (each decoded
      alone) are inserted at random word positions;
    * Gaussian noise on the text embedding: ``c <- c + embedding_sigma * N(0, I)`` (every sample, every step).

    Per sample, replacement draws from ``item_generator(seed, "caption-noise", "replace")``, insertion from
    ``(seed, "caption-noise", "insert")`` and the embedding noise from ``item_generator(seed, "gni")``, as the
    inference-time :func:`diffmem.solidmark.mitigations.gaussian_embedding_noise` draws it per image.
    """

    name = "caption-noise"
    reference = "Somepalli et al., NeurIPS 2023"

    def __init__(
        self,
        replace_prob: float = 0.0,
        insert_words: int = 0,
        embedding_sigma: float = 0.0,
        insert_prob: float = 1.0,
        replace_tokens: int = 4,
    ):
        for key, p in (("replace_prob", replace_prob), ("insert_prob", insert_prob)):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
                raise ValueError(f"{key}: expected a probability in [0, 1], got {p!r}")
        for key, k in (("insert_words", insert_words), ("replace_tokens", replace_tokens)):
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise ValueError(f"{key}: expected an integer >= 0, got {k!r}")
        if (
            isinstance(embedding_sigma, bool)
            or not isinstance(embedding_sigma, (int, float))
            or embedding_sigma < 0
        ):
            raise ValueError(f"embedding_sigma: expected a number >= 0, got {embedding_sigma!r}")
        if replace_prob > 0 and replace_tokens < 1:
            raise ValueError("replace_tokens: a replaced caption needs at least 1 token")
        self.replace_prob, self.insert_prob = float(replace_prob), float(insert_prob)
        self.insert_words, self.replace_tokens = insert_words, replace_tokens
        self.embedding_sigma = float(embedding_sigma)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "replace_prob": self.replace_prob,
            "insert_words": self.insert_words,
            "embedding_sigma": self.embedding_sigma,
            "insert_prob": self.insert_prob,
            "replace_tokens": self.replace_tokens,
        }

    @staticmethod
    def _random_tokens(tokenizer, n: int, g: torch.Generator) -> list[str]:
        """``n`` non-special token ids drawn uniformly, each decoded alone (redrawn if it decodes to nothing)."""
        special = set(tokenizer.all_special_ids)
        out: list[str] = []
        while len(out) < n:
            tid = int(torch.randint(0, len(tokenizer), (1,), generator=g))
            word = tokenizer.decode([tid]).strip()
            if tid not in special and word and " " not in word:
                out.append(word)
        return out

    def _edit(self, caption: str, seed: int, tokenizer) -> tuple[str, bool, bool]:
        replaced = inserted = False
        if self.replace_prob > 0:
            g = item_generator(seed, "caption-noise", "replace")
            if float(torch.rand((), generator=g)) < self.replace_prob:
                caption, replaced = " ".join(self._random_tokens(tokenizer, self.replace_tokens, g)), True
        if self.insert_words > 0 and self.insert_prob > 0:
            g = item_generator(seed, "caption-noise", "insert")
            if float(torch.rand((), generator=g)) < self.insert_prob:
                words = caption.split(" ")
                for word in self._random_tokens(tokenizer, self.insert_words, g):
                    words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), word)
                caption, inserted = " ".join(words), True
        return caption, replaced, inserted

    def edit_captions(
        self, captions: Sequence[str], seeds: Sequence[int], tokenizer=None
    ) -> tuple[list[str], dict[str, float]]:
        if len(captions) != len(seeds):
            raise ValueError(f"caption-noise: {len(captions)} captions for {len(seeds)} seeds")
        if tokenizer is None and (self.replace_prob > 0 or self.insert_words > 0):
            raise ValueError("caption-noise: replacing or inserting words needs the tokenizer")
        edited = [self._edit(c, int(s), tokenizer) for c, s in zip(captions, seeds)]
        stats = {"replaced": float(sum(e[1] for e in edited)), "inserted": float(sum(e[2] for e in edited))}
        return [e[0] for e in edited], stats

    def prepare(self, batch: TrainingBatch) -> TrainingStep:
        step = standard_step(batch)
        if self.embedding_sigma == 0:
            return step
        shape = tuple(batch.cond.shape[1:])
        noise = torch.stack(
            [torch.randn(shape, generator=item_generator(int(s), "gni")) for s in batch.seeds]
        )
        return replace(step, cond=batch.cond + self.embedding_sigma * noise.to(batch.cond))
