"""Evaluation of a node model on a cohort with node masks: detection metrics on the CT grid, overall and by
short-axis bin, a FROC plot and a report (Markdown + JSON).

For every usable row with a ``nodes_path`` the model segments the CT (crop from the row's station map, else its
anatomy, as in training) and the probability map on the CT grid is compared with the node instance map
(``metrics.evaluate_detection`` at the model's threshold). Only the in-plane extent that holds the crop or a truth
node is kept in memory (every axial slice is kept, so the per-slice Dice is that of the whole scan).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..cohort.table import read_cohort
from ..errors import InputError
from ..io.files import write_figure, write_json, write_text
from ..runtime import Progress, ProgressCallback
from .data import node_instances, row_images
from .infer import segment
from .metrics import DetectionMetrics, DetectionReport, evaluate_detection
from .model import NodeModel, load_node_model

log = logging.getLogger(__name__)

SLICE_DICE_NOTE = ("per-slice Dice is the mean 2D Dice over all axial slices, a slice with no node and no "
                   "prediction counting 1 (S-Net's figure); the many empty slices inflate it, so read it only beside "
                   "the object-level metrics")


@dataclass
class NodeEvaluation:
    """An evaluation run: the detection report, the scans used and skipped, and the files written."""

    report: DetectionReport
    model: dict
    scans: list[dict]
    skipped: list[dict] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> dict:
        """The headline figures: overall and per size bin."""
        def pick(m: DetectionMetrics) -> dict:
            d = m.to_dict()
            return {k: d[k] for k in ("n_truth", "average_recall", "object_dice", "voxel_dice", "slice_dice",
                                      "fp_per_scan_at_80_recall")}

        return {"all": pick(self.report.overall), **{k: pick(v) for k, v in self.report.bins.items()}}

    def to_dict(self) -> dict:
        return {"threshold": self.report.threshold, "n_scans": self.report.n_scans, "summary": self.summary(),
                "slice_dice_note": SLICE_DICE_NOTE, "model": self.model, "scans": self.scans,
                "skipped": self.skipped, "files": {k: str(v) for k, v in self.files.items()},
                "report": self.report.to_dict()}


def _inplane_window(ct: sitk.Image, lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> tuple[slice, slice]:
    """(y, x) index slices of the CT covering the physical box lower..upper and every truth voxel."""
    corners = [ct.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in (x, y, z)))
               for x in (lower[0], upper[0]) for y in (lower[1], upper[1]) for z in (lower[2], upper[2])]
    idx = np.asarray(corners)
    lo = np.floor(idx.min(axis=0)).astype(int)
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1
    fg = np.argwhere(truth.any(axis=0))  # (y, x)
    if fg.size:
        lo[1], lo[0] = min(lo[1], fg[:, 0].min()), min(lo[0], fg[:, 1].min())
        hi[1], hi[0] = max(hi[1], fg[:, 0].max() + 1), max(hi[0], fg[:, 1].max() + 1)
    size = ct.GetSize()
    return (slice(max(int(lo[1]), 0), min(int(hi[1]), size[1])), slice(max(int(lo[0]), 0), min(int(hi[0]), size[0])))


def froc_png(report: DetectionReport, path: str | Path, title: str = "") -> Path:
    """FROC curves (sensitivity against false positives per scan, 0..10), overall and by short-axis bin, with the
    5-FP limit of the average recall marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    groups = [("all", report.overall), *[(k, report.bins[k]) for k in ("<5mm", "5-10mm", ">=10mm") if k in report.bins]]
    for name, m in groups:
        curve = m.froc
        if curve.n_truth == 0:
            continue
        xs = np.concatenate([[0.0], curve.fp_per_scan])
        ys = np.concatenate([[0.0], np.nan_to_num(curve.sensitivity)])
        ax.step(xs, ys, where="post", lw=2.2 if name == "all" else 1.3,
                label=f"{name} (n = {m.n_truth}, AR {_fmt(_num(m.average_recall), 2)})")
    ax.axvline(5.0, color="grey", ls=":", lw=1)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per scan")
    ax.set_ylabel("sensitivity (truth nodes found)")
    ax.set_title(title or f"node detection FROC, {report.n_scans} scans", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", title="short axis (AR: average recall, 0-5 FP)", title_fontsize=8)
    fig.tight_layout()
    return write_figure(fig, path)


def write_node_report(result: NodeEvaluation, out_dir: str | Path, cohort: str = "") -> dict[str, Path]:
    """report.json, report.md, froc.png and scans.csv into ``out_dir`` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"froc": froc_png(result.report, out / "froc.png")}
    summary = result.summary()
    lines = [
        "# Node detection report", "",
        f"Cohort: `{cohort}`; {result.report.n_scans} scans with node masks"
        + (f", {len(result.skipped)} rows without `nodes_path` skipped" if result.skipped else "") + ".",
        f"Model: `{result.model.get('path', '-')}` ({result.model.get('arch')}, working spacing "
        f"{result.model.get('working_spacing_mm')} mm), threshold {result.report.threshold:.2f}.", "",
        "| nodes (short axis) | truth nodes | average recall (0-5 FP/scan) | FP/scan at 80 % recall | object Dice "
        "| voxel Dice | per-slice Dice* |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("all", ">=5mm", "<5mm", "5-10mm", ">=10mm"):
        m = summary.get(name)
        if m is None:
            continue
        lines.append(f"| {name} | {m['n_truth']} | {_fmt(m['average_recall'])} | "
                     f"{_fmt(m['fp_per_scan_at_80_recall'], 2) if m['fp_per_scan_at_80_recall'] is not None else 'not reached'} "
                     f"| {_fmt(m['object_dice'])} | {_fmt(m['voxel_dice'])} | {_fmt(m['slice_dice'])} |")
    lines += ["", f"\\* {SLICE_DICE_NOTE[:1].upper()}{SLICE_DICE_NOTE[1:]}.", "",
              "Average recall: recall averaged over 0 to 5 false positives per scan (steps of 0.01). Object Dice: "
              "per scan, the mean over truth nodes of the Dice with their best-matching predicted component, then "
              "the mean over scans. In a size bin, recall and object Dice count that bin's nodes and false positives "
              "count every false positive.", "", "![FROC](froc.png)", "", "## Scans", "",
              "| scan | truth nodes | object Dice | voxel Dice | per-slice Dice | crop |", "|---|---|---|---|---|---|"]
    for s in result.scans:
        lines.append(f"| {s['scan_id']} | {s['truth_nodes']} | {_fmt(s['object_dice'])} | {_fmt(s['voxel_dice'])} | "
                     f"{_fmt(s['slice_dice'])} | {s['crop']} |")
    files["report_md"] = write_text(out / "report.md", "\n".join(lines) + "\n")
    csv_lines = ["scan_id,truth_nodes,object_dice,voxel_dice,slice_dice,crop"]
    for s in result.scans:
        csv_lines.append(",".join(str(v) if v is not None else "" for v in (
            s["scan_id"], s["truth_nodes"], s["object_dice"], s["voxel_dice"], s["slice_dice"], s["crop"])))
    files["scans_csv"] = write_text(out / "scans.csv", "\n".join(csv_lines) + "\n")
    files["report_json"] = out / "report.json"
    result.files = files
    write_json(out / "report.json", {**result.to_dict(), "cohort": cohort})
    return files


def evaluate_nodes(cohort_csv: str | Path, model: NodeModel | str | Path, out_dir: str | Path | None = None,
                   device: str = "cpu", threshold: float | None = None, split: str | None = None,
                   progress: ProgressCallback | None = None) -> NodeEvaluation:
    """Evaluate a node model on the usable rows of a cohort that have a ``nodes_path`` (only those of ``split``
    when given, e.g. "test"); writes report.json, report.md, froc.png and scans.csv into ``out_dir`` when given.
    ``threshold`` defaults to the model's."""
    if not isinstance(model, NodeModel):
        model = load_node_model(model, device=device)
    thr = model.threshold if threshold is None else float(threshold)
    cohort = read_cohort(cohort_csv).require_valid()
    rows = [r for r in cohort.usable_rows() if split is None or r.split == split]
    with_nodes = [r for r in rows if r.nodes_path is not None]
    skipped = [{"line": r.line, "scan_id": r.scan_id, "reason": "no nodes_path"} for r in rows if r.nodes_path is None]
    if not with_nodes:
        which = f" of split {split!r}" if split is not None else ""
        raise InputError(f"cohort {cohort_csv}: no usable row{which} has a nodes_path (the node masks to compare "
                         "with)")
    truths, probs, spacings, scans = [], [], [], []
    for i, row in enumerate(with_nodes):
        where = f"line {row.line} ({row.scan_id})"
        ct, nodes, stations, anatomy = row_images(row)
        seg = segment(ct, model, anatomy, stations, device)
        truth_img = sitk.Resample(node_instances(nodes, f"{where}: nodes_path"), ct, sitk.Transform(),
                                  sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
        truth = sitk.GetArrayFromImage(truth_img).astype(np.int32)
        prob = sitk.GetArrayFromImage(seg.probability)
        ys, xs = _inplane_window(ct, seg.crop.lower, seg.crop.upper, truth)
        truths.append(np.ascontiguousarray(truth[:, ys, xs]))
        probs.append(np.ascontiguousarray(prob[:, ys, xs]))
        spacings.append(tuple(float(s) for s in ct.GetSpacing()))
        scans.append({"line": row.line, "scan_id": row.scan_id, "truth_nodes": int(len(np.unique(truth)) - 1),
                      "crop": seg.crop.source, "network_s": round(seg.seconds["network"], 3)})
        if progress is not None:
            progress(Progress(i + 1, len(with_nodes), f"evaluate nodes: scan {i + 1} of {len(with_nodes)}"))
    report = evaluate_detection(truths, probs, spacings, thr)
    for k, s in enumerate(scans):
        s["object_dice"] = _num(report.object_dice_per_scan[k])
        s["voxel_dice"] = _num(report.voxel_dice_per_scan[k])
        s["slice_dice"] = _num(report.slice_dice_per_scan[k])
    result = NodeEvaluation(report, model.info() | {"threshold_used": thr}, scans, skipped)
    if out_dir is not None:
        result.files = write_node_report(result, out_dir, cohort=str(cohort_csv))
    return result


def _num(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"
