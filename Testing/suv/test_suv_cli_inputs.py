"""SUV errors name the file and the tag; ``lnstaging suv`` checks its output before any work and turns bad DICOM
into one line on stderr (exit 1, no traceback, nothing written)."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from dicom_fixtures import write_dicomdir, write_header_only, write_non_image, write_series

from LymphNodeStagingLib.cli.main import main
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.suv.conversion import suv_from_folder

# ------------------------------------------------------------------------------------------------ SUV errors name files


def test_series_level_tag_error_names_the_first_file(tmp_path):
    folder = write_series(tmp_path, PatientWeight=None)
    first = sorted(folder.glob("*.dcm"))[0]
    with pytest.raises(InputError) as info:
        suv_from_folder(folder)
    assert str(info.value).startswith(f"{first}: PatientWeight (0010,1030)")


def test_radiopharmaceutical_error_names_the_first_file(tmp_path):
    folder = write_series(tmp_path, rp_RadionuclideTotalDose=None)
    with pytest.raises(InputError, match=rf"^{sorted(folder.glob('*.dcm'))[0]}: RadionuclideTotalDose \(0018,1074\)"):
        suv_from_folder(folder)
    with pytest.raises(InputError, match=rf"^{sorted(folder.glob('*.dcm'))[0]}: .*\(0018,1074\)"):
        suv_from_folder(folder, mode="gatidis")


def test_differing_slices_name_both_files(tmp_path):
    folder = write_series(tmp_path, per_slice=lambda k: {"PatientWeight": "71"} if k == 2 else {})
    files = sorted(folder.glob("*.dcm"))
    with pytest.raises(InputError) as info:
        suv_from_folder(folder)
    msg = str(info.value)
    assert "PatientWeight (0010,1030) differs" in msg and files[0].name in msg and f"'71' in {files[2].name}" in msg


@pytest.mark.filterwarnings("ignore:Invalid value for VR TM")
def test_unreadable_value_names_the_offending_slice(tmp_path):
    folder = write_series(tmp_path)
    bad = sorted(folder.glob("*.dcm"))[1]
    ds = pydicom.dcmread(bad)
    ds.AcquisitionTime = "256000"  # hour 25
    ds.save_as(bad)
    with pytest.raises(InputError) as info:
        suv_from_folder(folder)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: AcquisitionTime (0008,0032) = '256000' cannot be read") and "\n" not in msg


def test_missing_value_on_one_slice_names_it(tmp_path):
    folder = write_series(tmp_path, DecayCorrection="NONE", CorrectedImage=["ATTN"],
                          per_slice=lambda k: {"ActualFrameDuration": None} if k == 1 else {})
    with pytest.raises(InputError, match=r"ActualFrameDuration \(0018,1242\) on every slice \(missing in s\w+_001\.dcm\)"):
        suv_from_folder(folder)


# ------------------------------------------------------------------------------------------------ lnstaging suv


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["suv", *argv])
    err = capsys.readouterr().err
    return code, err


def _refused(code: int, err: str, *names: str | Path) -> None:
    assert code == 1, err
    assert "Traceback" not in err and "unexpected failure" not in err
    errors = [line for line in err.splitlines() if line.startswith("lnstaging suv: error: ")]
    assert len(errors) == 1, err  # one line (a log line may precede it)
    for name in names:
        assert str(name) in errors[0], err


def test_output_under_an_existing_file(tmp_path, capsys):
    pet = write_series(tmp_path / "pet")
    (tmp_path / "taken").write_text("a file")
    before = _tree(tmp_path)
    out = tmp_path / "taken" / "suv.nii.gz"
    code, err = _run(capsys, str(pet), "--out", str(out))
    _refused(code, err, out, "is a file")
    assert _tree(tmp_path) == before


def test_output_is_a_folder(tmp_path, capsys):
    pet = write_series(tmp_path / "pet")
    (tmp_path / "out").mkdir()
    before = _tree(tmp_path)
    code, err = _run(capsys, str(pet), "--out", str(tmp_path / "out"))
    _refused(code, err, tmp_path / "out", "is a folder")
    assert _tree(tmp_path) == before


def _read_only_folder(tmp_path: Path) -> Path | None:
    """A folder this process may not write in: a chmod 555 folder, or for root (whom permissions do not stop) a
    /proc folder; None when neither is available."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/proc/1"), Path("/proc/self")):
        if candidate.is_dir() and not os.access(candidate, os.W_OK):
            return candidate
    return None


def test_output_in_a_read_only_place(tmp_path, capsys):
    pet = write_series(tmp_path / "pet")
    folder = _read_only_folder(tmp_path)
    try:
        if folder is None:
            pytest.skip("no folder that this user cannot write")
        before = _tree(tmp_path)
        out = folder / "sub" / "suv.nii.gz"
        code, err = _run(capsys, str(pet), "--out", str(out))
        _refused(code, err, out, "not writable")
        assert not out.exists() and not out.parent.exists()
        assert _tree(tmp_path) == before
    finally:
        (tmp_path / "read-only").chmod(0o755)


def test_output_checked_before_the_input(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    code, err = _run(capsys, str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "taken" / "suv.nii.gz"))
    _refused(code, err, tmp_path / "taken")


def test_unknown_output_format_is_a_usage_error(tmp_path, capsys):
    pet = write_series(tmp_path / "pet")
    code, err = _run(capsys, str(pet), "--out", str(tmp_path / "suv.png"))
    assert code == 2 and "suv.png" in err and ".nii.gz" in err and "Traceback" not in err
    assert not (tmp_path / "suv.png").exists()


def test_only_files_without_pixel_data(tmp_path, capsys):
    folder = tmp_path / "dicom"
    write_dicomdir(folder)
    write_non_image(folder, "SR")
    write_header_only(folder, "1.2.3.77")
    out = tmp_path / "suv.nii.gz"
    code, err = _run(capsys, str(folder), "--out", str(out))
    _refused(code, err, folder, "PixelData (7FE0,0010)")
    assert not out.exists()


def test_another_patient_in_the_series(tmp_path, capsys):
    folder = write_series(tmp_path / "pet", n=4, per_slice=lambda k: {"PatientID": "P2"} if k == 3 else {})
    out = tmp_path / "suv.nii.gz"
    code, err = _run(capsys, str(folder), "--out", str(out))
    _refused(code, err, folder, "PatientID (0010,0020)", "'P1'", "'P2'")
    assert not out.exists()


def test_skipped_files_reported_in_the_json(tmp_path, capsys):
    folder = write_series(tmp_path / "pet")
    write_non_image(folder, "SR")
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(folder), "--out", str(out), "--json"]) == 0
    assert "1 DICOM file without PixelData (7FE0,0010) skipped (SR 1" in capsys.readouterr().out
    assert out.is_file()
