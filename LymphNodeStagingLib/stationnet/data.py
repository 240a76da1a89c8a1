"""The station network's input: the CT cropped to the lungs (found by a HU threshold, no anatomy needed), resampled
to a fixed working grid and windowed; the training targets on the same grid; augmentation.

1. **Lung box.** The CT is resampled (linear) onto a coarse 4 mm grid over its whole extent; the body is the largest
   connected region above ``BODY_HU``, filled slice by slice; the lungs are the voxels below ``LUNG_HU`` inside it,
   in connected regions of at least ``MIN_LUNG_ML``. Their box plus ``StationDataConfig.margin_mm`` (clipped to the
   CT) is the crop. When no lung is found (a CT cropped through the chest wall), the whole CT is the crop.
2. **Working grid.** The box on an axis-aligned grid (identity direction, LPS) of ``StationDataConfig.spacing``
   (default 4 mm isotropic: the stations are tens of millilitres, and a thorax then fits in about 80 x 60 x 80
   voxels, which a small network runs in a fraction of a second on a CPU), padded (centred) to a multiple of the
   network's divisor. Voxels outside the CT are air.
3. **CT window** -1000..400 HU scaled to 0..1 (lungs, fat, soft tissue and vessels stay apart; air is 0).
4. **Targets** (training): a station map (1..17) resampled by nearest neighbour onto the working grid.

Augmentation (training only): a small rotation (up to ``max_rotation_deg`` about each axis), a shift (up to
``max_shift_mm``), an intensity scale and offset and Gaussian noise. Never a flip: a mirrored chest swaps the left
and right stations; every augmentation matrix is a proper rotation close to the identity.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError, UsageError
from ..nodes.data import WorkingGrid
from ..nodes.data import window_ct as window_centre_width

#: Working spacing (x, y, z) in mm.
STATION_SPACING_MM: tuple[float, float, float] = (4.0, 4.0, 4.0)
#: Margin around the lung box, mm.
LUNG_MARGIN_MM = 24.0
#: CT window (low, high) in HU, scaled to 0..1.
STATION_WINDOW_HU: tuple[float, float] = (-1000.0, 400.0)
#: Body: above this HU; lungs: below LUNG_HU inside the body, in regions of at least MIN_LUNG_ML.
BODY_HU, LUNG_HU, MIN_LUNG_ML = -500.0, -400.0, 50.0
#: HU of the voxels outside the CT.
OUTSIDE_HU = -1024.0
#: Spacing of the grid the lungs are found on, mm.
LUNG_SEARCH_MM = 4.0


@dataclass
class StationDataConfig:
    """How a CT becomes the network's input (stored in the model's manifest as ``data_config``)."""

    spacing: tuple[float, float, float] = STATION_SPACING_MM
    margin_mm: float = LUNG_MARGIN_MM
    window: tuple[float, float] = STATION_WINDOW_HU

    def __post_init__(self) -> None:
        try:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            self.window = tuple(float(w) for w in self.window)  # type: ignore[assignment]
            self.margin_mm = float(self.margin_mm)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"station data configuration: spacing, margin and window must be numbers ({exc})") \
                from None
        if len(self.spacing) != 3 or not all(math.isfinite(s) and 0.5 <= s <= 20.0 for s in self.spacing):
            raise UsageError(f"station working spacing must be three values (x, y, z) in 0.5..20 mm, got "
                             f"{list(self.spacing)}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise UsageError(f"station CT window must be (low, high) HU with low < high, got {list(self.window)}")
        if not math.isfinite(self.margin_mm) or self.margin_mm < 0:
            raise UsageError(f"lung crop margin must be >= 0 mm, got {self.margin_mm}")

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "margin_mm": self.margin_mm, "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict) -> StationDataConfig:
        if not isinstance(data, dict) or set(data) - {"spacing", "margin_mm", "window"}:
            raise UsageError(f"station data configuration must hold spacing, margin_mm, window; got {data!r}")
        return cls(**data)


def _extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """World (LPS) bounds of the voxel centres of ``image`` (any direction)."""
    size = np.array(image.GetSize()) - 1
    corners = np.array([[x, y, z] for x in (0, size[0]) for y in (0, size[1]) for z in (0, size[2])], float)
    world = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return world.min(0), world.max(0)


def lung_box(ct: sitk.Image, margin_mm: float = LUNG_MARGIN_MM) -> tuple[np.ndarray, np.ndarray, bool]:
    """The box (lower, upper world corners, mm) of the lungs found by HU thresholds, with ``margin_mm``, clipped to
    the CT; the third value says whether lungs were found (False: the whole CT)."""
    lo, hi = _extent(ct)
    step = np.full(3, LUNG_SEARCH_MM)
    size = np.maximum(np.floor((hi - lo) / step).astype(int) + 1, 1)
    coarse = WorkingGrid(tuple(lo), tuple(step), tuple(int(s) for s in size)).resample(ct, default=OUTSIDE_HU)
    body = coarse > BODY_HU
    labels, n = ndimage.label(body)
    found = False
    if n:
        body = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
        filled = np.stack([ndimage.binary_fill_holes(s) for s in body])
        lungs = (coarse < LUNG_HU) & filled
        labels, n = ndimage.label(lungs)
        if n:
            counts = np.bincount(labels.ravel())[1:] * float(np.prod(step)) / 1000.0
            keep = np.isin(labels, np.nonzero(counts >= MIN_LUNG_ML)[0] + 1)
            if keep.any():
                idx = np.argwhere(keep)  # (z, y, x)
                lo_i, hi_i = idx.min(0)[::-1], idx.max(0)[::-1]
                lower, upper = lo + lo_i * step - margin_mm, lo + hi_i * step + margin_mm
                return np.maximum(lower, lo), np.minimum(upper, hi), True
    return lo, hi, found


def working_grid(lower: np.ndarray, upper: np.ndarray, config: StationDataConfig, divisor: int) -> WorkingGrid:
    """The grid of ``config.spacing`` covering lower..upper, padded (centred) to a multiple of ``divisor``."""
    spacing = np.asarray(config.spacing, float)
    size = np.maximum(np.ceil((np.asarray(upper) - np.asarray(lower)) / spacing - 1e-6).astype(int) + 1, 1)
    want = (np.ceil(size / divisor) * divisor).astype(int)
    origin = np.asarray(lower, float) - (want - size) // 2 * spacing
    return WorkingGrid(tuple(float(v) for v in origin), tuple(float(v) for v in spacing), tuple(int(v) for v in want))


def window_ct(hu: np.ndarray, window: Sequence[float] = STATION_WINDOW_HU) -> np.ndarray:
    """HU -> float32 0..1 over the window given as (low, high), clipped (the node networks' windowing)."""
    lo, hi = float(window[0]), float(window[1])
    return window_centre_width(hu, ((lo + hi) / 2.0, hi - lo))


@dataclass
class StationInput:
    """A CT on the network's working grid (windowed, (z, y, x) float32) and how it was made."""

    image: np.ndarray
    grid: WorkingGrid
    lungs_found: bool


def prepare_ct(ct: sitk.Image, config: StationDataConfig, divisor: int) -> StationInput:
    """Crop to the lungs, resample to the working grid and window (the same in training and inference)."""
    if ct.GetDimension() != 3:
        raise InputError(f"CT has {ct.GetDimension()} dimensions; the station network needs a 3D CT")
    lower, upper, found = lung_box(ct, config.margin_mm)
    grid = working_grid(lower, upper, config, divisor)
    return StationInput(window_ct(grid.resample(ct, default=OUTSIDE_HU), config.window), grid, found)


@dataclass
class StationCase:
    """One training scan on its working grid: windowed CT and station labels (z, y, x)."""

    case_id: str
    patient_id: str
    image: np.ndarray  # float32 0..1
    labels: np.ndarray  # uint8 0..17
    grid: WorkingGrid
    split: str | None = None

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.case_id.encode())
        h.update(str(self.image.shape).encode())
        h.update(np.ascontiguousarray(self.image).tobytes())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        return h.hexdigest()


