"""Small Stable Diffusion pipelines built from configs, offline and deterministic.

They have the exact component classes and folder layout of real SD-1.x / SD-2.x checkpoints
(``UNet2DConditionModel`` with cross-attention in the down, mid and up blocks, ``AutoencoderKL``,
``CLIPTextModel`` and the real 49,408-token CLIP BPE tokenizer), only narrower, so every method of
diffmem can be run and tested on them in seconds on a CPU.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """Write OpenAI CLIP's ``vocab.json`` and ``merges.txt`` from the BPE file open_clip ships.

    The vocabulary is: the 256 byte symbols, the same with ``</w>``, the 48,894 merged pairs, then
    ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens, ids equal to OpenAI CLIP's).
    Returns the two paths (in a per-process temporary folder).
    """
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="diffmem-clip-tokenizer-"))
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    merges_path.write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    return str(vocab_path), str(merges_path)


def clip_tokenizer(model_max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer, built offline: ``"a photo of a cat"`` -> ``[49406, 320, 1125, 539, 320, 2368, 49407]``.

    ``pad_token="!"`` gives SDXL's second tokenizer (OpenCLIP's padding).
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files()
    # transformers 5.x silently builds a broken tokenizer from vocab_file=/merges_file= keywords:
    # the two paths must be positional.
    tok = CLIPTokenizer(vocab, merges, model_max_length=model_max_length, pad_token=pad_token)
    return tok


@dataclass(frozen=True)
class TinySDConfig:
    """Sizes of a tiny Stable Diffusion pipeline. ``variant`` picks SD-1.x or SD-2.x conventions."""

    variant: Literal["sd1", "sd2"] = "sd1"
    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    sample_size: int = 32  # image side in pixels; the latent side is sample_size / 2**(len(vae_channels)-1)

    @property
    def prediction_type(self) -> PredictionType:
        return "epsilon" if self.variant == "sd1" else "v_prediction"

    @property
    def latent_size(self) -> int:
        return self.sample_size // 2 ** (len(self.vae_channels) - 1)


def clip_text_encoder(
    hidden: int, layers: int, heads: int, hidden_act: str = "quick_gelu", with_projection: bool = False
):
    """A randomly initialised ``CLIPTextModel`` for the real 49,408-token CLIP vocabulary (77 positions).

    ``with_projection``: a ``CLIPTextModelWithProjection`` (SDXL's second text encoder, whose pooled,
    projected output conditions the UNet).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=hidden_act,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            projection_dim=hidden,
        )
    )


