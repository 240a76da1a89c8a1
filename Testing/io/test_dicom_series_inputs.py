"""Series assembly on bad DICOM folders written here with pydicom: one patient, study and frame of reference per
series; files without pixel data skipped and counted, or refused when nothing else is there."""

from __future__ import annotations

import logging

import pydicom
import pytest
from dicom_fixtures import (
    make_slice,
    series_uid_of,
    write_dicomdir,
    write_header_only,
    write_non_image,
    write_series,
)

from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.io.dicom_series import find_series, scan_folder
from LymphNodeStagingLib.suv.conversion import suv_from_folder
from LymphNodeStagingLib.suv.inputs import load_pet

# ------------------------------------------------------------------------------------------------ identity

IDENTITY = [("PatientID", "(0010,0020)", "P1", "P2"),
            ("StudyInstanceUID", "(0020,000D)", "1.2.3.4", "1.2.3.44"),
            ("FrameOfReferenceUID", "(0020,0052)", "1.2.3.5", "1.2.3.55")]


@pytest.mark.parametrize(("keyword", "number", "ours", "theirs"), IDENTITY, ids=[i[0] for i in IDENTITY])
def test_other_patient_study_or_frame_in_one_series_refused(tmp_path, keyword, number, ours, theirs):
    # evenly spaced, so only the identity tag can tell that slice 2 belongs elsewhere
    folder = write_series(tmp_path / "pet", n=4, per_slice=lambda k: {keyword: theirs} if k == 2 else {})
    files = sorted(folder.glob("*.dcm"))
    with pytest.raises(InputError) as info:
        find_series(folder, "PT")
    msg = str(info.value)
    assert msg.startswith(f"{folder}: {keyword} {number}")
    assert f"'{ours}'" in msg and f"'{theirs}'" in msg
    assert files[0].name in msg and files[2].name in msg


def test_identity_tag_missing_on_some_files_refused(tmp_path):
    folder = write_series(tmp_path, per_slice=lambda k: {"PatientID": None} if k == 1 else {})
    with pytest.raises(InputError, match=r"PatientID \(0010,0020\) is 'P1' in .* but missing \(or empty\) in"):
        find_series(folder, "PT")
    empty = write_series(tmp_path / "empty", per_slice=lambda k: {"FrameOfReferenceUID": ""} if k == 0 else {})
    with pytest.raises(InputError, match=r"FrameOfReferenceUID \(0020,0052\) is missing \(or empty\) in .* but '1.2.3.5'"):
        find_series(empty, "PT")


def test_identity_tag_missing_on_every_file_accepted(tmp_path):
    ser = find_series(write_series(tmp_path, PatientID="", FrameOfReferenceUID=None), "PT")
    assert len(ser.files) == 3 and ser.frame_of_reference_uid is None


# ------------------------------------------------------------------------------------------------ no pixel data


def _good_with_extras(folder):
    write_series(folder)
    uid = series_uid_of(folder)
    extras = [write_dicomdir(folder), write_non_image(folder, "SR"), write_non_image(folder, "PR"),
              write_header_only(folder, uid, k=3)]  # a header-only slice of the same series, without Rows/Columns
    (folder / "README.txt").write_text("not DICOM")
    return uid, extras


def test_files_without_pixel_data_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "pet"
    uid, extras = _good_with_extras(folder)
    with caplog.at_level(logging.WARNING):
        ser = find_series(folder, "PT")
    assert len(ser.files) == 3 and not set(extras) & set(ser.files)
    assert {f.kind for f in ser.info.skipped} == {"DICOMDIR", "SR", "PR", "PT"}
    assert ser.info.to_dict()["skipped_without_pixel_data"] == 4
    assert ser.info.scan.not_dicom == 1
    notes = ser.warnings
    assert notes[0].startswith(f"{folder}: 4 DICOM files without PixelData (7FE0,0010) skipped")
    assert any(uid in n and "header_only.dcm" in n for n in notes)
    assert "4 DICOM files without PixelData (7FE0,0010) skipped" in caplog.text
    # reported in the SUV provenance, and the SUV is unaffected
    prov = suv_from_folder(folder).provenance
    assert notes[0] in prov.warnings and prov.factor is not None
    assert notes[0] in load_pet(folder, pet_is_suv=True)[1]["warnings"]


