"""Finding and assembling DICOM image series: scan a folder, group files by series, choose one series by modality
(or by a user-given SeriesInstanceUID / SeriesNumber / description), sort the slices along the slice normal and
turn them into a SimpleITK image with the DICOM geometry.

The pixel values are rescaled per slice (``RescaleSlope * SV + RescaleIntercept`` in float64, each slice with its
own slope and intercept), which SimpleITK's series reader does not guarantee (it may return truncated int16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import InputError
from ..runtime import Progress, ProgressCallback

log = logging.getLogger(__name__)


#: Relative tolerance for equal orientation cosines and for uniform slice spacing.
ORIENTATION_TOL = 1e-4
SPACING_TOL = 0.01  # fraction of the median slice spacing


@dataclass
class SeriesInfo:
    """One series found in a folder (headers only)."""

    series_uid: str
    modality: str
    series_number: str
    description: str
    files: list[Path] = field(default_factory=list)

    def label(self) -> str:
        return (f"{self.modality} series {self.series_number or '?'} '{self.description}' "
                f"({len(self.files)} files, SeriesInstanceUID {self.series_uid})")

    def to_dict(self) -> dict:
        return {"series_uid": self.series_uid, "modality": self.modality, "series_number": self.series_number,
                "description": self.description, "files": len(self.files)}


@dataclass
class DicomSeries:
    """A sorted, geometrically consistent single-frame series: headers (no pixels) and their files."""

    info: SeriesInfo
    headers: list[pydicom.Dataset]  # sorted along the slice normal, ascending
    files: list[Path]  # same order
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, columns = row, column, normal directions (SimpleITK convention)
    positions_along_normal: np.ndarray

    @property
    def modality(self) -> str:
        return self.info.modality

    @property
    def frame_of_reference_uid(self) -> str | None:
        return str(getattr(self.headers[0], "FrameOfReferenceUID", "")) or None

    def stored_values(self) -> list[np.ndarray]:
        """The stored pixel values (SV) of each slice, as read from the files (rows x columns)."""
        out = []
        for path in self.files:
            try:
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
            except Exception as exc:  # noqa: BLE001 - any decoding problem is bad input here
                raise InputError(f"{path}: cannot decode PixelData (7FE0,0010): {exc}") from exc
            if arr.ndim != 2:
                raise InputError(f"{path}: expected a single-frame image, got PixelData of shape {arr.shape}; "
                                       "multi-frame (enhanced) images are not supported")
            out.append(arr)
        return out

    def rescale_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-slice RescaleSlope (0028,1053) and RescaleIntercept (0028,1052); 1 and 0 where absent."""
        slopes = np.array([float(getattr(h, "RescaleSlope", 1.0) or 1.0) for h in self.headers], dtype=np.float64)
        inter = np.array([float(getattr(h, "RescaleIntercept", 0.0) or 0.0) for h in self.headers], dtype=np.float64)
        return slopes, inter

    def rescaled_array(self) -> np.ndarray:
        """The volume ``m_k * SV_k + b_k`` in float64, shape (slices, rows, columns), each slice with its own m, b."""
        slopes, inter = self.rescale_parameters()
        stored = self.stored_values()
        vol = np.empty((len(stored),) + stored[0].shape, dtype=np.float64)
        for k, sv in enumerate(stored):
            vol[k] = sv.astype(np.float64) * slopes[k] + inter[k]
        return vol

    def to_image(self, array: np.ndarray, dtype=np.float32) -> sitk.Image:
        """A SimpleITK image with this series' geometry for an array of shape (slices, rows, columns)."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=dtype))
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        img.SetDirection(self.direction)
        return img


def _read_header(path: Path) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - non-DICOM files in a folder are skipped
        return None


def scan_folder(folder: str | Path, progress: ProgressCallback | None = None) -> list[SeriesInfo]:
    """All image series (files with pixel data geometry) under ``folder``, recursively, grouped by SeriesInstanceUID."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a folder of DICOM files")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    series: dict[str, SeriesInfo] = {}
    for i, path in enumerate(files):
        if progress is not None and i % 50 == 0:
            progress(Progress(i, max(len(files), 1), f"scanning {path.name}"))
        ds = _read_header(path)
        if ds is None or "SeriesInstanceUID" not in ds or "ImagePositionPatient" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        if uid not in series:
            series[uid] = SeriesInfo(uid, str(getattr(ds, "Modality", "")), str(getattr(ds, "SeriesNumber", "")),
                                     str(getattr(ds, "SeriesDescription", "")))
        series[uid].files.append(path)
    return list(series.values())


