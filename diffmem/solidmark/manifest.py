"""The SolidMark key manifest: which key every image of a keyed dataset carries, and how it is drawn.

A JSON file written beside a keyed dataset (:class:`diffmem.saved.SavedObject`'s header, then the fields)::

    {"_class_name": "KeyManifest", "_diffmem_version": "0.1.0", "format_version": 2,
     "pattern": "border", "frame_width": 16, "value_space": "pixel", "seed": 42, "duplicate_keys": "fresh", "bit_depth": 8,
     "images": [{"id": "img-0", "key": 0.6394, "frame_key": 0.6392, "width": 96, "height": 96,
                 "group": "3f2a..."}, ...]}

``key`` is the drawn key in [0, 1); ``frame_key`` the value the 8-bit frame really holds, in the
manifest's ``value_space`` (what scores are measured against); ``group`` the content hash of the
unkeyed image (copies of one image share it); ``width``/``height`` the keyed image's size.
Everything is validated on load and again against the images at scoring time, with errors that
name the file, the image id and what was expected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from diffmem.saved import SavedObject
from diffmem.scores.solidmark import VALUE_SPACES, space_to_pixel
from diffmem.solidmark.keys import LEVELS, PATTERNS, frame_key, key_mask

#: The ``format`` of format-1 manifests (before :class:`~diffmem.saved.SavedObject`), read as legacy.
FORMAT = "diffmem.SolidMarkManifest/1"
DUPLICATE_POLICIES = ("fresh", "shared")


@dataclass(frozen=True)
class KeyEntry:
    """One keyed image: its id, drawn key, the key as stored in the frame, keyed size, content group."""

    id: str
    key: float
    frame_key: float
    width: int
    height: int
    group: str = ""


@dataclass
class KeyManifest(SavedObject):
    """Keys of a keyed dataset and the parameters they were drawn with (see the module docstring).

    Saved by :class:`~diffmem.saved.SavedObject`: ``save(file)``, or ``save_pretrained(folder)`` (the
    keyed dataset's folder: ``solidmark_manifest.json`` beside the images); format-1 files still load.
    """

    config_name: ClassVar[str] = "solidmark_manifest.json"
    format_version: ClassVar[int] = 2

    pattern: str
    frame_width: int
    value_space: str
    seed: int
    entries: list[KeyEntry]
    duplicate_keys: str = "fresh"
    bit_depth: int = 8
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------- validation

    def validate(self, source: str = "key manifest") -> None:
        """Raise ``ValueError`` naming ``source`` and the image id for anything inconsistent."""
        if self.pattern not in PATTERNS:
            raise ValueError(f"{source}: pattern must be one of {', '.join(PATTERNS)}, got {self.pattern!r}")
        if self.value_space not in VALUE_SPACES:
            raise ValueError(
                f"{source}: value_space must be one of {', '.join(VALUE_SPACES)}, got {self.value_space!r}"
            )
        if not isinstance(self.frame_width, int) or self.frame_width < 1:
            raise ValueError(f"{source}: frame_width must be a positive integer, got {self.frame_width!r}")
        if self.duplicate_keys not in DUPLICATE_POLICIES:
            raise ValueError(
                f"{source}: duplicate_keys must be 'fresh' or 'shared', got {self.duplicate_keys!r}"
            )
        if self.bit_depth != 8:
            raise ValueError(
                f"{source}: only 8-bit keyed images are supported, got bit_depth {self.bit_depth}"
            )
        seen: set[str] = set()
        for e in self.entries:
            if not e.id:
                raise ValueError(f"{source}: an image has an empty id")
            if e.id in seen:
                raise ValueError(f"{source}: image id {e.id!r} appears twice")
            seen.add(e.id)
            if not (isinstance(e.key, (int, float)) and math.isfinite(e.key) and 0.0 <= e.key < 1.0):
                raise ValueError(f"{source}: image {e.id!r} has key {e.key!r}, outside [0, 1)")
            expected = frame_key(e.key, self.value_space)  # type: ignore[arg-type]
            if not math.isclose(e.frame_key, expected, abs_tol=1e-9):
                raise ValueError(
                    f"{source}: image {e.id!r} has frame_key {e.frame_key!r} but its key {e.key!r} is drawn "
                    f"as {expected!r} in the {self.value_space} value space"
                )
            smallest = (4 if self.pattern == "border" else 2) * self.frame_width
            if min(e.width, e.height) < smallest:
                raise ValueError(
                    f"{source}: image {e.id!r} is {e.width}x{e.height} px, too small for a "
                    f"{self.frame_width}-px {self.pattern} key (its content must be at least twice the frame width)"
                )

    # ----------------------------------------------------------------------------------- access

    @property
    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def by_id(self) -> dict[str, KeyEntry]:
        return {e.id: e for e in self.entries}

    def frame_keys(self, ids: Sequence[str] | None = None) -> np.ndarray:
        table = self.by_id()
        return np.array(
            [table[i].frame_key for i in (ids if ids is not None else self.ids)], dtype=np.float64
        )

    # ----------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "pattern": self.pattern,
            "frame_width": self.frame_width,
            "value_space": self.value_space,
            "seed": self.seed,
            "duplicate_keys": self.duplicate_keys,
            "bit_depth": self.bit_depth,
            "info": self.info,
            "images": [asdict(e) for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "key manifest") -> KeyManifest:
        """The manifest from :meth:`to_dict`'s dictionary (a format-1 manifest file holds exactly that)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{source}: not a SolidMark key manifest (expected "format": "{FORMAT}")')
        return cls._from_fields(data, source)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], source: str) -> KeyManifest:
        missing = [k for k in ("pattern", "frame_width", "value_space", "seed", "images") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        entries = []
        for i, row in enumerate(data["images"]):
            try:
                entries.append(
                    KeyEntry(
                        id=str(row["id"]),
                        key=float(row["key"]),
                        frame_key=float(row["frame_key"]),
                        width=int(row["width"]),
                        height=int(row["height"]),
                        group=str(row.get("group", "")),
                    )
                )
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{source}: image entry {i} is malformed ({err!r})") from err
        manifest = cls.__new__(cls)
        manifest.pattern = data["pattern"]
        manifest.frame_width = data["frame_width"]
        manifest.value_space = data["value_space"]
        manifest.seed = int(data["seed"])
        manifest.entries = entries
        manifest.duplicate_keys = data.get("duplicate_keys", "fresh")
        manifest.bit_depth = int(data.get("bit_depth", 8))
        manifest.info = dict(data.get("info", {}))
        manifest.validate(source)
        return manifest

    def _parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return {k: v for k, v in self.to_dict().items() if k != "format"}, {}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, Any], source: str) -> KeyManifest:
        return cls._from_fields(config, source)

    @classmethod
    def _from_legacy(cls, config: dict[str, Any], tensors: dict[str, Any], source: str) -> KeyManifest:
        """Format 1: :meth:`to_dict`'s dictionary, with ``"format": "diffmem.SolidMarkManifest/1"``."""
        return cls.from_dict(config, source)

    @classmethod
    def load(cls, path: str | os.PathLike, argument: str | None = "--manifest") -> KeyManifest:
        """:meth:`from_pretrained` (the manifest file or the keyed dataset's folder), errors naming ``--manifest``."""
        return cls.from_pretrained(path, argument)


