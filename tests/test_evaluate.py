"""One replication criterion, the harness's metrics, and the bench command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.evaluate.metrics import DetectionMetric, ReplicationRate
from diffmem.scores.replication import PRESETS, ReplicationCriterion, criterion


def test_replication_rules():
    sims = torch.tensor([[0.9, 0.9, 0.9, 0.1], [0.9, 0.1, 0.1, 0.1], [0.6, 0.6, 0.6, 0.6]])
    assert criterion("organism").memorized(sims).tolist() == [True, False, False]  # >= 3 of 4 at >= 0.7
    assert ReplicationCriterion(0.7, "any").memorized(sims).tolist() == [True, True, False]
    assert ReplicationCriterion(0.5, "mean").memorized(sims).tolist() == [True, False, True]
    assert ReplicationCriterion(0.7).replicates(torch.tensor([0.7, 0.6999])).tolist() == [True, False]  # >=
    assert "3 of 4" not in criterion("organism").describe() and "75%" in criterion("organism").describe()
    assert set(PRESETS) >= {"organism", "organism-mean", "sscd", "sscd-replication", "sscd-copy"}
    cos = torch.tensor([[0.49, 0.3], [0.5, 0.1], [0.74, 0.8]])  # SSCD cosines, 2 generations a prompt
    assert criterion("sscd-replication").replicates(cos[:, 0]).tolist() == [False, True, True]
    assert criterion("sscd-copy").memorized(cos).tolist() == [False, False, True]
    assert "SSCD >= 0.75" in criterion("sscd-copy").describe()
    assert [criterion("organism").memorized_count(h, 4) for h in (2, 3, 4)] == [False, True, True]
    assert ReplicationCriterion(0.7, "any").memorized_count(1, 10)
    with pytest.raises(ValueError, match="needs the similarities"):
        ReplicationCriterion(0.5, "mean").memorized_count(1, 2)
    with pytest.raises(ValueError, match="expected one of"):
        criterion("nope")


def test_detection_metric_intervals_and_chance():
    metric = DetectionMetric(n_boot=200, seed=0)
    metric.update([0.1, 0.2, 0.3], [0, 0, 0])
    metric.update([0.8, 0.25, 0.9], [1, 1, 1])
    out = metric.compute()
    assert out["auc"] == pytest.approx(8 / 9)
    assert out["auc_ci"][0] <= out["auc"] <= out["auc_ci"][1] and out["chance_auc"] == 0.5
    empty = DetectionMetric()
    empty.update([0.1], [0])
    assert empty.compute()["auc"] is None


def test_replication_rate_wilson():
    rate = ReplicationRate()
    rate.update([True, False, False, False])
    out = rate.compute()
    assert out["rate"] == 0.25 and out["count"] == 1 and out["n"] == 4
    assert out["ci"][0] < 0.25 < out["ci"][1]


def test_bench_detection_on_prompt_files_resumes(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.cli import main

    mem = tmp_path / "mem.jsonl"
    mem.write_text(
        "".join(
            json.dumps({"caption": c, "index": i}) + "\n"
            for i, c in enumerate(["a red circle", "a blue star"])
        )
    )
    neg = tmp_path / "negatives.txt"
    neg.write_text("a cat\na dog\n")
    out = tmp_path / "bench"
    args = [
        "bench", "detection", "--model", str(tiny_sd1_dir), "--suite", str(mem), str(neg), "--out", str(out),
        "--methods", "wen,wen:steps=2,anisotropy", "--num-gens", "2", "--num-inference-steps", "3",
        "--bootstrap", "50", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"wen", "wen-steps=2", "anisotropy"}
    row = results["methods"]["wen"]["splits"]["all"]["gens_2"]
    assert row["n_positive"] == 2 and row["n_negative"] == 2 and 0 <= row["auc"] <= 1
    assert results["methods"]["wen-steps=2"]["cost"]["unet_evals_per_prompt"] == 8
    table = (out / "table.md").read_text()
    assert "| wen-steps=2 | all |" in table and (out / "report.html").is_file()
    cached = {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()}
    assert main(args) == 0  # resumed: nothing rescored
    assert {p: p.stat().st_mtime_ns for p in (out / "scores").iterdir()} == cached
    capsys.readouterr()
    assert main(["bench", "detection", "--list"]) == 0
    assert capsys.readouterr().out.split() == [
        "anisotropy",
        "bright-ending",
        "broken-memories",
        "dsm",
        "hessian-difference",
        "ren-entropy",
        "sharpness",
        "wen",
    ]
    assert main(["bench", "mitigation", "--list"]) == 0
    assert {"guidance-delay", "pad-token", "guard"} <= set(capsys.readouterr().out.split())


def test_bench_bad_methods(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.cli import main

    code = main(
        ["bench", "detection", "--methods", "wen,nope", "--model", str(tiny_sd1_dir), "--out", str(tmp_path)]
    )
    assert code == 2 and "--methods: 'nope' is not registered" in capsys.readouterr().err
    code = main(
        ["bench", "detection", "--methods", "wen:steps", "--model", str(tiny_sd1_dir), "--out", str(tmp_path)]
    )
    assert code == 2 and "expected key=value" in capsys.readouterr().err
    mem, neg = tmp_path / "mem.jsonl", tmp_path / "neg.txt"
    mem.write_text('{"caption": "a red circle"}\n')
    neg.write_text("a cat\n")
    code = main(
        ["bench", "detection", "--model", str(tiny_sd1_dir), "--suite", str(mem), str(neg), "--splits",
         "all,copies-2-vs-1", "--out", str(tmp_path / "b")]
    )  # fmt: skip
    assert (
        code == 2 and "--splits: copies-2-vs-1 not in the suite; its splits: all" in capsys.readouterr().err
    )


def test_bench_reaches_every_registered_evaluation(tmp_path, capsys):
    """``diffmem bench --list`` names every registered evaluation; ``diffmem bench <name>`` and a
    ``benchmarks/`` script (``script_main``) reach the same class, with the same one-line errors."""
    from diffmem.cli import main
    from diffmem.commands.bench import script_main
    from diffmem.evaluate.base import EVALUATIONS, Evaluation, parse_method_specs

    assert main(["bench", "--list"]) == 0
    listed = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == EVALUATIONS.names() and {"detection", "mitigation"} <= set(listed)
    assert all(
        issubclass(EVALUATIONS.get_class(n), Evaluation) and EVALUATIONS.get_class(n).help for n in listed
    )
    assert main(["bench"]) == 2 and "choose an evaluation: detection" in capsys.readouterr().err
    missing = str(tmp_path / "no-model")
    for run in (
        lambda: main(["bench", "detection", "--methods", "nope", "--model", missing]),
        lambda: script_main("detection", ["--methods", "nope", "--model", missing]),
    ):
        assert run() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--methods: 'nope' is not registered" in err[0]
    assert script_main("detection", ["--num-gens", "0"]) == 2  # checked numbers, as on the command line
    assert "--num-gens" in capsys.readouterr().err
    assert parse_method_specs("a, b:k=1;j=x", ["a", "b"]) == [("a", {}), ("b", {"k": 1, "j": "x"})]
    with pytest.raises(ValueError, match="an evaluation named 'detection' is registered already"):

        @EVALUATIONS.register
        class Twin(Evaluation):
            name = "detection"


@pytest.mark.slow
def test_organism_suite_and_mitigation_bench(tmp_path):
    """The organism's measured splits and the mitigation evaluator, at reduced sizes."""
    from diffmem.evaluate.mitigation import evaluate_mitigations
    from diffmem.evaluate.suites import organism_suite
    from diffmem.guard.auto import load_guarded
    from diffmem.mitigations import get_mitigation
    from diffmem.modelio import default_model

    if default_model() is None:
        pytest.skip("the organism's weights are not in weights/")
    pipe = load_guarded(None)
    pipe.set_progress_bar_config(disable=True)
    suite = organism_suite(
        pipe, tmp_path, num_perturbations=1, num_triggers=4, label_generations=1, progress=False
    )
    sizes = suite.summary()
    assert sizes["memorized-vs-clean"] == (20, 48) and sizes["verbatim-vs-heldout"] == (16, 16)
    assert sum(sizes["triggers"]) == 4 and sum(sizes["perturbed"]) >= 15
    assert (
        organism_suite(pipe, tmp_path, num_perturbations=1, num_triggers=4, label_generations=1).to_dict()
        == suite.to_dict()
    )
    triggers = [p for p in suite.splits["triggers"] if p.label == 1]
    results = evaluate_mitigations(
        pipe,
        suite,
        [("guidance-delay", {}, get_mitigation("guidance-delay"))],
        tmp_path,
        triggers=triggers,
        num_gens=1,
        progress=False,
    )
    none, delay = results["methods"]["none"], results["methods"]["guidance-delay"]
    assert none["replication_images"]["n"] == 20 and none["clean_ssim_to_unmitigated"] == pytest.approx(
        1.0, abs=1e-5
    )
    assert none["replication_images"]["rate"] >= 0.8  # the organism copies its memorized captions
    assert delay["flagged_share"] >= 0.5 and delay["clean_ssim_to_unmitigated"] < 1.0
    # the trigger prompts were measured to copy; without mitigation they still do
    assert results["sizes"]["triggers"] == len(triggers)
    if triggers:
        assert none["replication_triggers"]["n"] == len(triggers) and none["replication_triggers"]["rate"] > 0
    # general prompts as deployed: an image the guard does not flag is the unmitigated one, exactly
    rows = json.loads((tmp_path / "mitigation" / "guidance-delay.json").read_text())
    deployed = rows["general"]["deployed"]
    for flagged, similarity in zip(deployed["flagged"], deployed["ssim_to_plain"]):
        if not flagged:
            assert similarity == pytest.approx(1.0, abs=1e-5)
    assert delay["general_deployed"]["flagged"]["n"] == 48
    assert none["general_deployed"]["ssim_to_unmitigated"] == pytest.approx(1.0, abs=1e-5)


