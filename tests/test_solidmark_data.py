"""SolidMark keying, manifests and their checks, and the scoring loop with constructed outpainters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.data import write_image_folder
from diffmem.generation import keyed_noise
from diffmem.seeding import item_generator
from diffmem.solidmark import KeyManifest, draw_key, frame_key, key_dataset
from diffmem.solidmark.run import load_score_items
from diffmem.solidmark.scoring import ScoreSettings, read_rows, score_items
from diffmem.solidmark.summary import compare_runs, finalize, per_image_rows


def _source(folder, n=8, side=16, dup_of_first=2, seed=0):
    rng = np.random.default_rng(seed)
    items = [
        (f"img{i}", f"caption {i}", rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for i in range(n)
    ]
    items += [(f"img0-copy{c}", "caption 0", items[0][2]) for c in range(dup_of_first)]
    write_image_folder(folder, items)
    return items


@pytest.fixture()
def keyed(tmp_path):
    _source(tmp_path / "src", side=24)
    result = key_dataset(tmp_path / "src", tmp_path / "keyed", frame_width=8, progress=False)
    return tmp_path, result


def _load(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_keyed_images_carry_their_key_around_the_untouched_image(keyed):
    tmp_path, result = keyed
    m = result.manifest
    assert (m.pattern, m.frame_width, m.value_space, m.seed, m.duplicate_keys) == (
        "border",
        8,
        "pixel",
        42,
        "fresh",
    )
    src = {
        json.loads(line)["id"]: line
        for line in (tmp_path / "src" / "metadata.jsonl").read_text().splitlines()
    }
    assert set(m.ids) == set(src)
    rows = [json.loads(line) for line in (tmp_path / "keyed" / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        e = m.by_id()[row["id"]]
        assert e.key == draw_key(42, row["id"]) and 0 <= e.key < 1
        assert row["solidmark_key"] == e.key
        keyed_px = _load(tmp_path / "keyed" / row["file_name"])
        original = _load(tmp_path / "src" / f"{row['id']}.png")
        assert keyed_px.shape == (40, 40, 3) and (e.width, e.height) == (40, 40)
        assert np.array_equal(keyed_px[8:32, 8:32], original)
        frame = keyed_px.copy()
        frame[8:32, 8:32] = keyed_px[0, 0]
        assert (frame == round(255 * e.frame_key)).all()
    # fresh keys: every copy of the duplicated image has its own key, but the same content group
    copies = [m.by_id()[i] for i in ("img0", "img0-copy0", "img0-copy1")]
    assert len({c.key for c in copies}) == 3 and len({c.group for c in copies}) == 1


def test_shared_duplicate_keys_model_space_and_order_independence(tmp_path):
    items = _source(tmp_path / "src")
    m = key_dataset(
        tmp_path / "src",
        tmp_path / "k",
        frame_width=8,
        value_space="model",
        duplicate_keys="shared",
        progress=False,
    ).manifest
    copies = [m.by_id()[i] for i in ("img0", "img0-copy0", "img0-copy1")]
    assert len({c.key for c in copies}) == 1
    e = m.by_id()["img3"]
    px = _load(tmp_path / "k" / "img3.png")
    assert px[0, 0, 0] == round(255 * (e.key + 1) / 2)  # the key is the frame's value in [-1, 1]
    assert e.frame_key == frame_key(e.key, "model")
    # keys come from (seed, id) only: the same images in another order get the same keys
    write_image_folder(tmp_path / "rev", list(reversed(items)))
    m2 = key_dataset(tmp_path / "rev", tmp_path / "k2", frame_width=8, progress=False).manifest
    m1 = key_dataset(tmp_path / "src", tmp_path / "k1", frame_width=8, progress=False).manifest
    assert {e.id: e.key for e in m1.entries} == {e.id: e.key for e in m2.entries}


def test_center_pattern_and_resize(tmp_path):
    _source(tmp_path / "src", n=3, side=40, dup_of_first=0)
    m = key_dataset(
        tmp_path / "src", tmp_path / "c", frame_width=8, pattern="center", size=32, progress=False
    )
    e = m.manifest.entries[0]
    px = _load(tmp_path / "c" / f"{e.id}.png")
    assert px.shape == (32, 32, 3)
    assert (px[12:20, 12:20] == round(255 * e.frame_key)).all()


def test_images_smaller_than_twice_the_frame_are_refused(tmp_path):
    _source(tmp_path / "src", n=2, side=12, dup_of_first=0)
    with pytest.raises(ValueError, match=r"img0.*smaller than twice the frame width"):
        key_dataset(tmp_path / "src", tmp_path / "k", frame_width=8, progress=False)
    with pytest.raises(ValueError, match="--size 20"):
        key_dataset(tmp_path / "src", tmp_path / "k2", frame_width=8, size=20, progress=False)


def _edit_manifest(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_manifest_that_does_not_match_the_dataset_is_refused(keyed):
    tmp_path, result = keyed
    path, data_dir = result.manifest_path, tmp_path / "keyed"
    original = path.read_text()

    # ids
    _edit_manifest(path, lambda d: d["images"].pop())
    with pytest.raises(ValueError, match="have no key in the manifest"):
        load_score_items(data_dir, path)
    path.write_text(original)
    _edit_manifest(path, lambda d: d["images"].append({**d["images"][0], "id": "ghost"}))
    with pytest.raises(ValueError, match=r"have no image in the dataset.*ghost"):
        load_score_items(data_dir, path)

    # value space: the manifest says model, the frames hold the key in pixel space
    def to_model(d):
        d["value_space"] = "model"
        for e in d["images"]:
            e["frame_key"] = frame_key(e["key"], "model")

    path.write_text(original)
    _edit_manifest(path, to_model)
    with pytest.raises(
        ValueError, match="holds the key in the pixel value space but the manifest says model"
    ):
        load_score_items(data_dir, path)

    # frame width, both ways
    path.write_text(original)
    _edit_manifest(path, lambda d: d.update(frame_width=4))
    with pytest.raises(ValueError, match="wider than the manifest's frame width of 4"):
        load_score_items(data_dir, path)
    path.write_text(original)
    _edit_manifest(path, lambda d: d.update(frame_width=9))
    with pytest.raises(ValueError, match="narrower than the manifest's frame width of 9"):
        load_score_items(data_dir, path)

    # keys outside [0, 1)
    path.write_text(original)
    _edit_manifest(path, lambda d: d["images"][1].update(key=1.25))
    with pytest.raises(ValueError, match=r"image 'img1' has key 1.25, outside \[0, 1\)"):
        KeyManifest.load(path)
    path.write_text(original)
    _edit_manifest(path, lambda d: d["images"][1].update(frame_key=0.0))
    with pytest.raises(ValueError, match="frame_key"):
        KeyManifest.load(path)

    # a manifest of another keying of the same images (another seed)
    path.write_text(original)
    other = key_dataset(tmp_path / "src", tmp_path / "seed7", frame_width=8, seed=7, progress=False)
    with pytest.raises(ValueError, match="was not keyed with this manifest"):
        load_score_items(data_dir, other.manifest_path)
    manifest, items = load_score_items(data_dir, path)
    assert len(items) == len(manifest.entries) == 10


def test_cli_reports_a_mismatch_without_traceback(keyed, capsys):
    from diffmem.cli import main

    tmp_path, result = keyed
    _edit_manifest(result.manifest_path, lambda d: d["images"][0].update(key=-0.1))
    code = main(["solidmark", "score", "--data", str(tmp_path / "keyed"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "outside [0, 1)" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- scoring loop


def _copier(images, mask, prompts, noise_keys):
    """A model that reproduces its reference perfectly (frame included)."""
    return images.clone()


def _guesser(images, mask, prompts, noise_keys):
    """A model that knows nothing of the key: a random grey frame drawn from each image's noise key."""
    out = images.clone()
    for j, key in enumerate(noise_keys):
        out[j][:, mask] = torch.rand(1, generator=item_generator(*key)).item()
    return out


