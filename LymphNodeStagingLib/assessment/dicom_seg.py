"""DICOM Segmentation (SEG) export of the station map, referencing the CT series it was computed on (highdicom).

One segment per station present in the map (segment label "Station 4R"), coded as a lymph node of the matching
anatomical site (SNOMED CT codes from the DICOM standard's code lists) with laterality, the station name as
tracking ID, the probability and status in the segment description, and the segment colour from the probability
colour map. The station map may be on the CT grid or a crop of it; it is resampled (nearest neighbour) onto the
grid of the referenced CT series first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from ..errors import InputError
from ..io.files import atomic_path
from ..staging.result import CaseResult
from ..staging.stations import STATIONS, Station, parse_station

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CodeTriple:
    scheme: str
    value: str
    meaning: str


#: Segmented property category of every station.
CATEGORY = CodeTriple("SCT", "91723000", "Anatomical Structure")
#: Anatomical site of each station number (SNOMED CT lymph node codes listed in the DICOM standard).
STATION_TYPE_CODES: dict[str, CodeTriple] = {
    "1": CodeTriple("SCT", "76838003", "Supraclavicular lymph node"),
    "2": CodeTriple("SCT", "127927006", "Upper paratracheal lymph node"),
    "3A": CodeTriple("SCT", "127930004", "Prevascular and retrotracheal lymph node"),
    "3P": CodeTriple("SCT", "127931000", "Retrotracheal lymph node"),
    "4": CodeTriple("SCT", "127932007", "Lower paratracheal lymph node"),
    "5": CodeTriple("SCT", "35783009", "Aortic lymph node"),
    "6": CodeTriple("SCT", "127939003", "Para-aortic lymph node of the anterior mediastinum"),
    "7": CodeTriple("SCT", "28330007", "Subcarinal lymph node"),
    "8": CodeTriple("SCT", "11899006", "Esophageal lymph node"),
    "9": CodeTriple("SCT", "127941002", "Lymph node of the pulmonary ligament"),
    "10": CodeTriple("SCT", "53074004", "Hilar lymph node"),
    "11": CodeTriple("SCT", "127919002", "Interlobar lymph node of the lung"),
}
LATERALITY_CODES: dict[str, CodeTriple] = {
    "R": CodeTriple("SCT", "24028007", "Right"),
    "L": CodeTriple("SCT", "7771000", "Left"),
}


def station_codes(station: Station | str) -> tuple[CodeTriple, CodeTriple, CodeTriple | None]:
    """(category, type, laterality modifier or None) for a station."""
    st = parse_station(station)
    return CATEGORY, STATION_TYPE_CODES[st.number], LATERALITY_CODES.get(st.side)


def _code(triple: CodeTriple):
    from highdicom.sr import CodedConcept

    return CodedConcept(triple.value, triple.scheme, triple.meaning)


def _reference_grid(headers: list[pydicom.Dataset], origin, spacing, direction) -> sitk.Image:
    ref = sitk.Image(int(headers[0].Columns), int(headers[0].Rows), len(headers), sitk.sitkUInt8)
    ref.SetOrigin(origin)
    ref.SetSpacing(spacing)
    ref.SetDirection(direction)
    return ref


def write_dicom_seg(station_map: sitk.Image, result: CaseResult, ct_dicom_dir: str | Path, out_path: str | Path, *,
                    series_number: int = 901, series_description: str = "Lymph node stations",
                    colors: dict[str, tuple[float, float, float]] | None = None) -> Path:
    """Write a binary DICOM SEG of the stations over the CT series found in ``ct_dicom_dir``.

    ``colors`` maps station names to RGB 0..1 (default: the probability colour map).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from .. import __version__
    from ..io.dicom_series import find_series

    ct_dicom_dir = Path(ct_dicom_dir)
    if not ct_dicom_dir.is_dir():
        raise InputError(f"CT DICOM folder {ct_dicom_dir} does not exist; DICOM SEG needs the source CT series")
    series = find_series(ct_dicom_dir, "CT")
    grid = _reference_grid(series.headers, series.origin, series.spacing, series.direction)
    labels = sitk.Resample(sitk.Cast(station_map, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    array = sitk.GetArrayFromImage(labels)  # (slices, rows, columns), slices in the order of series.headers
    if colors is None:
        from ..staging.colors import probability_color
        colors = {st.name: probability_color(st.probability if st.present else None) for st in result.stations}

    present = [st for st in STATIONS if np.any(array == st.label)]
    if not present:
        raise InputError(f"station map has no station voxels inside CT series {series.info.label()}; "
                         "expected label values 1..17 overlapping the CT")
    descriptions = []
    masks = np.zeros(array.shape + (len(present),), dtype=bool)
    for number, st in enumerate(present, start=1):
        category, site, laterality = station_codes(st)
        finding = result.station(st.name)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=f"Station {st.name}",
            segmented_property_category=_code(category),
            segmented_property_type=_code(site),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="LymphNodeStaging", version=__version__ or "0",
                family=_code(CodeTriple("DCM", "123110", "Artificial Intelligence"))),
            tracking_uid=generate_uid(),
            tracking_id=f"Station {st.name}",
            display_color=hd.color.CIELabColor.from_rgb(*(int(round(255 * c)) for c in colors[st.name])),
        )
        if laterality is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_code(laterality)]
        prob = "absent" if finding.probability is None else f"{finding.probability:.3f}"
        desc.SegmentDescription = f"IASLC station {st.name}; malignancy probability {prob}; {finding.status}"[:1024]
        descriptions.append(desc)
        masks[..., number - 1] = array == st.label

    sources = [pydicom.dcmread(f) for f in series.files]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="LymphNodeStaging",
        manufacturer_model_name="LymphNodeStaging",
        software_versions=__version__ or "0",
        device_serial_number="0",
        content_label="STATIONS",
        content_description=f"{result.n_stage} (TNM9 {result.tnm9}), {result.rules} rules"[:64],
        omit_empty_frames=True,
    )
    seg.SeriesDescription = series_description
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    log.info("DICOM SEG with %d stations written to %s", len(present), out_path)
    return out_path
