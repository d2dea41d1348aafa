"""Pictures for the run report, each returned as inline markup: charts as SVG text (matplotlib), images as small
JPEG ``data:`` URIs. Nothing here reads report files; :mod:`pipeline.report.collect` hands in plain values."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

GT_COLOUR, PRED_COLOUR, FOCUS_COLOUR = (40, 200, 60), (230, 50, 40), (255, 210, 0)
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, with its cache kept where the pipeline keeps Ultralytics' state
    (``configure_environment`` must run before matplotlib is first imported)."""
    from pipeline.ultralytics_env import configure_environment

    configure_environment()
    import matplotlib

    matplotlib.use("Agg", force=True)
    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "detflow", "font.size": 9,
                                "axes.spines.top": False, "axes.spines.right": False})
    import matplotlib.pyplot as plt

    return plt


def _svg(fig: Any) -> str:
    """The figure as an ``<svg>`` element to paste into HTML: no XML prolog, doctype or metadata block."""
    plt = _pyplot()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
               title: str, *, xlog: bool = False, band: tuple[Sequence[float], Sequence[float], Sequence[float]]
               | None = None, ylim: tuple[float, float] | None = None, marker: str = "",
               size: tuple[float, float] = (4.6, 3.2)) -> str:
    """Lines ``(label, x, y)``; ``band`` (x, low, high) is shaded behind them (a bootstrap interval)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size)
    if band is not None:
        ax.fill_between(band[0], band[1], band[2], color="#1f77b4", alpha=0.18, linewidth=0,
                        label="95% bootstrap band", step=None)
    for i, (label, x, y) in enumerate(series):
        ax.plot(x, y, marker=marker, markersize=3, linewidth=1.6, color=_PALETTE[i % len(_PALETTE)], label=label)
    if xlog:
        ax.set_xscale("log", base=2)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if series or band is not None:
        ax.legend(fontsize=7, frameon=False)
    return _svg(fig)


def confusion_chart(matrix: np.ndarray, labels: Sequence[str], title: str) -> str:
    """Counts with rows = actual, columns = predicted; each cell written out (colour alone is not a number)."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * n, 1.0 + 0.6 * n))
    ax.imshow(matrix, cmap="Blues")
    peak = matrix.max() if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center",
                    color="white" if peak and matrix[i, j] > peak / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=30, ha="right")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    return _svg(fig)


def jpeg_uri(img: Image.Image, max_side: int = 192, quality: int = 80) -> str:
    """A small JPEG ``data:`` URI (the report stays one file and small)."""
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def drawn(rgb: np.ndarray, gt: np.ndarray, preds: Sequence[tuple[np.ndarray, str]], focus: np.ndarray | None,
          max_side: int = 224) -> str:
    """The image with ground truth (green), predictions (red, labelled) and the case in question (yellow)."""
    img = Image.fromarray(rgb).convert("RGB")
    scale = max_side / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    draw = ImageDraw.Draw(img)
    for b in np.asarray(gt, dtype=np.float64).reshape(-1, 4):
        draw.rectangle([float(v) * scale for v in b], outline=GT_COLOUR, width=1)
    for b, text in preds:
        xy = [float(v) * scale for v in b]
        draw.rectangle(xy, outline=PRED_COLOUR, width=1)
        draw.text((xy[0] + 1, max(0.0, xy[1] - 10)), text, fill=PRED_COLOUR)
    if focus is not None:
        draw.rectangle([float(v) * scale - 3 for v in focus[:2]] + [float(v) * scale + 3 for v in focus[2:]],
                       outline=FOCUS_COLOUR, width=2)
    return jpeg_uri(img, max_side=max_side)
