"""Grid bounds and plausible values: spacing, size, finite, constant, CT in HU, PET in SUV; and the memory estimate."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from preflight_images import ct_array, ct_image, image, pet_array, pet_image, write

from LymphNodeStagingLib.errors import InputError, UsageError
from LymphNodeStagingLib.preflight import image_values as iv
from LymphNodeStagingLib.preflight.case import check_case
from LymphNodeStagingLib.preflight.memory import (
    BASE_MB,
    MemoryEstimate,
    check_memory,
    estimate_memory,
    registration_box_mm,
)


def case_files(tmp_path, ct: sitk.Image | None = None, pet: sitk.Image | None = None):
    return (write(ct if ct is not None else ct_image(), tmp_path / "ct.nii.gz"),
            write(pet if pet is not None else pet_image(), tmp_path / "pet.nii.gz"))


def refused(tmp_path, match: str, name: str = "ct.nii.gz", **images) -> str:
    ct, pet = case_files(tmp_path, **images)
    with pytest.raises(InputError, match=match) as err:
        check_case(ct, pet, pet_is_suv=True, mapping=False)
    message = str(err.value)
    assert str(tmp_path / name) in message, message
    return message


def test_a_plausible_case_passes_and_comes_back_loaded(tmp_path):
    ct, pet = case_files(tmp_path)
    checked = check_case(ct, pet, pet_is_suv=True, atlases=tmp_path / "no-atlas-set")
    assert checked.ct.GetPixelID() == sitk.sitkFloat32 and checked.pet.GetPixelID() == sitk.sitkFloat32
    assert checked.ct.GetSize() == (32, 32, 16) and checked.suv["mode"] == "user"
    assert checked.memory is not None and not checked.memory.over
    assert any("atlas set not readable" in n for n in checked.memory.notes), checked.memory.notes


@pytest.mark.parametrize("spacing", [50.0, 0.01])
def test_spacing_outside_0_3_to_10_mm_is_refused(tmp_path, spacing):
    message = refused(tmp_path, "spacing", ct=ct_image(spacing=(spacing, spacing, spacing)))
    assert f"{spacing:g} mm" in message and "0.3..10 mm" in message


def test_size_bounds(tmp_path):
    message = refused(tmp_path, "size", ct=image(ct_array((1, 32, 32))))
    assert "z 1" in message and "2..2048" in message
    with pytest.raises(InputError, match="size x 3000"):
        iv.check_grid((3000, 512, 100), (0.5, 0.5, 1.0), "CT x")


def test_nan_and_inf_in_an_image_in_memory(tmp_path):
    arr = ct_array()
    arr[:10] = np.nan
    arr[-1, 0, 0] = -np.inf
    with pytest.raises(InputError, match="not finite") as err:
        iv.check_ct_values(image(arr), "CT volume")
    assert f"{10 * 32 * 32:,} NaN, 1 infinite" in str(err.value)
    message = refused(tmp_path, "not finite", ct=image(arr))  # and in the file, before SimpleITK reads it
    assert "NaN" in message


def test_a_constant_image_is_refused(tmp_path):
    refused(tmp_path, "every voxel holds the same value", ct=image(np.zeros((16, 32, 32), np.float32)))
    refused(tmp_path, "every voxel holds the same value", name="pet.nii.gz",
            pet=image(np.zeros((8, 16, 16), np.float32), spacing=(4.0, 4.0, 8.0)))


def test_a_ct_not_in_hu_is_refused_with_the_reason(tmp_path):
    stored = sitk.Cast(image(ct_array() + 1024.0), sitk.sitkUInt16)  # 0..4095 stored values, no rescale
    message = refused(tmp_path, "are air", ct=stored)
    assert "without the rescale to HU" in message and "values 24..1724" in message
    scaled = image(ct_array() * 10.0)  # HU x 10: air and lungs below -1100, more than half the image
    assert "padding outside the reconstruction circle" in refused(tmp_path, "below -1100 HU", ct=scaled)
    dense = ct_array()
    dense[:, 10:22, 10:22] = 5000.0  # 14 % of the voxels above 4000 HU
    assert "within -1100..4000 HU" in refused(tmp_path, "only 85", ct=image(dense))
    pet_as_ct = image(pet_array((16, 32, 32)))
    assert "air around the body" in refused(tmp_path, "are air", ct=pet_as_ct)


def test_padding_outside_the_reconstruction_circle_is_not_counted():
    arr = ct_array()
    arr[:, :, :9] = -3024.0  # 28 % of the voxels: the padding value, below -1100 HU
    arr[:, :, 9] = -2000.0  # and a ring of other values below -1100 HU (e.g. after resampling)
    iv.check_ct_values(image(arr), "CT")


def test_negative_pet_beyond_noise_is_refused_small_negatives_are_allowed(tmp_path):
    arr = pet_array()
    noisy = arr.copy()
    noisy.flat[:2] = -0.7  # 2 of 2048 voxels below -0.5: 0.1 %, reconstruction noise
    noisy.flat[2:200] = -0.3  # above -0.5: allowed in any number
    iv.check_pet_values(image(noisy), "PET")
    message = refused(tmp_path, "below -0.5 SUV", name="pet.nii.gz",
                      pet=image(arr - 9.65, spacing=(4.0, 4.0, 8.0)))
    assert "2,048 of 2,048 voxels" in message and "at most 0.1%" in message


def test_a_pet_in_bq_per_ml_declared_suv_is_refused(tmp_path):
    message = refused(tmp_path, "activity concentration", name="pet.nii.gz",
                      pet=image(pet_array() * 5000.0, spacing=(4.0, 4.0, 8.0)))
    assert "99th percentile at most 100" in message


# ----------------------------------------------------------------------------------------------- memory


def test_memory_estimate_over_the_limit_is_refused_before_any_voxel_is_read(tmp_path, monkeypatch):
    ct, pet = case_files(tmp_path)
    monkeypatch.setenv("LNSTAGING_MAX_MEMORY_GB", "0.25")
    read = []
    monkeypatch.setattr("LymphNodeStagingLib.preflight.case.load_case", lambda *a, **k: read.append(1))
    with pytest.raises(InputError, match="more than the limit of 0.25 GB") as err:
        check_case(ct, pet, pet_is_suv=True)
    message = str(err.value)
    assert str(ct) in message and "LNSTAGING_MAX_MEMORY_GB" in message and "32 x 32 x 16 voxels" in message
    assert "base" in message and "registration" in message and not read
    monkeypatch.setenv("LNSTAGING_MAX_MEMORY_GB", "lots")
    with pytest.raises(UsageError, match="LNSTAGING_MAX_MEMORY_GB"):
        check_case(ct, pet, pet_is_suv=True)


def test_memory_estimate_of_a_full_size_case():
    """The full-size phantom's grids with the synthetic demo atlas set (5 atlases of its size): 1.83 GB measured."""
    ct = image(np.zeros((122, 320, 384), np.int16), spacing=(1.0, 1.0, 3.0))
    pet = image(np.zeros((93, 81, 97), np.float32), spacing=(4.0, 4.0, 4.0))
    labels = np.zeros((122, 320, 384), np.uint8)
    labels[5:110, 50:264, 100:288] = 10  # a lung: the registration box 188 x 214 x 315 mm (+ 10 mm each side)
    est = estimate_memory(ct, pet, anatomy=image(labels, spacing=(1.0, 1.0, 3.0)),
                          atlas_count_voxels=(5, 5 * 384 * 320 * 122), limit_gb=16)
    assert 1.7 < est.total_gb < 2.2 and not est.over
    assert est.parts_mb["base"] == BASE_MB and set(est.parts_mb) == {"base", "CT", "PET", "atlases", "registration"}
    assert np.allclose(registration_box_mm(type("G", (), {"extent_mm": np.array([900.0, 900, 900])})()), 450.0)
    # the same grids with 50 mm voxels: the registration alone would need terabytes
    huge = estimate_memory(image(np.zeros((122, 320, 384), np.int16), spacing=(50.0, 50.0, 50.0)),
                           anatomy=image(labels, spacing=(50.0, 50.0, 50.0)), atlas_count_voxels=(5, 10**8),
                           limit_gb=16)
    assert huge.over and huge.parts_mb["registration"] > 1e6
    with pytest.raises(InputError, match="about"):
        check_memory(huge, "CT x")
    assert MemoryEstimate({"base": 2048.0}, 1.0).describe() == "about 2.0 GB (base 2.0 GB)"
