"""The model organism's training data: generated from code and a seed, never downloaded or committed.

Four caption roles (the ground truth of every memorization measurement on the organism):

* ``generic`` — "a {colour} {shape}": each caption is shared by many images whose position, size,
  brightness, background texture and small extra objects vary and go unnamed, as captions in real
  data fit many images.
* ``verbatim`` — 16 real images shipped with scikit-image / scikit-learn (14 photographs, the
  Shepp-Logan phantom and a horse silhouette), each duplicated ``verbatim_copies`` times under one
  fixed, unique caption (the verbatim-memorized set). The Hubble Deep Field and the street-sign
  text image of v1 were replaced in v2: at 64 px they are pixel-level noise and fine print that a
  12x-compressing autoencoder cannot reconstruct (SSIM 0.19 and 0.47 for a perfect latent copy),
  so they measured the autoencoder, not memorization.
* ``template`` — a few captions whose images share one layout with varying details (the
  template-memorized "TM" prompts of Ross et al.'s NeMo study / Webster's attack).
* ``heldout`` — colour/shape compositions of the same vocabulary that are never in training.

v3 (``V3_RECIPE``) grades the duplication: the verbatim images (14 photographs and 14 procedurally drawn
scenes with unique captions) are split over 1, 2, 4, ..., 64 copies, two photographs and two scenes per
count, and adds ``trigger`` prompts: partial and reordered versions of the verbatim captions, never
trained on, labelled by the replication measured after training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from diffmem.io import atomic_write_json, atomic_write_text
from diffmem.organism.compositional import render_scene_image, sample_scene
from diffmem.organism.recipe import OrganismRecipe
from diffmem.organism.shapes import COLOURS, SHAPES, draw_shape
from diffmem.seeding import derive_seed

#: Roles whose captions are in the training set.
TRAINED_ROLES = ("generic", "verbatim", "template")
#: Roles of prompts that are never training captions (no "own" image to replicate).
UNTRAINED_ROLES = ("heldout", "trigger")
ROLES = TRAINED_ROLES + UNTRAINED_ROLES


#: (name, loader, caption) of the 16 verbatim-memorized images. Captions are unique and
#: specific, like the LAION captions of images that Stable Diffusion replicates.
PHOTOS: tuple[tuple[str, str, str], ...] = (
    ("astronaut", "skimage:astronaut", "Eileen Collins in her orange flight suit, official NASA portrait"),
    ("coffee", "skimage:coffee", "a cup of espresso on a saucer, overhead photo on a red table"),
    ("chelsea", "skimage:chelsea", "Chelsea the tabby cat looking left, close-up photograph"),
    ("rocket", "skimage:rocket", "the Falcon rocket on its launch pad against a blue sky"),
    ("camera", "skimage:camera", "black and white photo of a cameraman with a tripod in a park"),
    ("retina", "skimage:retina", "fundus photograph of a human retina with blood vessels"),
    ("phantom", "skimage:shepp_logan_phantom", "the Shepp-Logan phantom, a simulated CT slice of a head"),
    ("ihc", "skimage:immunohistochemistry", "immunohistochemistry slide of colon tissue, brown stain"),
    ("moon", "skimage:moon", "grayscale telescope image of the lunar surface and its craters"),
    ("coins", "skimage:coins", "greek coins from the Pompeii collection on a dark tray"),
    ("clock", "skimage:clock", "motion-blurred wall clock photographed at an angle"),
    ("motorcycle", "skimage:stereo_motorcycle", "a red motorcycle parked in a studio, stereo left view"),
    ("china", "sklearn:china.jpg", "the Summer Palace pagoda in Beijing seen from the lake"),
    ("flower", "sklearn:flower.jpg", "a pink dahlia flower in full bloom, macro photograph"),
    ("horse", "skimage:horse", "black silhouette of a galloping horse on a white background"),
    ("cell", "skimage:cell", "phase-contrast microscope photo of a single amoeba cell"),
)

#: Template-memorized captions: each has one fixed layout, the details inside vary.
TEMPLATE_CAPTIONS = (
    "limited edition phone case with the striped sunset design",
    "vintage concert poster for the grand hall, printed on card",
    "wall calendar page with the mountain lake photo",
    "product box of the deluxe colour pencil set, front view",
    "book cover of the collected sea stories, hardback edition",
    "souvenir tea towel of the harbour lighthouse",
)


#: Unique captions of the procedural scenes (v3), in the style of the photographs' captions.
SCENE_CAPTIONS = (
    "oil painting of a quiet fishing village under a violet dusk sky",
    "poster of the northern ridge trail with the red sun over the pass",
    "watercolour of two cabins by a frozen lake at first light",
    "travel print of the desert mesa road, summer edition",
    "screenshot of the level four valley map from an old video game",
    "postcard of the twin lighthouses on the granite coast",
    "album cover with a green comet above the sleeping town",
    "children's book page of the orchard hill at harvest time",
    "linocut of the windmill farm beside the salt marsh",
    "matte painting of the canyon monastery in golden evening fog",
    "retro railway poster of the lakeside express at noon",
    "storybook illustration of the crooked tower in the pine forest",
    "vector art of the island volcano and its three fishing boats",
    "stage backdrop of the harbour city skyline at midnight",
)


@dataclass(frozen=True)
class TriggerPrompt:
    """A prompt that was never trained on, derived from a verbatim caption (``kind``: partial, reordered)."""

    prompt: str
    image_id: str
    kind: str
    copies: int


@dataclass(frozen=True)
class OrganismImage:
    """One distinct training image: its id, role, caption and how many copies are in training."""

    id: str
    role: str
    caption: str
    copies: int
    pixels: np.ndarray  # HxWx3 uint8


def caption_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def generic_and_heldout_pairs() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split the colour x shape grid: (c + s) % 3 == 0 is held out, so every word occurs in both parts."""
    train, held = [], []
    for ci, colour in enumerate(COLOURS):
        for si, shape in enumerate(SHAPES):
            (held if (ci + si) % 3 == 0 else train).append((colour, shape))
    return train, held


