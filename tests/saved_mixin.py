"""One tester mixin for every saved object (:class:`diffmem.saved.SavedObject`), as ``edit_mixin`` is for edits.

A test class provides ``make_object()`` (an object whose every field is set to something other than its
default), ``file_name`` (the one-file form's name, ``x.json`` or ``x.safetensors``) and
``write_legacy(obj, folder)``: the object written by hand in its format-1 layout (what diffmem wrote
before the base), returning the path a user would pass. The mixin checks the folder and the one-file round
trips, that another class, a newer ``format_version``, a missing path and a broken file each give one line
naming the path, and that the format-1 file loads to the same object.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffmem
from diffmem.saved import CONFIG_KEY, SavedObject


def parts_of(obj: SavedObject) -> tuple[dict, dict]:
    """(config, tensors) as the object saves them, JSON-normalised: what equal objects agree on."""
    config, tensors = obj._parts()
    return json.loads(json.dumps(config)), {k: v.detach().cpu() for k, v in tensors.items()}


def assert_same(a: SavedObject, b: SavedObject) -> None:
    assert type(a) is type(b)
    (ca, ta), (cb, tb) = parts_of(a), parts_of(b)
    assert ca == cb
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def edit_config(path: Path, change) -> None:
    """Apply ``change(config)`` to a saved folder's config, a JSON file or a .safetensors file's config."""
    if path.is_dir():
        path = next(p for p in path.iterdir() if p.suffix == ".json")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        config = json.loads(meta[CONFIG_KEY])
        change(config)
        save_file(load_file(str(path)), str(path), metadata={**meta, CONFIG_KEY: json.dumps(config)})
    else:
        config = json.loads(path.read_text())
        change(config)
        path.write_text(json.dumps(config))


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and message, message
    return message


class SavedObjectTesterMixin:
    file_name = "saved.json"

    def make_object(self) -> SavedObject:  # pragma: no cover - overridden
        raise NotImplementedError

    def write_legacy(self, obj: SavedObject, folder: Path) -> Path:  # pragma: no cover - overridden
        raise NotImplementedError

    def other_class(self) -> str:
        """A saved class that is not this one (nor one of its subclasses or bases)."""
        cls = type(self.make_object())
        return next(
            name
            for name, other in sorted(SavedObject._saved_classes.items())
            if not issubclass(other, cls) and not issubclass(cls, other)
        )

    def test_folder_round_trip(self, tmp_path):
        obj = self.make_object()
        assert obj.save_pretrained(tmp_path / "saved") == tmp_path / "saved"
        config = json.loads((tmp_path / "saved" / obj.config_name).read_text())
        assert config["_class_name"] == type(obj).__name__
        assert config["_diffmem_version"] == diffmem.__version__
        assert config["format_version"] == type(obj).format_version
        assert (tmp_path / "saved" / obj.weights_name).is_file() == bool(obj._parts()[1])
        assert_same(type(obj).from_pretrained(tmp_path / "saved"), obj)
        assert [
            p.name for p in (tmp_path / "saved").iterdir() if p.name.startswith(".")
        ] == []  # no temporaries

    def test_file_round_trip(self, tmp_path):
        obj = self.make_object()
        path = obj.save(tmp_path / self.file_name)
        assert path == tmp_path / self.file_name
        assert_same(type(obj).load(path), obj)
        assert_same(type(obj).from_pretrained(path), obj)

    def test_another_class_is_refused_in_one_line(self, tmp_path):
        obj = self.make_object()
        cls, other = type(obj), self.other_class()
        obj.save_pretrained(tmp_path / "saved")
        path = obj.save(tmp_path / self.file_name)
        for target in (tmp_path / "saved", path):
            edit_config(target, lambda c: c.update(_class_name=other))
            with pytest.raises(ValueError) as info:
                cls.from_pretrained(target)
            assert f"holds a {other}, expected a {cls.__name__}" in one_line(info) and str(target) in str(
                info.value
            )
        edit_config(path, lambda c: c.update(_class_name="StableDiffusionPipeline"))
        with pytest.raises(ValueError, match=f"holds a StableDiffusionPipeline, expected a {cls.__name__}"):
            cls.load(path)

    def test_a_newer_format_version_is_refused_in_one_line(self, tmp_path):
        obj = self.make_object()
        newer = type(obj).format_version + 1
        obj.save_pretrained(tmp_path / "saved")
        path = obj.save(tmp_path / self.file_name)
        for target in (tmp_path / "saved", path):
            edit_config(target, lambda c: c.update(format_version=newer, _diffmem_version="9.0"))
            with pytest.raises(ValueError) as info:
                type(obj).from_pretrained(target)
            message = one_line(info)
            assert (
                f"format_version {newer} (written by diffmem 9.0)" in message and "upgrade diffmem" in message
            )
            assert str(target) in message

    def test_missing_and_broken_files_name_the_path(self, tmp_path):
        cls = type(self.make_object())
        with pytest.raises(FileNotFoundError) as info:
            cls.from_pretrained(tmp_path / "nowhere", argument="--thing")
        assert one_line(info).startswith(f"--thing: {tmp_path / 'nowhere'} does not exist")
        (tmp_path / "empty").mkdir()
        with pytest.raises(FileNotFoundError) as info:
            cls.from_pretrained(tmp_path / "empty")
        assert f"no {cls.config_name} there" in one_line(info)
        (tmp_path / "empty" / cls.config_name).write_text("{")
        with pytest.raises(ValueError, match="not valid JSON") as info:
            cls.from_pretrained(tmp_path / "empty")
        one_line(info)
        bad = tmp_path / self.file_name
        bad.write_bytes(b"\x80\x04 not a diffmem file")
        with pytest.raises(ValueError) as info:
            cls.load(bad, "--thing")
        assert one_line(info).startswith(f"--thing: {bad}")

    def test_the_format_1_file_loads(self, tmp_path):
        obj = self.make_object()
        path = self.write_legacy(obj, tmp_path)
        assert_same(type(obj).load(path), obj)
