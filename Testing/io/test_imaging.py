"""Case loading (DICOM and image files), geometry checks, resampling, normalisation, mediastinal crop, CLI suv."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_fixtures import expected_suv, write_series

from LymphNodeStagingLib.anatomy.vocabulary import id_of
from LymphNodeStagingLib.classifier.patches import normalise_ct, normalise_pet
from LymphNodeStagingLib.cli import main as cli
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.io.images import physical_bounds
from LymphNodeStagingLib.mapping.crop import check_pet_covers, mediastinal_crop
from LymphNodeStagingLib.suv.inputs import load_case


def _image(arr, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(np.asarray(arr))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _dicom_pair(tmp_path, pet_over=None, ct_over=None):
    ct = write_series(tmp_path / "study" / "ct", n=6, modality="CT", rows=8, cols=8, spacing=2.0, value=40,
                      RescaleIntercept="-1024", **(ct_over or {}))
    pet = write_series(tmp_path / "study" / "pet", n=3, rows=4, cols=4, spacing=4.0, **(pet_over or {}))
    return ct, pet


def test_load_case_from_dicom(tmp_path):
    ct, pet = _dicom_pair(tmp_path)
    case = load_case(ct, pet)
    assert case.ct.GetSize() == (8, 8, 6) and case.pet.GetSize() == (4, 4, 3)
    assert float(sitk.GetArrayViewFromImage(case.ct).max()) == pytest.approx(40 - 1024)
    assert float(sitk.GetArrayViewFromImage(case.pet).mean()) == pytest.approx(expected_suv(), rel=1e-6)
    assert case.suv["units"] == "BQML" and case.frame_of_reference_uid == "1.2.3.5"
    assert case.geometry()["pet"]["spacing"] == [4.0, 4.0, 4.0]
    # one folder holding both series: found by modality
    both = load_case(tmp_path / "study", tmp_path / "study")
    assert both.ct.GetSize() == case.ct.GetSize()


def test_frame_of_reference_mismatch_refused(tmp_path):
    ct, pet = _dicom_pair(tmp_path, pet_over={"FrameOfReferenceUID": "9.9.9"})
    with pytest.raises(InputError, match=r"FrameOfReferenceUID \(0020,0052\)"):
        load_case(ct, pet)


def test_no_overlap_refused(tmp_path):
    ct = _image(np.zeros((5, 5, 5), np.float32))
    pet = _image(np.ones((5, 5, 5), np.float32), origin=(500.0, 0.0, 0.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(pet, str(tmp_path / "pet.nii.gz"))
    with pytest.raises(InputError, match="do not overlap"):
        load_case(tmp_path / "ct.nii.gz", tmp_path / "pet.nii.gz", pet_is_suv=True)


def test_image_files_and_pet_is_suv(tmp_path):
    ct = _image(np.full((5, 6, 7), -1000, np.int16))
    pet = _image(np.full((3, 3, 4), 2.5, np.float32), spacing=(4.0, 4.0, 4.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(pet, str(tmp_path / "pet.mha"))
    with pytest.raises(InputError, match="pet_is_suv"):
        load_case(tmp_path / "ct.nrrd", tmp_path / "pet.mha")
    case = load_case(tmp_path / "ct.nrrd", tmp_path / "pet.mha", pet_is_suv=True)
    assert case.ct.GetPixelID() == sitk.sitkFloat32 and case.pet.GetPixelID() == sitk.sitkFloat32
    assert case.suv["mode"] == "user"
    (tmp_path / "x.txt").write_text("not an image")
    with pytest.raises(InputError, match="unknown image format"):
        load_case(tmp_path / "ct.nrrd", tmp_path / "x.txt", pet_is_suv=True)


def test_normalisation():
    np.testing.assert_allclose(normalise_ct(np.array([-1000, -200, 100, 400, 2000])), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(normalise_pet(np.array([0.0, 4.0, 10.0])), [0, 1, 2.5])


def _thorax(shape=(40, 60, 60)) -> sitk.Image:
    """A synthetic anatomy map on a 2 mm grid: lungs, trachea, heart as boxes."""
    a = np.zeros(shape, np.uint16)
    a[10:30, 15:45, 5:25] = id_of("lung_upper_lobe_right")
    a[10:30, 15:45, 35:55] = id_of("lung_upper_lobe_left")
    a[20:38, 25:32, 28:32] = id_of("trachea")
    a[8:16, 30:45, 25:40] = id_of("heart")
    return _image(a, spacing=(2.0, 2.0, 2.0), origin=(-60.0, -60.0, 0.0))


def test_mediastinal_crop_box_and_margin():
    anat = _thorax()
    box = mediastinal_crop(anat, margin_mm=40.0)
    # x: voxels 5..54 -> edges -60 + 2*4.5 .. -60 + 2*54.5
    np.testing.assert_allclose(box.core_lower, [-51.0, -31.0, 15.0])
    np.testing.assert_allclose(box.core_upper, [49.0, 29.0, 75.0])
    np.testing.assert_allclose(box.lower, box.core_lower - 40.0)
    clipped = mediastinal_crop(anat, margin_mm=40.0, clip_to=anat)
    lo, hi = physical_bounds(anat)
    assert np.all(clipped.lower >= lo - 1e-6) and np.all(clipped.upper <= hi + 1e-6)
    stations = sitk.Image(anat.GetSize(), sitk.sitkUInt8)
    stations.CopyInformation(anat)
    stations[30, 30, 20] = 7
    sbox = mediastinal_crop(anat, stations=stations, margin_mm=0.0)
    np.testing.assert_allclose(sbox.upper - sbox.lower, [2.0, 2.0, 2.0])


def test_not_a_thorax_refused():
    a = np.zeros((10, 10, 10), np.uint16)
    a[2:5, 2:5, 2:5] = id_of("liver")
    with pytest.raises(InputError, match=r"CT is not a thorax \(no lungs/trachea found"):
        mediastinal_crop(_image(a))


def test_pet_not_covering_mediastinum_refused():
    anat = _thorax()
    box = mediastinal_crop(anat)
    pet = _image(np.zeros((5, 40, 40), np.float32), spacing=(4.0, 4.0, 4.0), origin=(-80.0, -80.0, 0.0))
    with pytest.raises(InputError, match="PET does not cover the mediastinum"):
        check_pet_covers(pet, box)


def test_cli_suv_json(tmp_path, capsys):
    folder = write_series(tmp_path / "pet", SeriesTime="113000", per_slice=lambda k: {
        "FrameReferenceTime": (math.log(120 * math.log(2) / 6586.2 / -math.expm1(-120 * math.log(2) / 6586.2))
                               / (math.log(2) / 6586.2)) * 1000})
    rc = cli.main(["suv", str(folder), str(tmp_path / "suv.nii.gz"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factor"] * 1000 == pytest.approx(expected_suv(), rel=1e-6)
    assert out["provenance"]["reference_source"].startswith("back-computed")
    assert sitk.ReadImage(str(tmp_path / "suv.nii.gz")).GetSize() == (4, 4, 3)
    rc = cli.main(["suv", str(write_series(tmp_path / "bad", PatientWeight=None)), str(tmp_path / "x.nii.gz")])
    assert rc == 1 and "PatientWeight (0010,1030)" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
