"""The data of the node networks: the working grid (crop + resampling), CT normalisation, and training cases read
from a cohort.

Both networks (S-Net and the 3D U-Net) see the same input, made the same way in training and at inference:

1. **Crop.** ``mapping.crop.mediastinal_crop`` around the station map when there is one (else around lungs + trachea
   + heart of the anatomy, else the whole CT), with a margin of ``NodeDataConfig.margin_mm`` (20 mm: nodes lie in
   the stations; the margin absorbs a station map that is a little off), clipped to the CT.
2. **Working grid.** The crop box resampled onto an axis-aligned grid (identity direction, LPS: axial slices are
   physical axial planes, patient right at column 0) of ``NodeDataConfig.spacing`` (x, y, z) mm, default
   2 x 2 x 4 mm: the small phantom's own grid, so phantom training resamples nothing, and coarse enough for the
   CPU budget of a case. The in-plane size is padded, centred, to at least ``min_inplane`` voxels (128: the U-Net's
   in-plane minimum of Shevtsov et al.) and to a multiple of 16 (both networks' downsampling). Voxels outside the CT
   are air (-1024 HU). The grid is kept in the model's manifest; inference uses the model's.
3. **CT window** centre 40 / width 400 HU (-160..240 HU) scaled to 0..1, for both networks (S-Net's window is
   Shevtsov et al.'s clip range).
4. **Truth.** The node instance map (``nodes_path``; a binary mask is split into 26-connected components) is resampled
   by nearest neighbour onto the working grid; the training target is its foreground.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..cohort.table import CohortRow
from ..errors import InputError, UsageError
from ..io.images import load_ct, physical_bounds, read_image_file
from ..mapping.crop import CropBox, mediastinal_crop
from ..runtime import Progress, ProgressCallback
from ..staging.stations import NUM_STATIONS
from .instances import CONNECTIVITY_26, CT_OUTSIDE_HU

log = logging.getLogger(__name__)

#: Working spacing (x, y, z) in mm.
WORKING_SPACING_MM: tuple[float, float, float] = (2.0, 2.0, 4.0)
#: Margin around the station map (or the anatomy) of the node crop, in mm.
NODE_CROP_MARGIN_MM = 20.0
#: Smallest in-plane size of the working grid, in voxels.
MIN_INPLANE_VOXELS = 128
#: In-plane sizes are multiples of this (S-Net: 4; U-Net: 2 ** (levels - 1), up to 5 levels).
INPLANE_MULTIPLE = 16
#: CT window (centre, width) in HU, scaled to 0..1.
CT_WINDOW_HU: tuple[float, float] = (40.0, 400.0)


@dataclass
class NodeDataConfig:
    """How a CT becomes the networks' input (stored in the model's manifest as ``data_config``)."""

    spacing: tuple[float, float, float] = WORKING_SPACING_MM
    margin_mm: float = NODE_CROP_MARGIN_MM
    min_inplane: int = MIN_INPLANE_VOXELS
    window: tuple[float, float] = CT_WINDOW_HU

    def __post_init__(self) -> None:
        try:
            self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
            self.window = tuple(float(w) for w in self.window)  # type: ignore[assignment]
        except (TypeError, ValueError) as exc:
            raise UsageError(f"node data configuration: spacing and window must be numbers ({exc})") from None
        if len(self.spacing) != 3 or not all(math.isfinite(s) and 0.1 <= s <= 20.0 for s in self.spacing):
            raise UsageError(f"working spacing must be three values (x, y, z) between 0.1 and 20 mm, got "
                             f"{list(self.spacing)}")
        if len(self.window) != 2 or not all(math.isfinite(w) for w in self.window) or self.window[1] <= 0:
            raise UsageError(f"CT window must be (centre, width > 0) in HU, got {list(self.window)}")
        if not math.isfinite(float(self.margin_mm)) or self.margin_mm < 0:
            raise UsageError(f"crop margin must be >= 0 mm, got {self.margin_mm}")
        if int(self.min_inplane) != self.min_inplane or not 16 <= self.min_inplane <= 1024:
            raise UsageError(f"min_inplane must be a whole number of voxels in 16..1024, got {self.min_inplane}")
        self.margin_mm = float(self.margin_mm)
        self.min_inplane = int(self.min_inplane)

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "margin_mm": self.margin_mm, "min_inplane": self.min_inplane,
                "window": list(self.window)}

    @classmethod
    def from_dict(cls, data: dict) -> NodeDataConfig:
        if not isinstance(data, dict):
            raise UsageError(f"node data configuration must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"spacing", "margin_mm", "min_inplane", "window"}
        if unknown:
            raise UsageError(f"node data configuration has unknown keys {sorted(unknown)}")
        return cls(**data)


def window_ct(hu: np.ndarray, window: Sequence[float] = CT_WINDOW_HU) -> np.ndarray:
    """CT in HU -> float32 in 0..1: (HU - (centre - width / 2)) / width, clipped."""
    centre, width = float(window[0]), float(window[1])
    lo = centre - width / 2.0
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / width, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------------
# Crop and working grid
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class WorkingGrid:
    """An axis-aligned (identity direction) grid: ``origin`` is the centre of voxel 0, ``size`` (x, y, z)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    size: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (z, y, x)."""
        return (self.size[2], self.size[1], self.size[0])

    def reference(self, pixel: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image of this grid (for resampling onto it)."""
        img = sitk.Image([int(s) for s in self.size], pixel)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img

    def resample(self, image: sitk.Image, nearest: bool = False, default: float = 0.0) -> np.ndarray:
        """``image`` on this grid as a (z, y, x) array: linear to float32, or nearest neighbour keeping the pixel
        type; ``default`` outside the image."""
        pixel = image.GetPixelID() if nearest else sitk.sitkFloat32
        out = sitk.Resample(image, self.reference(pixel), sitk.Transform(),
                            sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, default, pixel)
        return sitk.GetArrayFromImage(out)

    def image(self, array: np.ndarray) -> sitk.Image:
        """A (z, y, x) array of this grid's shape as an image on the grid."""
        if tuple(array.shape) != self.shape:
            raise UsageError(f"array of shape {array.shape} does not fit the working grid {self.shape}")
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img

    def inside(self, box: CropBox) -> np.ndarray:
        """(z, y, x) bool array: voxel centres inside ``box`` (lower/upper)."""
        axes = []
        for a in range(3):
            centres = self.origin[a] + np.arange(self.size[a]) * self.spacing[a]
            axes.append((centres >= box.lower[a] - 1e-6) & (centres <= box.upper[a] + 1e-6))
        return axes[2][:, None, None] & axes[1][None, :, None] & axes[0][None, None, :]

    def to_dict(self) -> dict:
        return {"origin": [round(v, 3) for v in self.origin], "spacing": list(self.spacing), "size": list(self.size)}


