"""One base for every object diffmem saves (edits, statistics, manifests, the calibration), in diffusers'
``ConfigMixin`` style.

A :class:`SavedObject` subclass names its files (``config_name``, ``weights_name``) and its
``format_version``, and says only how it becomes a JSON config and tensors and back (``_parts`` /
``_from_parts``). The base writes and reads it two ways:

* a folder (``save_pretrained`` / ``from_pretrained``): ``config_name`` (JSON: ``_class_name``,
  ``_diffmem_version``, ``format_version`` and the config) and, when the object has tensors,
  ``weights_name`` (safetensors);
* one file (``save`` / ``load``, what the CLI's file arguments take): the same JSON, or, for an object
  with tensors, a ``.safetensors`` file whose metadata ``diffmem_config`` holds that JSON (read by its
  content, whatever its name).

Every file is written atomically and no pickle is read. ``from_pretrained`` takes either form, checks
the class (a subclass named in the file is returned: ``Edit.from_pretrained`` gives a ``NeuronSet``) and
refuses a newer ``format_version`` with one line naming the file. Files of an older format (every
diffmem file from before this base: they carry no ``format_version``) go to ``_from_legacy``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import diffmem
from diffmem.io import atomic_save_tensors, atomic_write_json, read_safetensors

if TYPE_CHECKING:
    import torch

#: The metadata key of a one-file ``.safetensors`` save that holds the config JSON.
CONFIG_KEY = "diffmem_config"
#: The keys the base adds to every config.
HEADER = ("_class_name", "_diffmem_version", "format_version")

S = TypeVar("S", bound="SavedObject")


class SavedObject:
    """Mixin for objects saved to disk; see the module docstring."""

    #: JSON file name inside a saved folder.
    config_name: ClassVar[str]
    #: safetensors file name inside a saved folder (written only when the object has tensors).
    weights_name: ClassVar[str] = "diffmem_tensors.safetensors"
    #: the version this class writes; newer files are refused, older ones read by ``_from_legacy``.
    format_version: ClassVar[int] = 1

    _saved_classes: ClassVar[dict[str, type[SavedObject]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SavedObject._saved_classes[cls.__name__] = cls

    # ----------------------------------------------------------------------------------- the protocol
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able config, tensors) that :meth:`_from_parts` turns back into the object."""
        raise NotImplementedError

    @classmethod
    def _from_parts(cls: type[S], config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> S:
        """The object from a config of the current ``format_version`` (header removed) and its tensors."""
        raise NotImplementedError

    @classmethod
    def _from_legacy(
        cls: type[S], config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
    ) -> S:
        """The object from a file of an older format: ``config`` is its JSON (or its safetensors metadata)."""
        raise ValueError(
            f"{source}: not a diffmem {cls.__name__} file (no format_version; expected what "
            f"{cls.__name__}.save or .save_pretrained writes)"
        )

    # ----------------------------------------------------------------------------------- writing
    def _config_and_tensors(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config, tensors = self._parts()
        header = {
            "_class_name": type(self).__name__,
            "_diffmem_version": diffmem.__version__,
            "format_version": self.format_version,
        }
        return {**header, **config}, tensors

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the object as a folder: ``config_name`` and, with tensors, ``weights_name``; each atomically."""
        folder = Path(save_directory)
        config, tensors = self._config_and_tensors()
        if tensors:
            meta = {"_class_name": config["_class_name"], "format_version": str(self.format_version)}
            atomic_save_tensors(folder / self.weights_name, tensors, meta)
        atomic_write_json(folder / self.config_name, config)
        return folder

    def save(self, path: str | os.PathLike) -> Path:
        """Write the object as one file, atomically: ``.safetensors`` (config in the metadata) or JSON.

        An object with tensors must go to a ``.safetensors`` path (``ValueError`` otherwise).
        """
        path = Path(path)
        config, tensors = self._config_and_tensors()
        if path.suffix == ".safetensors":
            return atomic_save_tensors(path, tensors, {CONFIG_KEY: json.dumps(config)})
        if tensors:
            raise ValueError(
                f"{path}: a {type(self).__name__} holds tensors; save it to a .safetensors file or a folder"
            )
        return atomic_write_json(path, config)

    # ----------------------------------------------------------------------------------- reading
    @classmethod
    def from_pretrained(cls: type[S], pretrained_path: str | os.PathLike, argument: str | None = None) -> S:
        """Read a folder written by :meth:`save_pretrained` or a file written by :meth:`save` (or an older one).

        Errors are one line naming ``argument`` (when given) and the path: ``FileNotFoundError`` for a
        missing path, ``ValueError`` for another class, a newer ``format_version`` or a broken file.
        """
        path = Path(pretrained_path)
        source = f"{argument}: {path}" if argument else str(path)
        expected = f"a {cls.__name__} folder or file"
        if path.is_dir():
            config_path = path / cls.config_name
            if not config_path.is_file():
                raise FileNotFoundError(f"{source}: no {cls.config_name} there (expected {expected})")
            source = f"{argument}: {config_path}" if argument else str(config_path)
            config = _read_json(config_path, source, cls)
            weights = path / cls.weights_name
            tensors = read_safetensors(weights, argument or "", "")[0] if weights.is_file() else {}
        elif path.is_file():
            if _is_safetensors(path):
                tensors, meta = read_safetensors(path, argument or "", "")
                try:
                    config = json.loads(meta[CONFIG_KEY]) if CONFIG_KEY in meta else dict(meta)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{source}: its {CONFIG_KEY} metadata is not valid JSON ({err})"
                    ) from None
            else:
                config, tensors = _read_json(path, source, cls), {}
        else:
            raise FileNotFoundError(f"{source} does not exist (expected {expected})")
        return cls._from_config(config, tensors, source)

    @classmethod
    def load(cls: type[S], path: str | os.PathLike, argument: str | None = None) -> S:
        """:meth:`from_pretrained` under the name the single-file callers use."""
        return cls.from_pretrained(path, argument)

    @classmethod
    def _from_config(
        cls: type[S], config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
    ) -> S:
        """Check the header (class, format version) and build the object of the class the file names."""
        name = config.get("_class_name")
        target: type[SavedObject] = cls
        if name is not None:
            found = SavedObject._saved_classes.get(str(name))
            if found is None or not issubclass(found, cls):
                raise ValueError(f"{source}: holds a {name}, expected a {cls.__name__}")
            target = found
        version = config.get("format_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
            raise ValueError(f"{source}: format_version must be an integer, got {version!r}")
        if version is not None and version > target.format_version:
            raise ValueError(
                f"{source}: {target.__name__} format_version {version} (written by diffmem "
                f"{config.get('_diffmem_version', '?')}) is newer than this diffmem {diffmem.__version__} reads "
                f"({target.format_version}); upgrade diffmem"
            )
        try:
            if version == target.format_version:
                body = {k: v for k, v in config.items() if k not in HEADER}
                return target._from_parts(body, tensors, source)
            return target._from_legacy(config, tensors, source)
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{source}: malformed {target.__name__} ({type(err).__name__}: {err})") from None


def _is_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does (an 8-byte header length that fits, then ``{``);
    a JSON file never does (its first 8 bytes read as a length far beyond any file's size)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return path.suffix == ".safetensors"  # too short or broken: the suffix says what was meant
    return 8 + int.from_bytes(head[:8], "little") <= path.stat().st_size


def _read_json(path: Path, source: str, cls: type) -> dict[str, Any]:
    """A JSON object from ``path``; one line naming ``source`` for a file that is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(
            f"{source}: not a {cls.__name__} (expected diffmem's JSON file or a save_pretrained folder; this file "
            "is not text, e.g. a pickle, which diffmem does not load)"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
    return data