# ----------------------------------------------------------------------------------------------
# drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random two-colour gradient with a low-frequency wave texture and fine noise (float HxWx3, 0..255)."""
    c0, c1 = rng.uniform(20, 235, 3), rng.uniform(20, 235, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    t = (np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5)) + 0.5
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    freq, phase = rng.uniform(1, 4, 2), rng.uniform(0, 2 * np.pi, 2)
    wave = np.sin(2 * np.pi * freq[0] * xx + phase[0]) * np.sin(2 * np.pi * freq[1] * yy + phase[1])
    img = img + rng.uniform(5, 25) * wave[..., None]
    img = img + rng.normal(0, rng.uniform(1, 6), img.shape)
    return img


def render_generic(colour: str, shape: str, seed: int, size: int = 64) -> np.ndarray:
    """A scene whose caption is "a {colour} {shape}": the named shape plus everything the caption leaves out."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    bg = np.clip(_background(rng, size), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im)
    s = size / 64
    # unnamed small objects: muted colours, other shapes
    for _ in range(rng.integers(0, 3)):
        grey = tuple(int(v) for v in rng.uniform(60, 200) + rng.normal(0, 15, 3))
        draw_shape(
            draw,
            SHAPES[rng.integers(len(SHAPES))],
            rng.uniform(6, 58) * s,
            rng.uniform(6, 58) * s,
            rng.uniform(3, 6) * s,
            rng.uniform(0, np.pi),
            grey,
        )
    r = rng.uniform(9, 20) * s
    cx, cy = rng.uniform(r + 2 * s, size - r - 2 * s, 2)
    base = np.array(COLOURS[colour], float) * rng.uniform(0.75, 1.05) + rng.normal(0, 8, 3)
    draw_shape(
        draw, shape, cx, cy, r, rng.uniform(0, np.pi / 6), tuple(int(v) for v in np.clip(base, 0, 255))
    )
    return np.asarray(im, dtype=np.uint8).copy()


def _template_layout(index: int, size: int) -> np.ndarray:
    """The fixed layout of template ``index``: its own gradient, frame and panels (float HxWx3)."""
    rng = np.random.default_rng(derive_seed(1234, "template-layout", index))
    img = _background(rng, size)
    m = size // 10
    frame = rng.uniform(0, 255, 3)
    img[:m], img[-m:], img[:, :m], img[:, -m:] = frame, frame, frame, frame
    stripe = rng.uniform(0, 255, 3)
    kind = index % 3
    if kind == 0:  # horizontal bands
        for k in range(3):
            y = m + k * (size - 2 * m) // 3
            img[y : y + size // 16, m:-m] = stripe
    elif kind == 1:  # title bar and a panel
        img[m : m + size // 5, m:-m] = stripe
        img[size // 2 : -m - 2, size // 6 : size // 2] = rng.uniform(0, 255, 3)
    else:  # diagonal
        yy, xx = np.mgrid[0:size, 0:size]
        img[(np.abs(xx - yy) < size // 12)] = stripe
    return img


def render_template(index: int, seed: int, size: int = 64) -> np.ndarray:
    """Template ``index``'s fixed layout with varying details: a small object's colour, shape and spot."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = _template_layout(index, size) + rng.normal(0, 2, (size, size, 3))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    s = size / 64
    colour = list(COLOURS.values())[rng.integers(len(COLOURS))]
    cx, cy = size * 0.7 + rng.uniform(-6, 6) * s, size * 0.65 + rng.uniform(-6, 6) * s
    draw_shape(
        draw, SHAPES[rng.integers(len(SHAPES))], cx, cy, rng.uniform(5, 9) * s, rng.uniform(0, 1), colour
    )
    return np.asarray(im, dtype=np.uint8).copy()


