"""Aggregate SolidMark result rows: rates at each delta with intervals, chance, the shuffled-key null,
per-group breakdowns, run-vs-baseline differences; and write them as CSV/parquet, JSON and HTML.

Never judge a run by a raw count: every rate is shown beside the chance rate ``2*delta - delta**2``,
the rate of the same predictions against shuffled keys, and (for a mitigation) the difference to
its baseline run with a Newcombe interval.

Two levels: a row per *generation* (``l_SM`` of one outpainting), and, when images have several
generations, a row per *image* whose predicted key is the mean over its G generations,

    k_hat_i = (1/G) sum_g k_hat_{i,g},        l_SM(i) = |k_hat_i - k_i|,

the model's recalled key with the sampler's seed-to-seed noise averaged out (its standard error
falls as 1/sqrt(G)). The null is unchanged: a prediction independent of the key, averaged or not,
hits with probability ``2*delta - delta**2``, and the shuffled-key null is computed on the averaged
predictions the same way.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.io import atomic_write, atomic_write_json, atomic_write_text
from diffmem.report import escape, figure_tag, histogram_figure, img_tag, table_html, write_html
from diffmem.scores.solidmark import (
    DEFAULT_DELTAS,
    difference_ci,
    key_distance,
    memorization_rates,
    shuffled_keys,
)
from diffmem.solidmark.scoring import image_file_name


def rate_table(
    rows: Sequence[dict[str, Any]], deltas: Sequence[float] = DEFAULT_DELTAS, seed: int = 0
) -> list[dict[str, Any]]:
    """One entry per delta: count/rate/interval of the run, the chance rate, and the shuffled-key null.

    The null re-pairs every prediction with the key of another content group (seeded), over the rows given.
    """
    dist = np.array([r["distance"] for r in rows], dtype=np.float64)
    observed = memorization_rates(dist, deltas)
    try:
        keys = shuffled_keys(
            [r["frame_key"] for r in rows], seed, groups=[r.get("group") or r["id"] for r in rows]
        )
        null = memorization_rates(key_distance([r["predicted_key"] for r in rows], keys), deltas)
    except ValueError:  # too few rows (or one dominant group) for a shuffled null
        null = [None] * len(observed)
    out = []
    for obs, nul in zip(observed, null):
        entry = {
            "delta": obs.delta,
            "n": obs.n,
            "count": obs.count,
            "rate": obs.rate,
            "ci_low": obs.ci_low,
            "ci_high": obs.ci_high,
            "chance": obs.chance,
        }
        if nul is not None:
            entry.update(
                shuffled_count=nul.count,
                shuffled_rate=nul.rate,
                shuffled_ci_low=nul.ci_low,
                shuffled_ci_high=nul.ci_high,
            )
        out.append(entry)
    return out


#: Per-generation columns that have no meaning once the generations of an image are averaged.
_GENERATION_COLUMNS = ("generation", "seed", "pixel_distance", "nearest_copy_distance")


def per_image_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per image: ``predicted_key`` the mean over its generations, ``distance = |mean - frame_key|``.

    Adds ``generations`` (how many were averaged) and ``predicted_key_std`` (their spread). The other
    columns are the image's own (caption, key, group, role ...), taken from its first generation.
    """
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_id.setdefault(str(r["id"]), []).append(r)
    out = []
    for _, gens in sorted(by_id.items()):
        keys = np.array([float(r["predicted_key"]) for r in gens])
        first = min(gens, key=lambda r: int(r.get("generation", 0)))
        row = {k: v for k, v in first.items() if k not in _GENERATION_COLUMNS}
        row.update(
            generations=len(gens),
            predicted_key=float(keys.mean()),
            predicted_key_std=float(keys.std()),
            distance=float(key_distance([keys.mean()], [first["frame_key"]])[0]),
        )
        out.append(row)
    return out


def _rates_block(
    rows: Sequence[dict[str, Any]], deltas: Sequence[float], group_column: str | None, seed: int
) -> dict[str, Any]:
    block: dict[str, Any] = {
        "n": len(rows),
        "mean_distance": float(np.mean([r["distance"] for r in rows])),
        "rates": rate_table(rows, deltas, seed),
    }
    if group_column:
        groups: dict[str, list] = {}
        for r in rows:
            groups.setdefault(str(r.get(group_column, "")), []).append(r)
        block["group_column"] = group_column
        block["groups"] = {name: _rates_block(g, deltas, None, seed) for name, g in sorted(groups.items())}
    return block


