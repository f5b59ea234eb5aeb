"""The training-mitigation study: goal verdicts on known numbers, and a whole study on a tiny model that
resumes without training or evaluating again."""

from __future__ import annotations

import json

import pytest

from diffmem.train.mitigation_study import (
    StudyConfig,
    goal_verdicts,
    median_step_seconds,
    run_mitigation_study,
)
from diffmem.train.text_to_image import TrainConfig


def _evaluation(count: int, n: int, generic: float, heldout: float) -> dict:
    return {
        "replication": {"duplicated": {"own": {"rate": count / n, "count": count, "n": n}}},
        "fidelity": {"generic": {"both": generic}, "heldout": {"both": heldout}},
    }


def test_goal_verdicts_against_none():
    rows = {
        "none": _evaluation(40, 80, 0.60, 0.50),
        "a": _evaluation(10, 80, 0.58, 0.44),  # exactly a quarter; held-out 0.06 below
        "b": _evaluation(11, 80, 0.70, 0.46),  # just above a quarter; fidelity better / 0.04 below
    }
    v = goal_verdicts(rows)
    assert set(v) == {"a", "b"}
    assert v["a"]["share_of_none"] == 0.25 and v["a"]["replication_goal_met"] is True
    assert v["b"]["replication_goal_met"] is False
    assert v["a"]["fidelity_generic_goal_met"] and not v["a"]["fidelity_heldout_goal_met"]
    assert v["b"]["fidelity_generic_goal_met"] and v["b"]["fidelity_heldout_goal_met"]
    assert v["a"]["difference"] == pytest.approx(-0.375)
    low, high = v["a"]["difference_ci"]
    assert low < -0.375 < high < 0
    assert goal_verdicts({"a": rows["a"]}) == {}
    nothing = goal_verdicts({"none": _evaluation(0, 80, 0.6, 0.5), "a": rows["a"]})
    assert nothing["a"]["share_of_none"] is None and nothing["a"]["replication_goal_met"] is None


def test_median_step_time_ignores_a_slowed_window():
    log = [{"step": 25 * k, "seconds": 5.0 * k} for k in range(1, 6)]  # 0.2 s a step
    log[3:] = [{"step": r["step"], "seconds": r["seconds"] + 20.0} for r in log[3:]]  # one window 5x slower
    assert median_step_seconds(log) == pytest.approx(0.2)
    assert median_step_seconds([]) is None


def test_a_fidelity_exactly_the_allowed_distance_below_meets_the_goal():
    import numpy as np

    rows = {"none": _evaluation(8, 8, float(np.float32(0.8)), 0.5), "a": _evaluation(1, 8, 0.75, 0.5)}
    assert goal_verdicts(rows)["a"]["fidelity_generic_goal_met"] is True  # -0.0500000119 in float32


def test_bad_settings_are_refused_before_any_training():
    with pytest.raises(ValueError, match="rows: unknown dreambooth"):
        StudyConfig(rows=("none", "dreambooth")).check()
    with pytest.raises(ValueError, match="mitigation_options: caption-noise is not a mitigation row"):
        StudyConfig(mitigation_options={"caption-noise": {}}).check()
    with pytest.raises(ValueError, match="t_n"):
        StudyConfig(mitigation_options={"ambient": {"t_n": -1}}).check()
    with pytest.raises(ValueError, match="evaluation: unknown seeds"):
        StudyConfig(evaluation={"seeds": 2}).check()


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """A tiny SD 1.x at 64 px (the caption classifier's size)."""
    from diffmem.tiny import TinySDConfig, build_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny64")
    build_tiny_pipeline(TinySDConfig(variant="sd1", sample_size=64), seed=0).save_pretrained(path)
    return path


