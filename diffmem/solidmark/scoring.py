"""Score a keyed dataset: outpaint every image's key region, compare the mean generated key with the true one.

The loop is resumable: results go to ``OUT/shards/*.jsonl`` one batch per file, each written
atomically; a rerun with the same settings skips the (image, generation) pairs already done, so it
can be interrupted at any point. Generations are seeded from (seed, image id, generation index), so
results do not depend on the batch size or on what was done before a resume.

The model is abstracted as an *outpainter*: ``outpaint(images, mask, prompts, noise_keys) -> images``,
pixel tensors ``(B, 3, H, W)`` in [0, 1]; ``noise_keys[b]`` is ``(seed, image id, generation)``, the key
of image ``b``'s noise in the one keyed draw (:func:`diffmem.generation.keyed_noise`, the draw of every
generation path). :func:`pipeline_outpainter` makes one from a
:class:`~diffmem.pipelines.SolidMarkOutpaintPipeline` (initial noise drawn from the keys, handed to it as
``latents``) with optional edits (mitigations) applied to the UNet for the duration of every call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.edits import applied
from diffmem.generation import keyed_noise, latent_shape
from diffmem.io import atomic_save_tensors, atomic_write, atomic_write_json, atomic_write_text
from diffmem.scores.solidmark import frame_distance_map, key_distance, predicted_keys
from diffmem.seeding import derive_seed
from diffmem.solidmark.keys import key_mask
from diffmem.solidmark.manifest import KeyManifest

#: A noise key ``(seed, image id, generation)``: the outpainted image's noise is ``keyed_noise``'s draw for it.
NoiseKeys = list[tuple]
Outpainter = Callable[[torch.Tensor, torch.Tensor, list[str], NoiseKeys], torch.Tensor]

RUN_FILE = "run.json"
SHARDS = "shards"


@dataclass
class ScoreItem:
    """One keyed image to score: id, training caption, ``H x W x 3`` uint8 pixels, extra columns."""

    id: str
    caption: str
    image: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoreSettings:
    """Everything a result depends on besides the model; a resumed run must use the same."""

    steps: int = 100
    guidance_scale: float = 3.0
    seed: int = 0
    generations: int = 1
    save_maps: bool = False
    save_images: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------ edits


@contextlib.contextmanager
def edits_applied(unet: torch.nn.Module, edits: Sequence[Any] = ()) -> Iterator[torch.nn.Module]:
    """Apply every edit to ``unet`` for the ``with`` block, then restore it.

    An edit is either a diffmem edit (an object with ``weight_multipliers``, e.g. a
    :class:`~diffmem.edits.NeuronSet` or a pruning weight mask: applied with
    :func:`diffmem.edits.applied`, checked against the model's fingerprint) or any callable
    ``edit(unet)`` returning a context manager that applies it.
    """
    with contextlib.ExitStack() as stack:
        for edit in edits:
            if hasattr(edit, "weight_multipliers"):
                stack.enter_context(applied(unet, edit))
            elif callable(edit):
                stack.enter_context(edit(unet))
            else:
                raise TypeError(
                    f"{type(edit).__name__} is not an edit: expected an object with weight_multipliers "
                    "(NeuronSet, weight mask) or a callable unet -> context manager"
                )
        yield unet


def describe_edit(edit: Any) -> str:
    """A short description of an edit for the run record."""
    if hasattr(edit, "to_dict"):
        digest = hashlib.sha256(json.dumps(edit.to_dict(), sort_keys=True, default=str).encode()).hexdigest()
        size = f", {len(edit)} units" if hasattr(edit, "__len__") else ""
        return f"{type(edit).__name__}(sha256 {digest[:12]}{size})"
    return getattr(edit, "__name__", None) or type(edit).__name__


def pipeline_outpainter(
    pipe,
    steps: int = 100,
    guidance_scale: float = 3.0,
    edits: Sequence[Any] = (),
    prompt_mitigation: Callable[..., dict] | None = None,
    **call_kwargs: Any,
) -> Outpainter:
    """An outpainter from a ``SolidMarkOutpaintPipeline``.

    Image ``b`` starts from ``keyed_noise``'s draw for ``noise_keys[b]`` (passed as the pipeline's
    ``latents``; the generators that drew it follow as ``generator``, for a stochastic sampler's steps).
    ``edits`` are applied to its UNet during each call; ``prompt_mitigation(pipe, prompts, noise_keys)``
    (see :mod:`diffmem.solidmark.mitigations`) returns the embeddings the call uses instead of the prompts.
    """

    def outpaint(images, mask, prompts, noise_keys):
        height, width = images.shape[-2:]
        noise, generators = keyed_noise(latent_shape(pipe, height, width), list(noise_keys))
        with edits_applied(pipe.unet, edits):
            extra = dict(prompt=list(prompts))
            if prompt_mitigation is not None:
                extra = prompt_mitigation(pipe, list(prompts), list(noise_keys))
            out = pipe(
                **extra,
                image=images,
                mask=mask,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                latents=noise,
                generator=generators,
                output_type="pt",
                **call_kwargs,
            )
        return out.images.float().cpu()

    return outpaint


def randomize_unet(pipe, seed: int = 0):
    """Replace ``pipe.unet`` by the same architecture freshly initialized (seeded): SolidMark's untrained baseline."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    fresh = UNet2DConditionModel.from_config(pipe.unet.config)
    pipe.unet = fresh.to(device=pipe.unet.device, dtype=pipe.unet.dtype).eval()
    return pipe


# ------------------------------------------------------------------------------------------ run


def _shard_name(units: Sequence[tuple[str, int]]) -> str:
    h = hashlib.sha256(json.dumps(list(units)).encode()).hexdigest()[:16]
    return f"{h}.jsonl"


def read_rows(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All result rows of a run folder (every shard), in no particular order."""
    rows = []
    for path in sorted((Path(out_dir) / SHARDS).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def _check_run_record(out: Path, record: dict[str, Any]) -> None:
    """Refuse to mix results of other settings into ``out``; the number of generations may change
    (every generation is seeded by its own index, so more of them extend the run and fewer select)."""
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))

        def comparable(r: dict) -> dict:
            return {**r, "settings": {k: v for k, v in r.get("settings", {}).items() if k != "generations"}}

        old, new = comparable(old), comparable(record)
        diffs = [k for k in new if k != "progress" and old.get(k) != new[k]]
        if diffs:
            raise ValueError(
                f"--out: {out} holds a run with other settings ({', '.join(diffs)} differ); "
                "use another --out folder or the same settings to resume"
            )
    atomic_write_json(path, record)


def score_items(
    outpaint: Outpainter,
    manifest: KeyManifest,
    items: Sequence[ScoreItem],
    out_dir: str | os.PathLike,
    settings: ScoreSettings | None = None,
    batch_size: int = 4,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Outpaint and score every (item, generation) not yet in ``out_dir``; return all rows of the run.

    Row fields: ``id``, ``generation``, ``seed``, ``caption``, ``group``, ``key``, ``frame_key``,
    ``predicted_key``, ``distance`` (``|predicted_key - frame_key|``, in the manifest's value space),
    ``pixel_distance`` (mean per-pixel ``|x - frame_key|`` over the key region), ``copies`` (images of
    the dataset with the same pixels) and ``nearest_copy_distance`` (distance to the nearest key among
    those copies: the paper's duplication measure when every copy has a fresh key; its chance rate
    grows with ``copies``, about ``1 - (1 - 2*delta)**copies``), and the items' extra columns. Items must already be checked against the manifest (:func:`check_keyed_dataset`).
    """
    settings = settings or ScoreSettings()
    out = Path(out_dir)
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    record = {
        "manifest": {k: v for k, v in manifest.to_dict().items() if k != "images"},
        # what the results depend on (saving maps or images does not change them)
        "settings": {k: v for k, v in settings.to_dict().items() if k not in ("save_maps", "save_images")},
        **(run_info or {}),
    }
    _check_run_record(out, record)
    table = manifest.by_id()
    copy_keys: dict[str, list[float]] = {}
    for e in manifest.entries:
        copy_keys.setdefault(e.group or e.id, []).append(e.frame_key)
    done = {(r["id"], int(r["generation"])) for r in read_rows(out)}
    by_id = {it.id: it for it in items}
    units = [(it.id, g) for it in items for g in range(settings.generations)]
    pending = [u for u in units if u not in done]
    space = manifest.value_space
    bar = tqdm(
        total=len(units),
        initial=len(units) - len(pending),
        desc="solidmark",
        unit="gen",
        disable=not progress,
    )
    for start in range(0, len(pending), batch_size):
        batch = pending[start : start + batch_size]
        sizes = {by_id[i].image.shape for i, _ in batch}
        if len(sizes) > 1:  # differently sized images: one call per size
            groups: dict[tuple, list] = {}
            for u in batch:
                groups.setdefault(by_id[u[0]].image.shape, []).append(u)
            sub_batches = list(groups.values())
        else:
            sub_batches = [batch]
        rows, maps, gens = [], {}, {}
        for sub in sub_batches:
            imgs = (
                torch.from_numpy(np.stack([by_id[i].image for i, _ in sub])).permute(0, 3, 1, 2).float() / 255
            )
            h, w = imgs.shape[-2:]
            mask = key_mask(h, w, manifest.frame_width, manifest.pattern)  # type: ignore[arg-type]
            noise_keys = [(settings.seed, i, g) for i, g in sub]
            generated = outpaint(imgs, mask, [by_id[i].caption for i, _ in sub], noise_keys)
            if tuple(generated.shape) != tuple(imgs.shape):
                raise RuntimeError(
                    f"the outpainter returned shape {tuple(generated.shape)} for {tuple(imgs.shape)}"
                )
            k_hat = predicted_keys(generated, mask, space).double().numpy()  # type: ignore[arg-type]
            keys = torch.tensor([table[i].frame_key for i, _ in sub], dtype=torch.float32)
            dmap = frame_distance_map(generated, keys, mask, space)  # type: ignore[arg-type]
            pixel_d = (dmap.sum(dim=(1, 2)) / mask.sum()).double().numpy()
            dist = key_distance(k_hat, keys.double().numpy())
            for j, (i, g) in enumerate(sub):
                e = table[i]
                rows.append(
                    {
                        "id": i,
                        "generation": g,
                        "seed": derive_seed(settings.seed, i, g),
                        "caption": by_id[i].caption,
                        "group": e.group,
                        "key": e.key,
                        "frame_key": e.frame_key,
                        "predicted_key": float(k_hat[j]),
                        "distance": float(dist[j]),
                        "pixel_distance": float(pixel_d[j]),
                        "copies": len(copy_keys[e.group or e.id]),
                        "nearest_copy_distance": float(
                            np.min(np.abs(np.array(copy_keys[e.group or e.id]) - k_hat[j]))
                        ),
                        **{
                            k: v for k, v in by_id[i].extra.items() if k not in ("file_name", "solidmark_key")
                        },
                    }
                )
                if settings.save_maps:
                    maps[f"{i}#{g}"] = dmap[j].half()
                if settings.save_images:
                    gens[(i, g)] = generated[j]
        name = _shard_name(batch)
        if settings.save_maps:
            atomic_save_tensors(out / "maps" / name.replace(".jsonl", ".safetensors"), maps)
        if settings.save_images:
            _save_images(out / "images", gens)
        atomic_write_text(out / SHARDS / name, "".join(json.dumps(r) + "\n" for r in rows))
        bar.update(len(batch))
    bar.close()
    return read_rows(out)


def _save_images(folder: Path, generated: dict[tuple[str, int], torch.Tensor]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for (i, g), x in generated.items():
        arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        im = Image.fromarray(arr)
        atomic_write(folder / image_file_name(i, g), lambda tmp, im=im: im.save(tmp, format="PNG"))


def image_file_name(image_id: str, generation: int) -> str:
    """File name of a saved generation (ids may hold any character, so they are hashed)."""
    return f"{hashlib.sha256(image_id.encode()).hexdigest()[:16]}-{generation}.png"