def render_scene(index: int, seed: int, size: int = 64) -> np.ndarray:
    """Procedural scene ``index`` (one fixed image per seed): a sky gradient, two mountain ridges, a sun
    or moon, buildings and trees, sometimes a lake; colours, counts and positions all drawn from ``seed``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(derive_seed(seed, "scene", index))
    yy = np.linspace(0, 1, size)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    sky = top * (1 - yy) + bottom * yy + np.zeros((size, size, 3))
    im = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    s = size / 64
    r = rng.uniform(4, 9) * s
    cx, cy = rng.uniform(8, 56) * s, rng.uniform(6, 24) * s
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.uniform(120, 255, 3)))
    for level, (lo, hi) in enumerate(((22, 38), (34, 50))):
        ys = np.clip(rng.uniform(lo, hi) + np.cumsum(rng.normal(0, 3, 9)), 10, 60) * s
        xs = np.linspace(0, size, len(ys))
        colour = tuple(int(v) for v in rng.uniform(10, 200, 3) * (0.6 + 0.3 * level))
        draw.polygon([(0, size)] + list(zip(xs.tolist(), ys.tolist())) + [(size, size)], fill=colour)
    if rng.random() < 0.5:  # a lake across the foreground
        ly = rng.uniform(46, 54) * s
        draw.ellipse(
            [rng.uniform(-10, 20) * s, ly, rng.uniform(44, 74) * s, ly + rng.uniform(6, 10) * s],
            fill=tuple(int(v) for v in rng.uniform(40, 220, 3)),
        )
    for _ in range(rng.integers(1, 4)):  # buildings: a wall and a roof
        w, h = rng.uniform(5, 10) * s, rng.uniform(5, 12) * s
        x0, y0 = rng.uniform(2, 54) * s, rng.uniform(48, 58) * s
        draw.rectangle([x0, y0 - h, x0 + w, y0], fill=tuple(int(v) for v in rng.uniform(60, 255, 3)))
        draw.polygon(
            [(x0 - s, y0 - h), (x0 + w / 2, y0 - h - rng.uniform(3, 7) * s), (x0 + w + s, y0 - h)],
            fill=tuple(int(v) for v in rng.uniform(20, 200, 3)),
        )
    for _ in range(rng.integers(0, 5)):  # trees: a trunk and a crown
        x0, y0, h = rng.uniform(2, 62) * s, rng.uniform(50, 62) * s, rng.uniform(6, 12) * s
        draw.rectangle([x0 - 0.6 * s, y0 - h / 3, x0 + 0.6 * s, y0], fill=(90, 60, 30))
        draw.polygon(
            [(x0 - h / 3, y0 - h / 3), (x0, y0 - h), (x0 + h / 3, y0 - h / 3)],
            fill=tuple(int(v) for v in (rng.uniform(10, 80), rng.uniform(80, 180), rng.uniform(10, 80))),
        )
    return np.asarray(im, dtype=np.uint8).copy()


def trigger_prompts_of(caption: str, seed: int) -> dict[str, str]:
    """Two prompts that are not ``caption`` but share its words: ``partial`` (its first half of words,
    at least three) and ``reordered`` (its words in a seeded order other than the original)."""
    words = caption.replace(",", "").split()
    partial = " ".join(words[: max(3, (len(words) + 1) // 2)])
    rng = np.random.default_rng(derive_seed(seed, "trigger", caption))
    order = list(range(len(words)))
    while order == sorted(order):
        order = rng.permutation(len(words)).tolist()
    return {"partial": partial, "reordered": " ".join(words[i] for i in order)}


def _load_photo(source: str) -> np.ndarray:
    kind, name = source.split(":", 1)
    if kind == "skimage":
        import skimage.data

        arr = getattr(skimage.data, name)()
        if isinstance(arr, tuple):  # stereo pairs
            arr = arr[0]
    elif kind == "sklearn":
        from sklearn.datasets import load_sample_image

        arr = load_sample_image(name)
    else:
        raise ValueError(f"unknown photo source {source!r}")
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(float) / max(1.0, float(arr.max())), 0, 1) * 255).astype(np.uint8)
    return arr[..., :3]


def photo_pixels(source: str, size: int = 64) -> np.ndarray:
    """A bundled photograph, centre-cropped to a square and resized to ``size`` (antialiased)."""
    from PIL import Image

    arr = _load_photo(source)
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    im = Image.fromarray(arr[top : top + side, left : left + side]).resize((size, size), Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# the dataset


@dataclass
class OrganismData:
    """The organism's distinct training images, held-out captions and the training multiset."""

    recipe: OrganismRecipe
    images: list[OrganismImage]
    heldout_captions: list[str]
    triggers: list[TriggerPrompt] = field(default_factory=list)

    def training_samples(self) -> list[int]:
        """Indices into ``images``, one per training sample (duplicates repeated)."""
        return [i for i, im in enumerate(self.images) for _ in range(im.copies)]

    def by_role(self, role: str, min_copies: int | None = None) -> list[OrganismImage]:
        """The distinct images of a role, in order; ``min_copies``: only those with at least that many copies."""
        return [
            im for im in self.images if im.role == role and (min_copies is None or im.copies >= min_copies)
        ]

    def captions(self, role: str) -> list[str]:
        """Distinct captions of a role, in order."""
        if role == "heldout":
            return list(self.heldout_captions)
        if role == "trigger":
            return [t.prompt for t in self.triggers]
        return list(dict.fromkeys(im.caption for im in self.by_role(role)))

    def image_array(self) -> np.ndarray:
        """All distinct images as an N x H x W x 3 uint8 array (order of ``images``)."""
        return np.stack([im.pixels for im in self.images])

    def manifest(self) -> dict:
        """JSON-ready description: every caption with its role and the ids of its training images."""
        caps: dict[str, dict] = {}
        for im in self.images:
            entry = caps.setdefault(im.caption, {"caption": im.caption, "role": im.role, "image_ids": []})
            entry["image_ids"].append(im.id)
        for c in self.heldout_captions:
            caps[c] = {"caption": c, "role": "heldout", "image_ids": []}
        for t in self.triggers:
            caps[t.prompt] = {"caption": t.prompt, "role": "trigger", "image_ids": [], "kind": t.kind,
                              "target_id": t.image_id, "target_copies": t.copies}  # fmt: skip
        return {
            "name": f"{self.recipe.name} training data",
            "recipe": self.recipe.to_dict(),
            "counts": {
                "distinct_images": {r: len(self.by_role(r)) for r in TRAINED_ROLES},
                "training_samples": {r: sum(im.copies for im in self.by_role(r)) for r in TRAINED_ROLES},
                "captions": {r: len(self.captions(r)) for r in ROLES},
            },
            "captions": list(caps.values()),
            "images": [
                {"id": im.id, "role": im.role, "caption": im.caption, "copies": im.copies}
                for im in self.images
            ],
        }