def test_robustness_evaluation_known_answer_and_resume(tiny_sd1_dir, tmp_path, monkeypatch):
    """A target that is the model's own generation replicates, a noise image does not; an edit changes
    both the copy and the held-out images; every stage is read back on a rerun; the attack runs."""
    from diffusers import StableDiffusionPipeline

    import diffmem.attack.dori as dori
    from diffmem.edits import NeuronSet
    from diffmem.evaluate.robustness import RobustnessEvaluation, RobustnessSettings, Target
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.neurons import value_layers
    from diffmem.scores.replication import ReplicationCriterion

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    settings = RobustnessSettings(
        seeds=1,
        num_inference_steps=2,
        criterion=ReplicationCriterion(0.999, "mean"),  # an exact copy (the tiny model is random)
        dori=dori.DoriConfig(steps=2, batch_size=2),
    )
    with torch.no_grad():
        copy = dori.generate_from_embeds(
            pipe,
            dori.encode_prompts(pipe, ["a red square"]),
            [0],
            key=("dori-gen", "copy"),
            num_inference_steps=2,
        )[0]
    noise = torch.rand(copy.shape, generator=torch.Generator().manual_seed(0))
    targets = [Target("copy", "a red square", copy), Target("noise", "a blue circle", noise)]

    def evaluation():
        return RobustnessEvaluation(
            pipe, targets, tmp_path, heldout_captions=["a green star"], settings=settings, log=lambda _: None
        )

    ev = evaluation()
    rows = ev.add_setting("Memorized captions, no mitigation", "none", attack=False)
    assert [r["similarity_before"][0] > 0.999 for r in rows] == [True, False]
    none = ev.rows[0]
    assert none["rate"] == 0.5 and none["n"] == 2 and none["heldout"] == 1.0
    assert none["rate_ci"][0] < 0.5 < none["rate_ci"][1]
    layers = value_layers(pipe.unet, ("down", "mid", "up"))
    zeroed = NeuronSet(
        model_fingerprint(pipe.unet), list(layers), [list(range(m.out_features)) for m in layers.values()]
    )
    ev.add_setting("every value neuron off", "zeroed", edit=zeroed, attack=False, key="all")
    assert ev.rows[1]["rate"] == 0.0 and ev.rows[1]["heldout"] < 0.999
    weights = {n: m.weight.clone() for n, m in layers.items()}
    ev.add_setting("attacked", "attacked", items=targets[1:], quality=False)
    assert [r["setting"] for r in ev.rows[2:]] == ["attacked", "attacked + Dori"]
    assert all(torch.equal(weights[n], m.weight) for n, m in layers.items())  # the edit was undone
    table = ev.markdown("header")
    assert table.startswith("header") and "| every value neuron off | " in table and "0.50 [" in table

    def fail(*a, **k):
        raise AssertionError("a cached stage was recomputed")

    monkeypatch.setattr(dori, "attack_target", fail)
    monkeypatch.setattr(dori, "generate_from_embeds", fail)
    again = evaluation()
    monkeypatch.setattr(again, "generate", fail)
    again.add_setting("Memorized captions, no mitigation", "none", attack=False)
    again.add_setting("every value neuron off", "zeroed", edit=zeroed, attack=False, key="all")
    again.add_setting("attacked", "attacked", items=targets[1:], quality=False)
    assert again.rows == ev.rows
    with pytest.raises(AssertionError, match="recomputed"):  # another setting key is another stage
        again.add_setting("every value neuron off", "zeroed", edit=zeroed, attack=False, key="other")


