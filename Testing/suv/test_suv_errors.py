"""SUV refusal cases and fallbacks on small PET series built here with pydicom; each error names its tag."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import HALF, LAM, expected_suv, make_slice, write_series  # noqa: F401
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from LymphNodeStagingLib.errors import InputError, LNSError
from LymphNodeStagingLib.io.dicom_series import find_series
from LymphNodeStagingLib.suv.conversion import suv_factors, suv_from_folder


def _mean_suv(folder: Path, **kw) -> float:
    return float(np.mean(__import__("SimpleITK").GetArrayFromImage(suv_from_folder(folder, **kw).image)))


# ------------------------------------------------------------------------------------------------- good paths


def test_basic_bqml_start(tmp_path):
    assert _mean_suv(write_series(tmp_path)) == pytest.approx(expected_suv(), rel=1e-6)


def test_weight_in_grams_and_dose_in_mbq_are_recognised(tmp_path):
    res = suv_from_folder(write_series(tmp_path, PatientWeight="70000", rp_RadionuclideTotalDose="370"))
    assert res.provenance.weight_kg == 70.0 and res.provenance.dose_bq == 370e6
    assert any("grams" in w for w in res.provenance.warnings) and any("MBq" in w for w in res.provenance.warnings)
    assert res.provenance.factor * 1000 == pytest.approx(expected_suv(), rel=1e-6)


def test_per_slice_slope_is_applied(tmp_path):
    folder = write_series(tmp_path, per_slice=lambda k: {"RescaleSlope": f"{k + 1}", "value": 1000 // (k + 1)})
    arr = __import__("SimpleITK").GetArrayFromImage(suv_from_folder(folder).image)
    np.testing.assert_allclose(arr[:, 0, 0], [expected_suv(1000), expected_suv(1000), expected_suv(999)], rtol=1e-6)


def test_ge_private_reference_when_series_time_after_acquisition(tmp_path):
    folder = write_series(tmp_path, SeriesTime="113000")
    for p in folder.iterdir():
        ds = pydicom.dcmread(p)
        ds.private_block(0x0009, "GEMS_PETD_01", create=True).add_new(0x0D, "DT", "20250101110000")
        ds.save_as(p)
    res = suv_from_folder(folder)
    assert "GE" in res.provenance.reference_source
    assert res.provenance.factor * 1000 == pytest.approx(expected_suv(), rel=1e-6)


def test_back_computed_reference_for_multibed(tmp_path):
    # two beds: acquisition 11:00 and 11:02, each 120 s; FrameReferenceTime from the true reference 11:00
    def bed(k):
        start = 0.0 if k < 2 else 120.0
        x = LAM * 120.0
        t_ave = math.log(x / -math.expm1(-x)) / LAM
        return {"AcquisitionTime": "110000" if k < 2 else "110200", "FrameReferenceTime": (start + t_ave) * 1000}

    folder = write_series(tmp_path, n=4, per_slice=bed, SeriesTime="120000")
    res = suv_from_folder(folder)
    assert res.provenance.reference_source.startswith("back-computed")
    assert res.provenance.reference_time.startswith("2025-01-01T11:00:00")
    assert res.provenance.factor * 1000 == pytest.approx(expected_suv(), rel=1e-6)


def test_midnight_with_start_time_only(tmp_path):
    folder = write_series(tmp_path, SeriesDate="20250102", AcquisitionDate="20250102", SeriesTime="003000",
                          AcquisitionTime="003000", rp_RadiopharmaceuticalStartTime="233000",
                          rp_RadiopharmaceuticalStartDateTime=None)
    res = suv_from_folder(folder)
    assert res.provenance.administration_time.startswith("2025-01-01T23:30")
    assert res.provenance.factor * 1000 == pytest.approx(expected_suv(), rel=1e-6)


def test_admin_and_none_decay(tmp_path):
    admin = suv_from_folder(write_series(tmp_path / "a", DecayCorrection="ADMIN"))
    assert admin.provenance.factor == pytest.approx(70.0 * 1000 / 370e6)
    none = suv_from_folder(write_series(tmp_path / "n", DecayCorrection="NONE", CorrectedImage=["ATTN"]))
    x = LAM * 120.0
    assert none.provenance.factor == pytest.approx(70.0 * 1000 / 370e6 * x / -math.expm1(-x) * math.exp(LAM * 3600))


def test_gatidis_uses_acquisition_time(tmp_path):
    res = suv_from_folder(write_series(tmp_path, AcquisitionTime="110500"), mode="gatidis")
    assert res.provenance.factor == pytest.approx(70e3 / (370e6 * 0.5 ** (3900 / HALF)))
    assert res.provenance.warnings


# ------------------------------------------------------------------------------------------------- refusals


REFUSALS = [
    ({"PatientWeight": None}, "PatientWeight (0010,1030)"),
    ({"PatientWeight": "0"}, "PatientWeight (0010,1030)"),
    ({"rp_RadionuclideTotalDose": None}, "RadionuclideTotalDose (0018,1074)"),
    ({"rp_RadionuclideHalfLife": None}, "RadionuclideHalfLife (0018,1075)"),
    ({"RadiopharmaceuticalInformationSequence": Sequence([])}, "RadiopharmaceuticalInformationSequence (0054,0016)"),
    ({"Units": None}, "Units (0054,1001)"),
    ({"Units": "PROPCNTS"}, "Units (0054,1001)"),
    ({"Units": "CNTS"}, "(7053,1000)"),
    ({"DecayCorrection": None}, "DecayCorrection (0054,1102)"),
    ({"DecayCorrection": "FOO"}, "DecayCorrection (0054,1102)"),
    ({"CorrectedImage": None}, "CorrectedImage (0028,0051)"),
    ({"CorrectedImage": ["DECY"]}, "CorrectedImage (0028,0051)"),
    ({"CorrectedImage": ["ATTN"]}, "CorrectedImage (0028,0051)"),
    ({"rp_RadiopharmaceuticalStartTime": None, "rp_RadiopharmaceuticalStartDateTime": None},
     "RadiopharmaceuticalStartTime (0018,1072)"),
    ({"rp_RadiopharmaceuticalStartTime": "093000"}, "RadiopharmaceuticalStartDateTime (0018,1078)"),
    ({"rp_RadiopharmaceuticalStartDateTime": "20241230100000", "rp_RadiopharmaceuticalStartTime": None},
     "(0018,1078)"),
    ({"rp_RadiopharmaceuticalStartDateTime": "20250101120000", "rp_RadiopharmaceuticalStartTime": None},
     "(0018,1078)"),
    ({"SeriesTime": "113000", "FrameReferenceTime": None}, "FrameReferenceTime (0054,1300)"),
    ({"Units": "GML", "SUVType": "LBM", "PatientSize": None}, "PatientSize (0010,1020)"),
    ({"Units": "GML", "SUVType": "LBM", "PatientSex": None}, "PatientSex (0010,0040)"),
    ({"Units": "GML", "SUVType": "XYZ"}, "SUVType (0054,1006)"),
    ({"Modality": "CT"}, "Modality (0008,0060)"),
]


@pytest.mark.parametrize(("over", "tag"), REFUSALS, ids=[t for _, t in REFUSALS])
def test_refusal_names_the_tag(tmp_path, over, tag):
    headers = [make_slice(k, "1.2.3.9", **over) for k in range(2)]
    with pytest.raises(InputError) as info:
        suv_factors(headers)
    assert tag in str(info.value)
    assert isinstance(info.value, LNSError)


def test_two_radiopharmaceuticals_refused():
    headers = [make_slice(k, "1.2.3.9") for k in range(2)]
    for h in headers:
        h.RadiopharmaceuticalInformationSequence.append(Dataset())
    with pytest.raises(InputError, match=r"\(0054,0016\) has 2 items"):
        suv_factors(headers)


def test_contradictory_slices_refused():
    headers = [make_slice(k, "1.2.3.9", PatientWeight=str(70 + k)) for k in range(2)]
    with pytest.raises(InputError, match=r"PatientWeight \(0010,1030\) differs"):
        suv_factors(headers)


def test_back_computation_disagreement_refused():
    headers = [make_slice(k, "1.2.3.9", SeriesTime="113000", FrameReferenceTime=60000 + 200000 * k)
               for k in range(2)]
    with pytest.raises(InputError, match=r"FrameReferenceTime \(0054,1300\)"):
        suv_factors(headers)


def test_unknown_mode_refused():
    with pytest.raises(InputError, match="mode"):
        suv_factors([make_slice(0, "1.2.3.9")], mode="slicer")


# ------------------------------------------------------------------------------------------------- series assembly


def test_mixed_orientation_refused(tmp_path):
    folder = write_series(tmp_path, per_slice=lambda k: {"ImageOrientationPatient": [1, 0, 0, 0, 0.8, 0.6]}
                          if k == 1 else {})
    with pytest.raises(InputError, match=r"ImageOrientationPatient \(0020,0037\)"):
        find_series(folder, "PT")


def test_duplicate_position_refused(tmp_path):
    folder = write_series(tmp_path, per_slice=lambda k: {"ImagePositionPatient": [0, 0, 0]} if k == 2 else {})
    with pytest.raises(InputError, match=r"duplicate ImagePositionPatient \(0020,0032\)"):
        find_series(folder, "PT")


def test_several_series_listed_and_chosen(tmp_path):
    write_series(tmp_path, series_uid="1.2.3.100", SeriesNumber=5, SeriesDescription="PET AC")
    write_series(tmp_path, series_uid="1.2.3.200", SeriesNumber=6, SeriesDescription="PET NAC")
    with pytest.raises(InputError) as info:
        find_series(tmp_path, "PT")
    assert "1.2.3.100" in str(info.value) and "1.2.3.200" in str(info.value) and "series" in str(info.value)
    assert find_series(tmp_path, "PT", series="PET NAC").info.series_uid == "1.2.3.200"
    assert find_series(tmp_path, "PT", series="5").info.series_uid == "1.2.3.100"
    with pytest.raises(InputError, match="Modality"):
        find_series(tmp_path, "CT")


def test_slices_sorted_along_normal_not_by_name(tmp_path):
    # reversed positions: file 0 is the highest slice
    folder = write_series(tmp_path, per_slice=lambda k: {"ImagePositionPatient": [0, 0, 8.0 - 4 * k],
                                                          "value": 100 * (k + 1)})
    ser = find_series(folder, "PT")
    assert ser.origin == (0.0, 0.0, 0.0) and ser.spacing == (4.0, 4.0, 4.0)
    np.testing.assert_allclose(ser.rescaled_array()[:, 0, 0], [300, 200, 100])
