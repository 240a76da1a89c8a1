"""Node instances of LymphNodeStagingLib.nodes.instances: measurements on a rotated ellipsoid, SUV, stations, geometry."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeStagingLib.errors import InputError, UsageError
from LymphNodeStagingLib.nodes.instances import find_nodes, measure_axes, measure_label_axes, pixel_length
from LymphNodeStagingLib.suv.statistics import SUVPEAK_RADIUS_MM

SPACING = (0.7, 0.7, 2.0)
ORIGIN = (-20.0, -20.0, -14.0)
SIZE = (58, 58, 15)  # x, y, z
CENTRE = (0.15, -0.2, 0.0)  # on a slice centre in z
A, B, C = 8.0, 5.0, 8.0  # semi-axes in mm: x', y' (in-plane, rotated by 30 degrees), z
ANGLE = math.radians(30.0)
DIAG = math.hypot(SPACING[0], SPACING[1])


def image(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=None) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def physical_grid(size, spacing, origin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical x, y, z of every voxel of an identity-direction grid, as (z, y, x) arrays."""
    z, y, x = np.meshgrid(*[o + s * np.arange(n) for n, s, o in zip(size[::-1], spacing[::-1], origin[::-1],
                                                                   strict=True)], indexing="ij")
    return x, y, z


def ellipsoid_r2(x, y, z) -> np.ndarray:
    dx, dy, dz = x - CENTRE[0], y - CENTRE[1], z - CENTRE[2]
    u = dx * math.cos(ANGLE) + dy * math.sin(ANGLE)
    v = -dx * math.sin(ANGLE) + dy * math.cos(ANGLE)
    return (u / A) ** 2 + (v / B) ** 2 + (dz / C) ** 2


@pytest.fixture(scope="module")
def scene():
    x, y, z = physical_grid(SIZE, SPACING, ORIGIN)
    r2 = ellipsoid_r2(x, y, z)
    prob = np.where(r2 <= 1.0, 0.6 + 0.3 * (1.0 - r2), 0.2).astype(np.float32)
    ct = image(np.full((20, 50, 50), 40.0, np.float32), spacing=(1.0, 1.0, 2.0), origin=(-25.0, -25.0, -20.0))
    px, _, _ = physical_grid((30, 30, 20), (2.0, 2.0, 2.0), (-30.0, -30.0, -20.0))
    pet = image((1.0 + 0.1 * px).astype(np.float32), spacing=(2.0, 2.0, 2.0), origin=(-30.0, -30.0, -20.0))
    sx, _, _ = physical_grid((30, 30, 20), (1.5, 1.5, 1.5), (-22.0, -22.0, -15.0))
    smap = np.where(sx < CENTRE[0] + 2.0, 8, 7).astype(np.uint8)  # 4R (label 8) covers the larger part
    stations = image(smap, spacing=(1.5, 1.5, 1.5), origin=(-22.0, -22.0, -15.0))
    labels, nodes = find_nodes(image(prob), ct, pet=pet, stations=stations)
    return r2, labels, nodes


def test_ellipsoid_measurements(scene):
    r2, labels, nodes = scene
    assert len(nodes) == 1
    node = nodes[0]
    assert node.id == 1 and labels.GetPixelID() == sitk.sitkUInt16
    assert labels.GetSpacing() == pytest.approx(SPACING) and labels.GetOrigin() == pytest.approx(ORIGIN)
    mask = sitk.GetArrayFromImage(labels) == 1
    assert np.array_equal(mask, r2 <= 1.0) and node.voxels == int(mask.sum())
    assert abs(node.short_axis_mm - 2 * B) <= DIAG
    assert abs(node.long_axis_mm - 2 * A) <= DIAG
    assert node.volume_ml == pytest.approx(4.0 / 3.0 * math.pi * A * B * C / 1000.0, rel=0.05)
    assert np.allclose(node.centre_mm, CENTRE, atol=0.15)
    assert node.mean_hu == pytest.approx(40.0, abs=1e-3)
    assert node.score == pytest.approx(float(np.float32(0.6 + 0.3 * (1.0 - r2.min()))), abs=1e-6)
    assert node.station == "4R"
    json.dumps(node.to_dict(), allow_nan=False)


def test_suv_of_a_linear_pet(scene):
    r2, _, nodes = scene
    node = nodes[0]
    x, y, z = physical_grid(SIZE, SPACING, ORIGIN)
    inside = r2 <= 1.0
    suv = 1.0 + 0.1 * x[inside]
    assert node.suv_max == pytest.approx(suv.max(), abs=1e-4)
    assert node.suv_mean == pytest.approx(suv.mean(), abs=1e-4)
    # SUVpeak by brute force: the best sphere centred on a node voxel, averaged over its voxels inside the node.
    pts = np.stack([x[inside], y[inside], z[inside]], axis=1)
    d2 = ((pts[:, None, :] - pts[None, :, :]) ** 2).sum(axis=-1)
    near = d2 <= SUVPEAK_RADIUS_MM**2
    peak = float(((near @ suv) / near.sum(axis=1)).max())
    assert node.suv_peak == pytest.approx(peak, abs=1e-3)
    assert node.suv_mean <= node.suv_peak <= node.suv_max