@pytest.mark.parametrize("space", ["pixel", "model"])
def test_perfect_copier_scores_zero_and_its_shuffled_null_is_at_chance(tmp_path, space):
    _source(tmp_path / "src", n=60, dup_of_first=0)
    key_dataset(tmp_path / "src", tmp_path / "k", frame_width=8, value_space=space, progress=False)
    manifest, items = load_score_items(tmp_path / "k", tmp_path / "k" / "solidmark_manifest.json")
    rows = score_items(_copier, manifest, items, tmp_path / "run", progress=False)
    assert max(r["distance"] for r in rows) < 1e-6
    assert max(r["pixel_distance"] for r in rows) < 1e-6
    summary = finalize(tmp_path / "run", rows)
    for e in summary["rates"]:
        assert e["rate"] == 1.0 and e["count"] == 60
        assert e["shuffled_ci_low"] <= e["chance"] <= e["shuffled_ci_high"]
    assert (tmp_path / "run" / "scores.csv").is_file() and (tmp_path / "run" / "report.html").is_file()


def test_key_blind_model_is_at_chance_and_results_ignore_batching_and_interruption(tmp_path):
    _source(tmp_path / "src", n=300, side=8, dup_of_first=0)
    key_dataset(tmp_path / "src", tmp_path / "k", frame_width=4, progress=False)
    manifest, items = load_score_items(tmp_path / "k", tmp_path / "k" / "solidmark_manifest.json")
    settings = ScoreSettings(generations=2)
    whole = score_items(_guesser, manifest, items, tmp_path / "a", settings, batch_size=7, progress=False)
    assert len(whole) == 600
    for e in finalize(tmp_path / "a", whole)["rates"]:
        assert e["ci_low"] <= e["chance"] <= e["ci_high"]

    calls = {"n": 0}

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return _guesser(*args)

    with pytest.raises(KeyboardInterrupt):
        score_items(interrupted, manifest, items, tmp_path / "b", settings, batch_size=16, progress=False)
    assert len(read_rows(tmp_path / "b")) == 32  # two batches committed, the third lost whole
    resumed = score_items(_guesser, manifest, items, tmp_path / "b", settings, batch_size=5, progress=False)
    key = lambda r: (r["id"], r["generation"])  # noqa: E731
    assert sorted(map(json.dumps, sorted(whole, key=key))) == sorted(
        map(json.dumps, sorted(resumed, key=key))
    )

    with pytest.raises(ValueError, match="other settings"):
        score_items(_guesser, manifest, items, tmp_path / "b", ScoreSettings(steps=5), progress=False)

    # a "mitigation" that does nothing differs from its baseline by an interval around 0
    for c in compare_runs(whole, resumed):
        assert c["difference"] == 0 and c["ci_low"] < 0 < c["ci_high"]
    # and a perfect copier is far above the key-blind baseline
    copied = score_items(_copier, manifest, items, tmp_path / "c", settings, progress=False)
    for c in compare_runs(copied, whole):
        assert c["ci_low"] > 0.5


