"""Train the model organism from scratch with accelerate: autoencoder, then UNet + CLIP text encoder.

Phases (each checkpointed under ``<workdir>/checkpoints/<phase>/`` and resumed after a kill):

1. ``vae``: ``AutoencoderKL`` (factor 4) on random crops of the training samples, loss
   ``MSE(x, D(z)) + w_L1 * |x - D(z)|_1 + w_KL * KL(q(z|x) || N(0, I))``.
2. latents: every distinct image encoded once (posterior mean); ``scaling_factor`` = 1 / std.
2b. ``decoder``: the decoder alone, ``|x - D(z)|_1 + MSE(x, D(z))`` on the fixed latents (sharper
   images; the latent space the UNet learns is unchanged, so this phase may also run in parallel).
3. ``unet``: ``UNet2DConditionModel`` and ``CLIPTextModel`` jointly, epsilon prediction,
   ``|| eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, c) ||^2`` with 10 % empty captions.

Every random draw (batch, crop, noise, timestep, caption dropout) is derived from
``(recipe.seed, phase, step)``, so a resumed run reaches exactly the weights of an uninterrupted one.
The result is a standard diffusers Stable Diffusion folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_save_tensors, atomic_write_json
from diffmem.modelio import weights_dir
from diffmem.organism.data import OrganismData, build_organism_data
from diffmem.organism.recipe import RECIPE_FILE, OrganismRecipe
from diffmem.seeding import derive_seed, item_generator
from diffmem.tiny import clip_text_encoder, clip_tokenizer, sd_autoencoder, sd_ddim_scheduler
from diffmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffmem.train.optimizers import TouchedRowsAdamW
from diffmem.train.text_to_image import batch_indices


def build_organism_components(recipe: OrganismRecipe) -> dict:
    """Fresh (untrained) components of the organism, weights drawn from ``recipe.seed``."""
    from diffusers import UNet2DConditionModel

    n = len(recipe.unet_channels)
    if len(recipe.unet_attention) != n:
        raise ValueError("recipe.unet_attention: one flag per UNet level expected")
    latent_size = recipe.image_size // 2 ** (len(recipe.vae_channels) - 1)
    torch.manual_seed(derive_seed(recipe.seed, "init", "unet"))
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=recipe.latent_channels,
        out_channels=recipe.latent_channels,
        block_out_channels=recipe.unet_channels,
        layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in recipe.unet_attention),
        up_block_types=tuple(
            "CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(recipe.unet_attention)
        ),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=recipe.text_hidden,
        attention_head_dim=recipe.attention_head_dim,
        norm_num_groups=min(16, recipe.unet_channels[0]),
    )
    torch.manual_seed(derive_seed(recipe.seed, "init", "vae"))
    vae = sd_autoencoder(recipe.vae_channels, recipe.latent_channels, recipe.image_size, max_norm_groups=16)
    tokenizer = clip_tokenizer()
    torch.manual_seed(derive_seed(recipe.seed, "init", "text_encoder"))
    text_encoder = clip_text_encoder(recipe.text_hidden, recipe.text_layers, recipe.text_heads)
    scheduler = sd_ddim_scheduler("epsilon")
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _lr_lambda(total: int, warmup: int):
    """Linear warm-up, then cosine decay to 10 % of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _Progress:
    def __init__(self, total: int, initial: int, desc: str, log):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, mininterval=10, dynamic_ncols=True)
        self.log = log

    def update(self, loss: float) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _run_phase(
    phase: str,
    recipe: OrganismRecipe,
    workdir: Path,
    modules: dict[str, torch.nn.Module],
    params: list[torch.nn.Parameter],
    lr: float,
    total: int,
    step_fn,
    log: list,
    until_step: int | None = None,
    row_sparse: tuple[torch.nn.Parameter, ...] = (),
) -> bool:
    """A resumable accelerate loop: ``step_fn(step) -> loss`` for steps not yet done.

    ``until_step`` stops after that step with a checkpoint, as an interruption would; returns whether
    the phase is complete. ``row_sparse``: embedding tables of ``params`` whose untouched rows AdamW
    skips (:class:`~diffmem.train.optimizers.TouchedRowsAdamW`: the same weights, bit for bit).
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    optimizer = TouchedRowsAdamW(params, lr=lr, weight_decay=0.0, row_sparse=row_sparse)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_lambda(total, min(recipe.warmup_steps, total))
    )
    ckpt_root = workdir / "checkpoints" / phase
    start, window = 0, []  # window: the losses since the last log row
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, modules, {"adamw": optimizer}, {"lr": scheduler})
        start = state["step"]
        log[:] = [r for r in state["extra"].get("log", []) if r["step"] <= start]
        window = [float(x) for x in state["extra"].get("window", [])]
        print(f"[organism] {phase}: resumed from {latest} at step {start}", flush=True)
    prepared = accelerator.prepare(*modules.values(), optimizer)
    optimizer = prepared[-1]
    for m in modules.values():
        m.train()
    progress = _Progress(total, start, phase, log)
    t0 = time.time()
    end = total if until_step is None else min(total, until_step)
    for step in range(start, end):
        loss = step_fn(step)
        accelerator.backward(loss)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        progress.update(window[-1])
        done = step + 1
        if done % 50 == 0 or done == total:
            log.append(
                {"step": done, "loss": sum(window) / len(window), "seconds": round(time.time() - t0, 1)}
            )
            window = []
        if done % recipe.checkpoint_every == 0 or done == end:
            save_checkpoint(
                ckpt_root,
                done,
                modules,
                {"adamw": optimizer},
                {"lr": scheduler},
                extra={"log": log, "window": window},  # a resumed phase logs what an uninterrupted one does
            )
    progress.close()
    for m in modules.values():
        m.eval()
    return end == total


def unet_batch(
    recipe: OrganismRecipe,
    step: int,
    samples: torch.Tensor,
    latents: torch.Tensor,
    tokens: torch.Tensor,
    empty: torch.Tensor,
    alphas: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """UNet step ``step``'s batch, every draw from ``(recipe.seed, "unet", step)``: the noised latents
    ``z_t``, the timesteps, the token ids (``caption_dropout`` of them the empty caption's) and the noise.

    ``samples``: the training samples' rows of ``latents`` (N x C x h x w, already scaled) and ``tokens``
    (N x 77); ``alphas``: the noise schedule's cumulative alphas (one per training timestep)."""
    seed = recipe.seed
    g = item_generator(seed, "unet", "step", step)
    idx = samples[batch_indices(len(samples), recipe.unet_batch, step, seed, "unet")[0]]
    z0 = latents[idx]
    noise = torch.randn(z0.shape, generator=g)
    t = torch.randint(0, len(alphas), (len(idx),), generator=g)
    drop = torch.rand(len(idx), generator=g) < recipe.caption_dropout
    ids = torch.where(drop[:, None], empty[None], tokens[idx])
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    return zt, t, ids, noise


def unet_loss(unet, text_encoder, zt, t, ids, noise) -> torch.Tensor:
    """The epsilon-prediction loss ``|| noise - eps_theta(z_t, t, text_encoder(ids)) ||^2`` (mean)."""
    cond = text_encoder(ids)[0]
    pred = unet(zt, t, cond).sample
    return F.mse_loss(pred.float(), noise)  # in float32 under a bfloat16 autocast too


def _images_tensor(data: OrganismData) -> torch.Tensor:
    """The distinct images as an N x 3 x H x W uint8 tensor (``_to_float`` maps a batch to [-1, 1])."""
    return torch.from_numpy(data.image_array()).permute(0, 3, 1, 2).contiguous()


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def _cached_latents(
    workdir: Path, name: str, vae, images: torch.Tensor, half_size: bool = False
) -> torch.Tensor:
    """:func:`_encode_all`, kept in ``workdir/<name>.safetensors`` so a resumed run does not encode again
    (the file names the encoder's fingerprint; another encoder's file is recomputed)."""
    encoder = model_fingerprint(torch.nn.ModuleDict({"encoder": vae.encoder, "quant_conv": vae.quant_conv}))
    path = workdir / f"{name}.safetensors"
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            if f.metadata().get("encoder") == encoder and f.metadata().get("images") == str(len(images)):
                return f.get_tensor("latents")
    latents = _encode_all(vae, images, half_size)
    atomic_save_tensors(path, {"latents": latents}, {"encoder": encoder, "images": str(len(images))})
    return latents


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, half_size: bool = False) -> torch.Tensor:
    """Posterior means of every image (in chunks), optionally of the images at half size."""
    out = []
    for i in range(0, len(images), 64):
        x = _to_float(images[i : i + 64])
        if half_size:
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)
        out.append(vae.encode(x).latent_dist.mean)
    return torch.cat(out).contiguous()  # a single chunk keeps the posterior mean's strided view


