"""Loading a PET/CT case, checking its geometry, resampling and the paper's preprocessing.

* :func:`load_case` reads CT (HU) and PET (SUVbw) from DICOM folders (series found by modality) or image files
  (NIfTI, NRRD, MHA); PET from an image file must already be SUV (``pet_is_suv=True``).
* PET and CT keep their own grids; :func:`check_same_space` refuses different frames of reference or no overlap.
* :func:`preprocess`: both onto one isotropic grid (1 mm by default) over the mediastinal crop, CT -200..400 HU ->
  [0, 1] clipped, PET SUV / 4 unclipped.
* :func:`mediastinal_crop`: bounding box of lungs + trachea + heart from the anatomy (or of the station map when
  given) plus a margin (default 40 mm: the 32 mm half-patch of the classifier plus augmentation slack).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import LNSError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
CT_WINDOW_HU = (-200.0, 400.0)
PET_SUV_SCALE = 4.0
DEFAULT_MARGIN_MM = 40.0
CT_BACKGROUND_HU = -1024.0


class ImagingError(LNSError, ValueError):
    """An unreadable image, a PET and CT that do not describe the same patient space, or a crop that is impossible."""


@dataclass
class Case:
    """One PET/CT study: CT in HU and PET in SUV (float32), each on its own grid, with where they came from."""

    ct: sitk.Image
    pet: sitk.Image
    suv: dict = field(default_factory=dict)  # SUV provenance (SuvProvenance.to_dict() or the user's declaration)
    ct_path: str = ""
    pet_path: str = ""
    ct_series_uid: str | None = None
    pet_series_uid: str | None = None
    frame_of_reference_uid: str | None = None

    def geometry(self) -> dict:
        return {"ct": describe_grid(self.ct), "pet": describe_grid(self.pet),
                "frame_of_reference_uid": self.frame_of_reference_uid}


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
        raise ImagingError(f"{path}: file not found")
    if not _is_image_file(path):
        raise ImagingError(f"{path}: unknown image format; expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImagingError(f"{path}: cannot be read as an image: {exc}") from exc
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ImagingError(f"{path}: expected a 3D scalar image, got dimension {img.GetDimension()} with "
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


def load_pet(path: str | Path, *, pet_is_suv: bool = False, suv_mode: str = "qiba",
             series: str | None = None) -> tuple[sitk.Image, dict, str | None, str | None]:
    """PET in SUVbw (float32); returns (image, SUV provenance, SeriesInstanceUID, FrameOfReferenceUID)."""
    path = Path(path)
    if path.is_dir():
        from ..suv.conversion import compute_suv
        from .dicom_series import find_series

        ser = find_series(path, "PT", series)
        if pet_is_suv:
            prov = {"mode": "user", "decisions": ["pet_is_suv: rescaled stored values taken as SUV as declared"],
                    "warnings": ["SUV not computed from the DICOM header (pet_is_suv)"]}
            return ser.to_image(ser.rescaled_array()), prov, ser.info.series_uid, ser.frame_of_reference_uid
        res = compute_suv(ser, suv_mode)
        return res.image, res.provenance.to_dict(), ser.info.series_uid, ser.frame_of_reference_uid
    if not pet_is_suv:
        raise ImagingError(f"{path}: a PET image file has no DICOM header to compute SUV from; pass a DICOM folder, "
                           "or declare the file as SUV already (pet_is_suv=True, --pet-is-suv)")
    img = read_image_file(path)
    prov = {"mode": "user", "decisions": [f"{path.name}: declared SUV by the user (pet_is_suv)"], "warnings": []}
    return img, prov, None, None


def load_case(ct: str | Path, pet: str | Path, *, pet_is_suv: bool = False, suv_mode: str = "qiba",
              series: str | None = None, ct_series: str | None = None) -> Case:
    """Load CT (HU) and PET (SUV) and check that they share one patient space.

    ``series`` chooses the PET series and ``ct_series`` the CT series when a folder holds several
    (SeriesInstanceUID, SeriesNumber or SeriesDescription). CT and PET may be the same DICOM folder."""
    ct_img, ct_uid, ct_for = load_ct(ct, ct_series)
    pet_img, prov, pet_uid, pet_for = load_pet(pet, pet_is_suv=pet_is_suv, suv_mode=suv_mode, series=series)
    check_same_space(ct_img, pet_img, ct_for, pet_for, names=(str(ct), str(pet)))
    return Case(ct=ct_img, pet=pet_img, suv=prov, ct_path=str(ct), pet_path=str(pet), ct_series_uid=ct_uid,
                pet_series_uid=pet_uid, frame_of_reference_uid=ct_for or pet_for)


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
        raise ImagingError(f"FrameOfReferenceUID (0020,0052) differs: {names[0]} has {ct_for}, {names[1]} has "
                           f"{pet_for}; expected PET and CT of one acquisition in one patient space")
    frac = overlap_fraction(ct, pet)
    if frac <= 0.0:
        lo1, hi1 = physical_bounds(ct)
        lo2, hi2 = physical_bounds(pet)
        raise ImagingError(f"PET and CT do not overlap in patient space: {names[0]} spans {np.round(lo1, 1)}.."
                           f"{np.round(hi1, 1)} mm, {names[1]} spans {np.round(lo2, 1)}..{np.round(hi2, 1)} mm")
    if frac < min_overlap:
        raise ImagingError(f"PET and CT overlap in only {frac:.1%} of the smaller volume ({names[0]}, {names[1]}); "
                           "expected the same body region")
    return frac


_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline,
                  "label_gaussian": sitk.sitkLabelGaussian}


def _interp(interpolator) -> int:
    if isinstance(interpolator, str):
        if interpolator not in _INTERPOLATORS:
            raise ImagingError(f"interpolator '{interpolator}' is unknown; expected one of {', '.join(_INTERPOLATORS)}")
        return _INTERPOLATORS[interpolator]
    return int(interpolator)


def resample_to(image: sitk.Image, reference: sitk.Image, interpolator="linear", default_value: float = 0.0,
                pixel_type=None) -> sitk.Image:
    """``image`` resampled onto the grid of ``reference`` (identity transform: both in patient space)."""
    pt = image.GetPixelID() if pixel_type is None else pixel_type
    return sitk.Resample(image, reference, sitk.Transform(), _interp(interpolator), float(default_value), pt)


def make_grid(lower: np.ndarray, upper: np.ndarray, spacing_mm: float, direction=None) -> sitk.Image:
    """An empty float32 reference grid of isotropic ``spacing_mm`` covering the box lower..upper (in the frame of
    ``direction``, identity by default)."""
    d = np.eye(3) if direction is None else np.array(direction, dtype=float).reshape(3, 3)
    # box corners expressed along the grid axes
    corners = np.array(list(itertools.product(*zip(lower, upper, strict=True))))
    local = corners @ d  # coordinates along the direction columns
    lo, hi = local.min(axis=0), local.max(axis=0)
    size = np.maximum(np.ceil((hi - lo) / spacing_mm).astype(int), 1)
    origin_local = lo + 0.5 * spacing_mm
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetDirection([float(v) for v in d.ravel()])
    ref.SetOrigin([float(v) for v in d @ origin_local])
    return ref


def to_isotropic(image: sitk.Image, spacing_mm: float = 1.0, interpolator="linear",
                 default_value: float = 0.0) -> sitk.Image:
    """``image`` on an isotropic grid of the same orientation and physical extent."""
    if spacing_mm <= 0:
        raise ImagingError(f"spacing_mm = {spacing_mm}: expected a positive voxel size in mm")
    size = np.array(image.GetSize())
    spacing = np.array(image.GetSpacing())
    new_size = np.maximum(np.round(size * spacing / spacing_mm).astype(int), 1)
    d = np.array(image.GetDirection()).reshape(3, 3)
    # keep the outer voxel edge where it was
    edge = np.array(image.GetOrigin()) - d @ (0.5 * spacing)
    origin = edge + d @ (0.5 * np.full(3, spacing_mm))
    ref = sitk.Image([int(s) for s in new_size], image.GetPixelID())
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin([float(v) for v in origin])
    return resample_to(image, ref, interpolator, default_value)


def normalise_ct(array: np.ndarray) -> np.ndarray:
    """CT HU -> [0, 1]: -200 HU -> 0, 400 HU -> 1, clipped."""
    lo, hi = CT_WINDOW_HU
    return np.clip((np.asarray(array, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalise_pet(array: np.ndarray) -> np.ndarray:
    """SUV -> SUV / 4, not clipped (SUV 10 -> 2.5)."""
    return (np.asarray(array, dtype=np.float32) / PET_SUV_SCALE).astype(np.float32)


# ------------------------------------------------------------------------------------------------ mediastinal crop


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
        raise ImagingError(f"margin_mm = {margin_mm}: expected >= 0")
    if stations is not None:
        mask = sitk.Cast(stations, sitk.sitkUInt8) > 0
        if not np.any(sitk.GetArrayViewFromImage(mask)):
            raise ImagingError("the station map is empty: no station label to crop around")
        source = "stations"
    else:
        if anatomy is None:
            raise ImagingError("mediastinal_crop needs an anatomy label map or a station map")
        from ..anatomy.vocabulary import ids_for

        arr = sitk.GetArrayViewFromImage(anatomy)
        lungs = np.isin(arr, ids_for("lungs"))
        trachea = np.isin(arr, ids_for("trachea"))
        if not lungs.any() or not trachea.any():
            raise ImagingError("CT is not a thorax (no lungs/trachea found in the anatomy label map): "
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
        raise ImagingError(
            f"PET does not cover the mediastinum: PET spans {np.round(lo, 1)}..{np.round(hi, 1)} mm, the mediastinal "
            f"region ({box.source}) spans {np.round(box.core_lower, 1)}..{np.round(box.core_upper, 1)} mm "
            f"(short by {np.round(short_lo, 1)} below and {np.round(short_hi, 1)} above, x/y/z LPS)")


def crop_image(image: sitk.Image, box: CropBox) -> sitk.Image:
    """The part of ``image`` (on its own grid) inside ``box``."""
    size = np.array(image.GetSize())
    corners = [image.TransformPhysicalPointToContinuousIndex([float(v) for v in c])
               for c in itertools.product(*zip(box.lower, box.upper, strict=True))]
    corners = np.array(corners)
    lo = np.clip(np.floor(corners.min(axis=0) + 0.5).astype(int), 0, size - 1)
    hi = np.clip(np.ceil(corners.max(axis=0) - 0.5).astype(int), 0, size - 1)
    return sitk.RegionOfInterest(image, [int(v) for v in hi - lo + 1], [int(v) for v in lo])


@dataclass
class Preprocessed:
    """CT and PET on one isotropic grid, normalised as the classifier expects, with the crop used."""

    ct: sitk.Image  # CT normalised to [0, 1]
    pet: sitk.Image  # SUV / 4
    ct_hu: sitk.Image
    suv: sitk.Image
    box: CropBox | None
    spacing_mm: float


def preprocess(case: Case, anatomy: sitk.Image | None = None, *, stations: sitk.Image | None = None,
               spacing_mm: float = 1.0, margin_mm: float = DEFAULT_MARGIN_MM) -> Preprocessed:
    """The paper's preprocessing: one isotropic grid (``spacing_mm``) in the CT's orientation over the mediastinal
    crop (whole CT when neither anatomy nor stations are given); CT -200..400 HU -> [0, 1], PET SUV / 4."""
    if spacing_mm <= 0:
        raise ImagingError(f"spacing_mm = {spacing_mm}: expected a positive voxel size in mm")
    box = None
    if anatomy is not None or stations is not None:
        box = mediastinal_crop(anatomy, stations=stations, margin_mm=margin_mm, clip_to=case.ct)
        check_pet_covers(case.pet, box)
        lo, hi = box.lower, box.upper
    else:
        lo, hi = physical_bounds(case.ct)
    d = np.array(case.ct.GetDirection()).reshape(3, 3)
    ref = make_grid(lo, hi, spacing_mm, d)
    ct_hu = resample_to(case.ct, ref, "linear", CT_BACKGROUND_HU, sitk.sitkFloat32)
    suv = resample_to(case.pet, ref, "linear", 0.0, sitk.sitkFloat32)
    ct_n = sitk.GetImageFromArray(normalise_ct(sitk.GetArrayViewFromImage(ct_hu)))
    pet_n = sitk.GetImageFromArray(normalise_pet(sitk.GetArrayViewFromImage(suv)))
    ct_n.CopyInformation(ref)
    pet_n.CopyInformation(ref)
    return Preprocessed(ct=ct_n, pet=pet_n, ct_hu=ct_hu, suv=suv, box=box, spacing_mm=float(spacing_mm))