def test_measure_axes_anisotropic_ellipse():
    sx, sy = 0.5, 1.0
    yy, xx = np.mgrid[:40, :80]
    dx, dy = xx * sx - 20.1, yy * sy - 19.7
    th = math.radians(60.0)
    u = dx * math.cos(th) + dy * math.sin(th)
    v = -dx * math.sin(th) + dy * math.cos(th)
    short, long_ = measure_axes((u / 12.0) ** 2 + (v / 4.0) ** 2 <= 1.0, (sx, sy))
    assert abs(short - 8.0) <= math.hypot(sx, sy) and abs(long_ - 24.0) <= math.hypot(sx, sy)
    assert measure_axes(np.zeros((5, 5)), (1.0, 1.0)) == (0.0, 0.0)
    axes = measure_label_axes((((u / 12.0) ** 2 + (v / 4.0) ** 2 <= 1.0) * 3)[None].astype(np.int32), (sx, sy, 1.0))
    assert list(axes) == [3] and axes[3] == pytest.approx((short, long_))
    with pytest.raises(InputError, match="spacing_xy"):
        measure_axes(np.ones((3, 3)), (1.0, -1.0))


def test_one_pixel_wide_components_measure_at_least_one_pixel():
    """A component one pixel wide on its slice (cut tight, as find_nodes cuts it) measures one pixel across, never
    about 0 mm; along a diagonal a pixel is longer than along x or y."""
    sx, sy = 0.8, 1.5
    assert measure_axes(np.ones((1, 1)), (sx, sy)) == pytest.approx((sx, sy))
    short, long_ = measure_axes(np.ones((1, 6)), (sx, sy))  # a row: 6 pixels along x, one pixel (1.5 mm) across
    assert long_ == pytest.approx(6 * sx) and sy <= short <= sy + sy / 8 + 1e-9
    short, long_ = measure_axes(np.ones((6, 1)), (sx, sy))  # a column: one pixel (0.8 mm) across
    assert long_ == pytest.approx(6 * sy) and sx <= short <= sx + sx / 8 + 1e-9
    for mask in (np.eye(5), np.fliplr(np.eye(5))):  # a diagonal line of single pixels
        short, long_ = measure_axes(mask, (1.0, 1.0))
        assert long_ == pytest.approx(math.hypot(5, 5), abs=1.0) and 1.0 <= short <= math.sqrt(2) + 1e-9
    assert pixel_length((1.0, 0.0), (sx, sy)) == sx and pixel_length((0.0, -1.0), (sx, sy)) == sy
    assert pixel_length((math.sqrt(0.5), math.sqrt(0.5)), (1.0, 1.0)) == pytest.approx(math.sqrt(2))
    # through find_nodes: a thin 3D sliver (one voxel wide in y on every slice)
    prob = np.zeros((3, 8, 10), np.float32)
    prob[:, 4, 2:8] = 0.9
    img = image(prob, spacing=(sx, sy, 2.0), origin=(0.0, 0.0, 0.0))
    _, nodes = find_nodes(img, image(np.zeros_like(prob), spacing=(sx, sy, 2.0), origin=(0.0, 0.0, 0.0)))
    assert len(nodes) == 1 and nodes[0].short_axis_mm >= sy and nodes[0].long_axis_mm == pytest.approx(6 * sx)


def test_flipped_direction_centre_order_and_filter():
    prob = np.zeros((8, 16, 20), np.float32)
    prob[3:5, 5:9, 10:14] = 0.7  # 32 voxels of 2 mm^3
    prob[1:2, 12:14, 2:4] = 0.95  # 4 voxels: the higher score
    geometry = {"spacing": (1.0, 1.0, 2.0), "origin": (100.0, -50.0, 20.0), "direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)}
    p = image(prob, **geometry)
    ct = image(np.zeros(prob.shape, np.float32), **geometry)
    labels, nodes = find_nodes(p, ct)
    assert [n.score for n in nodes] == pytest.approx([0.95, 0.7])
    arr = sitk.GetArrayFromImage(labels)
    assert np.all(arr[1, 12:14, 2:4] == 1) and np.all(arr[3:5, 5:9, 10:14] == 2)
    assert labels.GetDirection() == pytest.approx(geometry["direction"])
    # centroid index (x, y, z) = (11.5, 6.5, 3.5); x runs towards -x
    assert nodes[1].centre_mm == pytest.approx((100.0 - 11.5, -50.0 + 6.5, 20.0 + 2.0 * 3.5))
    assert nodes[1].volume_ml == pytest.approx(32 * 2.0 / 1000.0)
    assert nodes[0].suv_max is None and nodes[0].station is None
    labels, nodes = find_nodes(p, ct, min_volume_ml=0.01)
    assert len(nodes) == 1 and nodes[0].voxels == 32 and sitk.GetArrayFromImage(labels).max() == 1


def test_station_ties_and_outside():
    prob = np.zeros((6, 10, 10), np.float32)
    prob[2:4, 3:7, 3:7] = 0.8
    prob[2:4, 0:2, 8:10] = 0.6  # a second node outside every station
    smap = np.zeros(prob.shape, np.uint8)
    smap[:, 2:8, 2:5] = 8  # 4R on two of the node's four columns
    smap[:, 2:8, 5:8] = 7  # 4L on the other two: a tie, the smaller label (4L) wins
    p = image(prob, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0))
    _, nodes = find_nodes(p, p, stations=image(smap, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)))
    assert [n.station for n in nodes] == ["4L", None]


def test_bad_inputs():
    prob = np.zeros((6, 10, 10), np.float32)
    p = image(prob)
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="prob.*NaN"):
        find_nodes(image(bad), p)
    with pytest.raises(InputError, match="prob must be a 3D"):
        find_nodes(sitk.Image(5, 5, sitk.sitkFloat32), p)
    with pytest.raises(InputError, match="ct does not overlap"):
        find_nodes(p, image(prob, origin=(500.0, 0.0, 0.0)))
    with pytest.raises(InputError, match="stations must hold labels"):
        find_nodes(p, p, stations=image(np.full(prob.shape, 30, np.uint8)))
    with pytest.raises(UsageError, match="threshold"):
        find_nodes(p, p, threshold=1.5)
