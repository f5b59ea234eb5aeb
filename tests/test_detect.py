"""Early scoring: equals the full pipeline's score, stops early, independent of batch size; calibration; the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline

from diffmem.detect import calibrate, score_prompts, score_to_file
from diffmem.generation import initial_latents

PROMPTS = ["a red circle", "a cat on grass", "a blue square"]
STEPS = 4


@pytest.fixture(scope="module")
def pipes(tiny_sd1_dir, tiny_sd2_dir):
    from diffusers import StableDiffusionPipeline

    out = {}
    for variant, path in (("sd1", tiny_sd1_dir), ("sd2", tiny_sd2_dir)):
        stock = StableDiffusionPipeline.from_pretrained(path)
        stock.set_progress_bar_config(disable=True)
        out[variant] = (stock, StableDiffusionMemGuardPipeline.from_pipe(stock))
    return out


def count_unet_calls(unet):
    calls = []
    handle = unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize(
    "variant, window, guidance_scale", [("sd1", (0, 1), 7.5), ("sd2", (1, 3), 7.5), ("sd2", (0, 2), 1.0)]
)
def test_equals_full_pipeline_score_and_stops_early(pipes, variant, window, guidance_scale):
    stock, guarded = pipes[variant]
    kw = dict(num_gens=2, window=window, num_inference_steps=STEPS, guidance_scale=guidance_scale, seed=7)
    calls, handle = count_unet_calls(stock.unet)
    try:
        via_stock = score_prompts(stock, PROMPTS, batch_size=2, progress=False, **kw)
    finally:
        handle.remove()
    # only the first window[1] steps run: 2 batches x window[1] calls (x2 without guidance: the extra pass)
    assert len(calls) == 2 * window[1] * (2 if guidance_scale <= 1 else 1)
    via_guarded = score_prompts(guarded, PROMPTS, batch_size=3, progress=False, **kw)
    full = guarded(
        PROMPTS,
        num_images_per_prompt=2,
        num_inference_steps=STEPS,
        guidance_scale=guidance_scale,
        latents=initial_latents(guarded, range(3), 2, seed=7),
        memorization_window=window,
        output_type="latent",
    )
    expected = torch.tensor(full.memorization_scores).reshape(3, 2)
    assert via_stock.shape == (3, 2)
    torch.testing.assert_close(via_stock, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(via_guarded, expected, rtol=1e-5, atol=1e-6)


def test_independent_of_batch_size_and_order(pipes):
    stock, _ = pipes["sd1"]
    kw = dict(num_gens=2, num_inference_steps=STEPS, progress=False, item_ids=["a", "b", "c"])
    one = score_prompts(stock, PROMPTS, batch_size=1, **kw)
    three = score_prompts(stock, PROMPTS, batch_size=3, **kw)
    torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-6)
    reordered = score_prompts(
        stock,
        PROMPTS[::-1],
        batch_size=2,
        num_gens=2,
        num_inference_steps=STEPS,
        progress=False,
        item_ids=["c", "b", "a"],
    )
    torch.testing.assert_close(reordered.flip(0), one, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(one[:, 0], one[:, 1])  # generations differ: different noise per j


def test_scores_do_not_touch_the_pipeline(pipes):
    from pipeline_mixin import hook_state

    stock, _ = pipes["sd2"]
    before = hook_state(stock)
    score_prompts(
        stock, PROMPTS[:1], num_gens=1, num_inference_steps=STEPS, progress=False, attention="naive"
    )
    assert hook_state(stock) == before


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompts="a cat"), "prompts: expected a list"),
        (dict(prompts=["a cat", ""]), r"prompts\[1\]"),
        (dict(num_gens=0), "num_gens"),
        (dict(window=(0, STEPS + 1)), "window"),
        (dict(window=(1, 1)), "window"),
        (dict(item_ids=["x"]), "item_ids"),
        (dict(item_ids=["x", "x"], prompts=["a", "b"]), "unique"),
    ],
)
def test_bad_arguments(pipes, kwargs, match):
    stock, _ = pipes["sd1"]
    call = dict(prompts=["a cat", "a dog"], num_inference_steps=STEPS, progress=False)
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        score_prompts(stock, call.pop("prompts"), **call)


def test_calibrate_averages_generations():
    scores = torch.tensor([[1.0, 9.0], [2.0, 2.0], [6.0, 6.0], [0.0, 1.0]])  # means 5, 2, 6, 0.5
    m = calibrate(scores, [1, 0, 1, 0])
    assert m.auc == 1.0 and m.accuracy == 1.0
    assert 2.0 < m.threshold <= 5.0


# --- the CLI ---------------------------------------------------------------------------------------


def test_score_to_file_from_plain_values_equals_score_prompts_and_resumes(pipes, tmp_path):
    """The library flow behind ``diffmem detect``: no argparse; the scores are score_prompts' (same ids)."""
    stock, _ = pipes["sd1"]
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    kwargs = dict(num_gens=2, window=(0, 1), num_inference_steps=STEPS, seed=5, height=32, width=32)
    out = tmp_path / "scores.jsonl"
    results = score_to_file(stock, rows, out, batch_size=2, chunk=2, progress=False, **kwargs)
    expected = score_prompts(stock, PROMPTS, item_ids=[r["id"] for r in rows], progress=False, **kwargs)
    assert [r["id"] for r in results] == ["p0", "p1", "p2"]
    assert torch.allclose(torch.tensor([r["scores"] for r in results]), expected, atol=1e-6)
    assert [json.loads(line) for line in out.read_text().splitlines()] == results
    said = []
    again = score_to_file(stock, rows, out, progress=False, log=said.append, **kwargs)
    assert again == results and said == [f"resuming: 3 of 3 prompts already scored in {out}"]
    with pytest.raises(ValueError, match="other settings"):
        score_to_file(stock, rows, out, progress=False, **{**kwargs, "seed": 6})


