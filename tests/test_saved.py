"""Every saved object of diffmem under the one tester mixin (``saved_mixin``), and the files they replaced.

Each ``write_legacy`` writes, by hand, the layout diffmem wrote before :class:`diffmem.saved.SavedObject`
(format 1), so these tests fail if an old file stops loading.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from saved_mixin import SavedObjectTesterMixin, assert_same, one_line

from diffmem.edits import Edit, NeuronSet, WeightMask, load_edit
from diffmem.guard.calibration import CALIBRATION_FILE, CalibrationError, GuardCalibration
from diffmem.localize.prune import FFNStats
from diffmem.localize.stats import ValueStats
from diffmem.solidmark.keys import frame_key
from diffmem.solidmark.manifest import KeyEntry, KeyManifest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v", "up_blocks.1.attn2.to_v"]


def _neuron_set() -> NeuronSet:
    return NeuronSet(
        "w2-0123456789abcdef0123",
        list(LAYERS),
        [[7, 2, 11], []],
        prompts=["a cat", "a dog"],
        score_before=[3.5, 2.25],
        score_after=[0.5, None],
        info={"threshold": 0.428, "initial": [1, 2]},
    )


def _weight_mask() -> WeightMask:
    g = torch.Generator().manual_seed(0)
    masks = {
        "mid.ff.net.2": torch.rand(4, 16, generator=g) < 0.3,
        "up.ff.net.2": torch.rand(8, 32, generator=g) < 0.1,
    }
    return WeightMask(masks, "w2-0123456789abcdef0123", {"sparsity": 0.01, "tau": 10})


def _legacy_edit_folder(edit: Edit, folder: Path, config: dict, tensors: dict) -> Path:
    """An edit folder as format 1 wrote it: ``"format": "diffmem.Edit/1"``, every edit's tensors in edit.safetensors."""
    out = folder / "edit-v1"
    out.mkdir()
    header = {"_class_name": type(edit).__name__, "_diffmem_version": "0.1.0", "format": "diffmem.Edit/1"}
    (out / "edit_config.json").write_text(json.dumps({**header, **config}))
    save_file(tensors, str(out / "edit.safetensors"), metadata={"format": "diffmem.Edit/1"})
    return out


class TestNeuronSet(SavedObjectTesterMixin):
    file_name = "union.json"

    def make_object(self):
        return _neuron_set()

    def write_legacy(self, obj, folder):
        data = {
            "format": "diffmem.NeuronSet/1",
            "fingerprint": obj.fingerprint,
            "n_neurons": len(obj),
            "layers": obj.layers,
            "neurons": obj.neurons,
            "prompts": obj.prompts,
            "score_before": obj.score_before,
            "score_after": obj.score_after,
            "info": obj.info,
        }
        (folder / "union.json").write_text(json.dumps(data, indent=2))
        return folder / "union.json"

    def test_the_format_1_edit_folder_loads(self, tmp_path):
        obj = self.make_object()
        config = {k: v for k, v in obj.to_dict().items() if k not in ("format", "neurons")}
        tensors = {name: torch.tensor(idx, dtype=torch.int64) for name, idx in zip(obj.layers, obj.neurons)}
        folder = _legacy_edit_folder(obj, tmp_path, config, tensors)
        for loaded in (Edit.from_pretrained(folder), NeuronSet.from_pretrained(folder), load_edit(folder)):
            assert_same(loaded, obj)

    def test_a_neuron_set_is_all_json(self, tmp_path):
        obj = self.make_object()
        obj.save_pretrained(tmp_path / "edit")
        assert sorted(p.name for p in (tmp_path / "edit").iterdir()) == ["edit_config.json"]
        assert json.loads((tmp_path / "edit" / "edit_config.json").read_text())["neurons"] == [[2, 7, 11], []]


