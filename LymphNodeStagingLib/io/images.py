"""Image files and geometry: reading CT/PET images (DICOM folders or NIfTI, NRRD, MHA), describing and comparing
their grids in patient space, and resampling one onto another."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def describe_grid(image: sitk.Image) -> dict:
    return {"size": list(image.GetSize()), "spacing": [round(s, 6) for s in image.GetSpacing()],
            "origin": [round(o, 4) for o in image.GetOrigin()], "direction": [round(d, 6) for d in image.GetDirection()]}


def _is_image_file(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def read_image_file(path: str | Path, pixel_type=sitk.sitkFloat32) -> sitk.Image:
    """An image file (NIfTI, NRRD, MHA/MHD) as a SimpleITK image of ``pixel_type``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if not _is_image_file(path):
        raise InputError(f"{path}: unknown image format; expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: cannot be read as an image: {exc}") from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path}: expected a 3D scalar image, got dimension {img.GetDimension()} with "
                         f"{img.GetNumberOfComponentsPerPixel()} components")
    return sitk.Cast(img, pixel_type) if pixel_type is not None else img


def load_ct(path: str | Path, series: str | None = None) -> tuple[sitk.Image, str | None, str | None]:
    """CT in HU (float32) from a DICOM folder or an image file; returns (image, SeriesInstanceUID, FrameOfReferenceUID)."""
    path = Path(path)
    if path.is_dir():
        from .dicom_series import find_series

        ser = find_series(path, "CT", series)
        return ser.to_image(ser.rescaled_array()), ser.info.series_uid, ser.frame_of_reference_uid
    return read_image_file(path), None, None


# ------------------------------------------------------------------------------------------------ geometry


def physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned (LPS) bounding box of the image's voxel extent (voxel edges, not centres), in mm."""
    size = np.array(image.GetSize())
    corners = []
    for c in itertools.product(*[(-0.5, s - 0.5) for s in size]):
        corners.append(image.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]))
    corners = np.array(corners)
    return corners.min(axis=0), corners.max(axis=0)


def overlap_fraction(a: sitk.Image, b: sitk.Image) -> float:
    """Volume of the intersection of the two bounding boxes over the smaller box (0 = disjoint)."""
    alo, ahi = physical_bounds(a)
    blo, bhi = physical_bounds(b)
    inter = np.clip(np.minimum(ahi, bhi) - np.maximum(alo, blo), 0, None)
    smaller = min(np.prod(ahi - alo), np.prod(bhi - blo))
    return float(np.prod(inter) / smaller) if smaller > 0 else 0.0


def check_same_space(ct: sitk.Image, pet: sitk.Image, ct_for: str | None = None, pet_for: str | None = None,
                     names: tuple[str, str] = ("CT", "PET"), min_overlap: float = 0.05) -> float:
    """Refuse PET/CT pairs from different frames of reference or without physical overlap; returns the overlap."""
    if ct_for and pet_for and ct_for != pet_for:
        raise InputError(f"FrameOfReferenceUID (0020,0052) differs: {names[0]} has {ct_for}, {names[1]} has "
                         f"{pet_for}; expected PET and CT of one acquisition in one patient space")
    frac = overlap_fraction(ct, pet)
    if frac <= 0.0:
        lo1, hi1 = physical_bounds(ct)
        lo2, hi2 = physical_bounds(pet)
        raise InputError(f"PET and CT do not overlap in patient space: {names[0]} spans {np.round(lo1, 1)}.."
                         f"{np.round(hi1, 1)} mm, {names[1]} spans {np.round(lo2, 1)}..{np.round(hi2, 1)} mm")
    if frac < min_overlap:
        raise InputError(f"PET and CT overlap in only {frac:.1%} of the smaller volume ({names[0]}, {names[1]}); "
                         "expected the same body region")
    return frac
