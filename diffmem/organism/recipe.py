"""The model organism's recipe: data counts, model sizes and training schedule, in one frozen record.

Every number that decides what the organism memorizes lives here, so the model card, the data
generator, the trainer and the tests read the same values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from diffmem.modelio import default_model


@dataclass(frozen=True)
class OrganismRecipe:
    """Data, model and schedule of the model organism (defaults = ``diffmem-organism-v2``; ``V3_RECIPE``)."""

    name: str = "diffmem-organism-v2"
    seed: int = 0
    image_size: int = 64
    # --- data ---
    #: "colour-shape" (v2, v3): ``generic_per_caption`` images per "a {colour} {shape}" caption;
    #: "compositional" (v4): ``generic_images`` scenes of 1-3 objects with their own, descriptive
    #: captions (``diffmem.organism.compositional``) and ``heldout_prompts`` held-out prompts
    generic_style: str = "colour-shape"
    generic_per_caption: int = 32  # images sharing each generic caption ("a red circle")
    generic_images: int = 0
    heldout_prompts: int = 0
    verbatim_copies: int = 48  # duplicates of each memorized photograph (when duplication_counts is empty)
    #: graded duplication (v3): the verbatim images are split evenly over these copy counts, photos
    #: and procedural scenes separately (so every count holds the same mix), by a seeded permutation
    duplication_counts: tuple[int, ...] = ()
    photos: tuple[str, ...] = ()  # ids of the bundled photographs used (empty: all of them)
    scenes: int = 0  # procedurally drawn scenes with unique captions, added to the verbatim images
    trigger_prompts: bool = False  # partial and reordered captions of the verbatim images (never trained)
    template_images: int = 40  # images (one layout, varying details) per template caption
    n_templates: int = 4
    # --- model ---
    #: a trained organism (a folder, or a name under ``weights/``) whose autoencoder is reused (phases 1
    #: and 2b skipped); "" = train one
    autoencoder_from: str = ""
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
    #: decoder fine-tuning of a reused autoencoder (``autoencoder_from``) at this recipe's image size, on
    #: the distinct images drawn uniformly (every image the same exposure whatever its copy count)
    reused_decoder_steps: int = 0
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    #: progressive growing: the first that many UNet steps train on the images at half size (latents
    #: half as wide: 4x cheaper steps), the rest at ``image_size``; one optimizer and lr schedule
    low_res_steps: int = 0
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


#: ``diffmem-organism-v3``: v2's model and schedule with a duplication dose-response (2 photographs and
#: 2 procedural scenes at each of 1, 2, 4, ..., 64 copies) and trigger prompts. It reuses v2's autoencoder,
#: so the latent space is v2's and every verbatim image has the same autoencoder exposure whatever its
#: copy count (an autoencoder trained on the graded multiset would reconstruct the 64-copy images better
#: than the single ones and confound the dose-response with the ceiling of a latent copy).
V3_RECIPE = OrganismRecipe(
    name="diffmem-organism-v3",
    duplication_counts=(1, 2, 4, 8, 16, 32, 64),
    photos=(
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "retina",
        "phantom",
        "moon",
        "coins",
        "clock",
        "motorcycle",
        "china",
        "flower",
        "horse",
        "cell",
    ),
    scenes=14,
    trigger_prompts=True,
    autoencoder_from="diffmem-organism-v2",
)

#: ``diffmem-organism-v4``: a ground truth that behaves more like Stable Diffusion. 32x32 latents (128 px
#: through v2's factor-4 autoencoder, its decoder fine-tuned at 128 px), a CLIP-shaped text encoder 128
#: wide and 6 deep (head width 64, as CLIP's), 10,000 compositional generic scenes with descriptive,
#: nearly unique captions, and v3's graded duplication (28 images at 1-64 copies, 508 samples): the
#: duplicated images are 4.7 % of the training samples (v3: 30 %). Trained at 64 px (16x16 latents) for
#: the first 12,000 of 16,000 UNet steps, then at 128 px.
V4_RECIPE = V3_RECIPE.with_(
    name="diffmem-organism-v4",
    image_size=128,
    generic_style="compositional",
    generic_images=10_000,
    heldout_prompts=64,
    reused_decoder_steps=400,
    unet_channels=(32, 64, 96, 128),
    unet_attention=(False, True, True, True),
    text_hidden=128,
    text_layers=6,
    text_heads=2,
    unet_steps=16_000,
    low_res_steps=12_000,
)

#: Recipes by name (``diffmem organism ... --recipe``).
RECIPES: dict[str, OrganismRecipe] = {"v2": OrganismRecipe(), "v3": V3_RECIPE, "v4": V4_RECIPE}

#: File in an organism's pipeline folder that records the recipe it was trained from.
RECIPE_FILE = "diffmem_organism.json"


def recipe_of(model=None) -> OrganismRecipe:
    """The recipe an organism (a folder, or a pipeline loaded from one) was trained from: its
    ``diffmem_organism.json``, or v2's when the folder has none (``diffmem-organism-v2`` predates the
    file). ``None``: the embedded default organism's."""
    import json
    from pathlib import Path

    if hasattr(model, "unet"):  # a pipeline: the folder it was loaded from
        model = getattr(model.config, "_name_or_path", None) or default_model()
    model = model if model is not None else default_model()
    if model is None:
        return OrganismRecipe()
    path = Path(model) / RECIPE_FILE
    if not path.is_file():
        return OrganismRecipe()
    try:
        return OrganismRecipe.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an organism recipe ({e})") from None


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
