"""One tester mixin for every edit type (``NeuronSet``, ``WeightMask``): folders, loading into a pipeline, refusal.

A test class provides ``make_edit(unet)`` (an edit of ``unet`` that visibly changes its output). The
mixin checks the folder round trip (``save_pretrained`` / ``Edit.from_pretrained``), that
``pipe.load_edit`` gives exactly the output of ``diffmem.edits.applied`` and ``unload_edit`` restores
every weight bit for bit, and that the edit is refused on another model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffmem.tiny import TinySDConfig, build_tiny_pipeline


class EditTesterMixin:
    def make_edit(self, unet):  # pragma: no cover - overridden
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def pipe(self):
        from diffmem.pipelines import StableDiffusionMemGuardPipeline

        pipe = build_tiny_pipeline(
            TinySDConfig(variant="sd1"), seed=0, pipeline_class=StableDiffusionMemGuardPipeline
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def generate(pipe):
        return pipe(
            "a red circle",
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    def test_folder_round_trip(self, pipe, tmp_path):
        from diffmem.edits import Edit, load_edit

        edit = self.make_edit(pipe.unet)
        edit.save_pretrained(tmp_path / "edit")
        config = json.loads((tmp_path / "edit" / "edit_config.json").read_text())
        assert config["_class_name"] == type(edit).__name__ and config["format_version"] == 2
        # tensors (a WeightMask's masks) go to edit.safetensors; a NeuronSet is all JSON
        assert (tmp_path / "edit" / "edit.safetensors").is_file() == bool(edit._parts()[1])
        for loaded in (
            Edit.from_pretrained(tmp_path / "edit"),
            type(edit).from_pretrained(tmp_path / "edit"),
        ):
            assert type(loaded) is type(edit)
            assert loaded.to_dict() == edit.to_dict()
        assert load_edit(tmp_path / "edit").to_dict() == edit.to_dict()

    def test_load_edit_equals_applied_and_unload_restores(self, pipe, tmp_path):
        from diffmem.edits import applied

        edit = self.make_edit(pipe.unet)
        state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        plain = self.generate(pipe)
        with applied(pipe.unet, edit):
            expected = self.generate(pipe)
        assert not np.array_equal(expected, plain), "the edit changes nothing, so this test checks nothing"
        edit.save_pretrained(tmp_path / "edit")
        pipe.load_edit(tmp_path / "edit")
        try:
            assert pipe.active_edit is not None
            np.testing.assert_array_equal(self.generate(pipe), expected)
            np.testing.assert_array_equal(self.generate(pipe), expected)  # stays for every call
            with pytest.raises(ValueError, match="loaded already"):
                pipe.load_edit(edit)
        finally:
            pipe.unload_edit()
        assert pipe.active_edit is None
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())
        np.testing.assert_array_equal(self.generate(pipe), plain)

    def test_refused_on_another_model(self, pipe, tmp_path):
        from diffmem.fingerprint import FingerprintMismatchError

        other = build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=7).unet
        edit = self.make_edit(other)
        state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        with pytest.raises(FingerprintMismatchError, match="fingerprint"):
            pipe.load_edit(edit)
        assert pipe.active_edit is None
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())

    def test_bad_folder_names_the_file(self, pipe, tmp_path):
        from diffmem.edits import Edit

        edit = self.make_edit(pipe.unet)
        edit.save_pretrained(tmp_path / "edit")
        with pytest.raises(FileNotFoundError, match="no edit_config.json there"):
            Edit.from_pretrained(tmp_path)
        (tmp_path / "edit" / "edit.safetensors").write_bytes(b"not safetensors")
        with pytest.raises(ValueError, match="edit.safetensors is not a safetensors file"):
            Edit.from_pretrained(tmp_path / "edit")
        (tmp_path / "edit" / "edit_config.json").write_text("{")
        with pytest.raises(ValueError, match="edit_config.json: not valid JSON"):
            Edit.from_pretrained(tmp_path / "edit")
