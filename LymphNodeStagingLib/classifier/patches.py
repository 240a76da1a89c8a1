"""Station patches: 2-channel (CT, PET) cubes cut directly from the source images around physical points.

Every patch is resampled from the native CT and PET onto a small reference grid (``size``^3 voxels of ``spacing`` mm,
axis-aligned with the patient's LPS axes) whose centre voxel, index ``size // 2`` on each axis, lies exactly on the
requested point. No full-volume resampling takes place. The arrays are in (z, y, x) order like
``sitk.GetArrayFromImage`` and normalised as in the paper: CT -200..400 HU -> [0, 1] clipped, PET SUV / 4 unclipped.
The same normalisation is used in training and inference.

Centres come from a :class:`StationSampler`: at inference the station centroid (deterministic), in training points
drawn on the fly from the station's weight map (sparse, multinomial over in-mask voxels). A station absent from the
fused map is reported by ``present`` and must be excluded from the loss, never turned into an empty patch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..staging.stations import NUM_STATIONS

log = logging.getLogger(__name__)

#: Values outside the source images: air for CT, zero uptake for PET.
CT_OUTSIDE_HU = -1024.0
PET_OUTSIDE_SUV = 0.0

DEFAULT_PATCH_SIZE = 64
DEFAULT_PATCH_SPACING = 1.0
#: The paper's normalisation: CT window in HU mapped to [0, 1]; PET SUV divided by this scale.
CT_WINDOW_HU = (-200.0, 400.0)
PET_SUV_SCALE = 4.0


def normalise_ct(array: np.ndarray) -> np.ndarray:
    """CT HU -> [0, 1]: -200 HU -> 0, 400 HU -> 1, clipped."""
    lo, hi = CT_WINDOW_HU
    return np.clip((np.asarray(array, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def normalise_pet(array: np.ndarray) -> np.ndarray:
    """SUV -> SUV / 4, not clipped (SUV 10 -> 2.5)."""
    return (np.asarray(array, dtype=np.float32) / PET_SUV_SCALE).astype(np.float32)


def patch_reference(centre_mm: Sequence[float], size: int = DEFAULT_PATCH_SIZE,
                    spacing: float = DEFAULT_PATCH_SPACING) -> sitk.Image:
    """An empty ``size``^3 image of ``spacing`` mm, identity direction, whose voxel (size//2,)*3 is ``centre_mm``."""
    if size < 1 or spacing <= 0:
        raise InputError(f"patch size must be >= 1 and spacing > 0 mm, got size={size}, spacing={spacing}")
    centre = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    if not np.all(np.isfinite(centre)):
        raise InputError(f"patch centre must be a finite physical point (mm), got {centre.tolist()}")
    ref = sitk.Image([int(size)] * 3, sitk.sitkUInt8)
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetOrigin((centre - (size // 2) * spacing).tolist())
    return ref


def _check_image(image: sitk.Image, name: str) -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} must be a 3D scalar image, got dimension {image.GetDimension()} with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")


def _as_float(image: sitk.Image) -> sitk.Image:
    return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def resample_patch(image: sitk.Image, centre_mm: Sequence[float], size: int = DEFAULT_PATCH_SIZE,
                   spacing: float = DEFAULT_PATCH_SPACING, transform: sitk.Transform | None = None,
                   default: float = 0.0, interpolator: int = sitk.sitkLinear) -> np.ndarray:
    """One raw (not normalised) patch (size, size, size) float32 in (z, y, x) order.

    ``transform`` maps patch points to source points (ITK convention), e.g. a random affine about the centre.
    """
    ref = patch_reference(centre_mm, size, spacing)
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    out = sitk.Resample(_as_float(image), ref, tx, interpolator, float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def extract_patches(ct: sitk.Image, pet: sitk.Image | None, centres_mm: np.ndarray,
                    size: int = DEFAULT_PATCH_SIZE, spacing: float = DEFAULT_PATCH_SPACING,
                    transforms: Sequence[sitk.Transform | None] | None = None) -> np.ndarray:
    """Normalised CT+PET patches (S, 2, size, size, size) float32 around S physical points (S, 3) in mm (LPS); CT
    patches alone (S, 1, size, size, size) when ``pet`` is None (CT-only models).

    CT and PET may have different grids (same frame of reference); each patch is resampled from both directly.
    ``transforms`` (one per centre, or None) deform the sampling grid for augmentation.
    """
    _check_image(ct, "ct")
    if pet is not None:
        _check_image(pet, "pet")
    centres = np.asarray(centres_mm, dtype=np.float64)
    if centres.ndim == 1:
        centres = centres[None]
    if centres.ndim != 2 or centres.shape[1] != 3:
        raise InputError(f"centres_mm must have shape (S, 3) (physical points in mm), got {centres.shape}")
    if transforms is not None and len(transforms) != len(centres):
        raise InputError(f"transforms must have one entry per centre ({len(centres)}), got {len(transforms)}")
    ct_f, pet_f = _as_float(ct), (None if pet is None else _as_float(pet))
    out = np.empty((len(centres), 1 if pet_f is None else 2, size, size, size), dtype=np.float32)
    for i, c in enumerate(centres):
        tx = transforms[i] if transforms is not None else None
        out[i, 0] = normalise_ct(resample_patch(ct_f, c, size, spacing, tx, CT_OUTSIDE_HU))
        if pet_f is not None:
            out[i, 1] = normalise_pet(resample_patch(pet_f, c, size, spacing, tx, PET_OUTSIDE_SUV))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Centre sampling


@dataclass
class _StationPoints:
    points_mm: np.ndarray  # (n, 3) physical points of the in-mask voxels with weight > 0
    cdf: np.ndarray  # (n,) cumulative normalised weights
    centroid_mm: np.ndarray  # (3,)
    voxel_axes_mm: np.ndarray  # (3, 3) columns = physical step of one voxel along i, j, k (for jitter)


class StationSampler:
    """Patch centres per station (index 0..16): the centroid at inference, weighted random points in training.

    Built from a fused station label map (:meth:`from_label_map`, weight = 1 - d / (D + h) inside the station, d the
    float distance in mm to the station centroid, D its largest in-mask value, h one voxel diagonal so the farthest
    voxels keep a small weight) or from per-station weight maps (:meth:`from_weight_maps`). Weights are stored
    sparsely (only in-mask voxels).
    """

    def __init__(self, stations: dict[int, _StationPoints]):
        self._stations = stations

    # -- construction ------------------------------------------------------------------------------------------
    @staticmethod
    def _voxel_axes(image: sitk.Image) -> np.ndarray:
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        return direction * np.asarray(image.GetSpacing(), dtype=np.float64)[None, :]

    @classmethod
    def _points(cls, image: sitk.Image, ijk: np.ndarray) -> np.ndarray:
        """Physical points (n, 3) of voxel indices (n, 3) in (i, j, k) = (x, y, z) order."""
        origin = np.asarray(image.GetOrigin(), dtype=np.float64)
        return origin[None, :] + ijk.astype(np.float64) @ cls._voxel_axes(image).T

    @classmethod
    def from_label_map(cls, station_map: sitk.Image) -> StationSampler:
        """Sampler from a label map with values 1..17 (catalogue labels) and 0 = no station."""
        _check_image(station_map, "station_map")
        arr = sitk.GetArrayViewFromImage(station_map)
        if arr.size and (arr.min() < 0 or arr.max() > NUM_STATIONS):
            raise InputError(f"station_map values must be 0..{NUM_STATIONS} (catalogue labels), "
                             f"got range {arr.min()}..{arr.max()}")
        axes = cls._voxel_axes(station_map)
        h = float(np.linalg.norm(axes.sum(axis=1)))
        nz = np.flatnonzero(arr)
        labels = arr.reshape(-1)[nz]
        zyx = np.stack(np.unravel_index(nz, arr.shape), axis=1)
        stations: dict[int, _StationPoints] = {}
        for label in np.unique(labels):
            pts = cls._points(station_map, zyx[labels == label][:, ::-1])
            centroid = pts.mean(axis=0)
            d = np.linalg.norm(pts - centroid, axis=1)
            w = 1.0 - d / (d.max() + h)
            stations[int(label) - 1] = cls._station(pts, w, centroid, axes)
        return cls(stations)

    @classmethod
    def from_weight_maps(cls, weight_maps: dict[int, sitk.Image] | Sequence[sitk.Image | None]) -> StationSampler:
        """Sampler from per-station weight maps (float, >= 0; 0 outside the station), keyed by station index 0..16.

        The centroid is the weight-weighted mean of the in-map voxels.
        """
        items = weight_maps.items() if isinstance(weight_maps, dict) else enumerate(weight_maps)
        stations: dict[int, _StationPoints] = {}
        for index, image in items:
            if image is None:
                continue
            if not 0 <= int(index) < NUM_STATIONS:
                raise InputError(f"weight map station index must be 0..{NUM_STATIONS - 1}, got {index}")
            _check_image(image, f"weight map of station index {index}")
            arr = sitk.GetArrayViewFromImage(image)
            flat = np.asarray(arr, dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(flat)) or (flat.size and flat.min() < 0):
                raise InputError(f"weight map of station index {index} must be finite and >= 0")
            nz = np.flatnonzero(flat > 0)
            if nz.size == 0:
                continue
            w = flat[nz]
            zyx = np.stack(np.unravel_index(nz, arr.shape), axis=1)
            pts = cls._points(image, zyx[:, ::-1])
            centroid = (pts * w[:, None]).sum(axis=0) / w.sum()
            stations[int(index)] = cls._station(pts, w, centroid, cls._voxel_axes(image))
        return cls(stations)

    @classmethod
    def from_centres(cls, centres_mm: dict[int, Sequence[float]]) -> StationSampler:
        """A fixed centre per station index (sampling always returns it): for point annotations or tests."""
        stations = {}
        for index, c in centres_mm.items():
            p = np.asarray(c, dtype=np.float64).reshape(1, 3)
            stations[int(index)] = cls._station(p, np.ones(1), p[0], np.zeros((3, 3)))
        return cls(stations)

    @classmethod
    def from_points(cls, stations: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]
                    ) -> StationSampler:
        """Sampler from sparse data per station index 0..16: (points_mm (n, 3), weights (n,) > 0, inference centre
        (3,), voxel axes (3, 3) for jitter: columns = physical step along i, j, k; None = no jitter)."""
        out: dict[int, _StationPoints] = {}
        for index, (pts, w, centre, axes) in stations.items():
            if not 0 <= int(index) < NUM_STATIONS:
                raise InputError(f"station index must be 0..{NUM_STATIONS - 1}, got {index}")
            pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
            w = np.asarray(w, dtype=np.float64).reshape(-1)
            if len(pts) == 0 or len(w) != len(pts) or not np.all(np.isfinite(w)) or w.min() < 0 or w.sum() <= 0:
                raise InputError(f"station index {index}: need one finite weight >= 0 per point and a positive sum")
            ax = np.zeros((3, 3)) if axes is None else np.asarray(axes, dtype=np.float64).reshape(3, 3)
            out[int(index)] = cls._station(pts, w, np.asarray(centre, dtype=np.float64).reshape(3), ax)
        return cls(out)

    @classmethod
    def from_sparse_maps(cls, maps) -> StationSampler:
        """Sampler from ``weightmap.WeightMap`` objects (any objects with label, geometry, indices, weights,
        centre_mm), in a dict by station name or a sequence; the inference centre is the weight-map maximum."""
        items = maps.values() if isinstance(maps, dict) else maps
        data = {}
        for wm in items:
            geom = wm.geometry
            zyx = np.stack(np.unravel_index(np.asarray(wm.indices), tuple(geom.shape)[::-1]), axis=1)
            axes = np.asarray(geom.direction, dtype=np.float64).reshape(3, 3) * np.asarray(geom.spacing, float)[None]
            pts = np.asarray(geom.origin, dtype=np.float64)[None, :] + zyx[:, ::-1].astype(np.float64) @ axes.T
            data[int(wm.label) - 1] = (pts, wm.weights, wm.centre_mm, axes)
        return cls.from_points(data)

    @staticmethod
    def _station(pts: np.ndarray, w: np.ndarray, centroid: np.ndarray, axes: np.ndarray) -> _StationPoints:
        cdf = np.cumsum(w, dtype=np.float64)
        cdf /= cdf[-1]
        return _StationPoints(pts.astype(np.float32), cdf, centroid, axes)

    # -- queries -----------------------------------------------------------------------------------------------
    @property
    def present(self) -> np.ndarray:
        """Boolean (17,): station found in the fused map."""
        out = np.zeros(NUM_STATIONS, dtype=bool)
        out[list(self._stations)] = True
        return out

    def centroid(self, index: int) -> np.ndarray | None:
        """Centroid (3,) in mm of station index 0..16, None when the station is absent."""
        st = self._stations.get(int(index))
        return None if st is None else st.centroid_mm.copy()

    def centroids(self) -> np.ndarray:
        """(17, 3) centroids in mm; NaN rows for absent stations."""
        out = np.full((NUM_STATIONS, 3), np.nan)
        for i, st in self._stations.items():
            out[i] = st.centroid_mm
        return out

    def sample(self, index: int, k: int, rng: np.random.Generator, jitter: bool = True) -> np.ndarray:
        """k centres (k, 3) in mm drawn with probability proportional to the weight, uniform within the voxel."""
        st = self._stations.get(int(index))
        if st is None:
            raise InputError(f"station index {index} is absent from the station map; it cannot be sampled")
        pick = np.searchsorted(st.cdf, rng.random(k), side="right").clip(max=len(st.cdf) - 1)
        pts = st.points_mm[pick].astype(np.float64)
        if jitter:
            pts = pts + rng.uniform(-0.5, 0.5, size=(k, 3)) @ st.voxel_axes_mm.T
        return pts

    def bag(self, index: int, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """k patch centres (k, 3) in mm for one station: weighted random draws in training (``rng``), or at inference
        (``rng`` None) deterministic ones spread over the station: the centroid, then farthest-point sampling over
        the in-map points whose weight is at least the station's median weight (its inner half), so that a node
        at the edge of a large station is covered. ``k`` = 1 at inference: the centroid alone."""
        if rng is not None:
            return self.sample(index, k, rng)
        st = self._stations.get(int(index))
        if st is None:
            raise InputError(f"station index {index} is absent from the station map; it cannot be sampled")
        out = [st.centroid_mm.astype(np.float64)]
        if k > 1:
            w = np.diff(st.cdf, prepend=0.0)
            cand = st.points_mm[w >= np.median(w)].astype(np.float64)
            dist = np.linalg.norm(cand - out[0], axis=1)
            for _ in range(k - 1):
                j = int(np.argmax(dist))
                out.append(cand[j])
                dist = np.minimum(dist, np.linalg.norm(cand - cand[j], axis=1))
        return np.asarray(out)

    def bounding_box_mm(self, margin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
        """(low, high) corners of all in-map points plus a margin; None when no station is present."""
        if not self._stations:
            return None
        lo = np.min([s.points_mm.min(axis=0) for s in self._stations.values()], axis=0) - margin_mm
        hi = np.max([s.points_mm.max(axis=0) for s in self._stations.values()], axis=0) + margin_mm
        return lo.astype(np.float64), hi.astype(np.float64)


def crop_to_box(image: sitk.Image, low_mm: np.ndarray, high_mm: np.ndarray) -> sitk.Image:
    """The part of ``image`` covering the physical box [low, high] (clamped to the image); keeps its geometry.

    Used to hold only the mediastinum of each training case in memory; patches cut from the crop equal those cut
    from the full image as long as they lie inside the box.
    """
    corners = np.array([[x, y, z] for x in (low_mm[0], high_mm[0]) for y in (low_mm[1], high_mm[1])
                        for z in (low_mm[2], high_mm[2])])
    idx = np.array([image.TransformPhysicalPointToContinuousIndex(c.tolist()) for c in corners])
    size = np.asarray(image.GetSize())
    lo = np.clip(np.floor(idx.min(axis=0)).astype(int) - 1, 0, size - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 0, size - 1)
    return sitk.RegionOfInterest(image, (hi - lo + 1).tolist(), lo.tolist())
