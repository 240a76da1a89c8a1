"""Training the station-classifier variants (multiple-instance bags, hybrid head, batch norm) and TS2 with the
class-balanced N-stage loss, on tiny synthetic cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LymphNodeStagingLib.classifier.calibration import calibration_of
from LymphNodeStagingLib.classifier.checkpoint import load_model
from LymphNodeStagingLib.classifier.metrics import roc_auc
from LymphNodeStagingLib.classifier.model import ModelConfig
from LymphNodeStagingLib.classifier.predict import predict_case
from LymphNodeStagingLib.staging.rules import UNKNOWN
from LymphNodeStagingLib.training.loops import (
    CaseDataset,
    StationPatchDataset,
    TrainConfig,
    evaluate_stations,
    make_toy_case,
    train_ts1,
    train_ts2,
)
from LymphNodeStagingLib.training.losses import stage_ce, stage_class_weights

SIZE, SPACING = 16, 2.0
MCFG = ModelConfig.small(patch_size=SIZE, instances=2, pooling="attention", hybrid=True)


@pytest.fixture(scope="module")
def cases():
    return [make_toy_case(i) for i in range(8)]


def _cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=3e-3, patch_spacing=SPACING, seed=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ts1(cases, tmp_path_factory):
    return train_ts1(cases[:6], cases[6:], tmp_path_factory.mktemp("ts1v"), MCFG, _cfg(epochs=5))


def test_datasets_return_bags_and_station_features(cases):
    ds = StationPatchDataset(cases[:2], SIZE, SPACING, instances=3)
    item = ds[(0, 0, 0)]
    assert tuple(item["patch"].shape) == (3, 2, SIZE, SIZE, SIZE)
    assert item["features"].shape == (3,) and float(item["features"][0]) > 0  # SUVmax of the station
    case_item = CaseDataset(cases[:1], SIZE, SPACING, instances=3)[(0, 0, 0)]
    assert tuple(case_item["patches"].shape) == (17, 3, 2, SIZE, SIZE, SIZE)
    assert tuple(case_item["features"].shape) == (17, 3)


def test_variant_ts1_trains_and_predicts_with_bags_and_features(ts1, cases):
    losses = [h["train_loss"] for h in ts1.history]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model, manifest = load_model(ts1.checkpoint)
    cfg = manifest["model_config"]
    assert (cfg["instances"], cfg["pooling"], cfg["hybrid"], cfg["norm"]) == (2, "attention", True, "instance")
    res = evaluate_stations(model, cases[6:], SIZE, SPACING, "ajcc8")
    labels = np.stack([c.station_labels for c in cases[6:]])
    known = labels != UNKNOWN
    probs = res["_probs"]
    assert roc_auc(labels[known], probs[known]) > 0.7  # learned something in 5 short epochs
    c = cases[6]
    pred = predict_case(model, c.ct, c.pet, c.sampler, calibration=calibration_of(manifest),
                        features=c.features, tta=1)
    assert np.isfinite(pred.probabilities[c.present]).all() and np.isnan(pred.probabilities[~c.present]).all()
    assert known.any()


def test_stage_class_weights_balance_the_classes():
    w = stage_class_weights([0, 0, 0, 0, 0, 0, 2, 2, 3, UNKNOWN])
    assert w[1] == 0 and w[0] == pytest.approx(9 / (3 * 6)) and w[2] == pytest.approx(9 / (3 * 2))
    counts = np.array([6, 0, 2, 1])
    assert float((w.numpy() * counts).sum()) == pytest.approx(9.0)  # mean weight per patient 1
    logits = torch.zeros(3, 4)
    logits[:, 0] = 2.0  # always N0
    n = torch.tensor([0, 0, 2])
    assert stage_ce(logits, n, stage_class_weights(n)) > stage_ce(logits, n)  # the rare miss costs more


def test_ts2_from_a_variant_records_where_its_n_stage_comes_from(ts1, cases, tmp_path):
    r2 = train_ts2(cases[:6], cases[6:], tmp_path / "ts2", MCFG, _cfg(epochs=2, batch_size=3), init=ts1.checkpoint)
    _, man = load_model(r2.checkpoint)
    assert man["n_stage_from"] in ("head", "rules")
    assert "n_accuracy_head" in man and "n_accuracy_rules" in man
    assert man["train_config"]["loss"]["balanced"] is True
