"""Preview PNG of a phantom patient: axial slices through 2R/4R, 7 and 10R/10L and a coronal view; CT (mediastinal
window) with PET (SUV) and station outlines overlaid, malignant nodes outlined in red."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..io.files import write_figure
from ..staging.stations import STATIONS, parse_station
from .patient import PhantomPatient


def _slice_through(st: np.ndarray, names: list[str], axis: int) -> int:
    labs = [parse_station(n).label for n in names]
    m = np.isin(st, labs)
    if not m.any():
        return st.shape[axis] // 2
    other = tuple(a for a in range(3) if a != axis)
    counts = m.sum(axis=other)
    return int(np.argmax(counts))


def write_preview(patient: PhantomPatient, path: str | Path) -> Path:
    """Write the preview PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    ct = sitk.GetArrayFromImage(patient.ct).astype(np.float32)
    pet = sitk.GetArrayFromImage(sitk.Resample(patient.pet, patient.ct, sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    st = sitk.GetArrayFromImage(patient.stations)
    les = sitk.GetArrayFromImage(patient.lesions)
    sx, sy, sz = patient.ct.GetSpacing()
    colors = np.zeros((18, 4))
    for s in STATIONS:
        colors[s.label, :3] = np.asarray(s.color) / 255.0
        colors[s.label, 3] = 1.0
    cmap = ListedColormap(colors)
    views = [("axial 2R/4R", 0, ["2R", "4R"]), ("axial 7", 0, ["7"]), ("axial 10R/10L", 0, ["10R", "10L"]),
             ("coronal", 1, ["7", "4R", "10R", "10L"])]
    fig, axes = plt.subplots(1, 4, figsize=(20, 5.6), facecolor="black")
    for ax, (title, axis, names) in zip(axes, views, strict=True):
        k = _slice_through(st, names, axis)
        if axis == 0:
            c, p, s, lz = ct[k], pet[k], st[k], les[k]
            aspect = sy / sx
            where = f"z = {patient.ct.GetOrigin()[2] + k * sz:.0f} mm"
        else:
            c, p, s, lz = ct[::-1, k], pet[::-1, k], st[::-1, k], les[::-1, k]
            aspect = sz / sx
            where = f"y = {patient.ct.GetOrigin()[1] + k * sy:.0f} mm"
        ax.imshow(c, cmap="gray", vmin=-160, vmax=240, aspect=aspect, interpolation="nearest")
        ax.imshow(np.ma.masked_less(p, 1.0), cmap="hot", vmin=0, vmax=8, alpha=0.55, aspect=aspect)
        edges = s != np.roll(s, 1, axis=0)
        edges |= s != np.roll(s, 1, axis=1)
        ax.imshow(np.ma.masked_where(~edges | (s == 0), s), cmap=cmap, vmin=0, vmax=17, aspect=aspect,
                  interpolation="nearest")
        if lz.any():
            ax.contour(lz, levels=[0.5], colors="red", linewidths=0.8)
        for lab in np.unique(s):
            if lab:
                yy, xx = np.nonzero(s == lab)
                ax.text(xx.mean(), yy.mean(), STATIONS[lab - 1].name, color="cyan", fontsize=8, ha="center")
        ax.set_title(f"{title} ({where})", color="white", fontsize=10)
        ax.text(0.01, 0.01, "R", color="white", transform=ax.transAxes)
        ax.text(0.97, 0.01, "L", color="white", transform=ax.transAxes)
        ax.axis("off")
    t = patient.truth
    fig.suptitle(f"{patient.patient_id}  {t['n_stage']}  tumour {t['tumour_side']} {t.get('tumour_lobe') or ''}  "
                 f"positive: {', '.join(t['positive_stations']) or 'none'}  (synthetic phantom)", color="white")
    fig.tight_layout()
    return write_figure(fig, path, dpi=80, facecolor="black")