def test_robustness_pruning_sweep_and_adversarial_rows(tiny_sd1_dir, tmp_path):
    """The pruning sweep adds a row per ratio and the FFN ceiling, and fine-tunes a copy, not the model."""
    from diffusers import StableDiffusionPipeline

    from diffmem.attack.dori import DoriConfig
    from diffmem.edits import WeightMask
    from diffmem.evaluate.robustness import RobustnessEvaluation, RobustnessSettings, Target

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = torch.rand((3, 3, size, size), generator=torch.Generator().manual_seed(1))
    targets = [Target(f"t{i}", c, images[i]) for i, c in enumerate(("a red square", "a blue circle"))]
    settings = RobustnessSettings(seeds=1, num_inference_steps=2, dori=DoriConfig(steps=1, batch_size=2))
    ev = RobustnessEvaluation(
        pipe, targets, tmp_path, heldout_captions=["a green star"], settings=settings, log=lambda _: None
    )
    ev.add_setting("Memorized captions, no mitigation", "none", attack=False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    mask = ev.pruning_sweep([0.05, 0.5], tau=1, num_inference_steps=2)
    assert isinstance(mask, WeightMask) and mask.params["ratio"] == 0.05  # none met the goal: the first ratio
    labels = [r["setting"] for r in ev.rows]
    assert labels[1].startswith("Pruning rho=0.05 (") and labels[2].startswith("Pruning rho=0.5 (")
    assert labels[3].startswith("Every FFN weight zeroed")
    tuned = ev.adversarial_finetune(mask, [Target("r0", "a green star", images[2])], rounds=1)
    assert [r["setting"] for r in ev.rows[-2:]] == [
        "Adversarial FT (1 rounds)",
        "Adversarial FT (1 rounds) + Dori",
    ]
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in tuned.unet.state_dict().items())