def make_case(case_id: str, ct: sitk.Image, stations: sitk.Image, config: StationDataConfig, divisor: int,
              patient_id: str | None = None, split: str | None = None) -> StationCase:
    """A training case: the prepared CT and the station map on the same working grid."""
    prepared = prepare_ct(ct, config, divisor)
    labels = prepared.grid.resample(sitk.Cast(stations, sitk.sitkUInt8), nearest=True).astype(np.uint8)
    if not labels.any():
        raise InputError(f"case {case_id}: the station map does not overlap the lung crop of the CT")
    return StationCase(case_id, patient_id or case_id, prepared.image, labels, prepared.grid, split)


def data_fingerprint(cases: Sequence[StationCase]) -> str:
    """sha256 over the cases' ids, images and labels (order-independent)."""
    return hashlib.sha256("\n".join(sorted(c.fingerprint() for c in cases)).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Augmentation
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Augmentation ranges (uniform draws): rotation about each axis, shift, intensity scale and offset, noise."""

    max_rotation_deg: tuple[float, float, float] = (5.0, 5.0, 10.0)  # about x, y, z (z: in the axial plane)
    max_shift_mm: float = 12.0
    intensity_scale: float = 0.1
    intensity_offset: float = 0.05
    noise: float = 0.02

    def to_dict(self) -> dict:
        return {"max_rotation_deg": list(self.max_rotation_deg), "max_shift_mm": self.max_shift_mm,
                "intensity_scale": self.intensity_scale, "intensity_offset": self.intensity_offset,
                "noise": self.noise}


def rotation_matrix(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation about x, then y, then z (degrees): a proper rotation (determinant +1, never a mirror)."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_transform(rng: np.random.Generator, config: AugmentConfig) -> tuple[np.ndarray, np.ndarray]:
    """A random rotation (3x3, x y z) and shift (mm, x y z) within ``config``."""
    angles = [rng.uniform(-m, m) for m in config.max_rotation_deg]
    shift = rng.uniform(-config.max_shift_mm, config.max_shift_mm, 3)
    return rotation_matrix(angles), shift


def augment(image: np.ndarray, labels: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
            config: AugmentConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A rotated, shifted, intensity-changed copy of (image, labels), both (z, y, x) on the same grid, about the grid
    centre (linear for the image, nearest for the labels; air and background enter at the borders)."""
    import torch
    import torch.nn.functional as F

    config = config or AugmentConfig()
    rot, shift = draw_transform(rng, config)
    shape = np.asarray(image.shape[::-1], float)  # x, y, z
    sp = np.asarray(spacing, float)
    # output voxel (x, y, z) -> input point: p_in = R (p_out - c) + c + shift, in mm; then to align_corners=True
    # normalised coordinates of the input: n = 2 * idx / (size - 1) - 1
    half = (shape - 1) / 2.0 * sp
    scale = np.where(half > 0, 1.0 / np.maximum(half, 1e-9), 0.0)
    theta = np.zeros((3, 4))
    theta[:, :3] = np.diag(scale) @ rot @ np.diag(half)
    theta[:, 3] = scale * shift
    grid = F.affine_grid(torch.as_tensor(theta, dtype=torch.float32)[None], [1, 1, *image.shape],
                         align_corners=True)
    img = F.grid_sample(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None], grid,
                        mode="bilinear", padding_mode="zeros", align_corners=True)[0, 0].numpy()
    lab = F.grid_sample(torch.from_numpy(labels.astype(np.float32))[None, None], grid, mode="nearest",
                        padding_mode="zeros", align_corners=True)[0, 0].numpy()
    img = img * (1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale)) \
        + rng.uniform(-config.intensity_offset, config.intensity_offset)
    if config.noise > 0:
        img = img + rng.normal(0.0, config.noise, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32), np.rint(lab).astype(np.uint8)
