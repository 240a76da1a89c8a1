"""Evaluation figures (matplotlib, Agg backend): confusion matrices as PNG, written atomically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LNSError
from ..io.files import write_figure
from ..staging.rules import N_STAGES
from .metrics import Evaluation, MethodEvaluation


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix_png(
    cm: Any,
    path: str | Path,
    labels: Sequence[str] = N_STAGES,
    title: str = "",
    xlabel: str = "predicted",
    ylabel: str = "reference",
    dpi: int = 120,
) -> Path:
    """Write a confusion matrix (reference in rows) as a PNG: colour = share of the row, text = count and %."""
    cm = np.asarray(cm, dtype=float)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(labels):
        raise LNSError(f"confusion matrix must be square with one row per label {list(labels)}, got {cm.shape}")
    plt = _pyplot()
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = cm.shape[0]
    size = max(4.8, 1.1 * k + 1.6)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            count = f"{cm[i, j]:.0f}" if float(cm[i, j]).is_integer() else f"{cm[i, j]:.1f}"
            text = f"{count}\n{100 * share[i, j]:.0f}%" if rows[i, 0] > 0 else count
            ax.text(j, i, text, ha="center", va="center", fontsize=10,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), labels)
    ax.set_yticks(range(k), labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    n = cm.sum()
    ax.set_title(f"{title}\n(n = {n:.0f})" if title else f"n = {n:.0f}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of reference row")
    fig.tight_layout()
    return write_figure(fig, path, dpi=dpi)


def station_confusion_png(ev: Evaluation, path: str | Path, title: str = "") -> Path:
    """The station-level 2x2 confusion matrix of an evaluation (negative, positive)."""
    s = ev.station
    return confusion_matrix_png([[s.tn, s.fp], [s.fn, s.tp]], path, labels=("negative", "positive"), title=title)


def write_evaluation_pngs(result: MethodEvaluation, out_dir: str | Path) -> dict[str, Path]:
    """Confusion matrices (N-stage and station) of a method, pooled over folds, per level.

    Files: ``<method>_<level>_nstage_confusion.png`` and ``<method>_<level>_station_confusion.png``.
    """
    out_dir = Path(out_dir)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in result.method)
    written: dict[str, Path] = {}
    for level, ev in result.pooled.items():
        what = "per patient" if level == "patient" else "per scan"
        written[f"{level}.nstage"] = confusion_matrix_png(
            ev.stage.confusion, out_dir / f"{safe}_{level}_nstage_confusion.png",
            title=f"{result.method}: N-stage, {what}, folds pooled")
        written[f"{level}.station"] = station_confusion_png(
            ev, out_dir / f"{safe}_{level}_station_confusion.png",
            title=f"{result.method}: stations, {what}, folds pooled")
    return written


def reliability_png(summaries: dict[str, dict], path: str | Path) -> Path:
    """Reliability diagram: observed frequency of malignancy against the mean predicted probability per bin (one
    line per method, the diagonal is perfect calibration), with the ECE and Brier score in the legend and the
    number of stations per bin below."""
    plt = _pyplot()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.2, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    edges = None
    for k, (name, s) in enumerate(summaries.items()):
        curve = s.get("curve")
        if not curve:
            continue
        edges = np.asarray(curve["edges"])
        count = np.asarray(curve["count"], float)
        ok = count > 0
        mp, ob = np.asarray(curve["mean_predicted"], float)[ok], np.asarray(curve["observed"], float)[ok]
        ax.plot(mp, ob, marker="o", lw=1.5, label=f"{name}: ECE {s['ece']:.3f}, Brier {s['brier']:.3f}")
        width = (edges[1] - edges[0]) / (len(summaries) + 1)
        hist.bar(edges[:-1] + (k + 0.5) * width, count, width=width, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency of malignancy")
    ax.set_title("Station probabilities: reliability (all test folds)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    hist.set_xlabel("predicted probability")
    hist.set_ylabel("stations")
    if edges is not None:
        hist.set_xticks(edges[::2])
    fig.tight_layout()
    return write_figure(fig, path, dpi=110)