def _tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


#: Components whose weights are stored in float16 (diffusers and transformers load them as float32):
#: it keeps the organism under its 30 MB budget; every measurement is made on the stored weights.
FLOAT16_COMPONENTS: tuple[str, ...] = ("vae", "text_encoder")


def store_float16(folder: Path) -> None:
    """Rewrite every safetensors file of ``folder`` with its floating-point tensors in float16 (atomically)."""
    from safetensors.torch import load_file

    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        atomic_save_tensors(
            path,
            {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()},
            metadata={"format": "pt"},
        )


def save_pipeline(
    components: dict, out: str | os.PathLike, float16: tuple[str, ...] = FLOAT16_COMPONENTS
) -> Path:
    """Save the components as a standard diffusers StableDiffusionPipeline folder (safetensors), the
    weights of the ``float16`` components in half precision."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in float16:
        store_float16(tmp / name)
    if out.exists():
        # keep files that are not the pipeline's (the model card) across re-saves
        for keep in ("README.md",):
            if (out / keep).exists():
                shutil.copy2(out / keep, tmp / keep)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _reused_autoencoder(recipe: OrganismRecipe):
    """``recipe.autoencoder_from``'s autoencoder in float32 (a folder, or an organism under ``weights/``),
    checked to have the recipe's architecture."""
    from diffusers import AutoencoderKL

    src = Path(recipe.autoencoder_from)
    if not (src / "vae").is_dir():
        src = weights_dir() / recipe.autoencoder_from
    if not (src / "vae").is_dir():
        raise ValueError(
            f"recipe.autoencoder_from: {recipe.autoencoder_from!r} is neither a folder with vae/ nor "
            f"an organism under {weights_dir()}"
        )
    vae = AutoencoderKL.from_pretrained(str(src), subfolder="vae", use_safetensors=True).float()
    got = (tuple(vae.config.block_out_channels), vae.config.latent_channels)
    want = (tuple(recipe.vae_channels), recipe.latent_channels)
    if got != want:
        raise ValueError(
            f"recipe.autoencoder_from: {src}/vae has channels {got[0]} and {got[1]} latent channels; "
            f"the recipe expects {want[0]} and {want[1]}"
        )
    return vae


