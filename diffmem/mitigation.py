"""Memorization mitigation for the guarded pipeline: decide per image, then change the loop's inputs.

Before the denoising loop, one UNet call on the classifier-free-guidance batch at the first timestep
gives every image's first-step noise gap (Wen et al.'s early score, the pipeline's own hook reads it);
images whose gap is ``>= threshold`` are *flagged* and only they are mitigated:

* ``"nemo"``: the value neurons of a :class:`~diffmem.localize.neuron_set.NeuronSet` (given, or found
  by NeMo for each flagged prompt and cached) are switched off for the flagged images only, on both
  guidance branches and at every step, by per-sample forward hooks.
* ``"embedding"``: the conditional text embedding of each flagged prompt is optimised
  (:func:`diffmem.embedding_mitigation.optimize_prompt_embeds`) on that prompt's own starting latents,
  to a target equal to the threshold (per image); the loop then runs on ``prompt_embeds``.

The loop itself is the stock one; it just receives the same starting latents (drawn here from the
caller's generator exactly as the stock pipeline would), the prompt embeddings and the hooks. An
unflagged image is therefore the image the unmitigated pipeline makes, and costs one extra UNet call
for the whole batch (the first-step check).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from diffmem.hooks.neurons import scaled_value_neurons
from diffmem.hooks.noise import capture_noise_gap

MITIGATIONS = ("nemo", "embedding")


@dataclass
class MitigationPlan:
    """What the mitigation changes in the call (``call`` arguments, a context to enter) and the per-image report."""

    call: dict[str, Any]
    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    report: list[dict[str, Any]] = field(default_factory=list)


def _first_step_gaps(pipe, latents, cond, neg, guidance, t0) -> torch.Tensor:
    """Per-image noise gap at the first timestep, read by the pipeline's own capture hook."""
    x = pipe.scheduler.scale_model_input(latents, t0)
    with torch.no_grad():
        with capture_noise_gap(
            pipe.unet,
            guidance=guidance,
            uncond_embeds=neg,
            prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
            alphas_cumprod=getattr(pipe.scheduler, "alphas_cumprod", None),
        ) as record:
            if guidance:
                pipe.unet(torch.cat([x, x]), t0, encoder_hidden_states=torch.cat([neg, cond]))
            else:
                pipe.unet(x, t0, encoder_hidden_states=cond)
    return record.as_tensor()[:, 0].cpu()


