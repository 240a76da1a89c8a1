"""Image files read to their end before they are used: a truncated or corrupt file is refused, naming the file.

SimpleITK fills the missing part of a truncated ``.nii.gz`` with zeros and reads it without an error, so the file is
checked first: its header (the grid, read without the voxels) and its data, which must hold every byte the header
promises. A compressed data stream (gzip ``.nii.gz``, NRRD with gzip or bzip2 encoding, MetaImage with
``CompressedData = True``) is decompressed to its end, which also finds a damaged stream (CRC or format error); raw
data is compared with the file size.
"""

from __future__ import annotations

import bz2
import logging
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..io.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

CHUNK = 1 << 20
COMPRESSED_CHUNK = 1 << 16

#: Bytes per component of the SimpleITK pixel types (scalar and vector images of one component type).
_COMPONENT_BYTES = {
    sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
    sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8,
    sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1, sitk.sitkVectorUInt16: 2, sitk.sitkVectorInt16: 2,
    sitk.sitkVectorUInt32: 4, sitk.sitkVectorInt32: 4, sitk.sitkVectorFloat32: 4, sitk.sitkVectorFloat64: 8,
}


@dataclass(frozen=True)
class ImageHeader:
    """The grid of an image file as its header describes it (no voxel read)."""

    path: Path
    size: tuple[int, ...]  # (x, y, z)
    spacing: tuple[float, ...]  # mm
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int
    pixel_id: int

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.size:
            n *= int(s)
        return n


def describe(path: str | Path, role: str) -> str:
    """How a message names a file: ``CT /data/ct.nii.gz``."""
    return f"{role} {path}"