def whole_image_box(ct: sitk.Image) -> CropBox:
    """The CT's own extent as a crop box (no anatomy and no station map)."""
    lo, hi = physical_bounds(ct)
    return CropBox(lo, hi, lo.copy(), hi.copy(), 0.0, "whole CT")


def node_crop(ct: sitk.Image, anatomy: sitk.Image | None = None, stations: sitk.Image | None = None,
              margin_mm: float = NODE_CROP_MARGIN_MM) -> CropBox:
    """The crop box of the node networks: around the station map when given, else around the anatomy's lungs +
    trachea + heart, else the whole CT; with ``margin_mm``, clipped to the CT."""
    if stations is not None:
        box = mediastinal_crop(stations=stations, margin_mm=margin_mm, clip_to=ct)
    elif anatomy is not None:
        box = mediastinal_crop(anatomy, margin_mm=margin_mm, clip_to=ct)
    else:
        return whole_image_box(ct)
    if np.any(box.upper <= box.lower):
        what = "station map" if stations is not None else "anatomy"
        raise InputError(f"the {what} does not overlap the CT (its region {np.round(box.core_lower, 1).tolist()}.."
                         f"{np.round(box.core_upper, 1).tolist()} mm lies outside the CT); expected both in one "
                         "patient space")
    return box


def working_grid(box: CropBox, config: NodeDataConfig) -> WorkingGrid:
    """The grid of ``config.spacing`` covering ``box``, in-plane padded (centred) to at least ``config.min_inplane``
    voxels and to a multiple of INPLANE_MULTIPLE."""
    spacing = np.asarray(config.spacing, dtype=float)
    lower, upper = np.asarray(box.lower, float), np.asarray(box.upper, float)
    extent = np.maximum(upper - lower, 0.0)
    size = np.maximum(np.ceil(extent / spacing - 1e-6).astype(int), 1)
    want = size.copy()
    for a in (0, 1):
        want[a] = max(int(size[a]), config.min_inplane)
        want[a] = int(math.ceil(want[a] / INPLANE_MULTIPLE) * INPLANE_MULTIPLE)
    pad_before = (want - size) // 2
    origin = lower + spacing / 2.0 - pad_before * spacing
    return WorkingGrid(tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
                       tuple(int(v) for v in want))