def plan_mitigation(
    pipe,
    call: dict[str, Any],
    mitigation: str,
    threshold: float,
    *,
    guidance: bool,
    neuron_set=None,
    nemo=None,
    embedding_options: dict[str, Any] | None = None,
) -> MitigationPlan:
    """Flag images by their first-step gap and prepare the mitigated inputs of the stock ``__call__``.

    ``call``: the bound arguments of ``StableDiffusionPipeline.__call__``; returns a copy with
    ``prompt_embeds``/``negative_prompt_embeds``/``latents`` filled in. ``nemo``: a
    :class:`~diffmem.localize.nemo.NeMo` used to localize neurons for flagged prompts when no
    ``neuron_set`` is given (results cached on the pipeline by prompt).
    """
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    if mitigation not in MITIGATIONS:
        raise ValueError(
            f"mitigation={mitigation!r}: expected one of {', '.join(map(repr, MITIGATIONS))} or None"
        )
    call = dict(call)
    device = pipe._execution_device
    n_per = call["num_images_per_prompt"] or 1
    if call["prompt"] is not None:
        prompts = [call["prompt"]] if isinstance(call["prompt"], str) else list(call["prompt"])
    else:
        prompts = [None] * call["prompt_embeds"].shape[0]
    lora_scale = (call["cross_attention_kwargs"] or {}).get("scale")
    cond, neg = pipe.encode_prompt(
        call["prompt"],
        device,
        n_per,
        True,
        call["negative_prompt"],
        prompt_embeds=call["prompt_embeds"],
        negative_prompt_embeds=call["negative_prompt_embeds"],
        lora_scale=lora_scale,
        clip_skip=call["clip_skip"],
    )
    n = cond.shape[0]
    height = call["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = call["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = pipe.prepare_latents(
        n, pipe.unet.config.in_channels, height, width, cond.dtype, device, call["generator"], call["latents"]
    )
    timesteps, _ = retrieve_timesteps(
        pipe.scheduler, call["num_inference_steps"], device, call["timesteps"], call["sigmas"]
    )
    t0 = timesteps[0]
    start = time.perf_counter()
    gaps = _first_step_gaps(pipe, latents, cond, neg, guidance, t0)
    check_seconds = time.perf_counter() - start
    flagged = [bool(g >= threshold) for g in gaps]
    report = [
        {"first_step_score": float(g), "flagged": f, "action": "none", "seconds": check_seconds / n}
        for g, f in zip(gaps, flagged)
    ]
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    prompt_index = [i // n_per for i in range(n)]

    if mitigation == "nemo" and any(flagged):
        context = _nemo_context(pipe, prompts, prompt_index, flagged, report, neuron_set, nemo, guidance, n)
    elif mitigation == "embedding" and any(flagged):
        cond = _optimize_embeddings(
            pipe, cond, neg, latents, prompt_index, flagged, report, t0, threshold, embedding_options
        )

    # the stock loop scales the latents it is given by init_noise_sigma again
    call.update(
        prompt=None,
        negative_prompt=None,
        prompt_embeds=cond,
        negative_prompt_embeds=neg if guidance else None,
        num_images_per_prompt=1,
        latents=latents / pipe.scheduler.init_noise_sigma,
    )
    return MitigationPlan(call=call, context=context, report=report)


def _nemo_context(pipe, prompts, prompt_index, flagged, report, neuron_set, nemo, guidance, n):
    from diffmem.localize.neuron_set import NeuronSet

    cache = pipe.__dict__.setdefault("_diffmem_nemo_cache", {})
    per_prompt: dict[int, NeuronSet] = {}
    for i in sorted({prompt_index[k] for k in range(n) if flagged[k]}):
        start = time.perf_counter()
        if neuron_set is not None:
            per_prompt[i] = neuron_set
        else:
            if nemo is None and getattr(pipe, "nemo_stats", None) is not None:
                from diffmem.localize.nemo import NeMo, NemoConfig

                nemo = NeMo.from_pipe(
                    pipe, pipe.nemo_stats, getattr(pipe, "nemo_config", None) or NemoConfig()
                )
            if nemo is None:
                raise ValueError(
                    "mitigation='nemo' without neuron_set needs NeMo activation statistics: set "
                    "pipe.nemo_stats (diffmem.localize.stats.ValueStats) or pass neuron_set="
                )
            if prompts[i] is None:
                raise ValueError(
                    "mitigation='nemo' with prompt_embeds needs neuron_set= (localization reads the prompt)"
                )
            if prompts[i] not in cache:
                cache[prompts[i]] = nemo.localize(prompts[i])
            per_prompt[i] = cache[prompts[i]]
        elapsed = time.perf_counter() - start
        for k in range(n):
            if prompt_index[k] == i and flagged[k]:
                report[k].update(
                    action="nemo", neurons=len(per_prompt[i]), seconds=report[k]["seconds"] + elapsed
                )
    # per-image channel scales: 1 everywhere, 0 at the flagged images' neurons
    modules = dict(pipe.unet.named_modules())
    names = sorted({name for s in per_prompt.values() for name in s.by_layer()})
    scales = {name: torch.ones(n, modules[name].out_features) for name in names}
    for k in range(n):
        if flagged[k]:
            for name, row in per_prompt[prompt_index[k]].scales(pipe.unet).items():
                scales[name][k] = row
    if guidance:  # the loop's batch is [uncond, text]: the same mask on both halves
        scales = {name: torch.cat([s, s]) for name, s in scales.items()}
    return scaled_value_neurons(pipe.unet, {name: modules[name] for name in names}, scales, mode="hook")


def _optimize_embeddings(pipe, cond, neg, latents, prompt_index, flagged, report, t0, threshold, options):
    from diffmem.embedding_mitigation import optimize_prompt_embeds, target_loss_from_threshold
    from diffmem.scores.noise_gap import v_to_epsilon_gap_scale

    options = dict(options or {})
    cond = cond.clone()
    scale = 1.0
    if pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        scale = float(v_to_epsilon_gap_scale(pipe.scheduler.alphas_cumprod[int(t0)]))
    for i in sorted({prompt_index[k] for k in range(len(flagged)) if flagged[k]}):
        rows = [k for k in range(len(flagged)) if prompt_index[k] == i and flagged[k]]
        start = time.perf_counter()
        target = options.get("target_loss")
        if target is None:
            target = target_loss_from_threshold(threshold, len(rows)) / scale
        result = optimize_prompt_embeds(
            pipe.unet,
            pipe.scheduler,
            cond[rows[0] : rows[0] + 1],
            neg[rows[0] : rows[0] + 1],
            latents[rows],
            target_loss=target,
            lr=options.get("lr", 0.05),
            iterations=options.get("iterations", 10),
            timestep=t0,
        )
        cond[rows] = result.prompt_embeds.to(cond.dtype).expand(len(rows), -1, -1)
        elapsed = time.perf_counter() - start
        for k in rows:
            report[k].update(
                action="embedding",
                loss_before=result.losses[0],
                loss_after=result.losses[-1],
                iterations=result.iterations,
                seconds=report[k]["seconds"] + elapsed / len(rows),
            )
    return cond
