"""The SD-likeness card (issue #31): rows from planted measurements, targets met or missed by how much."""

from __future__ import annotations

from diffmem.evaluate.sd_likeness import card_markdown, card_rows


def _rate(count: int, n: int) -> dict:
    from diffmem.evaluate.metrics import ReplicationRate

    metric = ReplicationRate()
    metric.update([True] * count + [False] * (n - count))
    return metric.compute()


def _dose(copies_and_counts):
    auc = {"auc": 0.75, "auc_ci": [0.6, 0.9]}
    return [
        {
            "copies": c,
            "images": 4,
            "replication": _rate(k, 16),
            **({"first_step_auc_vs_fewest": auc} if c > 1 else {}),
        }
        for c, k in copies_and_counts
    ]


def _mitigation(none: int, embedding: int, fidelity: float) -> dict:
    row = lambda k, f: {"replication_images": _rate(k, 40), "clean_fidelity": f}  # noqa: E731
    return {
        "methods": {
            "none": row(none, 0.9),
            "embedding": row(embedding, fidelity),
            "attention-rescale": row(none, 0.9),
        }
    }


def test_an_sd_like_organism_meets_every_row():
    m = {
        "empty": _rate(0, 64),
        "ordinary": _rate(1, 200),  # 0.5 %
        "dose": _dose([(1, 0), (16, 15), (64, 16)]),  # 31 of 32 = 97 % at >= 16 copies
        "triggers": _rate(1, 40),
        "nemo": {
            "tau": 0.42,
            "floors": [0.2, 0.3, 0.5, 0.1, 0.2],
            "below_tau": [True, True, False, True, True],
        },
        "mitigation": _mitigation(36, 4, 0.88),
    }
    rows = {r.key: r for r in card_rows(m)}
    assert rows["empty"].met and rows["ordinary"].met and rows["dose"].met and rows["nemo"].met
    assert rows["mitigation:embedding"].met  # 90 % -> 10 %, fidelity 0.90 -> 0.88
    assert not rows["mitigation:attention-rescale"].met  # no cut at all
    assert "replication 90.0% > half of 90.0%" in rows["mitigation:attention-rescale"].miss
    assert rows["dose:16"].met is None and rows["detection:16"].measured.startswith("0.750 [0.600, 0.900]")
    assert "detection:1" not in rows  # the fewest copies are the control, not a row
    assert rows["triggers"].met is None and "perturbed" not in rows  # reported only, and only when measured


def test_a_missed_row_says_by_how_much_and_the_table_shows_it():
    m = {
        "empty": _rate(10, 50),  # 20 %: the v2/v3 organisms' failure, copies without captions
        "ordinary": _rate(0, 100),
        "dose": _dose([(1, 0), (16, 8), (32, 8)]),  # 50 %
        "nemo": {"tau": 0.42, "floors": [0.5, 0.6], "below_tau": [False, False]},
        "mitigation": _mitigation(36, 30, 0.8),
    }
    rows = {r.key: r for r in card_rows(m)}
    assert not rows["empty"].met and rows["empty"].miss == "+18.0% over the 2% limit"
    assert not rows["dose"].met and rows["dose"].miss == "-40.0% under the 90% target"
    assert not rows["nemo"].met and rows["nemo"].measured.endswith("floors 0.500-0.600")
    assert "fidelity drop 0.100 > 0.05" in rows["mitigation:embedding"].miss
    table = card_markdown(card_rows(m))
    assert "**no** (+18.0% over the 2% limit)" in table and "Somepalli" in table
    assert table.count("\n") == len(rows) + 1  # header, rule, one line per row


def test_the_card_refuses_an_organism_without_graded_duplication(tmp_path, capsys):
    from diffmem.cli import main

    code = main(["bench", "sd-likeness", "--model", "weights/diffmem-organism-v2", "--out", str(tmp_path)])
    assert code == 2 and "has no graded duplication" in capsys.readouterr().err
    assert main(["bench", "sd-likeness", "--skip", "nemo,bogus", "--out", str(tmp_path)]) == 2
    assert "--skip: bogus" in capsys.readouterr().err


def test_a_rate_at_the_limit_is_met():
    rows = {r.key: r for r in card_rows({"empty": _rate(2, 100), "ordinary": _rate(0, 10), "dose": []})}
    assert rows["empty"].met and "dose" not in rows
