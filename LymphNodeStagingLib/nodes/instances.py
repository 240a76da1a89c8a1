"""Lymph node instances from a node probability map: connected components with the measurements a radiologist reports
(short and long axis, volume, mean HU, SUVmax/SUVmean/SUVpeak) and the station they lie in.

Axial acquisitions are assumed: the axial plane is the plane of the first two image axes (x, y), and the axes are
measured on the node's axial slice of largest area. Lengths need only the spacing (the direction matrix is orthonormal,
so it does not change distances); positions (``centre_mm``) use origin, spacing and direction (LPS, as SimpleITK).

Axis measurement (``measure_axes``): the node's outline on the slice is the 0.5 contour of its bilinearly interpolated
mask (what marching squares draws: its vertices are the midpoints between neighbouring inside and outside pixel
centres). The long axis is the largest in-plane diameter of that outline (maximum Feret diameter, exact, on the convex
hull of the vertices). The short axis is the longest chord of the outline perpendicular to the long axis: lines
perpendicular to the long axis every half pixel, sampled every eighth of a pixel, inside where the interpolated mask is
>= 0.5; the longest run of inside samples. For a digitised ellipse both are within one pixel diagonal of the true
diameters (on average within a quarter). Neither axis is reported shorter than one pixel along its direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.signal import fftconvolve
from scipy.spatial import ConvexHull, QhullError

from ..errors import InputError, UsageError
from ..staging.stations import NUM_STATIONS, STATION_NAMES
from ..suv.statistics import SUVPEAK_RADIUS_MM

#: 26-connectivity in 3D.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)
#: Value given to CT voxels resampled from outside the CT (air).
CT_OUTSIDE_HU = -1024.0


@dataclass
class NodeInstance:
    """One detected lymph node (a connected component of the thresholded probability map)."""

    id: int  # 1..n, by decreasing score
    centre_mm: tuple[float, float, float]  # centroid of the voxels, physical point (LPS)
    short_axis_mm: float  # in the axial plane, on the slice of largest area
    long_axis_mm: float
    volume_ml: float
    mean_hu: float
    score: float  # detection score: max probability inside
    voxels: int
    station: str | None = None  # station name (STATION_NAMES) or None
    suv_max: float | None = None
    suv_mean: float | None = None
    suv_peak: float | None = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dictionary."""
        d = asdict(self)
        d["centre_mm"] = [float(c) for c in self.centre_mm]
        return d


