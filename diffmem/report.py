"""HTML reports: self-contained pages (images and plots inlined), every caption escaped.

Drawn from results only; computes nothing of its own.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from diffmem.io import atomic_write_bytes, atomic_write_text

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:12px}.cell{border:1px solid #ddd;padding:6px;width:min-content}
.cell img{image-rendering:pixelated;width:128px;height:128px}.cap{font-size:12px;width:264px}
.flag{color:#b00;font-weight:bold}
"""


def escape(text: object) -> str:
    """HTML-escape any value (captions come from users' data)."""
    return html.escape(str(text), quote=True)


def image_data_uri(image) -> str:
    """A PIL image or an HxWxC uint8/float [0,1] array as a ``data:image/png`` URI."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr.squeeze())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img_tag(image, alt: str = "") -> str:
    return f'<img src="{image_data_uri(image)}" alt="{escape(alt)}">'


def figure_tag(fig, alt: str = "") -> str:
    """A matplotlib figure as an inline PNG ``<img>``; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return f'<img class="plot" src="{uri}" alt="{escape(alt)}">'


def save_figure(fig, path: str | os.PathLike, dpi: int = 80) -> Path:
    """Write a matplotlib figure as a PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def histogram_figure(
    values_by_group: Mapping[str, Sequence[float]],
    xlabel: str,
    threshold: float | None = None,
    bins: int = 30,
):
    """Overlaid histograms, one per group (e.g. per caption role), with an optional threshold line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    finite = [float(v) for vs in values_by_group.values() for v in vs if np.isfinite(v)]
    edges = np.histogram_bin_edges(finite or [0.0, 1.0], bins=bins)
    for name, values in values_by_group.items():
        if len(values):
            ax.hist(values, bins=edges, alpha=0.55, label=f"{name} (n={len(values)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    return fig


def roc_figure(scores: Sequence[float], labels: Sequence[int], title: str = "ROC"):
    """ROC curve of ``scores`` for binary ``labels`` (1 = memorized), with its AUC in the legend."""
    return roc_curves_figure({"": (scores, labels)}, title)


def roc_curves_figure(curves: Mapping[str, tuple[Sequence[float], Sequence[int]]], title: str = "ROC"):
    """Several ROC curves on one plot: ``name -> (scores, labels)``, each with its AUC in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, (scores, labels) in curves.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        label = f"AUC {roc_auc_score(labels, scores):.3f}"
        ax.plot(fpr, tpr, label=f"{name} ({label})" if name else label)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    return fig


def table_html(rows: Iterable[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A plain HTML table; every cell is escaped, floats shown with 4 significant digits."""
    rows = list(rows)
    if columns is None:
        columns = list(rows[0]) if rows else []

    def cell(v: object) -> str:
        return escape(f"{v:.4g}" if isinstance(v, float) else v)

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """Write a self-contained page of ``(heading, html_body)`` sections atomically; bodies must already be escaped."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{_STYLE}</style></head><body>"
    ]
    parts.append(f"<h1>{escape(title)}</h1>")
    for heading, body in sections:
        parts.append(f"<h2>{escape(heading)}</h2>\n{body}")
    parts.append("</body></html>\n")
    return atomic_write_text(path, "\n".join(parts))
