"""The organism's caption classifier: reads colour and shape of renderings it never saw, rejects bad input."""

from __future__ import annotations

import pytest
import torch

from diffmem.organism.data import COLOURS, SHAPES, caption_of
from diffmem.organism.fidelity import (
    CaptionClassifier,
    caption_fidelity,
    load_caption_classifier,
    parse_caption,
    render_batch,
    save_caption_classifier,
    train_caption_classifier,
)


def test_parse_caption_and_its_errors():
    assert parse_caption("a red circle") == (0, 0)
    assert parse_caption(caption_of("white", "diamond")) == (len(COLOURS) - 1, len(SHAPES) - 1)
    for bad in ("a teal circle", "a red hexagon", "Eileen Collins in her orange flight suit", ""):
        with pytest.raises(ValueError, match="is not 'a <colour> <shape>'"):
            parse_caption(bad)


def test_renderings_are_seeded_by_step():
    a, ca, sa = render_batch(4, seed=0, step=3)
    b, cb, sb = render_batch(4, seed=0, step=3)
    c, _, _ = render_batch(4, seed=0, step=4)
    assert torch.equal(a, b) and torch.equal(ca, cb) and torch.equal(sa, sb) and not torch.equal(a, c)
    assert a.shape == (4, 3, 64, 64) and 0 <= a.min() and a.max() <= 1


@pytest.mark.slow
def test_a_trained_classifier_reads_fresh_renderings_and_fidelity_counts_them():
    model = train_caption_classifier(steps=250, batch_size=32, seed=0)
    x, c, s = render_batch(256, seed=1, step=0)  # another seed: renderings it never saw
    names, shapes = list(COLOURS), list(SHAPES)
    captions = [caption_of(names[i], shapes[j]) for i, j in zip(c.tolist(), s.tolist())]
    right = caption_fidelity(model, x, captions)
    assert right.n == 256 and right.colour > 0.8 and right.shape > 0.5  # chance: 1/8 and 1/6
    assert right.both <= min(right.colour, right.shape)
    # the same images under the wrong captions: every colour named is another one
    wrong = [caption_of(names[(i + 1) % len(names)], shapes[j]) for i, j in zip(c.tolist(), s.tolist())]
    assert caption_fidelity(model, x, wrong).colour < 0.2


def test_fidelity_rejects_mismatched_input():
    model = CaptionClassifier()
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        caption_fidelity(model, torch.rand(3, 3, 64, 64), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="batch, 3, height, width"):
        caption_fidelity(model, torch.rand(3, 64, 64), ["a red circle"] * 3)


def test_the_shipped_classifier_reads_renderings_it_never_saw():
    """weights/diffmem-caption-classifier (the instrument of dori_eval's fidelity columns)."""
    model = load_caption_classifier()
    assert model.image_size == 64
    x, c, s = render_batch(256, seed=7, step=0)  # neither its training seed (0) nor its test seed (1)
    names, shapes = list(COLOURS), list(SHAPES)
    right = caption_fidelity(
        model, x, [caption_of(names[i], shapes[j]) for i, j in zip(c.tolist(), s.tolist())]
    )
    assert right.colour > 0.97 and right.shape > 0.95


def test_classifier_files_round_trip_and_bad_files_name_the_argument(tmp_path):
    model = CaptionClassifier(width=8, image_size=64)
    save_caption_classifier(model, tmp_path / "clf", {"note": "test"})
    back = load_caption_classifier(tmp_path / "clf")
    assert back.width == 8 and back.image_size == 64
    x = torch.rand(2, 3, 64, 64)
    assert all(torch.equal(a, b) for a, b in zip(model.eval()(x), back(x)))
    with pytest.raises(ValueError, match="reads 64x64 images, got 32x32"):
        caption_fidelity(back, torch.rand(2, 3, 32, 32), ["a red circle"] * 2)
    with pytest.raises(FileNotFoundError, match="--classifier: .*does not exist"):
        load_caption_classifier(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="--classifier: .*not a safetensors file"):
        load_caption_classifier(tmp_path / "junk")


def test_the_classifier_command_writes_weights_and_a_card(tmp_path, capsys):
    from diffmem.cli import main

    out = tmp_path / "clf"
    assert main(["organism", "classifier", "--out", str(out), "--steps", "3"]) == 0
    text = capsys.readouterr().out
    assert "fresh renderings: colour" in text and "autoencoder reconstructions: colour" in text
    card = (out / "README.md").read_text()
    assert f"--out {out} --steps 3" in card and "| fresh renderings (1024 images) |" in card
    assert load_caption_classifier(out).image_size == 64
