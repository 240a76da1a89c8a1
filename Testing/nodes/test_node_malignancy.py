"""Node malignancy: the multiple-instance loss on hand-built bags, station pooling and prior, the CT-only shapes,
the fusion, the clinic's short-axis rule on a known ellipsoid, and a short real training run."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeStagingLib.errors import ModelError, UsageError
from LymphNodeStagingLib.nodes.fusion import FusionModel, fit_fusion
from LymphNodeStagingLib.nodes.malignancy import (
    NodeClassifier,
    NodeClassifierConfig,
    learn_prior,
    load_node_classifier,
    node_patches,
    pool_nodes,
    pooled_station_scores,
    predict_nodes,
    station_scores,
)
from LymphNodeStagingLib.staging.rules import UNKNOWN
from LymphNodeStagingLib.staging.stations import NUM_STATIONS
from LymphNodeStagingLib.training.node_mil import (
    Bag,
    NodeBagCase,
    NodeTrainConfig,
    case_bags,
    mil_loss,
    train_node_classifier,
)


def _grad(logits: list[float], bags: list[Bag], pos_weight: float = 1.0) -> tuple[float, np.ndarray]:
    z = torch.tensor(logits, requires_grad=True)
    loss = mil_loss(z, bags, pos_weight)
    loss.backward()
    return float(loss.detach()), z.grad.numpy()


def test_benign_bag_pushes_every_node_down():
    loss, g = _grad([-1.0, 0.5, 2.0], [Bag(np.array([0, 1, 2]), 0)])
    assert loss > 0
    assert np.all(g > 0)  # gradient descent lowers every logit


def test_malignant_bag_without_loss_once_one_node_is_positive():
    loss, g = _grad([-3.0, 0.2, -1.0], [Bag(np.array([0, 1, 2]), 1)])
    assert loss == 0.0
    assert np.all(g == 0)


def test_malignant_bag_all_benign_pushes_only_the_most_suspicious_node_up():
    loss, g = _grad([-3.0, -0.4, -1.0], [Bag(np.array([0, 1, 2]), 1)], pos_weight=5.0)
    assert loss == pytest.approx(5.0 * float(torch.nn.functional.softplus(torch.tensor(0.4))), rel=1e-5)
    assert g[1] < 0 and g[0] == 0 and g[2] == 0


def test_mixed_bags_average_over_terms():
    # a benign bag of two nodes (two terms) and a malignant bag (one term)
    loss, _ = _grad([-10.0, -10.0, -10.0], [Bag(np.array([0, 1]), 0), Bag(np.array([2]), 1)])
    expected = (2 * float(torch.nn.functional.softplus(torch.tensor(-10.0))) + 10.0) / 3
    assert loss == pytest.approx(expected, rel=1e-4)


def test_no_bag_gives_zero_loss_with_a_graph():
    z = torch.zeros(3, requires_grad=True)
    loss = mil_loss(z, [])
    loss.backward()
    assert float(loss.detach()) == 0.0


def _bag_case(stations, labels=None, n_stage=UNKNOWN, side="R", seed=0, hot=()):
    rng = np.random.default_rng(seed)
    n = len(stations)
    patches = rng.normal(0.0, 0.1, (n, 3, 8, 8, 8)).astype(np.float32)
    patches[:, 1, 3:5, 3:5, 3:5] = 1.0
    for i in hot:
        patches[i, 2, 2:6, 2:6, 2:6] += 3.0  # a hot PET core: the malignant node
    lab = np.full(NUM_STATIONS, UNKNOWN) if labels is None else np.asarray(labels)
    return NodeBagCase("P", patches, np.asarray(stations), np.ones(NUM_STATIONS, bool), lab, n_stage, side)


def test_case_bags_from_station_labels_and_from_the_n_stage():
    labels = np.full(NUM_STATIONS, UNKNOWN)
    labels[6], labels[10] = 1, 0  # 4L malignant, 7 benign
    bags = case_bags(_bag_case([6, 6, 10, -1], labels))
    assert [(b.nodes.tolist(), b.label) for b in bags] == [([0, 1], 1), ([2], 0)]
    # no station label: an N0 patient's nodes in every group are benign
    bags = case_bags(_bag_case([6, 10, 13], n_stage=0))
    assert bags and all(b.label == 0 for b in bags)
    assert sorted(np.concatenate([b.nodes for b in bags]).tolist()) == [0, 1, 2]
    # N1 (right side): group 1 (10R, 11R ...) malignant, groups 2 and 3 benign
    bags = case_bags(_bag_case([14, 7], n_stage=1, side="R"))
    by_label = {b.label: b.nodes.tolist() for b in bags}
    assert by_label[1] == [0] and by_label[0] == [1]


def test_station_pooling_and_prior():
    assert pool_nodes([0.2, 0.5]) == pytest.approx(0.5)
    assert pool_nodes([0.5, 0.5], "noisy_or") == pytest.approx(0.75)
    assert np.isnan(pool_nodes([]))
    with pytest.raises(UsageError):
        pool_nodes([0.1], "mean")
    pooled = pooled_station_scores(np.array([0.1, 0.7, 0.3]), np.array([2, 2, 5]))
    assert pooled[2] == pytest.approx(0.7) and pooled[5] == pytest.approx(0.3) and np.isnan(pooled[0])
    present = np.ones(NUM_STATIONS, bool)
    present[16] = False
    prior = np.full(NUM_STATIONS, 0.04)
    s = station_scores(np.array([0.1, 0.7]), np.array([2, 2]), present, prior)
    assert s[2] == pytest.approx(0.7) and s[0] == pytest.approx(0.04) and s[16] == 0.0
    # the prior: positive share of node-less stations, shrunk towards the overall share
    has = np.zeros((4, NUM_STATIONS), bool)
    lab = np.zeros((4, NUM_STATIONS), int)
    lab[:, 0] = 1
    p = learn_prior(has, lab, strength=0.0)
    assert p[0] == pytest.approx(1.0) and p[1] == pytest.approx(0.0)
    assert 0 < learn_prior(has, lab, strength=5.0)[1] < 0.1


def test_ct_only_and_pet_ct_shapes():
    x = torch.zeros(5, 3, 16, 16, 16)
    pet = NodeClassifier(NodeClassifierConfig("petct"))
    ct = NodeClassifier(NodeClassifierConfig("ct"))
    assert pet(x).shape == (5,) and ct(x[:, :2]).shape == (5,)
    with pytest.raises(UsageError):
        ct(x)  # a CT-only network reads CT and mask only
    # predict_nodes reads the first in_channels channels of full (CT, mask, PET) patches
    assert predict_nodes(ct, x.numpy()).shape == (5,)
    assert predict_nodes(ct, np.zeros((0, 3, 16, 16, 16))).shape == (0,)
    with pytest.raises(UsageError):
        NodeClassifierConfig("mri")
    with pytest.raises(UsageError):
        NodeClassifierConfig(patch_mm=8.0, patch_spacing=2.0)  # 4 voxels: too small for 5 levels


def test_station_classifier_ct_only():
    from LymphNodeStagingLib.classifier.model import ModelConfig, StationClassifier
    from LymphNodeStagingLib.classifier.patches import extract_patches

    cfg = ModelConfig.small(16, in_channels=1)
    assert cfg.modality == "ct" and not cfg.uses_pet
    clf = StationClassifier(cfg)
    assert clf(torch.zeros(2, 1, 16, 16, 16), torch.tensor([0, 3])).shape == (2,)
    with pytest.raises(UsageError):
        ModelConfig.small(16, in_channels=1, hybrid=True)
    with pytest.raises(UsageError):
        ModelConfig(in_channels=3)
    img = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    assert extract_patches(img, None, np.zeros((2, 3)) + 10.0, size=8, spacing=1.0).shape == (2, 1, 8, 8, 8)
    assert extract_patches(img, img, np.zeros((2, 3)) + 10.0, size=8, spacing=1.0).shape == (2, 2, 8, 8, 8)


def test_node_patches_channels():
    from LymphNodeStagingLib.nodes.instances import NodeInstance

    ct = sitk.Image(40, 40, 20, sitk.sitkFloat32) + 40.0
    ct.SetSpacing((1.0, 1.0, 2.0))
    inst = sitk.Image(40, 40, 20, sitk.sitkUInt16)
    for x in range(18, 23):
        for y in range(18, 23):
            for z in range(9, 12):
                inst[x, y, z] = 2
    pet = sitk.Image(40, 40, 20, sitk.sitkFloat32) + 4.0
    pet.SetSpacing((1.0, 1.0, 2.0))
    node = NodeInstance(2, inst.TransformIndexToPhysicalPoint((20, 20, 10)), 5.0, 5.0, 0.1, 40.0, 0.9, 75)
    p = node_patches(ct, inst, [node], pet)
    assert p.shape == (1, 3, 16, 16, 16)
    assert p[0, 1].max() == 1.0 and p[0, 1, 8, 8, 8] == 1.0 and p[0, 1, 0, 0, 0] == 0.0
    assert p[0, 2, 8, 8, 8] == pytest.approx(1.0)  # SUV 4 -> 1
    assert np.all(node_patches(ct, inst, [node], None)[:, 2] == 0)


def test_fusion_fit_and_round_trip():
    rng = np.random.default_rng(0)
    y = (rng.random(600) < 0.2).astype(int)
    cnn = np.clip(0.2 + 0.5 * y + rng.normal(0, 0.15, y.size), 0.01, 0.99)
    node = np.clip(0.1 + 0.3 * y + rng.normal(0, 0.25, y.size), 0.01, 0.99)
    has = rng.random(y.size) < 0.7
    short = has * (6.0 + 6.0 * y + rng.normal(0, 2.0, y.size)).clip(1.0)
    fusion = fit_fusion(cnn, node, has, y, short_axis=short)
    assert fusion.features == ("station_cnn_logit", "node_logit", "has_node", "log_short_axis")
    assert fusion.weights[0] > 0 and fusion.weights[1] > 0 and fusion.weights[3] > 0
    p = fusion.predict(cnn, node, has, short_axis=short)
    assert p.shape == y.shape and np.all((p > 0) & (p < 1))
    assert abs(p.mean() - y.mean()) < 0.02  # a logistic fit reproduces the base rate
    again = FusionModel.from_dict(json.loads(json.dumps(fusion.to_dict())))
    assert np.allclose(again.predict(cnn, node, has, short_axis=short), p)
    with pytest.raises(UsageError, match="log_short_axis"):
        fusion.predict(cnn, node, has)  # fitted with the short axis: it needs it
    with pytest.raises(ModelError):
        FusionModel.from_dict({"weights": [1.0], "bias": 0.0})
    fallback = fit_fusion(cnn, node, has, np.zeros_like(y))  # one class: nothing to fit, the mean of the logits
    assert not fallback.fitted and fallback.predict(np.array([0.8]), np.array([0.8]), np.array([1]))[0] == \
        pytest.approx(0.8)


def test_short_axis_rule_on_a_known_ellipsoid():
    from LymphNodeStagingLib.evaluation.node_methods import predict_node_rule
    from LymphNodeStagingLib.nodes.instances import find_nodes
    from LymphNodeStagingLib.training.node_cases import NodeEvalData

    spacing = (0.5, 0.5, 1.0)
    ct = sitk.Image(120, 120, 30, sitk.sitkFloat32)
    ct.SetSpacing(spacing)
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip((30, 120, 120), spacing[::-1], strict=True)],
                          indexing="ij")
    prob = np.zeros((30, 120, 120), np.float32)
    # node 1: 12 x 20 mm in-plane (short axis 12 mm); node 2: 8 x 14 mm
    prob[((x - 20) / 6.0) ** 2 + ((y - 30) / 10.0) ** 2 + ((z - 15) / 5.0) ** 2 <= 1] = 1.0
    prob[((x - 45) / 4.0) ** 2 + ((y - 30) / 7.0) ** 2 + ((z - 15) / 4.0) ** 2 <= 1] = 0.9
    img = sitk.GetImageFromArray(prob)
    img.CopyInformation(ct)
    _, nodes = find_nodes(img, ct)
    short = np.array([n.short_axis_mm for n in sorted(nodes, key=lambda n: n.long_axis_mm, reverse=True)])
    assert short[0] == pytest.approx(12.0, abs=0.6) and short[1] == pytest.approx(8.0, abs=0.6)
    bag = _bag_case([3, 5])
    case = types.SimpleNamespace(nodes=NodeEvalData(bag, short, np.array([1.0, 6.0]), None),
                                 sample=types.SimpleNamespace(present=np.ones(NUM_STATIONS, bool)))
    score, pred, node_scores, params = predict_node_rule("short-axis", [case])
    assert pred[0, 3] and not pred[0, 5] and not pred[0].sum() > 1
    assert score[0, 3] == pytest.approx(short[0])
    assert params == {"short_axis_mm": 10.0}
    _, pred, _, _ = predict_node_rule("node-suvmax", [case])
    assert pred[0, 5] and not pred[0, 3]
    _, pred, _, _ = predict_node_rule("node-combined", [case])
    assert pred[0, 3] and pred[0, 5]


def test_training_from_bags_lowers_the_loss_and_writes_a_calibrated_checkpoint(tmp_path):
    rng = np.random.default_rng(1)
    cases = []
    for i in range(16):
        labels = np.zeros(NUM_STATIONS, int)
        malignant = i % 2 == 0
        labels[6] = int(malignant)
        st = [6, 6, 10, int(rng.integers(0, 17))]
        cases.append(_bag_case(st, labels, seed=i, hot=(0,) if malignant else ()))
    cfg = NodeClassifierConfig("petct", patch_mm=16.0, patch_spacing=2.0, channels=(4, 8, 8, 8))
    res = train_node_classifier(cases[:12], cases[12:], tmp_path / "run", cfg,
                                NodeTrainConfig(epochs=6, patients_per_step=4, lr=3e-3, seed=0, threads=1))
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    model = load_node_classifier(res.checkpoint)
    assert model.config.modality == "petct" and model.prior.shape == (NUM_STATIONS,)
    assert model.calibration.method != "identity" or model.manifest["calibration"]["n"] > 0
    assert 0.0 <= model.threshold <= 1.0
    # the same data and settings: the finished checkpoint is reused
    again = train_node_classifier(cases[:12], cases[12:], tmp_path / "run", cfg,
                                  NodeTrainConfig(epochs=6, patients_per_step=4, lr=3e-3, seed=0, threads=1))
    assert again.checkpoint == res.checkpoint and again.seconds == 0.0
    # a node classifier is not a node segmentation model, and the reverse
    from LymphNodeStagingLib.nodes.model import load_node_model

    with pytest.raises(ModelError):
        load_node_model(res.checkpoint)
    with pytest.raises(UsageError):
        train_node_classifier([], cases[12:], tmp_path / "x", cfg)


def test_bundled_node_classifiers_load_and_read_their_modality():
    from LymphNodeStagingLib.nodes.malignancy import bundled_node_classifier, resolve_node_classifier
    from LymphNodeStagingLib.preflight.parameters import check_node_classifier

    found = 0
    for modality in ("petct", "ct"):
        path = bundled_node_classifier(modality)
        if path is None:
            continue
        found += 1
        model = load_node_classifier(path)
        assert model.config.modality == modality and model.calibration.method != "identity"
        assert resolve_node_classifier(None, modality) == path
        assert check_node_classifier(None, has_pet=modality == "petct").path == path
    assert found >= 1
    with pytest.raises(UsageError):
        bundled_node_classifier("mri")