def choose_series(found: list[SeriesInfo], modality: str, series: str | None = None, where: str = "") -> SeriesInfo:
    """The one series of ``modality``; ``series`` (SeriesInstanceUID, SeriesNumber or a description) picks one of
    several candidates. Several candidates and no choice -> error listing them."""
    candidates = [s for s in found if s.modality.upper() == modality.upper()]
    if series is not None:
        picked = [s for s in candidates if series in (s.series_uid, s.series_number, s.description)]
        if len(picked) != 1:
            listing = "; ".join(s.label() for s in candidates) or "none"
            raise InputError(
                f"{where}: series '{series}' matches {len(picked)} {modality} series (expected exactly one "
                f"SeriesInstanceUID, SeriesNumber or SeriesDescription); candidates: {listing}")
        return picked[0]
    if not candidates:
        others = "; ".join(s.label() for s in found) or "no DICOM image files"
        raise InputError(f"{where}: no series with Modality (0008,0060) = {modality}; found: {others}")
    if len(candidates) > 1:
        listing = "; ".join(s.label() for s in candidates)
        raise InputError(
            f"{where}: {len(candidates)} {modality} series found, choose one with the 'series' parameter "
            f"(SeriesInstanceUID, SeriesNumber or SeriesDescription): {listing}")
    return candidates[0]


def assemble(info: SeriesInfo) -> DicomSeries:
    """Read the headers of one series, check orientation and positions, sort along the slice normal."""
    headers = []
    for path in info.files:
        ds = _read_header(path)
        if ds is None:
            raise InputError(f"{path}: not readable as DICOM")
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise InputError(f"{path}: NumberOfFrames (0028,0008) = {ds.NumberOfFrames}; multi-frame "
                                   "(enhanced) images are not supported, expected one slice per file")
        headers.append(ds)
    orient = []
    for path, ds in zip(info.files, headers, strict=True):
        if "ImageOrientationPatient" not in ds:
            raise InputError(f"{path}: ImageOrientationPatient (0020,0037) is missing")
        orient.append(np.array([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64))
    ref = orient[0]
    for path, o in zip(info.files, orient, strict=True):
        if np.max(np.abs(o - ref)) > ORIENTATION_TOL:
            raise InputError(
                f"{info.label()}: mixed ImageOrientationPatient (0020,0037): {list(ref)} in {info.files[0].name} "
                f"but {list(o)} in {path.name}; expected one orientation per series")
    row, col = ref[:3], ref[3:]
    normal = np.cross(row, col)
    pos = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in headers], dtype=np.float64)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    headers = [headers[i] for i in order]
    files = [info.files[i] for i in order]
    pos = pos[order]
    if len(dist) > 1:
        gaps = np.diff(dist)
        dup = np.flatnonzero(gaps < 1e-3)
        if dup.size:
            k = int(dup[0])
            raise InputError(
                f"{info.label()}: duplicate ImagePositionPatient (0020,0032) {list(pos[k])} in {files[k].name} and "
                f"{files[k + 1].name} (dynamic, gated or duplicated files?); expected one slice per position")
        step = float(np.median(gaps))
        if np.max(np.abs(gaps - step)) > SPACING_TOL * step:
            raise InputError(
                f"{info.label()}: non-uniform slice spacing along the normal (ImagePositionPatient (0020,0032)): "
                f"gaps from {gaps.min():.3f} to {gaps.max():.3f} mm; expected equally spaced slices")
    else:
        step = float(getattr(headers[0], "SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in getattr(headers[0], "PixelSpacing", [1.0, 1.0])]
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(shapes) > 1:
        raise InputError(f"{info.label()}: slices of different size Rows/Columns (0028,0010/0011): {shapes}")
    direction = (row[0], col[0], normal[0], row[1], col[1], normal[1], row[2], col[2], normal[2])
    # PixelSpacing is (row spacing = between rows, i.e. along the column direction; column spacing)
    return DicomSeries(info=info, headers=headers, files=files, origin=tuple(pos[0]),
                       spacing=(ps[1], ps[0], step), direction=tuple(float(v) for v in direction),
                       positions_along_normal=dist)


def find_series(folder: str | Path, modality: str, series: str | None = None) -> DicomSeries:
    """Scan ``folder`` and assemble the one series of ``modality`` (``series`` chooses among several)."""
    return assemble(choose_series(scan_folder(folder), modality, series, where=str(folder)))