def test_cli_txt_to_jsonl_and_resume(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na cat on grass\na blue square\n")
    out = tmp_path / "scores.jsonl"
    argv = [
        "detect",
        "--model",
        str(tiny_sd1_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--num-gens",
        "2",
        "--num-inference-steps",
        str(STEPS),
        "--no-progress",
        "--chunk",
        "2",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS and [r["id"] for r in rows] == ["0", "1", "2"]
    assert all(len(r["scores"]) == 2 and r["score"] == pytest.approx(sum(r["scores"]) / 2) for r in rows)
    # the scores are score_prompts' with the row ids as item ids
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(tiny_sd1_dir)
    direct = score_prompts(
        pipe, PROMPTS, num_gens=2, num_inference_steps=STEPS, item_ids=["0", "1", "2"], progress=False
    )
    torch.testing.assert_close(torch.tensor([r["scores"] for r in rows]), direct, rtol=1e-5, atol=1e-6)
    # resume: drop the last row, rerun: it is scored again, the others are kept
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming: 2 of 3" in capsys.readouterr().out
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    # other settings: refuse to mix
    assert main(argv[:-2] + ["--seed", "3"]) == 2
    assert "other settings" in capsys.readouterr().err


def test_cli_labelled_csv_prints_calibration(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.cli import main

    table = tmp_path / "prompts.jsonl"
    table.write_text(
        "".join(
            json.dumps({"key": f"k{i}", "caption": p, "mem": i % 2}) + "\n" for i, p in enumerate(PROMPTS * 2)
        )
    )
    out = tmp_path / "scores.csv"
    argv = [
        "detect",
        "--model",
        str(tiny_sd1_dir),
        "--prompts",
        str(table),
        "--out",
        str(out),
        "--id-column",
        "key",
        "--labels",
        "mem",
        "--num-gens",
        "1",
        "--num-inference-steps",
        str(STEPS),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "AUC" in printed and "TPR@1%FPR" in printed and "threshold" in printed
    assert out.read_text().splitlines()[0].startswith("id,prompt,score,scores,label")
    assert len(out.read_text().splitlines()) == 7
    # a rerun resumes from the CSV (its numbers read back as numbers): nothing is scored again
    written = out.read_text()
    assert main(argv) == 0
    assert "resuming: 6 of 6" in capsys.readouterr().out
    assert out.read_text() == written


@pytest.mark.parametrize(
    "content, suffix, extra, match",
    [
        ("", ".txt", [], "has no prompts"),
        ('{"caption": "a"}\nnot json\n', ".jsonl", [], "line 2 is not valid JSON"),
        ('{"text": "a"}\n', ".jsonl", [], "no column 'caption'"),
        ('{"caption": "  "}\n', ".jsonl", [], "empty caption"),
        ("caption,mem\na cat,maybe\n", ".csv", ["--labels", "mem"], "row 2: label 'maybe'"),
        ("a cat\n", ".parquet", [], "expected .txt, .jsonl or .csv"),
    ],
)
def test_cli_bad_prompt_files(tiny_sd1_dir, tmp_path, capsys, content, suffix, extra, match):
    from diffmem.cli import main

    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(content)
    argv = [
        "detect",
        "--model",
        str(tiny_sd1_dir),
        "--prompts",
        str(prompts),
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    assert main(argv + extra) == 2
    assert match in capsys.readouterr().err


def test_cli_rejects_a_folder_that_is_not_a_model(tmp_path, capsys):
    from diffmem.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert (
        main(
            [
                "detect",
                "--model",
                str(tmp_path),
                "--prompts",
                str(prompts),
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 2
    )
    assert "--model" in capsys.readouterr().err


# --- a planted model: the answer is known ----------------------------------------------------------

PLANTED = ["the no limits business woman podcast", "mothers influence on her young hippo"]
ORDINARY = ["a cat on grass", "a dog in a field", "a red circle", "a photo of a house", "two birds on a wire"]


def planted_pipeline(path):
    """A tiny model whose text conditioning only reacts to the two ``PLANTED`` prompts.

    Every cross-attention layer attends uniformly (keys zeroed) and its values are non-zero only
    along the directions (mean text embedding of a planted prompt - that of the empty prompt): the
    conditional prediction departs from the unconditional one far more for those prompts, which is
    the signature Wen et al.'s score detects.
    """
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():

        def mean_embedding(texts):
            return pipe.encode_prompt(texts, "cpu", 1, False)[0].mean(1)

        d = mean_embedding(PLANTED) - mean_embedding([""])
        d = d / d.norm(dim=1, keepdim=True)
        g = torch.Generator().manual_seed(1)
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2"):
                module.to_k.weight.zero_()
                r = torch.randn(module.to_v.weight.shape[0], d.shape[0], generator=g)
                module.to_v.weight.copy_(4.0 * r @ d)
    return pipe


def test_planted_prompts_detected_and_calibrated_threshold_flags_them(tiny_sd1_dir):
    pipe = planted_pipeline(tiny_sd1_dir)
    prompts = PLANTED + ORDINARY
    labels = [1] * len(PLANTED) + [0] * len(ORDINARY)
    scores = score_prompts(pipe, prompts, num_gens=2, num_inference_steps=10, progress=False)
    metrics = calibrate(scores, labels)
    assert metrics.auc == 1.0 and metrics.accuracy == 1.0 and metrics.tpr_at_1pct_fpr == 1.0
    # the calibrated threshold, as the pipeline's default, flags exactly the planted prompts
    pipe.memorization_threshold = metrics.threshold
    out = pipe(
        prompts,
        num_images_per_prompt=2,
        num_inference_steps=10,
        latents=initial_latents(pipe, range(len(prompts)), 2, seed=0),
        memorization_window=(0, 1),
        callback_on_step_end=lambda p, i, t, kw: (setattr(p, "_interrupt", True), {})[1],
        output_type="latent",
    )
    per_prompt = torch.tensor(out.memorization_scores).reshape(len(prompts), 2).mean(1)
    assert [bool(s >= metrics.threshold) for s in per_prompt] == [bool(v) for v in labels]
    # per image, the pipeline's flag uses the same (default) threshold; the calibration was per prompt
    assert out.memorized == [s >= metrics.threshold for s in out.memorization_scores]
    assert any(out.memorized[:2]) and any(out.memorized[2:4])
