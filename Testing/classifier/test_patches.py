"""Patch extraction geometry, normalisation and centre sampling (real SimpleITK images)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.classifier.patches import (
    StationSampler,
    crop_to_box,
    extract_patches,
    patch_reference,
    resample_patch,
)
from LymphNodeStagingLib.errors import InputError, LNSError

COEF = np.array([1.5, -2.0, 0.7])


def _linear_image(direction: np.ndarray, spacing=(1.3, 0.9, 2.5), size=(50, 60, 30), origin=(-30.0, -25.0, -40.0)):
    """An image whose value is COEF . p + 5 at every physical point p (exact under linear interpolation)."""
    img = sitk.Image(list(size), sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction.ravel().tolist())
    k, j, i = np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij")
    ijk = np.stack([i, j, k], -1).astype(np.float64)
    phys = np.asarray(origin) + ijk @ (direction * np.asarray(spacing)).T
    arr = (phys @ COEF + 5.0).astype(np.float32)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _rotation_z(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.mark.parametrize("size", [16, 17])
def test_reference_centre_voxel_is_the_point(size):
    c = np.array([12.3, -4.5, 101.25])
    ref = patch_reference(c, size=size, spacing=1.0)
    np.testing.assert_allclose(ref.TransformIndexToPhysicalPoint([size // 2] * 3), c, atol=1e-9)


@pytest.mark.parametrize("direction", [np.eye(3), _rotation_z(30.0) @ np.diag([1.0, -1.0, 1.0])])
def test_centre_voxel_of_patch_is_requested_point(direction):
    img = _linear_image(direction)
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([24.3, 31.7, 14.2]))
    patch = resample_patch(img, centre, size=16, spacing=1.0)
    assert patch.shape == (16, 16, 16)
    assert patch[8, 8, 8] == pytest.approx(centre @ COEF + 5.0, abs=1e-3)
    # array axes are (z, y, x) along the patient's LPS axes at 1 mm
    assert patch[8, 8, 9] - patch[8, 8, 8] == pytest.approx(COEF[0], abs=1e-3)
    assert patch[8, 9, 8] - patch[8, 8, 8] == pytest.approx(COEF[1], abs=1e-3)
    assert patch[9, 8, 8] - patch[8, 8, 8] == pytest.approx(COEF[2], abs=1e-3)


def test_extract_patches_normalisation_and_outside_values():
    ct = sitk.Image([20, 20, 10], sitk.sitkInt16) + 100  # 100 HU -> 0.5
    ct.SetSpacing([2.0, 2.0, 3.0])
    pet = sitk.Image([10, 10, 8], sitk.sitkFloat32) + 10.0  # SUV 10 -> 2.5 (not clipped)
    pet.SetSpacing([4.0, 4.0, 4.0])
    centres = np.array([[19.0, 19.0, 13.5], [500.0, 0.0, 0.0]])
    p = extract_patches(ct, pet, centres, size=8, spacing=1.0)
    assert p.shape == (2, 2, 8, 8, 8) and p.dtype == np.float32
    np.testing.assert_allclose(p[0, 0], 0.5, atol=1e-6)
    np.testing.assert_allclose(p[0, 1], 2.5, atol=1e-6)
    np.testing.assert_allclose(p[1], 0.0)  # outside: air (clipped to 0) and SUV 0


def test_pet_on_other_grid_is_centred_on_the_same_point():
    ct = sitk.Image([40, 40, 20], sitk.sitkFloat32)
    ct.SetSpacing([1.5, 1.5, 3.0])
    pet_arr = np.zeros((30, 30, 30), np.float32)
    pet_arr[14, 17, 12] = 8.0  # (z, y, x)
    pet = sitk.GetImageFromArray(pet_arr)
    pet.SetSpacing([2.0, 2.0, 2.0])
    pet.SetOrigin([-3.0, 1.0, 2.0])
    point = np.asarray(pet.TransformIndexToPhysicalPoint([12, 17, 14]))
    p = extract_patches(ct, pet, point[None], size=9, spacing=1.0)
    assert np.unravel_index(np.argmax(p[0, 1]), p[0, 1].shape) == (4, 4, 4)
    assert p[0, 1, 4, 4, 4] == pytest.approx(2.0)


def test_bad_inputs_raise_lns_errors():
    ct = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    with pytest.raises(InputError, match="centres_mm"):
        extract_patches(ct, ct, np.zeros((2, 2)), size=4)
    with pytest.raises(InputError, match="3D scalar"):
        extract_patches(sitk.Image([8, 8], sitk.sitkFloat32), ct, np.zeros((1, 3)), size=4)
    with pytest.raises(LNSError, match="finite"):
        patch_reference([np.nan, 0, 0], 4)
    bad = sitk.Image([4, 4, 4], sitk.sitkUInt8) + 30
    with pytest.raises(InputError, match="0..17"):
        StationSampler.from_label_map(bad)


def _station_map():
    arr = np.zeros((12, 30, 30), np.uint8)
    arr[2:8, 5:15, 4:12] = 8  # 4R, index 7
    arr[4:10, 18:26, 18:28] = 11  # 7, index 10
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing([1.2, 1.2, 2.5])
    img.SetOrigin([-10.0, 5.0, 20.0])
    img.SetDirection(_rotation_z(15.0).ravel().tolist())
    return img, arr


def test_sampler_presence_centroid_and_samples_inside_station():
    img, arr = _station_map()
    s = StationSampler.from_label_map(img)
    assert np.flatnonzero(s.present).tolist() == [7, 10]
    zyx = np.argwhere(arr == 8)
    expected = np.mean([img.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]) for z, y, x in zyx], axis=0)
    np.testing.assert_allclose(s.centroid(7), expected, atol=1e-6)
    assert s.centroid(0) is None and np.isnan(s.centroids()[0]).all()
    pts = s.sample(7, 300, np.random.default_rng(0))
    labels = [arr[tuple(img.TransformPhysicalPointToIndex(p.tolist())[::-1])] for p in pts]
    assert set(labels) == {8}
    # weighted towards the centroid compared with uniform in-mask points
    uniform = np.array([img.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]) for z, y, x in zyx])
    assert np.linalg.norm(pts - s.centroid(7), axis=1).mean() < np.linalg.norm(uniform - s.centroid(7), axis=1).mean()
    np.testing.assert_array_equal(pts, s.sample(7, 300, np.random.default_rng(0)))
    with pytest.raises(InputError, match="absent"):
        s.sample(0, 1, np.random.default_rng(0))


def test_sampler_from_weight_maps_and_centres():
    img, arr = _station_map()
    w = sitk.Cast(img == 11, sitk.sitkFloat32)
    s = StationSampler.from_weight_maps({10: w, 3: None})
    assert np.flatnonzero(s.present).tolist() == [10]
    f = StationSampler.from_centres({2: [1.0, 2.0, 3.0]})
    np.testing.assert_allclose(f.sample(2, 3, np.random.default_rng(1)), [[1.0, 2.0, 3.0]] * 3)


def test_patch_from_crop_equals_patch_from_full_image():
    img = _linear_image(np.eye(3))
    c = np.array([0.0, 0.0, -10.0])
    crop = crop_to_box(img, c - 12, c + 12)
    assert crop.GetSize() < img.GetSize()
    np.testing.assert_allclose(resample_patch(crop, c, 16), resample_patch(img, c, 16), atol=1e-5)


def test_sampler_from_the_station_mappings_sparse_weight_maps():
    from LymphNodeStagingLib.mapping.registration import Geometry
    from LymphNodeStagingLib.mapping.weightmap import station_weight_maps

    img, arr = _station_map()
    maps = station_weight_maps(arr, Geometry.of(img))
    s = StationSampler.from_sparse_maps(maps)
    assert np.flatnonzero(s.present).tolist() == [7, 10]
    np.testing.assert_allclose(s.centroid(7), maps["4R"].centre_mm)
    pts = s.sample(10, 100, np.random.default_rng(0))
    labels = {int(arr[tuple(img.TransformPhysicalPointToIndex(p.tolist())[::-1])]) for p in pts}
    assert labels == {11}
    with pytest.raises(InputError, match="positive sum"):
        StationSampler.from_points({3: (np.zeros((2, 3)), np.zeros(2), np.zeros(3), None)})
