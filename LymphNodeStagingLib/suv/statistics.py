"""SUV figures of the stations: SUVmax, SUVpeak (mean of the hottest 1 cm^3 sphere) and volume, inside a station map.
The assessment reports them and the SUVmax-threshold baseline of the evaluation uses them; a CT assessed without PET
gets the volumes alone (:func:`station_volume_stats`)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..staging.stations import NUM_STATIONS, STATION_NAMES

#: Radius of the sphere of 1 cm^3 used for SUVpeak, in mm.
SUVPEAK_RADIUS_MM = (3.0 / (4.0 * np.pi) * 1000.0) ** (1.0 / 3.0)


def station_volume_stats(station_map: sitk.Image) -> dict[str, dict[str, float]]:
    """Volume in ml of every station present in the map, by station name (``{"4R": {"volume_ml": 3.2}, ...}``): the
    figures of :func:`station_suv_stats` that need no PET."""
    labels = sitk.GetArrayViewFromImage(station_map)
    voxel_ml = float(np.prod(station_map.GetSpacing())) / 1000.0
    counts = np.bincount(np.clip(labels.ravel(), 0, NUM_STATIONS + 1).astype(np.int64), minlength=NUM_STATIONS + 2)
    return {STATION_NAMES[v - 1]: {"volume_ml": float(counts[v]) * voxel_ml}
            for v in range(1, NUM_STATIONS + 1) if counts[v] > 0}


def station_suv_stats(pet: sitk.Image, station_map: sitk.Image, *, peak: bool = True) -> dict[str, dict[str, float]]:
    """SUVmax, SUVpeak (unless ``peak`` is False) and volume of every station present in the map, by station name.

    The PET is resampled (linear) onto the station map's grid. SUVpeak is the largest mean SUV of a 1 cm^3 sphere
    centred in the station, averaged over the sphere's voxels that lie in the station (so that uptake of the heart
    or the tumour next to a station does not enter it; SUVpeak <= SUVmax).
    """
    pet_on = sitk.Resample(pet, station_map, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    suv = sitk.GetArrayFromImage(pet_on).astype(np.float32)
    labels = sitk.GetArrayViewFromImage(station_map)
    spacing_zyx = np.asarray(station_map.GetSpacing(), dtype=float)[::-1]
    half = np.ceil(SUVPEAK_RADIUS_MM / spacing_zyx).astype(int)
    zz, yy, xx = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx, strict=True)],
                             indexing="ij")
    ball = (zz**2 + yy**2 + xx**2) <= SUVPEAK_RADIUS_MM**2
    kernel = ball.astype(np.float32)
    volumes = station_volume_stats(station_map)
    present = np.unique(labels)
    present = present[(present >= 1) & (present <= NUM_STATIONS)]
    out: dict[str, dict[str, float]] = {}
    if present.size:
        idx = [int(v) for v in present]
        maxima = ndimage.maximum(suv, labels, idx)
        peaks = []
        for v in idx if peak else ():
            inside = (labels == v)
            lo = np.maximum(np.argwhere(inside).min(axis=0) - half, 0)
            hi = np.argwhere(inside).max(axis=0) + half + 1
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            m = inside[box].astype(np.float32)
            num = ndimage.convolve(suv[box] * m, kernel, mode="constant")
            den = ndimage.convolve(m, kernel, mode="constant")
            mean = np.where(m > 0, num / np.maximum(den, 1e-6), -np.inf)
            peaks.append(float(mean.max()))
        for k, (v, m) in enumerate(zip(idx, maxima, strict=True)):
            name = STATION_NAMES[v - 1]
            out[name] = {"suv_max": float(m), "volume_ml": volumes[name]["volume_ml"]}
            if peak:
                out[STATION_NAMES[v - 1]]["suv_peak"] = peaks[k]
    return out


#: Columns of :func:`station_feature_array` (the inputs of the hybrid station classifier).
FEATURE_COLUMNS = ("suv_max", "suv_peak", "volume_ml")


def station_feature_array(stats: dict[str, dict[str, float]]) -> np.ndarray:
    """(17, 3) SUVmax, SUVpeak, volume in ml in station order from :func:`station_suv_stats`; NaN where absent."""
    out = np.full((NUM_STATIONS, len(FEATURE_COLUMNS)), np.nan, dtype=np.float32)
    for name, v in stats.items():
        out[STATION_NAMES.index(name)] = [v.get(c, np.nan) for c in FEATURE_COLUMNS]
    return out


def station_suv_max(pet: sitk.Image, station_map: sitk.Image) -> np.ndarray:
    """SUVmax per station as an array (17,) in station order; NaN where the station is absent."""
    out = np.full(NUM_STATIONS, np.nan)
    for name, v in station_suv_stats(pet, station_map, peak=False).items():
        out[STATION_NAMES.index(name)] = v["suv_max"]
    return out
