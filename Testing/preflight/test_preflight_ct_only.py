"""check_case with a CT and no PET (CT-only mode): no PET-is-SUV rule, no PET check, a memory estimate without PET,
the CT still checked as with a PET; check_row (cohort rows) still needs a PET."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from preflight_images import cut

from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.preflight.case import CT_ONLY_SUV, check_case, check_row


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    patient = generate_patient(33, size="small")
    return patient, write_patient(patient, tmp_path_factory.mktemp("preflight-ct-only") / "PH0033")


def test_a_ct_alone_is_checked_and_loaded(phantom):
    patient, paths = phantom
    checked = check_case(paths["ct"], None, anatomy=paths["anatomy"])  # no --pet-is-suv needed: no PET
    assert checked.ct_only and checked.pet is None and checked.case.pet_path == ""
    assert checked.ct.GetSize() == patient.ct.GetSize() and checked.ct.GetPixelID() == sitk.sitkFloat32
    assert checked.suv == CT_ONLY_SUV and checked.suv is not CT_ONLY_SUV
    assert checked.anatomy is not None and checked.memory.parts_mb["PET"] == 0.0
    with_pet = check_case(paths["ct"], paths["pet"], anatomy=paths["anatomy"], pet_is_suv=True)
    assert not with_pet.ct_only and with_pet.memory.parts_mb["PET"] > 0.0
    in_memory = check_case(patient.ct, None)
    assert in_memory.ct_only and in_memory.case.ct_path == "" and not in_memory.from_dicom


def test_a_bad_ct_is_refused_without_a_pet_too(phantom, tmp_path):
    _, paths = phantom
    half = cut(paths["ct"], tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="truncated") as err:
        check_case(half, None)
    assert str(err.value).startswith(f"CT {half}")
    with pytest.raises(InputError, match="not found"):
        check_case(tmp_path / "missing.nii.gz", None)


def test_a_dicom_ct_alone(tmp_path):
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    paths = write_patient(generate_patient(34, size="small"), tmp_path / "dicom", format="dicom")
    checked = check_case(paths["ct"], None)
    assert checked.ct_only and checked.from_dicom and checked.dicom_sources == {"ct": str(paths["ct"])}
    assert checked.case.ct_series_uid and checked.ct.GetPixelID() == sitk.sitkFloat32


def test_cohort_rows_still_need_a_pet(phantom):
    _, paths = phantom
    row = {"line": 2, "scan_id": "PH0033_S1", "ct_path": str(paths["ct"]), "pet_path": "", "pet_is_suv": True}
    with pytest.raises(InputError, match="line 2 .*pet_path"):
        check_row(row)
