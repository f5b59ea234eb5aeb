"""NeMo: localize the cross-attention value neurons that carry a memorized prompt.

Method (Hintersdorf, Struppek, Kersting, Dziedzic, Boenisch, "Finding NeMo: Localizing Neurons
Responsible For Memorization in Diffusion Models", NeurIPS 2024, arXiv:2406.02366):

1. **Memorization criterion.** For ``n`` initial latents ``x_T^s`` (one batched draw of seed 1), the
   noise difference ``delta_s = eps(x_T^s, t*, y) - x_T^s`` (no guidance), min-max normalised per
   sample and latent channel. A seed is *kept* when its largest pairwise MS-SSIM with another seed's
   ``delta`` exceeds ``tau``; no kept seed means the prompt is not memorized (empty set). With the
   neurons ``S`` switched off, ``mem(S) = max_{kept s} MS-SSIM(delta_s, delta_s(S))``; ``S`` removes
   memorization when ``mem(S) <= tau`` (``tau = 0.428`` for SD-1.4).
2. **Initial selection.** ``z_i^l = (a_i^l(y) - mu_i^l) / sigma_i^l`` against statistics of
   non-memorized prompts; ``S(theta, k) = U_l {i : |z_i^l| > theta} U topk_l(k, a^l(y))``; starting at
   ``theta = 5, k = 0``, lower ``theta`` by 0.25 and raise ``k`` by 1 until ``mem(S) <= tau`` (at most
   while ``theta > 1``); if it never succeeds, refine against the last score reached.
3. **Refinement.** Layers from last to first: switch a whole layer's candidates back on and drop
   them if ``mem`` stays ``< tau_ref``; then neurons one by one (layers last to first, candidate order
   within a layer), the same greedy test.

Choices where the paper and its code differ (documented in ``docs`` and here):

* ``t*`` = ``timesteps[1]`` (961 for 50 DDIM steps, as the code; the paper says T); the code's
  wasted first forward at ``timesteps[0]`` is skipped (same result).
* Multi-scale SSIM as the code computes it (torchmetrics' definition, kernel 11, betas (0.33, 0.33,
  0.33), the data range inferred at every scale over the pairs of one comparison, the border cropped
  as in its torchmetrics 1.3.2; :mod:`diffmem.scores.msssim`); the paper says SSIM. On small latents
  that MS-SSIM cannot handle the kernel is shrunk (odd, >= 3), then single-scale SSIM is used:
  :class:`NoiseSimilarity` records which. ``data_range=1.0, ssim_border="pad"`` is diffmem's earlier
  similarity (scores 0.05-0.10 higher on SD-1.x maps by issue 33's side-by-side run; 0-0.15 higher
  on the organism's, benchmarks/RESULTS.md).
* The ``n`` latents are one batched draw of one generator (the code), not ``n`` seeds (paper).
* Two-sided ``|z|`` (code and paper text; the paper's Alg. 2 is one-sided); top-k by raw activation.
* Candidates of a layer are de-duplicated (the code concatenates OOD and top-k lists and may test a
  neuron twice): OOD neurons in index order first, then top-k neurons by falling activation.
* Neurons are switched off on both guidance branches at every step (as the code), by hooks here.
* ``tau`` must be recalibrated for any model other than SD-1.4 (:meth:`NeMo.calibrate_threshold`:
  mean + 1 std of the detection score over non-memorized prompts, the paper's rule, without guidance).

Speed (results unchanged): ``mem(S)`` only needs the kept seeds, so blocked forwards run on those
alone; candidate masks are evaluated ``mask_batch`` at a time in one UNet batch (each group of samples
gets its own mask through per-group hooks). The greedy refinement is sequential, so it is evaluated
*speculatively*: a batch holds the chain "drop the next candidate, then the next, ..." built on the
current state; results are consumed in order up to the first candidate that must be kept, whose
followers (which assumed it dropped) are discarded and re-evaluated. Every decision is therefore
taken on exactly the state the one-at-a-time algorithm would see, so the same neurons are found
(``mask_batch=1`` *is* the one-at-a-time algorithm).

Search budget (``docs/nemo.md``): with ``early_exit`` (off by default: a heuristic that can skip a
localizable prompt), ``mem`` with *every* searched neuron off is evaluated before the schedule; when
even that stays above ``tau`` the prompt is ``"not_localizable"`` and the search ends (two UNet calls
in all). A complete search that misses ``tau`` by no more than ``threshold_spread`` is ``"near_miss"``
(its set kept and reported). ``max_unet_calls`` / ``max_seconds`` are enforced by the probe, which refuses
the call that would exceed them (:class:`SearchBudgetExhausted`); ``max_candidates`` skips the
one-by-one refinement of larger sets. A cut search returns the last state it accepted (preferring one
under ``tau``; all searched neurons if it was cut in the schedule), labelled ``"budget_exhausted"``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from diffmem.conditioning import encode_prompts, expand_unet_kwargs, prompt_conditioning, to_epsilon
from diffmem.edits import NeuronSet
from diffmem.fingerprint import model_fingerprint
from diffmem.hooks.neurons import DEFAULT_BLOCKS, scaled_value_neurons, value_activations, value_layers
from diffmem.localize.stats import ValueStats
from diffmem.modelio import is_sdxl
from diffmem.scores.msssim import BORDERS, ms_ssim, ssim

#: NeMo's memorization threshold for SD-1.4 (mean + 1 std of the max pairwise MS-SSIM over LAION prompts).
SD14_THRESHOLD = 0.428
#: the std of that calibration (0.428 = 0.358 + 0.07, the paper's threshold sweep): the threshold's spread
SD14_THRESHOLD_SPREAD = 0.07


@dataclass(frozen=True)
class NemoConfig:
    """Defaults are NeMo's (code at ml-research/localizing_memorization_in_diffusion_models)."""

    threshold: float = SD14_THRESHOLD
    n_seeds: int = 10
    seed: int = 1
    num_inference_steps: int = 50
    t_index: int = 1
    theta0: float = 5.0
    theta_step: float = 0.25
    theta_min: float = 1.0
    k0: int = 0
    two_sided: bool = True
    factor: float = 0.0
    kernel_size: int = 11
    betas: tuple[float, ...] = (0.33, 0.33, 0.33)
    #: MS-SSIM's data range: ``None`` = inferred at every scale over the pairs of one comparison (NeMo's
    #: code); ``1.0`` = fixed (diffmem before 2026-12-06: higher scores, see the module docstring)
    data_range: float | None = None
    #: positions the SSIM mean covers: ``"crop"`` (windows inside the map; NeMo's torchmetrics 1.3.2) or
    #: ``"pad"`` (every position, reflect padding; torchmetrics >= 1.4.2)
    ssim_border: str = "crop"
    #: the threshold's own spread (std of the calibration scores; :meth:`NeMo.threshold_calibration`): a
    #: search that misses the threshold by less is ``"near_miss"``, not ``"not_localizable"``; ``None``: not assessed
    threshold_spread: float | None = None
    blocks: tuple[str, ...] = DEFAULT_BLOCKS
    #: ``(height, width)`` of the latents the criterion is evaluated at (image px / the VAE's factor);
    #: ``None``: the UNet's ``sample_size`` (SD-1.5: 64 = 512 px). Scores depend on it: keep it with the threshold
    latent_size: tuple[int, int] | None = None
    #: candidate masks per UNet call; 1 = the one-candidate-at-a-time algorithm; ``None`` = by device
    #: (:func:`default_mask_batch`)
    mask_batch: int | None = None
    #: a heuristic budget, off by default: evaluate all searched neurons off first and, when ``mem`` stays
    #: above the threshold, stop at once with an empty set, outcome ``"not_localizable"``. It can be wrong
    #: (switching every neuron off is not switching the right few off: ``mem`` is not monotone in the set)
    early_exit: bool = False
    #: UNet calls per prompt, all counted (unblocked pass, all-off check, search, final evaluation); the
    #: probe refuses a search call beyond ``max_unet_calls - 1``, one is kept for the final evaluation
    max_unet_calls: int | None = None
    #: seconds per prompt from the start of :meth:`NeMo.localize`: no search call starts after that (the
    #: one running and the final evaluation still finish)
    max_seconds: float | None = None
    #: most neurons the one-by-one refinement tests: when more are left after the layer refinement it is
    #: skipped and that (larger) set returned as ``"budget_exhausted"``
    max_candidates: int | None = None

    def __post_init__(self) -> None:
        if self.latent_size is not None:
            if len(self.latent_size) != 2 or any(int(v) != v or v < 1 for v in self.latent_size):
                raise ValueError(
                    f"latent_size: expected (height, width) in latents >= 1, got {self.latent_size}"
                )
            object.__setattr__(self, "latent_size", tuple(int(v) for v in self.latent_size))
        if self.n_seeds < 2:
            raise ValueError(
                f"n_seeds: NeMo compares seeds pairwise, expected at least 2, got {self.n_seeds}"
            )
        if not 0 <= self.t_index < self.num_inference_steps:
            raise ValueError(
                f"num_inference_steps: NeMo reads the schedule's timestep t_index={self.t_index}, so it needs "
                f"more than {self.t_index} steps, got {self.num_inference_steps}"
            )
        if self.data_range is not None and not self.data_range > 0:
            raise ValueError(f"data_range: expected a number > 0 or None (inferred), got {self.data_range}")
        if self.ssim_border not in BORDERS:
            raise ValueError(f"ssim_border: expected one of {', '.join(BORDERS)}, got {self.ssim_border!r}")
        if self.threshold_spread is not None and not self.threshold_spread >= 0:
            raise ValueError(f"threshold_spread: expected a number >= 0 or None, got {self.threshold_spread}")
        if self.mask_batch is not None and self.mask_batch < 1:
            raise ValueError(f"mask_batch: expected an integer >= 1, got {self.mask_batch}")
        if self.max_unet_calls is not None and self.max_unet_calls < 1:
            raise ValueError(f"max_unet_calls: expected an integer >= 1 or None, got {self.max_unet_calls}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds: expected a number > 0 or None, got {self.max_seconds}")
        if self.max_candidates is not None and self.max_candidates < 0:
            raise ValueError(f"max_candidates: expected an integer >= 0 or None, got {self.max_candidates}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (tuples as lists), as recorded in ``NeuronSet.info["config"]``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: diffmem's similarity before 2026-12-06, kept as a named option: ``NemoConfig(**LEGACY_SIMILARITY)``
#: (MS-SSIM with data range 1 at every scale, the mean over the reflect-padded border as torchmetrics >= 1.4.2)
LEGACY_SIMILARITY: dict[str, Any] = {"data_range": 1.0, "ssim_border": "pad"}

#: ``NeuronSet.info["outcome"]`` of :meth:`NeMo.localize`
OUTCOMES = ("not_memorized", "localized", "near_miss", "not_localizable", "budget_exhausted")


class SearchBudgetExhausted(RuntimeError):
    """A UNet call refused by the probe's budget (:meth:`MemorizationProbe.limit`), or a cut refinement.

    ``reason``: the setting that ended the search (``"max_unet_calls"``, ``"max_seconds"``, ``"max_candidates"``).
    """

    def __init__(self, reason: str):
        super().__init__(f"NeMo search budget exhausted ({reason})")
        self.reason = reason


@dataclass
class SearchProgress:
    """What :meth:`NeMo.localize` passes to its ``progress`` callback (the same object, updated in place).

    ``stage``: ``"probe"``, ``"all_off"``, ``"schedule"``, ``"layers"``, ``"neurons"``, ``"final"``, ``"done"``;
    ``neurons``: size of the current blocked set; ``outcome``: set at ``"done"``.
    """

    stage: str = "probe"
    unet_calls: int = 0
    neurons: int = 0
    outcome: str | None = None


def default_mask_batch(device: torch.device) -> int:
    """Masks per UNet call when none is given: 8 on CUDA, 1 elsewhere.

    On a CPU a batch of ``B`` masks costs about ``B`` single calls, so the speculative batches only add
    work (organism v2: batched 0.39x the speed of one-at-a-time, ``benchmarks/RESULTS.md``).
    """
    return 8 if torch.device(device).type == "cuda" else 1


def effective_mask_batch(config: NemoConfig, device: torch.device) -> int:
    """Masks per UNet call for ``config`` on ``device``: ``config.mask_batch``, else :func:`default_mask_batch`."""
    return max(1, config.mask_batch or default_mask_batch(device))


# ------------------------------------------------------------------------------------------ similarity
class NoiseSimilarity:
    """Per-sample MS-SSIM of ``[B, C, H, W]`` noise differences (Gaussian window), sized to fit ``H x W``.

    As NeMo's code computes it by default (:mod:`diffmem.scores.msssim`): ``data_range=None`` infers the
    range at every scale from the batch of pairs compared in one call (``groups`` splits a batch into
    calls), ``border="crop"`` as its pinned torchmetrics 1.3.2. ``data_range=1.0, border="pad"`` is
    diffmem's similarity before 2026-12-06 (torchmetrics >= 1.4.2 with a fixed range).

    NeMo's window is 11 taps (sigma 1.5); on maps too small for that at ``len(betas)`` scales (e.g.
    16x16 latents), the window is shrunk to the largest odd size ``k >= 3`` that fits, with
    ``sigma = 1.5 k / 11``; if none fits, single-scale SSIM is used.
    """

    def __init__(
        self,
        side: int,
        kernel_size: int = 11,
        betas: Sequence[float] = (0.33, 0.33, 0.33),
        data_range: float | None = None,
        border: str = "crop",
    ):
        self.betas = tuple(betas)
        self.data_range, self.border = data_range, border
        levels = len(self.betas)
        div = max(1, levels - 1) ** 2
        coarsest = side // 2 ** (levels - 1)
        self.kind = "ssim"
        k = kernel_size if kernel_size % 2 else kernel_size - 1
        while k >= 3:
            sigma = 1.5 * k / 11
            pad = int(3.5 * sigma + 0.5)
            if side >= 2**levels and side // div > k - 1 and pad < coarsest:
                self.kind = "ms_ssim"
                break
            k -= 2
        if self.kind == "ssim":
            k = kernel_size if kernel_size % 2 else kernel_size - 1
            while k > 3 and int(3.5 * 1.5 * k / 11 + 0.5) >= side:
                k -= 2
            sigma = 1.5 * k / 11
        self.kernel_size, self.sigma = k, sigma

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "kernel_size": self.kernel_size,
            "sigma": self.sigma,
            "betas": list(self.betas),
            "data_range": "inferred" if self.data_range is None else self.data_range,
            "border": self.border,
        }

    def __call__(self, a: torch.Tensor, b: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """Similarity of each pair ``(a[i], b[i])``; with an inferred range, ``groups`` equal consecutive
        groups of pairs are ranged separately (one group = one call of NeMo's code)."""
        kw = {
            "kernel_size": self.kernel_size,
            "sigma": self.sigma,
            "data_range": self.data_range,
            "border": self.border,
            "groups": groups,
        }
        if self.kind == "ms_ssim":
            return ms_ssim(a, b, betas=self.betas, **kw)
        return ssim(a, b, **kw)


def normalized_noise_difference(eps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """``delta = eps - x_T``, min-max normalised to ``[0, 1]`` per sample and channel over ``H x W``."""
    delta = (eps - latents).float()
    flat = delta.flatten(2)
    lo, hi = flat.min(dim=2, keepdim=True).values, flat.max(dim=2, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(delta)


# ------------------------------------------------------------------------------------------ criterion
class MemorizationProbe:
    """NeMo's first-step noise-difference criterion for one prompt; evaluates batches of blocked-neuron masks.

    A mask is a bool vector over all neurons of ``layers`` (concatenated in order), ``True`` = off.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler,
        layers: dict[str, nn.Linear],
        prompt_embeds: torch.Tensor,
        config: NemoConfig,
        unet_kwargs: dict | None = None,
    ):
        self.unet, self.layers, self.config = unet, layers, config
        self.unet_kwargs = unet_kwargs or {}
        self.sizes = [m.out_features for m in layers.values()]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.n_neurons = sum(self.sizes)
        param = next(unet.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.scheduler = scheduler
        scheduler.set_timesteps(config.num_inference_steps)
        self.t = scheduler.timesteps[config.t_index]
        cfg = unet.config
        gen = torch.Generator("cpu").manual_seed(config.seed)
        size = cfg.sample_size
        h, w = config.latent_size or ((size, size) if isinstance(size, int) else tuple(size))
        shape = (config.n_seeds, cfg.in_channels, h, w)
        self.latents = (torch.randn(shape, generator=gen) * scheduler.init_noise_sigma).to(
            self.device, self.dtype
        )
        self.embeds = prompt_embeds.to(self.device, self.dtype)[:1]
        self.similarity = NoiseSimilarity(
            min(h, w), config.kernel_size, config.betas, config.data_range, config.ssim_border
        )
        self.mask_batch = effective_mask_batch(config, self.device)
        self.unet_calls = 0
        self.masks_evaluated = 0
        self.call_limit: int | None = None
        self.deadline: float | None = None
        #: called after every UNet call (e.g. to report progress)
        self.on_call: Callable[[], None] | None = None
        self.base = self._deltas(self.latents, None)[0]  # [n, C, H, W]
        pairs = torch.triu_indices(config.n_seeds, config.n_seeds, offset=1, device=self.device)
        sims = self.similarity(self.base[pairs[0]], self.base[pairs[1]])
        per_seed = torch.full((config.n_seeds,), -1.0, device=self.device)
        per_seed = per_seed.scatter_reduce(0, pairs[0], sims, "amax").scatter_reduce(
            0, pairs[1], sims, "amax"
        )
        self.pairwise = sims
        self.per_seed = per_seed
        #: detection score: largest pairwise similarity of unblocked noise differences
        self.score = float(sims.max()) if sims.numel() else 0.0
        self.kept = per_seed > config.threshold

    @property
    def memorized(self) -> bool:
        return bool(self.kept.any())

    def limit(self, calls: int | None = None, deadline: float | None = None) -> None:
        """Refuse UNet calls once ``unet_calls`` reaches ``calls`` or ``time.perf_counter()`` reaches ``deadline``.

        A refused call raises :class:`SearchBudgetExhausted` before it runs, so ``unet_calls <= calls``
        exactly; ``limit()`` lifts both bounds.
        """
        self.call_limit, self.deadline = calls, deadline

    @torch.no_grad()
    def _deltas(self, latents: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """Normalised noise differences ``[M, n, C, H, W]`` for ``M`` masks (``None``: nothing blocked)."""
        m = 1 if blocked is None else blocked.shape[0]
        n = latents.shape[0]
        x = latents.repeat(m, 1, 1, 1)
        emb = self.embeds.expand(m * n, -1, -1)
        inp = self.scheduler.scale_model_input(x, self.t)
        scales = {}
        if blocked is not None:
            keep = 1.0 - blocked.to(self.dtype) * (1.0 - self.config.factor)
            for name, off, d in zip(self.layers, self.offsets, self.sizes):
                if blocked[:, off : off + d].any():
                    scales[name] = keep[:, off : off + d]
        if self.call_limit is not None and self.unet_calls >= self.call_limit:
            raise SearchBudgetExhausted("max_unet_calls")
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            raise SearchBudgetExhausted("max_seconds")
        with scaled_value_neurons(self.unet, self.layers, scales):
            extra = expand_unet_kwargs(self.unet_kwargs, m * n)
            out = self.unet(inp, self.t, encoder_hidden_states=emb, **extra).sample
        self.unet_calls += 1
        self.masks_evaluated += m
        if self.on_call is not None:
            self.on_call()
        eps = to_epsilon(self.scheduler, out, x, self.t)
        return normalized_noise_difference(eps, x).view(m, n, *x.shape[1:])

    def scores(self, blocked: torch.Tensor) -> torch.Tensor:
        """``mem(S)`` for each mask in ``blocked`` (``[M, n_neurons]`` bool), ``mask_batch`` masks per UNet call."""
        kept = self.kept.nonzero().flatten()
        if kept.numel() == 0:
            raise ValueError("the prompt is not memorized (no seed above the threshold): nothing to score")
        out = []
        step = self.mask_batch
        for start in range(0, blocked.shape[0], step):
            chunk = blocked[start : start + step].to(self.device)
            deltas = self._deltas(self.latents[kept], chunk)  # [m, k, C, H, W]
            ref = self.base[kept].expand(chunk.shape[0], -1, -1, -1, -1)
            # one comparison per mask (its kept seeds), as the code's one call per candidate set
            sims = self.similarity(deltas.flatten(0, 1), ref.flatten(0, 1), groups=chunk.shape[0])
            sims = sims.view(chunk.shape[0], -1)
            out.append(sims.max(dim=1).values)
        return torch.cat(out)

    def evaluate(self, blocked: torch.Tensor) -> dict[str, float]:
        """For one mask: ``mem(S)`` and the detection score with ``S`` off (largest pairwise similarity, all seeds).

        Each is one comparison, as in the code: the 45 pairs of seeds; the kept seeds against their
        unblocked noise differences.
        """
        deltas = self._deltas(self.latents, blocked.view(1, -1).to(self.device))[0]
        n = deltas.shape[0]
        pairs = torch.triu_indices(n, n, offset=1, device=self.device)
        detection = float(self.similarity(deltas[pairs[0]], deltas[pairs[1]]).max())
        kept = self.kept
        mem = float(self.similarity(deltas[kept], self.base[kept]).max()) if self.memorized else float("nan")
        return {"mem": mem, "detection": detection}

    # -------------------------------------------------------------------------- mask conversions
    def mask_from_lists(self, per_layer: Sequence[Sequence[int]]) -> torch.Tensor:
        mask = torch.zeros(self.n_neurons, dtype=torch.bool, device=self.device)
        for off, idx in zip(self.offsets, per_layer):
            if len(idx):
                mask[off + torch.as_tensor(list(idx), device=self.device)] = True
        return mask

    def lists_from_mask(self, mask: torch.Tensor) -> list[list[int]]:
        return [mask[off : off + d].nonzero().flatten().tolist() for off, d in zip(self.offsets, self.sizes)]


# ------------------------------------------------------------------------------------------ search
def candidate_lists(
    activations: Sequence[torch.Tensor],
    zscores: Sequence[torch.Tensor],
    theta: float,
    k: int,
    two_sided: bool = True,
) -> list[list[int]]:
    """``S(theta, k)`` per layer: OOD neurons (``|z| > theta``) in index order, then the top-``k`` by activation."""
    out = []
    for a, z in zip(activations, zscores):
        score = z.abs() if two_sided else z
        ood = (score > theta).nonzero().flatten().tolist()
        top = torch.topk(a, min(k, a.numel())).indices.tolist() if k > 0 else []
        seen = set(ood)
        out.append(ood + [i for i in top if i not in seen and not seen.add(i)])
    return out


def initial_schedule(config: NemoConfig, max_width: int) -> list[tuple[float, int]]:
    """The ``(theta, k)`` pairs NeMo tries in order: theta0, theta0 - step, ... while theta > theta_min and k < width."""
    out, theta, k = [], config.theta0, config.k0
    while True:
        out.append((theta, k))
        theta, k = theta - config.theta_step, k + 1
        if theta <= config.theta_min + 1e-9 or k >= max_width:
            return out


def greedy_unblock(
    probe: MemorizationProbe,
    blocked: torch.Tensor,
    groups: Sequence[torch.Tensor],
    tau: float,
    on_accept: Callable[[torch.Tensor, float], None] | None = None,
) -> tuple[torch.Tensor, float | None]:
    """Switch each group of neurons back on, in order, when ``mem`` stays ``< tau`` (speculative batches, exact).

    Returns the final mask and the score of the last accepted state (``None`` if nothing was dropped);
    ``on_accept(mask, score)`` sees each accepted state in order (what is left when the probe's budget
    ends the loop with :class:`SearchBudgetExhausted`).
    """
    i, last = 0, None
    batch = probe.mask_batch
    groups = list(groups)
    while i < len(groups):
        chain, cur = [], blocked
        for g in groups[i : i + batch]:
            cur = cur.clone()
            cur[g] = False
            chain.append(cur)
        scores = probe.scores(torch.stack(chain)).tolist()
        for mask, score in zip(chain, scores):
            i += 1
            if score < tau:
                blocked, last = mask, score
                if on_accept is not None:
                    on_accept(mask, score)
            else:
                break  # later masks assumed this group dropped: re-evaluate them on the kept state
    return blocked, last


class NeMo:
    """Localize memorization neurons of one model (a diffusers UNet, scheduler, text encoder, tokenizer).

    ``conditioning``: ``prompts -> (hidden states, unet_kwargs)``, for UNets that take more than the
    text encoder's hidden states (SDXL; :meth:`from_pipe` sets it from the pipeline).
    """

    #: the criterion's implementation (a subclass can change how masks are evaluated, e.g. in benchmarks)
    probe_class = MemorizationProbe

    def __init__(
        self,
        unet,
        scheduler,
        text_encoder,
        tokenizer,
        stats: ValueStats | None,
        config: NemoConfig = NemoConfig(),
        conditioning=None,
    ):

        self.unet, self.scheduler, self.text_encoder, self.tokenizer = (
            unet,
            scheduler,
            text_encoder,
            tokenizer,
        )
        self.config = config
        self.conditioning = conditioning
        self.layers = value_layers(unet, config.blocks)
        self.fingerprint = model_fingerprint(unet)
        if stats is not None:
            stats.check(unet, list(self.layers))
        self.stats = stats

    @classmethod
    def from_pipe(cls, pipe, stats: ValueStats | None, config: NemoConfig = NemoConfig()) -> NeMo:

        conditioning = (lambda prompts: prompt_conditioning(pipe, prompts)) if is_sdxl(pipe) else None
        return cls(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, stats, config, conditioning)

    def condition(self, prompt: str) -> tuple[torch.Tensor, dict]:
        """The UNet's conditioning of ``prompt``: hidden states ``[1, tokens, dim]`` and extra UNet inputs."""
        if self.conditioning is not None:
            return self.conditioning([prompt])
        return encode_prompts(self.tokenizer, self.text_encoder, [prompt]), {}

    def embed(self, prompt: str) -> torch.Tensor:
        return self.condition(prompt)[0]

    def probe(self, prompt: str) -> MemorizationProbe:
        embeds, unet_kwargs = self.condition(prompt)
        return self.probe_class(self.unet, self.scheduler, self.layers, embeds, self.config, unet_kwargs)

    def detection_scores(self, prompts: Sequence[str], progress: bool = False) -> list[float]:
        """NeMo's detection score (largest pairwise similarity of unblocked noise differences) per prompt."""
        from tqdm.auto import tqdm

        return [self.probe(p).score for p in tqdm(prompts, desc="pairwise similarity", disable=not progress)]

    def threshold_calibration(self, prompts: Sequence[str], progress: bool = False) -> dict[str, float]:
        """NeMo's rule on non-memorized ``prompts``: ``threshold`` = ``mean`` + 1 ``std`` of their detection
        scores; ``std`` is the threshold's spread (:attr:`NemoConfig.threshold_spread`)."""
        scores = torch.tensor(self.detection_scores(prompts, progress), dtype=torch.float64)
        if scores.numel() < 2:
            raise ValueError("threshold calibration needs at least 2 non-memorized prompts")
        mean, std = float(scores.mean()), float(scores.std())
        return {"threshold": mean + std, "mean": mean, "std": std, "prompts": int(scores.numel())}

    def calibrate_threshold(self, prompts: Sequence[str], progress: bool = False) -> float:
        """``tau`` = mean + 1 std of the detection score over non-memorized ``prompts`` (NeMo's rule)."""
        return self.threshold_calibration(prompts, progress)["threshold"]

    @property
    def mask_batch(self) -> int:
        """Candidate masks per UNet call on this model's device (``config.mask_batch`` or the device default)."""
        return effective_mask_batch(self.config, next(self.unet.parameters()).device)

    @torch.no_grad()
    def localize(self, prompt: str, progress: Callable[[SearchProgress], None] | None = None) -> NeuronSet:
        """The neurons that carry ``prompt`` (empty when it is not memorized), with scores before and after.

        ``info["outcome"]`` is one of :data:`OUTCOMES`; ``info["unet_calls"]`` and ``info["seconds"]`` are
        its cost (``unet_calls <= config.max_unet_calls``). ``progress`` is called after every UNet call
        and at each stage with one :class:`SearchProgress`, updated in place.
        """
        if self.stats is None:
            raise ValueError("localization needs activation statistics of non-memorized prompts (stats=None)")
        cfg = self.config
        start = time.perf_counter()
        embeds, unet_kwargs = self.condition(prompt)
        probe = self.probe_class(self.unet, self.scheduler, self.layers, embeds, cfg, unet_kwargs)
        info: dict[str, Any] = {
            "method": "nemo",
            "threshold": cfg.threshold,
            "config": cfg.to_dict(),
            "similarity": probe.similarity.describe(),
            "memorized": probe.memorized,
            "kept_seeds": int(probe.kept.sum()),
            "mask_batch": probe.mask_batch,
        }
        state = SearchProgress()

        def report(stage: str | None = None) -> None:
            state.stage = stage or state.stage
            state.unet_calls = probe.unet_calls
            if progress is not None:
                progress(state)

        best: list[Any] = [None, None]  # the state to return if the budget ends the search, and its score

        def accept(mask: torch.Tensor, score: float) -> None:
            """Keep the latest accepted state, preferring states that meet the threshold itself."""
            if best[0] is None or score <= cfg.threshold or best[1] > cfg.threshold:
                best[:] = [mask, score]
            state.neurons = int(mask.sum())

        report()
        outcome, blocked = "not_memorized", None
        if probe.memorized:
            outcome = "localized"
            # one call is kept for the final evaluation
            calls = None if cfg.max_unet_calls is None else cfg.max_unet_calls - 1
            probe.limit(calls, None if cfg.max_seconds is None else start + cfg.max_seconds)
            probe.on_call = report
            try:
                blocked = self._search(probe, embeds, info, accept, report)
                if blocked is None:
                    outcome = "not_localizable"
                elif info["tau_ref"] > cfg.threshold:  # NeMo's fallback: refined against the score reached
                    outcome = "not_localizable"
            except SearchBudgetExhausted as stop:
                outcome, blocked = "budget_exhausted", best[0]
                info["stopped_by"] = stop.reason
            probe.limit()
        score_after = probe.score
        if blocked is not None:
            report("final")
            final = probe.evaluate(blocked)
            score_after = final["mem"]
            info.update(detection_after=final["detection"], criterion_met=final["mem"] <= cfg.threshold)
            info["margin"] = final["mem"] - cfg.threshold
            spread = cfg.threshold_spread
            if outcome == "not_localizable" and spread is not None and info["margin"] <= spread:
                outcome = "near_miss"  # missed by less than the threshold's own spread: reported, kept
        else:
            blocked = torch.zeros(probe.n_neurons, dtype=torch.bool, device=probe.device)
        info.update(
            outcome=outcome,
            seconds=time.perf_counter() - start,
            unet_calls=probe.unet_calls,
            masks_evaluated=probe.masks_evaluated if probe.memorized else 0,
        )
        state.outcome = outcome
        report("done")
        return NeuronSet(
            fingerprint=self.fingerprint,
            layers=list(self.layers),
            neurons=probe.lists_from_mask(blocked),
            prompts=[prompt],
            score_before=[probe.score],
            score_after=[score_after],
            info=info,
        )

    def _search(
        self,
        probe: MemorizationProbe,
        embeds: torch.Tensor,
        info: dict[str, Any],
        accept: Callable[[torch.Tensor, float], None],
        report: Callable[[str], None],
    ) -> torch.Tensor | None:
        """NeMo's steps 2-3 on a memorized prompt's ``probe``: the blocked mask found, ``None`` if not localizable.

        ``accept(mask, score)`` sees each state that meets the search's criterion, in order; raises
        :class:`SearchBudgetExhausted` when the probe refuses a call or ``max_candidates`` cuts the search.
        """
        cfg = self.config
        if cfg.early_exit:
            report("all_off")
            everything = torch.ones(probe.n_neurons, dtype=torch.bool, device=probe.device)
            info["all_off_score"] = score = float(probe.scores(everything[None])[0])
            if score > cfg.threshold:
                return None
            accept(everything, score)

        acts = [a[0] for a in value_activations(self.layers, embeds)]
        z = self.stats.zscores(acts)
        schedule = initial_schedule(cfg, max(probe.sizes))
        report("schedule")
        chosen, tau_ref, chosen_score = None, cfg.threshold, None
        step = probe.mask_batch
        for begin in range(0, len(schedule), step):
            part = schedule[begin : begin + step]
            lists = [candidate_lists(acts, z, theta, k, cfg.two_sided) for theta, k in part]
            masks = torch.stack([probe.mask_from_lists(cand) for cand in lists])
            scores = probe.scores(masks).tolist()
            for (theta, k), cand, mask, score in zip(part, lists, masks, scores):
                chosen, chosen_score = (theta, k, cand, mask), score
                if score <= cfg.threshold:
                    break
            if chosen_score <= cfg.threshold:
                break
        theta, k, initial, blocked = chosen
        if chosen_score > cfg.threshold:
            tau_ref = chosen_score  # never reached the threshold: refine against the score reached
        info.update(initial_neurons=initial, initial_score=chosen_score, theta=theta, k=k, tau_ref=tau_ref)
        accept(blocked, chosen_score)

        # refinement 1: whole layers, last to first
        report("layers")
        n_layers = len(probe.sizes)
        layer_groups = [
            probe.offsets[li] + torch.as_tensor(initial[li], device=probe.device)
            for li in reversed(range(n_layers))
            if initial[li]
        ]
        blocked, _ = greedy_unblock(probe, blocked, layer_groups, tau_ref, accept)
        # refinement 2: single neurons, layers last to first, candidate order within a layer
        remaining = set(blocked.nonzero().flatten().tolist())
        if cfg.max_candidates is not None and len(remaining) > cfg.max_candidates:
            raise SearchBudgetExhausted("max_candidates")
        report("neurons")
        neuron_groups = [
            torch.tensor([probe.offsets[li] + i], device=probe.device)
            for li in reversed(range(n_layers))
            for i in initial[li]
            if probe.offsets[li] + i in remaining
        ]
        blocked, _ = greedy_unblock(probe, blocked, neuron_groups, tau_ref, accept)
        return blocked