@pytest.mark.slow
def test_a_whole_study_on_a_tiny_model_resumes_without_redoing_work(tmp_path, tiny64, monkeypatch):
    from diffmem.organism.finetune_data import build_duplicated_finetune_set
    from diffmem.train import mitigation_study
    from diffmem.train.memcontrol import MemControlConfig

    build_duplicated_finetune_set(tmp_path / "set", n_images=6, duplicated=2, repeats=2, seed=0)
    config = StudyConfig(
        train=TrainConfig(steps=2, batch_size=2, checkpoint_every=1),
        rows=("base", "none", "wen-filter", "caption-gni", "memcontrol"),
        mitigation_options={"caption-gni": {"embedding_sigma": 0.5}},
        memcontrol=MemControlConfig(trials=2, sampler="random"),
        memcontrol_steps=1,
        heldout_images=3,
        evaluation={"seeds_per_caption": 1, "num_inference_steps": 2},
    )
    work = tmp_path / "study"
    first = run_mitigation_study(tiny64, tmp_path / "set", work, config, progress=False, log=lambda _: None)
    assert list(first["rows"]) == ["base", "none", "wen-filter", "caption-gni", "memcontrol"]
    assert set(first["goals"]) == {"base", "wen-filter", "caption-gni", "memcontrol"}
    low, high = first["goals"]["wen-filter"]["difference_ci_images"]  # paired bootstrap over the images
    assert -1.0 <= low <= high <= 1.0
    gni = first["rows"]["caption-gni"]["training"]["config"]
    assert gni["mitigation"] == "caption-noise" and gni["mitigation_options"] == {"embedding_sigma": 0.5}
    tau = first["wen_filter_tau"]
    assert tau["rows"] == 8 and tau["quantile"] == 0.95 and tau["tau"] > 0
    trained = first["rows"]["wen-filter"]["training"]
    assert trained["config"]["mitigation_options"] == {"tau": tau["tau"]} and trained["steps"] == 2
    chosen = first["memcontrol"]["chosen"]
    mc = first["rows"]["memcontrol"]["training"]["config"]
    assert mc["mode"] == "lora" and mc["trainable_blocks"] == chosen["blocks"] and mc["lr"] == chosen["lr"]
    assert first["rows"]["none"]["evaluation"]["replication"]["duplicated"]["own"]["n"] == 2
    assert json.loads((work / "results.json").read_text())["goals"] == json.loads(json.dumps(first["goals"]))

    # rerun: nothing is trained or evaluated again, and the same results come back
    def refuse(*args, **kwargs):
        raise AssertionError("trained or evaluated again")

    monkeypatch.setattr("diffmem.train.mitigation_study.train_text_to_image", refuse)
    monkeypatch.setattr("diffmem.train.mitigation_study.evaluate_finetune", refuse)
    again = run_mitigation_study(tiny64, tmp_path / "set", work, config, progress=False, log=lambda _: None)
    assert json.dumps(again["rows"], sort_keys=True) == json.dumps(first["rows"], sort_keys=True)
    other = StudyConfig(**{**config.__dict__, "tau_quantile": 0.5})
    with pytest.raises(ValueError, match="other settings"):
        mitigation_study.run_mitigation_study(tiny64, tmp_path / "set", work, other, progress=False)


def test_bench_training_mitigations_on_a_tiny_model_writes_the_study_table_and_resumes(
    tmp_path, tiny64, monkeypatch, capsys
):
    """``diffmem bench training-mitigations`` runs the study at tiny size: the table shows the study's own
    numbers, ``--results`` gets them less the per-image rows, and a rerun trains and evaluates nothing again."""
    from diffmem.cli import main
    from diffmem.evaluate.training_mitigations import training_mitigation_tables

    out, raw = tmp_path / "tm", tmp_path / "raw.json"
    argv = ["bench", "training-mitigations", "--model", str(tiny64), "--out", str(out), "--results", str(raw)]
    argv += ["--images", "6", "--duplicated", "2", "--repeats", "2", "--steps", "2", "--batch-size", "2"]
    argv += ["--rows", "base", "none", "--seeds-per-caption", "1", "--eval-steps", "2", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    study = json.loads((out / "study" / "results.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["base", "none"] and results["goals"] == study["goals"]
    none = study["rows"]["none"]["evaluation"]["replication"]["duplicated"]["own"]
    line = next(row for row in printed.splitlines() if row.startswith("| none |"))
    assert line.split("|")[2].strip() == f"{none['rate']:.1%} [{none['ci'][0]:.1%}, {none['ci'][1]:.1%}]"
    assert (out / "table.md").read_text() == training_mitigation_tables(results)
    assert "per_image" not in json.loads(raw.read_text())["rows"]["none"]["evaluation"]
    assert "per_image" in study["rows"]["none"]["evaluation"]

    def refuse(*args, **kwargs):
        raise AssertionError("trained or evaluated again")

    monkeypatch.setattr("diffmem.train.mitigation_study.train_text_to_image", refuse)
    monkeypatch.setattr("diffmem.train.mitigation_study.evaluate_finetune", refuse)
    assert main(argv) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
