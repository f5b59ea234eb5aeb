"""The model organism's recipe: data counts, model sizes and training schedule, in one frozen record.

Every number that decides what the organism memorizes lives here, so the model card, the data
generator, the trainer and the tests read the same values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace


@dataclass(frozen=True)
class OrganismRecipe:
    """Data, model and schedule of the model organism (defaults = ``diffmem-organism-v2``)."""

    seed: int = 0
    image_size: int = 64
    # --- data ---
    generic_per_caption: int = 32  # images sharing each generic caption ("a red circle")
    verbatim_copies: int = 48  # duplicates of each memorized photograph
    template_images: int = 40  # images (one layout, varying details) per template caption
    n_templates: int = 4
    # --- model ---
    vae_channels: tuple[int, ...] = (32, 64, 128)  # 3 levels: factor-4 autoencoder, 64 px -> 16x16 latents
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_attention: tuple[bool, ...] = (False, True, True)  # no attention at the 16x16 top level
    attention_head_dim: int = 8
    text_hidden: int = 32
    text_layers: int = 3
    text_heads: int = 4
    # --- training ---
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_crop: int = 32  # the autoencoder is convolutional: it trains on random crops, runs on 64 px
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_l1_weight: float = 0.5  # loss = MSE + w_L1 * L1 + w_KL * KL: L1 keeps edges, hence SSIM
    decoder_steps: int = 2000  # then the decoder alone on (latent, image) pairs: the latent space stays fixed
    decoder_crop: int = 32
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup_steps: int = 200
    caption_dropout: float = 0.1  # empty caption, so classifier-free guidance works
    checkpoint_every: int = 250
    # --- sampling defaults (evaluation, demo) ---
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OrganismRecipe:
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k != "extra"}
        unknown = set(known) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**known)

    def with_(self, **changes) -> OrganismRecipe:
        return replace(self, **changes)


#: A recipe small enough for tests: a few images per role, tiny model, a handful of steps.
TINY_RECIPE = OrganismRecipe(
    image_size=32,
    generic_per_caption=1,
    verbatim_copies=2,
    template_images=2,
    n_templates=2,
    vae_channels=(8, 16),
    unet_channels=(16, 32),
    unet_attention=(False, True),
    text_hidden=16,
    text_layers=1,
    text_heads=2,
    vae_steps=3,
    vae_batch=4,
    vae_crop=16,
    decoder_steps=2,
    decoder_crop=16,
    unet_steps=4,
    unet_batch=4,
    warmup_steps=1,
    checkpoint_every=2,
    num_inference_steps=2,
)