def summarize(
    rows: Sequence[dict[str, Any]],
    deltas: Sequence[float] = DEFAULT_DELTAS,
    group_column: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Rates overall and, with ``group_column`` (e.g. ``role``), per value of that column.

    The top level counts generations. When an image has more than one generation, ``per_image``
    holds the same tables over :func:`per_image_rows` (each image's key averaged over its generations).
    """
    if not rows:
        raise ValueError("no scored images to summarize")
    images = per_image_rows(rows)
    summary: dict[str, Any] = {
        "images": len(images),
        "mean_distance_chance": 1 / 3,
        **_rates_block(rows, deltas, group_column, seed),
    }
    generations = sorted({r["generations"] for r in images})
    if generations[-1] > 1:
        summary["per_image"] = {
            "generations": generations[0] if len(generations) == 1 else generations,
            **_rates_block(images, deltas, group_column, seed),
        }
    return summary


def compare_runs(
    run: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]],
    deltas: Sequence[float] = DEFAULT_DELTAS,
    level: str = "generation",
) -> list[dict[str, Any]]:
    """Rate of ``run`` minus rate of ``baseline`` at each delta, over the (id, generation) pairs both scored.

    ``level="image"`` compares per-image rates instead (:func:`per_image_rows` over those common
    pairs, so both runs average the same generations). The interval is Newcombe's hybrid score
    interval for two independent proportions (conservative for two runs on the same images).
    A mitigation works where the whole interval is below 0.
    """
    if level not in ("generation", "image"):
        raise ValueError(f"level: expected 'generation' or 'image', got {level!r}")
    a = {(r["id"], int(r["generation"])): r for r in run}
    b = {(r["id"], int(r["generation"])): r for r in baseline}
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs have no (image, generation) in common")
    ra, rb = [a[u] for u in common], [b[u] for u in common]
    if level == "image":
        ra, rb = per_image_rows(ra), per_image_rows(rb)
    da = np.array([r["distance"] for r in ra])
    db = np.array([r["distance"] for r in rb])
    out = []
    for delta in deltas:
        ca, cb, n = int((da < delta).sum()), int((db < delta).sum()), len(da)
        d, low, high = difference_ci(ca, n, cb, n)
        out.append(
            {
                "delta": float(delta),
                "level": level,
                "n": n,
                "count": ca,
                "baseline_count": cb,
                "rate": ca / n,
                "baseline_rate": cb / n,
                "difference": d,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return out


# ------------------------------------------------------------------------------------------ files


def write_table(
    rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike, stem: str = "scores"
) -> list[Path]:
    """Write rows as ``stem.csv`` and, when pyarrow is installed, ``stem.parquet`` (atomically)."""
    out = Path(out_dir)
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in sorted(rows, key=lambda r: (str(r["id"]), int(r.get("generation", 0)))):
        writer.writerow(r)
    paths = [atomic_write_text(out / f"{stem}.csv", buf.getvalue())]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return paths
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])
    paths.append(atomic_write(out / f"{stem}.parquet", lambda tmp: pq.write_table(table, tmp)))
    return paths


def _rate_rows(rates: Sequence[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    out = []
    for e in rates:
        row = {
            "set": label,
            "delta": e["delta"],
            "n": e["n"],
            "count": e["count"],
            "rate": e["rate"],
            "95% CI": f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]",
            "chance 2δ−δ²": e["chance"],
        }
        if "shuffled_rate" in e:
            row["shuffled-key rate"] = e["shuffled_rate"]
            row["shuffled 95% CI"] = f"[{e['shuffled_ci_low']:.3f}, {e['shuffled_ci_high']:.3f}]"
        out.append(row)
    return out


def _block_rate_rows(block: dict[str, Any]) -> list[dict[str, Any]]:
    """The report rows of one level's block: overall, then each group."""
    table = _rate_rows(block["rates"], "all")
    for name, g in block.get("groups", {}).items():
        table += _rate_rows(g["rates"], f"{block['group_column']}={name}")
    return table


def write_report(
    out_dir: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    summary: dict[str, Any],
    run_info: dict[str, Any] | None = None,
    comparison: Sequence[dict[str, Any]] | None = None,
    examples: int = 12,
) -> Path:
    """Write ``report.html``: rate tables, distance histograms (run vs shuffled keys), worst/best examples."""

    out = Path(out_dir)
    sections = []
    if run_info:
        sections.append(("Run", table_html([{"setting": k, "value": v} for k, v in run_info.items()])))
    table = _block_rate_rows(summary)
    sections.append(
        (
            "Memorization rates per generation (ℓ_SM < δ)",
            "<p>ℓ_SM = |mean generated frame − key| in the manifest's value space. A rate means something "
            "only against the chance rate and the shuffled-key null beside it.</p>" + table_html(table),
        )
    )
    per_image = summary.get("per_image")
    if per_image:
        table = _block_rate_rows(per_image)
        sections.append(
            (
                "Memorization rates per image (key averaged over its generations)",
                f"<p>k̂ of an image = the mean of its {escape(str(per_image['generations']))} generations' "
                "k̂; the chance rate is unchanged.</p>" + table_html(table),
            )
        )
    if comparison:
        sections.append(("Difference to the baseline run", table_html(list(comparison))))
    dist = {"all": [r["distance"] for r in rows]}
    for name in summary.get("groups", {}):
        dist[f"{summary['group_column']}={name}"] = [
            r["distance"] for r in rows if str(r.get(summary["group_column"], "")) == name
        ]
    try:
        null = key_distance(
            [r["predicted_key"] for r in rows],
            shuffled_keys(
                [r["frame_key"] for r in rows], 0, groups=[r.get("group") or r["id"] for r in rows]
            ),
        )
        dist["shuffled keys (null)"] = list(null)
    except ValueError:
        pass
    fig = histogram_figure(dist, "ℓ_SM = |k̂ − k|", threshold=0.05)
    sections.append(("Distribution of ℓ_SM", figure_tag(fig, "histogram of key distances")))
    image_dir = out / "images"
    if image_dir.is_dir():
        from PIL import Image

        ordered = sorted(rows, key=lambda r: r["distance"])
        cells = []
        for r in ordered[:examples]:
            path = image_dir / image_file_name(r["id"], int(r["generation"]))
            if path.is_file():
                cap = f"{r['id']}: k={r['frame_key']:.3f}, k̂={r['predicted_key']:.3f}, ℓ={r['distance']:.3f} — {r['caption']}"
                cells.append(
                    f"<div class='cell'>{img_tag(Image.open(path), r['caption'])}<div class='cap'>{escape(cap)}</div></div>"
                )
        if cells:
            sections.append(
                ("Lowest ℓ_SM (best key reproductions)", "<div class='grid'>" + "".join(cells) + "</div>")
            )
    return write_html(out / "report.html", "SolidMark memorization report", sections)


def finalize(
    out_dir: str | os.PathLike,
    rows: Sequence[dict[str, Any]],
    deltas: Sequence[float] = DEFAULT_DELTAS,
    group_column: str | None = None,
    run_info: dict[str, Any] | None = None,
    baseline_rows: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``scores.csv``/``.parquet`` (per generation), ``images.csv``/``.parquet`` (per image, with
    several generations), ``summary.json`` and ``report.html`` for a finished run; return the summary."""
    summary = summarize(rows, deltas, group_column, seed)
    if baseline_rows is not None:
        summary["comparison"] = compare_runs(rows, baseline_rows, deltas)
        if "per_image" in summary:
            summary["per_image"]["comparison"] = compare_runs(rows, baseline_rows, deltas, level="image")
    write_table(rows, out_dir)
    if "per_image" in summary:
        write_table(per_image_rows(rows), out_dir, stem="images")
    atomic_write_json(Path(out_dir) / "summary.json", summary)
    comparison = summary.get("comparison", []) + summary.get("per_image", {}).get("comparison", [])
    write_report(out_dir, rows, summary, run_info, comparison)
    return summary
