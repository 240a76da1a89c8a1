"""PNG overview of an assessment: CT with PET and the stations coloured by malignancy probability, a legend, the
station table and the N-stage. Axial views in radiological convention (patient right on the viewer's left).

A result computed with the synthetic demo atlases or the demo model gets a red banner across the top
(``CaseResult.demo_banner``); stations the station mapping flagged are marked "!" in the table (orange) and the
mapping warnings are listed under the pictures. A CT assessed without PET (``result.modality`` "ct") says "CT only (no
PET)" in its title and shows the CT without a PET overlay. With lymph nodes (a node model ran), every view outlines the
nodes it cuts (labelled with their short axis) and the table gets a "nodes" column: count (largest short axis, mm).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.files import write_figure
from ..staging.result import ABSENT, MODALITY_CT, POSITIVE, CaseResult
from ..staging.stations import STATION_NAMES

DISPLAY_SPACING_MM = 1.5
#: PET display: uptake below SUV 2.5 (blood pool, liver, most benign nodes) is not painted; hot colours up to SUV 10.
PET_SHOWN_FROM_SUV = 2.5
PET_SATURATED_SUV = 10.0
MARGIN_MM = 40.0
#: Outline of the lymph nodes: one colour that none of the probability colours, the red/white station outlines or the
#: PET colours use.
NODE_OUTLINE = "#00e5ff"
#: Axial levels shown: the station whose centre sets the slice, with a readable caption.
LEVELS = (("2R", "upper paratracheal (2R/2L)"), ("4R", "lower paratracheal (4R/4L)"), ("7", "subcarinal (7)"),
          ("10L", "hilar (10R/10L)"))


def _display_grid(station_map: sitk.Image, ct: sitk.Image) -> sitk.Image:
    arr = sitk.GetArrayViewFromImage(station_map)
    nz = np.argwhere(arr > 0)
    if nz.size == 0:
        ref = ct
        lo_idx, hi_idx = np.zeros(3), np.asarray(ct.GetSize()[::-1]) - 1
    else:
        ref = station_map
        lo_idx, hi_idx = nz.min(axis=0), nz.max(axis=0)
    corners = []
    for z in (lo_idx[0], hi_idx[0]):
        for y in (lo_idx[1], hi_idx[1]):
            for x in (lo_idx[2], hi_idx[2]):
                corners.append(ref.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z))))
    corners = np.asarray(corners)
    lo = corners.min(axis=0) - MARGIN_MM
    hi = corners.max(axis=0) + MARGIN_MM
    size = np.maximum(np.ceil((hi - lo) / DISPLAY_SPACING_MM).astype(int) + 1, 1)
    grid = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    grid.SetOrigin(tuple(float(v) for v in lo))
    grid.SetSpacing((DISPLAY_SPACING_MM,) * 3)
    return grid


def _index_of(grid: sitk.Image, point_mm) -> tuple[int, int, int] | None:
    if point_mm is None:
        return None
    idx = grid.TransformPhysicalPointToIndex(tuple(float(v) for v in point_mm))
    return tuple(int(np.clip(i, 0, s - 1)) for i, s in zip(idx, grid.GetSize(), strict=True))


#: Colours of the demo banner and of the mapping warnings.
BANNER_FACE, BANNER_TEXT, FLAG_FACE = "#c62828", "white", "#ffb74d"


def banner_text(result: CaseResult) -> str | None:
    """The text of the demo banner (two lines), None for a result without demo provenance."""
    if not result.demo_banner:
        return None
    statement = result.provenance.get("statement") or "computed with synthetic demo data: not valid for patients"
    head, _, advice = statement.partition("; ")
    return head.upper() + (f"\n{advice[:1].upper()}{advice[1:]}" if advice else "")


def mapping_notes(result: CaseResult) -> list[str]:
    """One line per station-mapping flag naming its stations, e.g. "low_agreement: 4R, 7" (the stations the table
    marks with "!")."""
    by_flag: dict[str, list[str]] = {}
    for s in result.stations:
        for f in s.flags:
            if f.startswith("mapping:"):
                by_flag.setdefault(f.split(":", 1)[1], []).append(s.name)
    return [f"{flag}: {', '.join(names)}" for flag, names in by_flag.items()]


def write_overview(ct: sitk.Image, pet: sitk.Image | None, station_map: sitk.Image, result: CaseResult,
                   path: str | Path, node_map: sitk.Image | None = None) -> Path:
    """Write the overview PNG (atomically) and return its path. ``node_map``: the lymph node instance map (ids of
    ``result.nodes``, 0 = background), outlined in every view. ``pet`` None: the CT alone, no PET overlay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    grid = _display_grid(station_map, ct)
    ct_d = sitk.GetArrayFromImage(sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1000.0,
                                                sitk.sitkFloat32))
    pet_d = None if pet is None else sitk.GetArrayFromImage(sitk.Resample(pet, grid, sitk.Transform(),
                                                                          sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    st_d = sitk.GetArrayFromImage(sitk.Resample(station_map, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8))
    nodes_d = None
    short_axis = {int(n["id"]): float(n.get("short_axis_mm") or 0.0) for n in result.nodes or []}
    node_p = {int(n["id"]): float(n["probability"]) for n in result.nodes or [] if n.get("probability") is not None}
    if node_map is not None:
        nodes_d = sitk.GetArrayFromImage(sitk.Resample(node_map, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                       sitk.sitkUInt32))
    cmap = colormaps["RdYlGn_r"]
    norm = Normalize(0.0, 1.0)
    by_name = {s.name: s for s in result.stations}
    lut = np.zeros((len(STATION_NAMES) + 1, 4))
    for i, name in enumerate(STATION_NAMES, start=1):
        s = by_name.get(name)
        if s is None or s.status == ABSENT or s.probability is None:
            lut[i] = (0.6, 0.6, 0.6, 0.35)
        else:
            lut[i] = (*cmap(norm(s.probability))[:3], 0.55)

    def draw_nodes(ax, node_sl) -> None:
        for v in np.unique(node_sl):
            if v == 0:
                continue
            mask = node_sl == v
            ax.contour(mask, levels=[0.5], colors=[NODE_OUTLINE], linewidths=1.3)
            if int(v) in short_axis:
                ys, xs = np.nonzero(mask)
                label = f"{short_axis[int(v)]:.0f}" + (f" p{node_p[int(v)]:.2f}" if int(v) in node_p else "")
                ax.text(xs.max() + 2, ys.mean(), label, color=NODE_OUTLINE, fontsize=6, va="center",
                        fontweight="bold")

    def draw(ax, ct_sl, pet_sl, st_sl, origin: str, title: str, node_sl=None) -> None:
        ax.imshow(np.clip(ct_sl, -160, 240), cmap="gray", origin=origin, interpolation="bilinear")
        if pet_sl is not None:
            ax.imshow(np.ma.masked_less(pet_sl, PET_SHOWN_FROM_SUV), cmap="hot", vmin=PET_SHOWN_FROM_SUV,
                      vmax=PET_SATURATED_SUV, alpha=0.6, origin=origin, interpolation="bilinear")
        ax.imshow(lut[st_sl], origin=origin, interpolation="nearest")
        for v in np.unique(st_sl):
            if v == 0:
                continue
            name = STATION_NAMES[v - 1]
            s = by_name.get(name)
            ys, xs = np.nonzero(st_sl == v)
            positive = s is not None and s.status == POSITIVE
            ax.contour(st_sl == v, levels=[0.5], colors=["red" if positive else "white"],
                       linewidths=1.6 if positive else 0.6)
            ax.text(xs.mean(), ys.mean(), name, color="black" if not positive else "white", fontsize=7,
                    ha="center", va="center", fontweight="bold")
        if node_sl is not None:
            draw_nodes(ax, node_sl)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])

    fig = plt.figure(figsize=(15, 8.5), dpi=90)
    gs = fig.add_gridspec(2, 4, width_ratios=[1, 1, 1, 1.05])
    panels = []
    for k, (name, caption) in enumerate(LEVELS[:3]):
        s = by_name.get(name)
        idx = _index_of(grid, s.centre_mm if s is not None and s.centre_mm else None)
        if idx is None:  # fall back to the mirror station, then the middle slice
            alt = by_name.get(name.replace("R", "L") if name.endswith("R") else name.replace("L", "R"))
            idx = _index_of(grid, alt.centre_mm if alt is not None and alt.centre_mm else None)
        z = idx[2] if idx is not None else grid.GetSize()[2] // 2
        panels.append((gs[k // 2, k % 2], z, caption))
    for spec, z, caption in panels:
        ax = fig.add_subplot(spec)
        draw(ax, ct_d[z], None if pet_d is None else pet_d[z], st_d[z], "upper", f"axial, {caption}  (R | L)",
             None if nodes_d is None else nodes_d[z])
    # hilar level in the second row
    s10 = by_name.get("10R") if by_name.get("10R") and by_name["10R"].centre_mm else by_name.get("10L")
    idx = _index_of(grid, s10.centre_mm if s10 is not None and s10.centre_mm else None)
    z = idx[2] if idx is not None else grid.GetSize()[2] // 2
    draw(fig.add_subplot(gs[1, 1]), ct_d[z], None if pet_d is None else pet_d[z], st_d[z], "upper",
         "axial, hilar (10R/10L)  (R | L)",
         None if nodes_d is None else nodes_d[z])
    # coronal through the subcarinal station (or the middle)
    s7 = by_name.get("7")
    idx = _index_of(grid, s7.centre_mm if s7 is not None and s7.centre_mm else None)
    y = idx[1] if idx is not None else grid.GetSize()[1] // 2
    draw(fig.add_subplot(gs[:, 2]), ct_d[:, y, :], None if pet_d is None else pet_d[:, y, :], st_d[:, y, :], "lower",
         "coronal  (R | L)",
         None if nodes_d is None else nodes_d[:, y, :])

    # table and stage
    ax = fig.add_subplot(gs[:, 3])
    ax.axis("off")
    rows = [["station", "p", "status", "SUVmax", "agree"]]
    flagged = {s.name for s in result.stations if any(f.startswith("mapping:") for f in s.flags)}
    per_station = result.station_nodes()
    for s in result.stations:
        rows.append([s.name + (" !" if s.name in flagged else ""),
                     "-" if s.probability is None else f"{s.probability:.2f}", s.status + (" *" if s.override
                     else ""), "-" if s.suv_max is None else f"{s.suv_max:.1f}",
                     "-" if s.agreement is None else f"{s.agreement:.2f}"])
    widths = [0.16, 0.14, 0.3, 0.18, 0.16]
    top = result.top_nodes()
    if per_station:
        rows[0].append("nodes")
        for row, s in zip(rows[1:], result.stations, strict=True):
            count, largest = per_station[s.name]
            text = f"{count} ({largest:.0f})" if count and largest is not None else str(count)
            if s.name in top and s.node_probability is not None:  # the most suspicious node and the nodes' p
                text = f"{count} #{top[s.name]['id']} {s.node_probability:.2f}"
            row.append(text)
        widths = [0.14, 0.12, 0.26, 0.15, 0.13, 0.17]
    table = ax.table(cellText=rows, loc="upper center", cellLoc="center", colWidths=widths)
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.18)
    for i, s in enumerate(result.stations, start=1):
        if s.probability is not None:
            table[i, 1].set_facecolor((*cmap(norm(s.probability))[:3], 0.6))
        if s.status == POSITIVE:
            table[i, 2].set_text_props(color="darkred", fontweight="bold")
        if s.name in flagged:
            for j in (0, 4):
                table[i, j].set_facecolor(FLAG_FACE)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    cbar = fig.colorbar(sm, ax=ax, orientation="horizontal", fraction=0.04, pad=0.02, aspect=30)
    cbar.ax.axvline(result.threshold, color="black", lw=2)  # the operating threshold, on the probability scale shown
    cal = (result.model or {}).get("calibrated")
    scale = "calibrated " if cal else ("uncalibrated " if cal is False else "")
    cbar.set_label(f"{scale}malignancy probability\nblack line: threshold {result.threshold:.2f}; grey: not found")
    deciding = ", ".join(result.deciding_stations) or "none"
    banner = banner_text(result)
    top = 0.95 if banner is None else 0.88
    ct_only = result.modality == MODALITY_CT or pet is None
    fig.suptitle(f"{'CT only (no PET) - ' if ct_only else ''}{result.case_id}: {result.n_stage} (TNM9 {result.tnm9}) - "
                 f"{result.rules} rules, tumour side {result.side}; deciding stations: {deciding}", fontsize=13,
                 fontweight="bold",
                 y=0.985 if banner is None else top + 0.03)
    notes = mapping_notes(result)
    footer = ["! station map implausible or repaired, check these stations:"] + [f"    {n}" for n in notes] if notes \
        else []
    if result.nodes is not None:
        if node_p:
            footer.append(f"Cyan outline: lymph node found by the node model ({len(result.nodes)} in all), labelled "
                          "with its short axis (mm) and its malignancy probability; table column 'nodes': count in "
                          "the station, #id of its most suspicious node, the station's probability from its nodes.")
        else:
            footer.append(f"Cyan outline: lymph node found by the node model ({len(result.nodes)} in all), labelled "
                          "with its short axis (mm); table column 'nodes': count in the station (largest short "
                          "axis, mm).")
    if ct_only:
        footer.append("Red outline: positive station. CT only (no PET): no PET overlay, no SUV; station probabilities "
                      "from a CT-only model. Research software, not a medical device.")
    else:
        footer.append(f"Red outline: positive station. PET over CT from SUV {PET_SHOWN_FROM_SUV:g} (hot, saturated "
                      f"at SUV {PET_SATURATED_SUV:g}; blood pool and liver lie below it). Research software, not a "
                      "medical device.")
    fig.text(0.01, 0.005, "\n".join(footer), fontsize=8, color="black", linespacing=1.4)
    bottom = 0.02 + 0.022 * (len(footer) - 1)
    if banner is not None:
        # full-width red band above everything else: the first thing a reader sees
        fig.patches.append(plt.Rectangle((0, 0.93), 1, 0.07, transform=fig.transFigure, facecolor=BANNER_FACE,
                                         edgecolor="none", zorder=10))
        fig.text(0.5, 0.965, banner, ha="center", va="center", fontsize=12, fontweight="bold", color=BANNER_TEXT,
                 zorder=11, linespacing=1.3)
    fig.tight_layout(rect=(0, bottom, 1, top), h_pad=2.0)
    return write_figure(fig, path)
