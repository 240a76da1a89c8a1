"""The station network: two heads and their losses, training lowers the loss, no left-right flip in augmentation,
checkpoints (kind, resume), the lung crop, and one mapping interface for the atlas and network methods."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeStagingLib.errors import InputError, ModelError, UsageError
from LymphNodeStagingLib.staging.stations import NUM_STATIONS, STATION_NAMES
from LymphNodeStagingLib.stationnet.data import (
    AugmentConfig,
    StationDataConfig,
    augment,
    draw_transform,
    lung_box,
    make_case,
    prepare_ct,
)
from LymphNodeStagingLib.stationnet.network import (
    StationNet,
    StationNetConfig,
    adaptive_bce,
    class_probabilities,
    station_losses,
)

TINY = StationNetConfig.tiny()
DATA = StationDataConfig(spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One small phantom patient (CT, anatomy, stations, truth) written to files."""
    from LymphNodeStagingLib.phantom import generate_cohort

    folder = tmp_path_factory.mktemp("stationnet")
    return generate_cohort(folder / "cohort", patients=3, seed=31, size="small")


@pytest.fixture(scope="module")
def trained(phantom, tmp_path_factory):
    """A tiny station network trained for 2 epochs on the 3-patient cohort (truth labels)."""
    from LymphNodeStagingLib.stationnet.train import StationTrainConfig, train_stations

    out = tmp_path_factory.mktemp("stationnet-train")
    cfg = StationTrainConfig(epochs=2, patch=(16, 16, 16), seed=3, num_threads=1)
    res = train_stations(phantom, out, "truth", config=cfg, model_config=TINY, data_config=DATA)
    return res


def test_two_heads_shapes_and_probabilities():
    net = StationNet(TINY)
    out = net(torch.rand(2, 1, 8, 16, 16))
    assert out.mediastinum.shape == (2, 1, 8, 16, 16)
    assert out.stations.shape == (2, NUM_STATIONS, 8, 16, 16)
    probs = class_probabilities(out)
    assert probs.shape == (2, NUM_STATIONS + 1, 8, 16, 16)
    assert torch.allclose(probs.sum(1), torch.ones(2, 8, 16, 16), atol=1e-5)


def test_network_refuses_bad_input_size():
    with pytest.raises(UsageError, match="multiples of 2"):
        StationNet(TINY)(torch.rand(1, 1, 7, 16, 16))


def test_relu_after_every_convolution_but_the_outputs():
    net = StationNet(StationNetConfig(channels=(4, 8, 8)))
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv3d)]
    heads = {"mediastinum_head", "station_head"}
    assert heads <= set(convs)
    assert all(isinstance(m, torch.nn.BatchNorm3d) or not isinstance(m, torch.nn.Conv3d) or n in heads
               or n.endswith(("body.0", "body.3", "shortcut.0")) for n, m in net.named_modules())


