"""Image files read to their end: truncated, corrupt and NaN-holding files are refused, naming the file."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk
from preflight_images import ct_array, ct_image, cut, image, write

from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.preflight.image_files import check_complete, read_header


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_complete_files_pass_and_the_header_is_read_without_voxels(tmp_path, name):
    path = write(ct_image(), tmp_path / name, compress=not name.endswith(".nii"))
    header = read_header(path, "CT")
    assert header.size == (32, 32, 16) and header.spacing == (2.0, 2.0, 4.0) and header.voxels == 32 * 32 * 16
    check_complete(path, "CT", header)


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_a_file_cut_in_half_is_refused_naming_it(tmp_path, name):
    whole = write(ct_image(), tmp_path / name, compress=not name.endswith(".nii"))
    half = cut(whole, tmp_path / f"half-{name}")
    with pytest.raises(InputError, match="truncated") as err:
        check_complete(half, "CT")
    assert str(half) in str(err.value) and str(err.value).startswith(f"CT {half}")


def test_simpleitk_reads_a_truncated_nii_gz_as_zeros_which_is_why_the_file_is_checked(tmp_path):
    whole = write(image(ct_array((64, 64, 64))), tmp_path / "ct.nii.gz")
    half = cut(whole, tmp_path / "half.nii.gz", 0.6)
    with pytest.raises(InputError, match="gzip data ends after"):
        check_complete(half, "CT")


def test_a_damaged_gzip_stream_is_refused(tmp_path):
    noisy = ct_array((48, 64, 64)) + np.random.default_rng(0).normal(0, 20, (48, 64, 64)).astype(np.float32)
    data = bytearray(write(image(noisy), tmp_path / "ct.nii.gz").read_bytes())
    data[len(data) * 3 // 4] ^= 0xFF  # one byte in the voxel data
    bad = tmp_path / "flipped.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="corrupt|truncated") as err:
        check_complete(bad, "CT")
    assert "flipped.nii.gz" in str(err.value)


def test_gzip_of_several_members_is_read_to_the_end(tmp_path):
    raw = gzip.decompress(write(ct_image(), tmp_path / "ct.nii.gz").read_bytes())
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    check_complete(multi, "CT")


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
def test_nan_and_inf_are_counted_in_the_file_itself(tmp_path, name):
    arr = ct_array()
    arr[: 2 * arr.shape[0] // 3] = np.nan
    arr[-1, 0, :5] = np.inf
    path = write(image(arr), tmp_path / name, compress=not name.endswith(".nii"))
    if name == "ct.nii.gz":  # SimpleITK's NIfTI reader turns NaN into 0: only the file shows them
        assert not np.isnan(sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))).any()
    with pytest.raises(InputError, match="not finite") as err:
        check_complete(path, "CT")
    message = str(err.value)
    assert str(path) in message and f"{10 * 32 * 32:,} NaN" in message and "5 infinite" in message


def test_unreadable_and_wrong_files(tmp_path):
    garbage = tmp_path / "ct.nii.gz"
    garbage.write_bytes(b"\x1f\x8b this is not an image")
    with pytest.raises(InputError, match="cannot be read as an image") as err:
        read_header(garbage, "CT")
    assert str(garbage) in str(err.value) and "sitk::ERROR" not in str(err.value) and ".cxx" not in str(err.value)
    with pytest.raises(InputError, match="unknown image format"):
        read_header(tmp_path / "ct.txt" if (tmp_path / "ct.txt").write_text("x") else None, "CT")
    with pytest.raises(InputError, match="file not found"):
        read_header(tmp_path / "missing.nii.gz", "CT")
    vector = sitk.Compose([ct_image(), ct_image()])
    with pytest.raises(InputError, match="3D scalar"):
        read_header(write(vector, tmp_path / "vector.nrrd"), "CT")