def _noisy_recaller(images, mask, prompts, noise_keys):
    """A model that recalls every key up to sampler noise: the frame is the key plus N(0, 0.04) per generation."""
    out = images.clone()
    noise, _ = keyed_noise((1,), noise_keys)
    for j in range(len(noise_keys)):
        out[j][:, mask] = (images[j][:, mask] + 0.04 * noise[j].item()).clamp(0, 1)
    return out


def test_per_image_keys_average_the_generations_and_keep_the_chance_rate(tmp_path):
    _source(tmp_path / "src", n=200, side=8, dup_of_first=0)
    key_dataset(tmp_path / "src", tmp_path / "k", frame_width=4, progress=False)
    manifest, items = load_score_items(tmp_path / "k", tmp_path / "k" / "solidmark_manifest.json")
    settings = ScoreSettings(generations=8)
    rows = score_items(_noisy_recaller, manifest, items, tmp_path / "noisy", settings, progress=False)
    images = per_image_rows(rows)
    assert len(images) == 200 and {r["generations"] for r in images} == {8}
    first = next(r for r in images if r["id"] == items[0].id)
    mine = [r for r in rows if r["id"] == items[0].id]
    assert first["predicted_key"] == pytest.approx(np.mean([r["predicted_key"] for r in mine]))
    assert first["distance"] == pytest.approx(abs(first["predicted_key"] - mine[0]["frame_key"]))
    assert "generation" not in first and first["caption"] == mine[0]["caption"]

    summary = finalize(tmp_path / "noisy", rows)
    one = {e["delta"]: e for e in summary["rates"]}
    avg = {e["delta"]: e for e in summary["per_image"]["rates"]}
    assert summary["per_image"]["generations"] == 8 and summary["per_image"]["n"] == 200
    # P(|N(0, 0.04)| < 0.05) = 0.79 per generation; the mean of 8 has sd 0.014, so nearly every image
    assert 0.7 < one[0.05]["rate"] < 0.88 and avg[0.05]["rate"] > 0.97
    assert avg[0.05]["shuffled_ci_low"] <= avg[0.05]["chance"] <= avg[0.05]["shuffled_ci_high"]
    assert (tmp_path / "noisy" / "images.csv").is_file()

    # a key-blind model stays at chance per image, the averaging does not create memorization
    blind = score_items(_guesser, manifest, items, tmp_path / "blind", settings, progress=False)
    for e in finalize(tmp_path / "blind", blind)["per_image"]["rates"]:
        assert e["ci_low"] <= e["chance"] <= e["ci_high"]
    for c in compare_runs(rows, blind, level="image"):
        assert c["n"] == 200 and c["level"] == "image" and c["ci_low"] > (0.3 if c["delta"] >= 0.05 else 0)
    with pytest.raises(ValueError, match="level"):
        compare_runs(rows, blind, level="images")

    # more generations extend a finished run: its rows are kept, only the new ones are generated
    calls = {"n": 0}

    def counting(images, *args):
        calls["n"] += len(images)
        return _noisy_recaller(images, *args)

    more = score_items(
        counting, manifest, items, tmp_path / "noisy", ScoreSettings(generations=9), progress=False
    )
    assert calls["n"] == 200 and len(more) == 1800
    key = lambda r: (r["id"], r["generation"])  # noqa: E731
    assert sorted(map(json.dumps, sorted(rows, key=key))) == sorted(
        map(json.dumps, sorted((r for r in more if r["generation"] < 8), key=key))
    )