def test_edit_replication_known_answers(tiny_sd1_dir):
    """Training images that are the model's own generations replicate; no edit leaves held-out images
    identical; the pipeline modes count what the guard did."""
    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    from diffmem.evaluate.edit_replication import EditReplication
    from diffmem.organism.replication import TrainingImages

    pipe = StableDiffusionMemGuardPipeline.from_pretrained(tiny_sd1_dir)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    noise = TrainingImages(torch.rand(1, 3, size, size), ["n"], ["noise"], ["generic"])
    ev = EditReplication(pipe, noise, num_gens=2, num_inference_steps=2, log=lambda _: None)
    captions = ["a red square", "a blue circle"]
    _, images = ev.measure(captions, "heldout")
    ev.training = TrainingImages(
        images, ["r0", "r1", "b0", "b1"], [captions[0]] * 2 + [captions[1]] * 2, ["verbatim"] * 4
    )
    rows = ev.per_caption([(captions[0], "verbatim", None)])
    assert rows[0]["replicated_before"] == rows[0]["replicated_after"] == 2
    controls = ev.edit_vs_control({"none": None}, ["a green star"], captions)
    assert controls["none"]["heldout_ssim_median"] == pytest.approx(1.0, abs=1e-6)
    assert controls["none"]["verbatim_replicated"] == [2, 2]
    modes = ev.pipeline_modes(
        {"forced": {"mitigation": "guidance-delay", "memorization_threshold": 0.0}}, captions[:1], []
    )
    assert (
        modes["forced"]["actions"] == {"guidance-delay": 2}
        and modes["forced"]["seconds_heldout_prompt"] is None
    )