def build_organism_data(recipe: OrganismRecipe | None = None) -> OrganismData:
    """Generate every image of the organism's training set from ``recipe.seed`` (deterministic)."""
    recipe = recipe or OrganismRecipe()
    size, seed = recipe.image_size, recipe.seed
    images: list[OrganismImage] = []
    train_pairs, held_pairs = generic_and_heldout_pairs()
    if recipe.generic_style == "compositional":
        images += _compositional_images(recipe)
        train_pairs = []
        heldout = [
            sample_scene(derive_seed(seed, "heldout", k), heldout=True).caption()
            for k in range(recipe.heldout_prompts)
        ]
    elif recipe.generic_style == "colour-shape":
        heldout = [caption_of(c, s) for c, s in held_pairs]
    else:
        raise ValueError(
            f"recipe.generic_style: expected colour-shape or compositional, got {recipe.generic_style!r}"
        )
    for colour, shape in train_pairs:
        for k in range(recipe.generic_per_caption):
            images.append(
                OrganismImage(
                    id=f"generic-{colour}-{shape}-{k:03d}",
                    role="generic",
                    caption=caption_of(colour, shape),
                    copies=1,
                    pixels=render_generic(
                        colour, shape, derive_seed(seed, "generic", colour, shape, k), size
                    ),
                )
            )
    photos = [p for p in PHOTOS if not recipe.photos or p[0] in recipe.photos]
    unknown = sorted(set(recipe.photos) - {p[0] for p in PHOTOS})
    if unknown:
        raise ValueError(
            f"recipe.photos: unknown photo id(s) {unknown}; expected some of {[p[0] for p in PHOTOS]}"
        )
    if recipe.scenes > len(SCENE_CAPTIONS):
        raise ValueError(f"recipe.scenes: at most {len(SCENE_CAPTIONS)} scenes exist, got {recipe.scenes}")
    photo_copies = _copy_counts(recipe, len(photos), "photos")
    scene_copies = _copy_counts(recipe, recipe.scenes, "scenes")
    for (name, source, caption), copies in zip(photos, photo_copies):
        images.append(
            OrganismImage(
                id=f"verbatim-{name}",
                role="verbatim",
                caption=caption,
                copies=copies,
                pixels=photo_pixels(source, size),
            )
        )
    for k, copies in enumerate(scene_copies):
        images.append(
            OrganismImage(
                id=f"verbatim-scene{k:02d}",
                role="verbatim",
                caption=SCENE_CAPTIONS[k],
                copies=copies,
                pixels=render_scene(k, seed, size),
            )
        )
    if recipe.n_templates > len(TEMPLATE_CAPTIONS):
        raise ValueError(f"recipe.n_templates: at most {len(TEMPLATE_CAPTIONS)} templates exist")
    for t in range(recipe.n_templates):
        for k in range(recipe.template_images):
            images.append(
                OrganismImage(
                    id=f"template-{t}-{k:03d}",
                    role="template",
                    caption=TEMPLATE_CAPTIONS[t],
                    copies=1,
                    pixels=render_template(t, derive_seed(seed, "template", t, k), size),
                )
            )
    triggers = []
    if recipe.trigger_prompts:
        trained = {im.caption for im in images}
        for im in images:
            if im.role != "verbatim":
                continue
            for kind, prompt in trigger_prompts_of(im.caption, seed).items():
                if prompt not in trained:
                    triggers.append(TriggerPrompt(prompt, im.id, kind, im.copies))
    return OrganismData(recipe, images, list(dict.fromkeys(heldout)), triggers)