def _check_spacing(spacing: Sequence[float], n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be {n} positive spacings in mm, got {spacing!r}") from exc
    if len(values) != n or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{name} must be {n} positive finite spacings in mm, got {spacing!r}")
    return values


def measure_axes(mask2d: np.ndarray, spacing_xy: Sequence[float]) -> tuple[float, float]:
    """Short and long axis in mm of a 2D region (see the module docstring for the method).

    ``mask2d`` is indexed (row, column) = (y, x), as an axial slice of a (z, y, x) array; ``spacing_xy`` is
    (column spacing, row spacing) in mm. An empty mask gives (0.0, 0.0). Neither axis is shorter than one pixel along
    its direction (``pixel_length``): a component one pixel wide measures one pixel.
    """
    m = np.asarray(mask2d)
    if m.ndim != 2:
        raise InputError(f"mask2d must be a 2D array (y, x), got shape {m.shape}")
    sx, sy = _check_spacing(spacing_xy, 2, "spacing_xy")
    m = m != 0
    if not m.any():
        return 0.0, 0.0
    # Vertices of the 0.5 contour of the bilinearly interpolated mask: midpoints between 4-neighbour pixel centres
    # of which one is inside and one outside (pixel (row, col) has its centre at (col * sx, row * sy) mm).
    p = np.pad(m, 1)
    r, c = np.nonzero(p[:, 1:] != p[:, :-1])  # between original columns c - 1 and c, row r - 1
    horizontal = np.stack([(c - 0.5) * sx, (r - 1.0) * sy], axis=1)
    r, c = np.nonzero(p[1:, :] != p[:-1, :])  # between original rows r - 1 and r, column c - 1
    vertical = np.stack([(c - 1.0) * sx, (r - 0.5) * sy], axis=1)
    points = np.concatenate([horizontal, vertical])
    try:
        hull = points[ConvexHull(points).vertices]
    except QhullError:  # collinear points cannot come from a pixel region; kept as a guard
        hull = points
    diff = hull[:, None, :] - hull[None, :, :]
    d2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    long_mm = float(np.sqrt(d2[i, j]))
    u = (hull[j] - hull[i]) / long_mm
    v = np.array([-u[1], u[0]])
    # Longest chord perpendicular to the long axis, inside where the bilinear interpolation of the mask is >= 0.5.
    pixel = min(sx, sy)
    t_proj, w_proj = points @ u, points @ v
    line_step, sample_step = pixel / 2.0, pixel / 8.0
    ts = np.arange(t_proj.min() + line_step / 2.0, t_proj.max(), line_step)
    ws = np.arange(w_proj.min() - pixel, w_proj.max() + pixel, sample_step)
    px = ts[:, None] * u[0] + ws[None, :] * v[0]
    py = ts[:, None] * u[1] + ws[None, :] * v[1]
    # on the mask padded with one row/column of outside pixels: the mask is usually cut tight around the component,
    # and map_coordinates does not interpolate towards cval beyond the array's last pixel centres
    values = ndimage.map_coordinates(np.pad(m.astype(np.float32), 1), [py / sy + 1.0, px / sx + 1.0], order=1,
                                     mode="constant", cval=0.0)
    inside = values >= 0.5
    padded = np.zeros((inside.shape[0], inside.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = inside
    edges = np.diff(padded, axis=1)
    starts = np.nonzero(edges == 1)[1]
    ends = np.nonzero(edges == -1)[1]  # row-major order: pairs with starts
    short_mm = float((ends - starts).max()) * sample_step if starts.size else 0.0
    # never below one pixel along the measured direction (a component one pixel wide is one pixel wide)
    long_mm = max(long_mm, pixel_length(u, (sx, sy)))
    short_mm = max(short_mm, pixel_length(v, (sx, sy)))
    return min(short_mm, long_mm), long_mm


def pixel_length(direction: Sequence[float], spacing_xy: Sequence[float]) -> float:
    """Length in mm of the chord through a pixel's centre along the in-plane unit ``direction`` (x, y): the column
    spacing along x, the row spacing along y, longer in between (the pixel is a sx x sy rectangle)."""
    sx, sy = (float(s) for s in spacing_xy)
    dx, dy = (abs(float(d)) for d in direction)
    return min(sx / dx if dx > 1e-12 else np.inf, sy / dy if dy > 1e-12 else np.inf)


def _measure_box(mask: np.ndarray, spacing_xy: tuple[float, float]) -> tuple[float, float, int]:
    """Short, long axis and slice index (in the box) of a 3D (z, y, x) mask, on its axial slice of largest area
    (ties: the slice nearest the centroid, then the lowest)."""
    areas = mask.sum(axis=(1, 2))
    z = np.arange(areas.size)
    centre = float((areas * z).sum() / areas.sum())
    best = np.nonzero(areas == areas.max())[0]
    k = int(best[np.argmin(np.abs(best - centre))])
    short, long_ = measure_axes(mask[k], spacing_xy)
    return short, long_, k


def measure_label_axes(labels: np.ndarray, spacing_xyz: Sequence[float]) -> dict[int, tuple[float, float]]:
    """(short, long) axis in mm of every label > 0 of a (z, y, x) integer array with spacing (x, y, z) in mm, each on
    its axial slice of largest area."""
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise InputError(f"labels must be a 3D array (z, y, x), got shape {lab.shape}")
    if not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise InputError(f"labels must be an integer label array, got dtype {lab.dtype}")
    sx, sy, _ = _check_spacing(spacing_xyz, 3, "spacing_xyz")
    lab = lab.astype(np.int64, copy=False)
    if lab.size and lab.min() < 0:
        raise InputError("labels must be non-negative (0 = background)")
    out: dict[int, tuple[float, float]] = {}
    for k, box in enumerate(ndimage.find_objects(lab), start=1):
        if box is not None:
            short, long_, _ = _measure_box(lab[box] == k, (sx, sy))
            out[k] = (short, long_)
    return out


def _check_image(image: sitk.Image, name: str) -> None:
    if not isinstance(image, sitk.Image):
        raise InputError(f"{name} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} must be a 3D scalar image, got dimension {image.GetDimension()} with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel")


def _physical_bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.asarray(image.GetSize(), dtype=float)
    corners = [image.TransformContinuousIndexToPhysicalPoint(tuple(float(x) for x in (np.array(b) * size - 0.5)))
               for b in np.ndindex(2, 2, 2)]
    pts = np.asarray(corners)
    return pts.min(axis=0), pts.max(axis=0)


def _on_grid(image: sitk.Image, reference: sitk.Image, name: str, interpolator: int, default: float,
             pixel: int) -> np.ndarray:
    """``image`` resampled onto ``reference``'s grid, as a (z, y, x) array; refuses images that do not overlap."""
    _check_image(image, name)
    lo_a, hi_a = _physical_bounds(image)
    lo_b, hi_b = _physical_bounds(reference)
    if np.any(np.maximum(lo_a, lo_b) > np.minimum(hi_a, hi_b) + 1e-3):
        raise InputError(f"{name} does not overlap the probability map (expected images of the same physical "
                         f"space; {name} spans {lo_a.round(1).tolist()}..{hi_a.round(1).tolist()} mm, the "
                         f"probability map {lo_b.round(1).tolist()}..{hi_b.round(1).tolist()} mm)")
    out = sitk.Resample(image, reference, sitk.Transform(), interpolator, default, pixel)
    return sitk.GetArrayFromImage(out)


def _suv_peak(suv: np.ndarray, labels: np.ndarray, label: int, box: tuple[slice, ...], kernel: np.ndarray) -> float:
    """Largest mean SUV of the sphere ``kernel`` centred on a voxel of the node, over the sphere's voxels in the node."""
    half = np.array(kernel.shape) // 2
    lo = np.maximum(np.array([s.start for s in box]) - half, 0)
    hi = np.minimum(np.array([s.stop for s in box]) + half, suv.shape)
    big = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    m = (labels[big] == label).astype(np.float64)
    num = fftconvolve(suv[big] * m, kernel, mode="same")
    den = fftconvolve(m, kernel, mode="same")
    mean = np.where(m > 0, num / np.maximum(den, 1e-6), -np.inf)
    return float(mean.max())


def find_nodes(prob: sitk.Image, ct: sitk.Image, pet: sitk.Image | None = None, stations: sitk.Image | None = None,
               threshold: float = 0.5, min_volume_ml: float = 0.0) -> tuple[sitk.Image, list[NodeInstance]]:
    """Lymph node instances of a probability map: voxels with probability >= ``threshold``, 26-connected components,
    components smaller than ``min_volume_ml`` dropped.

    Returns the instance label image (uint16, the geometry of ``prob``; ids 1..n by decreasing score, ties by larger
    volume) and the instances in id order. ``ct`` and ``pet`` are resampled linearly and ``stations`` (labels 1..17,
    0 = none) by nearest neighbour onto the grid of ``prob``; they must cover the same physical space. SUV values are
    None without ``pet``; ``station`` is the most frequent station label among the node's voxels that lie in a station
    (ties: the smallest label), None without ``stations`` or when no voxel lies in a station. SUVpeak follows
    ``station_suv_stats``: the largest mean of a sphere of radius SUVPEAK_RADIUS_MM centred on a node voxel, averaged
    over the sphere's voxels inside the node.
    """
    _check_image(prob, "prob")
    if not np.isfinite(threshold) or not 0.0 < threshold <= 1.0:
        raise UsageError(f"threshold must be in (0, 1], got {threshold!r}")
    if not np.isfinite(min_volume_ml) or min_volume_ml < 0:
        raise UsageError(f"min_volume_ml must be >= 0, got {min_volume_ml!r}")
    p = np.asarray(sitk.GetArrayViewFromImage(prob), dtype=np.float64)
    if not np.isfinite(p).all():
        raise InputError("prob contains NaN or infinite values; expected probabilities in 0..1")
    if p.size and (p.min() < -1e-6 or p.max() > 1.0 + 1e-6):
        raise InputError(f"prob must hold probabilities in 0..1, got values {p.min():g}..{p.max():g}")
    hu = _on_grid(ct, prob, "ct", sitk.sitkLinear, CT_OUTSIDE_HU, sitk.sitkFloat32).astype(np.float64)
    if not np.isfinite(hu).all():
        raise InputError("ct contains NaN or infinite values (on the grid of the probability map)")
    suv = None
    if pet is not None:
        suv = _on_grid(pet, prob, "pet", sitk.sitkLinear, 0.0, sitk.sitkFloat32).astype(np.float64)
        if not np.isfinite(suv).all():
            raise InputError("pet contains NaN or infinite values (on the grid of the probability map)")
    smap = None
    if stations is not None:
        _check_image(stations, "stations")
        if stations.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
            raise InputError("stations must be an integer label map (0 = none, 1..17 = station)")
        smap = _on_grid(stations, prob, "stations", sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)
        if smap.size and (smap.min() < 0 or smap.max() > NUM_STATIONS):
            raise InputError(f"stations must hold labels 0..{NUM_STATIONS}, got {smap.min()}..{smap.max()}")

    spacing = tuple(float(s) for s in prob.GetSpacing())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    lab, n = ndimage.label(p >= threshold, structure=CONNECTIVITY_26)
    counts = np.bincount(lab.ravel(), minlength=n + 1)[1:]
    scores = np.asarray(ndimage.maximum(p, lab, np.arange(1, n + 1)), dtype=float).reshape(-1)
    kept = np.nonzero(counts * voxel_ml >= min_volume_ml)[0]
    order = kept[np.lexsort((kept, -counts[kept], -scores[kept]))]
    if order.size > np.iinfo(np.uint16).max:
        raise InputError(f"prob gives {order.size} components at threshold {threshold}; at most 65535 fit the "
                         "instance map (raise threshold or min_volume_ml)")
    lut = np.zeros(n + 1, dtype=np.uint16)
    lut[order + 1] = np.arange(1, order.size + 1, dtype=np.uint16)
    inst = lut[lab]

    kernel = None
    if suv is not None:
        spacing_zyx = np.asarray(spacing[::-1])
        half = np.ceil(SUVPEAK_RADIUS_MM / spacing_zyx).astype(int)
        grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing_zyx, strict=True)], indexing="ij")
        kernel = (sum(g**2 for g in grids) <= SUVPEAK_RADIUS_MM**2).astype(np.float64)

    boxes = ndimage.find_objects(lab)
    nodes: list[NodeInstance] = []
    for new_id, old in enumerate(order, start=1):
        box = boxes[old]
        mask = lab[box] == old + 1
        offset = np.array([s.start for s in box], dtype=float)
        idx_zyx = np.argwhere(mask).mean(axis=0) + offset
        centre = prob.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in idx_zyx[::-1]))
        short, long_, _ = _measure_box(mask, (spacing[0], spacing[1]))
        node = NodeInstance(
            id=new_id, centre_mm=tuple(float(c) for c in centre), short_axis_mm=short, long_axis_mm=long_,
            volume_ml=float(counts[old]) * voxel_ml, mean_hu=float(hu[box][mask].mean()),
            score=float(scores[old]), voxels=int(counts[old]))
        if suv is not None and kernel is not None:
            values = suv[box][mask]
            node.suv_max, node.suv_mean = float(values.max()), float(values.mean())
            node.suv_peak = min(_suv_peak(suv, lab, int(old) + 1, box, kernel), node.suv_max)  # FFT round-off
        if smap is not None:
            votes = np.bincount(smap[box][mask], minlength=NUM_STATIONS + 1)[1:]
            if votes.any():
                node.station = STATION_NAMES[int(np.argmax(votes))]  # argmax: first (smallest label) on ties
        nodes.append(node)

    image = sitk.GetImageFromArray(inst)
    image.CopyInformation(prob)
    return image, nodes
