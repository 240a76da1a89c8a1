"""Phantom DICOM output: geometry read back by pydicom and SimpleITK, SUV recovered by the QIBA reader."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.errors import LNSError
from LymphNodeStagingLib.phantom import generate_patient, write_patient
from LymphNodeStagingLib.phantom.dicom import PetHeader, write_pet_series
from LymphNodeStagingLib.suv.conversion import suv_from_folder


@pytest.fixture(scope="module")
def patient():
    return generate_patient(8, "small")


def read_series(folder):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    r.SetOutputPixelType(sitk.sitkFloat64)
    return r.Execute()


def test_dicom_patient_geometry_and_values(patient, tmp_path):
    paths = write_patient(patient, tmp_path / "p", format="dicom")
    ct = read_series(paths["ct"])
    assert ct.GetSize() == patient.ct.GetSize()
    assert np.allclose(ct.GetOrigin(), patient.ct.GetOrigin(), atol=1e-3)
    assert np.allclose(ct.GetSpacing(), patient.ct.GetSpacing(), atol=1e-4)
    assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(patient.ct).astype(float))
    files = sorted(paths["pet"].glob("*.dcm"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "PT" and ds.Units == "BQML" and ds.DecayCorrection == "START"
    rp = ds.RadiopharmaceuticalInformationSequence[0]
    assert float(rp.RadionuclideTotalDose) > 1e8 and float(rp.RadionuclideHalfLife) == pytest.approx(6586.2)
    assert "RadiopharmaceuticalStartDateTime" in rp and float(ds.PatientWeight) > 0
    ct_ds = pydicom.dcmread(next(paths["ct"].glob("*.dcm")))
    assert ct_ds.FrameOfReferenceUID == ds.FrameOfReferenceUID and ct_ds.StudyInstanceUID == ds.StudyInstanceUID
    pet = read_series(paths["pet"])
    assert pet.GetSize() == patient.pet.GetSize()
    assert np.allclose(pet.GetOrigin(), patient.pet.GetOrigin(), atol=1e-3)
    # stored values are Bq/ml, not SUV
    assert float(sitk.GetArrayViewFromImage(pet).max()) > 100 * float(sitk.GetArrayViewFromImage(patient.pet).max())


@pytest.mark.parametrize("variant", PetHeader.VARIANTS)
def test_qiba_reader_recovers_suv(patient, tmp_path, variant):
    folder = write_pet_series(patient.pet, tmp_path / variant, PetHeader.variant(variant, seed=3), patient_id="P1",
                              study_uid="1.2.826.0.1.3680043.8.498.1", frame_of_reference_uid="1.2.826.0.1.3680043.8.498.2")
    got = sitk.GetArrayFromImage(suv_from_folder(folder).image)
    want = sitk.GetArrayFromImage(patient.pet)
    m = want > 0.2
    assert np.max(np.abs(got[m] / want[m] - 1)) < 0.005
    slopes = {float(pydicom.dcmread(f, stop_before_pixels=True).RescaleSlope) for f in folder.glob("*.dcm")}
    assert len(slopes) > 1  # per-slice rescale slope


def test_dicom_is_deterministic(patient, tmp_path):
    a = write_pet_series(patient.pet, tmp_path / "a", PetHeader.variant("multibed", 1), patient_id="P",
                         study_uid="1.2.3", frame_of_reference_uid="1.2.4", series_uid="1.2.5")
    b = write_pet_series(patient.pet, tmp_path / "b", PetHeader.variant("multibed", 1), patient_id="P",
                         study_uid="1.2.3", frame_of_reference_uid="1.2.4", series_uid="1.2.5")
    for fa in sorted(a.glob("*.dcm")):
        assert fa.read_bytes() == (b / fa.name).read_bytes()


def test_bad_header_raises(patient, tmp_path):
    with pytest.raises(LNSError, match="variant"):
        PetHeader.variant("siemens_magic")
    with pytest.raises(LNSError, match="units"):
        write_pet_series(patient.pet, tmp_path / "x", PetHeader(units="GML"), patient_id="P", study_uid="1.2",
                         frame_of_reference_uid="1.3")
