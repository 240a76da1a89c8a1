"""PNG overview of detected lymph nodes: axial views through the largest nodes and a coronal view through the
mediastinum, node outlines coloured by station (grey: outside every station, or no station map), each labelled with
its station and short axis, and a table of the nodes. Axial views in radiological convention (patient right on the
viewer's left, anterior at the top); coronal with the head at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.files import write_figure
from ..mapping.crop import CropBox
from ..staging.colors import NO_STATION_COLOR, station_color
from ..staging.stations import STATION_NAMES
from .instances import NodeInstance

DISPLAY_SPACING_MM = 1.0
#: Extra room around the crop's core (the stations or the anatomy) in the pictures, in mm.
VIEW_MARGIN_MM = 15.0
AXIAL_VIEWS = 4
TABLE_ROWS = 24


def _plane(image: sitk.Image, lower: np.ndarray, upper: np.ndarray, axis: int, position: float,
           interpolator: int, default: float, pixel: int) -> np.ndarray:
    """A 2D cut of ``image`` at ``position`` mm along ``axis`` (1: coronal, 2: axial), over lower..upper, on a
    DISPLAY_SPACING_MM grid: axial (y, x), coronal (z, x)."""
    size = np.maximum(np.ceil((upper - lower) / DISPLAY_SPACING_MM).astype(int), 1)
    origin = lower + DISPLAY_SPACING_MM / 2.0
    size[axis] = 1
    origin[axis] = position
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetSpacing((DISPLAY_SPACING_MM,) * 3)
    arr = sitk.GetArrayFromImage(sitk.Resample(image, ref, sitk.Transform(), interpolator, default, pixel))
    return arr[0] if axis == 2 else arr[:, 0, :]


def _view_box(ct: sitk.Image, crop: CropBox, nodes: Sequence[NodeInstance]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.asarray(crop.core_lower, float) - VIEW_MARGIN_MM
    hi = np.asarray(crop.core_upper, float) + VIEW_MARGIN_MM
    if nodes:
        centres = np.array([n.centre_mm for n in nodes])
        lo, hi = np.minimum(lo, centres.min(axis=0) - 20.0), np.maximum(hi, centres.max(axis=0) + 20.0)
    from ..io.images import physical_bounds

    blo, bhi = physical_bounds(ct)
    return np.maximum(lo, blo), np.minimum(hi, bhi)


def _axial_positions(nodes: Sequence[NodeInstance], lo: np.ndarray, hi: np.ndarray) -> list[tuple[float, str]]:
    """Up to AXIAL_VIEWS axial levels (z mm): through the largest nodes, at least 10 mm apart; else the middle."""
    out: list[tuple[float, str]] = []
    for n in sorted(nodes, key=lambda n: (-n.short_axis_mm, n.id)):
        z = float(n.centre_mm[2])
        if all(abs(z - p) >= 10.0 for p, _ in out):
            out.append((z, f"through node {n.id} ({n.station or 'no station'}, {n.short_axis_mm:.1f} mm)"))
        if len(out) == AXIAL_VIEWS:
            break
    if not out:
        out.append((float((lo[2] + hi[2]) / 2.0), "middle of the mediastinum (no node found)"))
    return out


def write_node_overview(ct: sitk.Image, instances: sitk.Image, nodes: Sequence[NodeInstance], crop: CropBox,
                        path: str | Path, title: str = "", notes: Sequence[str] = ()) -> Path:
    """Write the node overview PNG (atomically) and return its path. ``instances`` is the instance map of
    ``nodes`` (ids 1..n) on any grid of the CT's space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    lo, hi = _view_box(ct, crop, nodes)
    by_id = {n.id: n for n in nodes}

    def draw(ax, axis: int, position: float, caption: str) -> None:
        ct_sl = _plane(ct, lo.copy(), hi.copy(), axis, position, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        lab = _plane(instances, lo.copy(), hi.copy(), axis, position, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
        origin = "upper" if axis == 2 else "lower"
        ax.imshow(np.clip(ct_sl, -160, 240), cmap="gray", origin=origin, interpolation="bilinear")
        for v in np.unique(lab):
            if v == 0 or int(v) not in by_id:
                continue
            node = by_id[int(v)]
            colour = station_color(node.station)
            mask = lab == v
            ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.4)
            ys, xs = np.nonzero(mask)
            ax.text(xs.max() + 3, ys.mean(), f"{node.station or '?'} {node.short_axis_mm:.1f}",
                    color=colour, fontsize=7, fontweight="bold", va="center",
                    bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.6, "linewidth": 0})
        ax.set_title(caption, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])

    fig = plt.figure(figsize=(16, 9), dpi=90)
    gs = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1.15, 1.0])
    levels = _axial_positions(nodes, lo, hi)
    spots = [gs[0, 0], gs[0, 1], gs[1, 0], gs[1, 1]]
    for spec, (z, caption) in zip(spots, levels, strict=False):
        draw(fig.add_subplot(spec), 2, z, f"axial z = {z:.0f} mm, {caption}  (R | L)")
    if nodes:
        largest = max(nodes, key=lambda n: (n.short_axis_mm, -n.id))
        y, why = float(largest.centre_mm[1]), f"through node {largest.id}"
    else:
        y, why = float((lo[1] + hi[1]) / 2.0), "through the middle"
    draw(fig.add_subplot(gs[:, 2]), 1, y, f"coronal y = {y:.0f} mm, {why}  (R | L)")

    ax = fig.add_subplot(gs[:, 3])
    ax.axis("off")
    rows = [["id", "station", "short", "long", "ml", "SUVmax", "score"]]
    for n in list(nodes)[:TABLE_ROWS]:
        rows.append([str(n.id), n.station or "-", f"{n.short_axis_mm:.1f}", f"{n.long_axis_mm:.1f}",
                     f"{n.volume_ml:.2f}", "-" if n.suv_max is None else f"{n.suv_max:.1f}", f"{n.score:.2f}"])
    if len(nodes) > TABLE_ROWS:
        rows.append(["...", f"+{len(nodes) - TABLE_ROWS}", "", "", "", "", ""])
    table = ax.table(cellText=rows, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.15)
    for i, n in enumerate(list(nodes)[:TABLE_ROWS], start=1):
        table[i, 1].set_facecolor((*station_color(n.station), 0.6))
    used = sorted({n.station for n in nodes if n.station}, key=STATION_NAMES.index)
    handles = [Patch(color=station_color(s), label=s) for s in used]
    if any(n.station is None for n in nodes):
        handles.append(Patch(color=NO_STATION_COLOR, label="no station"))
    if handles:
        ax.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, title="outline colour: station",
                  title_fontsize=8, frameon=False)
    fig.suptitle(title or f"{len(nodes)} lymph node(s) found", fontsize=13, fontweight="bold", y=0.985)
    footer = [*notes, "Labels: station and short axis (mm); short and long axis (mm) are measured on the node's axial "
              "slice of largest area. "
              "CT window -160..240 HU. Research software, not a medical device."]
    fig.text(0.01, 0.005, "\n".join(footer), fontsize=8, linespacing=1.4)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.93, bottom=0.04 + 0.018 * len(footer), wspace=0.05, hspace=0.12)
    return write_figure(fig, path)