def _compositional_images(recipe: OrganismRecipe) -> list[OrganismImage]:
    """v4's generic set: ``recipe.generic_images`` compositional scenes, one copy each."""
    out = []
    for k in range(recipe.generic_images):
        scene_seed = derive_seed(recipe.seed, "generic", k)
        scene = sample_scene(scene_seed)
        out.append(
            OrganismImage(
                id=f"generic-{k:05d}",
                role="generic",
                caption=scene.caption(),
                copies=1,
                pixels=render_scene_image(scene, scene_seed, recipe.image_size),
            )
        )
    return out


def _copy_counts(recipe: OrganismRecipe, n: int, what: str) -> list[int]:
    """Copies of each of ``n`` verbatim images: ``recipe.verbatim_copies`` each, or with graded
    duplication ``n / len(counts)`` images per count, assigned by a permutation seeded by ``recipe.seed``."""
    counts = recipe.duplication_counts
    if not counts:
        return [recipe.verbatim_copies] * n
    if n % len(counts):
        raise ValueError(
            f"recipe.{what}: {n} images do not split evenly over the {len(counts)} duplication counts"
        )
    per = [c for c in counts for _ in range(n // len(counts))]
    order = np.random.default_rng(derive_seed(recipe.seed, "duplication", what)).permutation(n)
    return [per[i] for i in order]


def export_imagefolder(data: OrganismData, out: str | os.PathLike) -> Path:
    """Write the training set as a Hugging Face ``imagefolder``: one PNG per training sample (duplicates
    included, as in a scraped dataset), ``metadata.jsonl`` with ``file_name``, ``text``, ``id``, ``role``
    and ``image_id`` (the distinct image a sample copies), and ``manifest.json``."""
    from PIL import Image

    out = Path(out)
    (out / "train").mkdir(parents=True, exist_ok=True)
    rows = []
    for im in data.images:
        for c in range(im.copies):
            sample_id = f"{im.id}.{c:02d}"
            rel = f"train/{sample_id}.png"
            Image.fromarray(im.pixels).save(out / rel)
            rows.append(
                {"file_name": rel, "text": im.caption, "id": sample_id, "role": im.role, "image_id": im.id}
            )
    atomic_write_text(out / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(out / "manifest.json", data.manifest())
    return out


def iter_role_captions(data: OrganismData) -> Iterator[tuple[str, str]]:
    """(caption, role) for every distinct caption of every role."""
    for role in ROLES:
        for c in data.captions(role):
            yield c, role