def test_header_only_slice_with_rows_skipped(tmp_path):
    write_series(tmp_path)
    write_header_only(tmp_path, series_uid_of(tmp_path), k=3, keep_rows=True)
    ser = find_series(tmp_path, "PT")
    assert len(ser.files) == 3 and len(ser.info.skipped) == 1
    assert ser.rescaled_array().shape == (3, 4, 4)


def test_folder_with_only_files_without_pixel_data_refused(tmp_path):
    write_dicomdir(tmp_path)
    write_non_image(tmp_path, "SR")
    write_header_only(tmp_path, "1.2.3.77")
    for call in (lambda: scan_folder(tmp_path), lambda: find_series(tmp_path, "PT"), lambda: suv_from_folder(tmp_path)):
        with pytest.raises(InputError) as info:
            call()
        msg = str(info.value)
        assert msg.startswith(f"{tmp_path}: none of its 3 DICOM files has PixelData (7FE0,0010)")
        assert "DICOMDIR" in msg and "SR" in msg


def test_modality_present_only_without_pixel_data_is_named(tmp_path):
    write_series(tmp_path, modality="CT")
    write_header_only(tmp_path, "1.2.3.78", name="pet_header.dcm")
    with pytest.raises(InputError, match=r"no series with Modality \(0008,0060\) = PT; .*1 PT files without "
                                         r"PixelData \(7FE0,0010\) were skipped"):
        find_series(tmp_path, "PT")


def test_damaged_dicom_files_skipped_and_counted(tmp_path):
    write_series(tmp_path)
    good = sorted(tmp_path.glob("*.dcm"))[0].read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(good[:140])  # preamble, DICM and nothing usable
    (tmp_path / "damaged.dcm").write_bytes(good[:136] + b"AL" + good[138:])  # an unknown VR in the file meta
    ser = find_series(tmp_path, "PT")
    assert len(ser.files) == 3 and ser.info.unreadable == [tmp_path / "damaged.dcm"]
    assert [f.kind for f in ser.info.skipped] == ["empty or truncated"]
    assert any("cannot be parsed" in n and "damaged.dcm" in n for n in ser.warnings)
    only = tmp_path / "only"
    only.mkdir()
    (only / "damaged.dcm").write_bytes(good[:136] + b"AL" + good[138:])
    with pytest.raises(InputError, match=rf"{only}: none of its DICOM files can be parsed"):
        find_series(only, "PT")


def test_missing_rows_on_an_image_file_named(tmp_path):
    write_series(tmp_path)
    path = sorted(tmp_path.glob("*.dcm"))[1]
    ds = pydicom.dcmread(path)
    del ds.Rows
    ds.save_as(path)
    with pytest.raises(InputError, match=rf"{path}: Rows \(0028,0010\) is missing"):
        find_series(tmp_path, "PT")


def test_undecodable_pixel_data_one_sentence(tmp_path):
    write_series(tmp_path)
    path = sorted(tmp_path.glob("*.dcm"))[0]
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:8]
    ds.save_as(path)
    with pytest.raises(InputError) as info:
        find_series(tmp_path, "PT").rescaled_array()
    msg = str(info.value)
    assert msg.startswith(f"{path}: the PixelData (7FE0,0010) cannot be decoded") and "\n" not in msg


def test_make_slice_has_the_identity_tags():
    ds = make_slice(0, "1.2.3.9")
    assert (ds.PatientID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) == ("P1", "1.2.3.4", "1.2.3.5")