# --------------------------------------------------------------------------------------------- checks


def check_ids(manifest: KeyManifest, dataset_ids: Iterable[str], source: str = "--data") -> None:
    """Raise ``ValueError`` unless the dataset and the manifest hold exactly the same image ids."""
    data_ids = list(dataset_ids)
    have, want = set(data_ids), set(manifest.ids)
    extra, missing = sorted(have - want), sorted(want - have)
    if extra or missing:
        parts = []
        if extra:
            parts.append(
                f"{len(extra)} image(s) of the dataset have no key in the manifest (e.g. {extra[:5]})"
            )
        if missing:
            parts.append(f"{len(missing)} manifest key(s) have no image in the dataset (e.g. {missing[:5]})")
        raise ValueError(f"{source}: the key manifest does not match this dataset: " + "; ".join(parts))


def check_keyed_image(manifest: KeyManifest, entry: KeyEntry, image: np.ndarray) -> bool:
    """Check that an ``H x W x 3`` uint8 keyed image carries ``entry``'s key as the manifest describes.

    Raises ``ValueError`` naming the image for a wrong size, a frame that is not solid over the
    manifest's frame width, or a frame that holds the key in the other value space. Returns whether
    the pixels just inside the key region hold the key too (a hint that the frame is wider than
    the manifest says; :func:`check_keyed_dataset` raises when that holds for every image).
    """
    h, w = image.shape[:2]
    if (w, h) != (entry.width, entry.height):
        raise ValueError(
            f"image {entry.id!r} is {w}x{h} px but the manifest says {entry.width}x{entry.height} "
            "(is this the keyed dataset the manifest was written with?)"
        )
    mask = key_mask(h, w, manifest.frame_width, manifest.pattern).numpy()  # type: ignore[arg-type]
    level = round(LEVELS * float(space_to_pixel(entry.frame_key, manifest.value_space)))  # type: ignore[arg-type]
    region = image[mask].astype(np.int16)
    if np.all(np.abs(region - level) <= 1):
        wider = _key_region(h, w, manifest.frame_width + 1, manifest.pattern)
        return wider is not None and bool(np.all(np.abs(image[wider].astype(np.int16) - level) <= 1))
    other = "model" if manifest.value_space == "pixel" else "pixel"
    other_level = round(LEVELS * float(space_to_pixel(entry.frame_key, other)))  # type: ignore[arg-type]
    if np.all(np.abs(region - other_level) <= 1):
        raise ValueError(
            f"image {entry.id!r}: its frame holds the key in the {other} value space but the manifest says "
            f"{manifest.value_space} (grey level {other_level}, expected {level})"
        )
    outer = key_mask(h, w, 1, "border").numpy() if manifest.pattern == "border" else None
    if outer is not None and np.all(np.abs(image[outer].astype(np.int16) - level) <= 1):
        raise ValueError(
            f"image {entry.id!r}: the outer pixels hold the key but the frame is narrower than the manifest's "
            f"frame width of {manifest.frame_width} px"
        )
    raise ValueError(
        f"image {entry.id!r}: its {manifest.pattern} key region ({manifest.frame_width} px) is not the solid grey "
        f"level {level} of key {entry.frame_key:.4f}: this image was not keyed with this manifest"
    )


def _key_region(h: int, w: int, frame_width: int, pattern: str) -> np.ndarray | None:
    try:
        return key_mask(h, w, frame_width, pattern).numpy()  # type: ignore[arg-type]
    except ValueError:
        return None


def check_keyed_dataset(manifest: KeyManifest, images: Iterable[tuple[str, np.ndarray]]) -> None:
    """Check every ``(id, image)`` with :func:`check_keyed_image`; also refuse frames wider than the manifest's."""
    table = manifest.by_id()
    n = wider = 0
    for image_id, image in images:
        n += 1
        wider += check_keyed_image(manifest, table[image_id], image)
    if n and wider == n:
        raise ValueError(
            f"every image's key region is wider than the manifest's frame width of {manifest.frame_width} px: "
            "the dataset was keyed with a wider frame than this manifest says"
        )
