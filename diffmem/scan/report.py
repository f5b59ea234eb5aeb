"""HTML report of a scan, drawn from its result files alone (``diffmem.report`` helpers; captions escaped)."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.data import load_rgb
from diffmem.records import BadImageError
from diffmem.report import escape, figure_tag, histogram_figure, img_tag, roc_figure, table_html, write_html
from diffmem.scan.results import caption_table, load_results, read_summary


def _training_image(path: str | None, size: tuple[int, int]):

    if not path:
        return None
    try:
        return load_rgb(path, convert_modes=True).resize(size)
    except BadImageError:
        return None


def _offenders_html(
    out: Path, gens, catalog_images: dict[int, str], captions: dict[int, str], n: int, thr: dict
) -> str:
    import pyarrow.compute as pc
    from PIL import Image

    rows = gens.filter(pc.is_valid(gens["image_file"])).to_pylist()
    rows.sort(key=lambda r: (-(r["similarity"] if r["similarity"] is not None else -2), r["row"], r["gen"]))
    cells = []
    for r in rows[:n]:
        gen = Image.open(out / r["image_file"]).convert("RGB")
        train = _training_image(r.get("nn_image") or catalog_images.get(r["nn_row"]), gen.size)
        flag = "verbatim" if r["verbatim"] else "replication" if r["replicated"] else ""
        cells.append(
            '<div class="cell">'
            + img_tag(gen, f"generation {r['gen']} of {r['id']}")
            + (
                img_tag(train, f"training image {r['nn_id']}")
                if train is not None
                else "<i>training image unreadable</i>"
            )
            + f'<div class="cap">sim <b>{r["similarity"]:.3f}</b> <span class="flag">{escape(flag)}</span><br>'
            + f"caption id {escape(r['id'])} (gen {r['gen']}, first-step score {r['score']:.3f})<br>"
            + f"&ldquo;{escape(captions.get(r['row'], ''))}&rdquo;<br>nearest training id {escape(r['nn_id'])}</div></div>"
        )
    note = (
        f"<p>Left: generated image; right: its nearest training image. Flags: replication &gt; "
        f"{thr['replication']:g}, verbatim &gt; {thr['verbatim']:g}.</p>"
    )
    return note + '<div class="grid">' + "".join(cells) + "</div>" if cells else "<p>No kept generations.</p>"


def write_scan_report(out: str | Path, worst: int = 24) -> Path:
    """``report.html`` in the scan folder: summary, worst offenders (generation beside its nearest training
    image), similarity vs background histograms, score distribution, ROC curves where labels exist, bad rows."""
    import pyarrow.parquet as pq

    out = Path(out)
    summary = read_summary(out)
    res = load_results(out)
    scores, gens, bg, bad = res["scores"], res["gens"], res["background"], res["bad_rows"]
    emb = summary.get("embedder") or {}
    thr = {
        "replication": emb.get("replication_threshold", 0.5),
        "verbatim": emb.get("verbatim_threshold", 0.7),
    }
    cat = pq.read_table(out / "catalog.parquet", columns=["row", "caption", "image"]).to_pylist()
    captions = {c["row"]: c["caption"] for c in cat}
    images = {c["row"]: c["image"] for c in cat}
    sections: list[tuple[str, str]] = []

    flat = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in summary.items()}
    sections.append(
        ("Summary", table_html([{"key": k, "value": v} for k, v in flat.items()], ["key", "value"]))
    )

    if gens is not None and gens.num_rows:
        sections.append(("Worst offenders", _offenders_html(out, gens, images, captions, worst, thr)))
        groups = {
            "generation -> nearest training image": gens.column("similarity").to_numpy(zero_copy_only=False)
        }
        if bg is not None:
            groups["training image -> nearest other training image (background)"] = bg["sims"]
        fig = histogram_figure(
            groups, f"similarity ({emb.get('embedder', '')})", threshold=thr["replication"]
        )
        sections.append(("Similarity against the background", figure_tag(fig, "similarity histograms")))

    if scores is not None and scores.num_rows:
        s = scores.column("score").to_numpy()
        lab = scores.column("label").to_pylist()
        if any(v is not None for v in lab):
            groups = {
                "labelled memorized": [x for x, y in zip(s, lab) if y == 1],
                "labelled not memorized": [x for x, y in zip(s, lab) if y == 0],
                "unlabelled": [x for x, y in zip(s, lab) if y is None],
            }
        else:
            groups = {"captions": s}
        fig = histogram_figure({k: v for k, v in groups.items() if len(v)}, "first-step memorization score")
        sections.append(("Score distribution", figure_tag(fig, "score histogram")))
        pairs = [(x, y) for x, y in zip(s, lab) if y is not None]
        if len({y for _, y in pairs}) == 2:
            body = figure_tag(
                roc_figure([x for x, _ in pairs], [y for _, y in pairs], "first-step score"), "ROC score"
            )
            if gens is not None and gens.num_rows:
                per = caption_table(gens)
                ids = scores.column("id").to_pylist()
                pl = [(per[i]["max_similarity"], y) for i, y in zip(ids, lab) if y is not None and i in per]
                if len({y for _, y in pl}) == 2:
                    body += figure_tag(
                        roc_figure([x for x, _ in pl], [y for _, y in pl], "max similarity"), "ROC sim"
                    )
            sections.append(("ROC (labelled captions)", body))

    if bad is not None and bad.num_rows:
        rows = bad.to_pylist()
        counts = summary.get("bad_rows_by_reason", {})
        body = table_html([{"reason": k, "rows": v} for k, v in counts.items()], ["reason", "rows"])
        body += table_html(rows[:200], ["row", "id", "reason", "detail", "stage"])
        if len(rows) > 200:
            body += f"<p>... and {len(rows) - 200} more (bad_rows.parquet, train/*.npz)</p>"
        sections.append(("Bad rows", body))
    return write_html(out / "report.html", f"diffmem scan: {Path(summary.get('data', '')).name}", sections)
