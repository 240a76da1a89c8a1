"""DICOM writing of phantom CT and PET series (pydicom), deterministic (UIDs derived from patient and seed).

The PET writer encodes SUV back into stored values as a scanner would: activity concentration in Bq/ml decay
corrected as the header says (START: to the series time; ADMIN: to the injection; NONE: not corrected, per bed),
or Philips counts (CNTS) with the private SUV or activity scale factor; int16 stored values with a per-slice
RescaleSlope. A conformant (QIBA/IBSI) reader recovers the SUV within 0.5 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..errors import UsageError
from ..io.files import atomic_dir

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
PET_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
F18_HALF_LIFE_S = 6586.2


@dataclass
class PetHeader:
    """Acquisition and radiopharmaceutical parameters of a PET series."""

    units: str = "BQML"  # "BQML" | "CNTS"
    decay_correction: str = "START"  # "START" | "ADMIN" | "NONE"
    weight_kg: float = 75.0
    injected_dose_bq: float = 3.2e8
    half_life_s: float = F18_HALF_LIFE_S
    injection_datetime: datetime = datetime(2024, 3, 14, 9, 5, 0)
    series_datetime: datetime = datetime(2024, 3, 14, 10, 7, 30)
    beds: int = 1
    bed_duration_s: float = 120.0
    write_start_datetime: bool = True
    philips_factor: str | None = None  # "suv" -> (7053,1000); "activity" -> (7053,1009); None
    counts_per_bqml: float = 0.8  # CNTS calibration (counts = Bq/ml * this)
    height_m: float = 1.75
    sex: str = "M"

    VARIANTS = ("standard", "multibed", "midnight", "philips_cnts", "philips_activity", "admin", "none_decay")

    @classmethod
    def variant(cls, name: str, seed: int = 0) -> PetHeader:
        """A named header variant (weight and dose vary with the seed)."""
        rng = np.random.default_rng([int(seed), 7053])
        base = cls(weight_kg=round(float(rng.uniform(50, 110)), 1),
                   injected_dose_bq=round(float(rng.uniform(2.2e8, 4.2e8)), -3))
        if name == "standard":
            return base
        if name == "multibed":
            return replace(base, beds=4, bed_duration_s=150.0)
        if name == "midnight":
            return replace(base, injection_datetime=datetime(2024, 3, 14, 23, 31, 0),
                           series_datetime=datetime(2024, 3, 15, 0, 34, 10), write_start_datetime=False)
        if name == "philips_cnts":
            return replace(base, units="CNTS", philips_factor="suv")
        if name == "philips_activity":
            return replace(base, units="CNTS", philips_factor="activity")
        if name == "admin":
            return replace(base, decay_correction="ADMIN")
        if name == "none_decay":
            return replace(base, decay_correction="NONE", beds=3)
        raise UsageError(f"unknown PET header variant {name!r}; expected one of {', '.join(cls.VARIANTS)}")

    @property
    def decay_constant(self) -> float:
        return math.log(2.0) / self.half_life_s


def uids_for(patient_id: str, seed: int) -> dict[str, str]:
    """Deterministic study, frame-of-reference and series UIDs for a phantom patient."""
    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["lnstaging-phantom", str(patient_id), str(seed), kind])

    return {k: uid(k) for k in ("study", "frame", "ct_series", "pet_series")}


def _dt(d: datetime) -> tuple[str, str]:
    return d.strftime("%Y%m%d"), d.strftime("%H%M%S.%f")[:13]


def _base(sop_class: str, sop_uid: str, patient_id: str, study_uid: str, frame_uid: str, series_uid: str,
          modality: str, when: datetime) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientName = f"Phantom^{patient_id}"
    ds.PatientID = str(patient_id)
    ds.PatientBirthDate = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_uid
    ds.Modality = modality
    ds.StudyDate, ds.StudyTime = _dt(when)
    ds.SeriesDate, ds.SeriesTime = _dt(when)
    ds.StudyID = "1"
    ds.Manufacturer = "LymphNodeStaging phantom"
    ds.BodyPartExamined = "CHEST"
    ds.PatientPosition = "FFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    return ds


def _check(img: sitk.Image, what: str) -> None:
    if img.GetDimension() != 3:
        raise UsageError(f"{what}: expected a 3-D image, got {img.GetDimension()}-D")
    if not np.allclose(np.asarray(img.GetDirection()), np.eye(3).ravel()):
        raise UsageError(f"{what}: only axial images with identity direction are written")


def _slice_geometry(ds: FileDataset, origin, spacing, k: int, shape) -> None:
    """Position, location, thickness, spacing and matrix of axial slice k (identity direction)."""
    z = origin[2] + k * spacing[2]
    ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{z:.4f}"]
    ds.SliceLocation = f"{z:.4f}"
    ds.SliceThickness = f"{spacing[2]:.4f}"
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]
    ds.Rows, ds.Columns = shape[1], shape[2]


def write_ct_series(ct: sitk.Image, out_dir: str | Path, *, patient_id: str, study_uid: str,
                    frame_of_reference_uid: str, series_uid: str | None = None, seed: int = 0,
                    when: datetime = datetime(2024, 3, 14, 9, 58, 0)) -> Path:
    """Write a CT image (HU) as an axial CT series, one file per slice (stored int16, slope 1, intercept 0)."""
    _check(ct, "CT")
    series_uid = series_uid or generate_uid(entropy_srcs=[patient_id, str(seed), "ct"])
    arr = np.clip(np.rint(sitk.GetArrayFromImage(ct)), -32768, 32767).astype(np.int16)
    sp, org = ct.GetSpacing(), ct.GetOrigin()
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for k in range(arr.shape[0]):
            sop = generate_uid(entropy_srcs=[series_uid, str(k)])
            ds = _base(CT_STORAGE, sop, patient_id, study_uid, frame_of_reference_uid, series_uid, "CT", when)
            ds.SeriesNumber = 2
            ds.SeriesDescription = "Phantom CT"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.InstanceNumber = k + 1
            _slice_geometry(ds, org, sp, k, arr.shape)
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.KVP = "120"
            ds.PixelData = arr[k].tobytes()
            ds.save_as(tmp / f"CT{k + 1:04d}.dcm", enforce_file_format=True)
    return out


def _activity_factor(h: PetHeader) -> float:
    """Bq/ml per SUV at the decay reference of the header (START / ADMIN); NONE is handled per slice."""
    if h.decay_correction == "START":
        dt = (h.series_datetime - h.injection_datetime).total_seconds()
        return h.injected_dose_bq * math.exp(-h.decay_constant * dt) / (h.weight_kg * 1000.0)
    return h.injected_dose_bq / (h.weight_kg * 1000.0)


def write_pet_series(suv: sitk.Image, out_dir: str | Path, header: PetHeader, *, patient_id: str, study_uid: str,
                     frame_of_reference_uid: str, series_uid: str | None = None, seed: int = 0) -> Path:
    """Write an SUV image as a PET series whose stored values a conformant reader converts back to the SUV."""
    _check(suv, "PET")
    h = header
    if h.units not in ("BQML", "CNTS"):
        raise UsageError(f"PetHeader.units must be BQML or CNTS, got {h.units!r}")
    if h.decay_correction not in ("START", "ADMIN", "NONE"):
        raise UsageError(f"PetHeader.decay_correction must be START, ADMIN or NONE, got {h.decay_correction!r}")
    if h.units == "CNTS" and h.philips_factor not in ("suv", "activity"):
        raise UsageError("PetHeader.philips_factor must be 'suv' or 'activity' for CNTS units")
    if h.beds < 1 or h.weight_kg <= 0 or h.injected_dose_bq <= 0:
        raise UsageError("PetHeader: beds, weight_kg and injected_dose_bq must be positive")
    series_uid = series_uid or generate_uid(entropy_srcs=[patient_id, str(seed), "pet"])
    arr = sitk.GetArrayFromImage(suv).astype(np.float64)
    nz = arr.shape[0]
    sp, org = suv.GetSpacing(), suv.GetOrigin()
    lam = h.decay_constant
    T = h.bed_duration_s
    # bed of each slice: beds acquired from the feet upward (slice 0 first)
    bed_of = np.minimum((np.arange(nz) * h.beds) // nz, h.beds - 1)
    base_factor = _activity_factor(h)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for k in range(nz):
            bed = int(bed_of[k])
            acq = h.series_datetime + timedelta(seconds=bed * T)
            factor = base_factor
            decay_factor = 1.0
            if h.decay_correction == "NONE":  # activity as measured, averaged over the frame
                t0 = (acq - h.injection_datetime).total_seconds()
                factor = base_factor * math.exp(-lam * t0) * (1 - math.exp(-lam * T)) / (lam * T)
            elif h.decay_correction == "START":
                decay_factor = math.exp(lam * bed * T) * (lam * T) / (1 - math.exp(-lam * T))
            values = arr[k] * factor  # Bq/ml
            scale_f = None
            if h.units == "CNTS":
                values = values * h.counts_per_bqml
                scale_f = 1.0 / (factor * h.counts_per_bqml) if h.philips_factor == "suv" else 1.0 / h.counts_per_bqml
            vmax = float(np.abs(values).max())
            slope = vmax / 32000.0 if vmax > 0 else 1.0
            stored = np.clip(np.rint(values / slope), -32768, 32767).astype(np.int16)
            sop = generate_uid(entropy_srcs=[series_uid, str(k)])
            ds = _base(PET_STORAGE, sop, patient_id, study_uid, frame_of_reference_uid, series_uid, "PT",
                       h.series_datetime)
            ds.SeriesNumber = 3
            ds.SeriesDescription = "Phantom PET AC"
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            ds.InstanceNumber = k + 1
            ds.AcquisitionDate, ds.AcquisitionTime = _dt(acq)
            _slice_geometry(ds, org, sp, k, arr.shape)
            ds.RescaleIntercept = "0"
            ds.RescaleSlope = f"{slope:.10g}"
            ds.Units = h.units
            ds.DecayCorrection = h.decay_correction
            ds.CorrectedImage = ["ATTN", "DECY"] if h.decay_correction != "NONE" else ["ATTN"]
            ds.SeriesType = ["WHOLE BODY", "IMAGE"]
            ds.NumberOfSlices = nz
            ds.ActualFrameDuration = int(round(T * 1000))
            ds.FrameReferenceTime = f"{(bed * T + math.log(lam * T / (1 - math.exp(-lam * T))) / lam) * 1000:.3f}"
            ds.DecayFactor = f"{decay_factor:.6f}"
            ds.PatientWeight = f"{h.weight_kg:.1f}"
            ds.PatientSize = f"{h.height_m:.2f}"
            ds.PatientSex = h.sex
            rp = pydicom.Dataset()
            rp.Radiopharmaceutical = "Fluorodeoxyglucose"
            rp.RadionuclideTotalDose = f"{h.injected_dose_bq:.1f}"
            rp.RadionuclideHalfLife = f"{h.half_life_s:.1f}"
            rp.RadiopharmaceuticalStartTime = h.injection_datetime.strftime("%H%M%S.%f")[:13]
            if h.write_start_datetime:
                rp.RadiopharmaceuticalStartDateTime = h.injection_datetime.strftime("%Y%m%d%H%M%S.%f")[:21]
            code = pydicom.Dataset()
            code.CodeValue = "C-111A1"
            code.CodingSchemeDesignator = "SRT"
            code.CodeMeaning = "^18^Fluorine"
            rp.RadionuclideCodeSequence = [code]
            ds.RadiopharmaceuticalInformationSequence = [rp]
            if scale_f is not None:
                block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
                if h.philips_factor == "suv":
                    block.add_new(0x00, "DS", f"{scale_f:.10g}")
                else:
                    block.add_new(0x09, "DS", f"{scale_f:.10g}")
            ds.PixelData = stored.tobytes()
            ds.save_as(tmp / f"PT{k + 1:04d}.dcm", enforce_file_format=True)
    return out