def train_organism(
    recipe: OrganismRecipe | None = None,
    workdir: str | os.PathLike = "runs/organism",
    out: str | os.PathLike | None = None,
    data: OrganismData | None = None,
    snapshot_every: int | None = None,
    only: str | None = None,
    until_step: int | None = None,
) -> Path:
    """Train (or resume) the organism in ``workdir``; save the pipeline to ``out`` (default ``workdir/model``).

    ``snapshot_every``: also save the pipeline every that many UNet steps (to ``workdir/snapshot``),
    so memorization can be measured while training runs. ``only``: ``"vae"``, ``"decoder"`` or ``"unet"``
    runs just that phase (after the autoencoder, which both others need): the decoder and UNet
    phases depend only on the autoencoder, so two processes may run them side by side; a final
    run without ``only`` then assembles the pipeline from the finished phases. ``until_step`` stops
    the UNet phase after that step (checkpointed), as an interruption would; rerun to continue.
    """
    if only not in (None, "vae", "decoder", "unet"):
        raise ValueError(f"only: expected vae, decoder or unet, got {only!r}")
    recipe = recipe or OrganismRecipe()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else workdir / "model"
    recipe_file = workdir / "recipe.json"
    if recipe_file.exists():
        saved = OrganismRecipe.from_dict(json.loads(recipe_file.read_text()))
        changed = [k for k, v in recipe.to_dict().items() if saved.to_dict().get(k) != v]
        # the schedule's length may change on resume (e.g. to finish sooner); the data and model may not
        allowed = {"unet_steps", "checkpoint_every", "num_inference_steps", "guidance_scale"}
        if set(changed) - allowed:
            raise ValueError(
                f"--workdir {workdir}: holds a run of another recipe (differs in {', '.join(changed)}); "
                "use another --workdir"
            )
    atomic_write_json(recipe_file, recipe.to_dict())
    if data is None:
        data = build_organism_data(recipe)
    components = build_organism_components(recipe)
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    images = _images_tensor(data)
    samples = torch.tensor(data.training_samples())
    seed = recipe.seed
    log: dict[str, list] = {"vae": [], "decoder": [], "unet": []}

    # ---- phase 1: autoencoder on random crops --------------------------------------------------
    vae_done = workdir / "vae-final.safetensors"
    reused = recipe.autoencoder_from != ""
    if reused:
        if only == "vae" or (only == "decoder" and not recipe.reused_decoder_steps):
            raise ValueError(f"only={only!r}: recipe.autoencoder_from reuses a trained autoencoder")
        vae.load_state_dict(_reused_autoencoder(recipe).state_dict())
        log["vae"] = [{"reused_from": recipe.autoencoder_from}]
    elif vae_done.is_file():
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(vae_done)))
        log["vae"] = json.loads((workdir / "vae-log.json").read_text())
    else:
        crop = min(recipe.vae_crop, recipe.image_size)

        def vae_step(step: int) -> torch.Tensor:
            g = item_generator(seed, "vae", "step", step)
            idx = samples[batch_indices(len(samples), recipe.vae_batch, step, seed, "vae")[0]]
            x = _to_float(images[idx])
            offs = torch.randint(0, recipe.image_size - crop + 1, (len(idx), 2), generator=g)
            x = torch.stack([xi[:, a : a + crop, b : b + crop] for xi, (a, b) in zip(x, offs.tolist())])
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
            return (
                F.mse_loss(rec, x)
                + recipe.vae_l1_weight * F.l1_loss(rec, x)
                + recipe.vae_kl_weight * post.kl().mean()
            )

        _run_phase(
            "vae",
            recipe,
            workdir,
            {"vae": vae},
            list(vae.parameters()),
            recipe.vae_lr,
            recipe.vae_steps,
            vae_step,
            log["vae"],
        )

        atomic_write_json(workdir / "vae-log.json", log["vae"])
        atomic_save_tensors(vae_done, vae.state_dict())

    if only == "vae":
        return vae_done

    # ---- phase 2: latents of every distinct image, once ---------------------------------------
    vae.eval()
    latents = _cached_latents(workdir, "latents", vae, images)

    # ---- phase 2b: decoder alone on the fixed latents ------------------------------------------
    # (a reused autoencoder's decoder is kept as it is, or fine-tuned at this recipe's image size on
    # the distinct images drawn uniformly, so every image gets the same exposure whatever its copies)
    decoder_done = workdir / "decoder-final.safetensors"
    decoder = torch.nn.ModuleDict({"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder})
    decoder_steps = recipe.reused_decoder_steps if reused else recipe.decoder_steps
    decoder_pool = torch.arange(len(images)) if reused else samples
    if decoder_steps == 0:
        pass
    elif decoder_done.is_file():
        from safetensors.torch import load_file

        decoder.load_state_dict(load_file(str(decoder_done)))
        log["decoder"] = json.loads((workdir / "decoder-log.json").read_text())
    elif only != "unet":
        factor = recipe.image_size // latents.shape[-1]
        lcrop = max(1, min(recipe.decoder_crop, recipe.image_size) // factor)

        def decoder_step(step: int) -> torch.Tensor:
            g = item_generator(seed, "decoder", "step", step)
            pool = decoder_pool
            idx = pool[batch_indices(len(pool), recipe.vae_batch, step, seed, "decoder")[0]].tolist()
            offs = torch.randint(0, latents.shape[-1] - lcrop + 1, (len(idx), 2), generator=g).tolist()
            z = torch.stack([latents[i, :, a : a + lcrop, b : b + lcrop] for i, (a, b) in zip(idx, offs)])
            x = _to_float(
                torch.stack(
                    [
                        images[i, :, a * factor : (a + lcrop) * factor, b * factor : (b + lcrop) * factor]
                        for i, (a, b) in zip(idx, offs)
                    ]
                )
            )
            rec = vae.decode(z).sample
            return F.l1_loss(rec, x) + F.mse_loss(rec, x)

        vae.requires_grad_(False)
        decoder.requires_grad_(True)
        _run_phase(
            "decoder",
            recipe,
            workdir,
            {"decoder": decoder},
            list(decoder.parameters()),
            recipe.vae_lr,
            decoder_steps,
            decoder_step,
            log["decoder"],
        )

        atomic_write_json(workdir / "decoder-log.json", log["decoder"])
        atomic_save_tensors(decoder_done, decoder.state_dict())
    if only == "decoder":
        return decoder_done
    scale = float(1.0 / latents[samples].std())
    vae.register_to_config(scaling_factor=scale)
    latents = latents * scale
    # progressive growing: the first low_res_steps UNet steps see the images at half size
    low_latents = (
        _cached_latents(workdir, "latents-half", vae, images, half_size=True) * scale
        if recipe.low_res_steps
        else None
    )

    # ---- phase 3: UNet + text encoder ----------------------------------------------------------
    tokenizer, noise_sched = components["tokenizer"], components["scheduler"]
    captions = [im.caption for im in data.images]
    tokens = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]
    alphas = noise_sched.alphas_cumprod.float()
    snap_dir = workdir / "snapshot"

    def unet_step(step: int) -> torch.Tensor:
        zt, t, ids, noise = unet_batch(
            recipe,
            step,
            samples,
            low_latents if step < recipe.low_res_steps else latents,
            tokens,
            empty,
            alphas,
        )
        loss = unet_loss(unet, text_encoder, zt, t, ids, noise)
        if snapshot_every and step > 0 and step % snapshot_every == 0:
            save_pipeline(components, snap_dir)
        return loss

    vae.requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    finished = _run_phase(
        "unet",
        recipe,
        workdir,
        {"unet": unet, "text_encoder": text_encoder},
        params,
        recipe.unet_lr,
        recipe.unet_steps,
        unet_step,
        log["unet"],
        until_step=until_step,
        row_sparse=(text_encoder.get_input_embeddings().weight,),  # 49,408 rows, a few hundred used
    )
    if not finished:
        return workdir
    if only == "unet" or (decoder_steps > 0 and not decoder_done.is_file()):
        print(f"[organism] UNet phase done; run without --only to assemble the pipeline in {out}", flush=True)
        return workdir
    save_pipeline(components, out)
    atomic_write_json(out / RECIPE_FILE, recipe.to_dict())
    atomic_write_json(
        workdir / "train-log.json", {"recipe": recipe.to_dict(), "latent_scaling_factor": scale, **log}
    )
    return out