def test_the_outpainter_gets_each_generations_noise_key_whatever_the_batch(tmp_path):
    # generation g of image i is keyed (seed, i, g): the key of its noise in the one keyed draw
    _source(tmp_path / "src", n=5, side=8, dup_of_first=0)
    key_dataset(tmp_path / "src", tmp_path / "k", frame_width=4, progress=False)
    manifest, items = load_score_items(tmp_path / "k", tmp_path / "k" / "solidmark_manifest.json")
    seen = []

    def recording(images, mask, prompts, noise_keys):
        assert len(noise_keys) == len(images) == len(prompts)
        seen.extend(noise_keys)
        return images.clone()

    settings = ScoreSettings(seed=7, generations=2)
    score_items(recording, manifest, items, tmp_path / "run", settings, batch_size=3, progress=False)
    assert sorted(seen) == sorted((7, it.id, g) for it in items for g in range(2))


def test_a_frame_painted_in_the_wrong_value_space_does_not_score_as_memorized(tmp_path):
    # the manifest is in model space; a "model" that paints the pixel value k is read back as 2k - 1
    _source(tmp_path / "src", n=20, dup_of_first=0)
    key_dataset(tmp_path / "src", tmp_path / "k", frame_width=8, value_space="model", progress=False)
    manifest, items = load_score_items(tmp_path / "k", tmp_path / "k" / "solidmark_manifest.json")
    key_of_caption = {it.caption: manifest.by_id()[it.id].frame_key for it in items}

    def wrong_space(images, mask, prompts, noise_keys):
        out = images.clone()
        for j, prompt in enumerate(prompts):
            out[j][:, mask] = key_of_caption[prompt]
        return out

    rows = score_items(wrong_space, manifest, items, tmp_path / "run", batch_size=3, progress=False)
    for r in rows:
        assert r["predicted_key"] == pytest.approx(2 * r["frame_key"] - 1, abs=1e-5)
        assert r["distance"] == pytest.approx(abs(r["frame_key"] - 1), abs=1e-5)


def test_fresh_keys_of_copies_are_also_scored_against_the_nearest_copy(keyed):
    # every copy of img0 has its own key; a model that paints img0-copy1's key for all three copies
    tmp_path, result = keyed
    manifest, items = load_score_items(tmp_path / "keyed", result.manifest_path)
    copy1 = manifest.by_id()["img0-copy1"].frame_key
    caption_of_img0 = next(it.caption for it in items if it.id == "img0")

    def paints_copy1_key(images, mask, prompts, noise_keys):
        out = images.clone()
        for j, prompt in enumerate(prompts):
            if prompt == caption_of_img0:
                out[j][:, mask] = copy1
        return out

    rows = {
        r["id"]: r for r in score_items(paints_copy1_key, manifest, items, tmp_path / "run", progress=False)
    }
    for i in ("img0", "img0-copy0", "img0-copy1"):
        assert rows[i]["copies"] == 3 and rows[i]["nearest_copy_distance"] < 1e-6
    assert rows["img0"]["distance"] > 1e-3 and rows["img0-copy1"]["distance"] < 1e-6
    assert rows["img3"]["copies"] == 1
    assert rows["img3"]["nearest_copy_distance"] == pytest.approx(rows["img3"]["distance"], abs=1e-6)
