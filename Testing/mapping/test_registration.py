"""Registration engine: transforms, velocity fields and recovery of a known deformation on synthetic shapes."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from mapping_shapes import body, dice, smooth_warp

from LymphNodeStagingLib.mapping import registration as R


def test_fit_similarity_recovers_known_transform():
    rng = np.random.default_rng(1)
    src = rng.normal(0, 50, (12, 3))
    angle = 0.2
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    dst = 1.1 * src @ rot.T + np.array([5.0, -3.0, 12.0])
    m = R.fit_similarity(src, dst)
    assert np.allclose(src @ m[:3, :3].T + m[:3, 3], dst, atol=1e-6)


def test_exp_velocity_zero_and_inverse():
    assert torch.equal(R.exp_velocity(torch.zeros(1, 3, 5, 6, 7), 4), torch.zeros(1, 3, 5, 6, 7))
    g = torch.Generator().manual_seed(0)
    v = R.gaussian_smooth(torch.randn(1, 3, 16, 16, 16, generator=g) * 0.05, 2.0)
    fwd, inv = R.exp_velocity(v, 6), R.exp_velocity(-v, 6)
    ident = R.identity_grid((16, 16, 16), "cpu")
    # exp(v) o exp(-v) = id: u_f(x + u_i(x)) + u_i(x) = 0
    comp = torch.nn.functional.grid_sample(fwd, ident + inv.permute(0, 2, 3, 4, 1), align_corners=True,
                                           padding_mode="border") + inv
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    assert comp[inner].abs().max() < 0.1 * v.abs().max()


def test_geometry_pooled_and_box_grid():
    img = sitk.Image(10, 8, 6, sitk.sitkUInt8)
    img.SetSpacing((1.0, 1.0, 3.0))
    img.SetOrigin((5.0, 0.0, -2.0))
    g = R.Geometry.of(img).pooled((2, 2, 1))
    assert g.shape == (5, 4, 6) and np.allclose(g.origin, (5.5, 0.5, -2.0)) and np.allclose(g.spacing, (2, 2, 3))
    box = R.Box(np.zeros(3), np.array([100.0, 50.0, 30.0]), np.eye(3))
    grid = box.grid(10.0)
    assert grid.shape == (11, 6, 4)
    corner = box.norm_to_world() @ np.array([1, 1, 1, 1.0])
    assert np.allclose(corner[:3], (100, 50, 30))


def test_prepare_anatomy_rejects_empty_labels():
    with pytest.raises(R.InputError, match="none of the registration structures"):
        R.prepare_anatomy(sitk.Image(8, 8, 8, sitk.sitkUInt8), R.RegistrationConfig())


def _station_corners(stations: sitk.Image) -> np.ndarray:
    g = R.Geometry.of(stations)
    lo, hi = R.bbox_of(sitk.GetArrayViewFromImage(stations) > 0)
    idx = np.array([[x, y, z] for x in (lo[0], hi[0] - 1) for y in (lo[1], hi[1] - 1) for z in (lo[2], hi[2] - 1)])
    return idx @ (g.direction @ np.diag(g.spacing)).T + g.origin


def test_batched_registration_recovers_known_deformation():
    cfg = R.RegistrationConfig(threads=1, iterations=(40, 30), affine_iterations=40)
    atlases = [body(smooth_warp(5, 1.0, (0, 0, 0), seed=1)), body(smooth_warp(5, 1.06, (6, -4, 8), seed=2))]
    patient_anat, patient_st = body(smooth_warp(7, 0.97, (3, 2, -4), seed=9))
    res = R.register(R.prepare_anatomy(patient_anat, cfg), [R.prepare_anatomy(a, cfg) for a, _ in atlases],
                     [_station_corners(s) for _, s in atlases], cfg)
    target = R.Geometry.of(patient_st)
    warped = res.warp([sitk.GetArrayFromImage(s) for _, s in atlases], [R.Geometry.of(s) for _, s in atlases],
                      target)
    truth = sitk.GetArrayFromImage(patient_st)
    assert warped.shape == (2, *truth.shape)
    for i, (_, st) in enumerate(atlases):
        before = np.mean([dice(sitk.GetArrayFromImage(st) == lab, truth == lab) for lab in (5, 7, 8, 9, 11)])
        after = np.mean([dice(warped[i] == lab, truth == lab) for lab in (5, 7, 8, 9, 11)])
        assert after > 0.8 and after > before + 0.3, (i, before, after)
    assert np.isfinite(res.channel_loss[res.weights > 0]).all()
    assert set(res.timings) == {"initialisation", "affine", "deformable"}


def test_gaussian_smooth_matches_padded_convolution():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 9, 7, 11, generator=g)
    sigma = 1.2
    r = int(np.ceil(2.5 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float64) / sigma) ** 2)
    k = (k / k.sum()).float()
    ref = x.reshape(1, 6, 9, 7, 11)
    for axis in range(3):  # z, y, x with replicate borders
        shape = [1, 1, 1]
        shape[axis] = 2 * r + 1
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
        ref = torch.nn.functional.conv3d(torch.nn.functional.pad(ref, pad, mode="replicate"),
                                         k.view(1, 1, *shape).expand(6, 1, *shape), groups=6)
    assert torch.allclose(R.gaussian_smooth(x, sigma), ref.reshape(x.shape), atol=1e-5)
    assert torch.allclose(R.gaussian_smooth(torch.full((1, 1, 4, 5, 6), 2.5), 3.0), torch.tensor(2.5))


def test_occupancy_is_the_block_mean_of_each_channel():
    rng = np.random.default_rng(5)
    labels = rng.choice([0, 16, 15, 52, 99], size=(7, 9, 10)).astype(np.uint8)  # 99: not a channel
    img = sitk.GetImageFromArray(labels)
    img.SetSpacing((2.0, 2.0, 3.0))
    structures = (R.Structure("trachea", (16,)), R.Structure("other", (15, 52)))
    lut = R.structure_lut(structures)
    occ, geom = R.occupancy(labels, R.Geometry.of(img), lut, 2, 6.0)  # blocks of 3 x 3 x 2 voxels
    assert occ.shape == (2, 3, 3, 3) and geom.shape == (3, 3, 3)
    for c, ids in enumerate(((16,), (15, 52))):
        mask = np.isin(labels[:6, :9, :9], ids).astype(np.float32)
        ref = mask.reshape(3, 2, 3, 3, 3, 3).mean(axis=(1, 3, 5))
        assert np.allclose(occ[c], ref)


def test_aligned_nearest_warp_matches_the_general_path():
    cfg = R.RegistrationConfig(threads=1, iterations=(6, 4), affine_iterations=8)
    atlas_anat, atlas_st = body(smooth_warp(5, 1.0, (0, 0, 0), seed=1))
    patient_anat, patient_st = body(smooth_warp(7, 0.97, (3, 2, -4), seed=9))
    res = R.register(R.prepare_anatomy(patient_anat, cfg), [R.prepare_anatomy(atlas_anat, cfg)],
                     [_station_corners(atlas_st)], cfg)
    target = R.Geometry.of(patient_st)
    vol, geom = [sitk.GetArrayFromImage(atlas_st)], [R.Geometry.of(atlas_st)]
    fast = res.warp(vol, geom, target)
    tilted = R.Geometry(target.origin, target.spacing, target.direction + 1e-7, target.shape)  # general path
    slow = res.warp(vol, geom, tilted)
    assert fast.shape == slow.shape and (fast > 0).any()
    assert np.mean(fast != slow) < 1e-3  # rounding at label borders only