def ct_on_grid(ct: sitk.Image, grid: WorkingGrid, config: NodeDataConfig) -> np.ndarray:
    """The windowed CT (0..1, float32) on the working grid; air outside the CT."""
    hu = grid.resample(ct, default=CT_OUTSIDE_HU)
    return window_ct(hu, config.window)


def read_node_map(path: str | Path, what: str = "nodes_path") -> sitk.Image:
    """A node instance map (ids 1..n, 0 = background) or binary mask as uint32 instance ids (a binary mask becomes
    its 26-connected components). InputError naming ``what`` and the file for anything else."""
    img = read_image_file(path, pixel_type=None)
    return node_instances(img, f"{what} {path}")


def node_instances(image: sitk.Image, what: str = "node map") -> sitk.Image:
    """An instance map (uint32) from an instance or binary node image; refuses negative or fractional values."""
    arr = sitk.GetArrayFromImage(image)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"{what}: expected node instance ids (whole numbers, 0 = background), got fractional "
                             "or non-finite values")
    elif arr.dtype.kind not in "iub":
        raise InputError(f"{what}: expected an integer label image, got {image.GetPixelIDTypeAsString()}")
    if arr.size and arr.min() < 0:
        raise InputError(f"{what}: expected node instance ids >= 0 (0 = background), got {arr.min()}")
    ids = arr.astype(np.int64)
    if ids.size and ids.max() <= 1:
        ids, _ = ndimage.label(ids > 0, structure=CONNECTIVITY_26)
    out = sitk.GetImageFromArray(ids.astype(np.uint32))
    out.CopyInformation(image)
    return out


def read_station_map(path: str | Path, what: str = "stations") -> sitk.Image:
    """A station label map (0 = none, 1..17) as uint8; InputError naming ``what`` and the file otherwise."""
    img = read_image_file(path, pixel_type=None)
    return station_labels(img, f"{what} {path}")


def station_labels(image: sitk.Image, what: str = "station map") -> sitk.Image:
    """A station map as uint8, refusing values outside 0..17 and fractional labels."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr))):
        raise InputError(f"{what}: expected station labels 0..{NUM_STATIONS}, got fractional or non-finite values")
    if arr.size and (arr.min() < 0 or arr.max() > NUM_STATIONS):
        raise InputError(f"{what}: expected station labels 0..{NUM_STATIONS}, got {arr.min()}..{arr.max()}")
    if not np.any(arr):
        raise InputError(f"{what}: the station map is empty (no station label)")
    return sitk.Cast(image, sitk.sitkUInt8)


# --------------------------------------------------------------------------------------------------------------------
# Training cases
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class NodeCase:
    """One scan on its working grid: windowed CT and truth node instances, (z, y, x)."""

    case_id: str
    patient_id: str
    image: np.ndarray  # float32 0..1
    truth: np.ndarray  # int32 instance ids, 0 = background
    grid: WorkingGrid
    crop: CropBox
    split: str | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.truth > 0

    @property
    def positive_slices(self) -> np.ndarray:
        """Axial slice indices (z) holding node voxels."""
        return np.nonzero(self.mask.any(axis=(1, 2)))[0]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.case_id.encode())
        h.update(str(self.image.shape).encode())
        h.update(np.ascontiguousarray(self.image).tobytes())
        h.update(np.ascontiguousarray(self.truth).tobytes())
        return h.hexdigest()


@dataclass
class NodeCaseSet:
    """Cases read from a cohort and the rows left out, with why."""

    cases: list[NodeCase]
    skipped: list[dict] = field(default_factory=list)  # {"line", "scan_id", "reason"}

    @property
    def skipped_without_nodes(self) -> int:
        return sum(1 for s in self.skipped if s["reason"] == "no nodes_path")


def data_fingerprint(cases: Sequence[NodeCase]) -> str:
    """sha256 over the cases' ids, images and truth on the working grid (order-independent)."""
    return hashlib.sha256("\n".join(sorted(c.fingerprint() for c in cases)).encode()).hexdigest()


