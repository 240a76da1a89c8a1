"""Training loops on tiny synthetic cases: loss falls, classes separate, determinism, resume, TS2/TS3 rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from LymphNodeStagingLib.classifier.checkpoint import load_checkpoint, load_model
from LymphNodeStagingLib.classifier.model import ModelConfig, StagingModel
from LymphNodeStagingLib.errors import UsageError
from LymphNodeStagingLib.staging.rules import UNKNOWN
from LymphNodeStagingLib.training.loops import (
    CaseDataset,
    CaseSample,
    StationPatchDataset,
    TrainConfig,
    epoch_order,
    evaluate_stations,
    make_toy_case,
    train_ts1,
    train_ts2,
    train_ts3,
)

SIZE, SPACING = 16, 2.0
MCFG = ModelConfig.small(patch_size=SIZE)


@pytest.fixture(scope="module")
def cases():
    return [make_toy_case(i) for i in range(8)]


def _cfg(**kw):
    base = dict(epochs=3, batch_size=8, lr=3e-3, patch_spacing=SPACING, seed=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def ts1(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("ts1")
    return train_ts1(cases[:6], cases[6:], out, MCFG, _cfg(epochs=6))


def test_ts1_loss_falls_and_classes_separate(ts1, cases):
    losses = [h["train_loss"] for h in ts1.history]
    assert losses[-1] < 0.7 * losses[0]
    model, manifest = load_model(ts1.checkpoint)
    res = evaluate_stations(model, cases[6:], SIZE, SPACING, "ajcc8")
    labels = np.stack([c.station_labels for c in cases[6:]])
    probs = res["_probs"]
    known = labels != UNKNOWN
    assert probs[known & (labels == 1)].min() > probs[known & (labels == 0)].max()
    assert res["station_balanced_accuracy"] == 1.0
    assert manifest["kind"] == "station" and manifest["strategy"] == "ts1" and manifest["seed"] == 5
    assert len(manifest["data"]["train_fingerprint"]) == 64 and manifest["complete"]
    assert 0.0 < manifest["threshold"] < 1.0
    assert ts1.best_epoch >= 0 and ts1.epochs_run == 6
    # calibrated on the validation cases; the operating threshold is stated on the calibrated scale
    assert manifest["calibrated"] and manifest["calibration"]["n"] == int(known.sum())
    assert manifest["calibration"]["method"] in ("temperature", "platt", "isotonic")
    assert ts1.threshold == manifest["threshold"] and "threshold_uncalibrated" in manifest


def test_same_seed_same_weights_and_resume_after_interruption(cases, tmp_path):
    cfg = _cfg(epochs=2)
    a = train_ts1(cases[:4], cases[6:], tmp_path / "a", MCFG, cfg)

    def kill_after_first_epoch(p):
        if p.done >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_ts1(cases[:4], cases[6:], tmp_path / "b", MCFG, cfg, progress=kill_after_first_epoch)
    assert load_checkpoint(tmp_path / "b" / "last.pt").manifest["epoch"] == 0
    b = train_ts1(cases[:4], cases[6:], tmp_path / "b", MCFG, cfg)
    assert b.resumed_from_epoch == 0
    wa = load_checkpoint(a.last_checkpoint).manifest["weights_sha256"]
    wb = load_checkpoint(b.last_checkpoint).manifest["weights_sha256"]
    assert wa == wb
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    c = train_ts1(cases[:4], cases[6:], tmp_path / "c", MCFG, _cfg(epochs=1, seed=6))
    assert load_checkpoint(c.last_checkpoint).manifest["weights_sha256"] != wa
    with pytest.raises(UsageError, match="another training run"):
        train_ts1(cases[:4], cases[6:], tmp_path / "b", MCFG, _cfg(epochs=2, lr=1e-3))


def test_centres_are_drawn_on_the_fly_and_reproducibly(cases):
    ds = StationPatchDataset(cases[:2], SIZE, SPACING, augment=None, seed=1)
    a, b, a2 = ds[(0, 0, 0)]["patch"], ds[(1, 0, 0)]["patch"], ds[(0, 0, 0)]["patch"]
    assert torch.equal(a, a2) and not torch.equal(a, b)
    ds_aug = StationPatchDataset(cases[:2], SIZE, SPACING, seed=1)  # default augmentation
    p = ds_aug[(3, 2, 1)]["patch"]
    assert p.shape == (2, SIZE, SIZE, SIZE) and torch.isfinite(p).all()
    infer = StationPatchDataset(cases[:2], SIZE, SPACING, seed=1, train=False)
    assert torch.equal(infer[(0, 0, 0)]["patch"], infer[(9, 9, 0)]["patch"])  # centroid, deterministic


def test_absent_stations_are_flagged_and_excluded():
    case = make_toy_case(3, stations=(7, 10, 14), positive=(7,), absent=(7,))
    assert case.station_labels[7] == 1 and not case.present[7]
    ds = StationPatchDataset([case], SIZE, SPACING, augment=None)
    assert ds.absent_labelled == 1 and all(si != 7 for _, si, _ in ds.items)
    item = CaseDataset([case], SIZE, SPACING, augment=None)[0]
    assert not bool(item["present"][7]) and item["station_labels"][7] == 1
    assert float(item["patches"][7].abs().sum()) == 0.0  # never looked at: masked by "present"


def test_oversampling_balances_classes():
    labels = np.array([1] * 10 + [0] * 90)
    order = epoch_order(labels, True, np.random.default_rng(0))
    assert len(order) == 100 and 0.35 < labels[order].mean() < 0.65
    assert sorted(epoch_order(labels, False, np.random.default_rng(0))) == list(range(100))


def test_ts2_with_stage_only_cases_and_ts3_keeps_encoder_frozen(ts1, cases, tmp_path):
    stage_only = [CaseSample(c.patient_id + "s", c.ct, c.pet, c.sampler, c.side, c.n_stage) for c in cases[:3]]
    assert (stage_only[0].station_labels == UNKNOWN).all()
    train_set = stage_only + cases[3:6]
    r2 = train_ts2(train_set, cases[6:], tmp_path / "ts2", MCFG, _cfg(epochs=2, batch_size=3), init=ts1.checkpoint)
    assert all(np.isfinite(h["train_loss"]) for h in r2.history)
    assert {"train_ce", "train_ordinal", "train_pseudo", "train_bce"} <= set(r2.history[0])
    m2, man2 = load_model(r2.checkpoint)
    assert man2["kind"] == "staging" and man2["init"]["kind"] == "station"

    r3 = train_ts3(train_set, cases[6:], tmp_path / "ts3", MCFG, _cfg(epochs=2, batch_size=3, lr=1e-2),
                   init=ts1.checkpoint)
    m3, _ = load_model(r3.last_checkpoint)
    m1, _ = load_model(ts1.checkpoint)
    for (n, p1), (_, p3) in zip(m1.state_dict().items(), m3.classifier.state_dict().items(), strict=True):
        assert torch.equal(p1, p3), n
    torch.manual_seed(5)  # the seeded initial head of the run
    initial = StagingModel(MCFG)
    assert not torch.equal(m3.head[0].weight, initial.head[0].weight)
    with pytest.raises(UsageError, match="ts3 needs"):
        train_ts3(train_set, cases[6:], tmp_path / "ts3b", MCFG, _cfg(epochs=1))


def test_augmentation_transforms_keep_the_centre_and_are_seeded():
    from LymphNodeStagingLib.training.loops import AugmentConfig, random_transform

    c = np.array([10.0, -20.0, 30.0])
    affine = random_transform(c, np.random.default_rng(0), AugmentConfig(p_affine=1.0, p_elastic=0.0), 16, 1.0)
    np.testing.assert_allclose(affine.TransformPoint(c.tolist()), c, atol=1e-9)
    moved = np.array(affine.TransformPoint((c + [8.0, 0, 0]).tolist()))
    assert 0.0 < np.linalg.norm(moved - c - [8.0, 0, 0]) < 8.0 * 0.5
    cfg = AugmentConfig(p_affine=0.0, p_elastic=1.0, elastic_magnitude_mm=(2.0, 2.0))
    e1 = random_transform(c, np.random.default_rng(1), cfg, 16, 1.0)
    e2 = random_transform(c, np.random.default_rng(1), cfg, 16, 1.0)
    pts = c + np.random.default_rng(2).uniform(-7, 7, (20, 3))
    d1 = np.array([e1.TransformPoint(p.tolist()) for p in pts]) - pts
    d2 = np.array([e2.TransformPoint(p.tolist()) for p in pts]) - pts
    np.testing.assert_array_equal(d1, d2)
    assert 0.0 < np.abs(d1).max() < 10.0
    assert random_transform(c, np.random.default_rng(0), AugmentConfig(enabled=False), 16, 1.0) is None
