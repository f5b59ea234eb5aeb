"""The rows of a dataset as diffmem reads them: a usable ``Record`` or a ``BadRow`` with its reason."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Why a row was set aside. Keys are the ``reason`` of a ``BadRow``.
REASONS = {
    "malformed_row": "the line of the metadata file cannot be parsed",
    "missing_id": "the row has no id",
    "duplicate_id": "the id appeared on an earlier row (the first one is kept)",
    "empty_caption": "the caption is missing or only whitespace",
    "missing_image_path": "the row names no image file",
    "missing_file": "the image file does not exist",
    "corrupt_image": "the file is not a readable image",
    "truncated_image": "the image file ends before its data does",
    "cmyk_image": "CMYK image (colours would change on conversion; pass convert_modes=True to convert)",
    "high_bit_depth": "16-bit or float image (pass convert_modes=True to scale it to 8 bits)",
    "unsupported_mode": "an image mode that has no faithful RGB conversion",
    "too_large": "the image exceeds PIL's decompression-bomb limit",
}

ID_COLUMNS = ("id", "key", "image_id", "sample_id")
CAPTION_COLUMNS = ("caption", "text", "prompt")


@dataclass(frozen=True)
class Record:
    """One usable row: ``image`` is an absolute path, or a member reference into an img2dataset shard
    (``diffmem.shards``; ``load_rgb`` reads both), or ``None`` for caption-only tables."""

    id: str
    caption: str | None  # None only where the reader was told captions are optional (``require_caption``)
    image: Path | None
    row: int  # 0-based position of the row in the source
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadRow:
    """A row set aside, with its reason (a key of ``REASONS``) and a human-readable detail."""

    row: int
    id: str | None
    reason: str
    detail: str
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "source": self.source,
        }


class BadImageError(ValueError):
    """Raised by ``load_rgb``; ``reason`` is a key of ``REASONS``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def pick_column(
    columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, source: str
) -> str | None:
    """The column for ``what``: ``wanted`` (checked to exist) or the first of ``candidates`` present."""
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(f"{source}: no column {wanted!r} for the {what} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    return None


def caption_or_none(value: Any) -> str | None:
    """A caption as text, or ``None`` when it is missing or only whitespace."""
    if value is None or not str(value).strip():
        return None
    return str(value)