def make_case(case_id: str, ct: sitk.Image, nodes: sitk.Image, config: NodeDataConfig,
              anatomy: sitk.Image | None = None, stations: sitk.Image | None = None, patient_id: str | None = None,
              split: str | None = None) -> NodeCase:
    """A training case from images: crop, working grid, windowed CT and truth instances."""
    box = node_crop(ct, anatomy, stations, config.margin_mm)
    grid = working_grid(box, config)
    image = ct_on_grid(ct, grid, config)
    truth = grid.resample(sitk.Cast(node_instances(nodes, f"node map of {case_id}"), sitk.sitkUInt32),
                          nearest=True).astype(np.int32)
    return NodeCase(case_id, patient_id or case_id, image, truth, grid, box, split)


def row_images(row: CohortRow) -> tuple[sitk.Image, sitk.Image, sitk.Image | None, sitk.Image | None]:
    """CT, node map, station map (None without ``stations_path``) and anatomy (read only when there is no station
    map) of a cohort row with a ``nodes_path``; an InputError names the row."""
    where = f"line {row.line} ({row.scan_id})"
    if row.nodes_path is None:
        raise InputError(f"{where}: nodes_path is empty")
    if row.ct_path is None:
        raise InputError(f"{where}: ct_path is empty")
    try:
        ct, _, _ = load_ct(row.ct_path)
        nodes = read_node_map(row.nodes_path)
        stations = read_station_map(row.stations_path, "stations_path") if row.stations_path else None
        anatomy = None
        if stations is None and row.anatomy_path is not None:
            from ..anatomy.vocabulary import load_anatomy

            anatomy = load_anatomy(row.anatomy_path, reference=ct)
    except InputError as exc:
        text = str(exc)
        raise InputError(text if text.startswith(where) else f"{where}: {text}") from None
    return ct, nodes, stations, anatomy


def case_from_row(row: CohortRow, config: NodeDataConfig) -> NodeCase:
    """The training case of a cohort row with a ``nodes_path`` (the station map, else the anatomy, sets the crop)."""
    ct, nodes, stations, anatomy = row_images(row)
    where = f"line {row.line} ({row.scan_id})"
    try:
        return make_case(row.scan_id, ct, nodes, config, anatomy=anatomy, stations=stations,
                         patient_id=row.patient_id, split=row.split)
    except InputError as exc:
        text = str(exc)
        raise InputError(text if text.startswith(where) else f"{where}: {text}") from None


def load_node_cases(rows: Sequence[CohortRow], config: NodeDataConfig | None = None,
                    progress: ProgressCallback | None = None) -> NodeCaseSet:
    """Training cases of the cohort rows that have a ``nodes_path``; the others are skipped and counted (logged)."""
    config = config or NodeDataConfig()
    cases: list[NodeCase] = []
    skipped: list[dict] = []
    for i, row in enumerate(rows):
        if row.nodes_path is None:
            skipped.append({"line": row.line, "scan_id": row.scan_id, "reason": "no nodes_path"})
        else:
            cases.append(case_from_row(row, config))
        if progress is not None:
            progress(Progress(i + 1, len(rows), f"node data: scan {i + 1} of {len(rows)}"))
    if skipped:
        log.warning("%d of %d cohort rows have no nodes_path and are skipped", len(skipped), len(rows))
    return NodeCaseSet(cases, skipped)


def split_by_patient(cases: Sequence[NodeCase], val_fraction: float, seed: int) -> tuple[list[NodeCase],
                                                                                         list[NodeCase]]:
    """Training and validation cases, split by patient. The cohort's ``split`` column wins when it names any
    validation row (val/validation; test rows are left out of both); otherwise a seeded draw of
    round(val_fraction * patients) patients (at least one when there are two or more patients and
    val_fraction > 0)."""
    if not 0.0 <= val_fraction < 1.0:
        raise UsageError(f"val_fraction must be in [0, 1), got {val_fraction}")
    usable = [c for c in cases if c.split != "test"]
    if any(c.split in ("val", "validation") for c in usable):
        val = [c for c in usable if c.split in ("val", "validation")]
        return [c for c in usable if c not in val], val
    patients = sorted({c.patient_id for c in usable})
    n_val = int(round(val_fraction * len(patients)))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    rng = np.random.default_rng([int(seed), 7919])
    chosen = set(rng.permutation(patients)[:n_val].tolist()) if n_val else set()
    return [c for c in usable if c.patient_id not in chosen], [c for c in usable if c.patient_id in chosen]