def test_losses_two_heads():
    net = StationNet(TINY)
    out = net(torch.rand(1, 1, 8, 8, 8))
    labels = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    labels[0, 2:5, 2:5, 2:5] = 7
    losses = station_losses(out, labels)
    assert set(losses) == {"mediastinum", "stations", "total"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isclose(losses["total"], losses["mediastinum"] + losses["stations"])
    # no station voxel: the station loss is zero and still differentiable
    empty = station_losses(out, torch.zeros_like(labels))
    assert float(empty["stations"].detach()) == 0.0
    empty["total"].backward()
    with pytest.raises(UsageError, match="do not fit"):
        station_losses(out, labels[:, :4])


def test_adaptive_bce_weights_the_rare_foreground():
    logits = torch.zeros(1, 1, 10, 10, 10)
    target = torch.zeros_like(logits)
    target[0, 0, 0, 0, :2] = 1  # 2 foreground voxels of 1000
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert float(adaptive_bce(logits, target)) > 1.5 * float(plain)


def test_a_few_training_steps_lower_the_loss(phantom):
    from LymphNodeStagingLib.cohort.table import read_cohort

    row = read_cohort(phantom).usable_rows()[0]
    case = make_case("a", sitk.ReadImage(str(row.ct_path)), sitk.ReadImage(str(row.stations_path)), DATA,
                     TINY.divisor)
    torch.manual_seed(0)
    net = StationNet(TINY)
    x = torch.from_numpy(case.image)[None, None]
    y = torch.from_numpy(case.labels.astype(np.int64))[None]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    with torch.random.fork_rng():
        for _ in range(8):
            opt.zero_grad()
            loss = station_losses(net(x), y)["total"]
            loss.backward()
            opt.step()
            first = float(loss.detach()) if first is None else first
    net.train()
    assert float(station_losses(net(x), y)["total"].detach()) < 0.8 * first


def test_augmentation_never_flips_left_and_right():
    rng = np.random.default_rng(0)
    cfg = AugmentConfig()
    for _ in range(200):
        rot, shift = draw_transform(rng, cfg)
        assert np.linalg.det(rot) > 0.99  # a rotation, not a mirror
        assert rot[0, 0] > 0.95 and rot[1, 1] > 0.95 and rot[2, 2] > 0.95  # close to the identity
        assert np.all(np.abs(shift) <= cfg.max_shift_mm)
    # an image bright on the patient's right (low x) with a right station stays so after augmentation
    image = np.zeros((16, 16, 32), np.float32)
    labels = np.zeros((16, 16, 32), np.uint8)
    image[:, :, 4:12] = 1.0
    labels[4:12, 4:12, 4:12] = STATION_NAMES.index("4R") + 1
    for _ in range(20):
        im, lab = augment(image, labels, (4.0, 4.0, 4.0), rng, cfg)
        assert im[:, :, :16].mean() > im[:, :, 16:].mean() + 0.2
        xs = np.nonzero(lab == STATION_NAMES.index("4R") + 1)[2]
        assert len(xs) and xs.mean() < 16
        assert set(np.unique(lab)) <= {0, STATION_NAMES.index("4R") + 1}


def test_lung_crop_from_a_full_thorax(tmp_path):
    from LymphNodeStagingLib.phantom import generate_patient

    p = generate_patient(77, size="full")
    lo, hi, found = lung_box(p.ct)
    assert found
    ct_lo = np.array(p.ct.GetOrigin())
    ct_hi = ct_lo + (np.array(p.ct.GetSize()) - 1) * np.array(p.ct.GetSpacing())
    assert np.all(hi - lo < ct_hi - ct_lo + 1e-6)  # smaller than the CT
    st = sitk.GetArrayViewFromImage(p.stations)
    prepared = prepare_ct(p.ct, StationDataConfig(), 8)
    assert all(s % 8 == 0 for s in prepared.image.shape)
    on_grid = prepared.grid.resample(p.stations, nearest=True)
    assert np.count_nonzero(on_grid) * 64.0 > 0.9 * np.count_nonzero(st) * np.prod(p.ct.GetSpacing())


def test_lung_crop_without_lungs_is_the_whole_ct():
    img = sitk.GetImageFromArray(np.full((10, 12, 14), 40, np.int16))
    lo, hi, found = lung_box(img, 5.0)
    assert not found and np.allclose(lo, 0) and np.allclose(hi, [13, 11, 9])


def test_training_writes_checkpoints_and_resumes(trained, phantom):
    from LymphNodeStagingLib.classifier.checkpoint import load_checkpoint
    from LymphNodeStagingLib.stationnet.model import STATION_NET_KIND, load_station_model
    from LymphNodeStagingLib.stationnet.train import StationTrainConfig, train_stations

    assert trained.checkpoint.is_file() and trained.last_checkpoint.is_file()
    assert trained.epochs_run == 2 and len(trained.history) == 2
    man = load_checkpoint(trained.checkpoint, kinds=(STATION_NET_KIND,)).manifest
    assert man["kind"] == STATION_NET_KIND and man["labels"] == "truth"
    model = load_station_model(trained.checkpoint)
    assert model.config.channels == TINY.channels
    # the classifier loaders refuse it
    with pytest.raises(ModelError):
        load_checkpoint(trained.checkpoint)
    # resuming a complete run does no more epochs
    cfg = StationTrainConfig(epochs=2, patch=(16, 16, 16), seed=3, num_threads=1)
    again = train_stations(phantom, trained.checkpoint.parent, "truth", config=cfg, model_config=TINY,
                           data_config=DATA)
    assert again.resumed_from_epoch == 1 and again.epochs_run == 2
    # another seed is another run: refused
    with pytest.raises(UsageError, match="another station network training run"):
        train_stations(phantom, trained.checkpoint.parent, "truth", model_config=TINY, data_config=DATA,
                       config=StationTrainConfig(epochs=2, patch=(16, 16, 16), seed=4, num_threads=1))


def test_training_inputs_are_checked(phantom, tmp_path):
    from LymphNodeStagingLib.stationnet.train import train_stations

    with pytest.raises(UsageError, match="labels"):
        train_stations(phantom, tmp_path / "x", "drawn")
    text = phantom.read_text().splitlines()
    header = text[0].split(",")
    col = header.index("stations_path")
    rows = [",".join(v if i != col else "" for i, v in enumerate(line.split(","))) for line in text[1:]]
    bad = phantom.parent / "no_stations.csv"
    bad.write_text("\n".join([text[0], *rows]) + "\n")
    with pytest.raises(InputError, match="stations_path is empty"):
        train_stations(bad, tmp_path / "y", "truth")
    assert not (tmp_path / "y" / "best.pt").exists()


def test_one_interface_for_both_methods(trained, phantom, tmp_path):
    """map_case gives a StationMapping with the same structures whatever the method; 'both' adds the agreement."""
    from LymphNodeStagingLib.anatomy.vocabulary import load_anatomy
    from LymphNodeStagingLib.cohort.table import read_cohort
    from LymphNodeStagingLib.mapping.atlas import load_atlas_set
    from LymphNodeStagingLib.mapping.registration import RegistrationConfig
    from LymphNodeStagingLib.mapping.station_mapping import StationMapping, read_station_mapping
    from LymphNodeStagingLib.mapping.weightmap import WeightMap, assign_points
    from LymphNodeStagingLib.phantom import generate_atlas_set
    from LymphNodeStagingLib.stationnet.method import map_case

    row = read_cohort(phantom).usable_rows()[0]
    ct = sitk.ReadImage(str(row.ct_path), sitk.sitkFloat32)
    anatomy = load_anatomy(row.anatomy_path, reference=ct)
    atlases = load_atlas_set(generate_atlas_set(tmp_path / "atlases", atlases=2, seed=1000, size="small"))
    fast = RegistrationConfig(iterations=(4, 3), affine_iterations=8, threads=1)
    runs = {m: map_case(ct, m, anatomy=anatomy, atlas_set=atlases, station_model=trained.checkpoint, config=fast)
            for m in ("atlas", "network")}
    runs["both"] = map_case(ct, "both", station_model=trained.checkpoint, atlas_mapping=runs["atlas"].mapping)
    for method, run in runs.items():
        m = run.mapping
        assert isinstance(m, StationMapping)
        assert m.labels.dtype == np.uint8 and m.labels.shape == m.geometry.shape[::-1]
        assert m.votes.shape == (NUM_STATIONS, *m.labels.shape) and m.votes.dtype == np.uint8
        assert set(m.flags) == set(STATION_NAMES) == set(m.voxels) == set(m.agreement)
        assert all(isinstance(w, WeightMap) for w in m.weight_maps.values())
        assert set(m.centroids_mm) == set(m.weight_maps)
        frac = sitk.GetArrayFromImage(m.vote_fraction_image())
        assert frac.shape == (*m.labels.shape, NUM_STATIONS) and frac.max() <= 1.0 + 1e-6
        assert len(assign_points(np.zeros((2, 3)), m.weight_maps)) == 2
        m.write(tmp_path / method, overlay_ct=ct)
        back = read_station_mapping(tmp_path / method) if (tmp_path / method / "station_info.json").exists() else m
        assert back.method == m.method
    assert runs["atlas"].mapping.method == "atlas" and runs["network"].mapping.method == "network"
    both = runs["both"]
    assert both.mapping is runs["atlas"].mapping is both.atlas and both.network is not None
    assert set(both.agreement_dice) == set(STATION_NAMES)
    assert all(v is None or 0.0 <= v <= 1.0 for v in both.agreement_dice.values())
    assert runs["network"].atlas is None and runs["network"].agreement_dice is None


def test_network_method_needs_no_anatomy_and_atlas_method_does(trained, phantom):
    from LymphNodeStagingLib.cohort.table import read_cohort
    from LymphNodeStagingLib.stationnet.method import check_method, map_case

    row = read_cohort(phantom).usable_rows()[0]
    ct = sitk.ReadImage(str(row.ct_path), sitk.sitkFloat32)
    assert map_case(ct, "network", station_model=trained.checkpoint).mapping.labels.any()
    with pytest.raises(UsageError, match="needs an anatomy"):
        map_case(ct, "atlas")
    with pytest.raises(UsageError, match="--method 'registration'"):
        check_method("registration")


def test_station_store_round_trip_keeps_the_method(trained, phantom, tmp_path):
    from LymphNodeStagingLib.cohort.table import read_cohort
    from LymphNodeStagingLib.mapping.station_mapping import read_station_mapping, write_station_mapping
    from LymphNodeStagingLib.stationnet.method import map_case

    row = read_cohort(phantom).usable_rows()[1]
    ct = sitk.ReadImage(str(row.ct_path), sitk.sitkFloat32)
    m = map_case(ct, "network", station_model=trained.checkpoint).mapping
    write_station_mapping(m, tmp_path / "m")
    back = read_station_mapping(tmp_path / "m")
    assert back.method == "network" and back.n_atlases == m.n_atlases
    assert np.array_equal(back.labels, m.labels)
    assert set(back.weight_maps) == set(m.weight_maps)


def test_prepare_ct_refuses_2d():
    with pytest.raises(InputError, match="3D CT"):
        prepare_ct(sitk.Image([8, 8], sitk.sitkInt16), DATA, 2)


def test_bundled_station_network_is_small_pinned_and_used_by_default():
    from LymphNodeStagingLib import paths
    from LymphNodeStagingLib.classifier.checkpoint import file_sha256
    from LymphNodeStagingLib.stationnet.model import BUNDLED_STATION_MODEL, bundled_station_model, load_station_model

    path = bundled_station_model()
    assert path is not None and path.name == BUNDLED_STATION_MODEL
    assert path.stat().st_size <= 20_000_000
    assert file_sha256(path) == paths.BUNDLED_MODELS[BUNDLED_STATION_MODEL]
    model = load_station_model(None)
    assert model.path == path and model.manifest["labels"] in ("truth", "atlas")
    assert 0.0 < model.region_threshold < 1.0 and model.info()["bundled"] is True


def test_station_network_maps_a_full_thorax_from_the_ct_alone():
    """The bundled network on a full-size phantom it never saw: most of the true stations are found where they are."""
    from LymphNodeStagingLib.phantom import generate_patient
    from LymphNodeStagingLib.stationnet.infer import map_stations_network
    from LymphNodeStagingLib.stationnet.model import load_station_model

    p = generate_patient(4243, size="full")
    m = map_stations_network(p.ct, load_station_model(None))
    truth = sitk.GetArrayFromImage(sitk.Resample(p.stations, m.label_image(), sitk.Transform(),
                                                 sitk.sitkNearestNeighbor, 0))
    found = [name for lab, name in enumerate(STATION_NAMES, 1)
             if (truth == lab).any() and ((m.labels == lab) & (truth == lab)).sum() > 0.3 * (truth == lab).sum()]
    assert len(found) >= 15, found