def _constructed_rows(table: str) -> dict[tuple[str, float], list[str]]:
    """``(model, δ) -> cells`` of the constructed-models table."""
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("perfect copier", "key-blind guesser"):
            rows[(cells[0], float(cells[1]))] = cells[2:]
    return rows


def test_bench_solidmark_scores_constructed_models_as_known(tmp_path, capsys):
    """``diffmem bench solidmark --constructed`` (and the script, ``--workdir``) on the tiny recipe's keyed data:
    a model that copies the reference frame memorizes every image; a key-blind guesser sits at chance."""
    from diffmem.cli import main
    from diffmem.commands.bench import script_main

    out = tmp_path / "solidmark"
    assert main(["bench", "solidmark", "--smoke", "--constructed", "--out", str(out), "--no-progress"]) == 0
    table = (out / "constructed.md").read_text(encoding="utf-8")
    assert table in capsys.readouterr().out
    rows = _constructed_rows(table)
    assert {delta for _, delta in rows} == {0.1, 0.05, 0.005} and len(rows) == 6
    keys = json.loads((out / "keyed" / "solidmark_manifest.json").read_text())["images"]
    n = len({k["group"] for k in keys})  # one copy of each distinct image is scored
    for delta in (0.1, 0.05, 0.005):
        assert rows[("perfect copier", delta)][0].startswith(f"{n}/{n} = 1.000")
        rate, chance = rows[("key-blind guesser", delta)][:2]
        low, high = (float(x) for x in rate.split("[")[1].rstrip("]").split(","))
        assert low <= float(chance) <= high  # the guesser's interval covers chance, 2δ − δ²
    assert json.loads((out / "results.json").read_text())["constructed"] == table
    # the script reaches the same evaluation; --workdir is the script's name of --out (the run resumes)
    assert script_main("solidmark", ["--smoke", "--constructed", "--workdir", str(out)]) == 0
    assert (out / "constructed.md").read_text(encoding="utf-8") == table


def test_bench_evaluations_refuse_bad_settings_in_one_line(tmp_path, capsys):
    """Each study's settings are checked before a model loads: one line naming the argument, exit 2."""
    from diffmem.cli import main

    missing = str(tmp_path / "no-model")
    cases = [
        (["bench", "solidmark", "--model", missing, "--out", str(tmp_path / "s")], "--model: "),
        (["bench", "training-mitigations", "--dtype", "float16", "--out", str(tmp_path / "t")], "--dtype: "),
        (["bench", "training-mitigations", "--quality", "nope", "--out", str(tmp_path / "t")], "nope"),
        (["bench", "scan", "--model", missing, "--out", str(tmp_path / "c")], missing),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_bench_scan_two_stage_generates_the_full_scans_top_captions(tiny_sd1_dir, tmp_path, capsys):
    """``diffmem bench scan`` on a tiny model: the organism's 52 captions by role, and the two-stage scan
    generating exactly the top quarter of the full scan's first-step scores (which it reuses)."""
    import pyarrow.parquet as pq

    from diffmem.cli import main
    from diffmem.scan.results import caption_table, load_results

    out, raw = tmp_path / "scan", tmp_path / "scan_eval.json"
    argv = ["bench", "scan", "--model", str(tiny_sd1_dir), "--out", str(out), "--json", str(raw)]
    assert main([*argv, "--num-gens", "1", "--steps", "2", "--no-progress"]) == 0
    assert "two-stage:" in capsys.readouterr().out
    result = json.loads(raw.read_text())
    assert result == json.loads((out / "results.json").read_text())
    assert {role: v["captions"] for role, v in result["by_role"].items()} == {
        "generic": 32,
        "template": 4,
        "verbatim": 16,
    }
    scores = load_results(out / "scan_all")["scores"]
    ranked = sorted(zip(scores.column("score").to_pylist(), scores.column("id").to_pylist()), reverse=True)
    top = {i for _, i in ranked[:13]}  # a quarter of 52
    assert set(caption_table(load_results(out / "scan_top")["gens"])) == top
    two = result["two_stage"]
    assert two["captions_generated"] == 13 and two["generation_saved_fraction"] == 0.75
    table = pq.read_table(out / "organism_scan_table.parquet").to_pylist()
    verbatim = {r["id"] for r in table if r["memorized"]} & {
        i for _, i in ranked
    }  # scored at their first row
    assert len(verbatim) == 16 and two["memorized_not_generated"] == len(verbatim - top)