def sd_autoencoder(
    channels: tuple[int, ...],
    latent_channels: int,
    sample_size: int,
    max_norm_groups: int = 32,
    scaling_factor: float = 0.18215,
):
    """A randomly initialised ``AutoencoderKL`` (one layer per block; downsampling 2**(len(channels)-1))."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=min(max_norm_groups, channels[0]),
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd_ddim_scheduler(prediction_type: PredictionType = "epsilon"):
    """``DDIMScheduler`` with Stable Diffusion's training schedule (scaled-linear betas 0.00085..0.012)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_components(config: TinySDConfig = TinySDConfig(), seed: int = 0) -> dict:
    """Build (unet, vae, text_encoder, tokenizer, scheduler) from configs, weights drawn from ``seed``."""
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    sd2 = config.variant == "sd2"
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=config.text_hidden,
        attention_head_dim=(
            tuple(c // config.attention_head_dim for c in config.unet_channels)
            if sd2
            else config.attention_head_dim
        ),
        use_linear_projection=sd2,
        norm_num_groups=min(32, config.unet_channels[0]),
    )
    torch.manual_seed(seed + 1)
    vae = sd_autoencoder(config.vae_channels, config.latent_channels, config.sample_size)
    tokenizer = clip_tokenizer()
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(
        config.text_hidden, config.text_layers, config.text_heads, "gelu" if sd2 else "quick_gelu"
    )
    scheduler = sd_ddim_scheduler(config.prediction_type)
    for module in (unet, vae, text_encoder):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_tiny_pipeline(config: TinySDConfig = TinySDConfig(), seed: int = 0, pipeline_class=None):
    """A complete tiny ``StableDiffusionPipeline`` (or ``pipeline_class``), deterministic in ``seed``.

    It has no safety checker and no feature extractor, like an SD folder saved with
    ``safety_checker=None``; it round-trips through ``save_pretrained``/``from_pretrained`` unchanged.
    """
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    return pipeline_class(
        **build_components(config, seed),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# ------------------------------------------------------------------------------------------ SDXL
@dataclass(frozen=True)
class TinySDXLConfig:
    """Sizes of a tiny SDXL pipeline: SDXL's component classes and conditioning, only narrower.

    The UNet has SDXL's block layout (a plain first down block, cross-attention below it, several
    transformer layers per block, linear projections) and ``text_time`` micro-conditioning; the two
    text encoders' hidden states are concatenated (``2 * text_hidden`` = the cross-attention width)
    and the second one's pooled output (projected to ``text_hidden``) joins the time ids.
    """

    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    transformer_layers_per_block: tuple[int, ...] = (1, 2)
    attention_head_dim: tuple[int, ...] = (2, 4)
    addition_time_embed_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    sample_size: int = 32  # image side in pixels

    @property
    def latent_size(self) -> int:
        return self.sample_size // 2 ** (len(self.vae_channels) - 1)


def sdxl_euler_scheduler():
    """``EulerDiscreteScheduler`` as SDXL checkpoints configure it (SD's betas, leading spacing, offset 1)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
        prediction_type="epsilon",
    )


def build_sdxl_components(config: TinySDXLConfig = TinySDXLConfig(), seed: int = 0) -> dict:
    """Build the seven SDXL components from configs, weights drawn from ``seed``."""
    from diffusers import UNet2DConditionModel

    n = len(config.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=config.latent_size,
        in_channels=config.latent_channels,
        out_channels=config.latent_channels,
        block_out_channels=config.unet_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        mid_block_type="UNetMidBlock2DCrossAttn",
        transformer_layers_per_block=config.transformer_layers_per_block,
        attention_head_dim=config.attention_head_dim,
        use_linear_projection=True,
        cross_attention_dim=2 * config.text_hidden,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + config.text_hidden,
        norm_num_groups=min(32, config.unet_channels[0]),
    )
    torch.manual_seed(seed + 1)
    vae = sd_autoencoder(
        config.vae_channels, config.latent_channels, config.sample_size, scaling_factor=0.13025
    )
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(config.text_hidden, config.text_layers, config.text_heads)
    torch.manual_seed(seed + 3)
    text_encoder_2 = clip_text_encoder(
        config.text_hidden, config.text_layers, config.text_heads, "gelu", with_projection=True
    )
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(pad_token="!"),
        "scheduler": sdxl_euler_scheduler(),
    }


def build_tiny_sdxl_pipeline(config: TinySDXLConfig = TinySDXLConfig(), seed: int = 0, pipeline_class=None):
    """A complete tiny ``StableDiffusionXLPipeline`` (or ``pipeline_class``), deterministic in ``seed``.

    No watermarker, no image encoder, ``force_zeros_for_empty_prompt`` as in SDXL's release.
    """
    if pipeline_class is None:
        from diffusers import StableDiffusionXLPipeline as pipeline_class
    return pipeline_class(
        **build_sdxl_components(config, seed),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


# ------------------------------------------------------------------------------------------ real size
#: Stable Diffusion's released architectures: UNet attention heads and text width, encoder, prediction.
SD_ARCHITECTURES = {
    "sd15": dict(
        attention_head_dim=8,
        cross_attention_dim=768,
        linear=False,
        text=(768, 12, 12, "quick_gelu"),
        prediction="epsilon",
        image_size=512,
    ),
    "sd21": dict(
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        linear=True,
        text=(1024, 23, 16, "gelu"),
        prediction="v_prediction",
        image_size=768,
    ),
}


def build_sd_architecture_pipeline(
    arch: str = "sd15",
    seed: int = 0,
    image_size: int = 64,
    pipeline_class=None,
    dtype: torch.dtype | None = None,
):
    """Random weights in Stable Diffusion 1.5's (``"sd15"``) or 2.1's (``"sd21"``) exact architecture.

    SD-1.5: 860M-parameter UNet, CLIP ViT-L/14 text encoder (123M); SD-2.1: 866M-parameter UNet with
    linear projections and 64-channel heads, OpenCLIP ViT-H/14 text encoder (23 layers used, 340M),
    v-prediction; both with the 8x autoencoder. For real-size plumbing checks: layer discovery (16
    cross-attention layers, 5,760 value neurons in down/mid on SD-1.5), memory, every method's shapes.
    ``image_size`` sets the default resolution (the UNet's ``sample_size`` is ``image_size // 8``;
    the released models use 512 and 768); ``dtype`` casts every module. No hub access.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if arch not in SD_ARCHITECTURES:
        raise ValueError(f"arch: expected one of {', '.join(SD_ARCHITECTURES)}, got {arch!r}")
    spec = SD_ARCHITECTURES[arch]
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=spec["cross_attention_dim"],
        attention_head_dim=spec["attention_head_dim"],
        use_linear_projection=spec["linear"],
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=image_size,
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = clip_text_encoder(*spec["text"]).eval()
    pipe = pipeline_class(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=sd_ddim_scheduler(spec["prediction"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe if dtype is None else pipe.to(dtype)


def build_sd15_architecture_pipeline(seed: int = 0, image_size: int = 64, pipeline_class=None):
    """Random weights in SD-1.5's architecture: ``build_sd_architecture_pipeline("sd15", ...)``."""
    return build_sd_architecture_pipeline("sd15", seed, image_size, pipeline_class)
