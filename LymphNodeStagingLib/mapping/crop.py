"""The mediastinal region of a case: a physical box around lungs + trachea + heart of the anatomy (or around the station
map) plus a margin (default 40 mm: the 32 mm half-patch of the classifier plus augmentation slack), and the check that
the PET covers it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..anatomy.vocabulary import ids_for
from ..errors import InputError
from ..io.images import physical_bounds

DEFAULT_MARGIN_MM = 40.0


@dataclass
class CropBox:
    """A physical (LPS, mm) axis-aligned box: ``core`` is the structures' extent, ``lower``/``upper`` add the margin."""

    lower: np.ndarray
    upper: np.ndarray
    core_lower: np.ndarray
    core_upper: np.ndarray
    margin_mm: float
    source: str

    def to_dict(self) -> dict:
        return {"lower_mm": self.lower.round(2).tolist(), "upper_mm": self.upper.round(2).tolist(),
                "core_lower_mm": self.core_lower.round(2).tolist(), "core_upper_mm": self.core_upper.round(2).tolist(),
                "margin_mm": self.margin_mm, "source": self.source}


def _mask_bounds(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    arr = sitk.GetArrayViewFromImage(mask)
    idx = np.argwhere(arr)
    lo_zyx, hi_zyx = idx.min(axis=0), idx.max(axis=0)
    lo, hi = lo_zyx[::-1] - 0.5, hi_zyx[::-1] + 0.5  # voxel edges
    corners = [mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
               for c in itertools.product(*zip(lo, hi, strict=True))]
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def mediastinal_crop(anatomy: sitk.Image | None = None, *, stations: sitk.Image | None = None,
                     margin_mm: float = DEFAULT_MARGIN_MM, clip_to: sitk.Image | None = None) -> CropBox:
    """Box around lungs + trachea + heart of ``anatomy`` (ids of the anatomy vocabulary), or around the non-zero
    station map when given, plus ``margin_mm``; clipped to the extent of ``clip_to`` when given."""
    if margin_mm < 0:
        raise InputError(f"margin_mm = {margin_mm}: expected >= 0")
    if stations is not None:
        mask = sitk.Cast(stations, sitk.sitkUInt8) > 0
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise InputError("the station map is empty: no station label to crop around")
        source = "stations"
    else:
        if anatomy is None:
            raise InputError("mediastinal_crop needs an anatomy label map or a station map")
        arr = sitk.GetArrayViewFromImage(anatomy)
        lungs = np.isin(arr, ids_for("lungs"))
        trachea = np.isin(arr, ids_for("trachea"))
        if not lungs.any() or not trachea.any():
            raise InputError("CT is not a thorax (no lungs/trachea found in the anatomy label map): "
                             f"lung voxels {int(lungs.sum())}, trachea voxels {int(trachea.sum())}")
        sel = lungs | trachea | np.isin(arr, ids_for("heart"))
        mask = sitk.GetImageFromArray(sel.astype(np.uint8))
        mask.CopyInformation(anatomy)
        source = "anatomy: lungs + trachea + heart"
    core_lo, core_hi = _mask_bounds(mask)
    lo, hi = core_lo - margin_mm, core_hi + margin_mm
    if clip_to is not None:
        blo, bhi = physical_bounds(clip_to)
        lo, hi = np.maximum(lo, blo), np.minimum(hi, bhi)
    return CropBox(lo, hi, core_lo, core_hi, float(margin_mm), source)


def check_pet_covers(pet: sitk.Image, box: CropBox, tolerance_mm: float | None = None) -> None:
    """Refuse a PET whose extent does not contain the mediastinal core box (tolerance: half a PET voxel)."""
    lo, hi = physical_bounds(pet)
    tol = 0.5 * max(pet.GetSpacing()) if tolerance_mm is None else tolerance_mm
    short_lo = np.maximum(lo - tol - box.core_lower, 0)
    short_hi = np.maximum(box.core_upper - hi - tol, 0)
    if np.any(short_lo > 0) or np.any(short_hi > 0):
        raise InputError(
            f"PET does not cover the mediastinum: PET spans {np.round(lo, 1)}..{np.round(hi, 1)} mm, the mediastinal "
            f"region ({box.source}) spans {np.round(box.core_lower, 1)}..{np.round(box.core_upper, 1)} mm "
            f"(short by {np.round(short_lo, 1)} below and {np.round(short_hi, 1)} above, x/y/z LPS)")
