"""Finding and assembling DICOM image series: scan a folder, group files by series, choose one series by modality
(or by a user-given SeriesInstanceUID / SeriesNumber / description), sort the slices along the slice normal and
turn them into a SimpleITK image with the DICOM geometry.

Files without pixel data (a DICOMDIR, structured reports, presentation states, header-only files) and DICOM files
that cannot be parsed are skipped and counted; the count is logged and reported by :meth:`SeriesInfo.notes`, and a
folder with nothing else is refused. One series holds one patient, one study and
one frame of reference: PatientID (0010,0020), StudyInstanceUID (0020,000D) and FrameOfReferenceUID (0020,0052)
must be equal on every file of the series, or absent (or empty) on every file.

The pixel values are rescaled per slice (``RescaleSlope * SV + RescaleIntercept`` in float64, each slice with its
own slope and intercept), which SimpleITK's series reader does not guarantee (it may return truncated int16).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.filereader import read_partial

from ..errors import InputError
from ..runtime import Progress, ProgressCallback

log = logging.getLogger(__name__)


#: Relative tolerance for equal orientation cosines and for uniform slice spacing.
ORIENTATION_TOL = 1e-4
SPACING_TOL = 0.01  # fraction of the median slice spacing
#: The pixel data elements: FloatPixelData (7FE0,0008), DoubleFloatPixelData (7FE0,0009), PixelData (7FE0,0010).
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: The identity of a series: every file must carry the same value (or none carries one).
IDENTITY_TAGS = (("PatientID", "(0010,0020)", "patient"), ("StudyInstanceUID", "(0020,000D)", "study"),
                 ("FrameOfReferenceUID", "(0020,0052)", "frame of reference"))


@dataclass(frozen=True)
class SkippedFile:
    """A DICOM file of the scanned folder without pixel data: its path, what it is (DICOMDIR, the Modality or the
    SOP class) and its SeriesInstanceUID (empty if none)."""

    path: Path
    kind: str
    series_uid: str = ""


@dataclass
class FolderScan:
    """What a folder scan left out: DICOM files without pixel data, DICOM files that cannot be parsed and the number
    of files that are not DICOM."""

    folder: Path
    no_pixel_data: list[SkippedFile] = field(default_factory=list)
    not_dicom: int = 0
    unreadable: list[Path] = field(default_factory=list)  # files that start as DICOM but cannot be parsed

    def summary(self) -> str | None:
        """One sentence on the files without pixel data, or None when there are none."""
        if not self.no_pixel_data:
            return None
        kinds = Counter(f.kind for f in self.no_pixel_data)
        listing = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
        n = len(self.no_pixel_data)
        return (f"{self.folder}: {n} DICOM file{'s' if n != 1 else ''} without PixelData (7FE0,0010) skipped "
                f"({listing}; e.g. {_relative(self.no_pixel_data[0].path, self.folder)})")


@dataclass
class SeriesInfo:
    """One series found in a folder (headers only)."""

    series_uid: str
    modality: str
    series_number: str
    description: str
    files: list[Path] = field(default_factory=list)
    scan: FolderScan | None = field(default=None, repr=False, compare=False)  # the scan that found it (shared)

    def label(self) -> str:
        return (f"{self.modality} series {self.series_number or '?'} '{self.description}' "
                f"({len(self.files)} files, SeriesInstanceUID {self.series_uid})")

    @property
    def unreadable(self) -> list[Path]:
        """The folder's files that start as DICOM but cannot be parsed (skipped)."""
        return list(self.scan.unreadable) if self.scan is not None else []

    @property
    def skipped(self) -> list[SkippedFile]:
        """The folder's DICOM files without pixel data (skipped)."""
        return list(self.scan.no_pixel_data) if self.scan is not None else []

    def notes(self) -> list[str]:
        """Warnings about the folder this series came from: skipped files without pixel data or that cannot be
        parsed, and header-only files of this very series."""
        if self.scan is None:
            return []
        notes = []
        if self.scan.unreadable:
            n = len(self.scan.unreadable)
            notes.append(f"{self.scan.folder}: {n} DICOM file{'s' if n != 1 else ''} that cannot be parsed skipped "
                         f"(truncated or damaged? e.g. {_relative(self.scan.unreadable[0], self.scan.folder)})")
        if self.scan.no_pixel_data:
            notes.append(self.scan.summary() or "")
        own = [f for f in self.scan.no_pixel_data if f.series_uid == self.series_uid]
        if own:
            notes.append(f"{len(own)} of them carr{'ies' if len(own) == 1 else 'y'} this series' SeriesInstanceUID "
                         f"{self.series_uid} (e.g. {_relative(own[0].path, self.scan.folder)}): header-only slices; "
                         "check that the series is complete")
        return notes

    def to_dict(self) -> dict:
        return {"series_uid": self.series_uid, "modality": self.modality, "series_number": self.series_number,
                "description": self.description, "files": len(self.files),
                "skipped_without_pixel_data": len(self.skipped), "skipped_unreadable": len(self.unreadable)}


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
        return str(getattr(self.headers[0], "FrameOfReferenceUID", "")).strip() or None

    @property
    def warnings(self) -> list[str]:
        """Warnings from finding the series (:meth:`SeriesInfo.notes`)."""
        return self.info.notes()

    def stored_values(self) -> list[np.ndarray]:
        """The stored pixel values (SV) of each slice, as read from the files (rows x columns)."""
        out = []
        for path in self.files:
            try:
                ds = pydicom.dcmread(path)
                arr = ds.pixel_array
            except Exception as exc:  # noqa: BLE001 - any decoding problem is bad input here
                raise InputError(f"{path}: the PixelData (7FE0,0010) cannot be decoded ({reason(exc)}); expected "
                                 "an uncompressed or decodable single-frame image") from exc
            if arr.ndim != 2:
                raise InputError(f"{path}: expected a single-frame image, got PixelData of shape {arr.shape}; "
                                 "multi-frame (enhanced) images are not supported")
            out.append(arr)
        return out

    def rescale_parameters(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-slice RescaleSlope (0028,1053) and RescaleIntercept (0028,1052); 1 and 0 where absent."""
        slopes, inter = [], []
        for path, h in zip(self.files, self.headers, strict=True):
            m = _numbers(h, path, "RescaleSlope", "(0028,1053)", 1)[0] if h.get("RescaleSlope") else 1.0
            b = _numbers(h, path, "RescaleIntercept", "(0028,1052)", 1)[0] if h.get("RescaleIntercept") else 0.0
            slopes.append(m or 1.0)
            inter.append(b)
        return np.array(slopes, dtype=np.float64), np.array(inter, dtype=np.float64)

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


def reason(exc: BaseException) -> str:
    """A library exception's text as one short clause: the SimpleITK/ITK error line, else the first line."""
    text = str(exc).strip()
    for line in text.splitlines():
        if "ERROR:" in line:
            return line.split("ERROR:", 1)[1].strip() or type(exc).__name__
    first = text.splitlines()[0].strip() if text else ""
    return first or type(exc).__name__


def _relative(path: Path, folder: Path | None) -> str:
    if folder is not None:
        try:
            return str(path.relative_to(folder))
        except ValueError:
            pass
    return str(path)


def _starts_as_dicom(path: Path) -> bool:
    """Whether the file has the DICOM preamble and prefix 'DICM' at byte 128."""
    try:
        with open(path, "rb") as fp:
            head = fp.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def read_header(path: Path) -> tuple[pydicom.Dataset | None, bool]:
    """The header of a DICOM file (elements before the pixel data) and whether it has non-empty pixel data;
    (None, False) for a file that is not DICOM or cannot be parsed."""
    found: list[int] = []

    def at_pixels(tag, vr, length) -> bool:
        if int(tag) in PIXEL_DATA_TAGS:
            found.append(length)
            return True
        return False

    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # damaged files are counted, not warned about one by one
            ds = read_partial(fp, at_pixels)
    except Exception:  # noqa: BLE001 - non-DICOM files in a folder are skipped
        return None, False
    ds.filename = str(path)
    return ds, bool(found) and found[0] != 0


def _read_header(path: Path) -> pydicom.Dataset | None:
    return read_header(path)[0]


def _kind(ds: pydicom.Dataset) -> str:
    """What a DICOM file without pixel data is, for the skip count: DICOMDIR, else its Modality, else its SOP class."""
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if len(ds) == 0:
        return "empty or truncated"
    if sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    modality = str(ds.get("Modality", "") or "").strip()
    if modality:
        return modality
    name = pydicom.uid.UID(sop).name if sop else ""
    return name or "unknown"


def scan_folder(folder: str | Path, progress: ProgressCallback | None = None) -> list[SeriesInfo]:
    """All image series (files with pixel data and ImagePositionPatient) under ``folder``, recursively, grouped by
    SeriesInstanceUID. DICOM files without pixel data or that cannot be parsed are skipped and counted
    (:attr:`SeriesInfo.scan`); a folder with no other DICOM files is refused."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: expected a folder of DICOM files")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    scan = FolderScan(folder)
    series: dict[str, SeriesInfo] = {}
    for i, path in enumerate(files):
        if progress is not None and i % 50 == 0:
            progress(Progress(i, max(len(files), 1), f"scanning {path.name}"))
        ds, has_pixels = read_header(path)
        if ds is None:
            if _starts_as_dicom(path):
                scan.unreadable.append(path)
            else:
                scan.not_dicom += 1
            continue
        if not has_pixels:
            scan.no_pixel_data.append(SkippedFile(path, _kind(ds), str(ds.get("SeriesInstanceUID", "") or "")))
            continue
        if "SeriesInstanceUID" not in ds or "ImagePositionPatient" not in ds:
            continue
        uid = str(ds.SeriesInstanceUID)
        if uid not in series:
            series[uid] = SeriesInfo(uid, str(getattr(ds, "Modality", "")), str(getattr(ds, "SeriesNumber", "")),
                                     str(getattr(ds, "SeriesDescription", "")), scan=scan)
        series[uid].files.append(path)
    if scan.not_dicom:
        log.info("%s: %d files that are not DICOM skipped", folder, scan.not_dicom)
    if scan.unreadable:
        log.warning("%s: %d DICOM files that cannot be parsed skipped (e.g. %s)", folder, len(scan.unreadable),
                    scan.unreadable[0])
    if scan.no_pixel_data:
        log.warning("%s", scan.summary())
    if not series and scan.no_pixel_data:
        kinds = ", ".join(sorted({f.kind for f in scan.no_pixel_data}))
        damaged = f"; {len(scan.unreadable)} more cannot be parsed" if scan.unreadable else ""
        raise InputError(f"{folder}: none of its {len(scan.no_pixel_data)} DICOM files has PixelData (7FE0,0010) "
                         f"({kinds}; e.g. {_relative(scan.no_pixel_data[0].path, folder)}){damaged}; expected the "
                         "image slices of a series, not only a DICOMDIR, reports, presentation states or header-only "
                         "files")
    if not series and scan.unreadable:
        raise InputError(f"{folder}: none of its DICOM files can be parsed ({len(scan.unreadable)} files, e.g. "
                         f"{_relative(scan.unreadable[0], folder)}: truncated or damaged?); expected readable "
                         "DICOM image slices")
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
        skipped = [f for f in (found[0].skipped if found else []) if f.kind.upper() == modality.upper()]
        extra = (f"; {len(skipped)} {modality} files without PixelData (7FE0,0010) were skipped (e.g. "
                 f"{skipped[0].path})" if skipped else "")
        raise InputError(f"{where}: no series with Modality (0008,0060) = {modality}; found: {others}{extra}")
    if len(candidates) > 1:
        listing = "; ".join(s.label() for s in candidates)
        raise InputError(
            f"{where}: {len(candidates)} {modality} series found, choose one with the 'series' parameter "
            f"(SeriesInstanceUID, SeriesNumber or SeriesDescription): {listing}")
    return candidates[0]


def _identity(ds: pydicom.Dataset, keyword: str) -> str | None:
    v = ds.get(keyword, None)
    text = str(v).strip() if v is not None else ""
    return text or None


def check_identity(info: SeriesInfo, headers: list[pydicom.Dataset]) -> None:
    """One patient, one study, one frame of reference: PatientID (0010,0020), StudyInstanceUID (0020,000D) and
    FrameOfReferenceUID (0020,0052) equal on every file, or absent/empty on every file; else InputError naming the
    folder, the tag, the two values and a file of each."""
    folder = info.scan.folder if info.scan is not None else (info.files[0].parent if info.files else None)
    for keyword, number, what in IDENTITY_TAGS:
        values = [_identity(h, keyword) for h in headers]
        first = values[0]
        for path, v in zip(info.files, values, strict=True):
            if v == first:
                continue
            shown = [f"'{x}'" if x is not None else "missing (or empty)" for x in (first, v)]
            expected = (f"expected one {what} per series (files of another {what} under the same series UID?)"
                        if first is not None and v is not None else
                        f"expected the tag on every file of the series or on none (one {what} per series)")
            raise InputError(
                f"{folder}: {keyword} {number} is {shown[0]} in {_relative(info.files[0], folder)} but {shown[1]} in "
                f"{_relative(path, folder)}, within SeriesInstanceUID {info.series_uid}; {expected}")


def _numbers(ds: pydicom.Dataset, path: Path, keyword: str, number: str, count: int) -> np.ndarray:
    """``count`` numbers of a required geometry element, or InputError naming the file and the tag."""
    if keyword not in ds or ds.get(keyword) in (None, ""):
        raise InputError(f"{path}: {keyword} {number} is missing; expected {count} number{'s' if count > 1 else ''}")
    raw = ds.get(keyword)
    values = list(raw) if isinstance(raw, list | tuple | pydicom.multival.MultiValue) else [raw]
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{path}: {keyword} {number} = {raw!r} is not numeric ({reason(exc)}); expected {count} "
                         "numbers") from exc
    if out.size != count or not np.all(np.isfinite(out)):
        raise InputError(f"{path}: {keyword} {number} = {raw!r}; expected {count} finite numbers")
    return out


def assemble(info: SeriesInfo) -> DicomSeries:
    """Read the headers of one series, check identity, orientation and positions, sort along the slice normal."""
    headers = []
    for path in info.files:
        ds = _read_header(path)
        if ds is None:
            raise InputError(f"{path}: not readable as DICOM")
        frames = ds.get("NumberOfFrames", 1)
        try:
            frames = int(frames or 1)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}: NumberOfFrames (0028,0008) = {frames!r} is not a number") from exc
        if frames > 1:
            raise InputError(f"{path}: NumberOfFrames (0028,0008) = {frames}; multi-frame "
                             "(enhanced) images are not supported, expected one slice per file")
        headers.append(ds)
    check_identity(info, headers)
    orient = [_numbers(ds, path, "ImageOrientationPatient", "(0020,0037)", 6)
              for path, ds in zip(info.files, headers, strict=True)]
    ref = orient[0]
    for path, o in zip(info.files, orient, strict=True):
        if np.max(np.abs(o - ref)) > ORIENTATION_TOL:
            raise InputError(
                f"{info.label()}: mixed ImageOrientationPatient (0020,0037): {list(ref)} in {info.files[0].name} "
                f"but {list(o)} in {path.name}; expected one orientation per series")
    row, col = ref[:3], ref[3:]
    normal = np.cross(row, col)
    pos = np.array([_numbers(ds, path, "ImagePositionPatient", "(0020,0032)", 3)
                    for path, ds in zip(info.files, headers, strict=True)])
    shapes = {}
    for path, ds in zip(info.files, headers, strict=True):
        rc = _numbers(ds, path, "Rows", "(0028,0010)", 1)[0], _numbers(ds, path, "Columns", "(0028,0011)", 1)[0]
        shapes.setdefault((int(rc[0]), int(rc[1])), path)
    if len(shapes) > 1:
        listing = ", ".join(f"{r}x{c} in {p.name}" for (r, c), p in shapes.items())
        raise InputError(f"{info.label()}: slices of different size Rows/Columns (0028,0010)/(0028,0011): {listing}; "
                         "expected one size per series")
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
    ps = ([float(v) for v in _numbers(headers[0], files[0], "PixelSpacing", "(0028,0030)", 2)]
          if "PixelSpacing" in headers[0] else [1.0, 1.0])
    direction = (row[0], col[0], normal[0], row[1], col[1], normal[1], row[2], col[2], normal[2])
    # PixelSpacing is (row spacing = between rows, i.e. along the column direction; column spacing)
    return DicomSeries(info=info, headers=headers, files=files, origin=tuple(float(v) for v in pos[0]),
                       spacing=(ps[1], ps[0], step), direction=tuple(float(v) for v in direction),
                       positions_along_normal=dist)


def find_series(folder: str | Path, modality: str, series: str | None = None) -> DicomSeries:
    """Scan ``folder`` and assemble the one series of ``modality`` (``series`` chooses among several)."""
    return assemble(choose_series(scan_folder(folder), modality, series, where=str(folder)))

