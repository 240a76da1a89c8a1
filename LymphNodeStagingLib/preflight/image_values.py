"""The grid and the values of a CT (HU) or PET (SUV) image checked against what the pipeline can use.

=========================  ===================================================================================
check                      bound (refused outside it)
=========================  ===================================================================================
spacing                    0.3 to 10 mm along every axis (``SPACING_MM``)
size                       2 to 2048 voxels along every axis (``SIZE_VOXELS``: a volume, not a slice; a PET
                           that covers too little is refused by the mediastinal coverage check)
finite values              no NaN or infinite voxel (CT, PET and anatomy)
not constant               the image holds more than one value
CT in HU                   voxels below -1100 HU are padding outside the reconstruction circle (e.g. -2048 or
                           -3024) and not counted, up to half the image (``CT_PADDING_MAX``); of the others at least
                           95 % within -1100..4000 HU (``CT_RANGE_HU``, ``CT_IN_RANGE``) and at least 1 % air,
                           -1100..-500 HU (around the body and in the lungs, ``CT_AIR_*``). A CT of stored values
                           without the rescale (0..4095) has no air and is refused with that reason.
PET in SUV                 at most 0.1 % of the voxels below -0.5 SUV (``PET_NEGATIVE_*``; small negatives from
                           reconstruction noise are allowed) and the 99th percentile at most 100 SUV (an image in
                           Bq/ml declared as SUV is refused, ``PET_P99_MAX_SUV``)
=========================  ===================================================================================
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

#: Voxel spacing accepted along every axis, mm.
SPACING_MM: tuple[float, float] = (0.3, 10.0)
#: Image size accepted along every axis, voxels.
SIZE_VOXELS: tuple[int, int] = (2, 2048)
#: The HU range most CT voxels lie in, and the share that must.
CT_RANGE_HU: tuple[float, float] = (-1100.0, 4000.0)
CT_IN_RANGE = 0.95
#: Voxels below the range are padding outside the reconstruction circle (e.g. -2048 or -3024), up to this share.
CT_PADDING_MAX = 0.5
#: Air: voxels from the bottom of the HU range up to this value, and the share of them a thoracic CT has at least.
CT_AIR_HU = -500.0
CT_AIR_FRACTION = 0.01
#: Negative SUV tolerated from reconstruction noise: voxels below PET_NEGATIVE_SUV may be at most this share.
PET_NEGATIVE_SUV = -0.5
PET_NEGATIVE_FRACTION = 0.001
#: An SUV image's 99th percentile is far below this; above it the values are activity concentrations.
PET_P99_MAX_SUV = 100.0


def check_grid(size, spacing, what: str) -> None:
    """Refuse a grid with a spacing outside SPACING_MM or a size outside SIZE_VOXELS along any axis."""
    lo, hi = SPACING_MM
    bad = [f"{axis} {s:g} mm" for axis, s in zip("xyz", spacing, strict=False) if not (lo <= s <= hi)]
    if bad:
        raise InputError(f"{what}: voxel spacing {', '.join(bad)} is outside {lo:g}..{hi:g} mm; expected the "
                         "spacing of a clinical CT or PET (check the header's pixel spacing and slice thickness)")
    nlo, nhi = SIZE_VOXELS
    bad = [f"{axis} {int(n)}" for axis, n in zip("xyz", size, strict=False) if not (nlo <= int(n) <= nhi)]
    if bad:
        raise InputError(f"{what}: size {', '.join(bad)} voxels is outside {nlo}..{nhi} per axis; expected a 3D "
                         "volume, not a single slice")


def check_image_grid(image: sitk.Image, what: str) -> None:
    check_grid(image.GetSize(), image.GetSpacing(), what)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayViewFromImage(image)


def check_finite(image: sitk.Image, what: str) -> None:
    """Refuse NaN or infinite voxels, giving their count."""
    arr = _array(image)
    if arr.dtype.kind != "f":
        return
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        nan = int(np.count_nonzero(np.isnan(arr)))
        raise InputError(f"{what}: {bad:,} of {arr.size:,} voxels ({bad / arr.size:.2%}) are not finite ({nan:,} NaN, "
                         f"{bad - nan:,} infinite); expected finite values in every voxel (a damaged file or a failed "
                         "conversion)")


def _check_not_constant(arr: np.ndarray, what: str) -> tuple[float, float]:
    lo, hi = float(arr.min()), float(arr.max())
    if lo == hi:
        raise InputError(f"{what}: every voxel holds the same value ({lo:g}); expected an image with content")
    return lo, hi


def check_ct_values(image: sitk.Image, what: str) -> None:
    """Refuse a CT that is constant or whose values are not Hounsfield units (see the module's table)."""
    check_finite(image, what)
    arr = _array(image)
    lo, hi = _check_not_constant(arr, what)
    span = f"values {lo:g}..{hi:g}"
    low = int(np.count_nonzero(arr < CT_RANGE_HU[0]))
    if low > CT_PADDING_MAX * arr.size:
        raise InputError(f"{what}: {low / arr.size:.1%} of the voxels are below {CT_RANGE_HU[0]:g} HU ({span}); "
                         f"expected a CT in Hounsfield units (values below {CT_RANGE_HU[0]:g} HU are padding outside "
                         f"the reconstruction circle, at most {CT_PADDING_MAX:.0%} of the image)")
    n = max(arr.size - low, 1)  # the padding is not counted
    inside = 1.0 - int(np.count_nonzero(arr > CT_RANGE_HU[1])) / n
    air = int(np.count_nonzero((arr < CT_AIR_HU) & (arr >= CT_RANGE_HU[0]))) / n
    if inside < CT_IN_RANGE:
        raise InputError(f"{what}: only {inside:.1%} of the voxels lie within {CT_RANGE_HU[0]:g}..{CT_RANGE_HU[1]:g} "
                         f"HU ({span}); expected a CT in Hounsfield units (at least {CT_IN_RANGE:.0%} of the voxels in "
                         "that range, not counting the padding below it)")
    if air < CT_AIR_FRACTION:
        hint = ("; with no negative value this looks like stored values without the rescale to HU (HU = stored x "
                "RescaleSlope + RescaleIntercept, often stored - 1024)" if lo >= 0 else "")
        raise InputError(f"{what}: only {air:.2%} of the voxels are air ({CT_RANGE_HU[0]:g}..{CT_AIR_HU:g} HU; "
                         f"{span}); expected a thoracic CT in Hounsfield units, with air around the body and in the "
                         f"lungs (at least {CT_AIR_FRACTION:.0%} of the voxels){hint}")


def check_pet_values(image: sitk.Image, what: str) -> None:
    """Refuse a PET that is constant, negative beyond reconstruction noise, or not in SUV (see the module's table)."""
    check_finite(image, what)
    arr = _array(image)
    lo, hi = _check_not_constant(arr, what)
    negative = int(np.count_nonzero(arr < PET_NEGATIVE_SUV))
    if negative > PET_NEGATIVE_FRACTION * arr.size:
        raise InputError(f"{what}: {negative:,} of {arr.size:,} voxels ({negative / arr.size:.2%}) are below "
                         f"{PET_NEGATIVE_SUV:g} SUV (minimum {lo:.3g}); expected SUV >= 0 (reconstruction noise may "
                         f"leave at most {PET_NEGATIVE_FRACTION:.1%} of the voxels below {PET_NEGATIVE_SUV:g})")
    p99 = float(np.percentile(arr, 99))
    if p99 > PET_P99_MAX_SUV:
        raise InputError(f"{what}: 1 % of the voxels are above {p99:.4g} (maximum {hi:.4g}); expected SUV (99th "
                         f"percentile at most {PET_P99_MAX_SUV:g}): this looks like activity concentration (Bq/ml), "
                         "not SUV; give the DICOM PET series so that SUV is computed from its header")
