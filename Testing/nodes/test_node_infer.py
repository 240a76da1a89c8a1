"""Node inference: the probability map lies on the CT grid (0 outside the crop); instances with station and SUV from a
network with fixed weights on a synthetic CT; sliding windows blend to the single-window result."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeStagingLib.cohort.table import read_cohort
from LymphNodeStagingLib.errors import InputError
from LymphNodeStagingLib.nodes.data import NodeDataConfig, node_crop
from LymphNodeStagingLib.nodes.infer import detect_nodes, predict_unet, segment, segment_nodes
from LymphNodeStagingLib.nodes.instances import find_nodes
from LymphNodeStagingLib.nodes.model import InferenceConfig, NodeModel, NodeModelConfig, build_node_network
from LymphNodeStagingLib.nodes.networks import UNet3DConfig
from LymphNodeStagingLib.staging.stations import STATION_NAMES

SPACING = (1.0, 1.0, 2.0)
ORIGIN = (-40.0, -30.0, -300.0)
#: Two spheres of soft tissue (100 HU) in fat (-100 HU): centre (x, y, z) in mm, radius in mm, SUV, station label.
SPHERES = (((-15.0, 0.0, -270.0), 6.0, 5.0, 8), ((15.0, 2.0, -262.0), 4.0, 2.0, 7))


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


@pytest.fixture(scope="module")
def scene():
    """A synthetic CT (64 x 56 x 30 voxels), PET (SUV), station map (4R right, 4L left of x = 0)."""
    size = (64, 56, 30)
    zz, yy, xx = np.meshgrid(*[ORIGIN[a] + np.arange(size[a]) * SPACING[a] for a in (2, 1, 0)], indexing="ij")
    ct = np.full(xx.shape, -100.0, np.float32)
    pet = np.ones(xx.shape, np.float32)
    stations = np.zeros(xx.shape, np.uint8)
    stations[:, 8:48, 8:32] = 8  # 4R (patient right: low x)
    stations[:, 8:48, 32:56] = 7  # 4L
    for (cx, cy, cz), r, suv, _ in SPHERES:
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 + (zz - cz) ** 2 <= r ** 2
        ct[inside], pet[inside] = 100.0, suv
    return _image(ct), _image(pet), _image(stations)


def brightness_model(data: NodeDataConfig | None = None, window=(32, 96, 96)) -> NodeModel:
    """A one-level U-Net with fixed weights: the residual block passes its input through (zero convolutions, identity
    shortcut) and the 1x1x1 head maps the windowed CT x to the logit 40 (x - 0.5): soft tissue above 40 HU is a
    node. A real network of the library, nothing replaced."""
    config = NodeModelConfig("unet3d", UNet3DConfig(levels=1, channels=(1,)))
    network = build_node_network(config)
    with torch.no_grad():
        for p in network.parameters():
            p.zero_()
        network.head.weight.fill_(40.0)
        network.head.bias.fill_(-20.0)
    network.eval()
    return NodeModel(network, config, data or NodeDataConfig(spacing=SPACING, min_inplane=32), threshold=0.5,
                     inference=InferenceConfig(window=window, overlap=0.5))


def test_instances_with_station_and_suv(scene):
    ct, pet, stations = scene
    det = detect_nodes(ct, brightness_model(), pet=pet, stations=stations)
    assert det.probability.GetSize() == ct.GetSize()
    assert len(det.nodes) == 2
    by_station = {n.station: n for n in det.nodes}
    assert set(by_station) == {STATION_NAMES[8 - 1], STATION_NAMES[7 - 1]}
    for (centre, radius, suv, label), name in zip(SPHERES, ("4R", "4L"), strict=True):
        node = by_station[name]
        assert STATION_NAMES[label - 1] == name
        np.testing.assert_allclose(node.centre_mm, centre, atol=1.0)
        assert node.short_axis_mm == pytest.approx(2 * radius, abs=1.5)
        assert node.suv_max == pytest.approx(suv, abs=1e-3)
        assert node.volume_ml == pytest.approx(4 / 3 * np.pi * radius ** 3 / 1000, rel=0.25)
    assert det.nodes[0].short_axis_mm > det.nodes[1].short_axis_mm or det.nodes[0].score >= det.nodes[1].score
    inst = sitk.GetArrayFromImage(det.instances)
    assert set(np.unique(inst)) == {0, 1, 2} and det.instances.GetSize() == ct.GetSize()
    # measured on the crop's voxels only: the same as on the whole CT grid
    whole, nodes = find_nodes(det.probability, ct, pet=pet, stations=stations, threshold=0.5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(whole), inst)
    assert [n.to_dict() for n in nodes] == [n.to_dict() for n in det.nodes]
    assert det.to_dict()["n_nodes"] == 2 and det.crop.source == "stations"


def test_probability_is_zero_outside_the_crop(scene):
    ct, _, stations = scene
    model = brightness_model(NodeDataConfig(spacing=SPACING, min_inplane=32, margin_mm=0.0))
    seg = segment(ct, model, stations=stations)
    prob = sitk.GetArrayFromImage(seg.probability)
    assert seg.probability.GetSpacing() == ct.GetSpacing() and seg.probability.GetOrigin() == ct.GetOrigin()
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    # fat in the crop: about sigmoid(40 * (0.15 - 0.5)) = 0; outside the station box everything is 0
    assert prob[:, :6, :].max() == 0.0 and prob[:, :, :6].max() == 0.0
    assert prob.max() > 0.99


def test_sliding_windows_blend_to_the_whole_volume_result():
    """The fixed network works voxel by voxel, so any window layout must give the same probabilities."""
    model = brightness_model()
    rng = np.random.default_rng(0)
    image = rng.random((20, 40, 44)).astype(np.float32)
    whole = predict_unet(model.network, image, (20, 40, 44), 0.0, divisor=1)
    windows = predict_unet(model.network, image, (8, 16, 16), 0.5, divisor=1)
    np.testing.assert_allclose(windows, whole, atol=1e-5)
    assert windows.shape == image.shape


def test_trained_snet_on_a_phantom_ct(trained_snet, node_cohort):
    """A trained S-Net (tiny) on a phantom CT: the probability map is on the CT grid and 0 outside the crop."""
    _, result = trained_snet
    row = read_cohort(node_cohort).rows[0]
    ct, stations = sitk.ReadImage(str(row.ct_path)), sitk.ReadImage(str(row.stations_path))
    prob = segment_nodes(ct, result.checkpoint, stations=stations)
    assert prob.GetSize() == ct.GetSize() and prob.GetDirection() == ct.GetDirection()
    np.testing.assert_allclose(prob.GetOrigin(), ct.GetOrigin())
    arr = sitk.GetArrayFromImage(prob)
    box = node_crop(ct, stations=stations, margin_mm=20.0)
    x_mm = ct.GetOrigin()[0] + np.arange(ct.GetSize()[0]) * ct.GetSpacing()[0]  # identity direction
    outside = (x_mm < box.lower[0] - ct.GetSpacing()[0]) | (x_mm > box.upper[0] + ct.GetSpacing()[0])
    assert outside.any() and arr[:, :, outside].max() == 0.0
    assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0


def test_bad_inputs_are_refused(scene):
    ct, pet, stations = scene
    model = brightness_model()
    with pytest.raises(InputError, match="3D scalar"):
        segment_nodes(np.zeros((4, 4, 4)), model)
    bad = sitk.Cast(stations, sitk.sitkUInt8) * 3  # labels up to 24
    with pytest.raises(InputError, match="station labels 0..17"):
        detect_nodes(ct, model, stations=bad)