class TestWeightMask(SavedObjectTesterMixin):
    file_name = "weight_mask.safetensors"

    def make_object(self):
        return _weight_mask()

    def write_legacy(self, obj, folder):
        meta = {
            "format": "diffmem.weight_mask/1",
            "fingerprint": obj.fingerprint,
            "params": json.dumps(obj.params),
        }
        save_file(dict(obj.masks), str(folder / "weight_mask.safetensors"), metadata=meta)
        return folder / "weight_mask.safetensors"

    def test_the_format_1_edit_folder_loads(self, tmp_path):
        obj = self.make_object()
        config = {"fingerprint": obj.fingerprint, "params": obj.params, "layers": list(obj.masks)}
        folder = _legacy_edit_folder(obj, tmp_path, config, dict(obj.masks))
        for loaded in (Edit.from_pretrained(folder), WeightMask.from_pretrained(folder), load_edit(folder)):
            assert_same(loaded, obj)

    def test_a_mask_file_is_new_format_and_a_json_path_is_refused(self, tmp_path):
        obj = self.make_object()
        path = obj.save(tmp_path / "m.safetensors")
        assert_same(Edit.from_pretrained(path), obj)  # the class comes from the file
        assert_same(load_edit(path), obj)
        with pytest.raises(ValueError, match="holds tensors; save it to a .safetensors file") as info:
            obj.save(tmp_path / "m.json")
        one_line(info)
        assert not (tmp_path / "m.json").exists()


class TestValueStats(SavedObjectTesterMixin):
    file_name = "stats.safetensors"

    def make_object(self):
        g = torch.Generator().manual_seed(1)
        mean = [torch.rand(8, generator=g), torch.rand(16, generator=g)]
        std = [torch.rand(8, generator=g), torch.rand(16, generator=g)]
        return ValueStats("w2-0123456789abcdef0123", list(LAYERS), mean, std, 50, {"blocks": ["down", "up"]})

    def write_legacy(self, obj, folder):
        tensors = {}
        for i, (mu, sd) in enumerate(zip(obj.mean, obj.std)):
            tensors[f"mean.{i}"], tensors[f"std.{i}"] = mu, sd
        header = {
            "format": "diffmem.ValueStats/1",
            "fingerprint": obj.fingerprint,
            "layers": obj.layers,
            "count": obj.count,
            "info": obj.info,
        }
        save_file(tensors, str(folder / "stats.safetensors"), metadata={"diffmem": json.dumps(header)})
        return folder / "stats.safetensors"


class TestFFNStats(SavedObjectTesterMixin):
    file_name = "ffn_stats_memorized.safetensors"

    def make_object(self):
        g = torch.Generator().manual_seed(2)
        sumsq = {
            "mid.ff.net.2": torch.rand(3, 16, generator=g),
            "up.ff.net.2": torch.rand(3, 32, generator=g),
        }
        return FFNStats(sumsq, 12, {"num_steps": 3, "diffmem_key": {"memorized": ["a", "b"]}})

    def write_legacy(self, obj, folder):
        meta = {
            "format": "diffmem.ffn_stats/1",
            "num_prompts": str(obj.num_prompts),
            "settings": json.dumps(obj.settings),
        }
        save_file(dict(obj.sumsq), str(folder / "ffn.safetensors"), metadata=meta)
        return folder / "ffn.safetensors"


class TestKeyManifest(SavedObjectTesterMixin):
    file_name = "solidmark_manifest.json"

    def make_object(self):
        entries = [
            KeyEntry(f"img{i}", key, frame_key(key, "model"), 64, 48, group=f"g{i // 2}")
            for i, key in enumerate([0.1, 0.55, 0.9])
        ]
        return KeyManifest("border", 4, "model", 7, entries, duplicate_keys="shared", info={"source": "x"})

    def write_legacy(self, obj, folder):
        data = {
            "format": "diffmem.SolidMarkManifest/1",
            "pattern": obj.pattern,
            "frame_width": obj.frame_width,
            "value_space": obj.value_space,
            "seed": obj.seed,
            "duplicate_keys": obj.duplicate_keys,
            "bit_depth": obj.bit_depth,
            "info": obj.info,
            "images": [
                {
                    "id": e.id,
                    "key": e.key,
                    "frame_key": e.frame_key,
                    "width": e.width,
                    "height": e.height,
                    "group": e.group,
                }
                for e in obj.entries
            ],
        }
        (folder / "solidmark_manifest.json").write_text(json.dumps(data, indent=2))
        return folder / "solidmark_manifest.json"

    def test_the_keyed_dataset_folder_is_the_saved_folder(self, tmp_path):
        obj = self.make_object()
        path = obj.save(tmp_path / KeyManifest.config_name)
        assert_same(KeyManifest.from_pretrained(tmp_path), obj)
        assert_same(KeyManifest.load(path), obj)


