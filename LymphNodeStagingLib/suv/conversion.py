"""SUV (body weight) from a PET DICOM series, vendor-neutral (QIBA / IBSI), with provenance.

For every slice k the SUV is ``A_k * F_k`` where ``A_k = RescaleSlope_k * SV_k + RescaleIntercept_k`` and F_k is the
slice's conversion factor. F_k is the same for all slices except for DecayCorrection NONE (per-frame decay) and
per-slice Philips scale factors. The steps (docs/explanation/suv.md):

units (BQML, CNTS with the Philips factors, GML with SUVType, CM2ML) -> weight (kg; grams recognised) -> dose (Bq;
MBq recognised) -> reference time for START (SeriesDate/Time if not after the first acquisition, else the GE private
scan datetime, else back-computed from AcquisitionTime, ActualFrameDuration and FrameReferenceTime) -> administration
time (RadiopharmaceuticalStartDateTime, else StartTime on the reference date, moved back a day across midnight) ->
decay correction START / ADMIN / NONE.

Nothing is guessed: a missing, unreadable or contradictory required tag raises :class:`InputError` naming the file
(the first file of the series, or the offending slice) and the tag.
``mode="gatidis"`` reproduces the autoPET/TCIA conversion (AcquisitionTime of the first file, times without dates,
Units ignored) for comparisons only.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import InputError
from ..io.dicom_series import DicomSeries, find_series, reason
from . import SUV_MODES

log = logging.getLogger(__name__)

F18_HALF_LIFE_S = 6586.2
#: RadionuclideCodeSequence code values (SRT) -> half-life in s, used only when RadionuclideHalfLife is absent.
HALF_LIFE_BY_CODE = {"C-111A1": 6586.2, "C-131A1": 4057.7}
PHILIPS_SUV_FACTOR = (0x7053, 0x1000)
PHILIPS_ACTIVITY_FACTOR = (0x7053, 0x1009)
GE_SCAN_DATETIME = (0x0009, 0x100D)
DOSE_MBQ_LIMIT = 1e5  # a total dose below this is taken as MBq
WEIGHT_GRAM_LIMIT = 1000.0  # a weight at or above this is taken as grams
BACKCOMPUTE_TOL_S = 60.0  # back-computed reference times of the slices must agree within this


@dataclass
class SuvProvenance:
    """How an SUV image was obtained: every tag and time used, every decision and warning."""

    mode: str
    units: str
    decay_correction: str
    suv_type: str = "BW"
    weight_kg: float | None = None
    dose_bq: float | None = None
    half_life_s: float | None = None
    administration_time: str | None = None
    reference_time: str | None = None
    reference_source: str | None = None
    decay_factor: float | None = None
    factor: float | None = None  # the common factor when all slices share one
    factor_min: float | None = None
    factor_max: float | None = None
    tags: dict = field(default_factory=dict)
    decisions: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuvResult:
    """SUVbw image (float32, the PET series' grid), per-slice factors (SUV = A * factor) and provenance."""

    image: sitk.Image
    factors: np.ndarray
    provenance: SuvProvenance


# ---------------------------------------------------------------------------------------------------------------
# DICOM value parsing


def _value(ds: pydicom.Dataset, key) -> object | None:
    """Value of a keyword or (group, element) tag; None when absent or empty."""
    if isinstance(key, str):
        if key not in ds:
            return None
        v = ds.data_element(key).value
    else:
        if key not in ds:
            return None
        v = ds[key].value
    if v is None or (isinstance(v, str | bytes) and not v.strip()) or (hasattr(v, "__len__") and len(v) == 0):
        return None
    return v


def _float_value(v: object) -> float | None:
    """A number from a DS/FD/FL value or from raw bytes of an unknown-VR private element."""
    if v is None:
        return None
    if isinstance(v, bytes):
        text = v.rstrip(b"\x00 ").decode("ascii", errors="ignore").strip()
        try:
            return float(text.split("\\")[0])
        except ValueError:
            if len(v) == 8:
                return struct.unpack("<d", v)[0]
            if len(v) == 4:
                return struct.unpack("<f", v)[0]
            return None
    if isinstance(v, list | tuple | pydicom.multival.MultiValue):
        v = v[0]
    return float(v)


def parse_tm(value: str) -> float:
    """DICOM TM (HHMMSS.FFFFFF, also HHMM, HH and the old HH:MM:SS) -> seconds after midnight, fraction kept."""
    s = str(value).strip().replace(":", "")
    m = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(\.\d+)?", s)
    if not m:
        raise ValueError(f"not a DICOM TM value: {value!r}")
    h, mi, se, frac = m.groups()
    if int(h) > 23 or int(mi or 0) > 59 or int(se or 0) > 60:
        raise ValueError(f"not a time of day: {value!r}")
    return int(h) * 3600 + int(mi or 0) * 60 + int(se or 0) + (float(frac) if frac else 0.0)


def parse_da(value: str) -> dt.date:
    s = str(value).strip().replace(".", "").replace("-", "")
    return dt.datetime.strptime(s, "%Y%m%d").date()


def combine(date: dt.date, seconds: float) -> dt.datetime:
    return dt.datetime(date.year, date.month, date.day) + dt.timedelta(seconds=seconds)


def parse_dt(value: str) -> dt.datetime | None:
    """DICOM DT -> datetime, or None when it lacks a full date and time of day (at least YYYYMMDDHHMM)."""
    s = re.sub(r"[+-]\d{4}$", "", str(value).strip())  # drop a UTC offset suffix
    if len(s) < 12 or not s[:12].isdigit():
        return None
    return combine(parse_da(s[:8]), parse_tm(s[8:]))


def _iso(t: dt.datetime | None) -> str | None:
    return t.isoformat(timespec="milliseconds") if t is not None else None


# ---------------------------------------------------------------------------------------------------------------
# reading values: errors name the tag and, where the dataset knows it, the file

PRIVATE_NAMES = {PHILIPS_SUV_FACTOR: "Philips SUV Scale Factor", GE_SCAN_DATETIME: "GE scan_datetime",
                 PHILIPS_ACTIVITY_FACTOR: "Philips Activity Concentration Scale Factor"}


class _SliceError(InputError):
    """An SUV error whose message already names the file (slice) it is about."""


def _tag(key) -> str:
    """'Keyword (gggg,eeee)' of a keyword or a (group, element) tag."""
    if isinstance(key, str):
        tag = pydicom.datadict.tag_for_keyword(key)
        return f"{key} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else key
    g, e = key
    name = PRIVATE_NAMES.get((g, e))
    return f"{name} ({g:04X},{e:04X})" if name else f"({g:04X},{e:04X})"


def _file(ds: pydicom.Dataset, k: int | None = None) -> str | None:
    """The file a header was read from; 'slice k' (1-based) for a header without one, None without k."""
    name = getattr(ds, "filename", None)
    if isinstance(name, str) and name:
        return name
    return f"slice {k + 1}" if k is not None else None


def _name(ds: pydicom.Dataset, k: int) -> str:
    """The file name (without folder) of a slice, or 'slice k'."""
    name = _file(ds, k) or ""
    return Path(name).name if getattr(ds, "filename", None) else name


def _short(v: object, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _unreadable(ds: pydicom.Dataset, key, value: object, expected: str, exc: Exception) -> InputError:
    msg = f"{_tag(key)} = {_short(value)} cannot be read ({reason(exc)}); expected {expected}"
    name = _file(ds)
    return _SliceError(f"{name}: {msg}") if name else InputError(msg)


def _number(ds: pydicom.Dataset, key) -> float | None:
    """A numeric element (DS, IS, FD, FL or raw private bytes); None when absent or empty."""
    v = _value(ds, key)
    try:
        f = _float_value(v)
    except (TypeError, ValueError, struct.error) as exc:
        raise _unreadable(ds, key, v, "a number", exc) from exc
    if f is not None and not math.isfinite(f):
        raise _unreadable(ds, key, v, "a finite number", ValueError("not finite"))
    return f


def _parsed(ds: pydicom.Dataset, key, parse, expected: str):
    """An element read with ``parse``; None when absent or empty; a value it cannot read names file and tag."""
    v = _value(ds, key)
    try:
        return parse(v) if v is not None else None
    except (TypeError, ValueError) as exc:
        raise _unreadable(ds, key, v, expected, exc) from exc


def _time(ds: pydicom.Dataset, key) -> float | None:
    """A TM element in seconds after midnight; None when absent or empty."""
    return _parsed(ds, key, parse_tm, "a DICOM time HHMMSS.FFFFFF")


def _date(ds: pydicom.Dataset, key) -> dt.date | None:
    """A DA element; None when absent or empty."""
    return _parsed(ds, key, parse_da, "a DICOM date YYYYMMDD")


def _datetime(ds: pydicom.Dataset, key) -> dt.datetime | None:
    """A DT element with a full date and time of day; None when absent, empty or shorter."""
    return _parsed(ds, key, parse_dt, "a DICOM date-time YYYYMMDDHHMMSS.FFFFFF")


def _first_without(headers: list[pydicom.Dataset], key) -> str:
    """' (missing in FILE)' for the first slice without a value of ``key``, else ''."""
    for k, h in enumerate(headers):
        if _value(h, key) is None:
            return f" (missing in {_name(h, k)})"
    return ""


# ---------------------------------------------------------------------------------------------------------------
# body size helpers (for SUVType LBM / IBW and CM2ML)


def _height_cm(ds: pydicom.Dataset, prov: SuvProvenance, why: str) -> float:
    h = _number(ds, "PatientSize")
    if h is None or h <= 0:
        raise InputError(f"PatientSize (0010,1020) is missing or not positive; it is required for {why}")
    if h > 3:
        prov.warnings.append(f"PatientSize (0010,1020) = {h} > 3 taken as cm")
        return h
    return h * 100.0


def _sex(ds: pydicom.Dataset, why: str) -> str:
    sex = str(_value(ds, "PatientSex") or "").strip().upper()
    if sex not in ("M", "F", "O"):
        raise InputError(f"PatientSex (0010,0040) is missing or not M/F/O (got {sex!r}); it is required for {why}")
    return sex


def lbm_james(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass (James 1976), kg."""
    if sex == "M":
        return 1.10 * weight_kg - 128.0 * (weight_kg / height_cm) ** 2
    return 1.07 * weight_kg - 148.0 * (weight_kg / height_cm) ** 2


def lbm_janmahasatian(weight_kg: float, height_cm: float, sex: str) -> float:
    """Lean body mass (Janmahasatian 2005), kg."""
    bmi = weight_kg / (height_cm / 100.0) ** 2
    if sex == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)


def ideal_body_weight(height_cm: float, sex: str) -> float:
    """Ideal body weight, kg: male 48.0 + 1.06 (H - 152), female 45.5 + 0.91 (H - 152) (H in cm); sex 'O' (other)
    takes the mean of both, which reproduces IBSI's reference object DRO_2_2."""
    male = 48.0 + 1.06 * (height_cm - 152.0)
    female = 45.5 + 0.91 * (height_cm - 152.0)
    return {"M": male, "F": female}.get(sex, 0.5 * (male + female))


def bsa_dubois(weight_kg: float, height_cm: float) -> float:
    """Body surface area (Du Bois), m^2."""
    return 0.007184 * height_cm**0.725 * weight_kg**0.425


# ---------------------------------------------------------------------------------------------------------------
# the computation


SERIES_LEVEL = ("Units", "DecayCorrection", "PatientWeight", "SeriesDate", "SeriesTime", "SUVType", "PatientSize",
                "PatientSex")


def _differs(kw: str, headers: list[pydicom.Dataset], k: int, v0: object, vk: object, where: str = "") -> InputError:
    shown = [str(v) if v is not None else "missing" for v in (v0, vk)]
    return InputError(f"{_tag(kw)}{where} differs between slices of one series: {shown[0]!r} in "
                      f"{_name(headers[0], 0)}, {shown[1]!r} in {_name(headers[k], k)}; expected one value")


def _check_consistent(headers: list[pydicom.Dataset]) -> None:
    for kw in SERIES_LEVEL:
        v0 = _value(headers[0], kw)
        for k, h in enumerate(headers[1:], start=1):
            vk = _value(h, kw)
            if str(vk) != str(v0):
                raise _differs(kw, headers, k, v0, vk)
    first = _radiopharmaceutical(headers[0])
    for k, h in enumerate(headers[1:], start=1):
        item = _radiopharmaceutical(h)
        for kw in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
                   "RadiopharmaceuticalStartDateTime"):
            if str(_value(item, kw)) != str(_value(first, kw)):
                raise _differs(kw, headers, k, _value(first, kw), _value(item, kw),
                               " (in RadiopharmaceuticalInformationSequence (0054,0016))")


def _radiopharmaceutical(ds: pydicom.Dataset) -> pydicom.Dataset:
    seq = _value(ds, "RadiopharmaceuticalInformationSequence")
    if not seq:
        raise InputError("RadiopharmaceuticalInformationSequence (0054,0016) is missing or empty; it holds the "
                         "injected dose, half-life and injection time")
    if len(seq) > 1:
        raise InputError(f"RadiopharmaceuticalInformationSequence (0054,0016) has {len(seq)} items; expected one "
                         "(several radiopharmaceuticals are ambiguous)")
    return seq[0]


def _weight(ds: pydicom.Dataset, prov: SuvProvenance) -> float:
    w = _number(ds, "PatientWeight")
    if w is None or w <= 0:
        raise InputError(f"PatientWeight (0010,1030) is missing, empty or not positive ({w!r}); SUVbw needs the "
                         "patient's weight in kg and a weight is never assumed")
    prov.tags["PatientWeight"] = w
    if w >= WEIGHT_GRAM_LIMIT:
        prov.warnings.append(f"PatientWeight (0010,1030) = {w} >= {WEIGHT_GRAM_LIMIT:g}: taken as grams")
        w /= 1000.0
    prov.weight_kg = w
    return w


def _dose(item: pydicom.Dataset, prov: SuvProvenance) -> float:
    d = _number(item, "RadionuclideTotalDose")
    if d is None or d <= 0:
        raise InputError(f"RadionuclideTotalDose (0018,1074) is missing or not positive ({d!r}); expected the "
                         "injected activity in Bq")
    prov.tags["RadionuclideTotalDose"] = d
    if d < DOSE_MBQ_LIMIT:
        prov.warnings.append(f"RadionuclideTotalDose (0018,1074) = {d} < {DOSE_MBQ_LIMIT:g}: taken as MBq")
        d *= 1e6
    prov.dose_bq = d
    return d


def _half_life(item: pydicom.Dataset, prov: SuvProvenance) -> float:
    t = _number(item, "RadionuclideHalfLife")
    if t is not None and t > 0:
        prov.tags["RadionuclideHalfLife"] = t
        prov.half_life_s = t
        return t
    codes = _value(item, "RadionuclideCodeSequence") or []
    for code in codes:
        value = str(_value(code, "CodeValue") or "")
        if value in HALF_LIFE_BY_CODE:
            t = HALF_LIFE_BY_CODE[value]
            prov.warnings.append(f"RadionuclideHalfLife (0018,1075) missing: {t} s from RadionuclideCodeSequence "
                                 f"(0054,0300) code {value}")
            prov.half_life_s = t
            return t
    raise InputError("RadionuclideHalfLife (0018,1075) is missing and RadionuclideCodeSequence (0054,0300) names "
                     "no known radionuclide; expected the half-life in s")


def _acquisition_datetimes(headers: list[pydicom.Dataset]) -> list[dt.datetime] | None:
    out = []
    for h in headers:
        t = _datetime(h, "AcquisitionDateTime")
        if t is None:
            tm = _time(h, "AcquisitionTime")
            da = _date(h, "AcquisitionDate") or _date(h, "SeriesDate")
            if tm is None or da is None:
                return None
            t = combine(da, tm)
        out.append(t)
    return out


def _frame_durations_s(headers: list[pydicom.Dataset]) -> np.ndarray | None:
    vals = [_number(h, "ActualFrameDuration") for h in headers]
    if any(v is None or v <= 0 for v in vals):
        return None
    return np.array(vals, dtype=np.float64) / 1000.0


def _decay_weighted_mid(lam: float, duration_s: float) -> float:
    """Time after frame start of the decay-weighted mid-frame: (1/lam) ln(lam T / (1 - exp(-lam T)))."""
    x = lam * duration_s
    return math.log(x / -math.expm1(-x)) / lam


def _private_is(ds: pydicom.Dataset, group: int, block: int, creator: str) -> bool | None:
    """True/False if the private creator (group, 0x00bb) is present and (not) ``creator``; None if absent."""
    tag = (group, 0x0000 + block)
    if tag not in ds:
        return None
    v = ds[tag].value
    v = v.decode("ascii", errors="ignore") if isinstance(v, bytes) else str(v)
    return v.strip().rstrip("\x00").upper() == creator.upper()


def _reference_time(headers: list[pydicom.Dataset], half_life: float, prov: SuvProvenance) -> dt.datetime:
    """Decay-correction reference time for DecayCorrection START (QIBA, with GE and back-computation fallbacks)."""
    h0 = headers[0]
    acq = _acquisition_datetimes(headers)
    first_acq = min(acq) if acq else None
    sd, st = _value(h0, "SeriesDate"), _value(h0, "SeriesTime")
    sd_v, st_v = _date(h0, "SeriesDate"), _time(h0, "SeriesTime")
    series_t = combine(sd_v, st_v) if sd_v is not None and st_v is not None else None
    if series_t is not None:
        prov.tags["SeriesDate"], prov.tags["SeriesTime"] = str(sd), str(st)
    if first_acq is not None:
        prov.tags["earliest AcquisitionDate/Time"] = _iso(first_acq)
    if series_t is not None and (first_acq is None or series_t <= first_acq + dt.timedelta(milliseconds=1)):
        if first_acq is None:
            prov.warnings.append("no AcquisitionDate/Time (0008,0022)/(0008,0032): SeriesTime used unchecked")
        prov.reference_source = "SeriesDate/SeriesTime (0008,0021)/(0008,0031)"
        return series_t
    if series_t is not None:
        prov.decisions.append(f"SeriesTime {_iso(series_t)} is after the first AcquisitionTime {_iso(first_acq)} "
                              "(post-processed series): SeriesTime not used as reference")
    ge = _value(h0, GE_SCAN_DATETIME)
    creator_ok = _private_is(h0, 0x0009, 0x10, "GEMS_PETD_01")
    if ge is not None and creator_ok is not False:
        text = ge.decode("ascii", errors="ignore") if isinstance(ge, bytes) else str(ge)
        try:
            t = parse_dt(text.strip().rstrip("\x00"))
        except ValueError:
            t = None
            prov.warnings.append(f"GE private scan_datetime (0009,100D) = {text.strip()!r} is not a DICOM date-time; "
                                 "not used")
        if t is not None:
            prov.tags["GE scan_datetime (0009,100D)"] = text.strip()
            prov.reference_source = "GE private scan_datetime (0009,100D)"
            return t
    durations = _frame_durations_s(headers)
    frt = [_number(h, "FrameReferenceTime") for h in headers]
    if acq is None or durations is None or any(v is None for v in frt):
        raise InputError(
            "no usable decay-correction reference time: SeriesDate/SeriesTime (0008,0021)/(0008,0031) missing or "
            "after AcquisitionTime, no GE scan_datetime (0009,100D), and AcquisitionDate/Time (0008,0022)/(0008,0032),"
            " ActualFrameDuration (0018,1242) or FrameReferenceTime (0054,1300) missing for the back-computation")
    lam = math.log(2.0) / half_life
    refs = [a + dt.timedelta(seconds=_decay_weighted_mid(lam, d) - f / 1000.0)
            for a, d, f in zip(acq, durations, frt, strict=True)]
    base = refs[0]
    offsets = np.array([(r - base).total_seconds() for r in refs])
    med = float(np.median(offsets))
    spread = float(np.max(np.abs(offsets - med)))
    if spread > BACKCOMPUTE_TOL_S:
        raise InputError(f"FrameReferenceTime (0054,1300): back-computed reference times of the slices disagree by "
                         f"up to {spread:.1f} s (tolerance {BACKCOMPUTE_TOL_S:g} s); expected one series reference")
    if spread > 1.0:
        prov.warnings.append(f"back-computed reference times differ by up to {spread:.1f} s; median used")
    prov.reference_source = ("back-computed: AcquisitionDate/Time + decay-weighted mid-frame of ActualFrameDuration"
                             " (0018,1242) - FrameReferenceTime (0054,1300), median over slices")
    return base + dt.timedelta(seconds=med)


def _administration_time(item: pydicom.Dataset, ref: dt.datetime, prov: SuvProvenance) -> dt.datetime:
    sdt_raw, st_raw = _value(item, "RadiopharmaceuticalStartDateTime"), _value(item, "RadiopharmaceuticalStartTime")
    sdt = _datetime(item, "RadiopharmaceuticalStartDateTime")
    st = _time(item, "RadiopharmaceuticalStartTime")
    if sdt is not None:
        prov.tags["RadiopharmaceuticalStartDateTime"] = str(sdt_raw)
        if st is not None:
            prov.tags["RadiopharmaceuticalStartTime"] = str(st_raw)
            tod = sdt.hour * 3600 + sdt.minute * 60 + sdt.second + sdt.microsecond / 1e6
            diff = abs(tod - st)
            if min(diff, 86400 - diff) > 1.0:
                raise InputError(
                    f"RadiopharmaceuticalStartDateTime (0018,1078) = {sdt_raw} and RadiopharmaceuticalStartTime "
                    f"(0018,1072) = {st_raw} contradict each other; expected the same time of day")
        prov.decisions.append("administration time from RadiopharmaceuticalStartDateTime (0018,1078)")
        t_adm = sdt
    elif st is not None:
        prov.tags["RadiopharmaceuticalStartTime"] = str(st_raw)
        t_adm = combine(ref.date(), st)
        prov.decisions.append("administration time from RadiopharmaceuticalStartTime (0018,1072) on the date of "
                              "the reference time")
        if t_adm > ref:
            t_adm -= dt.timedelta(days=1)
            prov.decisions.append("RadiopharmaceuticalStartTime after the reference time: injection on the previous "
                                  "day (scan across midnight)")
    else:
        raise InputError("RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime (0018,1072) "
                         "are both missing; the injection time is required for decay correction")
    delta = (ref - t_adm).total_seconds()
    if not 0.0 <= delta < 86400.0:
        raise InputError(
            f"RadiopharmaceuticalStartDateTime/StartTime (0018,1078)/(0018,1072): injection at {_iso(t_adm)} is "
            f"{delta / 3600:.2f} h before the reference time {_iso(ref)}; expected 0 to 24 h")
    prov.administration_time = _iso(t_adm)
    return t_adm


def _corrected_image(ds: pydicom.Dataset, decay: str) -> None:
    ci = _value(ds, "CorrectedImage")
    if ci is None:
        raise InputError("CorrectedImage (0028,0051) is missing; expected ATTN (attenuation corrected) and, for "
                         f"DecayCorrection {decay}, DECY")
    values = {str(v).upper() for v in (ci if isinstance(ci, list | tuple | pydicom.multival.MultiValue) else [ci])}
    if "ATTN" not in values:
        raise InputError(f"CorrectedImage (0028,0051) = {sorted(values)} lacks ATTN; SUV needs attenuation-corrected PET")
    decayed = bool(values & {"DECY", "DECAY"})
    if decay in ("START", "ADMIN") and not decayed:
        raise InputError(f"CorrectedImage (0028,0051) = {sorted(values)} lacks DECY but DecayCorrection (0054,1102) "
                         f"is {decay}; the two tags contradict each other")
    if decay == "NONE" and decayed:
        raise InputError(f"CorrectedImage (0028,0051) = {sorted(values)} contains DECY but DecayCorrection (0054,1102) "
                         "is NONE; the two tags contradict each other")


def _philips_factor(ds: pydicom.Dataset, tag) -> float | None:
    f = _number(ds, tag)
    return f if f is not None and f != 0.0 else None


def suv_factors(headers: list[pydicom.Dataset], mode: str = "qiba",
                first_file_header: pydicom.Dataset | None = None) -> tuple[np.ndarray, SuvProvenance]:
    """Per-slice factors F_k with SUVbw = (RescaleSlope*SV + RescaleIntercept) * F_k, and the provenance.

    ``headers`` are the slices' datasets in the order of the volume (sorted along the normal);
    ``first_file_header`` is the header the 'gatidis' mode reads (default the first). An error names the file of
    the first header (or the offending slice) and the tag."""
    if mode not in SUV_MODES:
        raise InputError(f"SUV mode '{mode}' is unknown; expected one of {', '.join(SUV_MODES)}")
    if not headers:
        raise InputError("no PET slices")
    where = _file(first_file_header if mode == "gatidis" and first_file_header is not None else headers[0])
    try:
        if mode == "gatidis":
            return _gatidis_factors(headers, first_file_header)
        return _qiba_factors(headers, mode)
    except _SliceError as exc:
        raise InputError(str(exc)) from exc
    except InputError as exc:
        if where is None:
            raise
        raise InputError(f"{where}: {exc}") from exc
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise InputError(f"{where or 'PET series'}: an SUV tag value cannot be used ({reason(exc)})") from exc


def _qiba_factors(headers: list[pydicom.Dataset], mode: str) -> tuple[np.ndarray, SuvProvenance]:
    h0 = headers[0]
    modality = str(_value(h0, "Modality") or "")
    if modality != "PT":
        raise InputError(f"Modality (0008,0060) is {modality!r}; expected PT")
    _check_consistent(headers)
    units = str(_value(h0, "Units") or "").upper()
    decay = str(_value(h0, "DecayCorrection") or "").upper()
    prov = SuvProvenance(mode=mode, units=units, decay_correction=decay)
    prov.tags.update({"Units": units, "DecayCorrection": decay})
    n = len(headers)
    slopes = [_number(h, "RescaleSlope") or 1.0 for h in headers]
    inters = [_number(h, "RescaleIntercept") or 0.0 for h in headers]
    prov.tags["RescaleSlope range"] = [min(slopes), max(slopes)]
    if any(b != 0.0 for b in inters):
        prov.warnings.append("RescaleIntercept (0028,1052) is not 0 (IBSI recommends excluding such series); "
                             "applied as m*SV + b")
    if not units:
        raise InputError("Units (0054,1001) is missing; expected BQML, CNTS, GML or CM2ML")
    if decay not in ("START", "ADMIN", "NONE"):
        raise InputError(f"DecayCorrection (0054,1102) is {decay or 'missing'}; expected START, ADMIN or NONE")

    if units == "GML":
        suv_type = str(_value(h0, "SUVType") or "BW").upper()
        prov.suv_type = suv_type
        prov.tags["SUVType"] = suv_type
        if suv_type == "BW":
            factor = 1.0
            prov.decisions.append("Units GML with SUVType BW: the image is SUVbw already")
        else:
            w = _weight(h0, prov)
            why = f"SUVType {suv_type} -> SUVbw"
            height = _height_cm(h0, prov, why)
            if suv_type in ("LBM", "LBMJAMES128"):
                ref_mass = lbm_james(w, height, _sex(h0, why))
            elif suv_type == "LBMJANMA":
                ref_mass = lbm_janmahasatian(w, height, _sex(h0, why))
            elif suv_type == "IBW":
                ref_mass = ideal_body_weight(height, _sex(h0, why))
            else:
                raise InputError(f"SUVType (0054,1006) = {suv_type} is not supported; expected BW, LBM, LBMJAMES128, "
                                 "LBMJANMA or IBW")
            factor = w / ref_mass
            prov.decisions.append(f"Units GML with SUVType {suv_type}: SUVbw = SUV * W / {ref_mass:.3f} kg")
        return _finish(np.full(n, factor), prov)
    if units == "CM2ML":
        w = _weight(h0, prov)
        height = _height_cm(h0, prov, "Units CM2ML (SUVbsa) -> SUVbw")
        bsa = bsa_dubois(w, height)
        prov.suv_type = "BSA"
        prov.decisions.append(f"Units CM2ML (SUVbsa): SUVbw = SUVbsa * W[g] / (BSA {bsa:.4f} m2 * 1e4), Du Bois")
        return _finish(np.full(n, w * 1000.0 / (bsa * 1e4)), prov)

    _corrected_image(h0, decay)
    prov.tags["CorrectedImage"] = [str(v) for v in np.atleast_1d(_value(h0, "CorrectedImage"))]
    activity_scale = np.ones(n)
    if units == "CNTS":
        if _private_is(h0, 0x7053, 0x10, "Philips PET Private Group") is False:
            prov.warnings.append("private creator (7053,0010) is not 'Philips PET Private Group'")
        suv_f = [_philips_factor(h, PHILIPS_SUV_FACTOR) for h in headers]
        act_f = [_philips_factor(h, PHILIPS_ACTIVITY_FACTOR) for h in headers]
        if all(f is not None for f in suv_f) and decay != "NONE":
            prov.tags["Philips SUV Scale Factor (7053,1000)"] = sorted(set(suv_f))
            prov.decisions.append("Units CNTS: SUVbw = A * Philips SUV Scale Factor (7053,1000)")
            return _finish(np.array(suv_f, dtype=np.float64), prov)
        if all(f is not None for f in act_f):
            prov.tags["Philips Activity Concentration Scale Factor (7053,1009)"] = sorted(set(act_f))
            prov.decisions.append("Units CNTS: Bq/ml = A * Philips Activity Concentration Scale Factor (7053,1009),"
                                  " then as BQML")
            activity_scale = np.array(act_f, dtype=np.float64)
        else:
            missing = next((_name(h, k) for k, h in enumerate(headers) if act_f[k] is None), None)
            raise InputError("Units (0054,1001) is CNTS but neither the Philips SUV Scale Factor (7053,1000) (with "
                             "decay correction) nor the Activity Concentration Scale Factor (7053,1009) is present and "
                             f"non-zero on every slice (e.g. not in {missing}); counts cannot be converted to SUV")
    elif units != "BQML":
        raise InputError(f"Units (0054,1001) = {units} cannot be converted to SUVbw; expected BQML, CNTS (Philips), "
                         "GML or CM2ML")

    item = _radiopharmaceutical(h0)
    w = _weight(h0, prov)
    d = _dose(item, prov)
    half = _half_life(item, prov)
    lam = math.log(2.0) / half
    base = w * 1000.0 / d
    if decay == "ADMIN":
        prov.decisions.append("DecayCorrection ADMIN: images decay-corrected to the injection; no further decay")
        prov.decay_factor = 1.0
        return _finish(activity_scale * base, prov)
    if decay == "START":
        ref = _reference_time(headers, half, prov)
        t_adm = _administration_time(item, ref, prov)
        prov.reference_time = _iso(ref)
        decay_factor = math.exp(-lam * (ref - t_adm).total_seconds())
        prov.decay_factor = decay_factor
        prov.decisions.append("DecayCorrection START: dose decayed from injection to the series reference time")
        return _finish(activity_scale * base / decay_factor, prov)
    # NONE: each frame is decay-corrected here from its own start and duration
    acq = _acquisition_datetimes(headers)
    durations = _frame_durations_s(headers)
    if acq is None:
        raise InputError("DecayCorrection NONE needs AcquisitionDate/AcquisitionTime (0008,0022)/(0008,0032) on every "
                         f"slice{_first_without(headers, 'AcquisitionTime')}")
    if durations is None:
        raise InputError("DecayCorrection NONE needs a positive ActualFrameDuration (0018,1242) on every slice"
                         f"{_first_without(headers, 'ActualFrameDuration')}")
    first = min(acq)
    t_adm = _administration_time(item, first, prov)
    prov.reference_time = _iso(first)
    prov.reference_source = "per-slice AcquisitionDate/Time (0008,0022)/(0008,0032) (DecayCorrection NONE)"
    factors = np.empty(n)
    for k, (a, T) in enumerate(zip(acq, durations, strict=True)):
        x = lam * T
        factors[k] = base * (x / -math.expm1(-x)) * math.exp(lam * (a - t_adm).total_seconds())
    prov.decisions.append("DecayCorrection NONE: per-frame decay from injection to frame start, averaged over the "
                          "frame duration")
    return _finish(activity_scale * factors, prov)


def _finish(factors: np.ndarray, prov: SuvProvenance) -> tuple[np.ndarray, SuvProvenance]:
    factors = np.asarray(factors, dtype=np.float64)
    prov.factor_min, prov.factor_max = float(factors.min()), float(factors.max())
    if np.allclose(factors, factors[0], rtol=1e-12, atol=0):
        prov.factor = float(factors[0])
    for w in prov.warnings:
        log.warning("SUV: %s", w)
    return factors, prov


def _gatidis_factors(headers: list[pydicom.Dataset],
                     first_file_header: pydicom.Dataset | None = None) -> tuple[np.ndarray, SuvProvenance]:
    """The autoPET/TCIA conversion: AcquisitionTime of one file, StartTime, no dates, Units not checked."""
    h = first_file_header if first_file_header is not None else headers[0]
    prov = SuvProvenance(mode="gatidis", units=str(_value(h, "Units") or ""),
                         decay_correction=str(_value(h, "DecayCorrection") or ""))
    prov.warnings.append("compatibility mode 'gatidis' (autoPET/TCIA conversion): AcquisitionTime of one file, times "
                         "without dates, Units and DecayCorrection not checked; wrong for multi-bed series, across "
                         "midnight and for Philips CNTS. Use only for comparisons")
    item = _radiopharmaceutical(h)
    w = _weight(h, prov)
    d = _number(item, "RadionuclideTotalDose") or 0.0
    if d <= 0:
        raise InputError("RadionuclideTotalDose (0018,1074) is missing or not positive")
    half = _number(item, "RadionuclideHalfLife")
    if not half:
        raise InputError("RadionuclideHalfLife (0018,1075) is missing")
    acq, start = _value(h, "AcquisitionTime"), _value(item, "RadiopharmaceuticalStartTime")
    acq_s, start_s = _time(h, "AcquisitionTime"), _time(item, "RadiopharmaceuticalStartTime")
    if acq_s is None:
        raise InputError("AcquisitionTime (0008,0032) is missing (required by the 'gatidis' mode)")
    if start_s is None:
        raise InputError("RadiopharmaceuticalStartTime (0018,1072) is missing (required by the 'gatidis' mode)")
    delta = acq_s - start_s
    decayed = d * 0.5 ** (delta / half)
    prov.dose_bq, prov.half_life_s, prov.decay_factor = d, half, 0.5 ** (delta / half)
    prov.tags.update({"AcquisitionTime": str(acq), "RadiopharmaceuticalStartTime": str(start),
                      "RadionuclideTotalDose": d, "RadionuclideHalfLife": half})
    prov.reference_source = "AcquisitionTime (0008,0032) of the first file by name"
    return _finish(np.full(len(headers), w * 1000.0 / decayed), prov)


def compute_suv(series: DicomSeries, mode: str = "qiba") -> SuvResult:
    """SUVbw image of an assembled PET series (per-slice rescale, then per-slice factor), with provenance."""
    first = None
    if mode == "gatidis":
        first = series.headers[min(range(len(series.files)), key=lambda i: str(series.files[i]))]
    factors, prov = suv_factors(series.headers, mode, first)
    for note in series.warnings:
        prov.warnings.append(note)
    activity = series.rescaled_array()
    suv = activity * factors[:, None, None]
    prov.tags["SeriesInstanceUID"] = series.info.series_uid
    return SuvResult(image=series.to_image(suv, np.float32), factors=factors, provenance=prov)


def suv_from_folder(folder, mode: str = "qiba", series: str | None = None) -> SuvResult:
    """Find the PET series (Modality PT) in a DICOM folder and compute its SUVbw."""
    return compute_suv(find_series(folder, "PT", series), mode)