def _is_image_file(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def read_header(path: str | Path, role: str = "image") -> ImageHeader:
    """The header of an image file (NIfTI, NRRD, MHA/MHD) without its voxels; InputError naming the file when it
    is missing, of an unknown format, unreadable, or not a 3D scalar image."""
    path = Path(path)
    what = describe(path, role)
    if not path.exists():
        raise InputError(f"{what}: file not found")
    if not path.is_file():
        raise InputError(f"{what}: expected an image file, got a folder")
    if not _is_image_file(path):
        raise InputError(f"{what}: unknown image format; expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        log.debug("SimpleITK could not read the header of %s: %s", path, exc)
        raise InputError(f"{what}: cannot be read as an image (the header is damaged, or the file is not the "
                         f"{_format_name(path)} file its name says)") from None
    size = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    if len(size) != 3 or components != 1:
        raise InputError(f"{what}: expected a 3D scalar image, got dimension {len(size)} with {components} "
                         "components per voxel")
    return ImageHeader(path, size, tuple(float(s) for s in reader.GetSpacing()), tuple(reader.GetOrigin()),
                       tuple(reader.GetDirection()), components, int(reader.GetPixelID()))


def _format_name(path: Path) -> str:
    name = path.name.lower()
    if ".nii" in name:
        return "NIfTI"
    if name.endswith((".nrrd", ".nhdr")):
        return "NRRD"
    return "MetaImage"


def check_complete(path: str | Path, role: str = "image", header: ImageHeader | None = None) -> None:
    """Read an image file's data to its end: refuse it when it is cut short or damaged (every compressed stream is
    decompressed to its end and must hold the bytes the header promises; raw data must fit in the file), and when
    its floating-point voxels hold NaN or infinite values (counted in the file itself: SimpleITK's NIfTI reader
    turns NaN into 0). InputError naming the file."""
    path = Path(path)
    header = header or read_header(path, role)
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        _check_nifti(path, role)
    elif name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(path, role, header)
    elif name.endswith((".mha", ".mhd")):
        _check_metaimage(path, role, header)


def _expected_bytes(header: ImageHeader) -> int | None:
    per = _COMPONENT_BYTES.get(header.pixel_id)
    return None if per is None else header.voxels * header.components * per


class _DataScan:
    """Bytes of a data stream fed in pieces, and the NaN and infinite values among its floating-point voxels (the
    first ``skip`` bytes are a header)."""

    def __init__(self, dtype: np.dtype | None = None, skip: int = 0) -> None:
        self.dtype, self.skip = dtype, skip
        self.total = self.nan = self.inf = self.values = 0
        self._rest = b""

    def feed(self, chunk: bytes) -> None:
        start = self.total
        self.total += len(chunk)
        if self.dtype is None or not chunk:
            return
        if start < self.skip:
            chunk = chunk[self.skip - start:]
        data = self._rest + chunk
        n = len(data) // self.dtype.itemsize * self.dtype.itemsize
        self._rest = data[n:]
        if n:
            values = np.frombuffer(data[:n], dtype=self.dtype)
            finite = np.isfinite(values)
            if not finite.all():
                bad = values[~finite]
                nan = int(np.count_nonzero(np.isnan(bad)))
                self.nan += nan
                self.inf += bad.size - nan
            self.values += values.size

    def check_finite(self, what: str, limit: int | None = None) -> None:
        """Refuse NaN or infinite voxels (among the first ``limit`` values: the image's voxels)."""
        bad = self.nan + self.inf
        if bad:
            total = min(self.values, limit) if limit else self.values
            raise InputError(f"{what}: {bad:,} of {total:,} voxels ({bad / max(total, 1):.2%}) are not finite "
                             f"({self.nan:,} NaN, {self.inf:,} infinite); expected finite values in every voxel (a "
                             "damaged file or a failed conversion)")


def _scan(what: str, pieces: Iterator[bytes], kind: str, scan: _DataScan) -> _DataScan:
    """Feed a data stream to its end; InputError for a cut or damaged stream."""
    try:
        for piece in pieces:
            scan.feed(piece)
    except EOFError:
        raise InputError(f"{what}: the file is truncated: its {kind} data ends after {scan.total:,} decompressed "
                         "bytes, before the end of the stream (an incomplete copy or download); copy the file "
                         "again") from None
    except (OSError, zlib.error, ValueError) as exc:
        raise InputError(f"{what}: the {kind} data is corrupt ({_short(exc)}) after {scan.total:,} decompressed "
                         "bytes; copy the file again") from None
    return scan


def _short(exc: Exception) -> str:
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


def _raw_pieces(path: Path, offset: int = 0, size: int = CHUNK) -> Iterator[bytes]:
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            piece = f.read(size)
            if not piece:
                return
            yield piece


def _inflate_pieces(path: Path, offset: int = 0) -> Iterator[bytes]:
    """A zlib or gzip stream (gzip: one member after the other) from ``offset``, decompressed piece by piece (64 KB
    of compressed data at a time: at most about 66 MB decompressed); EOFError when the file ends before the stream
    does."""
    d = zlib.decompressobj(zlib.MAX_WBITS | 32)
    for piece in _raw_pieces(path, offset, COMPRESSED_CHUNK):
        while piece:
            if d.eof:  # a stream ended: another gzip member, or padding after the data
                if not piece.startswith(b"\x1f\x8b"):
                    return
                d = zlib.decompressobj(zlib.MAX_WBITS | 32)
            yield d.decompress(piece)
            piece = d.unused_data if d.eof else b""
    yield d.flush()
    if not d.eof:
        raise EOFError("compressed stream ended early")


def _bz2_pieces(path: Path, offset: int) -> Iterator[bytes]:
    with open(path, "rb") as raw:
        raw.seek(offset)
        with bz2.BZ2File(raw) as f:
            while True:
                piece = f.read(CHUNK)
                if not piece:
                    return
                yield piece


def _short_data(what: str, have: int, need: int, kind: str) -> InputError:
    return InputError(f"{what}: the file is truncated: the header promises {need:,} bytes of {kind}voxel data, the "
                      f"file holds {have:,} (an incomplete copy or download); copy the file again")


def _float_dtype(kind: str, big_endian: bool) -> np.dtype | None:
    """The numpy type of floating-point voxels ("float" or "double"), None for other types."""
    base = {"float": "f4", "double": "f8"}.get(kind)
    return None if base is None else np.dtype((">" if big_endian else "<") + base)


# ----- NIfTI

#: NIfTI datatype codes of floating-point voxels.
_NIFTI_FLOATS = {16: "float", 64: "double"}


def _nifti_header(head: bytes, what: str) -> tuple[int, int, np.dtype | None]:
    """(vox_offset, voxel bytes, float dtype or None) from a NIfTI-1 or NIfTI-2 header."""
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            datatype, bitpix = struct.unpack(endian + "2h", head[70:74])
            offset = max(int(struct.unpack(endian + "f", head[108:112])[0]), 348)
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype, bitpix = struct.unpack(endian + "2h", head[12:16])
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = max(int(struct.unpack(endian + "q", head[168:176])[0]), 540)
            break
    else:
        raise InputError(f"{what}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    voxels = 1
    for k in range(1, min(max(int(dim[0]), 1), 7) + 1):
        voxels *= max(int(dim[k]), 1)
    dtype = _float_dtype(_NIFTI_FLOATS.get(int(datatype), ""), endian == ">")
    return offset, voxels * max(int(bitpix), 0) // 8, dtype


def _check_nifti(path: Path, role: str) -> None:
    what = describe(path, role)
    compressed = path.name.lower().endswith(".gz")
    pieces = _inflate_pieces(path) if compressed else _raw_pieces(path)
    head = b""
    try:
        while len(head) < 540:
            piece = next(pieces, b"")
            if not piece:
                break
            head += piece
    except EOFError:
        head = head or b""
    except (OSError, zlib.error) as exc:
        raise InputError(f"{what}: the gzip data is corrupt ({_short(exc)}); copy the file again") from None
    if len(head) < 348:
        raise InputError(f"{what}: the file is truncated or not a NIfTI file: it holds {len(head)} bytes, fewer than "
                         "a NIfTI header")
    offset, data_bytes, dtype = _nifti_header(head, what)
    scan = _DataScan(dtype, skip=offset)
    scan.feed(head)
    _scan(what, pieces, "gzip" if compressed else "", scan)
    if scan.total < offset + data_bytes:
        raise _short_data(what, max(scan.total - offset, 0), data_bytes, "")
    scan.check_finite(what, data_bytes // dtype.itemsize if dtype is not None else None)


# ----- NRRD and MetaImage

def _text_header(path: Path, end: re.Pattern[bytes], limit: int = 1 << 16) -> tuple[list[str], str | None, int]:
    """Lines of a text header, the line matching ``end`` (None when not found) and the byte offset where the data
    starts (after that line)."""
    with open(path, "rb") as f:
        blob = f.read(limit)
    lines, pos = [], 0
    while pos < len(blob):
        nl = blob.find(b"\n", pos)
        if nl < 0:
            break
        line = blob[pos:nl].rstrip(b"\r")
        pos = nl + 1
        if end.fullmatch(line):
            return lines, line.decode("latin-1"), pos
        lines.append(line.decode("latin-1"))
    return lines, None, len(blob)


def _data_target(path: Path, data_file: str | None, data_start: int, what: str) -> tuple[Path, int] | None:
    """The file holding the voxels and where they start; None for several data files (left to the reader)."""
    if not data_file or data_file.upper() == "LOCAL":
        return path, data_start
    if data_file.upper().startswith("LIST") or "%" in data_file:
        return None
    target = Path(data_file) if Path(data_file).is_absolute() else path.parent / data_file
    if not target.is_file():
        raise InputError(f"{what}: its data file {target} does not exist")
    return target, 0


def _check_data(path: Path, target: Path, offset: int, encoding: str, skip: int, header: ImageHeader,
                dtype: np.dtype | None, role: str) -> None:
    what = describe(path, role) if target == path else f"{describe(path, role)} (data file {target})"
    need = _expected_bytes(header)
    if encoding in ("gzip", "gz", "zlib"):
        scan = _scan(what, _inflate_pieces(target, offset), encoding, _DataScan(dtype))
    elif encoding in ("bzip2", "bz2"):
        scan = _scan(what, _bz2_pieces(target, offset), "bzip2", _DataScan(dtype))
    elif encoding == "raw":
        if skip < 0:  # the data is the end of the file: nothing to compare
            return
        have = target.stat().st_size - offset - skip
        if need is not None and have < need:
            raise _short_data(what, have, need, "")
        if dtype is None:
            return
        scan = _scan(what, _raw_pieces(target, offset + skip), "", _DataScan(dtype))
    else:
        return  # text encodings: the reader counts the values
    if need is not None and scan.total < need:
        raise _short_data(what, scan.total, need, f"{encoding} ")
    scan.check_finite(what, need // dtype.itemsize if (need is not None and dtype is not None) else None)


def _check_nrrd(path: Path, role: str, header: ImageHeader) -> None:
    what = describe(path, role)
    lines, _, data_start = _text_header(path, re.compile(rb""))
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":" not in line:
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower().replace(" ", "")] = value.lstrip("=").strip()
    target = _data_target(path, fields.get("datafile"), data_start, what)
    if target is None:
        return
    kind = fields.get("type", "").lower()
    dtype = _float_dtype("double" if "double" in kind else ("float" if "float" in kind else ""),
                         fields.get("endian", "little").lower() == "big")
    _check_data(path, target[0], target[1], fields.get("encoding", "raw").lower(),
                int(fields.get("byteskip", "0") or 0), header, dtype, role)


def _check_metaimage(path: Path, role: str, header: ImageHeader) -> None:
    what = describe(path, role)
    lines, last, data_start = _text_header(path, re.compile(rb"\s*ElementDataFile\s*=.*"))
    if last is None:
        raise InputError(f"{what}: MetaImage header without ElementDataFile")
    fields = {k.strip().lower(): v.strip() for k, sep, v in (line.partition("=") for line in lines) if sep}
    target = _data_target(path, last.partition("=")[2].strip(), data_start, what)
    if target is None:
        return
    big = any(fields.get(k, "false").lower() == "true" for k in ("binarydatabyteordermsb", "elementbyteordermsb"))
    dtype = _float_dtype({"met_float": "float", "met_double": "double"}.get(fields.get("elementtype", "").lower(), ""),
                         big)
    compressed = fields.get("compresseddata", "false").lower() == "true"
    _check_data(path, target[0], target[1], "zlib" if compressed else "raw", int(fields.get("headersize", "0") or 0),
                header, dtype, role)
