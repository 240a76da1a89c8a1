"""check_case and check_row on a phantom case (NIfTI and DICOM), and the option checks made before any work."""

from __future__ import annotations

import pytest
import SimpleITK as sitk
from preflight_images import cut

from LymphNodeStagingLib.errors import InputError, ModelError, UsageError
from LymphNodeStagingLib.paths import demo_model_path
from LymphNodeStagingLib.preflight import parameters as par
from LymphNodeStagingLib.preflight.case import check_case, check_images, check_row


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    patient = generate_patient(31, size="small")
    return patient, write_patient(patient, tmp_path_factory.mktemp("preflight") / "PH0031")


def test_check_case_returns_the_checked_images_and_the_anatomy(phantom):
    patient, paths = phantom
    checked = check_case(paths["ct"], paths["pet"], anatomy=paths["anatomy"], pet_is_suv=True)
    assert checked.ct.GetSize() == patient.ct.GetSize() and checked.ct.GetPixelID() == sitk.sitkFloat32
    assert checked.anatomy is not None and checked.anatomy.GetSize() == checked.ct.GetSize()
    assert checked.memory.total_gb < 4 and not checked.from_dicom and checked.case.ct_path == str(paths["ct"])
    only_files = check_case(paths["ct"], paths["pet"], anatomy=paths["anatomy"], pet_is_suv=True, read_anatomy=False)
    assert only_files.anatomy is None
    in_memory = check_case(patient.ct, patient.pet, anatomy=patient.anatomy)
    assert in_memory.suv["mode"] == "user" and in_memory.anatomy is patient.anatomy


def test_the_anatomy_file_is_checked_too(phantom, tmp_path):
    _, paths = phantom
    half = cut(paths["anatomy"], tmp_path / "anatomy.nii.gz")
    with pytest.raises(InputError, match="truncated") as err:
        check_case(paths["ct"], paths["pet"], anatomy=half, pet_is_suv=True)
    assert str(err.value).startswith(f"anatomy {half}")


def test_pet_is_suv_rule_comes_first(phantom):
    _, paths = phantom
    with pytest.raises(InputError, match="without a DICOM header"):
        check_case(paths["ct"], paths["pet"])


def test_dicom_series_are_checked_once_read(tmp_path):
    from LymphNodeStagingLib.phantom import generate_patient, write_patient

    paths = write_patient(generate_patient(32, size="small"), tmp_path / "dicom", format="dicom")
    checked = check_case(paths["ct"], paths["pet"])
    assert checked.from_dicom and set(checked.dicom_sources) == {"ct", "pet"}
    assert checked.suv["mode"] != "user" and checked.ct.GetPixelID() == sitk.sitkFloat32


def test_check_row_names_the_line_and_the_file(phantom, tmp_path):
    _, paths = phantom
    row = {"line": 3, "scan_id": "PH0031_S1", "ct_path": str(cut(paths["ct"], tmp_path / "ct.nii.gz")),
           "pet_path": str(paths["pet"]), "anatomy_path": str(paths["anatomy"]), "pet_is_suv": True}
    with pytest.raises(InputError) as err:
        check_row(row)
    assert str(err.value).startswith(f"line 3 (PH0031_S1): CT {tmp_path / 'ct.nii.gz'}: the file is truncated")
    row["ct_path"] = str(paths["ct"])
    assert check_row(row).anatomy is None
    with pytest.raises(InputError, match="contradicts"):
        check_row(row, pet_is_suv="no")


def test_volumes_in_memory_are_named(phantom):
    patient, _ = phantom
    check_images(patient.ct, patient.pet, names={"CT": "PH0031 CT"})
    with pytest.raises(InputError, match="^CT 'PH0031 CT': every voxel"):
        check_images(patient.ct * 0, None, names={"CT": "PH0031 CT"})
    with pytest.raises(InputError, match="^PET image: .* below -0.5 SUV"):
        check_images(patient.ct, patient.pet - 50.0)


# ----------------------------------------------------------------------------------------------- options


def test_threshold_rules_tta_device_and_output():
    assert par.check_threshold(None) is None and par.check_threshold("0.25") == 0.25
    for bad in (1.5, -0.1, float("nan"), "x"):
        with pytest.raises(UsageError, match="--threshold"):
            par.check_threshold(bad)
    assert par.check_rules("ajcc8") == "ajcc8"
    with pytest.raises(UsageError, match="^--rules: unknown rule set 'unknown'"):
        par.check_rules("unknown")
    assert par.check_tta(2) == 2
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(UsageError, match="--tta"):
            par.check_tta(bad)
    assert par.check_device("cpu").kind == "cpu"
    with pytest.raises(UsageError, match="--device"):
        par.check_device("tpu")


def test_output_folder_in_the_way(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="--out .*is a file"):
        par.check_out(blocker)
    assert par.check_out(None) is None and par.check_out(tmp_path / "new") == tmp_path / "new"
    assert not (tmp_path / "new").exists()


def test_model_is_loaded_and_verified(tmp_path):
    net, manifest, path = par.check_model(None)
    assert path == demo_model_path() and manifest["kind"] in ("station", "staging") and not net.training
    with pytest.raises(ModelError, match="does not exist"):
        par.check_model(tmp_path / "missing.pt")
    truncated = cut(demo_model_path(), tmp_path / "truncated.pt")
    with pytest.raises(ModelError) as err:
        par.check_model(truncated)
    assert "truncated.pt" in str(err.value)
