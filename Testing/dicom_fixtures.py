"""Small synthetic DICOM series for the SUV, DICOM and imaging tests (written by pydicom, no files committed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

PET_SOP = "1.2.840.10008.5.1.4.1.1.128"
CT_SOP = "1.2.840.10008.5.1.4.1.1.2"
HALF = 6586.2
LAM = math.log(2) / HALF


def make_slice(k: int, series_uid: str, *, modality: str = "PT", rows: int = 4, cols: int = 4,
               spacing: float = 4.0, value: int = 1000, slope: float = 1.0, **over) -> Dataset:
    """One PET (or CT) slice: 70 kg, 370 MBq at 10:00, series at 11:00, BQML/START; ``over`` replaces keywords
    (None deletes), ``rp_<keyword>`` sets/deletes inside the radiopharmaceutical item."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop = PET_SOP if modality == "PT" else CT_SOP
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "test"
    ds.InstanceNumber = k + 1
    ds.PatientID = "P1"
    ds.PatientWeight = "70"
    ds.PatientSize = "1.75"
    ds.PatientSex = "F"
    ds.SeriesDate = ds.AcquisitionDate = "20250101"
    ds.SeriesTime = "110000"
    ds.AcquisitionTime = "110000"
    ds.ActualFrameDuration = 120000
    ds.FrameReferenceTime = 60000 * (1 - LAM * 60 / 2)  # placeholder, set precisely where needed
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(k) * spacing]
    ds.PixelSpacing = [spacing, spacing]
    ds.SliceThickness = spacing
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = "0"
    if modality == "PT":
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["ATTN", "DECY"]
        rp = Dataset()
        rp.RadionuclideTotalDose = "370000000"
        rp.RadionuclideHalfLife = str(HALF)
        rp.RadiopharmaceuticalStartTime = "100000"
        rp.RadiopharmaceuticalStartDateTime = "20250101100000"
        ds.RadiopharmaceuticalInformationSequence = Sequence([rp])
    for key, v in over.items():
        target, kw = (ds.RadiopharmaceuticalInformationSequence[0], key[3:]) if key.startswith("rp_") else (ds, key)
        if v is None:
            if kw in target:
                delattr(target, kw)
        else:
            setattr(target, kw, v)
    ds.PixelData = np.full((rows, cols), value, dtype=np.int16).tobytes()
    return ds


def write_series(folder: Path, n: int = 3, per_slice=None, **over) -> Path:
    """Write n slices; ``per_slice(k) -> dict`` adds slice-specific overrides."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = over.pop("series_uid", None) or generate_uid()
    for k in range(n):
        extra = dict(over)
        if per_slice is not None:
            extra.update(per_slice(k))
        ds = make_slice(k, uid, **extra)
        ds.save_as(folder / f"s{uid[-6:]}_{k:03d}.dcm", enforce_file_format=True)
    return folder


def expected_suv(value: float = 1000.0, weight: float = 70.0, dose: float = 370e6, dt_s: float = 3600.0) -> float:
    return value * weight * 1000.0 / (dose * math.exp(-LAM * dt_s))


BASIC_TEXT_SR_SOP = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_PR_SOP = "1.2.840.10008.5.1.4.1.1.11.1"
DICOMDIR_SOP = "1.2.840.10008.1.3.10"


def _save(ds: Dataset, sop: str, path: Path) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(folder: Path) -> Path:
    """A minimal DICOMDIR (Media Storage Directory, no pixel data)."""
    ds = Dataset()
    ds.FileSetID = "TEST"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = Sequence([])
    return _save(ds, DICOMDIR_SOP, folder / "DICOMDIR")


def write_non_image(folder: Path, modality: str = "SR", name: str | None = None, patient_id: str = "P1") -> Path:
    """A structured report (SR) or presentation state (PR) of the fixtures' patient: no pixel data."""
    sop = BASIC_TEXT_SR_SOP if modality == "SR" else GRAYSCALE_PR_SOP
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = sop, generate_uid()
    ds.Modality, ds.PatientID = modality, patient_id
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3.4", generate_uid(), 99
    if modality == "SR":
        ds.ValueType, ds.ContentSequence = "CONTAINER", Sequence([])
    return _save(ds, sop, folder / (name or f"{modality.lower()}.dcm"))


def write_header_only(folder: Path, series_uid: str, k: int = 0, name: str = "header_only.dcm", *,
                      keep_rows: bool = False, **over) -> Path:
    """A slice header of ``series_uid`` without PixelData (7FE0,0010) (and, unless ``keep_rows``, without
    Rows/Columns), as some exports leave behind."""
    ds = make_slice(k, series_uid, **over)
    del ds.PixelData
    if not keep_rows:
        del ds.Rows, ds.Columns
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def series_uid_of(folder: Path) -> str:
    """The SeriesInstanceUID of the first slice written by :func:`write_series` in ``folder``."""
    import pydicom

    first = sorted(folder.glob("s*.dcm"))[0]
    return str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)