class TestGuardCalibration(SavedObjectTesterMixin):
    file_name = CALIBRATION_FILE

    def make_object(self):
        return GuardCalibration(
            memorization_threshold=1.25,
            memorization_window=(0, 2),
            num_inference_steps=25,
            scheduler="DDIMScheduler",
            height=64,
            width=64,
            guidance_scale=7.5,
            model_fingerprint="w2-0123456789abcdef0123",
            auc=0.99,
            tpr_at_1pct_fpr=0.9,
            n_positive=10,
            n_negative=12,
            num_gens=4,
            seed=3,
            data="prompts.csv",
            rescaled_from=(128, 128),
            extra={"unit": "image"},
        )

    def write_legacy(self, obj, folder):
        data = {"format": "diffmem.GuardCalibration/1", **obj.to_dict()}
        (folder / CALIBRATION_FILE).write_text(json.dumps(data, indent=2))
        return folder / CALIBRATION_FILE

    def test_missing_and_broken_files_name_the_path(self, tmp_path):
        """A model folder without a calibration has none (``None``); a broken one is a one-line CalibrationError."""
        assert GuardCalibration.from_pretrained(tmp_path / "nowhere") is None
        assert GuardCalibration.from_pretrained(tmp_path) is None
        (tmp_path / CALIBRATION_FILE).write_text("{")
        with pytest.raises(CalibrationError, match=f"{CALIBRATION_FILE}: not valid JSON") as info:
            GuardCalibration.from_pretrained(tmp_path)
        one_line(info)

    def test_another_class_is_a_calibration_error(self, tmp_path):
        _neuron_set().save(tmp_path / CALIBRATION_FILE)
        with pytest.raises(CalibrationError, match="holds a NeuronSet, expected a GuardCalibration"):
            GuardCalibration.from_pretrained(tmp_path)

    def test_the_first_files_load(self, tmp_path):
        """The organism's first calibration files: no format, the AUC under another name."""
        (tmp_path / CALIBRATION_FILE).write_text(
            json.dumps(
                {"memorization_threshold": 1.5, "first_step_auc": 0.75, "calibrated_on": "v1", "note": 1}
            )
        )
        calibration = GuardCalibration.from_pretrained(tmp_path)
        assert (calibration.auc, calibration.data, calibration.extra) == (0.75, "v1", {"note": 1})
        assert calibration.memorization_window == (0, 1)

    @pytest.mark.parametrize("model", ["diffmem-organism-v2", "diffmem-organism-v3"])
    def test_the_committed_calibrations_load(self, model):
        path = ROOT / "weights" / model / CALIBRATION_FILE
        data = json.loads(path.read_text())
        assert data["format"] == "diffmem.GuardCalibration/1"  # format 1, as committed
        calibration = GuardCalibration.from_pretrained(path.parent)
        assert calibration.memorization_threshold == data["memorization_threshold"]
        assert calibration.model_fingerprint == data["model_fingerprint"]
        assert calibration.to_dict() == {k: v for k, v in data.items() if k != "format"}


def test_the_nemo_mitigation_takes_the_files_localize_writes(tmp_path):
    """``NeMoMitigation(neuron_set="runs/localize/union.json")`` (the README's call) reads the one-file
    form, old or new, as ``stats=`` does."""
    from diffmem.mitigations.nemo import NeMoMitigation

    legacy = TestNeuronSet().write_legacy(_neuron_set(), tmp_path)
    assert_same(NeMoMitigation(neuron_set=legacy).neuron_set, _neuron_set())
    stats = TestValueStats().make_object()
    assert_same(NeMoMitigation(stats=stats.save(tmp_path / "stats.safetensors")).stats, stats)


def test_a_file_is_read_by_its_content_not_its_name(tmp_path):
    stats = TestValueStats().make_object()
    stats.save(tmp_path / "stats.safetensors").rename(tmp_path / "stats.bin")
    assert_same(ValueStats.load(tmp_path / "stats.bin"), stats)
    _neuron_set().save(tmp_path / "neurons.txt")
    assert_same(NeuronSet.load(tmp_path / "neurons.txt"), _neuron_set())
